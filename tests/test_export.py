"""python -m flows.export: a tiny finished run's winner exported as an adapter and as merged weights reloads and
answers its test rows exactly as the search did; the model card names the base and holds the ratings; a model with
no template of its own takes the config's; bad input is one line and exit 2; a difference fails the export."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.export import main
from tasks.config.schema import LoadOptions
from tasks.data.load import load_examples
from tasks.models.chat import load_tokenizer, prompt_format
from tasks.models.templates import TEMPLATES
from tasks.store.store import Store
from tests.conftest import make_tiny_model, mini_config_dict

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
CHECK = re.compile(r"^check: (\d+) of (\d+) test outputs identical to the search's$", re.MULTILINE)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data) -> dict:
    """One tiny search through the real flow: alpha (own template), beta (none: the config's default), their merge."""
    from flows.cli import stop_temporary_server
    from flows.search import search
    from tasks.demo.zoo import build_tokenizer

    root = tmp_path_factory.mktemp("export")
    tok = build_tokenizer()
    models = {n: make_tiny_model(root / n, seed, tok) for seed, n in enumerate(["alpha", "beta"])}
    (models["beta"] / "chat_template.jinja").unlink(missing_ok=True)  # beta: a base model without a template
    conf = json.loads((models["beta"] / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (models["beta"] / "tokenizer_config.json").write_text(json.dumps(conf))
    cfg = mini_config_dict(models, tiny_data)
    config = root / "mini.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    store = root / "store"
    try:
        result = search(str(config), str(store))
        yield {"run": result["run_id"], "store": store, "models": models, "data": tiny_data, "root": root}
    finally:
        stop_temporary_server()  # the export flow below ran on the same temporary server


def export(finished: dict, out: Path, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m flows.export` run in-process on the finished run, with --force: the
    tiny random models learn nothing in a few steps (test_a_model_that_learned_nothing_needs_force)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["--run", finished["run"], "--store", str(finished["store"]), "--out", str(out), "--force", *args])
    return rc, stdout.getvalue(), stderr.getvalue()


def stored_outputs(finished: dict, model: str, dataset: str) -> pd.DataFrame:
    """The search's outputs of `model` on `dataset`, found by their columns (not by the export's keys)."""
    frames = [pd.read_parquet(p) for p in (finished["store"] / "outputs").glob("*.parquet")]
    found = [f for f in frames if set(f["contender"]) == {model} and set(f["dataset"]) == {dataset}]
    assert len(found) == 1
    return found[0]


def answers(model, tok, finished: dict, dataset: str, name: str) -> pd.DataFrame:
    """Greedy answers of a model loaded by the test itself, with the search's own batched generation."""
    from tasks.compute.workers import threads_for, torch_threads
    from tasks.config.stages import GenerateConfig
    from tasks.generate.outputs import generate_loaded

    examples = load_examples(str(finished["data"][dataset][1]))
    fmt = prompt_format(tok, model.generation_config.eos_token_id)
    run = yaml.safe_load((finished["store"] / "runs" / finished["run"] / "config.yaml").read_text())
    with torch_threads(threads_for(model.num_parameters())):  # as the search ran it
        return generate_loaded(model.eval(), tok, fmt, dataset, examples, name, GenerateConfig(**run["generate"]))


def ratings(finished: dict) -> pd.DataFrame:
    """The run's ratings."""
    return Store(str(finished["store"])).read_parquet(f"runs/{finished['run']}/ratings.parquet")


def winner(finished: dict) -> str:
    """The run's frozen winner."""
    return json.loads((finished["store"] / "runs" / finished["run"] / "validation.json").read_text())["winner"]


def test_adapter_export_reloads_and_reproduces_the_search(finished, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "adapter"
    rc, stdout, stderr = export(finished, out)
    assert rc == 0, stderr
    assert CHECK.search(stdout).groups() == ("6", "6")
    assert stdout.splitlines()[-1] == str(out)
    name = winner(finished)
    conf = json.loads((out / "adapter_config.json").read_text())
    base = conf["base_model_name_or_path"]
    if name in finished["models"]:
        assert base == str(finished["models"][name])
    else:  # the merge: its folder in the store
        assert Path(base).parent == finished["store"] / "models" and (Path(base) / "mergekit_config.yml").is_file()
    assert (out / "adapter_model.safetensors").is_file() and not (out / "config.json").exists()

    # Loaded by hand with transformers + peft, the export answers as the search's stored outputs say it did.
    tok = AutoTokenizer.from_pretrained(str(out))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).merge_and_unload()
    mine = answers(model, tok, finished, "extraction", name)
    stored = stored_outputs(finished, name, "extraction")
    assert list(mine["output"]) == list(stored["output"])

    card = (out / "README.md").read_text()
    assert f"**Base model**: `{base}`" in card and "fine-tuned on extraction" in card.lower()
    assert f"vllm serve {base} --enable-lora --max-lora-rank " in card
    assert f" --lora-modules {name}-extraction={out} " in card
    assert "--dtype float32 --generation-config" in card  # as the search generated on CPU; stops served by the server
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o644  # the store's copy is 0600
    for r in ratings(finished).itertuples():  # every row, as the report's ranking tables show it
        shown = (f"| {round(r.rating)} | {r.ci_low:.0f}..{r.ci_high:.0f} |" if math.isfinite(r.rating) else
                 f"| {'unbeaten' if r.rating > 0 else 'never won'} | {'>=' if r.rating > 0 else '<='} ")
        assert f"| {r.contender} | {r.kind} {shown}" in card
    # the teacher out-rated every tiny fine-tune in the search: validation claims no advantage over it to test
    assert f"**{name}**" in card.split("## Validation")[1] and "against **teacher**: **no advantage to test**" in card
    assert "## Search config" in card and "name: mini" in card and "train fingerprint" in card
    floors = card.split("## Did fine-tuning work?")[1].split("\n## ")[0]  # exported with --force: it says so
    assert floors.count("for the trivial answer: **did not learn**") == 2  # extraction and classification

    # The card's transformers snippet runs as written.
    snippet = card.split("## Load it with transformers")[1].split("```python\n")[1].split("```")[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})  # noqa: S102 - our own card's code
    assert printed.getvalue().endswith("\n")


def test_merged_export_reproduces_the_search(finished, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    rc, stdout, stderr = export(finished, out, "--merged")
    assert rc == 0, stderr
    assert CHECK.search(stdout).groups() == ("6", "6")
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    name = winner(finished)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    mine = answers(model, AutoTokenizer.from_pretrained(str(out)), finished, "extraction", name)
    assert list(mine["output"]) == list(stored_outputs(finished, name, "extraction")["output"])
    card = (out / "README.md").read_text()
    assert f"vllm serve {out} --served-model-name {name}-extraction" in card and "library_name: transformers" in card


def test_dataset_template_and_merge(finished, tmp_path):
    # --dataset: the best fine-tune on that dataset, with its adapter for that dataset.
    r = ratings(finished)
    best = r[(r["scope"] == "classification") & r["kind"].isin(["candidate", "merge"])].sort_values(
        "rating", ascending=False, kind="stable").iloc[0]["contender"]
    rc, stdout, stderr = export(finished, tmp_path / "cls", "--dataset", "classification")
    assert rc == 0, stderr
    assert f"exporting {best} (the best fine-tune on classification)" in stdout
    assert CHECK.search(stdout).groups() == ("6", "6")
    assert "fine-tuned on classification" in (tmp_path / "cls" / "README.md").read_text()

    # beta has no template of its own: it was trained, and is exported, with the config's (default).
    rc, stdout, stderr = export(finished, tmp_path / "beta", "--model", "beta")
    assert rc == 0, stderr
    assert CHECK.search(stdout).groups() == ("6", "6")
    trained = load_tokenizer(finished["models"]["beta"], LoadOptions(chat_template=TEMPLATES["default"])).chat_template
    assert load_tokenizer(tmp_path / "beta", LoadOptions()).chat_template == trained
    assert trained != load_tokenizer(finished["models"]["alpha"], LoadOptions()).chat_template

    # A merge's adapter names a folder of the search's store as its base: its card says first to serve --merged.
    rc, stdout, stderr = export(finished, tmp_path / "merge-adapter", "--model", "alpha-beta", "--no-check")
    assert rc == 0, stderr
    card = (tmp_path / "merge-adapter" / "README.md").read_text()
    serving = card.split("## Serve it with vLLM (OpenAI-compatible server)")[1]
    assert serving.lstrip().startswith("**First**: this adapter's base is a merge the search made")
    assert "--merged" in serving.split("```")[0]

    # A merge's card carries its mergekit recipe; merged weights come with it.
    rc, stdout, stderr = export(finished, tmp_path / "merge", "--model", "alpha-beta", "--merged")
    assert rc == 0, stderr
    assert CHECK.search(stdout).groups() == ("6", "6")
    card = (tmp_path / "merge" / "README.md").read_text()
    assert "## Merge recipe (mergekit)" in card and "merge_method: slerp" in card
    assert (tmp_path / "merge" / "mergekit_config.yml").is_file()


def test_a_difference_fails_the_export_in_one_line(finished, tmp_path, monkeypatch):
    import tasks.export.export

    real = tasks.export.export.reproduce

    def one_changed(*args, **kwargs):
        df = real(*args, **kwargs)
        return df.assign(output=["something else", *df["output"][1:]])

    monkeypatch.setattr(tasks.export.export, "reproduce", one_changed)
    rc, stdout, stderr = export(finished, tmp_path / "bad")
    assert rc == 1
    assert CHECK.search(stdout).groups() == ("5", "6")
    assert len(stderr.splitlines()) == 1 and "first difference" in stderr and "something else" in stderr
    assert (tmp_path / "bad" / "README.md").is_file()  # kept for inspection


def test_bad_input_is_one_line_and_exit_2(finished, tmp_path):
    store = finished["store"]
    broken = store / "runs" / "broken-run"
    broken.mkdir(exist_ok=True)
    (broken / "config.yaml").write_text((store / "runs" / finished["run"] / "config.yaml").read_text())
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    cases = {
        ("--run", "no-such-run"): "run 'no-such-run': no such run in the store",
        ("--run", "broken-run"): "run 'broken-run': has no ratings",
        ("--dataset", "nope"): "--dataset nope: not a dataset of run",
        ("--dataset", "orders"): "orders is its held-out dataset",
        ("--model", "teacher"): "--model teacher: a reference, not a fine-tune",
        ("--out", str(full)): "folder is not empty",
        ("--store", str(tmp_path / "nowhere")): "no such folder",
    }
    for (flag, value), says in cases.items():
        opts = {"--run": finished["run"], "--store": str(store), "--out": str(tmp_path / "out"), flag: value}
        argv = [x for pair in opts.items() for x in pair]
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            assert main(argv) == 2, (flag, value)
        assert stderr.getvalue().startswith("error: ") and says in stderr.getvalue(), stderr.getvalue()
        assert len(stderr.getvalue().splitlines()) == 1
    assert not (tmp_path / "out").exists()

    # The real command: one line, exit 2, no traceback, before any model is loaded.
    proc = subprocess.run([sys.executable, "-m", "flows.export", "--run", "no-such-run", "--out", str(tmp_path / "o"),
                           "--store", str(store)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: run 'no-such-run'") and len(proc.stderr.splitlines()) == 1


def test_export_flow_in_prefect(finished, tmp_path):
    from flows.export import export as export_flow

    assert export_flow.name == "export"
    result = export_flow(run=finished["run"], out=str(tmp_path / "ui"), store=str(finished["store"]), force=True)
    assert result["check"] == "6 of 6 test outputs identical to the search's"
    assert (tmp_path / "ui" / "adapter_config.json").is_file() and result["model"] == winner(finished)


def test_a_model_that_learned_nothing_needs_force(finished, tmp_path):
    """The search found the tiny models beat neither floor: the export says so in one line and writes nothing."""
    learned = json.loads((finished["store"] / "runs" / finished["run"] / "learned.json").read_text())
    assert learned and not any(r["learned"] for r in learned)  # what the run found, read by the export
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["--run", finished["run"], "--store", str(finished["store"]), "--out", str(tmp_path / "no")])
    assert rc == 2 and len(stderr.getvalue().splitlines()) == 1 and not (tmp_path / "no").exists()
    assert f"{winner(finished)} did not learn any dataset" in stderr.getvalue() and "--force" in stderr.getvalue()
