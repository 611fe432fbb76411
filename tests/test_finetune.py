"""Fine-tuning: assistant-only labels, packing computes the same loss as padding, micro-batches and the fused
LoRA form change nothing, and a fine-tune reports its memory."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.config.stages import FinetuneConfig
from tasks.data.load import load_examples
from tasks.models.chat import IGNORE, prompt_format, prompt_ids
from tasks.train.finetune import finetune
from tasks.train.loop import batch_loss_sum, encode, last_mlp, pack, pad, resolve_packing, train_steps
from tasks.train.lora_kernels import PACKED_ATTENTION, _register_packed_attention, fuse_small_loras, unfuse_loras


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["alpha"]))


@pytest.fixture(scope="module")
def fmt(tok):
    return prompt_format(tok)


@pytest.fixture(scope="module")
def rows(tok, fmt, tiny_data):
    return [encode(tok, fmt, ex) for ex in load_examples(tiny_data["extraction"][0])][:6]


def lora_model(folder, r=8, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero: move it so the adapter matters to the loss
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_labels_ignore_the_prompt(tok, fmt, tiny_data):
    ex = load_examples(tiny_data["classification"][0])[0]
    ids, labels = encode(tok, fmt, ex)
    n_prompt = len(prompt_ids(tok, fmt, ex.prompt))
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]).strip() == ex.answer.strip()
    # The zoo's own template ends a turn with </s>: the ids are those of its full rendering, up to that token.
    full = tok.apply_chat_template([*ex.prompt, {"role": "assistant", "content": ex.answer}], tokenize=False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"][:len(ids)]


def test_pack_boundaries(rows):
    b = pack(rows[:3])
    lens = [len(x) for x, _ in rows[:3]]
    assert b["input_ids"].shape == (1, sum(lens)) and b["cu_seq_lens_q"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    starts = [0, lens[0], lens[0] + lens[1]]
    assert [int(b["position_ids"][0, s]) for s in starts] == [0, 0, 0]
    # the last position of each row predicts nothing (no learning across rows)
    assert all(int(b["targets"][0, s - 1]) == IGNORE for s in starts[1:] + [sum(lens)])


@pytest.mark.parametrize("attn", ["sdpa", PACKED_ATTENTION])
def test_packed_loss_equals_padded_loss(tiny_models, rows, tok, attn):
    model = lora_model(tiny_models["alpha"])
    n = sum(sum(t != IGNORE for t in y[1:]) for _, y in rows)
    batch = {k: v for k, v in __import__("tasks.train.loop", fromlist=["collate"]).collate(rows, tok.pad_token_id).items()}
    hf = model(**batch).loss  # transformers' own loss on the right-padded, masked batch, every position computed
    hf.backward()
    g_hf = grads(model)
    model.zero_grad()
    padded = batch_loss_sum(model, pad(rows, tok.pad_token_id)) / n  # no mask, last MLP at target positions only
    padded.backward()
    g_pad = grads(model)
    model.zero_grad()
    _register_packed_attention()
    model.get_base_model().set_attn_implementation(attn)
    packed = batch_loss_sum(model, pack(rows)) / n
    packed.backward()
    g_pack = grads(model)
    assert torch.allclose(hf, padded, atol=1e-5) and torch.allclose(packed, padded, atol=1e-5)
    assert all(torch.allclose(g_pad[k], g_hf[k], atol=1e-5, rtol=1e-4) for k in g_hf)
    assert all(torch.allclose(g_pack[k], g_pad[k], atol=1e-5, rtol=1e-4) for k in g_pad)


def test_last_mlp_runs_only_at_targets(tiny_models, rows, tok):
    model = lora_model(tiny_models["alpha"])
    mlp = last_mlp(model)
    seen = []
    hook = mlp.down_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[:-1].numel()))
    b = pad(rows, tok.pad_token_id)
    batch_loss_sum(model, b)
    hook.remove()
    assert seen == [int((b["targets"] != IGNORE).sum())] and "forward" not in vars(mlp)  # and put back after


def test_auto_packing_follows_the_attention_kernels():
    assert resolve_packing("auto", "flash_attention_2") is True and resolve_packing("auto", "sdpa") is False
    assert resolve_packing(True, "sdpa") is True and resolve_packing(False, "flash_attention_2") is False


def test_train_steps_packed_equals_padded_and_micro_batches(tiny_models, rows, tok):
    """One step on all rows: packed, padded and split into 64-token micro-batches all give the same loss/update."""
    out = {}
    for name, kw in {"packed": {"packing": True}, "padded": {"packing": False}, "micro": {"max_tokens": 64},
                     "checkpointed": {"gradient_checkpointing": True}}.items():
        model = lora_model(tiny_models["alpha"])
        m = train_steps(model, rows, lr=1e-2, steps=1, batch_size=len(rows), seed=0, pad_id=tok.pad_token_id, **kw)
        out[name] = (m["loss_first"], torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
        assert m["peak_rss_mb"] > 0 and m["tokens"] == sum(len(x) for x, _ in rows)
    for name in ("padded", "micro", "checkpointed"):
        assert out[name][0] == pytest.approx(out["packed"][0], abs=1e-4), name
        # Adam's first step is ~lr * sign(grad): only parameters whose gradient is ~0 may land differently
        assert (out[name][1] - out["packed"][1]).abs().gt(1e-5).float().mean() < 0.01, name
    assert model.get_base_model().config._attn_implementation == "sdpa"  # train_steps put it back


def test_fused_lora_same_loss_and_grads(tiny_models, rows):
    model = lora_model(tiny_models["alpha"])
    b = pack(rows)
    ref = batch_loss_sum(model, b)
    ref.backward()
    g_ref = grads(model)
    model.zero_grad()
    fused = fuse_small_loras(model)
    assert fused  # the tiny shape qualifies
    out = batch_loss_sum(model, b)
    out.backward()
    assert torch.allclose(out, ref, rtol=1e-5)
    assert all(torch.allclose(grads(model)[k], g_ref[k], atol=1e-6, rtol=1e-4) for k in g_ref)
    unfuse_loras(fused)
    assert "forward" not in vars(fused[0])
    assert not fuse_small_loras(lora_model(tiny_models["alpha"], dropout=0.1))  # dropout keeps peft's path


def test_finetune_writes_adapter_and_memory(tiny_models, tiny_data, tmp_path):
    cfg = FinetuneConfig(max_steps=3, batch_size=4, learning_rate=3e-3, max_length=128, search={"enabled": False})
    m = finetune(tiny_models["alpha"], load_examples(tiny_data["orders"][0]), cfg, tmp_path)
    saved = json.loads((tmp_path / "train_metrics.json").read_text())
    assert saved["steps"] == 3 and saved["packing"] is False and saved["peak_rss_mb"] > 0 and m == saved
    assert (tmp_path / "adapter_config.json").exists()
