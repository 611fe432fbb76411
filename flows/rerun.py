"""`search-rerun`: run a saved search again with the candidates added since, computing only what is new.

The search config stays as it was; its candidate list grows in a YAML file that users append to (and,
where a network exists, from a Hugging Face hub query). The store's content keys do the rest: a candidate
seen before finds its fine-tunes, outputs and judgments in the store, so only a new candidate is merged,
fine-tuned, generated and judged.

    python -m flows.rerun --config FILE [--candidates FILE] [--store DIR]

A candidates file is a YAML list; each entry is `{name: ..., path: ...}` or just a path / HF id:

    - {name: mistral, path: mistralai/Mistral-7B-v0.1}
    - Qwen/Qwen2.5-7B            # named qwen2-5-7b
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from pydantic import Field, ValidationError

from flows.failures import one_line_failures
from tasks.config.base import Frozen
from tasks.config.schema import Candidate, SearchConfig, load_config
from tasks.core.errors import UserError
from tasks.store.store import resolve_store


class HubQuery(Frozen):
    """Candidates from a Hugging Face hub search (needs a network; skipped with a warning offline)."""

    author: str | None = Field(default=None, description="Only models of this user or organisation.")
    search: str | None = Field(default=None, description="Substring of the model id, e.g. 7B.")
    tags: list[str] = Field(default_factory=list, description="Hub tags every model must have, e.g. text-generation.")
    sort: str = Field(default="downloads", description="Hub sort key: downloads, likes, created_at, last_modified.")
    limit: int = Field(default=3, ge=1, le=50, description="How many models the query adds at most.")


def candidate_name(path: str) -> str:
    """A short name for a bare path or hub id: its last part, lowercased, dots and odd characters as dashes."""
    return re.sub(r"[^a-z0-9_-]+", "-", path.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-") or "model"


def read_candidates(path: str | Path) -> list[Candidate]:
    """The candidates in a YAML list file; UserError naming the file and entry at fault."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: candidates file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if isinstance(raw, dict) and "candidates" in raw:
        raw = raw["candidates"] or []  # a whole config, or {candidates: [...]}: its list
    if not isinstance(raw, list):
        raise UserError(f"{path}: expected a YAML list of candidates ({{name: ..., path: ...}} or a path)")
    out = []
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            entry = {"name": candidate_name(entry), "path": entry}
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            p = entry["path"]
            if not p.startswith("zoo:") and not Path(p).is_absolute() and (path.parent / p).exists():
                entry = {**entry, "path": str((path.parent / p).resolve())}  # relative to the file, like a config
        try:
            out.append(Candidate.model_validate(entry))
        except ValidationError as e:
            err = e.errors()[0]
            raise UserError(f"{path}: entry {i}: {'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}") from None
    return out


def hub_candidates(query: HubQuery) -> list[Candidate]:
    """Candidates found by a hub query ([] with a warning when the hub cannot be reached)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        get_run_logger().warning("hub query skipped: HF_HUB_OFFLINE is set")
        return []
    from huggingface_hub import HfApi

    try:
        models = HfApi().list_models(author=query.author, search=query.search, filter=query.tags or None,
                                     sort=query.sort, limit=query.limit)
        return [Candidate(name=candidate_name(m.id), path=m.id) for m in models]
    except Exception as e:  # noqa: BLE001 - any network failure: the saved candidates still run
        get_run_logger().warning(f"hub query skipped: the hub cannot be reached ({type(e).__name__})")
        return []


def with_candidates(cfg: SearchConfig, extra: list[Candidate], source: str) -> SearchConfig:
    """The config with the extra candidates appended (those whose name is already there are kept as they were)."""
    known = {c.name for c in cfg.candidates} | {m.name for m in cfg.merges}
    new = []
    for c in extra:
        if c.name not in known:
            known.add(c.name)
            new.append(c)
    try:
        return SearchConfig.model_validate(cfg.model_dump() | {"candidates": [*cfg.candidates, *new]})
    except ValidationError as e:
        raise UserError(f"{source}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def rerun_name() -> str:
    """search-rerun-<name of the config file>."""
    from prefect.runtime import flow_run

    return f"search-rerun-{Path(str(flow_run.parameters.get('config', 'search'))).stem}"


@flow(name="search-rerun", flow_run_name=rerun_name, log_prints=False)
@one_line_failures  # a user's mistake: Failed with its one line, no traceback
def search_rerun(
    config: str, candidates: str | None = None, store: str | None = None, hub: HubQuery | None = None
) -> dict[str, Any]:
    """Re-read a saved search's config and candidate list, and run the search: only new candidates are computed."""
    from flows.search import search

    cfg = load_config(config)
    extra = read_candidates(candidates) if candidates else []
    if hub is not None:
        extra += hub_candidates(hub)
    cfg = with_candidates(cfg, extra, candidates or config)
    get_run_logger().info(f"re-running '{cfg.name}' with {len(cfg.candidates)} candidates: "
                          f"{', '.join(c.name for c in cfg.candidates)}")
    return search(cfg, store)


def main(argv: list[str] | None = None) -> int:
    """Command line: the rerun without a schedule; prints the run id and the report's path."""
    parser = argparse.ArgumentParser(prog="python -m flows.rerun", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the saved search's config YAML")
    parser.add_argument("--candidates", default=None, help="YAML list of candidates that users append to")
    parser.add_argument("--store", default=None, help="store folder or URL (default: $BASESEARCH_STORE or ./store)")
    args = parser.parse_args(argv)
    try:  # check the files before Prefect starts, for a one-line error
        with_candidates(load_config(args.config), read_candidates(args.candidates) if args.candidates else [],
                        args.candidates or args.config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = search_rerun(args.config, args.candidates, resolve_store(args.store))
    print(f"run: {result['run_id']}\nreport: {result['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
