"""The development split: a fixed share of each dataset's training rows, set aside for the search's own merges.

A row goes to the development split when the hash of its content (conversation, answer and `expected`; not its id
and not its position) falls below `search.dev_share`: the same row lands on the same side whatever the file's order,
and a row copied twice cannot sit on both sides. The test split is never touched. The two parts are written to the
store (splits/<key>/train.jsonl and dev.jsonl) so that the fine-tuning and generation stages read them as they read a
user's files, and their fingerprints key every result made from them.

With search.refit off (the default), every fine-tune of the search trains on that same train.jsonl (fit_datasets):
the loop's first rating then answers the development rows with the fine-tunes the test rating uses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config.schema import DatasetSpec
from tasks.core.errors import UserError
from tasks.data.load import MIN_TEST_ROWS, DatasetInfo, Example, dataset_fingerprint
from tasks.store.results import SPLIT_VERSION, split_key, split_path

if TYPE_CHECKING:
    from tasks.store.store import Store

DEV_SUFFIX = ".dev"  # a development split's dataset name: extraction.dev (stages, outputs, judgments, ratings)


def row_position(ex: Example) -> float:
    """Where a row's content hash falls in [0, 1): the same row, the same place, in any file and order."""
    blob = json.dumps([ex.prompt, ex.answer, ex.expected], sort_keys=True, default=str, separators=(",", ":"))
    return int(hashlib.sha256(blob.encode()).hexdigest()[:15], 16) / 16**15


def split_rows(rows: list[Example], share: float) -> tuple[list[Example], list[Example]]:
    """(training rows without the development rows, development rows), each in file order."""
    dev = [r for r in rows if row_position(r) < share]
    chosen = {id(r) for r in dev}
    return [r for r in rows if id(r) not in chosen], dev


def check_dev_split(name: str, rows: list[Example], share: float) -> None:
    """UserError when a dataset's development split would be too small to rate on, or leave nothing to train on."""
    train, dev = split_rows(rows, share)
    if len(dev) < MIN_TEST_ROWS:
        raise UserError(f"search.dev_share: {share:g} of dataset '{name}' is {len(dev)} of its {len(rows)} training "
                        f"rows, fewer than the {MIN_TEST_ROWS} a rating needs; raise search.dev_share or add rows")
    if not train:
        raise UserError(f"search.dev_share: {share:g} of dataset '{name}' takes all {len(rows)} training rows; "
                        "lower search.dev_share")


def settings_split_warning(name: str, rows: list[Example], share: float) -> list[str]:
    """A warning when finetune.search has no development rows (or nothing else to train on) in a dataset: its
    fine-tunes then train with finetune.learning_rate and epochs as given."""
    train, dev = split_rows(rows, share)
    if dev and train:
        return []
    return [f"finetune.search: search.dev_share {share:g} of dataset '{name}' leaves {len(dev)} of its {len(rows)} "
            "training rows to choose the learning rate and epochs on, so its fine-tunes train with "
            "finetune.learning_rate and epochs as given; add rows or raise search.dev_share to search them"]


def _row_json(ex: Example) -> dict[str, Any]:
    """A row as a JSONL line of the fine-tuning format, with its id and ground truth kept."""
    row: dict[str, Any] = {"id": ex.id, "messages": [*ex.prompt, {"role": "assistant", "content": ex.answer}]}
    return row | ({"expected": ex.expected} if ex.expected is not None else {})


def _jsonl(rows: list[Example]) -> str:
    """Rows as JSONL text."""
    return "".join(json.dumps(_row_json(r), ensure_ascii=False) + "\n" for r in rows)


def _split_folder(data: DatasetInfo, share: float, store: Store) -> tuple[Path, list[Example], list[Example]]:
    """The split's folder in the store (train.jsonl, dev.jsonl, split.json; written once, a few KB) and its rows."""
    rel = split_path(split_key(data.train_fp, share))
    train, dev = split_rows(data.train, share)

    def write(tmp: Path) -> None:
        """The split's three files."""
        (tmp / "train.jsonl").write_text(_jsonl(train), encoding="utf-8")
        (tmp / "dev.jsonl").write_text(_jsonl(dev), encoding="utf-8")
        (tmp / "split.json").write_text(json.dumps(split_record(data, share, train, dev), indent=1))

    store.folder_once(rel, write)
    return store.local_dir(rel), train, dev


def dev_split(data: DatasetInfo, share: float, store: Store) -> DatasetInfo:
    """The dataset as the search's own merges see it: train = its training rows minus the development rows, test =
    the development rows (the same training file, so the same fine-tunes, as fit_split's)."""

    data = data.source or data
    folder, train, dev = _split_folder(data, share, store)
    spec = DatasetSpec(name=data.spec.name + DEV_SUFFIX, train=str(folder / "train.jsonl"),
                       test=str(folder / "dev.jsonl"), metric=data.metric)
    return DatasetInfo(spec, train, dev, dataset_fingerprint(spec.train), dataset_fingerprint(spec.test), data.metric,
                       source=data)


def fit_split(data: DatasetInfo, share: float, store: Store) -> DatasetInfo:
    """The dataset with its training rows minus the development rows, and its test split as it is (search.refit
    false: what every fine-tune of the search trains on)."""

    if data.source is not None:  # already split
        return data
    folder, train, _ = _split_folder(data, share, store)
    spec = data.spec.model_copy(update={"train": str(folder / "train.jsonl")})
    return DatasetInfo(spec, train, data.test, dataset_fingerprint(spec.train), data.test_fp, data.metric, source=data)


def split_record(data: DatasetInfo, share: float, train: list[Example], dev: list[Example]) -> dict[str, Any]:
    """What the run records of a split: the share, the rule, the counts and the development rows' ids."""
    return {"dataset": data.spec.name, "train_file": data.spec.train, "train_fingerprint": data.train_fp,
            "dev_share": share, "rule": "sha256 of the row's content (conversation, answer, expected) < dev_share",
            "version": SPLIT_VERSION, "train_rows": len(train), "dev_rows": len(dev), "dev_ids": [r.id for r in dev]}
