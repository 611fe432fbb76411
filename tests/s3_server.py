"""A real S3 API on this machine for tests: moto in server mode on 127.0.0.1, reached through s3fs exactly as AWS is
(the endpoint from $AWS_ENDPOINT_URL, credentials from the usual variables)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_S = 60.0  # moto imports boto and flask: seconds on a loaded machine


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(log_dir: Path) -> Iterator[str]:
    """Run moto's S3 server on a free port until the block ends; yield its endpoint URL. Killed at the end."""
    port = free_port()
    log = (log_dir / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}: {(log_dir / 'moto.log').read_text()[-500:]}")
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {url} within {STARTUP_S:.0f} s") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points boto, s3fs and every process started with it at the test server."""
    return S3_ENV | {"AWS_ENDPOINT_URL": endpoint}


def make_bucket(endpoint: str, name: str) -> None:
    """Create bucket `name` on the server."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items() if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket=name)


def apply(env: dict[str, str]) -> dict[str, str | None]:
    """Set `env` in os.environ; return the values it replaced (for restore)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore(old: dict[str, str | None]) -> None:
    """Undo apply."""
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
