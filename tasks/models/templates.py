"""Named chat templates, for models that have none of their own (a base model) or whose template is replaced.

Each is written in the format of the family it is named after (the Jinja the family's tokenizer_config.json
carries), so a base model can be fine-tuned in the very format its instruct siblings are served with. A template
whose end of turn is not one token of the model's vocabulary is refused at the check (tasks/models/chat.py), since
generation could not stop at it; "default" ends a turn with the tokenizer's own eos token, so it fits any model.
"""

from __future__ import annotations

TEMPLATES: dict[str, str] = {
    # Plain-text role headers; a turn ends with the eos token. BOS is added by the code when the tokenizer adds one.
    "default": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '### Assistant:\n' + m['content'] + eos_token }}"
        "{% else %}{{ '### ' + m['role'] | capitalize + ':\n' + m['content'] }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
    ),
    # Qwen 2 / 2.5, OpenHermes 2.5: <|im_start|>role ... <|im_end|>
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Zephyr: <|role|> headers, turns end with eos.
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    # Mistral-Instruct v0.1/v0.2: [INST] ... [/INST], no system role (tasks/models/chat.py folds it into the first user turn).
    "mistral": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # Llama 3 / 3.1: header ids, turns end with <|eot_id|>.
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Gemma / Gemma 2: <start_of_turn>user|model ... <end_of_turn>, no system role.
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Phi 3: <|role|> headers, turns end with <|end|>; a finished conversation ends with eos.
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}
