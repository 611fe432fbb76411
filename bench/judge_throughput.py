"""LLM-judge throughput against a local chat-completions server (loopback only), Prefect overhead included.

    python bench/judge_throughput.py [--comparisons 2500] [--latency 0.1] [--concurrency 64]

Three runs of the same judging, each through a Prefect flow and the real openai client:
  1. `clean`:     every request answered in `latency` seconds, fresh store;
  2. `faults`:    the same on a fresh store with 10% of requests failing transiently (429 with Retry-After, 500,
                  timeouts): every comparison must end with a verdict, none lost, none paid twice;
  3. `rerun`:     run 1 again on its store: zero requests.
A comparison is one (example, pair) shown in both orders, so 2,500 comparisons are 5,000 requests; the ideal
wall time is requests x latency / concurrency (5,000 x 0.1 s / 64 = 7.8 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pandas as pd  # noqa: E402
from prefect import flow  # noqa: E402

from bench._machine import cpu_name, table  # noqa: E402
from tasks.config.schema import (
    BudgetConfig,
    JudgeConfig,  # noqa: E402
)
from tasks.data.load import Example  # noqa: E402
from tasks.judge.llm import Contest, JudgeRun, run_llm_judge  # noqa: E402

KEY_ENV = "BENCH_JUDGE_KEY"
CONTENDERS = ["c0", "c1", "c2", "c3", "c4"]  # 10 pairs


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    """The fake server in its own process (its threads would otherwise share this one's GIL)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", "--latency", str(latency), "--api-key", "sk-bench"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().split()[1])
    return proc, f"http://127.0.0.1:{port}"


def control(base: str, path: str, body: dict | None = None) -> dict:
    """GET (body None) or POST a control endpoint of the fake server."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def contest(comparisons: int) -> Contest:
    """5 contenders (10 pairs) on comparisons / 10 examples, every output distinct."""
    n = comparisons // 10
    exs = [Example(str(i), [{"role": "user", "content": f"Describe item {i} in a few words."}], f"item {i} teacher",
                   f"item {i} is a small red box") for i in range(n)]
    outs = {}
    for k, c in enumerate(CONTENDERS):
        words = "item {i} is a small red box".split()[: 2 + k]  # c4 is closest to the reference
        outs[c] = pd.DataFrame({"example_id": [e.id for e in exs], "contender": c, "error": None,
                                "output": [" ".join(words).format(i=i) + f" ({c})" for i in range(n)]}
                               ).set_index("example_id")
    return Contest({"bench": exs}, {"bench": outs})


@flow(name="judge-bench")
def judge_flow(data: Contest, cfg: JudgeConfig, store: str) -> JudgeRun:
    """The judging as a search runs it: rounds of Prefect batch tasks."""
    return run_llm_judge(data, cfg, BudgetConfig(strategy="all-pairs"), None, store)


def timed(data: Contest, cfg: JudgeConfig, store: str, server_pid: int) -> tuple[JudgeRun, float, float, float]:
    """One judging run: (run, wall seconds, CPU seconds of this process, CPU seconds of the server process)."""
    import psutil

    server = psutil.Process(server_pid)
    s0, c0, t0 = sum(server.cpu_times()[:2]), time.process_time(), time.perf_counter()
    run = judge_flow(data, cfg, store)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return run, wall, cpu, sum(server.cpu_times()[:2]) - s0


def main() -> None:
    """Run the three scenarios and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comparisons", type=int, default=2500, help="(example, pair) comparisons; x2 orders = requests")
    ap.add_argument("--latency", type=float, default=0.1, help="seconds the server takes per answer")
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    os.environ[KEY_ENV] = "sk-bench"
    proc, base = start_server(args.latency)
    rows = []
    try:
        data = contest(args.comparisons)
        cfg = JudgeConfig(kind="openai", model="judge-model", base_url=base + "/v1", api_key_env=KEY_ENV,
                          concurrency=args.concurrency, timeout_s=1.0, max_retries=6)
        warm = tempfile.mkdtemp(prefix="judge-bench-")
        t0 = time.perf_counter()
        judge_flow(contest(10), cfg, warm)  # starts Prefect's temporary server: not part of the timings
        startup = time.perf_counter() - t0
        control(base, "/_reset", {})

        scenarios = [
            ("clean", {"latency_s": args.latency}, tempfile.mkdtemp(prefix="judge-bench-")),
            ("faults 10%", {"latency_s": args.latency, "rate_429": 0.04, "retry_after_s": 0.2, "rate_500": 0.04,
                            "rate_timeout": 0.02, "hang_s": 1.5}, tempfile.mkdtemp(prefix="judge-bench-")),
        ]
        scenarios.append(("rerun of clean", {"latency_s": args.latency}, scenarios[0][2]))
        for name, faults, store in scenarios:
            control(base, "/_faults", faults)
            control(base, "/_reset", {})
            run, wall, cpu, server_cpu = timed(data, cfg, store, proc.pid)
            st = control(base, "/_stats")
            df = run.judgments
            sent = st["chat"]
            ideal = sent * args.latency / args.concurrency
            failed = {k: v for k, v in st["status"].items() if k != "200"}
            rows.append({
                "run": name, "comparisons": df[["example_id", "contender_a", "contender_b"]].drop_duplicates().shape[0],
                "judgments": len(df), "with verdict": int(df["verdict"].notna().sum()),
                "errors": int(df["error"].notna().sum()), "requests sent": sent,
                "failed answers": sum(failed.values()) + (st["chat"] - sum(st["status"].values())),
                "paid twice": st["paid_twice"], "wall s": f"{wall:.2f}", "ideal s": f"{ideal:.2f}",
                "x ideal": f"{wall / ideal:.2f}" if ideal else "-",
                "client CPU s": f"{cpu:.1f}", "server CPU s": f"{server_cpu:.1f}",
            })
    finally:
        proc.terminate()
        proc.wait()
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    import openai

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; python {sys.version.split()[0]}, openai {openai.__version__}")
    print(f"load average (1/5/15 min) at the end: {load}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"server: tests/fake_openai.py in its own process on 127.0.0.1, {args.latency * 1000:.0f} ms per answer; "
          f"client concurrency {args.concurrency}; Prefect temporary server start {startup:.1f} s (not in the timings)")
    print()
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
