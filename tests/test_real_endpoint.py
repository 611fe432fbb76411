"""A real OpenAI-compatible server: `transformers serve` on loopback, serving tiny random models built on the fly.

A random model answers garbage prose: exactly a judge that never gives a verdict. The run must stop with one
line and rank nothing; the preflight must take a model the server loads on demand (listed only once loaded).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402
import yaml  # noqa: E402

from tasks.api.client import Endpoint, preflight  # noqa: E402
from tasks.config.schema import JudgeConfig, Reference  # noqa: E402
from tasks.core.errors import EnvironmentFailure, UserError  # noqa: E402
from tasks.judge.llm import cached_judgments  # noqa: E402
from tasks.judge.prompt import judge_label  # noqa: E402
from tasks.store.store import Store  # noqa: E402
from tests.conftest import make_tiny_model, mini_config_dict  # noqa: E402
from tests.fake_openai import free_port  # noqa: E402
from tests.prefect_server import wait_while_running  # noqa: E402
from tests.test_endpoint_failures import _answer_reference, _one_line  # noqa: E402
from tests.test_llm_judge import ALL, ENV, KEY, _contest, _judge_flow  # noqa: E402

pytest.importorskip("fastapi", reason="transformers serve needs fastapi: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="transformers serve needs uvicorn: pip install -e '.[test]'")

STARTUP_TIMEOUT_S = 600  # seconds: ~10 s when idle, minutes on a 2-core machine at load 15 (never a library default)


class RealServer:
    """`transformers serve` in its own process group on 127.0.0.1, and the tiny models it may load."""

    def __init__(self, root: Path) -> None:
        """Build two tiny models (one for the judge, one only ever loaded by the preflight); start the server."""
        from tasks.demo.zoo import build_tokenizer

        tok = build_tokenizer()
        # The judge's prompt is ~840 tokens: transformers serve (5.25) refuses a prompt longer than the model's
        # max_position_embeddings (256 in TINY_SHAPE) with a 400 before the model ever answers.
        self.judge_model = str(make_tiny_model(root / "judge", 0, tok, max_position_embeddings=2048))
        self.unlisted_model = str(make_tiny_model(root / "unlisted", 1, tok))
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = root / "serve.log"
        exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                          "--device", "cpu", "--log-level", "warning"],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self) -> None:
        """Poll /health until it answers; fail with the server's log if it exits or takes too long."""
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_while_running(self.proc, self.log, healthy, STARTUP_TIMEOUT_S, "transformers serve to answer /health",
                           poll_s=0.5)

    def listed(self) -> list[str]:
        """The model ids GET /v1/models shows now."""
        import json

        with urllib.request.urlopen(f"{self.base_url}/models", timeout=30) as r:
            return [m["id"] for m in json.load(r)["data"]]

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after 15 s."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """A running `transformers serve`, stopped (its process group killed) whatever the tests do."""
    srv = RealServer(tmp_path_factory.mktemp("serve"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def key(monkeypatch):
    """The judge's key in the environment (the server ignores it)."""
    monkeypatch.setenv(ENV, KEY)


def test_preflight_takes_a_model_the_server_loads_on_demand(real_server, key):
    assert real_server.unlisted_model not in real_server.listed()
    preflight(Endpoint(real_server.unlisted_model, real_server.base_url, ENV, max_retries=1, timeout_s=300.0), "judge")
    assert real_server.unlisted_model in real_server.listed()  # the test call loaded it


def test_preflight_of_a_model_the_server_cannot_load_is_one_line(real_server, key):
    # max_retries=1, as a user's judge has at least: once in a CI run on a loaded machine the server dropped the
    # connection right after loading a model on demand (the test before), and the preflight said "cannot reach"
    with pytest.raises(UserError) as err:
        preflight(Endpoint("no-such-org/no-such-model", real_server.base_url, ENV, max_retries=1, timeout_s=300.0),
                  "judge")
    msg = _one_line(err)
    assert msg.startswith("judge: model 'no-such-org/no-such-model' is not among the models listed"), msg
    assert "a test chat call to" in msg and "answered" in msg


def _real_judge(srv: RealServer, **kw) -> JudgeConfig:
    """The tiny random model as the judge: 16 tokens a reply, generous timeouts for a loaded CPU."""
    return JudgeConfig(kind="openai", model=srv.judge_model, base_url=srv.base_url, api_key_env=ENV, max_tokens=16,
                       concurrency=2, max_retries=1, timeout_s=300.0, **kw)


def test_judge_that_answers_garbage_stops_in_one_line_and_keeps_no_verdict(real_server, key, tmp_path):
    with pytest.raises(EnvironmentFailure) as err:
        _judge_flow(_contest(4), _real_judge(real_server), ALL, None, str(tmp_path))
    msg = _one_line(err)
    assert msg.startswith("judge: ") and "verdicts failed in this run" in msg and "one answer: " in msg
    assert "unparseable (cut at max_tokens)" in msg and "raise judge.max_tokens (now 16)" in msg
    assert "more not sent" in msg  # stopped once failure was certain, not after all 24 calls
    assert len(cached_judgments(Store(str(tmp_path)), judge_label(real_server.judge_model))) == 0


def test_reference_on_the_real_server_answers_every_row(real_server, key, tmp_path):
    ref = Reference(name="tiny", model=real_server.judge_model, base_url=real_server.base_url, api_key_env=ENV,
                    max_tokens=8, concurrency=2, max_retries=1, timeout_s=300.0)
    (rel, _), reused, requests, _ = _answer_reference(ref, str(tmp_path))
    out = Store(str(tmp_path)).read_parquet(rel)
    assert not reused and requests == 2 and out["error"].isna().all() and (out["completion_tokens"] > 0).all()


def test_search_with_a_garbage_judge_exits_in_one_line_without_a_ranking(real_server, key, tmp_path, tiny_models,
                                                                          tiny_data, capsys):
    from flows.cli import main

    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg.update(merges=[], datasets=cfg["datasets"][:1])
    cfg["finetune"]["max_steps"] = 1
    judge = _real_judge(real_server).model_dump(exclude_defaults=True)
    cfg["judge"] = judge | {"kind": "openai"}
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["--config", str(config), "--store", str(tmp_path / "store")]) == 1
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "verdicts failed in this run" in errors[0], out.err[-3000:]
    assert "Traceback" not in out.err and "report:" not in out.out
    assert not (tmp_path / "store" / "runs" / "LATEST").exists()
