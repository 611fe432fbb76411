"""The export's model card, README.md: what it is, how to serve it and which form to deploy, the check's line, the
ratings, validation, the floors, the data, training settings, the merge recipe and the search's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.export.serve import Serving, serve_lines

if TYPE_CHECKING:
    from tasks.config.schema import SearchConfig
    from tasks.export.export import Run, Winner
    from tasks.models.chat import PromptFormat
    from tasks.plan.prepare import Prepared


def _train_file(d: Any) -> str:
    """The training file a dataset's fine-tunes read: a split one (search.refit off) also names its configured file."""
    if d.source is None:
        return d.spec.train
    return f"{d.spec.train} ({len(d.train)} rows of {d.source.spec.train}: its development rows left out)"


def data_rows(cfg: SearchConfig, prep: Prepared) -> list[str]:
    """Markdown table rows of every dataset's files and fingerprints (the held-out one as its files are now)."""
    from tasks.data.load import dataset_fingerprint
    from tasks.data.provenance import source_lines

    rows = [f"| {n} | search | {_train_file(d)} | `{d.train_fp}` | {d.spec.test} | `{d.test_fp}` | {d.metric} |"
            for n, d in prep.datasets.items()]
    if cfg.validation:
        spec = cfg.validation.dataset
        fps = [f"`{dataset_fingerprint(p)}`" if Path(p).exists() else "(file gone)" for p in (spec.train, spec.test)]
        rows.append(f"| {spec.name} | held out | {spec.train} | {fps[0]} | {spec.test} | {fps[1]} | "
                    f"{spec.metric or 'inferred'} |")
    sources = source_lines([*cfg.datasets, *([cfg.validation.dataset] if cfg.validation else [])])
    return ["| dataset | role | train | train fingerprint | test | test fingerprint | metric |",
            "|---|---|---|---|---|---|---|", *rows, *([""] + sources if sources else [])]


def model_card(run: Run, prep: Prepared, w: Winner, serving: Serving, fmt: PromptFormat, check: str,
               recommendation: list[str] | None = None) -> str:
    """README.md of the export: what it is, how to serve it, the check, ratings, validation, data, recipe, config."""
    from tasks.core.tables import md_table
    from tasks.models.chat import fold_system
    from tasks.report.report import ranking_rows, validation_lines

    cfg, info = run.config, prep.models[w.model]
    conf, merged, rank = cfg.rating.confidence, serving.merged, serving.rank
    hub = "" if Path(w.base_name).is_absolute() else f"base_model: {w.base_name}\n"
    what = ("full weights, the LoRA adapter merged in" if merged else f"a LoRA adapter (rank {rank}) of `{w.base_name}`")
    lines = [f"---\nlibrary_name: {'transformers' if merged else 'peft'}\n{hub}tags: [basesearch, lora]\n---", "",
             f"# {w.model} fine-tuned on {w.dataset}", "",
             f"Exported from basesearch run `{run.id}` of search `{cfg.name}`: {what}.", "",
             f"- **Model**: {w.model} ({w.kind}), {w.chosen}.",
             f"- **Base model**: `{w.base_name}`.",
             f"- **Fine-tuned on**: dataset {w.dataset} ({w.dataset_why}).",
             f"- **Prompt format**: {info.template or fmt.describe()}; the tokenizer here carries that chat template.",
             f"- **Check**: {check}", ""]
    example = prep.datasets[w.dataset].test[0].prompt
    lines += serve_lines(serving, fold_system(example) if fmt.fold_system else example, w.dataset, fmt.fold_system,
                         recommendation or [])
    lines += ["## Ratings", "", f"Bradley-Terry ratings (Elo scale) with {conf:.0%} intervals, pooled and per dataset.",
              ""]
    for scope in dict.fromkeys(run.ratings["scope"]):
        lines += [f"### {scope}", "", md_table(ranking_rows(run.ratings, scope, conf)), ""]
    lines += ["## Validation on the held-out dataset", "", *validation_lines(run.validation), ""]  # as the report's
    floors = [f"- {r['dataset']}: scored {r['score']:.2f} against {r['untuned']:.2f} for its untuned base and "
              f"{r['trivial']:.2f} for the trivial answer: " + ("learned" if r["learned"] else "**did not learn**")
              for r in run.learned if r["model"] == w.model]
    if floors:
        lines += ["## Did fine-tuning work?", "",
                  ("Its mean metric score on each dataset's test rows beside its floors (the same base untuned, and a "
                   "trivial answer), as the search measured them:"), "", *floors, ""]
    lines += ["## Data", "", *data_rows(cfg, prep), ""]
    lines += training_lines(w.adapter_dir / "train_metrics.json")
    recipe = w.base_dir / "mergekit_config.yml"
    if w.kind == "merge" and recipe.is_file():
        lines += ["## Merge recipe (mergekit)", "", "```yaml", recipe.read_text(encoding="utf-8").rstrip(), "```", ""]
    lines += ["## Search config", "", "```yaml", run.config_text.rstrip(), "```", ""]
    return "\n".join(lines)


def training_lines(metrics_file: Path) -> list[str]:
    """The card's training section: the settings the adapter trained with, and what its settings search tried."""
    import pandas as pd

    from tasks.core.tables import md_table
    from tasks.report.tables import settings_cells

    if not metrics_file.is_file():
        return []
    m = json.loads(metrics_file.read_text())
    cells = settings_cells(m) | {"steps": m.get("steps"), "training loss": f"{m.get('loss_first')} -> "
                                 f"{m.get('loss_last')}"}
    how = ("the learning rate and epochs its settings search chose on the development rows (finetune.search)"
           if m.get("search") else "the config's fixed settings (finetune.search off)")
    return ["## Training", "", f"LoRA on the training rows, with {how}:", "",
            md_table(pd.DataFrame([cells]).fillna("")), ""]
