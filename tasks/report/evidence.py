"""The report's evidence, read from the run's outputs and the store: mean metric scores, prompt formats and how
many answers were cut, each fine-tune's training figures and example outputs side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tasks.config.schema import SearchConfig
from tasks.data.provenance import source_lines
from tasks.generate.outputs import finish_reasons
from tasks.judge.judgments import metric_scores
from tasks.plan.jobs import dataset_keys
from tasks.plan.prepare import Prepared
from tasks.report.tables import evidence_lines, examples_table, finetune_table, top_contenders
from tasks.store.results import adapter_path
from tasks.store.store import Store


def scores_table(prep: Prepared, frames: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """Mean metric score of every contender on every dataset (contenders x datasets), from their outputs tables."""
    cols = {}
    for ds, outputs in frames.items():
        data = prep.datasets[ds]
        cols[ds] = {c: metric_scores(data.test, data.metric, df).mean() for c, df in outputs.items()}
    return pd.DataFrame(cols).rename_axis("contender")


def formats_table(prep: Prepared, frames: dict[str, dict[str, pd.DataFrame]], max_new_tokens: int) -> pd.DataFrame:
    """Every fine-tuned model's prompt format and how many of its test outputs ran to max_new_tokens."""
    rows = []
    for name, info in prep.models.items():
        mine = [outputs[name] for outputs in frames.values() if name in outputs]
        if not info.finetuned or not mine:
            continue
        df = pd.concat(mine)
        cut = int((finish_reasons(df, max_new_tokens) == "length").sum())
        rows.append({"model": name, "prompt format": info.template, "cut at max_new_tokens": f"{cut} of {len(df)}"})
    return pd.DataFrame(rows)


def training_metrics(cfg: SearchConfig, prep: Prepared, st: Store) -> dict[tuple[str, str], dict]:
    """(model, dataset) -> its fine-tune's train_metrics.json (loss first and last, steps, speed)."""
    metrics = {}
    for ds, data in prep.datasets.items():
        keys = dataset_keys(cfg, prep.models, data, [m for m, info in prep.models.items() if info.finetuned])
        for m, key in keys.adapters.items():
            path = Path(st.local_dir(adapter_path(key)))
            if (path / "train_metrics.json").is_file():
                metrics[(m, ds)] = json.loads((path / "train_metrics.json").read_text())
    return metrics


def evidence(cfg: SearchConfig, prep: Prepared, ratings: pd.DataFrame, frames: dict[str, dict[str, pd.DataFrame]],
             metrics: dict[tuple[str, str], dict]) -> list[str]:
    """The report's training figures of every fine-tune (`metrics`: training_metrics) and example outputs side by
    side."""
    examples = {ds: examples_table(data.test, frames[ds], top_contenders(ratings, ds))
                for ds, data in prep.datasets.items()}
    sources = source_lines([*cfg.datasets, *([cfg.validation.dataset] if cfg.validation else [])])
    head = ["## Where the datasets came from", "", *sources, ""] if sources else []
    return head + evidence_lines(finetune_table(metrics), examples)
