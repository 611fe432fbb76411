"""Generation: batched greedy answers equal one-at-a-time answers, and the cached base model gives the same
answers as a freshly loaded one, whatever adapters ran on it before."""

from __future__ import annotations

import pytest
import torch

from tasks.config.stages import FinetuneConfig, GenerateConfig
from tasks.data.load import load_examples
from tasks.generate.outputs import _BASES, GENERATED_COLUMNS, cached_base, clear_base_cache, generate
from tasks.train.finetune import finetune


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """A tiny random model with large weights: clear argmax margins, so float noise cannot flip a greedy token."""
    from tests.conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("sharp") / "m", 3, initializer_range=0.3)


@pytest.fixture(scope="module")
def adapters(sharp_model, tiny_data, tmp_path_factory):
    out = {}
    for name in ("extraction", "classification"):
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        cfg = FinetuneConfig(max_steps=4, batch_size=4, learning_rate=1e-2, max_length=128, lora_r=4,
            search={"enabled": False})
        finetune(sharp_model, load_examples(tiny_data[name][0]), cfg, folder)
        out[name] = folder
    return out


def test_batched_equals_one_at_a_time(sharp_model, adapters, tiny_data):
    examples = load_examples(tiny_data["extraction"][1]) + load_examples(tiny_data["orders"][1])
    run = lambda bs: generate(sharp_model, adapters["extraction"], "x", examples, "m",  # noqa: E731
                              GenerateConfig(max_new_tokens=12, batch_size=bs))
    batched, single = run(16), run(1)
    assert list(batched.columns) == GENERATED_COLUMNS
    assert set(batched["finish_reason"]) <= {"stop", "length"}
    assert batched["output"].tolist() == single["output"].tolist()
    assert batched["completion_tokens"].tolist() == single["completion_tokens"].tolist()
    assert (batched["completion_tokens"] > 0).all()
    assert batched.attrs["peak_memory"]["peak_rss_mb"] > 0


def test_cached_base_is_restored_exactly(sharp_model, adapters, tiny_data):
    examples = load_examples(tiny_data["classification"][1])
    cfg = GenerateConfig(max_new_tokens=10, batch_size=8)
    clear_base_cache()
    fresh = generate(sharp_model, adapters["classification"], "c", examples, "m", cfg)["output"].tolist()
    base = cached_base(sharp_model)[0]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    generate(sharp_model, adapters["extraction"], "c", examples, "m", cfg)  # another adapter on the same weights
    again = generate(sharp_model, adapters["classification"], "c", examples, "m", cfg)["output"].tolist()
    assert cached_base(sharp_model)[0] is base and len(_BASES) == 1  # loaded once
    assert again == fresh
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(base, "peft_config")


def test_each_row_records_its_own_latency(sharp_model, adapters, tiny_data):
    """latency_s is a row's own time to its last token (a row that stops early is done early), not the batch's time
    shared out; ttft_s, batch_s, batch_size, tokens_per_s and the device are the batch's."""
    examples = load_examples(tiny_data["extraction"][1]) + load_examples(tiny_data["orders"][1])
    df = generate(sharp_model, adapters["extraction"], "x", examples, "m", GenerateConfig(max_new_tokens=12, batch_size=4))
    assert (df["device"] == "cpu").all() and set(df["batch_size"]) <= {1, 2, 3, 4} and df["batch_size"].max() == 4
    assert (df["ttft_s"] > 0).all() and (df["ttft_s"] <= df["latency_s"] + 1e-9).all()
    assert (df["latency_s"] <= df["batch_s"] + 1e-9).all()
    for _, batch in df.groupby("batch_s"):  # rows of one batch share its clock
        tokens = (batch["completion_tokens"] + (batch["finish_reason"] == "stop")).sum()
        assert batch["tokens_per_s"].iloc[0] == pytest.approx(tokens / batch["batch_s"].iloc[0])
        longest = batch["completion_tokens"] + (batch["finish_reason"] == "stop")
        # the row that generated most tokens finished last; a shorter one no later
        assert batch.loc[longest.idxmax(), "latency_s"] == batch["latency_s"].max()
