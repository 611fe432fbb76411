"""The search's plan: every result a checked config implies, keyed as the stages key them, with what the store
already holds and an estimate of what the rest costs. `python -m flows.search --dry-run` prints it; a real run
prints it first and refuses to start when it alone exceeds a budget cap.

Estimates:
- GPU time (fine-tuning and generation) = characters to process x the model's parameter count / a rate in
  parameter-characters per second, measured by earlier fine-tunes and generations on the same kind of device and
  recorded in the store (rates/<stage>.json); where none was measured, the assumption used is named in the plan.
  Characters, not tokens: the plan reads no tokenizer, and a rate measured in characters carries the tokenizer's
  characters-per-token ratio with it.
- Dollars (references and the LLM judge) = tokens (characters / 4) x `prices`; the judge's count is all pairs (or
  `budget.max_comparisons` when smaller), or with `budget.strategy: adaptive` an estimate of where its planner stops,
  the bound beside it (tasks/plan/judge_cost.py).
Validation's two fine-tunes depend on the winner, so they are planned as jobs whose key is known only then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from itertools import combinations
from typing import TYPE_CHECKING, Any

import pandas as pd

from tasks.compute.speeds import conversation_chars, measured_rate, param_count
from tasks.config.base import TEACHER, TRIVIAL, UNTUNED, ZOO_PREFIX, untuned_name
from tasks.config.schema import LoadOptions
from tasks.config.stages import FinetuneConfig  # at run time: a pool flow validates jobs by type
from tasks.core.errors import UserError
from tasks.generate.job import GenerateJob  # the plan makes them; both engines read them
from tasks.plan.judge_cost import (
    CHARS_PER_TOKEN,
    JudgeCost,
    judge_assumption,
    judge_costs,
    request_usd,
    validation_costs,
)
from tasks.plan.previous import Decisions, previous_decisions, with_proposals
from tasks.store.results import (
    adapter_key,
    adapter_path,
    judgments_path,
    metric_judgment_key,
    model_path,
    outputs_key,
    outputs_path,
    reference_key,
    split_key,
    teacher_key,
    trivial_key,
    untuned_key,
)
from tasks.store.store import Store

if TYPE_CHECKING:
    from tasks.config.schema import SearchConfig
    from tasks.data.load import DatasetInfo
    from tasks.models.fingerprint import ModelInfo
    from tasks.plan.prepare import Prepared

@dataclass(frozen=True)
class Job:
    """One result of the search: its stage, what it is, its store path (None until known), and its cost."""

    stage: str
    name: str
    rel: str | None
    done: bool
    gpu_s: float = 0.0
    usd: float = 0.0
    optional: bool = False  # run only while the budget allows (the search loop's proposals): no cap refuses a plan for it


@dataclass
class Plan:
    """Every job of a search and the assumptions its estimates rest on."""

    jobs: list[Job] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    rates: tuple[float, float] = (0.0, 0.0)  # fine-tuning and generation, in parameter-characters per second
    judging: list[str] = field(default_factory=list)  # each judge's comparisons and dollars, as the plan prints them

    def table(self) -> pd.DataFrame:
        """Per stage: results needed, already in the store, to compute, and the estimated cost of those."""
        rows = []
        for stage in dict.fromkeys(j.stage for j in self.jobs):
            jobs = [j for j in self.jobs if j.stage == stage]
            todo = [j for j in jobs if not j.done]
            rows.append({"stage": stage, "needed": len(jobs), "in store": len(jobs) - len(todo),
                         "to compute": len(todo), "GPU-hours": round(sum(j.gpu_s for j in todo) / 3600, 4),
                         "USD": round(sum(j.usd for j in todo), 4)})
        return pd.DataFrame(rows)

    def gpu_hours(self, required: bool = False) -> float:
        """Estimated GPU-hours of everything still to compute (`required`: without the optional jobs)."""
        return sum(j.gpu_s for j in self.jobs if not j.done and not (required and j.optional)) / 3600

    def usd(self) -> float:
        """Estimated dollars of everything still to compute."""
        return sum(j.usd for j in self.jobs if not j.done)


def _chars(rows: list[Any]) -> float:
    """Mean characters of the rows' whole conversations (prompt and answer)."""
    return sum(conversation_chars(r.prompt, r.answer) for r in rows) / max(len(rows), 1)


def build_plan(cfg: SearchConfig, prep: Prepared, store: Store, device: str = "cpu") -> Plan:
    """Every job the config implies, from the checked config and fingerprints alone; loads no model."""
    from tasks.plan.prepare import fit_datasets

    prep = fit_datasets(cfg, prep, store)  # the datasets as the fine-tunes see them (a no-op when already so)
    plan = Plan()
    train_rate = measured_rate(store, "finetune", device, plan.assumptions)
    gen_rate = measured_rate(store, "generate", device, plan.assumptions)
    plan.rates = (train_rate, gen_rate)
    for c in cfg.candidates + cfg.ingredients:
        zoo = c.path.startswith(ZOO_PREFIX)
        rel = model_path(prep.models[c.name].fingerprint)
        plan.jobs.append(Job("candidates", c.name, rel if zoo else None, store.exists(rel) if zoo else True))
    for m in cfg.merges:
        rel = model_path(prep.models[m.name].fingerprint)
        plan.jobs.append(Job("merges", m.name, rel, store.exists(rel)))
    models = [n for n, info in prep.models.items() if info.finetuned]
    for data in prep.datasets.values():
        _dataset_jobs(plan, cfg, prep, store, data, models, (train_rate, gen_rate))
    decisions = previous_decisions(cfg, store) if cfg.validation or cfg.search.rounds or cfg.llm_judges() else None
    if cfg.validation:
        _validation_jobs(plan, cfg, prep, store, (train_rate, gen_rate), decisions)
    if cfg.search.rounds:
        _search_jobs(plan, cfg, prep, store, models, decisions)
    if cfg.llm_judges():
        contenders = len(models) + 1 + len(cfg.references)  # the fine-tunes, the teacher, the references
        for cost in judge_costs(cfg, {d.spec.name: d.test for d in prep.datasets.values()}, contenders):
            _judge_job(plan, "judge", cost, decisions)
        plan.assumptions.append(judge_assumption(cfg, contenders, sum(len(d.test) for d in prep.datasets.values())))
    if cfg.finetune.search.enabled and any(not j.done for j in plan.jobs
                                           if j.stage in ("finetune", "search") or j.name.startswith("finetune")):
        plan.assumptions.append(f"finetune: each fine-tune includes its settings search (finetune.search), at its most "
                                f"{1 + cfg.finetune.search.cost(cfg.search.dev_share):.1f}x one fixed setting: the "
                                "rates tried on a quarter of the schedule each, the best to the end, on the rows left "
                                "after the development split")
    if any(not j.done for j in plan.jobs if j.stage in ("generate", "floors", "search", "validation")):
        from tasks.generate.vllm_engine import engine_line

        plan.assumptions.append(engine_line(cfg.generate))
    if any(j.kind == "metric" for j in cfg.judge_list()) and (cfg.budget.strategy != "all-pairs" or
                                                              cfg.budget.max_comparisons):
        # Its verdicts cost nothing and take milliseconds, so stopping early would only lose information.
        plan.assumptions.append("judge: the metric judge is free, so it judges every pair of every dataset; "
                                "budget.strategy and budget.max_comparisons apply to the LLM judge")
    return plan


def finetune_seconds(cfg: SearchConfig, data_rows: list[Any], params: int, rate: float) -> float:
    """Seconds of one fine-tune: optimizer steps x rows per step x characters per row x parameters / rate; with
    finetune.search, its settings search's steps too, at their most (tasks/train/settings_search.py)."""
    ft = cfg.finetune
    runs = 1 + (ft.search.cost(cfg.search.dev_share) if ft.search.enabled else 0)
    return runs * ft.steps_for(len(data_rows)) * ft.batch_size * _chars(data_rows) * params / rate


def generate_seconds(test_rows: list[Any], params: int, rate: float) -> float:
    """Seconds of answering a test split: its characters (answers as long as the teacher's) x parameters / rate."""
    return len(test_rows) * _chars(test_rows) * params / rate


def reference_usd(cfg: SearchConfig, ref: Any, rows: list[Any]) -> float:
    """Dollars of a reference answering test rows: their prompts, and answers as long as the teacher's."""
    prompt = sum(sum(len(m["content"]) for m in r.prompt) for r in rows)
    answer = sum(min(ref.max_tokens, len(r.answer) / CHARS_PER_TOKEN) for r in rows)
    return request_usd(cfg.prices.get(ref.model), prompt, answer)


def _judge_job(plan: Plan, stage: str, cost: JudgeCost, decisions: Decisions | None) -> None:
    """An LLM judge's comparisons on one dataset as a job (keyless: planned in rounds), and its plan line; after a
    finished run of this config, only the judgments that failed in it (its rounds replay from the store)."""
    failed = decisions.failed_for(stage, cost.dataset, cost.model) if decisions else None
    if failed is None:
        plan.jobs.append(Job(stage, cost.job_name(), None, False, usd=cost.usd))
        plan.judging.append(cost.line())
        return
    usd = failed * cost.usd / max(cost.count + cost.repeats, 1)
    plan.jobs.append(Job(stage, f"{cost.name}: the {failed} failed judgments of {decisions.run}", None, not failed,
                         usd=usd))
    if failed:
        plan.judging.append(f"{cost.name}: {failed} judgments that failed in {decisions.run} asked again, ${usd:.2f}")


def _dataset_jobs(plan: Plan, cfg: SearchConfig, prep: Prepared, store: Store, data: DatasetInfo, models: list[str],
                  rates: tuple[float, float]) -> None:
    """One dataset's fine-tunes, outputs, teacher and reference outputs, and metric-judged batches."""

    name, keys = data.spec.name, dataset_keys(cfg, prep.models, data, models)
    for m in models:
        n = param_count(prep.models[m].signature)
        adapter, outputs = adapter_path(keys.adapters[m]), outputs_path(keys.outputs[m])
        plan.jobs.append(Job("finetune", f"{m} on {name}", adapter, store.exists(adapter),
                             finetune_seconds(cfg, data.train, n, rates[0])))
        plan.jobs.append(Job("generate", f"{m} on {name}", outputs, store.exists(outputs),
                             generate_seconds(data.test, n, rates[1])))
    teacher = outputs_path(keys.outputs[TEACHER])
    plan.jobs.append(Job("teacher", name, teacher, store.exists(teacher)))
    for floor, key in keys.floors.items():  # each base untuned (a generation), and the trivial answer (free)
        n = param_count(prep.models[floor.removesuffix(UNTUNED)].signature) if floor != TRIVIAL else 0
        plan.jobs.append(Job("floors", f"{floor} on {name}", outputs_path(key), store.exists(outputs_path(key)),
                             generate_seconds(data.test, n, rates[1]) if n else 0.0))
    for ref in cfg.references:
        rel = outputs_path(keys.outputs[ref.name])
        plan.jobs.append(Job("references", f"{ref.name} on {name}", rel, store.exists(rel),
                             usd=reference_usd(cfg, ref, data.test)))
    metric = next((j for j in cfg.judge_list() if j.kind == "metric"), None)
    if metric is None:
        return
    outs = keys.outputs
    for a, b in combinations(sorted(outs, key=outs.get), 2):
        rel = judgments_path(metric_judgment_key(metric, data.metric, data.test_fp, outs[a], outs[b]))
        plan.jobs.append(Job("judge", f"{a} vs {b} on {name}", rel, store.exists(rel)))
    pairs = math.comb(len(outs), 2)
    plan.judging.append(f"metric judge on {name}: {pairs * len(data.test):,} comparisons ({pairs} pairs x "
                        f"{len(data.test):,} rows), free")


def _search_jobs(plan: Plan, cfg: SearchConfig, prep: Prepared, store: Store, models: list[str],
                 decisions: Decisions | None) -> None:
    """The loop's work (search.rounds): every model answering the development rows, then at most rounds x proposals
    fine-tunes and answers, and the kept proposals' test work. The proposals depend on ratings not yet made: they are
    planned at their most (every round run) as the largest model, with no key, unless a finished run of this config
    made them already (`decisions`): then they are keyed as it made them (tasks/plan/previous.py)."""
    from tasks.data.devsplit import dev_split

    s, (train_rate, gen_rate) = cfg.search, plan.rates
    largest = max(param_count(prep.models[m].signature) for m in models)
    for data in prep.datasets.values():
        dev = dev_split(data, s.dev_share, store)
        dev_keys = dataset_keys(cfg, prep.models, dev, models, references=False)
        test_keys = dataset_keys(cfg, prep.models, data, models, references=False)
        for m in models:  # round 0; its fine-tunes are the search's own unless search.refit
            n, adapter = param_count(prep.models[m].signature), adapter_path(dev_keys.adapters[m])
            if dev_keys.adapters[m] != test_keys.adapters[m]:
                plan.jobs.append(Job("search", f"{m} on {dev.spec.name}", adapter, store.exists(adapter),
                                     finetune_seconds(cfg, dev.train, n, train_rate)))
            outputs = outputs_path(dev_keys.outputs[m])
            plan.jobs.append(Job("search", f"{m} answering {dev.spec.name}", outputs, store.exists(outputs),
                                 generate_seconds(dev.test, n, gen_rate)))
        if decisions is not None:
            _decided_jobs(plan, cfg, store, decisions, with_proposals(prep.models, decisions), dev, data)
            continue
        for r in range(1, s.rounds + 1):
            plan.jobs += [Job("search", f"round {r} proposal {i} on {dev.spec.name}", None, False,
                              finetune_seconds(cfg, dev.train, largest, train_rate)
                              + generate_seconds(dev.test, largest, gen_rate), optional=True)
                          for i in range(1, s.proposals + 1)]
        plan.jobs += [Job("search", f"kept proposal {i} on {data.spec.name}", None, False,
                          finetune_seconds(cfg, data.train, largest, train_rate) * s.refit
                          + generate_seconds(data.test, largest, gen_rate), optional=True) for i in range(1, s.keep + 1)]
    if decisions is not None:
        plan.assumptions.append(f"search: the proposals, kept merges and winner of {decisions.run}, a finished run of "
                                "this same config, which a re-run decides again from the same judgments")
        return
    plan.assumptions.append(
        f"search: up to {s.rounds} rounds x {s.proposals} proposals per dataset, each fine-tuned on the training rows "
        f"minus the development rows ({s.dev_share:.0%}) and answering those, counted as if every round ran (the loop "
        "stops early when no proposal beats the leader, and budget.max_gpu_hours stops it before a round that would "
        "not fit, so a cap refuses no run for them)" + ("" if s.refit else "; the first rating and the kept "
                                                           "proposals reuse the search's fine-tunes"))


def _decided_jobs(plan: Plan, cfg: SearchConfig, store: Store, decisions: Decisions, infos: dict[str, ModelInfo],
                  dev: DatasetInfo, data: DatasetInfo) -> None:
    """A finished run's proposals, keyed: each merged, fine-tuned on and answering the development rows; the kept
    ones answering the test rows (and fine-tuned again on them with search.refit). A result listed once."""
    (train_rate, gen_rate), listed = plan.rates, {j.rel for j in plan.jobs}
    names = [p.merge.name for p in decisions.proposals if p.merge.name in infos]
    kept = [n for n in decisions.kept if n in infos]
    work = [Job("search", f"merge {n}", model_path(infos[n].fingerprint), False) for n in names]
    for split, who in ((dev, names), (data, kept)):
        keys = dataset_keys(cfg, infos, split, who, references=False)
        for n in who:
            size = param_count(infos[n].signature)
            work += [Job("search", f"{n} on {split.spec.name}", adapter_path(keys.adapters[n]), False,
                         finetune_seconds(cfg, split.train, size, train_rate)),
                     Job("search", f"{n} answering {split.spec.name}", outputs_path(keys.outputs[n]), False,
                         generate_seconds(split.test, size, gen_rate))]
    for job in work:
        if job.rel not in listed:
            listed.add(job.rel)
            plan.jobs.append(replace(job, done=store.exists(job.rel)))


def _validation_jobs(plan: Plan, cfg: SearchConfig, prep: Prepared, store: Store, rates: tuple[float, float],
                     decisions: Decisions | None) -> None:
    """The winner's and its opponents' fine-tunes and outputs on the held-out dataset.

    The winner is known only after judging: it is planned as the largest model, without a key, unless a finished
    run of this config froze it (`decisions`): then it is keyed as that winner, which a re-run picks again.
    """
    from tasks.data.load import dataset_fingerprint, load_examples

    assert cfg.validation is not None
    spec = cfg.validation.dataset  # only sizes and file hashes here: the rows are read after the winner is frozen
    train, test = load_examples(spec.train), load_examples(spec.test)
    train_fp, test_fp = dataset_fingerprint(spec.train), dataset_fingerprint(spec.test)
    infos = with_proposals(prep.models, decisions) if decisions else prep.models
    tuned = {n: i for n, i in infos.items() if i.finetuned}
    winner = decisions.winner if decisions and decisions.winner in tuned else "winner"
    rels = {}
    for m, info in tuned.items():
        akey = adapter_key(info.fingerprint, train_fp, cfg.finetune, dev_identity(cfg, train_fp))
        rels[m] = (adapter_path(akey), outputs_path(outputs_key(akey, test_fp, cfg.generate)))
    largest = max(param_count(i.signature) for i in tuned.values())
    for who in dict.fromkeys([winner, *cfg.validation.baselines]):
        n = largest if who == "winner" else param_count(tuned[who].signature)
        done = [False, False] if who == "winner" else [store.exists(r) for r in rels[who]]
        plan.jobs.append(Job("validation", f"finetune {who} on {spec.name}", rels.get(who, (None,))[0], done[0],
                             finetune_seconds(cfg, train, n, rates[0])))
        plan.jobs.append(Job("validation", f"generate {who} on {spec.name}", rels.get(who, (None, None))[1], done[1],
                             generate_seconds(test, n, rates[1])))
    teacher = outputs_path(teacher_key(test_fp))
    plan.jobs.append(Job("validation", f"teacher on {spec.name}", teacher, store.exists(teacher)))
    # the metric judge's validation batches are free; an LLM judge's are the winner against each opponent and the
    # teacher: the pairs validation reports (flows/search.py validate_winner)
    for cost in validation_costs(cfg, spec.name, test):
        _judge_job(plan, "validation", cost, decisions)


def planning_device(cfg: SearchConfig) -> str:
    """The kind of device the GPU stages will run on: a work pool's GPUs, else this machine's."""
    if cfg.compute.mode == "pool":
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def search_plan(cfg: SearchConfig, prep: Prepared, store: Store) -> Plan:
    """The plan of a checked search on this store, for the device its GPU stages run on."""
    return build_plan(cfg, prep, store, planning_device(cfg))


def check_budget(plan: Plan, cfg: SearchConfig) -> None:
    """Refuse, in one line, a search whose plan alone exceeds a budget cap (adaptive judging counts at its estimate:
    a run that goes past it stops at budget.max_usd anyway)."""
    b = cfg.budget
    if b.max_usd is not None and plan.usd() > b.max_usd:
        adaptive = b.strategy == "all-pairs" and cfg.llm_judges()  # an estimate far below all pairs
        raise UserError(f"budget.max_usd: the plan's judge and reference requests are estimated at "
                        f"${plan.usd():.2f}, ${plan.usd() - b.max_usd:.2f} over the cap of ${b.max_usd:.2f}; raise it, "
                        "or cut references, contenders or budget.max_comparisons" +
                        (", or judge with budget.strategy: adaptive" if adaptive else ""))
    need = plan.gpu_hours(required=True)  # the search loop's proposals stop themselves before a round over the cap
    if b.max_gpu_hours is not None and need > b.max_gpu_hours:
        raise UserError(f"budget.max_gpu_hours: the plan's fine-tunes and generations are estimated at "
                        f"{need:.3f} GPU-hours, {need - b.max_gpu_hours:.3f} over the cap of "
                        f"{b.max_gpu_hours}; raise it, or cut candidates, datasets or finetune steps")


class BudgetStop(UserError):
    """The next stage would cross a budget cap: the run stops before it, and what it computed stays in the store."""


@dataclass
class Guard:
    """The budget caps checked before every stage that costs: what this run spent so far plus the stage's estimate.

    GPU time spent is measured: the wall time of the fine-tuning and generation stages that computed something, or
    in pool mode their stage runs' time on the workers (queueing excluded: flows/steps.py _gpu_spent);
    the stage's estimate is the plan's, for its results not yet in the store. Dollars spent are the references'
    and the LLM judge's new requests (the judge also stops itself at the cap, mid-stage).
    """

    cfg: SearchConfig
    rates: tuple[float, float]
    gpu_s: float = 0.0
    usd: float = 0.0
    planned: list[Job] = field(default_factory=list)  # the plan's GPU jobs still to run: what the search loop leaves room for

    def planned_s(self, store: Store) -> float:
        """Estimated seconds of the planned GPU jobs whose result the store does not hold yet (keyless ones: all)."""
        return sum(j.gpu_s for j in self.planned if j.rel is None or not store.exists(j.rel))

    def finetune_s(self, rows: list[Any], signature: dict[str, Any]) -> float:
        """Estimated seconds of one fine-tune of a model with this signature on these training rows."""
        return finetune_seconds(self.cfg, rows, param_count(signature), self.rates[0])

    def generate_s(self, rows: list[Any], signature: dict[str, Any]) -> float:
        """Estimated seconds of one model answering these test rows."""
        return generate_seconds(rows, param_count(signature), self.rates[1])

    def reference_usd(self, ref: Any, rows: list[Any]) -> float:
        """Estimated dollars of one reference answering these test rows."""
        return reference_usd(self.cfg, ref, rows)

    def gpu(self, what: str, seconds: float) -> None:
        """Stop before `what` when the GPU time spent plus its estimate would cross budget.max_gpu_hours."""
        cap = self.cfg.budget.max_gpu_hours
        if cap is not None and seconds > 0 and (self.gpu_s + seconds) / 3600 > cap:
            raise BudgetStop(f"budget.max_gpu_hours: stopped before {what}: {self.gpu_s / 3600:.3g} GPU-hours spent "
                             f"and {seconds / 3600:.3g} more estimated would cross the cap of {cap:g}; {_GO_ON}")

    def dollars(self, what: str, usd: float) -> None:
        """Stop before `what` when the dollars spent plus its estimate would cross budget.max_usd."""
        cap = self.cfg.budget.max_usd
        if cap is not None and usd > 0 and self.usd + usd > cap:
            raise BudgetStop(f"budget.max_usd: stopped before {what}: ${self.usd:.4f} spent and ${usd:.4f} more "
                             f"estimated would cross the cap of ${cap:.2f}; {_GO_ON}")


_GO_ON = "what the run computed is in the store: raise the cap and run again to go on from there"


def plan_lines(plan: Plan) -> list[str]:
    """The plan as the command line and the log print it: one table, the totals, each judge's comparisons, the
    assumptions."""
    from tasks.core.tables import text_table

    lines = [text_table(plan.table()), "",
             f"to compute: {sum(not j.done for j in plan.jobs)} of {len(plan.jobs)} results, estimated "
             f"{plan.gpu_hours():.4f} GPU-hours and ${plan.usd():.2f}"]
    judging = [f"judge: {line}" for line in plan.judging]
    if all(j.done for j in plan.jobs):
        lines[-1], judging = f"everything ({len(plan.jobs)} results) is already in the store: nothing to compute", []
    return lines + judging + [f"assumption: {a}" for a in plan.assumptions]


@dataclass(frozen=True)
class FinetuneJob:
    """One LoRA fine-tune: which model, on which training file, stored under which key."""

    model: str
    dataset: str
    model_dir: str
    train_path: str
    cfg: FinetuneConfig
    key: str
    load: LoadOptions = LoadOptions()  # the model's prompt template and remote-code opt-in (tasks/models/chat.py)
    dev_from: str = ""  # finetune.search: the training file whose development rows (share dev_share) choose settings
    dev_share: float = 0.0


def stage_arguments(job: FinetuneJob | GenerateJob) -> dict[str, Any]:
    """A job as its stage task's keyword arguments (every field; tests/test_jobs.py holds fields and parameters equal)."""
    return {f.name: getattr(job, f.name) for f in fields(job)}


@dataclass(frozen=True)
class DatasetKeys:
    """One dataset's results, keyed once: the plan, the run, the search loop and the export all read these."""

    adapters: dict[str, str]  # model -> its fine-tune's key
    outputs: dict[str, str]  # contender -> its outputs' key: the fine-tunes, the teacher, the references
    floors: dict[str, str] = field(default_factory=dict)  # each model untuned, and the trivial answer -> outputs key


def dataset_keys(cfg: SearchConfig, models: dict[str, ModelInfo], data: DatasetInfo, names: list[str],
                 references: bool = True) -> DatasetKeys:
    """The keys of `names`' fine-tunes on a dataset and of every contender's outputs on its test rows."""
    dev = dev_identity(cfg, (data.source or data).train_fp)
    adapters = {m: adapter_key(models[m].fingerprint, data.train_fp, cfg.finetune, dev) for m in names}
    outputs = {m: outputs_key(a, data.test_fp, cfg.generate) for m, a in adapters.items()}
    outputs[TEACHER] = teacher_key(data.test_fp)
    if references:
        outputs |= {ref.name: reference_key(ref, data.test_fp) for ref in cfg.references}
    floors = {untuned_name(m): untuned_key(models[m].fingerprint, data.test_fp, cfg.generate) for m in names}
    floors[TRIVIAL] = trivial_key(data.train_fp, data.test_fp, data.metric)
    return DatasetKeys(adapters, outputs, floors)


def finetune_jobs(cfg: SearchConfig, models: dict[str, ModelInfo], data: DatasetInfo, names: list[str],
                  paths: dict[str, str], keys: DatasetKeys) -> list[FinetuneJob]:
    """The fine-tunes of `names` on a dataset, runnable: `paths` are the models' local folders."""
    dev = ((data.source or data).spec.train, cfg.search.dev_share) if cfg.finetune.search.enabled else ("", 0.0)
    return [FinetuneJob(m, data.spec.name, paths[m], data.spec.train, cfg.finetune, keys.adapters[m], models[m].load,
                        *dev) for m in names]


def dev_identity(cfg: SearchConfig, source_train_fp: str) -> str:
    """The development split that chooses a dataset's fine-tune settings ('' with finetune.search off): the
    dataset's own training rows and search.dev_share, as the merge loop splits them."""
    return split_key(source_train_fp, cfg.search.dev_share) if cfg.finetune.search.enabled else ""


def untuned_jobs(cfg: SearchConfig, data: DatasetInfo, finetunes: list[FinetuneJob], keys: DatasetKeys,
                 ) -> list[GenerateJob]:
    """Every fine-tune's base answering the test rows with no adapter: the floor that shows its lift."""
    return [GenerateJob(untuned_name(j.model), data.spec.name, j.model_dir, "", data.spec.test, cfg.generate,
                        keys.floors[untuned_name(j.model)], j.load) for j in finetunes]


def generate_jobs(cfg: SearchConfig, data: DatasetInfo, finetunes: list[FinetuneJob], adapter_dirs: list[str],
                  keys: DatasetKeys) -> list[GenerateJob]:
    """Every fine-tune answering the dataset's test rows, once its adapter folder is there."""
    return [GenerateJob(j.model, data.spec.name, j.model_dir, folder, data.spec.test, cfg.generate,
                        keys.outputs[j.model], j.load) for j, folder in zip(finetunes, adapter_dirs)]
