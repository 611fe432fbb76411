"""A search on an S3 store against the same search on a local store, same machine, same moment; and a fine-tune
killed at 80% of its steps, resumed from its checkpoint, against a whole fine-tune.

python bench/remote_store.py [--config configs/demo.yaml] [--repeats 1] [--pool] [--resume-steps 400]
    [--resume-model tiny,small] [--skip-store]

- store: the config's search (in-process `python -m flows.search`, compute.mode local) on a fresh local store and on
  a fresh prefix of a bucket on moto's S3 server (127.0.0.1, reached through s3fs as AWS is), alternating; wall
  seconds of each, whether the ratings are equal, and the bytes each stage left in the bucket (uploaded once) and
  the search's cache holds (downloaded or kept). With --pool the S3 side runs in pool mode on two process workers,
  each with its own cache and temp folder (a Prefect server started here), and the bytes each worker's cache holds.
- resume: a LoRA fine-tune of a tiny model (or a small one: 4 layers of 256) for --resume-steps steps, whole; then the
  same fine-tune with checkpoints every 10% killed after 80% of its steps and started again: seconds of the resumed
  part (model load included) against the whole, and where each run's time went (imports, before the first step,
  the steps, after them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _machine import header, table  # noqa: E402

BUCKET = "basesearch-bench"


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path` (0 when absent)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def bucket_bytes(url: str) -> dict[str, int]:
    """Bytes under each top-level folder of a store in the bucket."""
    from tasks.store.store import Store

    st = Store(url)
    out: dict[str, int] = {}
    for path, info in st.fs.find(st.root, detail=True).items():
        top = path.removeprefix(st.root + "/").split("/", 1)[0]
        out[top] = out.get(top, 0) + int(info.get("size") or 0)
    return out


def stage_seconds(url: str) -> dict[str, float]:
    """The latest run's seconds by stage (runs/<id>/stages.json), a stage met twice summed."""
    import json

    from tasks.store.store import Store

    st = Store(url)
    out: dict[str, float] = {}
    for s in json.loads(st.read_text(f"runs/{st.read_text('runs/LATEST').strip()}/stages.json")):
        out[s["stage"]] = out.get(s["stage"], 0.0) + float(s["seconds"])
    return out


def stage_lines(local: dict[str, float], remote: dict[str, float]) -> list[str]:
    """Stage by stage, local store against S3 side, largest difference first: where the extra time goes."""
    rows = sorted(local.keys() | remote.keys(), key=lambda k: local.get(k, 0) - remote.get(k, 0))
    return ["| stage | local s | S3 side s | S3 - local s |", "|---|---|---|---|"] + [
        f"| {k} | {local.get(k, 0):.1f} | {remote.get(k, 0):.1f} | {remote.get(k, 0) - local.get(k, 0):+.1f} |"
        for k in rows]


def bucket_requests(log: Path, start: int, prefix: str) -> str:
    """What the S3 side asked moto, from its access log after byte `start`: requests by method, and by the store
    folder they touched (a listing counted under the folder it lists); `prefix` is the run's prefix in the bucket."""
    import re
    from collections import Counter
    from urllib.parse import parse_qs, unquote, urlsplit

    text = log.read_bytes()[start:].decode(errors="replace")
    methods, folders = Counter(), Counter()
    for method, target in re.findall(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP', text):
        url = urlsplit(target)
        query = parse_qs(url.query)
        listing = method == "GET" and "list-type" in query
        key = query.get("prefix", [""])[0] if listing else unquote(url.path).split("/", 2)[-1]
        if not key.startswith(prefix):
            continue
        methods["LIST" if listing else method] += 1
        folders[key.removeprefix(prefix).lstrip("/").split("/", 1)[0] or "(root)"] += 1
    by = lambda c: ", ".join(f"{k} {v}" for k, v in c.most_common())  # noqa: E731
    return f"{sum(methods.values())} requests to the bucket: {by(methods)}; by folder: {by(folders)}"


def ratings(url: str) -> object:
    """The latest run's ratings in a store."""
    from tasks.store.store import Store

    st = Store(url)
    return st.read_parquet(f"runs/{st.read_text('runs/LATEST').strip()}/ratings.parquet")


def cpu_s(pid: int) -> float:
    """CPU seconds of process `pid` and of its children it has waited for (Linux /proc; 0 when gone or elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[11:15] are utime, stime, cutime, cstime, in clock ticks (proc(5), counting from the state field)
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def pid_of(text: str) -> int | None:
    """The pid of the first process whose command line holds `text` (Linux /proc)."""
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                return int(cmd.parent.name)
        except OSError:
            continue
    return None


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children (the searches and their own children)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def search(config: Path, store: str, env: dict[str, str], log: Path) -> float:
    """Wall seconds of `python -m flows.search --config C --store S` in its own process; fails loudly on error."""
    t0 = time.perf_counter()
    with log.open("ab") as fh:
        rc = subprocess.run([sys.executable, "-m", "flows.search", "--config", str(config), "--store", store],
                            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=7200).returncode
    if rc != 0:
        raise SystemExit(f"error: the search on {store} exited {rc}; see {log}")
    return time.perf_counter() - t0


def pool_stack(work: Path, s3: dict[str, str]) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """A Prefect server and two process workers on pool gpu (own caches and temps), the deployments applied."""
    from tests.prefect_server import prefect_env, start, start_server, wait_worker_online

    home = work / "prefect"
    home.mkdir()
    server, api_url = start_server(home)
    procs = [server]
    env = prefect_env(home, api_url) | s3
    for name in ("a", "b"):
        own = work / f"worker-{name}"
        (own / "tmp").mkdir(parents=True)
        procs.append(start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type", "process",
                            "--limit", "2"], env | {"BASESEARCH_CACHE_DIR": str(own / "cache"),
                                                    "TMPDIR": str(own / "tmp")}, own / "worker.log", cwd=own))
    wait_worker_online(api_url, "gpu")
    out = subprocess.run([sys.executable, "deployments/apply.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        raise SystemExit(f"error: applying the deployments failed: {out.stderr[-500:]}")
    return procs, env


def store_bench(config: Path, repeats: int, pool: bool, work: Path) -> str:
    """The store table: local store vs S3 store, alternating."""
    import pandas as pd
    import yaml

    from tests.s3_server import make_bucket, s3_env, s3_server

    rows, lines = [], []
    with s3_server(work) as endpoint:
        make_bucket(endpoint, BUCKET)
        s3 = s3_env(endpoint)
        os.environ.update(s3)
        moto = pid_of(f"moto.server -H 127.0.0.1 -p {endpoint.rsplit(':', 1)[1]}")
        procs: list[subprocess.Popen] = []
        seen: set = set()  # flow runs already summed (an earlier repeat's)
        env = os.environ | s3
        s3_config = config
        if pool:
            procs, env = pool_stack(work, s3)
            cfg = yaml.safe_load(config.read_text())
            cfg["compute"] = {"mode": "pool", "pool": "gpu"}
            s3_config = config.parent / f".bench-pool-{uuid.uuid4().hex[:6]}.yaml"  # beside it: its relative paths hold
            s3_config.write_text(yaml.safe_dump(cfg))
        try:
            for i in range(repeats):
                local = str(work / f"local-{i}")
                url = f"s3://{BUCKET}/run-{uuid.uuid4().hex[:6]}"
                cache = work / f"search-cache-{i}"
                t_local = search(config, local, env | {"BASESEARCH_CACHE_DIR": str(work / "unused")},
                                 work / "local.log")
                # CPU seconds by process over the S3 side: is its wall time the two cores' work, and whose?
                others = {"moto S3 server": moto} | dict(zip(("Prefect server", "worker a", "worker b"),
                                                             (p.pid for p in procs)))
                before = {k: cpu_s(v) for k, v in others.items() if v} | {"search": children_cpu_s()}
                log_at = (work / "moto.log").stat().st_size
                t_s3 = search(s3_config, url, env | {"BASESEARCH_CACHE_DIR": str(cache)}, work / "s3.log")
                time.sleep(5 if pool else 0)  # the staying runs end after the search; their workers reap them
                after = {k: cpu_s(v) for k, v in others.items() if v} | {"search": children_cpu_s()}
                spent = {k: after[k] - before[k] for k in before}
                lines.append(f"repeat {i + 1}: " + bucket_requests(work / "moto.log", log_at, url.split("/", 3)[3]))
                lines.append(f"repeat {i + 1}: CPU seconds over the S3 side's {t_s3:.0f} s (2 cores: "
                             f"{2 * t_s3:.0f} core-s): " + ", ".join(f"{k} {v:.0f}" for k, v in spent.items()) +
                             f"; in all {sum(spent.values()):.0f} (workers' counts include their stage runs)")
                try:
                    pd.testing.assert_frame_equal(ratings(url), ratings(local))
                    same = True
                except AssertionError:
                    same = False
                rows.append({"repeat": i + 1, "local store s": f"{t_local:.1f}", "S3 store s": f"{t_s3:.1f}",
                             "ratio": f"{t_s3 / t_local:.2f}", "ratings equal": "yes" if same else "NO",
                             "mode (S3 side)": "pool, 2 workers" if pool else "local"})
                lines += [f"repeat {i + 1}: seconds by stage (runs/<id>/stages.json):",
                          *stage_lines(stage_seconds(local), stage_seconds(url))]
                moved = bucket_bytes(url)
                lines.append(f"repeat {i + 1}: bytes in the bucket by folder: " + ", ".join(
                    f"{k} {v / 1e6:.2f} MB" for k, v in sorted(moved.items())) +
                    f"; the search's cache {folder_bytes(cache) / 1e6:.2f} MB" + (
                    "; worker caches " + ", ".join(f"{n} {folder_bytes(work / f'worker-{n}' / 'cache') / 1e6:.2f} MB"
                                                   for n in ("a", "b")) if pool else ""))
                if pool:
                    lines.append(f"repeat {i + 1}: {stage_time(env['PREFECT_API_URL'], seen)}")
        finally:
            from tests.prefect_server import stop

            for p in reversed(procs):
                stop(p)
            if s3_config != config:
                s3_config.unlink(missing_ok=True)
    cols = ["repeat", "mode (S3 side)", "local store s", "S3 store s", "ratio", "ratings equal"]
    return table(rows, cols) + "\n" + "\n".join(lines)


def stage_time(api_url: str, seen: set) -> str:
    """Where the pool side's stage time went: each flow's runs (the staying runs, the stage subflows or runs) with
    their summed seconds before their first task, in their tasks, and after (bench/pool_overhead.py's timelines)."""
    from pool_overhead import timelines

    rows = timelines(api_url, seen)
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        kinds.setdefault(r["name"].split("-")[0], []).append(r)
    return "stage runs by flow: " + "; ".join(
        f"{k} {len(rs)} runs, summed before task {sum(r['before task s'] for r in rs):.1f} s, task "
        f"{sum(r['task s'] for r in rs):.1f} s, after {sum(r['after task s'] for r in rs):.1f} s, starting "
        f"{sum(r['starting s'] for r in rs):.1f} s" for k, rs in sorted(kinds.items()))


RESUME = """
import json, sys, time
t_start = time.perf_counter()
import torch
torch.set_num_threads(1)
from tasks.config.stages import FinetuneConfig
from tasks.train import loop
from tasks.train.finetune import finetune_task
t_imported = time.perf_counter()
model, train, store, steps, kill = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cfg = FinetuneConfig(max_steps=steps, batch_size=4, learning_rate=3e-3, search={"enabled": False},
                     checkpoint_every=max(1, steps // 10) if kill >= 0 else 0, checkpoint_minutes=0)
marks = {}
advance = loop.Trainer.advance
def timed_advance(self, n):
    marks.setdefault("first_step", time.perf_counter())
    advance(self, n)
    marks["last_step"] = time.perf_counter()
loop.Trainer.advance = timed_advance
if kill > 0:
    step = loop.Trainer._step
    def dying(self):
        if self.done == kill:
            raise SystemExit(3)
        step(self)
    loop.Trainer._step = dying
t0 = time.perf_counter()
finetune_task.fn("tiny", "extraction", model, train, cfg, "r" * 16, store)
t1 = time.perf_counter()
print(json.dumps({"process": t1 - t_start, "imports": t_imported - t_start, "call": t1 - t0,
                  "to_first_step": marks["first_step"] - t0, "steps": marks["last_step"] - marks["first_step"],
                  "after_steps": t1 - marks["last_step"]}))
"""

SHAPES = {  # --resume-model: the tests' tiny Mistral, and one whose fine-tune takes a minute or two on a CPU core
    "tiny": {},
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 1},
}


def resume_bench(steps: int, shape: str, work: Path) -> str:
    """The resume table: a whole fine-tune, and the resumed part of one killed at 80%, each in its own process,
    with where each one's time went."""
    import json

    from tasks.demo.data import make_split
    from tests.conftest import make_tiny_model, write_jsonl

    model = make_tiny_model(work / f"model-{shape}", 0, **SHAPES[shape])
    train_rows, _ = make_split("extraction", 64, 8, seed=0)
    train = write_jsonl(work / "train.jsonl", train_rows)

    def timed(store: Path, kill: int) -> dict[str, float]:
        """Seconds of the fine-tune's phases in its own process (one thread); {} when it was killed."""
        out = subprocess.run([sys.executable, "-c", RESUME, str(model), str(train), str(store), str(steps), str(kill)],
                             cwd=ROOT, capture_output=True, text=True, timeout=3600)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}

    whole = timed(work / f"whole-{shape}", -1)
    kill = int(steps * 0.8)
    assert not timed(work / f"resumed-{shape}", kill)
    resumed = timed(work / f"resumed-{shape}", 0)
    adapter = lambda d: sorted((work / d / "adapters").rglob("adapter_model.safetensors"))[0].read_bytes()  # noqa: E731
    same = adapter(f"whole-{shape}") == adapter(f"resumed-{shape}")
    params = sum(p.numel() for p in __import__("safetensors.torch").torch.load_file(
        str(model / "model.safetensors")).values())
    row = lambda what, t: {"model": f"{shape} ({params / 1e6:.1f}M)", "steps": steps, "run": what,  # noqa: E731
                           "call s": f"{t['call']:.2f}", "before 1st step s": f"{t['to_first_step']:.2f}",
                           "steps s": f"{t['steps']:.2f}", "after s": f"{t['after_steps']:.2f}",
                           "process s (imports)": f"{t['process']:.2f} ({t['imports']:.2f})"}
    rows = [row("whole", whole), row(f"resumed at {kill}", resumed) | {
        "resumed / whole": f"{resumed['call'] / whole['call']:.2f} (process {resumed['process'] / whole['process']:.2f})",
        "adapters equal": "yes" if same else "NO"}]
    return table(rows, ["model", "steps", "run", "call s", "before 1st step s", "steps s", "after s",
                        "process s (imports)", "resumed / whole", "adapters equal"])


def main() -> None:
    """Run the benches and print their tables under the machine's header."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pool", action="store_true", help="the S3 side in pool mode on two workers")
    parser.add_argument("--resume-steps", type=int, default=400)
    parser.add_argument("--resume-model", default="tiny", help="tiny, small, or both as tiny,small")
    parser.add_argument("--skip-store", action="store_true", help="only the resume bench")
    parser.add_argument("--skip-resume", action="store_true", help="only the store bench")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BASESEARCH_PROGRESS", "0")
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        parts = []
        if not args.skip_store:
            parts.append(store_bench(args.config.resolve(), args.repeats, args.pool, work))
        if not args.skip_resume:
            parts += [resume_bench(args.resume_steps, shape, work) for shape in args.resume_model.split(",")]
        print("\n\n".join(parts))
        print(header())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
