"""The OpenAI client layer shared by the LLM judge and the references: endpoints, keys, the preflight, paced calls.

Calls run asynchronously under a concurrency cap and requests- and tokens-per-minute pacing; 429, 5xx, timeouts
and dropped connections are retried by the openai client itself (exponential backoff that honours Retry-After).
The API key is read where it is used, from the environment or a Prefect Secret block: it is never a parameter,
a log line, an error message or a stored value.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, TypeVar

from tasks.api.failures import Tally
from tasks.core.errors import UserError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from tasks.config.schema import ModelPrice

CHARS_PER_TOKEN = 3.0  # a cautious (high) token estimate for TPM pacing: English runs ~4 characters a token
MESSAGE_OVERHEAD_TOKENS = 8  # chat-template tokens around each message (OpenAI's format uses 3-4)
T = TypeVar("T")
# A 400/422 that is about structured output (the endpoint has none), not about this one request.
_ABOUT_STRUCTURED = re.compile(r"response.?format|json.?schema|structured.?output|guided", re.I)
_KEYLIKE = re.compile(r"\bsk-[\w*.-]{6,}")  # OpenAI echoes a masked key in some errors: never pass it on


@dataclass(frozen=True)
class Endpoint:
    """Where and how fast to call: everything but the key, which is read where it is used."""

    model: str
    base_url: str | None
    api_key_env: str
    api_key_secret: str | None = None
    concurrency: int = 16
    rpm: int | None = None
    tpm: int | None = None
    max_retries: int = 6
    timeout_s: float = 120.0

    @property
    def where(self) -> str:
        """The endpoint in messages."""
        return self.base_url or "https://api.openai.com/v1"


def endpoint_of(cfg: Any) -> Endpoint:
    """The Endpoint of a JudgeConfig or a Reference."""
    return Endpoint(cfg.model, cfg.base_url, cfg.api_key_env, cfg.api_key_secret, cfg.concurrency, cfg.rpm, cfg.tpm,
                    cfg.max_retries, cfg.timeout_s)


def resolve_api_key(env: str, secret: str | None, who: str) -> str:
    """The API key from the environment variable, else from the Prefect Secret block; UserError when neither has it."""
    import os

    key = os.environ.get(env)
    if key:
        return key
    if secret:
        try:
            from prefect.blocks.system import Secret

            value = Secret.load(secret).get()
        except Exception as e:  # noqa: BLE001 - any failure to read the block is the user's setup
            raise UserError(f"{who}: ${env} is not set and Prefect Secret block '{secret}' cannot be read "
                            f"({type(e).__name__})") from None
        if value:
            return str(value)
    where = (f" and Prefect Secret block '{secret}' is empty" if secret
             else " (or name a Prefect Secret block in api_key_secret)")
    raise UserError(f"{who}: the API key is missing: set ${env}{where}")


_SSL = threading.local()


def make_clients(ep: Endpoint, api_key: str) -> list[tuple[AsyncOpenAI, int]]:
    """AsyncOpenAI clients sharing the concurrency, with their connection counts: small pools of about 4.

    httpx's pool scans every connection and queued request on every request, so one pool of 64 costs ~1 ms of
    CPU per call; 16 pools of 4 cost a fraction of that. Retries (429/5xx/timeouts, Retry-After honoured) are
    the client's own.
    """
    import httpx2
    from openai import AsyncOpenAI

    if not hasattr(_SSL, "ctx"):  # building an SSL context takes ~40 ms: share one per thread
        _SSL.ctx = ssl.create_default_context()
    shards = max(1, math.ceil(ep.concurrency / 4))
    sizes = [ep.concurrency // shards + (1 if i < ep.concurrency % shards else 0) for i in range(shards)]
    timeout = httpx2.Timeout(ep.timeout_s, connect=min(10.0, ep.timeout_s))
    return [
        (AsyncOpenAI(api_key=api_key, base_url=ep.base_url, max_retries=ep.max_retries, timeout=timeout,
                     http_client=httpx2.AsyncClient(
                         verify=_SSL.ctx, timeout=timeout,
                         limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n))), n)
        for n in sizes
    ]


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine to completion from sync code, in a fresh thread when this one already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    th = threading.Thread(target=target)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def short(e: Exception, api_key: str = "") -> str:
    """An API error's own message (the server's words where it sent any), one line, at most 200 characters."""
    body = getattr(e, "body", None)
    msg: Any = None
    if isinstance(body, dict):  # OpenAI's {"message": ...}, FastAPI's {"detail": ...}
        msg = body.get("message") or body.get("detail") or body.get("error")
        msg = msg.get("message") if isinstance(msg, dict) else msg
    elif isinstance(body, str) and body.strip():  # a plain-text error page
        msg = body
    text = " ".join(str(msg or getattr(e, "message", None) or e or type(e).__name__).split())
    if api_key:
        text = text.replace(api_key, "***")
    return _KEYLIKE.sub("sk-***", text)[:200]


def snippet(value: Any, n: int = 80) -> str:
    """The first `n` characters of a reply, quoted and escaped so that it stays on one line."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text[:n] + ("..." if len(text) > n else ""))


# --------------------------------------------------------------------------------------- preflight

_PREFLIGHT_OK: set[tuple[str, str, str]] = set()


def preflight(ep: Endpoint, who: str) -> None:
    """Fail fast with one line on a wrong key (401), an unknown model, a wrong base_url or an unreachable endpoint.

    Lists the endpoint's models (GET /models: free, no tokens); a model it does not list gets one tiny chat call
    (servers that load models on demand list only the loaded ones). Checked once per process and endpoint.
    """
    key = resolve_api_key(ep.api_key_env, ep.api_key_secret, who)
    memo = (ep.where, ep.model, hashlib.sha256(key.encode()).hexdigest())
    if memo in _PREFLIGHT_OK:
        return
    run_async(_preflight(ep, key, who))
    _PREFLIGHT_OK.add(memo)


async def _preflight(ep: Endpoint, key: str, who: str) -> None:
    """The preflight calls themselves."""
    client = make_clients(Endpoint(ep.model, ep.base_url, "", concurrency=1, max_retries=1,
                                   timeout_s=ep.timeout_s), key)[0][0]
    try:
        ids = await _listed_models(client, ep, key, who)
        if ids is None or ep.model not in ids:
            await _test_chat(client, ep, key, who, ids)
    finally:
        await client.close()


def _status_line(e: Exception, ep: Endpoint, who: str, key: str, route: str) -> str | None:
    """The one line for a rejected key, a refused access or an unreachable endpoint; None for other errors."""
    import openai

    if isinstance(e, openai.AuthenticationError):
        return f"{who}: {ep.where} rejected the API key from ${ep.api_key_env} (401)"
    if isinstance(e, openai.PermissionDeniedError):
        return f"{who}: {ep.where} refused access with this API key (403: {short(e, key)})"
    if isinstance(e, openai.APITimeoutError):
        return f"{who}: {ep.where} did not answer {route} within {ep.timeout_s:g} s (raise timeout_s if it is slow)"
    if isinstance(e, openai.APIConnectionError):
        return f"{who}: cannot reach {ep.where} ({type(e.__cause__ or e).__name__})"
    return None


async def _listed_models(client: AsyncOpenAI, ep: Endpoint, key: str, who: str) -> list[str] | None:
    """The model ids GET /models lists, or None when the endpoint has no such route (404)."""
    import openai

    try:
        # cast_to=object: the reply as sent (a dict for JSON, a str for text) instead of a crash on a text page.
        page = await client.get("/models", cast_to=object, options={"timeout": min(ep.timeout_s, 20.0)})
    except openai.NotFoundError:
        return None
    except openai.APIError as e:
        line = _status_line(e, ep, who, key, "GET /models")
        if line is None:
            code = getattr(e, "status_code", "an error")
            line = f"{who}: {ep.where} answered {code} to GET /models: {short(e, key)}"
        raise UserError(line) from None
    if not isinstance(page, dict) or not isinstance(page.get("data"), list):
        raise UserError(f"{who}: {ep.where} answered GET /models with {snippet(page)}, not an OpenAI model list: "
                        "is base_url an OpenAI-compatible API (it usually ends in /v1)?")
    return [str(m.get("id")) for m in page["data"] if isinstance(m, dict)]


async def _test_chat(client: AsyncOpenAI, ep: Endpoint, key: str, who: str, ids: list[str] | None) -> None:
    """One tiny chat call (1 token) for a model that /models does not list; UserError unless it answers."""
    import openai

    shown = ", ".join((ids or [])[:8]) + (" ..." if ids and len(ids) > 8 else "")
    body = {"model": ep.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0}
    try:
        data = await client.post("/chat/completions", body=body, cast_to=object)
    except openai.NotFoundError:
        if ids is None:
            raise UserError(f"{who}: {ep.where} answered 404 to /models and /chat/completions: "
                            "does base_url end in /v1?") from None
        raise UserError(f"{who}: model '{ep.model}' not found at {ep.where} "
                        f"(404; it serves: {shown or 'none'})") from None
    except openai.APIError as e:
        line = _status_line(e, ep, who, key, "a test chat call")
        if line is None:
            listed = ("" if ids is None
                      else f"model '{ep.model}' is not among the models listed ({shown or 'none'}) and ")
            code = getattr(e, "status_code", "an error")
            line = f"{who}: {listed}a test chat call to {ep.where} answered {code}: {short(e, key)}"
        raise UserError(line) from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise UserError(f"{who}: {ep.where} answered a test chat call with {snippet(data)}, not a chat completion: "
                        "is base_url an OpenAI-compatible API (it usually ends in /v1)?")


# ------------------------------------------------------------------------------------------ pacing


class Pace:
    """Requests- or tokens-per-minute pacing: reservations spaced at the allowed rate, one second of burst."""

    def __init__(self, per_minute: float, burst_s: float = 1.0) -> None:
        """`per_minute` units (requests or tokens) a minute on average."""
        self.rate = per_minute / 60.0  # units per second
        self.burst_s = burst_s
        self.tat = time.monotonic()  # theoretical time at which all reservations so far are paid off

    async def take(self, units: float) -> None:
        """Wait until `units` more may be spent."""
        now = time.monotonic()
        start = max(self.tat, now)
        self.tat = start + units / self.rate
        wait = start - self.burst_s - now
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass
class Reply:
    """One chat completion's outcome (after the client's own retries)."""

    content: str | None = None
    refusal: str | None = None
    finish_reason: str | None = None  # "length": cut at max_tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    error: str | None = None  # set when no answer came back: "api: <status or kind>: <what happened>"
    skipped: bool = False  # not sent: the dollar budget would have been crossed
    halted: bool = False  # not sent: the endpoint had already failed (a rejected key, too many failures)


class _Halted(Exception):
    """The endpoint failed while this call waited: it is not sent."""


def max_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """An upper bound of a prompt's tokens: a token is at least one UTF-8 byte, plus the chat template's own."""
    return sum(len(m["content"].encode("utf-8")) + MESSAGE_OVERHEAD_TOKENS for m in messages) + MESSAGE_OVERHEAD_TOKENS


@dataclass
class Caller:
    """Async calls to one endpoint: concurrency cap, RPM/TPM pacing, dollar cap, failure stop, counts."""

    ep: Endpoint
    api_key: str = field(repr=False)
    price: ModelPrice | None = None
    usd_left: float | None = None  # None: no dollar cap
    tally: Tally = field(default_factory=Tally)  # this run's outcomes: too many failures stop further sends
    requests: int = 0
    spent_usd: float = 0.0
    reserved_usd: float = 0.0  # highest cost of the calls in flight
    reservations: int = 0  # calls in flight holding a reservation
    structured: bool = True
    fatal: str | None = None  # a 401/403/404 seen: the rest is not sent

    def __post_init__(self) -> None:
        """Clients, their connection slots and pacers."""
        pool = make_clients(self.ep, self.api_key)
        self.clients = [c for c, _ in pool]
        # One slot per connection, the clients interleaved: taking a slot is the concurrency cap, and no
        # request ever waits in one pool's queue while another pool has a free connection.
        self.slots: asyncio.Queue[AsyncOpenAI] = asyncio.Queue()
        for k in range(max(n for _, n in pool)):
            for c, n in pool:
                if k < n:
                    self.slots.put_nowait(c)
        self.rpm = Pace(self.ep.rpm) if self.ep.rpm else None
        self.tpm = Pace(self.ep.tpm) if self.ep.tpm else None
        self.budget = asyncio.Condition()  # wakes calls waiting for reservations of calls in flight to settle

    @property
    def halt(self) -> str | None:
        """Why nothing more is sent (a rejected key, too many failures), or None."""
        if self.fatal:
            return self.fatal
        return "not sent: the endpoint already failed too often in this run" if self.tally.tripped else None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """US dollars for the tokens at the configured price (0 without one)."""
        if self.price is None:
            return 0.0
        return (prompt_tokens * self.price.input + completion_tokens * self.price.output) / 1e6

    async def close(self) -> None:
        """Close every connection pool."""
        await asyncio.gather(*(c.close() for c in self.clients))

    async def complete(self, messages: list[dict[str, str]], max_tokens: int,
                       response_format: dict[str, Any] | None = None) -> Reply:
        """One chat completion at temperature 0, or a Reply with `error`, `skipped` or `halted` set."""
        if self.halt:
            return Reply(error=self.halt, halted=True)
        chars = sum(len(m["content"]) for m in messages)
        est_tokens = chars / CHARS_PER_TOKEN + max_tokens  # for pacing: the reply is at most max_tokens
        max_usd = self.cost(max_prompt_tokens(messages), max_tokens)  # what the call can cost at most
        client = await self.slots.get()
        try:
            if self.halt:  # checked again: a 401 may have come back while this call waited for a slot
                return Reply(error=self.halt, halted=True)
            if not await self._reserve(max_usd):
                return Reply(skipped=True)  # even alone, the call could cross the budget: it is not sent
            try:
                if self.rpm:
                    await self.rpm.take(1)
                if self.tpm:
                    await self.tpm.take(est_tokens)
                return await self._call(client, messages, max_tokens, response_format)
            finally:
                await self._release(max_usd)
        finally:
            self.slots.put_nowait(client)

    async def _reserve(self, usd: float) -> bool:
        """Reserve a call's highest cost under the dollar cap, waiting for calls in flight; False if it cannot fit."""
        if self.usd_left is None:
            return True
        async with self.budget:
            while True:
                if self.spent_usd + usd > self.usd_left:
                    return False
                # With no reservation held, fits: float dust left in reserved_usd must never make a call wait forever.
                if not self.reservations or self.spent_usd + self.reserved_usd + usd <= self.usd_left:
                    self.reserved_usd += usd
                    self.reservations += 1
                    return True
                await self.budget.wait()  # calls in flight usually cost less than reserved: see what is left

    async def _release(self, usd: float) -> None:
        """Give back a reservation (the real cost is in spent_usd by now)."""
        if self.usd_left is None:
            return
        async with self.budget:
            self.reserved_usd -= usd
            self.reservations -= 1
            self.budget.notify_all()

    def _retried(self, status: int | None) -> str:
        """' (after N retries)' where the openai client retries this failure (connection, 408, 409, 429, 5xx)."""
        if self.ep.max_retries and (status is None or status in (408, 409, 429) or status >= 500):
            n = self.ep.max_retries
            return f" (after {n} {'retry' if n == 1 else 'retries'})"
        return ""

    async def _call(self, client: AsyncOpenAI, messages: list[dict[str, str]], max_tokens: int,
                    response_format: dict[str, Any] | None) -> Reply:
        """Send one request (after a last look at `halt`) and turn every failure into a Reply's error line."""
        import openai

        body: dict[str, Any] = {"model": self.ep.model, "messages": messages, "temperature": 0,
                                "max_tokens": max_tokens}
        if response_format and self.structured:
            body["response_format"] = response_format
        t0 = time.perf_counter()
        try:
            data = await self._post(client, body)
        except _Halted:
            return Reply(error=self.halt, halted=True)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            self.fatal = f"api: {e.status_code}: {short(e, self.api_key)}"
            return Reply(error=self.fatal)
        except openai.APIStatusError as e:
            return Reply(error=f"api: {e.status_code}: {short(e, self.api_key)}{self._retried(e.status_code)}")
        except openai.APITimeoutError:
            return Reply(error=f"api: timeout: no answer within {self.ep.timeout_s:g} s{self._retried(None)}")
        except openai.APIConnectionError as e:
            return Reply(error=f"api: connection error: {type(e.__cause__ or e).__name__}{self._retried(None)}")
        return self._reply(data, time.perf_counter() - t0)

    async def _post(self, client: AsyncOpenAI, body: dict[str, Any]) -> Any:
        """POST /chat/completions; once without response_format when a 400/422 says the endpoint has none."""
        import openai

        if self.halt:  # the last look before a send
            raise _Halted
        self.requests += 1
        try:
            # post() rather than chat.completions.create(): the same retries and errors, without re-validating a
            # body built here (~0.5 ms of CPU a call at 600 calls/s).
            return await client.post("/chat/completions", body=body, cast_to=dict)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
            if "response_format" not in body or not _ABOUT_STRUCTURED.search(short(e)):
                raise  # a 400 about this request: its own error, with the server's message
        self.structured = False  # an endpoint without structured output: the fallback parser reads prose
        body = {k: v for k, v in body.items() if k != "response_format"}
        if self.halt:
            raise _Halted
        self.requests += 1
        return await client.post("/chat/completions", body=body, cast_to=dict)

    def _reply(self, data: Any, latency: float) -> Reply:
        """A Reply from a chat completion's JSON (its cost added to what was spent), or its error when it is none."""
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            # e.g. a text/plain page: the openai client hands back the text itself
            return Reply(error=f"api: not a chat completion: the server answered {snippet(data)}", latency_s=latency)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cost = self.cost(pt, ct)
        self.spent_usd += cost
        choice = data["choices"][0] if data["choices"] and isinstance(data["choices"][0], dict) else {}
        msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = msg.get("content")
        return Reply(content=content if isinstance(content, str) else None, refusal=msg.get("refusal"),
                     finish_reason=choice.get("finish_reason"), prompt_tokens=pt, completion_tokens=ct,
                     cost_usd=cost, latency_s=latency)
