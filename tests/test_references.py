"""References: API models answer the test rows through the openai client, cached in store/outputs like fine-tunes."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from prefect import flow  # noqa: E402

from tasks.config.schema import ModelPrice, Reference  # noqa: E402
from tasks.core.errors import EnvironmentFailure, UserError  # noqa: E402
from tasks.data.load import Example  # noqa: E402
from tasks.generate.references import reference_outputs  # noqa: E402
from tasks.store.results import reference_key
from tasks.store.store import Store  # noqa: E402
from tests.fake_openai import FakeOpenAI, Faults  # noqa: E402

KEY = "sk-ref-test-9b2e"  # the key the `server` fixture (conftest.py) wants, set in $ENV
ENV = "BASESEARCH_TEST_REF_KEY"
EXAMPLES = [Example(str(i), [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}],
                    f"answer {i}") for i in range(6)]
PRICES = {"ref-model": ModelPrice(input=1.0, output=2.0)}


@flow(name="reference-test")
def _answer(ref: Reference, store: str):
    """reference_outputs inside a flow, as the search calls it."""
    return reference_outputs(ref, "qa", EXAMPLES, "test-fp", PRICES, store)


def _ref(srv: FakeOpenAI, **kw) -> Reference:
    """A reference at the fake endpoint."""
    return Reference(name="gpt-ref", model="ref-model", base_url=srv.base_url, api_key_env=ENV, **kw)


def test_reference_outputs_are_cached_and_cost_counted(server, tmp_path):
    (rel, key), reused, requests, spent = _answer(_ref(server), str(tmp_path))
    assert not reused and requests == 6 and spent > 0
    assert rel == f"outputs/{key}.parquet" and key == reference_key(_ref(server), "test-fp")
    out = Store(str(tmp_path)).read_parquet(rel)
    assert list(out["example_id"]) == [e.id for e in EXAMPLES]
    assert out["error"].isna().all() and out["output"].str.contains("Question").all()
    assert {"dataset", "example_id", "contender", "output", "prompt_tokens", "completion_tokens", "latency_s",
            "error", "cost_usd"} <= set(out.columns)
    assert abs(out["cost_usd"].sum() - spent) < 1e-12
    server.reset()
    renamed = _ref(server).model_copy(update={"name": "gpt-4"})  # the key ignores the name
    (rel2, _), reused, requests, _ = _answer(renamed, str(tmp_path))
    assert reused and requests == 0 and rel2 == rel and server.stats()["chat"] == 0


def test_a_failing_reference_stops_in_one_line_keeps_answered_rows_and_asks_only_the_failed_next_run(server, tmp_path):
    server.faults = Faults(rate_500=0.5)
    with pytest.raises(EnvironmentFailure) as err:
        _answer(_ref(server, max_retries=0), str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and KEY not in msg
    assert msg.startswith("references[gpt-ref] on dataset 'qa': ") and "answers failed in this run" in msg
    assert "api: 500: The server had an error." in msg and "retr" not in msg  # max_retries 0: no retry claimed
    assert "are kept in the store" in msg and "To fix: the server failed" in msg
    rel = f"outputs/{reference_key(_ref(server), 'test-fp')}.parquet"
    first = Store(str(tmp_path)).read_parquet(rel)  # written before the run stopped
    failed = first["error"].notna()
    assert failed.any() and (~failed).any()
    assert first.loc[failed, "error"].str.startswith("api: 500").all()
    server.reset()  # attempts counted afresh: the failed prompts now succeed on their first new attempt
    server.faults = Faults()
    (rel, _), reused, requests, _ = _answer(_ref(server, max_retries=0), str(tmp_path))
    second = Store(str(tmp_path)).read_parquet(rel)
    assert not reused and requests == int(failed.sum())  # only the failed rows are paid for again
    assert second["error"].isna().all()
    pd.testing.assert_series_equal(second.loc[~failed, "output"], first.loc[~failed, "output"])


def test_a_reference_with_a_rejected_key_stops_after_the_calls_in_flight(server, tmp_path):
    server.faults = Faults(chat_401=True)
    with pytest.raises(UserError) as err:
        _answer(_ref(server, concurrency=2), str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "rejected the API key" in msg and f"${ENV}" in msg
    assert server.stats()["chat"] <= 2  # of 6 rows: only the 2 already in flight were sent
