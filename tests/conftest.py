"""Shared fixtures: an offline, quiet environment and tiny models and datasets built on the fly (no downloads)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Set before Prefect or Hugging Face is imported anywhere in the test session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# pytest-xdist's workers (README: the tests run on every core) inherit the controller's environment: each gets a
# Prefect home (so its own temporary server and SQLite database) and a store cache of its own.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"prefect-home-{_WORKER}-")
    os.environ["BASESEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"basesearch-cache-{_WORKER}-")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
# A remote store's local copies (tasks/store/cache.py) go to a temp folder, not the user's ~/.cache.
os.environ.setdefault("BASESEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="basesearch-cache-"))
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# A loaded machine starts Prefect's temporary server in 22-34 s, past Prefect's default of 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")

import json  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from tasks.demo.data import make_split  # noqa: E402

TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session", autouse=True)
def stop_temporary_servers():
    """Stop Prefect's temporary server of in-process flows when the session ends, also after a failed test."""
    yield
    import sys

    if "flows.cli" in sys.modules:
        sys.modules["flows.cli"].stop_temporary_server()


class _TestStderr:
    """Whatever sys.stderr is when written to: this test's capture, not the one of the test that was running when a
    handler was made."""

    def __getattr__(self, name: str):
        """Every attribute of the stream of the moment (write, flush, isatty, encoding...)."""
        import sys

        return getattr(sys.stderr, name)


@pytest.fixture(autouse=True)
def prefect_console_on_the_current_stderr():
    """Point Prefect's console handlers at the stderr of the moment. They keep the stream they were made with, and
    Prefect makes them again when its settings change: under pytest that can be an earlier test's `capsys` capture,
    closed since, so a later test's output got `--- Logging error --- ValueError: I/O operation on closed file`
    tracebacks (from the temporary server's start and stop lines) that a user's terminal never shows."""
    import logging
    import sys

    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import PrefectConsoleHandler

        loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger))]
        for handler in (h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)):
            handler.stream = handler.console.file = _TestStderr()
    yield


def make_tiny_model(folder: Path, seed: int, tokenizer=None, **shape) -> Path:
    """Save a randomly initialised tiny Mistral with the zoo's tokenizer (or the one given) in `folder`."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from tasks.demo.zoo import build_tokenizer

    tok = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, sliding_window=None,
                        **(TINY_SHAPE | shape))
    MistralForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSONL."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random Mistral models sharing one tokenizer: {'alpha': dir, 'beta': dir}."""
    from tasks.demo.zoo import build_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer()
    return {name: make_tiny_model(root / name, seed, tok) for seed, name in enumerate(["alpha", "beta"])}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Small demo datasets: name -> (train.jsonl, test.jsonl), 16 train and 6 test rows each."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for task in ("extraction", "classification", "orders"):
        train, test = make_split(task, 16, 6)  # no test prompt in training: the leak check passes
        out[task] = (write_jsonl(root / f"{task}_train.jsonl", train), write_jsonl(root / f"{task}_test.jsonl", test))
    return out


def mini_config_dict(tiny_models: dict[str, Path], tiny_data: dict[str, tuple[Path, Path]]) -> dict:
    """A miniature search: two models, one merge, two datasets, a held-out one; a few training steps."""
    ds = lambda name: {"name": name, "train": str(tiny_data[name][0]), "test": str(tiny_data[name][1])}  # noqa: E731
    return {
        "name": "mini",
        "candidates": [{"name": n, "path": str(p)} for n, p in tiny_models.items()],
        "merges": [{"name": "alpha-beta", "recipe": {"merge_method": "slerp", "base_model": "alpha",
                                                      "models": [{"model": "alpha"}, {"model": "beta"}],
                                                      "parameters": {"t": 0.5}, "dtype": "float32"}}],
        "datasets": [ds("extraction"), ds("classification")],
        "validation": {"dataset": ds("orders"), "baselines": ["alpha"]},
        "finetune": {"max_steps": 3, "batch_size": 4, "learning_rate": 0.003, "max_length": 128},
        "generate": {"max_new_tokens": 8, "batch_size": 8},
        "rating": {"bootstrap_rounds": 50},
        "budget": {"strategy": "all-pairs"},
    }


def one_dataset_config_dict(tiny_models: dict[str, Path], tiny_data: dict[str, tuple[Path, Path]]) -> dict:
    """The miniature search cut to one dataset and no held-out check: 3 models + teacher, the quickest full search."""
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["datasets"] = cfg["datasets"][:1]
    cfg.pop("validation")
    return cfg


@pytest.fixture()
def mini_config(tmp_path, tiny_models, tiny_data) -> Path:
    """Path of a miniature search config YAML in a fresh folder."""
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(mini_config_dict(tiny_models, tiny_data), sort_keys=False))
    return path


def write_config(tmp_path: Path, cfg: dict) -> Path:
    """Write a config dict as YAML (tmp_path/search.yaml) and return its path."""
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def config_error(path: Path) -> str:
    """The one-line UserError that loading and checking the config at `path` raises."""
    from tasks.config.schema import load_config
    from tasks.core.errors import UserError
    from tasks.plan.prepare import prepare

    with pytest.raises(UserError) as info:
        prepare(load_config(path))
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str | Callable[[], str],
             poll_s: float = 0.05) -> None:
    """Poll `condition` until it holds; after `timeout_s`, AssertionError naming `what` (a text, or a function
    giving one, e.g. with a log's tail). The condition may itself fail at once, e.g. when a process it waits on died."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for "
                                 f"{what if isinstance(what, str) else what()}")
        time.sleep(poll_s)


@pytest.fixture()
def server(request, monkeypatch):
    """A fake OpenAI-compatible endpoint (tests/fake_openai.py) on loopback that wants the test module's KEY, with
    that key in the environment variable its ENV names; shut down after the test."""
    from tests.fake_openai import FakeOpenAI

    key, env = request.module.KEY, request.module.ENV
    monkeypatch.setenv(env, key)
    with FakeOpenAI(key) as srv:
        yield srv


# The longest test files, longest first (seconds under pytest-xdist at load 5-9 on 2 cores, 2026-12-07): run first,
# so that no long file starts last while the other worker sits idle (each file stays on one worker, --dist loadfile).
LONG_FILES = ("test_export_vllm.py",  # ~470 s: three real vLLM servers
              "test_prefect_server.py",  # ~370 s: a Prefect server, process workers, a pool run
              "test_benches.py",  # ~300 s
              "test_pool_s3.py",  # ~230 s: two pool workers sharing only an S3 bucket
              "test_rerun_shipped.py",  # ~220 s
              "test_generate_vllm.py",  # ~200 s: a real vLLM engine
              "test_resume.py", "test_shared_store.py", "test_llm_judge.py", "test_families.py", "test_cli.py",
              "test_interrupt.py", "test_finetune_resume.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    """Long files first, the rest in their usual order (a stable sort keeps each file's tests in order)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
