"""A store written before a change is reused after it: every result key the code computes today equals the key the
code of commit 4abdc48 computed for the same inputs (tests/data/store_keys_4abdc48.json, written by that commit).

A key that changes on purpose (it was wrong) changes this file in the same commit, and the commit says why. The
demo plan's keys of the classification dataset (and the held-out teacher's) were rewritten when the demo data was
regenerated without test prompts in training (tasks/demo/data.py make_split), and the floors' outputs (each model
untuned, the trivial answer) were added. Every model-side key of the demo plan was rewritten once more when the
zoo's shape took head_dim 64 (2 heads of 64, 1 KV head, in place of 4 heads of 24: vLLM serves no head size 24), which
changes every zoo model and so everything trained from them; the teacher's outputs and the trivial answers, which no
zoo model touches, kept their keys. The API-side keys are 4abdc48's.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config.schema import Reference, load_config
from tasks.plan.jobs import build_plan
from tasks.plan.prepare import prepare
from tasks.store.results import llm_judgment_key, reference_key
from tasks.store.store import Store

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((Path(__file__).parent / "data" / "store_keys_4abdc48.json").read_text())


def test_the_demo_plan_names_the_results_the_previous_commit_stored(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    # without the search's own merges: with them (search.refit off) the fine-tunes train on other rows, so other keys
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"rounds": 0})})
    plan = build_plan(cfg, prepare(cfg), Store(str(tmp_path / "store")))
    keys = sorted({j.rel for j in plan.jobs if j.rel})
    # the zoo's models, the merges, 20 adapters, their outputs, the teachers, the metric judge's batches
    assert len(keys) == len(GOLDEN["demo_plan"]) > 100
    assert keys == GOLDEN["demo_plan"]


def test_api_side_keys_are_unchanged():
    ref = Reference(name="gpt", model="gpt-4o-mini", base_url="http://x/v1")
    assert reference_key(ref, "0123456789abcdef") == GOLDEN["reference"]
    assert llm_judgment_key("gpt-4o", "extraction", "7", "e" * 16, "a" * 16, "b" * 16) == GOLDEN["llm_judgment"]
