"""Model families: every family's rendering equals its own apply_chat_template, the label mask covers the answer and
its end of turn, system text is folded where a template refuses it, generation stops at the end of turn after a
short fine-tune, the check refuses what cannot work in one line, and a search over three families plus a
tokenizer_source: union merge runs through the real flow."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.candidates.resolve import inspect_candidate
from tasks.config.schema import LoadOptions, load_config
from tasks.config.stages import FinetuneConfig, GenerateConfig
from tasks.core.errors import UserError
from tasks.data.load import load_examples
from tasks.demo.data import make_rows, make_split
from tasks.models.chat import IGNORE, encode_row, fold_system, generation_eos, load_tokenizer, prompt_format, prompt_ids
from tasks.models.fingerprint import ModelInfo, check_mergeable
from tasks.models.templates import TEMPLATES
from tasks.plan.prepare import prepare
from tests.conftest import config_error, write_config, write_jsonl
from tests.families import FAMILIES, build_model

# family -> (end-of-turn token, whether its template refuses a system message)
EXPECTED = {"mistral": ("</s>", True), "mistral_base": ("</s>", False), "hermes": ("<|im_end|>", False),
            "zephyr": ("</s>", False), "llama3": ("<|eot_id|>", False), "qwen2": ("<|im_end|>", False),
            "gemma": ("<end_of_turn>", True), "gemma2": ("<end_of_turn>", True), "phi3": ("<|end|>", False)}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """One tiny model of every family, saved with its tokenizer."""
    root = tmp_path_factory.mktemp("families")
    return {name: build_model(name, root / name, seed=i) for i, name in enumerate(FAMILIES)}


def _tokenizer(folder, name):
    """The tokenizer as the search loads it: its own template, or the default for a model with none."""
    return load_tokenizer(folder, LoadOptions(chat_template=None if FAMILIES[name].template else TEMPLATES["default"]))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rendering_is_the_templates_own(family_dirs, name):
    tok = _tokenizer(family_dirs[name], name)
    fmt = prompt_format(tok, generation_eos(family_dirs[name]), name)
    eot, folds = EXPECTED[name]
    assert (fmt.end_of_turn, fmt.fold_system) == (eot, folds)
    assert tok.convert_tokens_to_ids(eot) in fmt.stop_ids
    for task in ("classification", "extraction"):
        *prompt, answer = make_rows(task, 1, 3)[0]["messages"]
        ids, labels = encode_row(tok, fmt, prompt, answer["content"])
        msgs = fold_system(prompt) if folds else prompt
        full = tok.apply_chat_template([*msgs, answer])["input_ids"]
        head = tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
        # Every token the model trains on is the template's own rendering, up to and including the end of turn.
        assert ids == full[:len(ids)] and ids[-1] == tok.convert_tokens_to_ids(eot)
        assert prompt_ids(tok, fmt, prompt) == head
        # The label mask covers exactly the answer and its end of turn.
        start = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        assert start == len(head) and labels[start:] == ids[start:]
        assert tok.decode(ids[start:-1]).strip() == answer["content"].strip()
        if FAMILIES[name].adds_bos and tok.bos_token and "bos_token" in TEMPLATES[FAMILIES[name].template or "default"]:
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # BOS once, as served


def test_base_model_gets_bos_from_the_default_template(family_dirs):
    tok = _tokenizer(family_dirs["mistral_base"], "mistral_base")
    assert tok.chat_template.startswith("{{ bos_token }}")  # the tokenizer adds BOS; the default template does not
    fmt = prompt_format(tok)
    ids = prompt_ids(tok, fmt, [{"role": "user", "content": "Hello"}])
    assert ids[0] == tok.bos_token_id and tok.decode(ids).endswith("### Assistant:\n")


def test_system_text_is_folded_into_the_first_user_turn(family_dirs):
    tok = _tokenizer(family_dirs["mistral"], "mistral")
    fmt = prompt_format(tok)
    text = tok.decode(prompt_ids(tok, fmt, [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}]))
    assert "[INST] Be brief.\n\nHi [/INST]" in text


def _dataset(tmp_path, name, rows):
    """A dataset entry training on `rows`, tested on 6 other classification rows (no test prompt in training)."""
    seen = {json.dumps(r["messages"][:-1]) for r in rows}
    test = [r for r in make_rows("classification", 200, 99) if json.dumps(r["messages"][:-1]) not in seen][:6]
    return {"name": name, "train": str(write_jsonl(tmp_path / f"{name}_train.jsonl", rows)),
            "test": str(write_jsonl(tmp_path / f"{name}_test.jsonl", test))}


def test_a_refused_conversation_is_one_line_before_any_weights(family_dirs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_weights(*a, **k):
        raise AssertionError("the check loaded model weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    rows = make_rows("classification", 6, 1)
    rows[2] = {**rows[2], "messages": [rows[2]["messages"][1], rows[2]["messages"][1], rows[2]["messages"][2]]}
    cands = [{"name": f"m{i}", "path": str(family_dirs[n])} for i, n in enumerate(["llama3", "qwen2", "gemma"])]
    cfg = {"name": "bad", "candidates": cands, "datasets": [_dataset(tmp_path, "labels", rows)]}
    msg = config_error(write_config(tmp_path, cfg))
    assert msg.startswith("candidate 'm2': ") and "labels_train.jsonl:3" in msg and "alternate" in msg


def test_remote_code_is_refused_without_the_opt_in(family_dirs, tmp_path):
    import shutil

    folder = shutil.copytree(family_dirs["phi3"], tmp_path / "remote")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    entry = {"name": "remote", "path": str(folder)}
    ds = _dataset(tmp_path, "labels", make_rows("classification", 6, 1))
    msg = config_error(write_config(tmp_path, {"name": "r", "candidates": [entry], "datasets": [ds]}))
    assert "candidate 'remote'" in msg and "trust_remote_code: true" in msg
    prep = prepare(load_config(write_config(tmp_path, {"name": "r", "datasets": [ds],
                                                       "candidates": [entry | {"trust_remote_code": True}]})))
    assert prep.models["remote"].load.trust_remote_code


def _infos(family_dirs, *names, dirs=None):
    """ModelInfo of checked family models, for check_mergeable."""
    from tasks.config.schema import Candidate

    dirs = dirs or family_dirs
    return [ModelInfo(n, "", inspect_candidate(Candidate(name=n, path=str(dirs[n])))[1]) for n in names]


def test_merges_are_checked_as_mergekit_merges(family_dirs, tmp_path):
    base_hermes = _infos(family_dirs, "mistral_base", "hermes")
    with pytest.raises(UserError, match="different vocabularies .*vocab_size 512 vs 514.*tokenizer_source: union"):
        check_mergeable("m", base_hermes)
    check_mergeable("m", base_hermes, "union")  # vocabularies differing only by added tokens merge
    other = {"other": build_model("hermes", tmp_path / "other", added=("<|foo|>", "<|bar|>"))}
    clash = _infos(family_dirs, "hermes") + _infos(family_dirs, "other", dirs=other)
    with pytest.raises(UserError, match=r"different added tokens at id 512 \('<\|im_start\|>' vs '<\|foo\|>'\)"):
        check_mergeable("m", clash, "union")
    with pytest.raises(UserError, match="different architectures"):
        check_mergeable("m", _infos(family_dirs, "llama3", "qwen2"), "union")


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gemma2", "phi3"])
def test_generation_stops_at_the_end_of_turn_after_a_short_finetune(family_dirs, tmp_path, name):
    from tasks.generate.outputs import cached_base, generate, generate_loaded
    from tasks.train.finetune import finetune

    train = load_examples(write_jsonl(tmp_path / "train.jsonl", make_rows("classification", 32, 1)))
    test = load_examples(write_jsonl(tmp_path / "test.jsonl", make_rows("classification", 20, 2)))
    gen = GenerateConfig(max_new_tokens=12, batch_size=20)
    before = generate_loaded(*cached_base(family_dirs[name]), "c", test, name, gen)  # no adapter yet
    cfg = FinetuneConfig(max_steps=30, batch_size=8, learning_rate=1e-2, max_length=256, lora_r=8,
        search={"enabled": False})
    metrics = finetune(family_dirs[name], train, cfg, tmp_path / "adapter")
    assert metrics["attn_implementation"] == ("eager" if name == "gemma2" else "sdpa")  # Gemma 2 refuses SDPA
    after = generate(family_dirs[name], tmp_path / "adapter", "c", test, name, gen)
    assert (before["finish_reason"] == "length").mean() > 0.5  # a random model runs on to the limit ...
    assert (after["finish_reason"] == "stop").mean() >= 0.95  # ... the fine-tune ends its answers with the turn
    assert not any(FAMILIES[name].eos in o or "<|" in o for o in after["output"])  # stop tokens stripped


def test_an_adapter_folder_is_a_candidate(family_dirs, tmp_path):
    from tasks.candidates.resolve import materialize
    from tasks.store.store import Store
    from tasks.train.finetune import finetune

    train = load_examples(write_jsonl(tmp_path / "train.jsonl", make_rows("classification", 8, 1)))
    adapter = tmp_path / "my-finetune"
    finetune(family_dirs["llama3"], train, FinetuneConfig(max_steps=1, batch_size=4, lora_r=4,
        search={"enabled": False}), adapter)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    ds = _dataset(tmp_path, "labels", make_rows("classification", 6, 1))
    cfg = load_config(write_config(tmp_path, {"name": "a", "datasets": [ds], "candidates": [
        {"name": "llama", "path": str(family_dirs["llama3"])}, {"name": "mine", "path": str(adapter)}]}))
    prep = prepare(cfg)
    assert prep.models["mine"].fingerprint != prep.models["llama"].fingerprint
    assert prep.models["mine"].signature == prep.models["llama"].signature  # the adapter has its base's shape
    store = Store(str(tmp_path / "store"))
    folder = materialize(cfg.candidates[1], store, log=lambda s: None, others=cfg.candidates)
    assert (folder / "config.json").is_file() and folder.is_relative_to(store.root)
    assert materialize(cfg.candidates[1], store, log=pytest.fail, others=cfg.candidates) == folder  # merged once


def test_search_over_three_families_and_a_union_merge(family_dirs, tmp_path, capsys):
    from flows.cli import main
    from tasks.store.store import Store

    ds = lambda n, rows: write_jsonl(tmp_path / f"{n}.jsonl", rows)  # noqa: E731
    split = make_split("classification", 24, 6)  # no test prompt in training: the leak check passes
    cfg = {
        "name": "families",
        "candidates": [{"name": n, "path": str(family_dirs[n])} for n in ("llama3", "qwen2", "gemma2")],
        "ingredients": [{"name": n, "path": str(family_dirs[n])} for n in ("mistral_base", "hermes")],
        "merges": [{"name": "hermes-union", "recipe": {
            "merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
            "models": [{"model": "mistral_base", "parameters": {"weight": 0.5}},
                       {"model": "hermes", "parameters": {"weight": 0.5}}]}}],
        "datasets": [{"name": "labels", "train": str(ds("train", split[0])), "test": str(ds("test", split[1]))}],
        "finetune": {"max_steps": 20, "batch_size": 8, "learning_rate": 0.01, "max_length": 256, "lora_r": 8,
                     "search": {"enabled": False}},  # formats, not settings, are under test here
        "generate": {"max_new_tokens": 12, "batch_size": 8},
        "rating": {"bootstrap_rounds": 20},
    }
    store_dir = tmp_path / "store"
    assert main(["--config", str(write_config(tmp_path, cfg)), "--store", str(store_dir)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    store = Store(str(store_dir))
    run = store.read_text("runs/LATEST").strip()
    ratings = store.read_parquet(f"runs/{run}/ratings.parquet")
    # Ingredients are merged, never fine-tuned or rated.
    assert set(ratings["contender"]) == {"llama3", "qwen2", "gemma2", "hermes-union", "teacher"}
    assert len(list((store_dir / "adapters").iterdir())) == 4
    merged = next((store_dir / "models").glob("*/mergekit_config.yml")).parent
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == 514  # the union of both vocabularies
    assert "tokenizer_source: union" in (merged / "mergekit_config.yml").read_text()
    outputs = pd.concat(pd.read_parquet(p) for p in (store_dir / "outputs").glob("*.parquet"))
    tuned = outputs[outputs["contender"].isin({"llama3", "qwen2", "gemma2", "hermes-union"})]
    assert set(tuned["finish_reason"]) <= {"stop", "length"} and len(tuned) == 4 * 6
    # each base also answered untuned (a floor): the same format, no adapter
    untuned = outputs[outputs["contender"].str.endswith(" untuned")]
    assert len(untuned) == 4 * 6 and set(untuned["finish_reason"]) <= {"stop", "length"}
    report = store.read_text(f"runs/{run}/report.md")
    # (a | inside a Markdown table cell is escaped, so the table keeps its columns)
    assert "<\\|eot_id\\|>" in report and "<end_of_turn>" in report and "tokenizer_source union" in report


def test_chat_template_by_name_or_jinja_file(family_dirs, tmp_path):
    (tmp_path / "mine.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ':\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant:\\n' }}{% endif %}")
    ds = _dataset(tmp_path, "labels", make_rows("classification", 6, 1))
    base = {"name": "t", "datasets": [ds], "candidates": [
        {"name": "a", "path": str(family_dirs["qwen2"]), "chat_template": "mine.jinja"},  # relative to the config
        {"name": "b", "path": str(family_dirs["mistral_base"])}], "chat_template": "zephyr"}
    prep = prepare(load_config(write_config(tmp_path, base)))
    assert "mine.jinja" in prep.models["a"].template and "assistant:" in prep.models["a"].load.chat_template
    assert "zephyr" in prep.models["b"].template  # no template of its own: the search's
    assert load_tokenizer(family_dirs["mistral_base"], prep.models["b"].load).chat_template.startswith("{{ bos_token }}")
    bad = base | {"chat_template": "vicuna"}
    assert "'vicuna' is neither a named chat template" in config_error(write_config(tmp_path, bad))
    # a template whose end of turn is no token of the vocabulary could never stop generation
    no_eot = base | {"candidates": [{"name": "b", "path": str(family_dirs["qwen2"]), "chat_template": "llama3"}]}
    assert "ends an assistant turn with no special token" in config_error(write_config(tmp_path, no_eot))


def test_a_hub_candidate_is_checked_without_its_weights(family_dirs, tmp_path, monkeypatch):
    import huggingface_hub

    from tasks.candidates.resolve import materialize
    from tasks.store.store import Store

    asked = []

    def fake_snapshot(repo_id, local_files_only=False, allow_patterns=None):
        asked.append(allow_patterns)
        return str(family_dirs["phi3"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    ds = _dataset(tmp_path, "labels", make_rows("classification", 6, 1))
    cfg = load_config(write_config(tmp_path, {"name": "h", "datasets": [ds],
                                              "candidates": [{"name": "phi", "path": "microsoft/Phi-3-mini"}]}))
    prep = prepare(cfg)
    assert asked and all("*.safetensors" not in p for p in asked)  # configs, tokenizer, template only
    assert "turns end with `<|end|>`" in prep.models["phi"].template  # a code span: shown in Markdown
    asked.clear()
    materialize(cfg.candidates[0], Store(str(tmp_path / "store")), log=lambda s: None)
    assert asked == [[*asked[0]]] and "*.safetensors" in asked[0]  # the weights come at the candidates stage
