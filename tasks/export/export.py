"""Export a finished run's winner ready to serve: its LoRA adapter (or full weights with it merged in), the tokenizer
with the chat template it was trained with, a model card, and the commands to serve it; then check that the export
answers the test rows exactly as the search's stored outputs say it did.

The command line is flows/export.py. Bad input (unknown run, run without ratings, unknown dataset or model, an
output folder that is not empty) is a one-line UserError raised before torch is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from tasks.config.base import MODEL_KINDS
from tasks.config.schema import ComputeConfig, JudgeConfig, LoadOptions, SearchConfig
from tasks.core.errors import UserError, first_line
from tasks.export.card import model_card
from tasks.export.serve import (
    Serving,
    card_serve_command,
    search_dtype,
    serve_command,
    throughput_lines,
    write_generation_config,
)
from tasks.export.vllm import Verdict, VllmCheckConfig, check_in_vllm, vllm_python
from tasks.plan.prepare import fit_datasets
from tasks.store.guards import tmp_name
from tasks.store.results import LATEST, RUNS, adapter_path, model_path, outputs_path, run_path
from tasks.store.store import Store, resolve_store

if TYPE_CHECKING:
    import pandas as pd

    from tasks.models.chat import PromptFormat
    from tasks.plan.prepare import Prepared

class CheckFailed(Exception):
    """The exported folder answers the test rows differently from the search's stored outputs."""


@dataclass(frozen=True)
class Run:
    """A finished run as read from the store: its id, config, ratings and validation result."""

    id: str
    config: SearchConfig
    config_text: str
    ratings: pd.DataFrame
    validation: dict[str, Any] | None
    learned: list[dict[str, Any]] = field(default_factory=list)  # each fine-tune against its floors (learned.json)


@dataclass(frozen=True)
class Winner:
    """What is exported: the model, the dataset its adapter was trained on, and where every part of it is."""

    model: str
    kind: str
    chosen: str  # why this model, in words
    dataset: str
    dataset_why: str  # why this dataset's adapter, in words
    base_dir: Path  # local folder of the base weights
    base_name: str  # what the adapter and the serve command name: a hub id, a local path, or the store's folder
    load: LoadOptions  # the template and remote-code opt-in the search trained and generated with
    adapter_dir: Path
    outputs_rel: str  # the search's outputs of this fine-tune on this dataset's test rows


def open_run(store: Store, run: str) -> Run:
    """The run `run` (or LATEST) of the store; UserError naming what is missing."""
    if run.upper() == "LATEST":
        if not store.exists(LATEST):
            raise UserError(f"run LATEST: the store {store.root} has no finished run (no {LATEST})")
        run = store.read_text(LATEST).strip()
    rel = run_path(run)
    if "/" in run or not run or not store.exists(f"{rel}/config.yaml"):
        try:
            known = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.path(RUNS), detail=False))
        except FileNotFoundError:
            known = []
        known = [k for k in known if k != "LATEST" and not k.startswith(".")]
        hint = f"newest there: {', '.join(known[-3:])}" if known else "it has no runs; --store DIR names another"
        raise UserError(f"run '{run}': no such run in the store {store.root} ({hint})")
    if not store.exists(f"{rel}/ratings.parquet"):
        raise UserError(f"run '{run}': has no ratings ({store.path(rel)}/ratings.parquet); it did not finish: run its "
                        "search again to finish it")
    text = store.read_text(f"{rel}/config.yaml")
    try:
        config = SearchConfig.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as e:
        raise UserError(f"{store.path(rel)}/config.yaml: not a config this version reads ({first_line(e)})") from None
    from tasks.report.search import kept_merges  # the search's own merges that the run rated (search.rounds)

    config = config.model_copy(update={"merges": [*config.merges, *kept_merges(store, rel)]})
    validation = store.read_json(f"{rel}/validation.json") if store.exists(f"{rel}/validation.json") else None
    learned = store.read_json(f"{rel}/learned.json") if store.exists(f"{rel}/learned.json") else []
    return Run(run, config, text, store.read_parquet(f"{rel}/ratings.parquet"), validation, learned)


def pick_model(run: Run, dataset: str | None, model: str | None) -> tuple[str, str]:
    """(model, why): --model; else the frozen winner (pooled); else the best fine-tune of the pooled or dataset scope."""
    kinds = run.config.model_kinds()
    tuned = [n for n, k in kinds.items() if k in MODEL_KINDS]
    if model is not None:
        if model not in tuned:
            what = "a reference, not a fine-tune" if model in kinds else "not a model of this run"
            raise UserError(f"--model {model}: {what}; run {run.id} fine-tuned: {', '.join(tuned)}")
        return model, "named by --model"
    frozen = (run.validation or {}).get("winner")
    if dataset is None and frozen in tuned:
        return frozen, "the search's winner, frozen before validation (validation.json)"
    scope = dataset or "overall"
    r = run.ratings[(run.ratings["scope"] == scope) & run.ratings["kind"].isin(MODEL_KINDS)]
    if r.empty:
        raise UserError(f"run {run.id}: its ratings have no fine-tuned contender in scope '{scope}'")
    best = r.sort_values("rating", ascending=False, kind="stable").iloc[0]["contender"]
    return str(best), f"the best fine-tune on {dataset}" if dataset else "the best fine-tune of the pooled ratings"


def pick_dataset(run: Run, dataset: str | None) -> tuple[str, str]:
    """(dataset whose adapter is exported, why): --dataset, else the config's first dataset."""
    names = [d.name for d in run.config.datasets]
    if dataset is None:
        return names[0], "the config's first dataset; --dataset NAME exports another's"
    if dataset not in names:
        held = run.config.validation.dataset.name if run.config.validation else None
        note = f" ({held} is its held-out dataset, which only validates the winner)" if dataset == held else ""
        raise UserError(f"--dataset {dataset}: not a dataset of run {run.id}{note}; its datasets: {', '.join(names)}")
    return dataset, "named by --dataset"


def out_folder(out: str) -> Path:
    """The export's folder: new or empty (nothing is overwritten); UserError otherwise."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: is a file; name a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"--out {out}: folder is not empty; name a new or empty folder (nothing is overwritten)")
    return path


def prepare_offline(cfg: SearchConfig) -> Prepared:
    """The run's models and datasets fingerprinted as the search did, without calling any API or work pool."""
    from tasks.plan.prepare import prepare

    # References, an LLM judge, a work pool and the held-out set play no part in where the winner's files are.
    return prepare(cfg.model_copy(update={"references": [], "judge": JudgeConfig(), "compute": ComputeConfig(),
                                          "validation": None}))


def base_folder(cfg: SearchConfig, prep: Prepared, name: str, store: Store, log: Callable[[str], None]) -> tuple[Path, str]:
    """(local folder of the model's base weights, the name the export gives it: hub id, local path or store folder)."""
    info = prep.models[name]
    if info.role == "merge":
        rel = model_path(info.fingerprint)
        if not store.exists(rel):
            raise UserError(f"store {store.root}: has no merged model {name} ({rel}); run the search again to make it")
        return store.local_dir(rel), str(store.local_dir(rel))
    from tasks.candidates.resolve import materialize

    sources = cfg.candidates + cfg.ingredients
    c = next(c for c in sources if c.name == name)
    folder = Path(materialize(c, store, log=log, others=sources)).resolve()
    if str(folder).startswith(str(Path(store.root).resolve()) + os.sep) or not store.local:
        return folder, str(folder)  # a zoo model, or a user's adapter merged into its base: the store holds it
    return folder, str(Path(c.path).resolve()) if Path(c.path).is_dir() else c.path  # local folder, or hub id


def locate(run: Run, prep: Prepared, store: Store, model: str, chosen: str, dataset: str, why: str, check: bool,
           log: Callable[[str], None]) -> Winner:
    """Find the model's base, its adapter for `dataset` and the search's outputs of it; UserError when one is gone."""
    from tasks.plan.jobs import dataset_keys

    cfg, data = run.config, prep.datasets[dataset]
    keys = dataset_keys(cfg, prep.models, data, [model], references=False)  # as the search keyed them
    key = keys.adapters[model]
    changed = ("is this the run's store, and are its model and dataset files as they were? (the keys are hashed "
               "from the files as they are now)")
    if not store.exists(adapter_path(key)):
        raise UserError(f"store {store.root}: no adapter of {model} on {dataset} (adapters/{key}); {changed}")
    outputs = outputs_path(keys.outputs[model])
    if check and not store.exists(outputs):
        raise UserError(f"store {store.root}: no outputs of {model} on {dataset} ({outputs}) to check the export "
                        f"against; {changed}; --no-check exports without the check")
    base_dir, base_name = base_folder(cfg, prep, model, store, log)
    return Winner(model, run.config.model_kinds()[model], chosen, dataset, why, base_dir, base_name, prep.models[model].load,
                  store.local_dir(adapter_path(key)), outputs)


def write_adapter(w: Winner, folder: Path) -> PromptFormat:
    """The PEFT adapter (its base named in adapter_config.json) and the tokenizer with its training template."""
    from tasks.models.chat import generation_eos, load_tokenizer, prompt_format

    for f in w.adapter_dir.iterdir():  # not the store's manifest, nor peft's blank model card
        if f.is_file() and not f.name.startswith(".") and f.name != "README.md":
            shutil.copy2(f, folder / f.name)
    conf = json.loads((folder / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = w.base_name
    (folder / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    tok = load_tokenizer(w.base_dir, w.load)  # tasks/models/chat.py's rule: own template, else the config's
    save_tokenizer(tok, folder)
    return prompt_format(tok, generation_eos(w.base_dir), w.model)


def write_merged(w: Winner, folder: Path) -> PromptFormat:
    """Full weights with the adapter folded in exactly as the search generated with, and the tokenizer."""
    from tasks.generate.outputs import merged_adapter
    from tasks.models.loading import load_base

    model, tok, fmt = load_base(w.base_dir, w.load)
    with merged_adapter(model, w.adapter_dir) as merged:  # the search's own merge: the very weights it generated with
        merged.generation_config.eos_token_id = list(fmt.stop_ids)  # a server stops at the template's end of turn too
        merged.save_pretrained(str(folder))
    save_tokenizer(tok, folder)
    if (w.adapter_dir / "train_metrics.json").is_file():
        shutil.copy2(w.adapter_dir / "train_metrics.json", folder / "train_metrics.json")
    if (w.base_dir / "mergekit_config.yml").is_file():
        shutil.copy2(w.base_dir / "mergekit_config.yml", folder / "mergekit_config.yml")
    return fmt


def save_tokenizer(tok: Any, folder: Path) -> None:
    """Save the tokenizer, its template also as chat_template.jinja (what `vllm serve --chat-template` reads)."""
    tok.save_pretrained(str(folder))
    if not (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")


def reproduce(folder: Path, w: Winner, cfg: SearchConfig, prep: Prepared, merged: bool) -> pd.DataFrame:
    """The exported folder's greedy answers to the dataset's test rows, through the search's own generation code."""
    from tasks.compute.workers import threads_for, torch_threads
    from tasks.generate.outputs import generate_loaded, merged_adapter
    from tasks.models.chat import load_tokenizer, prompt_format
    from tasks.models.loading import load_base

    own = LoadOptions(trust_remote_code=w.load.trust_remote_code)  # the exported tokenizer's own template only
    if merged:
        model, tok, fmt = load_base(folder, own)
        ctx: Any = nullcontext(model)
    else:
        model, _, _ = load_base(w.base_dir, w.load)  # the base's weights; tokenizer and adapter from the export
        tok = load_tokenizer(folder, own)
        fmt = prompt_format(tok, model.generation_config.eos_token_id, str(folder))
        ctx = merged_adapter(model, folder)  # folded in, as the search generated (unfolded LoRA rounds differently)
    model.eval()
    with ctx as m, torch_threads(threads_for(model.num_parameters())):  # the search's thread count
        return generate_loaded(m, tok, fmt, w.dataset, prep.datasets[w.dataset].test, w.model, cfg.generate)


def compare(produced: pd.DataFrame, stored: pd.DataFrame) -> tuple[int, int, str]:
    """(identical outputs, test rows, the first difference in words or '')."""
    want = dict(zip(stored["example_id"].astype(str), stored["output"]))
    got = dict(zip(produced["example_id"].astype(str), produced["output"]))
    diff = [i for i in want if got.get(i) != want[i]]
    if not diff:
        return len(want), len(want), ""
    i = diff[0]
    return len(want) - len(diff), len(want), (f"first difference, example {i}: the search wrote {want[i]!r}, "
                                              f"the export {got.get(i)!r}")


def refuse_unlearned(run: Run, name: str, force: bool) -> None:
    """UserError when the run found that `name` learned no dataset (runs/<id>/learned.json), unless forced."""
    mine = [r for r in run.learned if r["model"] == name]
    if mine and not any(r["learned"] for r in mine) and not force:
        raise UserError(f"run {run.id}: {name} did not learn any dataset (its fine-tunes beat neither their untuned "
                        "base nor the trivial answer: see the report's 'Did fine-tuning work?'); --force exports it "
                        "anyway")


def export_run(run: str, out: str, store: str | None = None, dataset: str | None = None, merged: bool = False,
               check: bool = True, model: str | None = None, log: Callable[[str], None] = print,
               force: bool = False, engine: str = "transformers", compare_forms: bool = True) -> dict[str, Any]:
    """Export a run's winner (or --model) into the new folder `out`, check it in `engine` (transformers, or vllm: the
    card's own server command; with `compare_forms` the other form's throughput too), and say what was written.

    Raises UserError for bad input (before any model loads) and CheckFailed when the check finds a difference (the
    export is then left in `out` for inspection).
    """
    if engine not in ("transformers", "vllm"):
        raise UserError(f"--check {engine}: not an engine the check knows (transformers, vllm)")
    root = resolve_store(store)
    if "://" not in root and not Path(root).is_dir():
        raise UserError(f"store {root}: no such folder; --store DIR or $BASESEARCH_STORE names the search's store")
    st = Store(root)
    r = open_run(st, run)
    ds, ds_why = pick_dataset(r, dataset)
    name, chosen = pick_model(r, dataset, model)
    target = out_folder(out)
    refuse_unlearned(r, name, force)
    vllm = VllmCheckConfig(**vllm_python()) if check and engine == "vllm" else None  # before any model loads
    log(f"run {r.id}: exporting {name} ({chosen}); its adapter trained on {ds} ({ds_why})")
    prep = fit_datasets(r.config, prepare_offline(r.config), st)  # the training rows the search's fine-tunes used
    w = locate(r, prep, st, name, chosen, ds, ds_why, check, log)
    log(f"base model: {w.base_name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / tmp_name()  # filled, then renamed to `out`: a failed export leaves no half folder
    tmp.mkdir()
    try:
        fmt = write_merged(w, tmp) if merged else write_adapter(w, tmp)
        serving = serving_of(w, st, target, merged, fmt, r.config)
        write_generation_config(tmp, None if merged else w.base_dir, fmt.stop_ids)
        line, problem = "not run (--no-check)", ""
        if vllm is not None:
            line = "check (vllm): not finished"  # replaced once the server has answered from the final folder
        elif check:
            same, total, problem = compare(reproduce(tmp, w, r.config, prep, merged), st.read_parquet(w.outputs_rel))
            line = f"{same} of {total} test outputs identical to the search's"
            log(f"check: {line}")
        how = (" (loaded from this folder with transformers" + ("" if merged else " and peft")
               + ", answered greedily with the search's generation settings)") if check and vllm is None else ""
        card = model_card(r, prep, w, serving, fmt, line + how)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        readable(tmp)
        if target.is_dir():
            target.rmdir()  # empty, checked above
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if vllm is not None:  # the card's command names the final folder: the server starts once it is in place
        verdict, deploy = check_served(w, prep, st, r.config, serving, fmt, card, vllm, compare_forms, log)
        line, problem = verdict.line, verdict.problem
        note = (f" (this card's vllm serve command, vLLM {vllm.version}, each test row asked through the openai "
                f"client as below, {r.config.generate.batch_size} at a time)")
        card = model_card(r, prep, w, serving, fmt, line + note, deploy)
        (target / "README.md").write_text(card, encoding="utf-8")
    if problem:
        raise CheckFailed(f"{line if vllm else 'check: ' + line}; {problem}; the export is left in {target} for "
                          "inspection")
    return {"run_id": r.id, "model": name, "kind": w.kind, "dataset": ds, "base": w.base_name, "merged": merged,
            "out": str(target), "check": line if check else None, "serve": card_serve_command(card), "card": card}


def readable(folder: Path) -> None:
    """Every file 0644 and folder 0755: a server running as another user reads the export (the store keeps some
    files 0600, and copy2 keeps their mode)."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def serving_of(w: Winner, st: Store, out: Path, merged: bool, fmt: PromptFormat, cfg: SearchConfig) -> Serving:
    """How the export is served: the dtype the search generated in (its outputs' device), rank, stops."""
    from tasks.models.loading import device

    stored = st.read_parquet(w.outputs_rel) if st.exists(w.outputs_rel) else None
    devices = list(stored["device"].astype(str)) if stored is not None and "device" in stored else [device().type]
    rank = json.loads((w.adapter_dir / "adapter_config.json").read_text()).get("r")
    return Serving(out=out, served=f"{w.model}-{w.dataset}", base=w.base_name, merged=merged,
                   dtype=search_dtype(devices), rank=rank, stops=fmt.stop_ids,
                   max_new_tokens=cfg.generate.max_new_tokens, remote_code=w.load.trust_remote_code,
                   base_is_merge=w.kind == "merge" and not merged)


def check_served(w: Winner, prep: Prepared, st: Store, cfg: SearchConfig, serving: Serving, fmt: PromptFormat,
                 card: str, vllm: VllmCheckConfig, compare_forms: bool, log: Callable[[str], None]
                 ) -> tuple[Verdict, list[str]]:
    """(the verdict, the card's which-to-deploy lines): the card's vllm serve command run and asked every test row;
    then, with `compare_forms`, the other form (merged weights for an adapter, and back) served the same way from a
    temporary folder and timed on the same rows."""
    from tasks.generate.outputs import finish_reasons
    from tasks.models.chat import fold_system, load_tokenizer

    stored = st.read_parquet(w.outputs_rel)
    ends = finish_reasons(stored, cfg.generate.max_new_tokens)
    want = {str(i): (o, f) for i, o, f in zip(stored["example_id"], stored["output"], ends)}
    rows = [(str(e.id), fold_system(e.prompt) if fmt.fold_system else e.prompt) for e in prep.datasets[w.dataset].test]
    tok = load_tokenizer(serving.out, LoadOptions(trust_remote_code=w.load.trust_remote_code))

    def ask(command: str, s: Serving) -> Verdict:
        """Serve with `command`, ask every row as the card does, compare, time."""
        return check_in_vllm(command, s.served, rows, want, tok, s.max_new_tokens, cfg.generate.batch_size, vllm, log)

    verdict = ask(card_serve_command(card), serving)
    log(verdict.line)
    if verdict.problem or not compare_forms:
        return verdict, []
    other_dir = Path(tempfile.mkdtemp(prefix=".other-form-", dir=serving.out.parent))
    try:  # the other form, written as the export would write it
        (write_adapter if serving.merged else write_merged)(w, other_dir)
        write_generation_config(other_dir, w.base_dir if serving.merged else None, fmt.stop_ids)
        other = replace(serving, out=other_dir, merged=not serving.merged, base_is_merge=False)
        log(f"which to deploy: serving the {'merged weights' if other.merged else 'adapter'} the same way")
        versus = ask(serve_command(other), other)
        log(versus.line)
    finally:
        shutil.rmtree(other_dir, ignore_errors=True)
    return verdict, throughput_lines(serving, verdict, versus, vllm.version, len(rows), cfg.generate.batch_size)
