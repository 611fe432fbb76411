"""The search config: frozen pydantic models loaded from YAML, validated before any model is loaded."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

# A leaf module: only pydantic, yaml and the standard library, so that `--help` and every config error print fast.
from tasks.config.base import TEACHER, ZOO_PREFIX, Frozen, Name, PathText, not_utf8
from tasks.config.merge_search import MergeSearchConfig
from tasks.config.messages import format_error, hint
from tasks.config.recipes import recipe_models, recipe_problem
from tasks.config.stages import ComputeConfig, FinetuneConfig, GenerateConfig
from tasks.core.errors import UserError


class Candidate(Frozen):
    """A base model to try."""

    name: Name = Field(description="Short name used in tables, run names, store paths and merge recipes.")
    path: PathText = Field(description="Hugging Face id, local folder (a model, or a PEFT adapter whose base is "
                           "found from its adapter_config.json), or zoo:NAME (the demo zoo, built on demand).")
    chat_template: PathText | None = Field(
        default=None, description="Prompt format used instead of the tokenizer's own (or when it has none): a named "
        "template (default, chatml, zephyr, mistral, llama3, gemma, phi3) or a .jinja file. None: the model's own, "
        "else the search's chat_template.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Run the Python code the model folder ships (config.json `auto_map`); a model that "
        "needs it is refused without it.",
    )


class LoadOptions(Frozen):
    """How a model folder is loaded for training and generation (resolved at the check, travels with each job)."""

    chat_template: str | None = Field(
        default=None, description="Jinja text of the template to use instead of the tokenizer's own (None: its own)."
    )
    trust_remote_code: bool = Field(default=False, description="Whether the folder's own Python code may run.")


class Merge(Frozen):
    """A candidate made from other candidates by a mergekit recipe."""

    name: Name = Field(description="Short name of the merged model.")
    recipe: dict[str, Any] = Field(
        description="A mergekit config, verbatim; `model:` and `base_model:` may name a candidate."
    )

    @field_validator("recipe")
    @classmethod
    def _recipe_shape(cls, recipe: dict[str, Any]) -> dict[str, Any]:
        """The recipe has the shape mergekit reads (its full check, with mergekit, comes later in prepare)."""
        problem = recipe_problem(recipe)
        if problem:
            raise ValueError(problem)
        return recipe


class DatasetSpec(Frozen):
    """One customer dataset: train and test rows in the OpenAI fine-tuning format (files, or an ingest folder)."""

    name: Name = Field(description="Short name of the dataset.")
    train: PathText = Field(description="JSONL, Parquet or a `datasets` folder of training rows; relative to the "
                            "config file, or in the Prefect UI's form to the worker's working folder. Given by "
                            "`path` when that is set.")
    test: PathText = Field(description="JSONL, Parquet or a `datasets` folder of test rows; relative like `train`. "
                           "Given by `path` when that is set.")
    metric: Literal["exact", "json", "rouge"] | None = Field(
        default=None, description="How the metric judge scores an output; inferred from the data when absent."
    )
    path: PathText | None = Field(default=None, description="An ingest folder (python -m flows.ingest --out): train "
                                  "is its train.jsonl, test its test.jsonl (or held_out.jsonl, see `part`); instead of "
                                  "train and test.")
    part: Literal["test", "held_out"] = Field(default="test", description="With `path`: the folder's file judged: "
                                              "test.jsonl (a search dataset), or held_out.jsonl (the ingest's "
                                              "--held-out-share carve-out, for validation.dataset: groups the "
                                              "search never saw).")

    @model_validator(mode="before")
    @classmethod
    def _from_folder(cls, raw: Any) -> Any:
        """`path` names train and test (the ingest folder's files); giving both ways is a mistake."""
        if not isinstance(raw, dict) or raw.get("path") is None:
            if isinstance(raw, dict) and raw.get("part") not in (None, "test"):
                raise ValueError("part: only with path (an ingest folder)")
            return raw
        if raw.get("train") is not None or raw.get("test") is not None:
            raise ValueError("path: an ingest folder gives train and test; set path, or train and test, not both")
        folder = str(raw["path"]).rstrip("/")
        part = raw.get("part") or "test"
        return {**raw, "train": f"{folder}/train.jsonl", "test": f"{folder}/{part}.jsonl"}


class Reference(Frozen):
    """A model reached over an OpenAI-compatible API, judged beside the fine-tunes."""

    name: Name = Field(description="Short name of the reference (e.g. gpt-4).")
    model: str = Field(description="Model id sent to the endpoint.")
    base_url: str | None = Field(default=None, description="Endpoint; None means OpenAI's.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Environment variable holding the API key.")
    api_key_secret: str | None = Field(
        default=None, description="Prefect Secret block holding the key, used when the environment variable is unset."
    )
    max_tokens: int = Field(default=1024, ge=1, description="Longest answer in tokens (temperature is always 0).")
    concurrency: int = Field(default=16, ge=1, description="Requests in flight at once.")
    rpm: int | None = Field(default=None, ge=1, description="Requests-per-minute limit of the endpoint (None: none).")
    tpm: int | None = Field(default=None, ge=1, description="Tokens-per-minute limit of the endpoint (None: none).")
    max_retries: int = Field(default=6, ge=0, description="Retries of a 429, 5xx, timeout or dropped connection.")
    timeout_s: float = Field(default=120.0, gt=0, description="Seconds before one request is abandoned (and retried).")


class ModelPrice(Frozen):
    """What an API model costs, in US dollars per million tokens."""

    input: float = Field(ge=0, description="USD per 1M prompt (input) tokens, e.g. 30 for gpt-4-0613.")
    output: float = Field(ge=0, description="USD per 1M completion (output) tokens, e.g. 60 for gpt-4-0613.")


class Validation(Frozen):
    """The held-out check: read only after the winner is frozen."""

    dataset: DatasetSpec = Field(description="The held-out dataset; no part in choosing the winner.")
    baselines: list[str] = Field(
        default_factory=list, description="Candidates the winner must beat on the held-out dataset."
    )


class JudgeConfig(Frozen):
    """Who decides each pairwise comparison."""

    kind: Literal["metric", "openai", "combined"] = Field(
        default="metric", description="metric: free, deterministic score against the expected answer; openai: an LLM "
        "judge; combined: the metric decides where a row's `expected` separates the two outputs (different scores), "
        "the LLM judge (the openai settings below) decides the rest, so only those are paid for.",
    )
    model: str | None = Field(default=None, description="Judge model id (openai judge).")
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint (openai judge).")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Environment variable holding the judge's API key.")
    api_key_secret: str | None = Field(
        default=None, description="Prefect Secret block holding the judge's key, used when the environment variable is unset."
    )
    strong_margin: float = Field(
        default=0.5, ge=0, le=1, description="Metric judge: a score gap this large (0..1) is a strong win."
    )
    both_orders: bool = Field(
        default=True, description="openai judge: show every pair both ways; false shows one random order (half the cost)."
    )
    reference: Literal["expected", "expected-or-teacher", "none"] = Field(
        default="expected",
        description="openai judge: the reference answer shown beside the outputs: a row's `expected` only, `expected` "
        "else the teacher's answer (favours the teacher), or none.",
    )
    structured: bool = Field(
        default=True, description="openai judge: ask for the JSON verdict through response_format json_schema "
        "(false for endpoints that reject it; the fallback parser reads the verdict either way).",
    )
    concurrency: int = Field(default=64, ge=1, description="openai judge: requests in flight at once.")
    rpm: int | None = Field(default=None, ge=1, description="openai judge: requests-per-minute limit (None: none).")
    tpm: int | None = Field(default=None, ge=1, description="openai judge: tokens-per-minute limit (None: none).")
    max_retries: int = Field(
        default=6, ge=0, description="openai judge: retries of a 429, 5xx, timeout or dropped connection (backoff "
        "honours Retry-After)."
    )
    timeout_s: float = Field(default=120.0, gt=0, description="openai judge: seconds before a request is abandoned.")
    max_tokens: int = Field(default=256, ge=16, description="openai judge: longest verdict reply in tokens.")
    batch_size: int = Field(
        default=5000, ge=1, description="openai judge: most comparisons per Prefect task; its judgments are written "
        "to the store every 500 as they come, so a killed run loses at most that many."
    )
    repeat_share: float = Field(
        default=0.05, ge=0, le=1, description="openai and combined judges: share of the test rating's LLM judgments "
        "asked a second time for the judge card's repeatability (a sample fixed by each judgment's key; paid like any "
        "judgment, never rated).",
    )
    repeat_min: int = Field(
        default=50, ge=0, description="openai and combined judges: at least this many judgments repeated (all of them "
        "when fewer); repeat_share and repeat_min both 0 turn repeats off.",
    )

    def repeat_count(self, judgments: int) -> int:
        """How many of an LLM judge's judgments the judge card asks again: repeat_share of them, rounded up, at least
        repeat_min, at most all (tasks/judge/repeat.py; the plan prices them the same way)."""
        return min(judgments, max(self.repeat_min, math.ceil(self.repeat_share * judgments)))

    @model_validator(mode="after")
    def _llm_needs_a_model(self) -> "JudgeConfig":
        """An openai or combined judge names its model (checked here, so the error names the file and line)."""
        if self.kind != "metric" and not self.model:
            raise ValueError(f"the {self.kind} judge needs a model id (model: e.g. gpt-4o)")
        return self


class RatingConfig(Frozen):
    """How judgments become ratings: tie model, weights, anchor and confidence intervals."""

    ties: Literal["davidson", "rao-kupper", "half"] = Field(
        "davidson",
        description="Tie model: Davidson (1970), Rao-Kupper (1967), or 'half' (a tie is half a win for each side).",
    )
    strong_weight: float = Field(
        1.0, ge=0.0, description="Weight of a strength-2 (strong, A>>B) verdict; 2.0 counts it as two wins."
    )
    anchor: str | None = Field(
        None, description="Contender pinned at anchor_rating (e.g. gpt-4); None or absent: the mean rating is pinned."
    )
    anchor_rating: float = Field(1000.0, description="Rating of the anchor contender, or the mean rating without one.")
    ci: Literal["bootstrap", "fisher", "sandwich"] = Field(
        "bootstrap",
        description="Interval method: bootstrap over examples (sound, default), inverse Fisher information (fast, too "
        "narrow when examples differ), or 'sandwich' (fast and clustered by example: the adaptive planner's).",
    )
    bootstrap_rounds: int = Field(200, ge=2, description="Bootstrap replicates when ci is 'bootstrap'.")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Two-sided confidence of intervals and separation.")
    seed: int = Field(0, description="Seed of the bootstrap resampling.")
    ridge: float = Field(
        1e-4,
        ge=0.0,
        description="Gaussian prior precision on log-strengths (nats^-2), for a well-posed fit; 1e-4 is a prior s.d. "
        "of 100 nats, negligible against real data. (A contender that wins or loses everything is not held in by it: "
        "it is reported unbounded, with a one-sided bound.)",
    )
    length_control: bool = Field(
        False,
        description="Control for output length as Arena-Hard's style control does: the model gets a term beta * "
        "(len_a - len_b) / (len_a + len_b) (lengths in characters), so a judge's taste for longer answers is not "
        "credited to the longer-winded contender. `rating` (interval, rank) is then the controlled fit; `rating_raw`, "
        "`ci_low_raw`, `ci_high_raw` keep the plain one and `length_coef` the length term in Elo per unit.",
    )


class BudgetConfig(Frozen):
    """How many comparisons to plan and when to stop judging."""

    strategy: Literal["adaptive", "all-pairs"] = Field(
        "adaptive", description="'adaptive': warm-up, then leader vs overlapping challengers; 'all-pairs': everything."
    )
    warmup_per_pair: int = Field(4, ge=0, description="Examples judged for every pair in the uniform warm-up, planned as one round of its own.")
    round_size: int = Field(200, ge=1, description="Comparisons planned per adaptive round after the warm-up.")
    max_comparisons: int | None = Field(
        None, ge=1, description="The most judgments (rows) the LLM judge uses per judging stage, reused and free ones "
        "included: both orders of one comparison are two judgments, and the cap is never exceeded (an odd cap with both "
        "orders leaves one unused). The search and the validation each have this cap; the metric judge is free and "
        "judges every pair regardless (None: no cap).")
    max_usd: float | None = Field(
        None, ge=0.0, description="Dollars the judge and the references may cost; a run whose plan alone costs more "
        "does not start, no reference starts that would cross it, and judging stops at the cap (None: no cap).")
    max_gpu_hours: float | None = Field(
        None, gt=0.0, description="GPU-hours fine-tuning and generation may take; a run whose plan alone takes more "
        "does not start, and the run stops before a stage that would cross it (None: no cap).")
    confidence: float = Field(
        0.95, gt=0.0, lt=1.0, description="Adaptive: stop when the leader is separated from every other contender at "
        "this confidence, all looks at the data together (each look tested at (1 - confidence) / looks)."
    )


class DataConfig(Frozen):
    """Checks of the datasets before any model loads: test prompts seen in training, repeated training rows."""

    max_overlap: float = Field(
        default=0.01, ge=0, le=1, description="The largest share of a dataset's test prompts that may also appear in "
        "its training rows (verbatim, after folding case and whitespace, or as near-duplicates) before the search "
        "refuses to start; 1 accepts any. Overlaps under it are reported.")
    near_duplicate: float = Field(
        default=0.9, gt=0, le=1, description="Jaccard similarity of two prompts' word 3-grams (system messages left "
        "out) from which they count as near-duplicates; 1 counts only verbatim and folded copies.")


class TeacherConfig(Frozen):
    """The expensive model whose answers the datasets hold: what it costs and how fast it answers, for the verdict."""

    model: str = Field(min_length=1, description="Its API model id, priced in `prices` (e.g. gpt-4o-2024-08-06): "
                       "the verdict then says what share of its cost a fine-tune serves at.")
    latency_s: float | None = Field(default=None, gt=0, description="Its median latency per request in seconds, "
                                    "e.g. from your logs: the verdict then says how many times faster a fine-tune is.")


class VerdictConfig(Frozen):
    """How the verdict reads a fine-tune's win rate against the teacher and the references."""

    margin: float = Field(
        default=0.05, ge=0, lt=0.5, description="Non-inferiority margin in win rate: a fine-tune whose interval's low "
        "end stays above 50% minus this (45% by default) is 'as good as' the reference within it.")


class SearchConfig(Frozen):
    """A whole search: what to try, what to score it on, and how."""

    name: Name = Field(description="Names the runs (and their folders in the store).")
    candidates: list[Candidate] = Field(min_length=1, description="Base models to try.")
    merges: list[Merge] = Field(default_factory=list, description="mergekit recipes over the candidates.")
    ingredients: list[Candidate] = Field(
        default_factory=list, description="Models that merge recipes may name but that are not candidates themselves: "
        "merged, never fine-tuned or rated.",
    )
    chat_template: PathText = Field(
        default="default", description="Prompt format of a model with no chat template of its own (a base model): "
        "a named template (default, chatml, zephyr, mistral, llama3, gemma, phi3) or a .jinja file. 'default' "
        "ends a turn with the tokenizer's eos token, so it suits every vocabulary.",
    )
    datasets: list[DatasetSpec] = Field(min_length=1, description="Customer datasets the search is scored on.")
    references: list[Reference] = Field(default_factory=list, description="API models judged beside the fine-tunes.")
    validation: Validation | None = Field(default=None, description="Held-out check of the winner.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="LoRA hyper-parameters.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Generation settings.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The pairwise judge.")
    judges: list[JudgeConfig] | None = Field(
        default=None, min_length=1, description="Several judges instead of `judge` (give one or the other): each "
        "judges every comparison it is planned, and the ratings are fitted on all their judgments pooled, and per judge "
        "beside them. Each is a metric or openai judge, no two alike.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Leakage and duplicate checks of the datasets.")
    verdict: VerdictConfig = Field(default_factory=VerdictConfig, description="How the verdict reads win rates.")
    teacher: TeacherConfig | None = Field(default=None, description="The model behind the datasets' answers, priced.")
    rating: RatingConfig = Field(default_factory=RatingConfig, description="Bradley-Terry settings.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Comparison planning and spending caps.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Where GPU stages run.")
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="API model id -> USD per 1M input/output tokens, for the judge and references."
    )
    search: MergeSearchConfig = Field(
        default_factory=MergeSearchConfig, description="Rounds in which the search proposes its own merges (off by "
        "default)."
    )

    @model_validator(mode="after")
    def _names_are_consistent(self) -> "SearchConfig":
        """Names are unique, merges name known models, baselines are candidates."""
        models = [c.name for c in self.candidates] + [m.name for m in self.merges]
        contenders = models + [r.name for r in self.references]
        if TEACHER in contenders:
            raise ValueError(f"'{TEACHER}' is reserved for the datasets' own answers; rename that candidate, merge or "
                             "reference")
        _no_duplicates(contenders + [i.name for i in self.ingredients], "candidates/merges/references/ingredients")
        _no_duplicates([d.name for d in self.datasets], "datasets")
        for i, merge in enumerate(self.merges):
            known = [c.name for c in self.candidates + self.ingredients] + [m.name for m in self.merges[:i]]
            for ref in recipe_models(merge.recipe):
                if ref not in known:
                    raise ValueError(
                        f"merges[{i}] ({merge.name}): recipe names unknown candidate '{ref}'{hint(ref, known)}"
                    )
        if self.validation:
            if self.validation.dataset.name in {d.name for d in self.datasets}:
                raise ValueError(f"validation.dataset: '{self.validation.dataset.name}' is also a search dataset")
            for b in self.validation.baselines:
                if b not in models:
                    raise ValueError(f"validation.baselines: unknown model '{b}'{hint(b, models)}")
        _check_judges(self)
        base = self.search.base_model
        if base is not None and base not in models + [i.name for i in self.ingredients]:
            raise ValueError(f"search.base_model: unknown model '{base}'{hint(base, models)}")
        anchor, everyone = self.rating.anchor, [*contenders, TEACHER]
        if anchor is not None and anchor not in everyone:  # before any money is spent, not at rating time
            raise ValueError(f"rating.anchor: '{anchor}' is not a contender{hint(anchor, everyone)}")
        return self

    def judge_list(self) -> list[JudgeConfig]:
        """The judges of the search: `judges`, else the one `judge`."""
        return list(self.judges) if self.judges else [self.judge]

    def llm_judges(self) -> list[JudgeConfig]:
        """The judges that call an OpenAI-compatible endpoint (openai and combined)."""
        return [j for j in self.judge_list() if j.kind != "metric"]

    def model_kinds(self) -> dict[str, str]:
        """Contender name -> kind, for every model and reference."""
        kinds = {c.name: "candidate" for c in self.candidates}
        kinds |= {m.name: "merge" for m in self.merges}
        kinds |= {r.name: "reference" for r in self.references}
        return kinds | {TEACHER: "reference"}


def _check_judges(cfg: SearchConfig) -> None:
    """`judge` or `judges`, not both; a list holds metric and openai judges, no two alike."""
    if cfg.judges is None:
        return
    # A form (the Prefect UI) may send `judge` at its default beside `judges`: only a judge set to something is a clash.
    if "judge" in cfg.model_fields_set and cfg.judge != JudgeConfig():
        raise ValueError("give either judge: (one judge) or judges: (several, pooled), not both")
    seen: dict[tuple[str, str | None], int] = {}
    for i, j in enumerate(cfg.judges):
        if j.kind == "combined":
            raise ValueError(f"judges[{i}]: kind combined is a judge of its own (judge: {{kind: combined, ...}}); to "
                             "pool the metric and an LLM judge, list them: judges: [{kind: metric}, {kind: openai, ...}]")
        who = (j.kind, j.model if j.kind == "openai" else None)
        if who in seen:
            raise ValueError(f"judges[{i}]: the same judge as judges[{seen[who]}] ({j.kind}"
                             + (f", model {j.model}" if j.model else "") + "): each judge must differ")
        seen[who] = i


def _no_duplicates(names: list[str], where: str) -> None:
    """Raise when a name is used twice."""
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{where}: name '{n}' is used twice")
        seen.add(n)


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make dataset, template and local model paths absolute, relative to the config file's folder."""

    def fix(p: Any) -> Any:
        if not isinstance(p, str) or p.startswith(ZOO_PREFIX) or "://" in p or os.path.isabs(p) or "\0" in p:
            return p  # (a NUL byte is left for the field's check to name)
        return str((base / p).resolve())

    def fix_dataset(d: Any) -> Any:
        if not isinstance(d, dict):
            return d
        folder = {"path": fix(d["path"])} if d.get("path") is not None else {}
        return {**d, "train": fix(d.get("train")), "test": fix(d.get("test")), **folder}

    out = dict(raw)
    if isinstance(out.get("datasets"), list):
        out["datasets"] = [fix_dataset(d) for d in out["datasets"]]
    val = out.get("validation")
    if isinstance(val, dict) and isinstance(val.get("dataset"), dict):
        out["validation"] = {**val, "dataset": fix_dataset(val["dataset"])}
    if isinstance(out.get("chat_template"), str) and out["chat_template"].endswith(".jinja"):
        out["chat_template"] = fix(out["chat_template"])
    for key in ("candidates", "ingredients"):
        if isinstance(out.get(key), list):
            out[key] = [_resolve_model(c, base, fix) for c in out[key]]
    return out


def _resolve_model(c: Any, base: Path, fix: Any) -> Any:
    """A candidate or ingredient entry with its .jinja template and local path made absolute."""
    if not isinstance(c, dict):
        return c
    t = c.get("chat_template")
    c = {**c, "chat_template": fix(t)} if isinstance(t, str) and t.endswith(".jinja") else c
    # A relative candidate path is local only if it exists there; otherwise it is an HF id.
    path = c.get("path")
    return {**c, "path": fix(path)} if isinstance(path, str) and (base / path).exists() else c


def load_config(path: str | os.PathLike[str]) -> SearchConfig:
    """Read and validate a YAML config; raise UserError with one line naming the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(not_utf8(str(path), data, e)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys (name, candidates, datasets, ...)")
    try:
        return SearchConfig.model_validate(_resolve_paths(raw, path.parent.resolve()))
    except ValidationError as e:
        raise UserError(format_error(SearchConfig, path, text, e)) from None
