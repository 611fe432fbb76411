"""Endpoints that misbehave end in one clear line, never in a quiet success: the fake server's faults, caps and
budgets that hold, and a plain web server that answers text instead of JSON."""

from __future__ import annotations

import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402
from prefect import flow  # noqa: E402

from tasks.api.client import Endpoint, preflight  # noqa: E402
from tasks.api.failures import FAILED_STREAK, Tally, too_many  # noqa: E402
from tasks.config.schema import BudgetConfig, JudgeConfig, ModelPrice, Reference  # noqa: E402
from tasks.core.errors import EnvironmentFailure, UserError  # noqa: E402
from tasks.generate.references import reference_outputs  # noqa: E402
from tasks.judge.llm import Contest, cached_judgments  # noqa: E402
from tasks.judge.prompt import judge_label  # noqa: E402
from tasks.store.store import Store  # noqa: E402
from tests.fake_openai import Faults  # noqa: E402
from tests.test_llm_judge import ALL, ENV, KEY, _cfg, _contest, _examples, _judge_flow, _outputs  # noqa: E402


def _big_contest(n: int = 8) -> Contest:
    """Six contenders with distinct outputs: 15 pairs x n examples x 2 orders calls (240 for n = 8)."""
    names = ["best", "good", "half", "poor", "worse", "worst"]
    texts = {name: [f"item {i} red box"[: 14 - k] + f" {name}" for i in range(n)] for k, name in enumerate(names)}
    return Contest({"d": _examples(n)}, {"d": {name: _outputs(name, texts[name]) for name in names}})


def _one_line(err: pytest.ExceptionInfo) -> str:
    """The failure's message, checked to be one line that shows no key and no traceback."""
    msg = str(err.value)
    assert "\n" not in msg and KEY not in msg and "Traceback" not in msg and "AttributeError" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ the rule


def test_failure_share_rule():
    assert not too_many(2, 48) and too_many(3, 48)  # 5% of 48 is 2.4
    assert not too_many(1, 12) and too_many(2, 12)  # one odd reply of a small run never stops it...
    assert too_many(1, 1)  # ...unless it was the only call
    t = Tally(planned=1000)
    for _ in range(FAILED_STREAK - 1):
        t.add("api: connection error: ConnectError")
    assert not t.tripped and t.over  # 19 of 19 so far: over the share, not yet certain nor a streak
    t.add("api: connection error: ConnectError")
    assert t.tripped and t.most_common() == ("api: connection error", 20, "api: connection error: ConnectError")
    t.add(None)
    assert t.streak == 0 and not t.tripped


# ------------------------------------------------------------------------------------------ the judge


def test_judge_that_never_gives_a_verdict_stops_early_with_one_line(server, tmp_path):
    server.faults = Faults(rate_always_unparseable=1.0)
    with pytest.raises(EnvironmentFailure) as err:
        _judge_flow(_big_contest(), _cfg(server, concurrency=4), ALL, None, str(tmp_path))
    msg = _one_line(err)
    assert msg.startswith("judge: ") and "verdicts failed in this run" in msg and "more not sent" in msg
    assert "unparseable: no verdict in the reply" in msg and 'one answer: "I find both answers interesting."' in msg
    assert "judge.structured: false" in msg and "judge.max_tokens" in msg and "judge.model" in msg
    # Failure was certain after 13 of 240 (over 5%): those and the 4 in flight, each asked twice, nothing more.
    assert server.stats()["chat"] <= 2 * (13 + 4)


def test_failed_verdicts_stop_the_run_and_the_good_ones_are_kept_and_never_paid_again(server, tmp_path):
    server.faults = Faults(rate_always_unparseable=0.2)
    with pytest.raises(EnvironmentFailure) as err:
        _judge_flow(_contest(), _cfg(server, concurrency=4), ALL, None, str(tmp_path))
    _one_line(err)
    kept = cached_judgments(Store(str(tmp_path)), judge_label("judge-model"))
    assert 0 < len(kept) < 48 and kept["error"].isna().all()
    server.reset()
    server.faults = Faults()
    run = _judge_flow(_contest(), _cfg(server), ALL, None, str(tmp_path))
    assert server.stats()["chat"] == 48 - len(kept)  # only the failed and the unsent calls
    assert run.reused == len(kept) and run.judgments["error"].isna().all()


def test_server_that_dies_mid_run_stops_the_batch_and_a_rerun_sends_only_what_failed(server, tmp_path):
    server.faults = Faults(die_after=30)
    cfg = _cfg(server, concurrency=4, max_retries=1)
    with pytest.raises(EnvironmentFailure) as err:
        _judge_flow(_big_contest(), cfg, ALL, None, str(tmp_path))
    msg = _one_line(err)
    assert "api: connection error" in msg and "(after 1 retry)" in msg and "stopped answering" in msg
    assert "more not sent" in msg
    # 30 answered, then 13 failures (over 5% of 240) and the 4 in flight, each sent twice: not 210 more.
    assert server.stats()["chat"] <= 30 + 2 * (13 + 4)
    server.reset()
    server.faults = Faults()
    run = _judge_flow(_big_contest(), cfg, ALL, None, str(tmp_path))
    st = server.stats()
    assert st["chat"] == 240 - 30 and st["paid_twice"] == 0 and run.reused == 30
    assert len(run.judgments) == 240 and run.judgments["error"].isna().all()


def test_key_rejected_at_chat_sends_no_more_than_the_first_wave(server, tmp_path):
    server.faults = Faults(chat_401=True)  # /models accepts the key, chat does not
    with pytest.raises(UserError) as err:
        _judge_flow(_big_contest(), _cfg(server, concurrency=4), ALL, None, str(tmp_path))
    msg = _one_line(err)
    assert "rejected the API key" in msg and "401" in msg and f"${ENV}" in msg
    assert server.stats()["chat"] <= 4  # the calls already in flight on the 4 connections, none after


def test_a_400_is_that_calls_own_error_sent_once_with_the_servers_message(server, tmp_path):
    server.faults = Faults(rate_400=0.01)  # one prompt of 48 is too long for this server
    run = _judge_flow(_contest(), _cfg(server), ALL, None, str(tmp_path))
    bad = run.judgments[run.judgments["error"].notna()]
    assert list(bad["error"]) == ["api: 400: This model's maximum context length is 64 tokens; your messages are "
                                  "longer."]  # the server's own words, no retries claimed
    st = server.stats()
    assert st["chat"] == 48 == st["distinct_prompts"]  # no prompt sent twice (no structured-output fallback)
    ok = run.judgments[run.judgments["error"].isna()]
    assert ok["raw"].str.startswith("{").all()  # structured output still asked for on every other call


def test_many_400s_stop_the_run_without_claiming_retries(server, tmp_path):
    server.faults = Faults(rate_400=1.0)
    with pytest.raises(EnvironmentFailure) as err:
        _judge_flow(_contest(), _cfg(server, concurrency=4), ALL, None, str(tmp_path))
    msg = _one_line(err)
    assert "api: 400: This model's maximum context length" in msg and "retries" not in msg
    assert server.stats()["chat"] == server.stats()["distinct_prompts"] <= 3 + 4


def test_endpoint_that_rejects_response_format_gets_prose_requests(server, tmp_path):
    server.faults = Faults(reject_response_format=True)
    run = _judge_flow(_contest(), _cfg(server, concurrency=4), ALL, None, str(tmp_path))
    assert run.judgments["error"].isna().all()
    assert 48 < server.stats()["chat"] <= 48 + 4  # only the calls in flight at the first 400 were sent twice


# --------------------------------------------------------------------------------------- caps, budget


@pytest.mark.parametrize("budget", [BudgetConfig(strategy="all-pairs", max_comparisons=10),
                                    BudgetConfig(strategy="all-pairs", max_comparisons=11),
                                    BudgetConfig(warmup_per_pair=4, round_size=3, max_comparisons=17)])
def test_comparison_cap_counts_judgments_and_is_never_exceeded(server, tmp_path, budget):
    run = _judge_flow(_contest(), _cfg(server), budget, None, str(tmp_path))
    cap = budget.max_comparisons
    assert cap - 1 <= len(run.judgments) <= cap and server.stats()["chat"] <= cap  # both orders are 2 judgments
    assert run.stop_reason.startswith("comparison budget spent")


def test_cached_judgments_cost_nothing_and_new_spending_never_crosses_max_usd(server, tmp_path):
    price = ModelPrice(input=100.0, output=100.0)  # $0.1 per 1,000 tokens: a call costs ~$0.04
    contest = _contest()
    first = _judge_flow(contest, _cfg(server), ALL, price, str(tmp_path))
    assert first.new_cost_usd > 1.0  # 48 calls, every pair: far more than the cap below
    server.reset()
    bigger = Contest(contest.examples, {"d": {**contest.outputs["d"],
                                              "new": _outputs("new", [f"item {i} green" for i in range(8)])}})
    budget = BudgetConfig(warmup_per_pair=2, round_size=6, max_usd=0.5)
    run = _judge_flow(bigger, _cfg(server, concurrency=4), budget, price, str(tmp_path))
    st = server.stats()
    server_usd = (st["prompt_tokens"] + st["completion_tokens"]) * 100.0 / 1e6  # what the server counted
    assert 0.25 < run.new_cost_usd <= 0.5 and server_usd <= 0.5 + 1e-9
    assert run.reused > 0 and run.cost_usd > run.new_cost_usd  # the cached ones were used, at no cost now
    spent = float(re.search(r"\$([\d.]+) spent of \$0\.50", run.stop_reason).group(1))
    assert spent <= 0.5, run.stop_reason


# ------------------------------------------------------------------------------------------ preflight


def test_preflight_without_v1_in_base_url_says_so(server):
    base = server.base_url.removesuffix("/v1")
    with pytest.raises(UserError) as err:
        preflight(Endpoint("judge-model", base, ENV, max_retries=0, timeout_s=5.0), "judge")
    assert _one_line(err).endswith("answered 404 to /models and /chat/completions: does base_url end in /v1?")


def test_preflight_accepts_a_model_loaded_on_demand_and_names_one_that_is_not_there(server):
    server.faults = Faults(listed=[])  # lists nothing, answers chat for its models (it loads them on demand)
    preflight(Endpoint("judge-model", server.base_url, ENV, max_retries=0, timeout_s=5.0), "judge")
    assert server.stats()["chat"] == 1
    with pytest.raises(UserError) as err:
        preflight(Endpoint("gpt-17", server.base_url, ENV, max_retries=0, timeout_s=5.0), "judge")
    assert "model 'gpt-17' not found" in _one_line(err)


class _TextHandler(BaseHTTPRequestHandler):
    """A plain web server: text/plain to everything, except (with `models_json`) a JSON model list."""

    models_json = False

    def log_message(self, *args: object) -> None:
        """Quiet."""

    def _answer(self, body: bytes, kind: str) -> None:
        """A 200 with this body."""
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        """The page, or the model list."""
        if self.models_json and self.path.endswith("/models"):
            return self._answer(b'{"object": "list", "data": [{"id": "judge-model"}, {"id": "ref-model"}]}',
                                "application/json")
        return self._answer(b"It works! This is a web server.\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        """The page, whatever was posted."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._answer(b"It works! This is a web server.\n", "text/plain")


@pytest.fixture(params=[False, True], ids=["text-models", "json-models"])
def text_server(request, monkeypatch):
    """A plain-text web server on loopback (optionally with a JSON /models); always shut down."""
    monkeypatch.setenv(ENV, KEY)
    handler = type("Handler", (_TextHandler,), {"models_json": request.param})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", request.param
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_plain_text_server_fails_the_preflight_in_one_line(text_server):
    base, models_json = text_server
    with pytest.raises(UserError) as err:
        preflight(Endpoint("some-model", base, ENV, max_retries=0, timeout_s=5.0), "judge")
    msg = _one_line(err)
    route = "a test chat call" if models_json else "GET /models"
    assert f"answered {route} with \"It works!" in msg and "ends in /v1" in msg, msg


def test_plain_text_chat_stops_the_judge_and_a_reference_in_one_line(text_server, tmp_path):
    base, _ = text_server
    cfg = JudgeConfig(kind="openai", model="judge-model", base_url=base, api_key_env=ENV, concurrency=2)
    with pytest.raises(EnvironmentFailure) as err:
        _judge_flow(_contest(2), cfg, ALL, None, str(tmp_path))
    msg = _one_line(err)
    assert 'api: not a chat completion: the server answered "It works!' in msg and "judge.base_url" in msg

    ref = Reference(name="web", model="ref-model", base_url=base, api_key_env=ENV, max_retries=0)
    with pytest.raises(EnvironmentFailure) as err:
        _answer_reference(ref, str(tmp_path))
    msg = _one_line(err)
    assert msg.startswith("references[web] on dataset 'd': 2 of 2 answers failed") and "not a chat completion" in msg


@flow(name="reference-failure-test")
def _answer_reference(ref: Reference, store: str):
    """reference_outputs inside a flow, as the search calls it."""
    return reference_outputs(ref, "d", _examples(2), "test-fp", {}, store)
