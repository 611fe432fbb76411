"""Every result of the search: its content key and its place in the store, with each stage's version.

The one source of truth for what names a result (docs/architecture.md, "How a key is made"): the plan, the stages,
the flows and the export all key and find results through these functions, so a key is computed one way only.
A key hashes everything that determines the result (tasks/store/keys.py content_key); a stage's version is part
of it, so bumping a version recomputes that stage's results and everything made from them, nothing else.
tests/test_store_keys.py holds the keys equal to those an older commit stored.

A light module: pydantic config types only (no torch, Prefect, pandas), so the plan imports it before any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.store.keys import content_key

if TYPE_CHECKING:
    from tasks.config.schema import JudgeConfig, Reference
    from tasks.config.stages import FinetuneConfig, GenerateConfig

# Bump a stage's version when a change alters what the stage computes (not how fast): its results are redone.
FINETUNE_VERSION = "2"  # 2: packed, shuffled batches
GENERATE_VERSION = "1"  # fine-tunes' outputs, and the teacher's answers read as outputs
REFERENCE_VERSION = "1"  # API models' outputs
MERGE_VERSION = "1"  # mergekit's own version is part of a merge's key too; sharding changes files, not weights
METRIC_JUDGE_VERSION = "1"
PROMPT_VERSION = "1"  # the LLM judge's prompt text: every LLM judgment's key and `judge` label include it
SPLIT_VERSION = "1"  # the rule that assigns rows to the development split
ZOO_VERSION = "3"  # the demo zoo's builder (3: trained by the packed training step)
FLOOR_VERSION = "1"  # the trivial answer's rule (tasks/generate/floors.py)

# The store's layout: (path pattern, what lives there). docs/architecture.md shows it; tests/test_layout.py checks.
LAYOUT = [
    ("models/<key>/", "zoo, merged and adapter-merged models, Hugging Face format (merges: mergekit_config.yml)"),
    ("adapters/<key>/", "PEFT LoRA adapters with train_metrics.json"),
    ("outputs/<key>.parquet", "one contender's answers on one dataset's test rows (fine-tune, teacher or reference)"),
    ("judgments/<key>.parquet", "one judged batch: a metric-judged pair of outputs, or a batch of LLM judgments"),
    ("splits/<key>/", "a dataset's training rows split into train.jsonl and dev.jsonl for the search's own merges"),
    ("checkpoints/<key>/", "a fine-tune's training state every finetune.checkpoint_every steps, until its adapter is "
                           "stored"),
    ("inputs/<key>/", "pool mode on a bucket: a dataset file or local candidate folder a stage run needs, by content"),
    ("rates/<stage>.json", "measured speed per stage and device, which the plan estimates GPU time with"),
    ("runs/<run-id>/", "one run: config.yaml, ratings.parquet, judgments.parquet, validation.json, report.md/html"),
    ("runs/LATEST", "the newest finished run's id"),
]
RESULT_FOLDERS = ("models/", "adapters/", "inputs/")  # folder results: present only with a whole manifest


def keyed_folder(rel: str) -> bool:
    """Whether `rel` names a folder by the layout alone (models/<key>, adapters/<key>), so an object store need not
    be asked whether it is a file (inputs/<sha>/<name> may be either)."""
    return rel.startswith(("models/", "adapters/")) and rel.count("/") == 1
JUDGMENTS_GLOB = "judgments/*.parquet"
RUNS = "runs"
LATEST = "runs/LATEST"


@dataclass(frozen=True)
class Folder:
    """A top-level folder of the store: `folder(key)` is the store path of the result with that key."""

    prefix: str
    suffix: str = ""  # a file result's extension; a folder result has none

    def __call__(self, key: str) -> str:
        """The result's path relative to the store's root."""
        return f"{self.prefix}{key}{self.suffix}"


model_path = Folder("models/")  # zoo, merged, and adapter-merged models
adapter_path = Folder("adapters/")  # fine-tunes
outputs_path = Folder("outputs/", ".parquet")  # a contender's answers on one dataset
judgments_path = Folder("judgments/", ".parquet")  # one judged batch
split_path = Folder("splits/")  # a development split
input_path = Folder("inputs/")  # pool mode on a bucket: a dataset file (inputs/<sha>/<name>) or folder a run needs
checkpoint_path = Folder("checkpoints/", "/")  # a fine-tune's checkpoints (step-<n>/ folders), keyed by its adapter key
rates_path = Folder("rates/", ".json")  # keyed by stage name, not by content
run_path = Folder(f"{RUNS}/")  # keyed by run id


def adapter_key(model_fp: str, train_fp: str, cfg: FinetuneConfig, dev: str = "") -> str:
    """A fine-tune: base weights, training rows, hyper-parameters, code version, and the development split that
    chose its settings (finetune.search; '' with the search off, keyed as before the search existed)."""
    parts = ("finetune", model_fp, train_fp, cfg.identity(), FINETUNE_VERSION)
    return content_key(*parts, dev) if dev else content_key(*parts)


def outputs_key(adapter: str, test_fp: str, cfg: GenerateConfig) -> str:
    """A fine-tune's test outputs: adapter, test rows, generation settings, code version."""
    return content_key("outputs", adapter, test_fp, generate_settings(cfg), GENERATE_VERSION)


def generate_settings(cfg: GenerateConfig) -> dict[str, Any]:
    """The generation settings a key holds: the engine only when it is not the default hf (so hf keys stay as they
    were before the engine was a setting)."""
    return cfg.model_dump(exclude={"engine"} if cfg.engine == "hf" else None)


def teacher_key(test_fp: str) -> str:
    """A dataset's own answers as outputs."""
    return content_key("teacher", test_fp, GENERATE_VERSION)


def untuned_key(model_fp: str, test_fp: str, cfg: GenerateConfig) -> str:
    """A base model's zero-shot outputs (no adapter): weights, test rows, generation settings, code version."""
    return content_key("untuned", model_fp, test_fp, generate_settings(cfg), GENERATE_VERSION)


def trivial_key(train_fp: str, test_fp: str, metric: str) -> str:
    """A dataset's trivial answers: the training rows they come from, the test rows, the metric that picks the rule."""
    return content_key("trivial", train_fp, test_fp, metric, FLOOR_VERSION)


def reference_key(ref: Reference, test_fp: str) -> str:
    """A reference's test outputs: model, endpoint, answer length, test rows, code version."""
    return content_key("reference", ref.model, ref.base_url, ref.max_tokens, test_fp, REFERENCE_VERSION)


def merge_key(recipe: dict[str, Any]) -> str:
    """A merge: its recipe with model names replaced by fingerprints (tasks/models/merge.py recipe_fingerprint)."""
    return content_key("merge", recipe)


def metric_judgment_key(cfg: JudgeConfig, metric: str, test_fp: str, outputs_a: str, outputs_b: str) -> str:
    """One metric-judged batch: the metric judge's settings, the test rows and both outputs.

    Only the settings the metric judge reads are in it, so adding an LLM-judge setting re-judges nothing.
    """
    settings = {"kind": cfg.kind, "strong_margin": cfg.strong_margin}
    return content_key("judge", settings, metric, test_fp, outputs_a, outputs_b, METRIC_JUDGE_VERSION)


def llm_judgment_key(model: str, dataset: str, example_id: str, example_hash: str, first: str, second: str) -> str:
    """One LLM judgment: judge model, prompt version, dataset, example, the shown outputs' hashes in order."""
    return content_key("judgment", model, PROMPT_VERSION, dataset, str(example_id), example_hash, first, second)


def llm_repeat_key(judgment_key: str) -> str:
    """The second asking of an LLM judgment (the judge card's repeatability): its own key, so the first's cached
    verdict never answers it, and a re-run finds it in the store."""
    return content_key("judgment-repeat", judgment_key)


def llm_batch_key(judgment_keys: list[str]) -> str:
    """A file of LLM judgments: the keys of the judgments in it."""
    return content_key("llm-batch", sorted(judgment_keys))


def split_key(train_fp: str, share: float) -> str:
    """A development split: the training rows and the share set aside."""
    return content_key("dev-split", train_fp, share, SPLIT_VERSION)


def zoo_model_key(name: str, recipe: dict[str, Any], shape: dict[str, Any], vocab: int, parent: str | None) -> str:
    """A demo zoo model: its recipe, the zoo's shape and vocabulary, its parent's key and the zoo's code version."""
    return content_key("zoo", name, recipe, shape, vocab, parent, ZOO_VERSION)
