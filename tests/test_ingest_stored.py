"""OpenAI stored completions as an ingest source, against the project's fake OpenAI-compatible server: the listing
filtered by model and metadata, paged (`after`/`has_more`) across several pages, each completion's messages paged
too, the time window, exact counts; the key read from an environment variable and never written anywhere."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from flows.ingest import main
from tasks.ingest.config import IngestConfig
from tasks.ingest.ingest import run_ingest
from tasks.ingest.stored import STORED
from tests.fake_openai import FakeOpenAI

KEY = "sk-stored-test-0123456789abcdef"  # the fake's key: must appear in no output, manifest, report or log
ENV = "BASESEARCH_TEST_STORED_KEY"
T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
N = 61  # completions stored
PAGE = 4  # page size asked for: 61 completions and 10-message conversations take several pages each


def completion(i: int) -> tuple[dict, list[dict]]:
    """The i-th stored completion and its request's messages (what a store=true request leaves on the server)."""
    model = "gpt-4o-mini-2024-07-18" if i % 5 == 0 else "gpt-4o-2024-08-06"
    messages: list[dict] = [{"role": "system", "content": "You are the support desk of Acme."}]
    if i % 10 == 7:  # a long thread: 10 input messages, three pages of 4
        for turn in range(4):
            messages += [{"role": "user", "content": f"Thread {i} question {turn} about order {1000 + i}?"},
                         {"role": "assistant", "content": f"Thread {i} reply {turn}."}]
    if i == 13:  # an image: refused, counted
        messages.append({"role": "user", "content": [{"type": "text", "text": "What is on this receipt?"},
                                                     {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]})
    elif i == 17:  # two text parts: joined
        messages.append({"role": "user", "content": [{"type": "text", "text": "Where is order 17?"},
                                                     {"type": "text", "text": "Write to me at jane.doe@example.com"}]})
    else:
        messages.append({"role": "user", "content": f"Where is my order number {5000 + i}, placed on day {i}?"})
    finish = "length" if i == 11 else "stop"
    return {"id": f"chatcmpl-{i:04d}", "object": "chat.completion", "created": int((T0 + timedelta(hours=i)).timestamp()),
            "model": model, "metadata": {"app": "sales" if i % 3 == 0 else "support", "thread": f"t{i}"},
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": f"Order {5000 + i} ships on day {i + 2}."}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}, messages


@pytest.fixture(scope="module")
def server():
    """The fake server holding N stored completions."""
    with FakeOpenAI(api_key=KEY) as srv:
        for i in range(N):
            srv.stored.add(*completion(i))
        yield srv


@pytest.fixture
def key(monkeypatch):
    """The key in its environment variable (as the judge reads its own)."""
    monkeypatch.setenv(ENV, KEY)


def config(srv: FakeOpenAI, out: Path, **extra) -> IngestConfig:
    """An ingest of the server's stored completions, paged by PAGE."""
    return IngestConfig(**{"source": STORED, "out": str(out), "base_url": srv.base_url, "api_key_env": ENV,
                           "page_size": PAGE, **extra})


def test_filtered_paged_listing_has_exact_counts(server, key, tmp_path):
    since, until = T0 + timedelta(hours=5), T0 + timedelta(hours=50)
    server.stored.pages.clear()
    logged: list[str] = []
    m = run_ingest(config(server, tmp_path / "out", models=("gpt-4o",), metadata={"app": "support"}, since=since,
                          until=until, group_by="metadata.thread"), log=logged.append)
    # the API's filters: gpt-4o and its snapshots (not gpt-4o-mini), app=support; oldest first
    listed = [i for i in range(N) if i % 5 and i % 3]
    upto = [i for i in listed if i < 50]  # the listing stops at the first completion at or after `until`
    fetched = [i for i in upto if i >= 5]  # the ones before `since` never cost a messages request
    msgs = {i: len(completion(i)[1]) for i in fetched}
    c = m["counts"]
    assert c["lines"] == len(upto) and c["unreadable"] == {}
    assert c["dropped"] == {"before since": len(upto) - len(fetched), "cut (length)": 1, "image": 1}
    assert c["kept_after_filters"] == len(fetched) - 2 and c["changed"] == {"text parts joined": 1}
    assert c["pii_found"] == {"EMAIL": 1} and c["exact_duplicates"] == 0 and c["rows"] == len(fetched) - 2
    api = m["source"]["api"]
    pages_listed = next(p // PAGE + 1 for p in range(0, len(listed), PAGE) if max(listed[p:p + PAGE]) >= 50)
    assert api["completions_listed"] == len(upto) and api["messages_fetched"] == len(fetched)
    assert api["list_pages"] == server.stored.pages["list"] == pages_listed
    assert api["message_pages"] == server.stored.pages["messages"] == sum(math.ceil(n / PAGE) for n in msgs.values())
    assert max(msgs.values()) == 10 and api["message_pages"] > len(fetched)  # long threads took 3 pages
    assert api["filters"] == {"model": "gpt-4o", "metadata": {"app": "support"}} and api["base_url"] == server.base_url
    rows = [json.loads(line) for side in ("train", "test") for line in (tmp_path / "out" / f"{side}.jsonl").open()]
    assert sorted(r["source_ids"][0] for r in rows) == sorted(f"chatcmpl-{i:04d}" for i in fetched if i not in (11, 13))
    parts = next(r for r in rows if r["source_ids"][0] == "chatcmpl-0017")
    assert parts["messages"][-2]["content"] == "Where is order 17?\nWrite to me at <EMAIL>"
    seven = next(r for r in rows if r["source_ids"][0] == "chatcmpl-0007")
    assert len(seven["messages"]) == 11 and seven["messages"][-1]["content"] == "Order 5007 ships on day 9."
    assert m["window"]["first"] == (T0 + timedelta(hours=fetched[0])).isoformat()
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir()) + "\n".join(logged)
    assert KEY not in written and ENV in (tmp_path / "out" / "ingest.json").read_text()


def test_the_listing_gives_the_same_bytes_twice(server, key, tmp_path):
    for name in ("a", "b"):
        run_ingest(config(server, tmp_path / name, metadata={"app": "support"}))
    for name in ("train.jsonl", "test.jsonl", "ingest.json", "ingest.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    m = json.loads((tmp_path / "a" / "ingest.json").read_text())
    support = [i for i in range(N) if i % 3]
    assert m["counts"]["lines"] == len(support) and m["source"]["api"]["list_pages"] == math.ceil(len(support) / PAGE)


def test_several_models_and_dotted_keys_are_checked_here(server, key, tmp_path):
    m = run_ingest(config(server, tmp_path / "out", models=("gpt-4o-mini", "gpt-4-0613"),
                          metadata={"app": "sales"}))
    assert m["source"]["api"]["filters"] == {"metadata": {"app": "sales"}}  # two models: none asked of the API
    sales = [i for i in range(N) if i % 3 == 0]
    mini = [i for i in sales if i % 5 == 0]
    assert m["counts"]["lines"] == len(sales) and m["counts"]["dropped"]["model"] == len(sales) - len(mini)
    assert m["source"]["api"]["messages_fetched"] == len(mini) == m["counts"]["rows"]


def test_store_true_requests_are_listed(key, tmp_path):
    from openai import OpenAI

    with FakeOpenAI(api_key=KEY) as srv:
        srv.faults.models = ["gpt-4o"]
        client = OpenAI(api_key=KEY, base_url=srv.base_url)
        for i in range(7):
            client.chat.completions.create(model="gpt-4o", store=True, metadata={"app": "faq"},
                                           messages=[{"role": "user", "content": f"Question {i} about shipping?"}])
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "not stored"}])
        m = run_ingest(config(srv, tmp_path / "out", page_size=3))
    assert m["counts"]["lines"] == 7 and m["counts"]["rows"] == 7 and m["source"]["api"]["list_pages"] == 3


def test_key_errors_are_one_line_naming_the_variable(server, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(ENV, raising=False)
    argv = [STORED, "--out", str(tmp_path / "out"), "--base-url", server.base_url, "--api-key-env", ENV]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"${ENV}" in err and "missing" in err and not (tmp_path / "out").exists()
    monkeypatch.setenv(ENV, "sk-wrong-key-000000000")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: ingest: {server.base_url} rejected the API key from ${ENV} (401)"
    assert "sk-wrong" not in err


def test_an_endpoint_without_stored_completions_is_one_line(key, monkeypatch, tmp_path, capsys):
    with FakeOpenAI(api_key=KEY) as srv:
        argv = [STORED, "--out", str(tmp_path / "out"), "--base-url", srv.base_url + "/nothing", "--api-key-env", ENV]
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "404 at GET /chat/completions" in err


def test_a_model_filter_takes_its_snapshots_not_its_namesakes():
    from tasks.ingest.filters import is_snapshot

    assert is_snapshot("gpt-4o-2024-08-06", "gpt-4o") and is_snapshot("gpt-4-0613", "gpt-4")
    assert not is_snapshot("gpt-4o-mini-2024-07-18", "gpt-4o") and not is_snapshot("gpt-4o-mini", "gpt-4o")
