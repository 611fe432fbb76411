"""finetune.search: each base at its own best learning rate, chosen on the development rows, at a bounded cost."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tasks.config.stages import FinetuneConfig, SettingsSearch
from tasks.data.devsplit import settings_split_warning, split_rows
from tasks.data.load import load_examples
from tasks.train.finetune import finetune
from tasks.train.settings_search import Run, _continue, check_steps
from tests.conftest import write_jsonl

RATES = [1e-3, 1e-2, 1e-1]
K = 10.0  # base "fast" sees every LoRA input 10x larger, so its best rate is 10x lower


def _with_head(src: Path, dst: Path, k: float) -> Path:
    """A copy of a tiny random model that can learn (a head 30x the init scale, so its logits can peak) and whose
    LoRA'd layers see inputs k times larger with the same function: each norm's weight x k, the layer it feeds / k
    (q, k, gate), and v and up kept so o and down see k-times inputs, they / k in turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        m.lm_head.weight *= 30
        for layer in m.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            layer.input_layernorm.weight *= k
            for w in (att.q_proj.weight, att.k_proj.weight, att.o_proj.weight):
                w /= k
            layer.post_attention_layernorm.weight *= k
            for w in (mlp.gate_proj.weight, mlp.down_proj.weight):
                w /= k
    m.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def parity(tmp_path_factory, tiny_models):
    """Two learnable tiny bases whose best rates differ 10x, and 200 'is N even?' rows with their development rows."""
    root = tmp_path_factory.mktemp("parity")
    bases = {"slow": _with_head(tiny_models["alpha"], root / "slow", 1.0),
             "fast": _with_head(tiny_models["beta"], root / "fast", K)}
    nums = random.Random(0).sample(range(1000, 9999), 200)
    rows = [{"id": str(n), "messages": [{"role": "user", "content": f"is {n} even?"},
                                        {"role": "assistant", "content": "no" if n % 2 else "yes"}]} for n in nums]
    train = load_examples(write_jsonl(root / "train.jsonl", rows))
    return bases, train, split_rows(train, 0.2)[1]


def _search(base: Path, train, dev, rates: list[float], out: Path, patience: int = 2) -> dict:
    """finetune with the settings search over `rates`: its train_metrics."""
    out.mkdir()
    cfg = FinetuneConfig(epochs=3, search=SettingsSearch(learning_rates=rates, patience=patience))
    return finetune(base, train, cfg, out, dev=dev)


def test_each_base_gets_its_own_best_rate_and_the_ranking_of_its_best(parity, tmp_path):
    torch.set_num_threads(1)  # the same float sums every run
    bases, train, dev = parity
    truth = {}  # base -> rate -> the lowest development loss a whole schedule at that rate reaches
    for name, base in bases.items():
        truth[name] = {lr: _search(base, train, dev, [lr], tmp_path / f"{name}-{lr}", patience=99)["search"]
                       ["best_dev_loss"] for lr in RATES}
    best = {name: min(t, key=t.get) for name, t in truth.items()}
    assert best == {"slow": 1e-2, "fast": 1e-3}  # the construction: best rates 10x apart
    found = {name: _search(base, train, dev, RATES, tmp_path / name) for name, base in bases.items()}
    assert {name: m["learning_rate"] for name, m in found.items()} == best
    by_truth = sorted(bases, key=lambda n: truth[n][best[n]])
    assert sorted(bases, key=lambda n: found[n]["search"]["best_dev_loss"]) == by_truth
    for m in found.values():  # the cost: 3 rates x a quarter, the best to the end at most, and the fine-tune
        s = m["search"]
        assert s["steps_trained"] <= (3 * 0.25 + 0.75) * s["schedule_steps"] + 1
        assert m["steps"] == round(s["share"] * 75)  # 200 rows x 3 epochs / batch 8 = 75 steps, cut at the share


class _Steps:
    """A trainer stand-in: counts steps."""

    def __init__(self) -> None:
        self.done = 0

    def advance(self, n: int) -> None:
        """Take n steps."""
        self.done += n


def _scripted(losses: list[float], patience: int = 2) -> tuple[bool, Run]:
    """_continue over a scripted development loss per check."""
    run, script = Run(0.1, _Steps(), [], [(0, losses[0])]), iter(losses[1:])
    diverged = _continue(run, list(range(1, len(losses))), [], lambda: next(script), patience)
    return diverged, run


def test_a_run_stops_after_patience_checks_without_a_lower_loss():
    diverged, run = _scripted([1.0, 0.5, 0.6, 0.7, 0.2])
    assert not diverged and run.best() == (1, 0.5) and len(run.checks) == 4  # 0.2 never measured


def test_a_loss_that_explodes_is_a_diverged_rate_but_overfitting_is_not():
    assert _scripted([1.0, 0.4, 1.3])[0]  # 3.25x its lowest
    assert not _scripted([1.0, 0.4, 0.8, 0.7])[0]  # 2x: climbs, as overfitting does


def test_checks_are_epochs_within_4_to_20():
    assert check_steps(120, 10.0) == [12 * k for k in range(1, 11)]
    assert check_steps(3, None) == [1, 2, 3]  # a step count: 4 even checks, the same step once
    assert len(check_steps(1000, 50.0)) == 20


def test_auto_settings_follow_the_model_size_and_the_rows():
    cfg = FinetuneConfig()
    assert cfg.lr_for(7_000_000_000) == pytest.approx(2e-4)
    assert cfg.lr_for(1_000_000_000) == pytest.approx(2e-4 * 7 ** (1 / 3))
    assert cfg.lr_for(100) == 1e-2  # within the ceiling
    assert (cfg.epochs_for(120), cfg.epochs_for(5000), cfg.epochs_for(10)) == (9.0, 1.0, 10.0)
    assert FinetuneConfig(learning_rate=3e-3, epochs=2).lr_for(10**9) == 3e-3
    assert SettingsSearch().cost(0.2) == pytest.approx(1.2)


def test_switching_the_search_off_keys_fine_tunes_as_before_it_existed():
    on, off = FinetuneConfig(learning_rate=1e-3, epochs=2), FinetuneConfig(learning_rate=1e-3, epochs=2,
                                                                           search={"enabled": False})
    assert "search" in on.identity() and "search" not in off.identity()
    assert set(on.identity()) - {"search"} == set(off.identity())


def test_too_few_rows_for_a_development_split_warns_and_trains_at_the_given_settings(tiny_models, tiny_data,
                                                                                   tmp_path):
    rows = load_examples(tiny_data["classification"][0])[:2]
    share = next(s for s in (0.01, 0.99) if not all(split_rows(rows, s)))
    (line,) = settings_split_warning("emails", rows, share)
    assert line.startswith("finetune.search: search.dev_share") and "dataset 'emails'" in line and "\n" not in line
    cfg = FinetuneConfig(learning_rate=3e-3, epochs=1, max_length=128)
    (tmp_path / "a").mkdir()
    m = finetune(tiny_models["alpha"], rows, cfg, tmp_path / "a", dev=[])
    assert "search" not in m and m["learning_rate"] == 3e-3
