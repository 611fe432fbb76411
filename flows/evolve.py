"""The search's own merges: rounds of propose -> merge -> fine-tune and answer on dev -> judge -> re-rate.

Composed from the search's steps (flows/steps.py), as the test rating is. Everything
runs on each dataset's development split (tasks/data/devsplit.py): the configured models and every proposal are fine-tuned
on the training rows minus the development rows and answer the development rows; the test split is not read here.
Only the best `search.keep` proposals leave the loop: flows/search.py rates them on the test split with every other
contender, and validation freezes its winner from that rating as before. With `search.refit` off (the default) every
fine-tune of the search trains on the same rows (training minus development, tasks/plan/prepare.py fit_datasets), so the
loop's first rating and the kept proposals reuse the fine-tunes the store already holds: they only answer other rows.
With it on, the final set is fine-tuned again on all training rows.

Every result goes through the store's content keys, and the proposals are a function of the ratings, which are a
function of stored judgments: a search killed mid-round proposes the same merges when started again and recomputes
nothing it had finished.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import yaml
from prefect import get_run_logger

from flows import steps
from flows.steps import Run
from tasks.config.base import TEACHER
from tasks.config.schema import SearchConfig
from tasks.core.errors import UserError
from tasks.data.devsplit import dev_split
from tasks.judge.judgments import load_judgments
from tasks.models.fingerprint import check_mergeable
from tasks.plan.execute import merge_all
from tasks.plan.prepare import Prepared, merge_info
from tasks.plan.propose import Point, config_point, improved, interval_of, kept, propose, ranked, task_base
from tasks.rating.rate import rate

JUDGMENT_ID = ["dataset", "example_id", "contender_a", "contender_b", "order"]


class Loop:
    """One search's state: the development splits, the models so far, their outputs, judgments and ratings."""

    def __init__(self, run: Run, prep: Prepared, paths: dict[str, str]) -> None:
        """Set the loop up and write the development splits (reused from the store when there)."""
        config = run.cfg
        self.run, self.cfg, self.prep, self.paths, self.st = run, config, prep, paths, run.store
        self.rel, self.log, self.guard = f"{run.rel}/search", run.log, run.guard
        self.devs = {d.spec.name: d for d in (dev_split(data, config.search.dev_share, self.st)
                                              for data in prep.datasets.values())}
        # no reference answers the development rows (each would be paid for): a reference anchor becomes the teacher
        anchor = config.rating.anchor
        if anchor is not None and config.model_kinds().get(anchor) == "reference":
            anchor = TEACHER
        self.dev_cfg = config.model_copy(update={"references": [],
                                                 "rating": config.rating.model_copy(update={"anchor": anchor})})
        self.dev_run = run.with_config(self.dev_cfg)
        self.models = dict(prep.models)
        self.kinds = config.model_kinds()
        self.outputs: dict[str, dict[str, tuple[str, str]]] = {ds: {} for ds in self.devs}
        self.batches: list[Any] = []
        self.ratings = pd.DataFrame()

    def answer(self, names: list[str]) -> None:
        """Fine-tune `names` on every development split's training rows and answer its development rows."""
        todo = [n for n in names if any(n not in outs for outs in self.outputs.values())]
        if not todo:
            return
        prep = Prepared(self.models, self.devs)
        outputs = steps.train_and_answer_together(self.dev_run, todo, self.devs, self.paths, prep, floors=False)[0]
        for ds, outs in outputs.items():
            self.outputs[ds] |= outs

    def judge_and_rate(self, names: list[str]) -> pd.DataFrame:
        """Judge `names` (and the teacher) pairwise on every development split, then rate every judgment so far."""
        outs = {ds: {n: o[n] for n in [*names, TEACHER]} for ds, o in self.outputs.items()}
        self.batches += steps.judge_all(self.dev_run, self.devs, outs)
        with self.log.stage("search:rate") as row:
            judgments = load_judgments(self.st, self.batches).drop_duplicates(JUDGMENT_ID)
            self.ratings = rate(judgments, self.kinds, self.dev_cfg.rating)
            row["judgments"] = len(judgments)  # a rating is not a result of the store: counted neither way
        return self.ratings

    def add(self, points: list[Point]) -> None:
        """Make a round's proposals models of the search: their fingerprints, and their merged folders (merged once,
        in the store; at once in pool mode, since a proposal's parents are models rated before the round)."""
        merges = [point.merge() for point in points]
        taken = [m.name for m in merges if m.name in self.models]
        if taken:
            raise UserError(f"search: the proposal name '{taken[0]}' is taken by a model of the config; rename it")
        for point, merge in zip(points, merges):
            self.models[merge.name] = merge_info(merge, self.models, self.models[point.parents[0]].signature)
            self.kinds[merge.name] = "merge"
        with self.log.stage(f"search:merge r{points[0].round}") as row:
            made = merge_all([(m, self.models[m.name].fingerprint) for m in merges], self.paths, self.cfg.compute,
                             self.run.root)
            for merge, (self.paths[merge.name], reused) in zip(merges, made):
                row["reused" if reused else "computed"] += 1

    def mergeable(self, names: tuple[str, ...]) -> bool:
        """Whether mergekit can merge these models as the rule's recipes ask (same architecture and vocabulary)."""
        try:
            check_mergeable("proposal", [self.models[n] for n in dict.fromkeys(names)])
        except UserError:
            return False
        return True

    def fits(self, k: int) -> bool:
        """Whether a round of `k` proposals, the kept proposals and the plan's GPU jobs still to run (test stages,
        validation, the loop's first answers) fit budget.max_gpu_hours."""
        cap = self.cfg.budget.max_gpu_hours
        if cap is None:
            return True
        g, sig = self.guard, next(iter(self.models.values())).signature
        need = g.planned_s(self.st) + sum(k * (g.finetune_s(d.train, sig) + g.generate_s(d.test, sig))
                                          for d in self.devs.values())
        for data in self.prep.datasets.values():  # the kept proposals: fine-tuned again only with search.refit
            need += self.cfg.search.keep * (g.finetune_s(data.train, sig) * self.cfg.search.refit
                                            + g.generate_s(data.test, sig))
        return (g.gpu_s + need) / 3600 <= cap

    def leaders(self) -> list[str]:
        """The best-rated models on the development splits, best first."""
        return list(ranked(self.ratings)["contender"][: self.cfg.search.leaders])


def _ratings_of(ratings: pd.DataFrame, names: list[str]) -> dict[str, list[float]]:
    """name -> [rating, low, high] on the pooled development rating."""
    r = ratings[ratings["scope"] == "overall"].set_index("contender")
    return {n: interval_of(r.loc[n]) for n in names if n in r.index}


def evolve(run: Run, prep: Prepared, paths: dict[str, str]) -> tuple[SearchConfig, Prepared]:
    """Run search.rounds rounds of proposals on the development splits; return the config and models with the kept
    proposals added as merges (unchanged when search.rounds is 0). `paths` gains every proposal's merged folder."""
    config, s = run.cfg, run.cfg.search
    if not s.rounds:
        return config, prep
    logger = get_run_logger()
    loop = Loop(run, prep, paths)
    st = loop.st
    st.write_json(f"{loop.rel}/split.json", [{"dataset": ds, "dev_share": s.dev_share, "train_rows": len(d.train),
                                              "dev_rows": len(d.test), "dev_ids": [e.id for e in d.test],
                                              "train_file": d.spec.train, "dev_file": d.spec.test}
                                             for ds, d in loop.devs.items()])
    tuned = [n for n, i in prep.models.items() if i.finetuned]
    loop.answer(tuned)
    loop.judge_and_rate(tuned)
    st.write_parquet(f"{loop.rel}/ratings-round-0.parquet", loop.ratings)
    points = [p for p in (config_point(m) for m in config.merges) if p is not None]
    base = task_base(s, config.merges)
    dtype = next((m.recipe["dtype"] for m in config.merges if m.recipe.get("dtype")), None)
    rounds: list[dict[str, Any]] = []
    proposed: list[str] = []
    stop, idle = f"ran all {s.rounds} rounds", 0  # idle: rounds in a row with no proposal above the leader's interval
    for r in range(1, s.rounds + 1):
        if not loop.fits(s.proposals):
            stop = f"budget.max_gpu_hours: round {r} would not leave room for the final fine-tunes; stopped before it"
            break
        leaders = loop.leaders()
        new = propose(loop.ratings, points, s, base, loop.mergeable, r, dtype)
        if not new:
            stop = f"round {r}: the rule has nothing new to propose (every point tried, or no mergeable leaders)"
            break
        # written before anything is computed: a killed run leaves what it was about to try
        st.write_text(f"{loop.rel}/round-{r}.yaml", yaml.safe_dump([p.record() for p in new], sort_keys=False))
        logger.info(f"search round {r}: proposing {', '.join(p.name for p in new)}")
        loop.add(new)
        names = [p.name for p in new]
        loop.answer(names)
        loop.judge_and_rate([*leaders, *names])
        st.write_parquet(f"{loop.rel}/ratings-round-{r}.parquet", loop.ratings)
        points += new
        proposed += names
        beat, line = improved(loop.ratings, names)
        rounds.append({"round": r, "leaders": _ratings_of(loop.ratings, leaders), "check": line,
                       "proposals": [p.record() | {"dev": _ratings_of(loop.ratings, [p.name]).get(p.name)}
                                     for p in new]})
        logger.info(f"search round {r}: {line}")
        idle = 0 if beat else idle + 1
        if idle >= s.patience:
            stop = (f"round {r}: no proposal beat the leader's interval "
                    f"{f'for {idle} rounds in a row ' if idle > 1 else ''}({line})")
            break
    final = kept(loop.ratings, proposed, s.keep)
    chosen = [p for p in points if p.name in final]
    # with the proposals they were merged from, in the order they were made: what rebuilds them (flows.export)
    needed, by_name = set(final), {p.name: p for p in points if p.round}
    for p in reversed([p for p in points if p.round]):
        if p.name in needed:
            needed |= {n for n in (*p.parents, p.base) if n in by_name}
    st.write_text(f"{loop.rel}/kept.yaml", yaml.safe_dump(
        [{"name": p.name, "recipe": p.recipe(), "kept": p.name in final} for p in points if p.name in needed
         and p.round], sort_keys=False))
    st.write_json(f"{loop.rel}/search.json", {"dev_share": s.dev_share, "rounds": rounds, "stop": stop, "kept": final,
                                              "base_model": base, "dev_ratings": f"{loop.rel}/ratings-round-"
                                              f"{rounds[-1]['round'] if rounds else 0}.parquet"})
    logger.info(f"search: {stop}; kept {', '.join(final) or 'none'}")
    merges = [p.merge() for p in chosen]
    return (config.model_copy(update={"merges": [*config.merges, *merges]}),
            Prepared(prep.models | {m.name: loop.models[m.name] for m in merges}, prep.datasets, prep.warnings))
