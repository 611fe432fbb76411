"""The search flow: candidates -> merges -> LoRA fine-tunes -> outputs -> judgments -> ratings -> validation -> report.

    python -m flows.search                                # the bundled demo (configs/demo.yaml), on CPU
    python -m flows.search --config FILE [--store DIR]    # your own search

The command line itself is flows/cli.py: run as `python -m flows.search`, this module hands over to it before
its own heavy imports, so that --help and a config error answer in a fraction of a second.
"""

from __future__ import annotations

if __name__ == "__main__":
    from flows.cli import run_command

    run_command()

import base64
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import steps
from flows.evolve import evolve
from flows.failures import one_line_failures
from flows.steps import Run, StageLog
from tasks.candidates.stage import candidate_task, zoo_task
from tasks.compute.workers import local_workers
from tasks.config.base import TEACHER, ZOO_PREFIX
from tasks.config.schema import SearchConfig, load_config
from tasks.core.errors import UserError
from tasks.core.tables import text_table
from tasks.judge.judgments import load_judgments
from tasks.judge.repeat import repeat_judges
from tasks.plan.execute import merge_all, merge_waves
from tasks.plan.jobs import BudgetStop, Guard, check_budget, plan_lines, search_plan
from tasks.plan.pool import end_sessions
from tasks.plan.prepare import Prepared, fit_datasets, held_out, prepared
from tasks.rating.judged import with_lengths
from tasks.rating.rate import rate
from tasks.rating.win_rates import freeze_winner, runner_up, summarize
from tasks.report.evidence import evidence, formats_table, scores_table, training_metrics
from tasks.report.judge_card import card_section, ratings_by_judge
from tasks.report.learned import learned_lines, lift_section, lifts, nothing_learned, records
from tasks.report.report import html_report, markdown_report, plot_ratings, ranking_rows
from tasks.report.search import search_lines
from tasks.report.verdict import recommendation, verdict_lines, verdicts
from tasks.store.cache import configure as configure_cache
from tasks.store.keys import content_key
from tasks.store.results import LATEST, model_path, run_path
from tasks.store.store import Store, resolve_store


def validate_winner(run: Run, prep: Prepared, ratings: pd.DataFrame, paths: dict[str, str]) -> dict[str, Any] | None:
    """Freeze the winner, then fine-tune it and the baselines on the held-out dataset and judge them."""
    cfg, st = run.cfg, run.store
    if cfg.validation is None:
        return None
    frozen = freeze_winner(st, run.rel, ratings)
    winner = frozen["winner"]
    get_run_logger().info(f"validation: winner {winner} frozen; now reading the held-out dataset")
    data = held_out(cfg)  # read only now: the winner is already on disk
    # The winner must beat the baselines; when it is a baseline itself, it must beat the runner-up instead.
    opponents = [b for b in cfg.validation.baselines if b != winner] or [runner_up(ratings, winner)]
    held_prep = Prepared(prep.models, {data.spec.name: data})
    # Validation reports the winner against its opponents and the teacher only: no reference answers the held-out
    # rows (each would be paid for and never read).
    held = run.with_config(cfg.model_copy(update={"references": []}))
    outputs = steps.train_and_answer(held, [winner, *opponents], data, paths, held_prep)
    # only the pairs validation reports: the winner against each opponent and the teacher
    judgments = load_judgments(st, steps.judge_all(run, {data.spec.name: data}, {data.spec.name: outputs},
                                                   pairs_with=winner))
    st.write_parquet(f"{run.rel}/validation_judgments.parquet", judgments)
    # an opponent ranked above the winner in the pooled rating: the search claimed no advantage over it to validate
    rank = ratings[ratings["scope"] == "overall"].set_index("contender")["rank"]
    behind = frozenset(o for o in [*opponents, TEACHER] if o in rank and winner in rank and rank[o] < rank[winner])
    return frozen | {"dataset": data.spec.name} | summarize(judgments, winner, [*opponents, TEACHER],
                                                             cfg.rating.confidence, behind)


def materialize_models(run: Run, prep: Prepared) -> dict[str, str]:
    """Every candidate's and configured merge's local folder: zoo models built, merges made (or found in the store)."""
    config, st, paths = run.cfg, run.store, {}
    with run.log.stage("candidates") as row:
        sources = config.candidates + config.ingredients  # an ingredient is merged, so it is needed here too
        zoo = {c.name: c.path.removeprefix(ZOO_PREFIX) for c in sources if c.path.startswith(ZOO_PREFIX)}
        # Only a zoo model not yet in the store is built (all at once: siblings side by side); any other
        # candidate is read where it is.
        built = {n for n in zoo if not st.exists(model_path(prep.models[n].fingerprint))}
        if built:
            zoo_task(sorted(set(zoo.values())), run.root, local_workers(config.compute))
        for c in sources:
            paths[c.name] = candidate_task(c, run.root, sources)
            steps.count(row, c.name not in built)
    with run.log.stage("merges") as row:
        for wave in merge_waves(config.merges):  # a merge of merges after the merges it takes
            made = merge_all([(m, prep.models[m.name].fingerprint) for m in wave], paths, config.compute, run.root)
            for m, (paths[m.name], reused) in zip(wave, made):
                steps.count(row, reused)
    return paths


def rate_run(run: Run, batches: list, frames: dict[str, dict[str, pd.DataFrame]]) -> tuple[pd.DataFrame, ...]:
    """(judgments, ratings, ratings per judge or None) of the run, written to its folder."""
    config, st = run.cfg, run.store
    with run.log.stage("rate") as row:
        kinds = config.model_kinds()
        judgments = with_lengths(load_judgments(st, batches), frames)  # len_a, len_b: for rating.length_control
        # kind_a/kind_b travel with the run's judgments, so `python -m flows.rank` re-rates them with their kinds.
        judgments = judgments.assign(kind_a=judgments["contender_a"].map(kinds), kind_b=judgments["contender_b"].map(kinds))
        ratings = rate(judgments, kinds, config.rating)
        # Several judges: the ratings above are their pooled fit; each judge's own fit goes beside them.
        by_judge = ratings_by_judge(judgments, kinds, config.rating) if len(config.judge_list()) > 1 else None
        st.write_parquet(f"{run.rel}/judgments.parquet", judgments)
        st.write_parquet(f"{run.rel}/ratings.parquet", ratings)
        if by_judge is not None and len(by_judge):
            st.write_parquet(f"{run.rel}/ratings_by_judge.parquet", by_judge)
        row["computed"] = len(judgments)
    return judgments, ratings, by_judge


def repeat_stage(run: Run, prep: Prepared, all_outputs: dict[str, dict[str, tuple[str, str]]],
                 batches: list) -> pd.DataFrame | None:
    """Each LLM judge's repeat sample of the test rating asked a second time (tasks/judge/repeat.py), its dollars
    counted, written beside the run's judgments: the judge card's repeatability, never rated. None: no LLM judge."""
    if not run.cfg.llm_judges():
        return None
    with run.log.stage("judge:repeat") as row:
        llm = load_judgments(run.store, [b for b in batches if isinstance(b, pd.DataFrame)])  # the LLM judges' tables
        rep = repeat_judges(llm, {ds: d.test for ds, d in prep.datasets.items()}, all_outputs, run.cfg, run.root,
                            spent_usd=run.guard.usd)
        run.guard.usd += rep.new_cost_usd  # budget.max_usd covers the repeats as any judgment
        row.update(computed=rep.new, reused=rep.reused, requests=rep.requests, cost_usd=round(rep.new_cost_usd, 4))
    run.store.write_parquet(f"{run.rel}/judge_repeats.parquet", rep.table)
    return rep.table


@dataclass(frozen=True)
class Outcome:
    """What the stages leave for the report: every outputs table, the judgments, the ratings, the validation."""

    frames: dict[str, dict[str, pd.DataFrame]]  # dataset -> contender -> its outputs on the test rows
    floors: dict[str, dict[str, pd.DataFrame]]  # dataset -> each model untuned and the trivial answer -> outputs
    judgments: pd.DataFrame
    ratings: pd.DataFrame
    by_judge: pd.DataFrame | None  # several judges: each one's own ratings
    validation: dict[str, Any] | None
    repeats: pd.DataFrame | None = None  # LLM judges: the repeated judgments, for the judge card (never rated)


def execute(run: Run, prep: Prepared) -> dict[str, Any]:
    """The search's stages in order, each computing what the store lacks; the guard stops before a cap is crossed."""
    paths = materialize_models(run, prep)
    # search.rounds: merges proposed and scored on the development splits; the kept ones join the models below
    config, prep = evolve(run, prep, paths)
    run = run.with_config(config)
    models = [n for n, info in prep.models.items() if info.finetuned]
    all_outputs, floors = steps.train_and_answer_together(run, models, prep.datasets, paths, prep)
    batches = steps.judge_all(run, prep.datasets, all_outputs)
    repeats = repeat_stage(run, prep, all_outputs, batches)
    # every outputs table read once, for the judged outputs' lengths, the verdict, the scores, the formats, the examples
    frames = {ds: {c: run.store.read_parquet(rel) for c, (rel, _) in outs.items()} for ds, outs in all_outputs.items()}
    floor_frames = {ds: {c: run.store.read_parquet(rel) for c, (rel, _) in f.items()} for ds, f in floors.items()}
    judgments, ratings, by_judge = rate_run(run, batches, frames)
    validation = validate_winner(run, prep, ratings, paths)
    if validation:
        run.store.write_json(f"{run.rel}/validation.json", validation)
    return report_run(run, prep, Outcome(frames, floor_frames, judgments, ratings, by_judge, validation, repeats))


def report_run(run: Run, prep: Prepared, out: Outcome) -> dict[str, Any]:
    """The report (md, html, png) in the run's folder and as Prefect artifacts; the run becomes the store's LATEST."""
    config, st, run_id, confidence = run.cfg, run.store, run.rel.rsplit("/", 1)[-1], run.cfg.rating.confidence
    with run.log.stage("report"):
        trained = training_metrics(config, prep, st)
        with_floors = {ds: out.frames[ds] | out.floors.get(ds, {}) for ds in out.frames}
        found = lifts(prep, with_floors, confidence,
                      config.rating.seed, {k: (m["loss_first"], m["loss_last"]) for k, m in trained.items()})
        st.write_json(f"{run.rel}/learned.json", records(found))  # flows.export refuses a model that learned nothing
        first, *validated = recommendation(out.ratings, out.validation, confidence)
        if nothing_learned(found):
            first = ("no recommendation: no fine-tune beat both its untuned base and the trivial answer on any "
                     "dataset, so the ranking orders models that learned nothing (pooled leader: "
                     f"{first.removeprefix('recommended base model: ').split(' ')[0]})")
        verdict = [first, *learned_lines(found), *validated,
                   *verdict_lines(verdicts(config, out.ratings, out.judgments, out.frames,
                                           {ds: sum(len(m["content"]) for ex in d.test for m in ex.prompt)
                                            for ds, d in prep.datasets.items()}), confidence,
                                 config.verdict.margin)]
        png = plot_ratings(out.ratings)
        card, warnings = card_section(out.judgments, {ds: d.test for ds, d in prep.datasets.items()},
                                      {ds: d.metric for ds, d in prep.datasets.items()}, out.frames,
                                      confidence, config.rating.seed, out.ratings, out.by_judge,
                                      repeats=out.repeats)
        for line in warnings:
            get_run_logger().warning(line)
        md = markdown_report(config, run_id, out.ratings, scores_table(prep, with_floors), out.validation, run.log.rows,
                             out.judgments, formats_table(prep, out.frames, config.generate.max_new_tokens), verdict,
                             [*search_lines(config, st, run.rel, out.ratings, out.judgments, out.validation),
                              *lift_section(found, confidence), *evidence(config, prep, out.ratings, out.frames,
                                                                          trained)], card)
        st.write_bytes(f"{run.rel}/ratings.png", png)
        st.write_text(f"{run.rel}/report.md", md)
        report = st.write_text(f"{run.rel}/report.html", html_report(md, png))
        st.write_json(f"{run.rel}/stages.json", run.log.rows)
        st.write_text(LATEST, run_id + "\n")
        table = ranking_rows(out.ratings)
        publish(run_id, table, md, png)
    get_run_logger().info(f"report: {report}")
    return {"run_id": run_id, "report": report, "ranking": table.to_dict("records"), "stages": run.log.rows,
            "verdict": verdict, "held_out": config.validation.dataset.name if config.validation else None}


def publish(run_id: str, table: pd.DataFrame, md: str, png: bytes) -> None:
    """The ranking and the report as the flow run's artifacts in the Prefect UI."""
    # In words: the UI's table renders a cell holding only `>` or `~` as blank.
    words = table.replace({"vs next": {">": "separated", "~": "not separated"}})
    create_table_artifact(words.astype(str).to_dict("records"), key="ranking", description=f"Ranking, run {run_id}")
    # The UI shows the artifact alone: the plot travels inside it (a relative link would be broken there).
    inline = md.replace("](ratings.png)", f"](data:image/png;base64,{base64.b64encode(png).decode()})")
    create_markdown_artifact(inline, key="report", description=f"Report, run {run_id}")


def search_run_name() -> str:
    """search-<config name>, whether the config came as a typed form or as a path to a YAML file."""
    from prefect.runtime import flow_run

    cfg = flow_run.parameters.get("config")
    if isinstance(cfg, (str, Path)):
        try:
            cfg = load_config(cfg)
        except UserError:
            return f"search-{Path(cfg).stem}"  # the run itself reports the error
    name = cfg.get("name") if isinstance(cfg, dict) else getattr(cfg, "name", None)
    return f"search-{name or 'unnamed'}"


@flow(name="search", flow_run_name=search_run_name, log_prints=False)
@one_line_failures  # a user's mistake: the run ends Failed with the one line, no traceback (flows/failures.py)
def search(config: SearchConfig | str, store: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run a whole search and return the run id, the report's path and the pooled ranking.

    `config` is the search config itself (a typed form in the Prefect UI) or the path of its YAML file;
    `store` defaults to $BASESEARCH_STORE, else ./store. `dry_run` returns the plan (what would be computed, what
    is in the store, what the rest costs) and does nothing else.
    """
    if isinstance(config, str):
        config = load_config(config)  # relative paths inside it are relative to the file, as on the command line
    store = resolve_store(store)  # none given (e.g. from the UI): $BASESEARCH_STORE of the worker, else ./store
    logger = get_run_logger()
    log = StageLog()
    with log.stage("check") as row:
        prep = prepared(config)  # everything is checked before any model is loaded (by the command line, if it ran)
        row["computed"] = len(prep.models) + len(prep.datasets)
    for warning in prep.warnings:
        logger.warning(warning)
    configure_cache(config.compute.cache_dir, config.compute.cache_gb)  # a remote store's local copies
    st = Store(store)
    prep = fit_datasets(config, prep, st)  # search.rounds with search.refit off: every fine-tune trains on train - dev
    plan = search_plan(config, prep, st)
    create_table_artifact(plan.table().astype(str).to_dict("records"), key="plan",
                          description="What the search computes, what the store holds, what the rest costs")
    logger.info("plan: " + "; ".join(plan_lines(plan)[2:]))
    if dry_run:
        return {"plan": plan.table().to_dict("records"), "lines": plan_lines(plan)}
    check_budget(plan, config)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    # pid and nanoseconds in the suffix: two runs started in the same second never share a run folder
    run_id = f"{config.name}-{stamp}-{content_key(config.model_dump(), os.getpid(), time.time_ns())[:6]}"
    run_rel = run_path(run_id)
    st.write_text(f"{run_rel}/config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    logger.info(f"run {run_id}: {len(prep.models)} models x {len(prep.datasets)} datasets, store {st.root}")

    guard = Guard(config, plan.rates, planned=[j for j in plan.jobs if j.gpu_s and not j.done and not j.optional])
    try:
        return execute(Run(config, st, run_rel, log, guard), prep)
    except BudgetStop as stop:  # recorded beside the run; what was computed is in the store for the next run
        st.write_json(f"{run_rel}/stopped.json", {"reason": str(stop), "gpu_hours_spent": round(guard.gpu_s / 3600, 6),
                                                  "usd_spent": round(guard.usd, 6), "stages": log.rows})
        logger.error(f"run {run_id} stopped: {stop}")
        raise
    finally:
        if config.compute.mode == "pool" and config.compute.pool_stay_s > 0:
            end_sessions()  # the stage runs that stayed for this search end now, not stay_s later


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What the command line prints at the end: the recommendation and verdicts, the whole pooled ranking from rank
    1 (its `kind` column marks the references: the teacher and API models), the counts, and the report's path last."""
    reused = sum(r["reused"] for r in result["stages"])
    computed = sum(r["computed"] for r in result["stages"] if r["stage"] not in ("check", "rate"))
    ranking = pd.DataFrame(result["ranking"])
    verdict = result.get("verdict") or [""]
    lines = [verdict[0], *[f"  {v}" for v in verdict[1:]], "",
             "ranking, all datasets pooled (kind: candidate or merge fine-tuned, reference = the teacher or an API "
             "model; vs next: `>` separated from the next at the configured confidence, `~` not):",
             text_table(ranking) if len(ranking) else "(none)"]
    by_stage = ", ".join(f"{stage} {c}/{r}" for stage, (c, r) in stage_counts(result["stages"],
                                                                            result.get("held_out")).items())
    return lines + ["", f"{computed} results computed, {reused} reused from the store.",
                    f"by the plan's stages (computed/reused): {by_stage}", f"report: {result['report']}"]


def stage_counts(stages: list[dict[str, Any]], held_out: str | None) -> dict[str, tuple[int, int]]:
    """The stage log in the plan's words: (computed, reused) per plan stage. A development split's work is the
    search loop's, the held-out dataset's is validation's; an LLM judge's stage counts judgments, not files."""
    out: dict[str, tuple[int, int]] = {}
    for row in stages:
        name, _, scope = row["stage"].partition(":")
        if name in ("check", "rate", "report"):
            continue
        stage = ("search" if name == "search" or scope.endswith(".dev") else
                 "validation" if held_out and scope == held_out else name)
        c, r = out.get(stage, (0, 0))
        out[stage] = (c + row["computed"], r + row["reused"])
    return out
