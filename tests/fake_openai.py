"""A real chat-completions server on loopback, with configurable latency and faults, for tests and benchmarks.

In a test:      with FakeOpenAI(api_key="sk-test") as srv: ...srv.base_url..., srv.stats()
Out of process: python -m tests.fake_openai --latency 0.1   (prints `PORT <n>`; GET /_stats, POST /_faults, POST /_reset)

Judge prompts (those with the judge's fenced ANSWER A / ANSWER B blocks) get a deterministic verdict: the answer
with more word overlap with the reference wins (strongly when the gap is large); without a reference, the one
whose text hashes lower (`coin_flip`: a coin drawn per prompt and attempt instead). Other prompts (references'
test rows) get a deterministic answer; a request with `store: true` is kept as a stored completion, listed and
paged as OpenAI's API does (tests/fake_stored.py). Faults are decided per prompt from a hash of its body, on the first attempt
only (transient) unless marked permanent, so a client that retries always ends with a verdict. Only 127.0.0.1 is
ever bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fake_stored import StoredCompletions

HOST = "127.0.0.1"  # loopback only, never any other address
FENCE = re.compile(r"<<<(ANSWER A|ANSWER B|REFERENCE) ([0-9a-f]+)>>>\n(.*?)\n<<<END \1 \2>>>", re.S)


@dataclass
class Faults:
    """What the server does wrong, as shares of distinct prompts (0..1, disjoint, checked in this order)."""

    latency_s: float = 0.0  # seconds every answer takes
    rate_429: float = 0.0  # first attempt: 429 with Retry-After
    retry_after_s: float = 0.05  # Retry-After sent with a 429, seconds
    rate_500: float = 0.0  # first attempt: 500
    rate_timeout: float = 0.0  # first attempt: no answer for `hang_s`, then the connection is dropped
    hang_s: float = 1.0
    rate_unparseable: float = 0.0  # first attempt: a reply with no verdict in it
    rate_refusal: float = 0.0  # first attempt: a refusal (content null, refusal set)
    rate_always_unparseable: float = 0.0  # every attempt: no verdict (a permanent failure)
    ignore_response_format: bool = False  # answer in prose, as endpoints without structured output do
    prefer_first: bool = False  # a position-biased judge: always "A>B"
    coin_flip: bool = False  # a judge that answers at random: A>B or B>A by a coin drawn per prompt and attempt
    rate_400: float = 0.0  # every attempt: 400 with a context-length message (a request the server cannot take)
    reject_response_format: bool = False  # 400 "response_format is not supported" to a request that has one
    chat_401: bool = False  # chat rejects every key (GET /models still accepts it)
    die_after: int | None = None  # after this many chat requests, every connection is dropped without an answer
    models: list[str] = field(default_factory=lambda: ["judge-model", "ref-model"])  # others: 404
    listed: list[str] | None = None  # what GET /models shows (None: `models`); an on-demand server lists fewer


@dataclass
class Stats:
    """Counts of everything the server saw (guarded by the server's lock)."""

    requests: int = 0  # every HTTP request, any path
    chat: int = 0  # POST /v1/chat/completions
    models: int = 0  # GET /v1/models
    status: Counter = field(default_factory=Counter)  # HTTP status -> count
    attempts: Counter = field(default_factory=Counter)  # prompt hash -> chat requests
    paid: Counter = field(default_factory=Counter)  # prompt hash -> 200 answers that carried a usable result
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _unit(text: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) from text."""
    return int(hashlib.sha256((salt + text).encode()).hexdigest()[:12], 16) / 16**12


def _words(text: str) -> set[str]:
    """Lower-cased word set."""
    return set(re.findall(r"\w+", text.lower()))


def _overlap(answer: str, reference: str) -> float:
    """Word-set F1 of an answer against the reference (0..1)."""
    a, r = _words(answer), _words(reference)
    if not a or not r:
        return 0.0
    common = len(a & r)
    return 0.0 if common == 0 else 2 * common / (len(a) + len(r))


def decide(prompt: str, prefer_first: bool = False) -> str | None:
    """The five-point verdict on a judge prompt, or None when the prompt is not a judge prompt."""
    blocks = {name: text for name, _, text in FENCE.findall(prompt)}
    if "ANSWER A" not in blocks or "ANSWER B" not in blocks:
        return None
    if prefer_first:
        return "A>B"
    a, b = blocks["ANSWER A"], blocks["ANSWER B"]
    if a == b:
        return "A=B"
    ref = blocks.get("REFERENCE")
    if ref is not None:
        sa, sb = _overlap(a, ref), _overlap(b, ref)
    else:  # no reference: an arbitrary but position-independent preference
        sa, sb = -_unit(a), -_unit(b)
    if sa == sb:
        return "A=B"
    gap = abs(sa - sb)
    if sa > sb:
        return "A>>B" if gap >= 0.5 else "A>B"
    return "B>>A" if gap >= 0.5 else "B>A"


def answer(model: str, messages: list[dict[str, Any]]) -> str:
    """A deterministic answer to a plain (non-judge) conversation."""
    last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    return f"{model} answers: {last[:60]}"


class FakeOpenAI:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) speaking /v1/chat/completions, /v1/models and the stored
    completions' listing (GET /v1/chat/completions, GET /v1/chat/completions/{id}/messages)."""

    def __init__(self, api_key: str | None = "sk-test", faults: Faults | None = None, port: int = 0) -> None:
        """Bind (not yet serve) on loopback; `api_key` None accepts any key."""
        self.api_key = api_key
        self.faults = faults or Faults()
        self.lock = threading.Lock()
        self._stats = Stats()
        self.stored = StoredCompletions()  # `store: true` requests, and what a test seeds with stored.add
        server = self

        class Handler(_Handler):
            owner = server

        self.httpd = _Server((HOST, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The endpoint to give the openai client."""
        return f"http://{HOST}:{self.port}/v1"

    def start(self) -> "FakeOpenAI":
        """Serve in a daemon thread."""
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Zero every count."""
        with self.lock:
            self._stats = Stats()

    def stats(self) -> dict[str, Any]:
        """A JSON-able copy of the counts, with `paid_twice`: prompts answered usefully more than once."""
        with self.lock:
            s = self._stats
            return {
                "requests": s.requests, "chat": s.chat, "models": s.models, "status": dict(s.status),
                "distinct_prompts": len(s.attempts), "paid": sum(s.paid.values()),
                "paid_twice": sum(1 for v in s.paid.values() if v > 1),
                "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            }


class _Server(ThreadingHTTPServer):
    """A thread per connection, with a listen backlog deep enough for 64+ clients connecting at once."""

    daemon_threads = True
    request_queue_size = 512


class _Handler(BaseHTTPRequestHandler):
    """One connection (HTTP/1.1 keep-alive): routes to the chat, models and control endpoints."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: without this, +40 ms per answer
    owner: FakeOpenAI

    def log_message(self, *args: Any) -> None:
        """Quiet: no access log."""

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """Write a JSON response (statuses are counted for the API routes, not the control ones)."""
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        if self.path.startswith("/v1/"):
            with self.owner.lock:
                self.owner._stats.status[status] += 1

    def _error(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        """An OpenAI-style error body."""
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}, headers)

    def _authorized(self) -> bool:
        """Check the bearer key; answer 401 when it is wrong."""
        want = self.owner.api_key
        if want is None or self.headers.get("Authorization") == f"Bearer {want}":
            return True
        self._error(401, "Incorrect API key provided.", "invalid_api_key")
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        """GET /v1/models, the stored completions' lists and /_stats."""
        with self.owner.lock:
            self.owner._stats.requests += 1
        if self.path == "/_stats":
            return self._send(200, self.owner.stats())
        if self.owner.stored.route(self.path):
            if self._authorized():
                self._send(*self.owner.stored.answer(self.path))
            return None
        if self.path.rstrip("/") == "/v1/models":
            with self.owner.lock:
                self.owner._stats.models += 1
            if self._authorized():
                f = self.owner.faults
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                        for m in (f.models if f.listed is None else f.listed)]
                self._send(200, {"object": "list", "data": data})
            return None
        return self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        """POST /v1/chat/completions, /_faults (JSON fields of Faults) and /_reset."""
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.owner.lock:
            self.owner._stats.requests += 1
        if self.path == "/_faults":
            known = {f.name for f in fields(Faults)}
            self.owner.faults = Faults(**{k: v for k, v in json.loads(body).items() if k in known})
            return self._send(200, asdict(self.owner.faults))
        if self.path == "/_reset":
            self.owner.reset()
            return self._send(200, {})
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "not_found")
        return self._chat(body)

    def _chat(self, body: bytes) -> None:
        """Answer one chat completion, faults included."""
        f = self.owner.faults
        req = json.loads(body)
        messages = req.get("messages") or []
        text = "\n".join(str(m.get("content") or "") for m in messages)
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        with self.owner.lock:
            st = self.owner._stats
            st.chat += 1
            st.attempts[key] += 1
            attempt = st.attempts[key]
            dead = f.die_after is not None and st.chat > f.die_after
        if dead:
            self.close_connection = True  # a dead server: the connection drops, nothing is answered
            return None
        if f.chat_401:
            return self._error(401, "Incorrect API key provided.", "invalid_api_key")
        if not self._authorized():
            return None
        model = req.get("model")
        if model not in f.models:
            return self._error(404, f"The model `{model}` does not exist or you do not have access to it.",
                               "model_not_found")
        time.sleep(f.latency_s)
        if f.reject_response_format and req.get("response_format"):
            return self._error(400, "response_format json_schema is not supported by this model.", "invalid_request")
        if _unit(text, "400") < f.rate_400:
            return self._error(400, "This model's maximum context length is 64 tokens; your messages are longer.",
                               "context_length_exceeded")
        u = _unit(text, "fault")
        fault = None
        if attempt == 1:
            edges = [("429", f.rate_429), ("500", f.rate_500), ("timeout", f.rate_timeout),
                     ("unparseable", f.rate_unparseable), ("refusal", f.rate_refusal)]
            low = 0.0
            for name, share in edges:
                if low <= u < low + share:
                    fault = name
                    break
                low += share
        if _unit(text, "permanent") < f.rate_always_unparseable:
            fault = "unparseable"
        if fault == "429":
            return self._error(429, "Rate limit reached.", "rate_limit_exceeded", {"Retry-After": str(f.retry_after_s)})
        if fault == "500":
            return self._error(500, "The server had an error.", "server_error")
        if fault == "timeout":
            time.sleep(f.hang_s)
            self.close_connection = True  # drop the connection without an answer
            return None

        verdict = decide(text, f.prefer_first)
        if f.coin_flip and verdict is not None:  # the n-th asking of a prompt draws its own coin: repeatable runs
            verdict = "A>B" if _unit(text, f"coin{attempt}") < 0.5 else "B>A"
        refusal = None
        if fault == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that."
        elif fault == "unparseable":
            content = "I find both answers interesting."
        elif verdict is None:
            content = answer(str(model), messages)
        elif f.ignore_response_format or not req.get("response_format"):
            content = f"Both were read with care. Final verdict: [[{verdict}]]"
        else:
            content = json.dumps({"verdict": verdict, "reason": "closer to the reference"})
        usage = {"prompt_tokens": max(1, len(text) // 4), "completion_tokens": max(1, len(content or refusal) // 4)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with self.owner.lock:
            st = self.owner._stats
            st.prompt_tokens += usage["prompt_tokens"]
            st.completion_tokens += usage["completion_tokens"]
            if fault is None:
                st.paid[key] += 1
        completion = {
            "id": f"chatcmpl-{key}-{attempt}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}],
        }
        if req.get("store"):
            self.owner.stored.add({**completion, "metadata": req.get("metadata") or {}}, messages)
        self._send(200, completion)
        return None


def free_port() -> int:
    """A free TCP port on loopback (for callers that need one before binding)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def main() -> None:
    """Serve out of process (for the benchmark): prints `PORT <n>` once listening."""
    p = argparse.ArgumentParser(description="fake OpenAI chat-completions server on 127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--api-key", default="sk-test")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = p.parse_args()
    srv = FakeOpenAI(args.api_key, Faults(latency_s=args.latency), args.port)
    print(f"PORT {srv.port}", flush=True)
    srv.httpd.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
