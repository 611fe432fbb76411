"""What a finished run of the same config decided: the search loop's proposals, the ones it kept, the frozen winner.

The loop's proposals and the winner depend on ratings not yet made, so a first plan counts them at their most,
without keys. Run again on the same store, the same config makes the same decisions (they are a function of the
stored judgments), so the plan reads them from the newest finished run of that config and keys them like every
other result: a re-run with nothing new plans nothing to compute. A config that changed in any way finds no such
run, and the plan counts the loop at its most again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import yaml

from tasks.config.schema import Merge
from tasks.store.results import RUNS, run_path

if TYPE_CHECKING:
    from tasks.config.schema import SearchConfig
    from tasks.models.fingerprint import ModelInfo
    from tasks.store.store import Store


@dataclass(frozen=True)
class Proposal:
    """One merge the loop proposed: its round, its merge and the parent whose shape it has."""

    round: int
    merge: Merge
    parent: str


@dataclass(frozen=True)
class Decisions:
    """A finished run's decisions: where it is, what the loop proposed and kept, and the winner it froze."""

    run: str  # runs/<run-id>
    proposals: list[Proposal] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    winner: str | None = None
    # LLM judgments that failed in it: stage ('judge', 'validation') -> (dataset, judge label) -> how many; the only
    # judgments a re-run asks again. None when it has no LLM judgments on record.
    failed: dict[str, dict[tuple[str, str], int]] | None = None

    def failed_for(self, stage: str, dataset: str, model: str) -> int | None:
        """Failed judgments of this judge model on this dataset in this stage of the finished run (None: nothing on
        record, so nothing is known)."""
        if self.failed is None or stage not in self.failed:
            return None
        return sum(n for (ds, label), n in self.failed[stage].items()
                   if ds == dataset and label.startswith(f"openai:{model}@"))


def _run_ids(store: Store) -> list[str]:
    """The store's run ids, newest first (a run id carries its UTC start time after the config's name)."""
    if not store.exists(RUNS):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.path(RUNS), detail=False)]
    return sorted((n for n in names if n != "LATEST" and not n.startswith(".")), key=lambda n: n.rsplit("-", 3)[-3:],
                  reverse=True)


def previous_decisions(cfg: SearchConfig, store: Store) -> Decisions | None:
    """The decisions of the newest run of this very config that finished (its report written), else None."""
    config = cfg.model_dump(mode="json")
    for run_id in _run_ids(store):
        rel = run_path(run_id)
        if not (store.exists(f"{rel}/report.html") and store.exists(f"{rel}/config.yaml")):
            continue  # stopped, killed, or still running: it decided nothing for sure
        if _as_today(yaml.safe_load(store.read_text(f"{rel}/config.yaml"))) != config:
            continue
        return _read(store, rel, cfg)
    return None


def _as_today(saved: object) -> object:
    """A run's saved config read through today's schema, so a knob added since (at its default) still compares equal;
    a config today's schema refuses is returned as saved (and so differs)."""
    from pydantic import ValidationError

    from tasks.config.schema import SearchConfig

    try:
        return SearchConfig.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def _read(store: Store, rel: str, cfg: SearchConfig) -> Decisions:
    """A finished run's proposals (round by round), kept proposals and frozen winner."""
    proposals, kept = [], []
    for r in range(1, cfg.search.rounds + 1):
        if not store.exists(f"{rel}/search/round-{r}.yaml"):
            break  # the loop stopped before this round
        for rec in yaml.safe_load(store.read_text(f"{rel}/search/round-{r}.yaml")) or []:
            proposals.append(Proposal(r, Merge(name=rec["name"], recipe=rec["recipe"]), next(iter(rec["parents"]))))
    if store.exists(f"{rel}/search/search.json"):
        kept = list(store.read_json(f"{rel}/search/search.json").get("kept", []))
    winner = store.read_json(f"{rel}/frozen_winner.json")["winner"] if store.exists(f"{rel}/frozen_winner.json") else None
    return Decisions(rel, proposals, kept, winner, _failed(store, rel))


def _failed(store: Store, rel: str) -> dict[str, dict[tuple[str, str], int]] | None:
    """A finished run's failed LLM judgments per stage, dataset and judge label (None without LLM judgments)."""
    out = {}
    for stage, name in (("judge", "judgments"), ("validation", "validation_judgments")):
        if not store.exists(f"{rel}/{name}.parquet"):
            continue
        df = store.read_parquet(f"{rel}/{name}.parquet")
        if "error" not in df.columns:
            continue
        llm = df[df["judge"].astype(str).str.startswith("openai:")]
        if len(llm):
            counts = llm["error"].notna().groupby([llm["dataset"].astype(str), llm["judge"].astype(str)]).sum()
            out[stage] = {key: int(n) for key, n in counts.items()}
    return out or None


def with_proposals(models: dict[str, ModelInfo], decisions: Decisions) -> dict[str, ModelInfo]:
    """The models with every proposal added as the loop added it (tasks/plan/prepare.py merge_info), in order."""
    from tasks.plan.prepare import merge_info

    out = dict(models)
    for p in decisions.proposals:
        if p.parent in out:
            out[p.merge.name] = merge_info(p.merge, out, out[p.parent].signature)
    return out
