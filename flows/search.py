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
import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml
from flows.failures import one_line_failures
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.evolve import evolve
from tasks.config.schema import MODEL_KINDS, TEACHER, ZOO_PREFIX, SearchConfig, load_config
from tasks.core.errors import UserError
from tasks.plan.execute import Batch, FinetuneJob, GenerateJob, finetune_all, generate_all, merge_models
from tasks.store.results import adapter_key
from tasks.generate.outputs import finish_reasons, teacher_outputs
from tasks.store.results import outputs_key, teacher_key
from tasks.plan.jobs import BudgetStop, Guard, check_budget, plan_lines, search_plan
from tasks.judge.judgments import judge_task, load_judgments, metric_scores, run_openai_judge
from tasks.report.judge_card import card_section, ratings_by_judge
from tasks.generate.references import reference_outputs
from tasks.store.results import reference_key
from tasks.candidates.stage import candidate_task, zoo_task
from tasks.plan.prepare import fit_datasets
from tasks.plan.prepare import Prepared, held_out, prepared
from tasks.data.load import DatasetInfo
from tasks.rating.rate import rate
from tasks.rating.judged import with_lengths
from tasks.report.report import html_report, markdown_report, plot_ratings, ranking_rows
from tasks.core.tables import text_table
from tasks.report.search import search_lines
from tasks.report.tables import evidence_lines, examples_table, finetune_table, top_contenders
from tasks.store.store import Store, content_key, resolve_store
from tasks.rating.win_rates import freeze_winner, runner_up, summarize
from tasks.report.verdict import recommendation, verdict_lines, verdicts
from tasks.compute.workers import local_workers
from tasks.store.results import LATEST, adapter_path, model_path, outputs_path, run_path

class StageLog:
    """Wall time and computed/reused counts of every stage, for the log, the report and BENCHMARKS.md."""

    def __init__(self) -> None:
        """Start with no stages."""
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the body fills `computed` and `reused` in the yielded dict."""
        row = {"stage": name, "computed": 0, "reused": 0}
        t0 = time.perf_counter()
        yield row
        row["seconds"] = round(time.perf_counter() - t0, 2)
        self.rows.append(row)
        get_run_logger().info(
            f"stage {name}: {row['computed']} computed, {row['reused']} reused from the store, {row['seconds']} s"
        )


def _count(row: dict[str, Any], reused: bool) -> None:
    """Add one result to a stage's computed or reused count."""
    row["reused" if reused else "computed"] += 1


def _gpu_spent(guard: Guard, log: StageLog) -> None:
    """Count the last stage's GPU time as spent when it computed something: its pool runs' device time, or in local
    mode its wall time (this machine's device was held throughout)."""
    row = log.rows[-1]
    if row["computed"]:
        guard.gpu_s += row.get("device_s", row["seconds"])


def _device_time(row: dict[str, Any], batch: Batch) -> None:
    """Record a pool batch's device time in its stage's row (stages.json), beside the stage's wall time."""
    if batch.device_s is not None:
        row["device_s"] = round(batch.device_s, 2)


def train_and_answer(
    models: list[str], data: DatasetInfo, paths: dict[str, str], prep: Prepared, cfg: SearchConfig, store: str,
    log: StageLog, guard: Guard,
) -> dict[str, tuple[str, str]]:
    """Fine-tune every model on one dataset and answer its test rows: contender -> (outputs path, outputs key)."""
    name, st = data.spec.name, Store(store)
    ft_jobs = [
        FinetuneJob(m, name, paths[m], data.spec.train, cfg.finetune,
                    adapter_key(prep.models[m].fingerprint, data.train_fp, cfg.finetune), prep.models[m].load)
        for m in models
    ]
    guard.gpu(f"fine-tuning on {name}", sum(guard.finetune_s(data.train, prep.models[j.model].signature)
                                            for j in ft_jobs if not st.exists(adapter_path(j.key))))
    with log.stage(f"finetune:{name}") as row:
        batch = finetune_all(ft_jobs, cfg.compute, store)
        adapters = batch.results
        _device_time(row, batch)
        for _, reused in adapters:
            _count(row, reused)
    _gpu_spent(guard, log)
    gen_jobs = [
        GenerateJob(m, name, paths[m], folder, data.spec.test, cfg.generate,
                    outputs_key(job.key, data.test_fp, cfg.generate), job.load)
        for m, job, (folder, _) in zip(models, ft_jobs, adapters)
    ]
    guard.gpu(f"generation on {name}", sum(guard.generate_s(data.test, prep.models[j.model].signature)
                                           for j in gen_jobs if not st.exists(outputs_path(j.key))))
    with log.stage(f"generate:{name}") as row:
        batch = generate_all(gen_jobs, cfg.compute, store, rows_per_job=len(data.test))
        results = batch.results
        _device_time(row, batch)
        outputs = {job.model: (rel, job.key) for job, (rel, _) in zip(gen_jobs, results)}
        for _, reused in results:
            _count(row, reused)
        tkey = teacher_key(data.test_fp)
        trel = outputs_path(tkey)
        if not st.exists(trel):
            st.write_parquet(trel, teacher_outputs(name, data.test, TEACHER))
        outputs[TEACHER] = (trel, tkey)
    _gpu_spent(guard, log)
    if cfg.references:
        with log.stage(f"references:{name}") as row:  # API models answer the same test rows, cached the same way
            row["requests"], row["cost_usd"] = 0, 0.0
            for ref in cfg.references:
                if not st.exists(outputs_path(reference_key(ref, data.test_fp))):
                    guard.dollars(f"{ref.name} answering {name}", guard.reference_usd(ref, data.test))
                outputs[ref.name], reused, requests, spent = reference_outputs(
                    ref, name, data.test, data.test_fp, cfg.prices, store)
                guard.usd += spent
                _count(row, reused)
                row["requests"] += requests
                row["cost_usd"] = round(row["cost_usd"] + spent, 6)
    return outputs


def judge_all(
    datasets: dict[str, DatasetInfo], all_outputs: dict[str, dict[str, tuple[str, str]]], cfg: SearchConfig,
    store: str, log: StageLog, guard: Guard, pairs_with: str | None = None,
) -> list:
    """Judge the outputs with every judge of the search (cfg.judge_list()): the metric judge every pair per dataset (it
    is free), an LLM judge (openai, or combined: the metric where ground truth separates, the LLM the rest) in
    budget.strategy's rounds over all datasets at once. `pairs_with` (validation) judges all of that contender's
    pairs, no other.

    Returns metric batches [(path, A, B)] and the LLM judges' [table]s, for load_judgments.
    """
    batches: list = []
    judges = cfg.judge_list()
    for judge in judges:
        if judge.kind == "metric":
            for ds, data in datasets.items():
                with log.stage(f"judge:{ds}") as row:
                    found, reused = judge_task(ds, data.test, data.metric, data.test_fp, all_outputs[ds], judge,
                                               store, pairs_with)
                    row["computed"], row["reused"] = len(found) - reused, reused
                batches += found
            continue
        name = f"judge:{next(iter(datasets)) if pairs_with else cfg.budget.strategy}"
        with log.stage(name + (f":{judge.model}" if len(judges) > 1 else "")) as row:
            run = run_openai_judge({ds: d.test for ds, d in datasets.items()}, all_outputs, cfg, store,
                                   all_pairs=pairs_with is not None, spent_usd=guard.usd, pairs_with=pairs_with,
                                   judge=judge, metrics={ds: d.metric for ds, d in datasets.items()})
            _judge_row(row, run, guard)
        batches.append(run.judgments)
    return batches


def _judge_row(row: dict[str, Any], run: Any, guard: Guard) -> None:
    """Fill a judge stage's row (stages.json and the report), count its dollars, and log why judging stopped."""
    guard.usd += run.new_cost_usd  # budget.max_usd covers references and judge; reused results cost nothing now
    row["computed"], row["reused"] = run.new, run.reused + run.free
    row.update(run.stats())
    logger = get_run_logger()
    logger.info(f"judge: {run.requests} requests, ${run.new_cost_usd:.4f} spent; stopped: {run.stop_reason}")
    if run.stop_reason.startswith("dollar budget"):
        logger.warning(f"judge: budget.max_usd reached, judging stopped early: {run.stop_reason}")


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


def validate_winner(
    cfg: SearchConfig, prep: Prepared, ratings: pd.DataFrame, paths: dict[str, str], store: str, run_rel: str,
    log: StageLog, guard: Guard,
) -> dict[str, Any] | None:
    """Freeze the winner, then fine-tune it and the baselines on the held-out dataset and judge them."""
    if cfg.validation is None:
        return None
    st = Store(store)
    frozen = freeze_winner(st, run_rel, ratings)
    winner = frozen["winner"]
    get_run_logger().info(f"validation: winner {winner} frozen; now reading the held-out dataset")
    data = held_out(cfg)  # read only now: the winner is already on disk
    # The winner must beat the baselines; when it is a baseline itself, it must beat the runner-up instead.
    opponents = [b for b in cfg.validation.baselines if b != winner] or [runner_up(ratings, winner)]
    held_prep = Prepared(prep.models, {data.spec.name: data})
    # Validation reports the winner against its opponents and the teacher only: no reference answers the held-out
    # rows (each would be paid for and never read).
    no_refs = cfg.model_copy(update={"references": []})
    outputs = train_and_answer([winner, *opponents], data, paths, held_prep, no_refs, store, log, guard)
    # only the pairs validation reports: the winner against each opponent and the teacher
    judgments = load_judgments(st, judge_all({data.spec.name: data}, {data.spec.name: outputs}, cfg, store, log, guard,
                                             pairs_with=winner))
    st.write_parquet(f"{run_rel}/validation_judgments.parquet", judgments)
    return frozen | {"dataset": data.spec.name} | summarize(judgments, winner, [*opponents, TEACHER],
                                                             cfg.rating.confidence)


def execute(config: SearchConfig, prep: Prepared, store: str, run_id: str, log: StageLog, guard: Guard) -> dict[str, Any]:
    """The search's stages in order, each computing what the store lacks; the guard stops before a cap is crossed."""
    st, run_rel = Store(store), run_path(run_id)
    paths: dict[str, str] = {}
    with log.stage("candidates") as row:
        sources = config.candidates + config.ingredients  # an ingredient is merged, so it is needed here too
        zoo = {c.name: c.path.removeprefix(ZOO_PREFIX) for c in sources if c.path.startswith(ZOO_PREFIX)}
        # Only a zoo model not yet in the store is built (all at once: siblings side by side); any other
        # candidate is read where it is.
        built = {n for n in zoo if not st.exists(model_path(prep.models[n].fingerprint))}
        if built:
            zoo_task(sorted(set(zoo.values())), store, local_workers(config.compute))
        for c in sources:
            paths[c.name] = candidate_task(c, store, sources)
            _count(row, c.name not in built)
    with log.stage("merges") as row:
        for m in config.merges:
            paths[m.name], reused = merge_models(m, paths, prep.models[m.name].fingerprint, config.compute, store)
            _count(row, reused)

    # search.rounds: merges proposed and scored on the development splits; the kept ones join the models below
    config, prep = evolve(config, prep, paths, store, run_rel, log, guard, train_and_answer, judge_all)
    models = [n for n, info in prep.models.items() if info.finetuned]
    all_outputs = {ds: train_and_answer(models, data, paths, prep, config, store, log, guard)
                   for ds, data in prep.datasets.items()}
    batches = judge_all(prep.datasets, all_outputs, config, store, log, guard)

    # every outputs table read once, for the judged outputs' lengths, the verdict, the scores, the formats, the examples
    frames = {ds: {c: st.read_parquet(rel) for c, (rel, _) in outs.items()} for ds, outs in all_outputs.items()}
    with log.stage("rate") as row:
        kinds = config.model_kinds()
        judgments = with_lengths(load_judgments(st, batches), frames)  # len_a, len_b: for rating.length_control
        # kind_a/kind_b travel with the run's judgments, so `python -m flows.rank` re-rates them with their kinds.
        judgments = judgments.assign(kind_a=judgments["contender_a"].map(kinds), kind_b=judgments["contender_b"].map(kinds))
        ratings = rate(judgments, kinds, config.rating)
        # Several judges: the ratings above are their pooled fit; each judge's own fit goes beside them.
        by_judge = ratings_by_judge(judgments, kinds, config.rating) if len(config.judge_list()) > 1 else None
        st.write_parquet(f"{run_rel}/judgments.parquet", judgments)
        st.write_parquet(f"{run_rel}/ratings.parquet", ratings)
        if by_judge is not None and len(by_judge):
            st.write_parquet(f"{run_rel}/ratings_by_judge.parquet", by_judge)
        row["computed"] = len(judgments)

    validation = validate_winner(config, prep, ratings, paths, store, run_rel, log, guard)
    if validation:
        st.write_json(f"{run_rel}/validation.json", validation)

    with log.stage("report"):
        verdict = [*recommendation(ratings, validation, config.rating.confidence),
                   *verdict_lines(verdicts(config, ratings, judgments, frames), config.rating.confidence)]
        png = plot_ratings(ratings)
        card, warnings = card_section(judgments, {ds: d.test for ds, d in prep.datasets.items()},
                                      {ds: d.metric for ds, d in prep.datasets.items()}, frames,
                                      config.rating.confidence, config.rating.seed, ratings, by_judge)
        for line in warnings:
            get_run_logger().warning(line)
        md = markdown_report(config, run_id, ratings, scores_table(prep, frames), validation, log.rows,
                             judgments, formats_table(prep, frames, config.generate.max_new_tokens), verdict,
                             [*search_lines(config, st, run_rel, ratings, judgments, validation),
                              *evidence(config, prep, ratings, frames, st)], card)
        st.write_bytes(f"{run_rel}/ratings.png", png)
        st.write_text(f"{run_rel}/report.md", md)
        report = st.write_text(f"{run_rel}/report.html", html_report(md, png))
        st.write_json(f"{run_rel}/stages.json", log.rows)
        st.write_text(LATEST, run_id + "\n")
        table = ranking_rows(ratings)
        # In words: the UI's table renders a cell holding only `>` or `~` as blank.
        words = table.replace({"vs next": {">": "separated", "~": "not separated"}})
        create_table_artifact(words.astype(str).to_dict("records"), key="ranking", description=f"Ranking, run {run_id}")
        # The UI shows the artifact alone: the plot travels inside it (a relative link would be broken there).
        inline = md.replace("](ratings.png)", f"](data:image/png;base64,{base64.b64encode(png).decode()})")
        create_markdown_artifact(inline, key="report", description=f"Report, run {run_id}")
    get_run_logger().info(f"report: {report}")
    return {"run_id": run_id, "report": report, "ranking": table.to_dict("records"), "stages": log.rows,
            "verdict": verdict}


def evidence(cfg: SearchConfig, prep: Prepared, ratings: pd.DataFrame, frames: dict[str, dict[str, pd.DataFrame]],
             st: Store) -> list[str]:
    """The report's training figures of every fine-tune and its example outputs side by side."""
    metrics = {}
    for ds, data in prep.datasets.items():
        for m, info in prep.models.items():
            path = Path(st.local_dir(adapter_path(adapter_key(info.fingerprint, data.train_fp, cfg.finetune))))
            if info.finetuned and (path / "train_metrics.json").is_file():
                metrics[(m, ds)] = json.loads((path / "train_metrics.json").read_text())
    examples = {ds: examples_table(data.test, frames[ds], top_contenders(ratings, ds))
                for ds, data in prep.datasets.items()}
    return evidence_lines(finetune_table(metrics), examples)


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
        return execute(config, prep, store, run_id, log, guard)
    except BudgetStop as stop:  # recorded beside the run; what was computed is in the store for the next run
        st.write_json(f"{run_rel}/stopped.json", {"reason": str(stop), "gpu_hours_spent": round(guard.gpu_s / 3600, 6),
                                                  "usd_spent": round(guard.usd, 6), "stages": log.rows})
        logger.error(f"run {run_id} stopped: {stop}")
        raise


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What the command line prints at the end: the recommendation and verdicts, the fine-tuned models' ranking with
    its legend, the references as reference lines, the counts, and the report's path last."""
    reused = sum(r["reused"] for r in result["stages"])
    computed = sum(r["computed"] for r in result["stages"] if r["stage"] not in ("check", "rate"))
    ranking = pd.DataFrame(result["ranking"])
    tuned = ranking[ranking["kind"].isin(MODEL_KINDS)]
    refs = ranking[~ranking["kind"].isin(MODEL_KINDS)]
    ci = next((c for c in ranking.columns if str(c).endswith(" CI")), "CI")
    verdict = result.get("verdict") or [""]
    lines = [verdict[0], *[f"  {v}" for v in verdict[1:]], "",
             "ranking of the fine-tuned models, pooled (vs next: `>` separated from the next in the full ranking at "
             "the configured confidence, `~` not):", text_table(tuned.drop(columns=["kind"])) if len(tuned) else "(none)"]
    lines += [f"reference: {r['contender']} rated {r['rating']} ({ci} {r[ci]}), win rate {r['win rate']}"
              for _, r in refs.iterrows()]
    return lines + ["", f"{computed} results computed, {reused} reused from the store.", f"report: {result['report']}"]
