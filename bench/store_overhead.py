"""Store overhead: what the store's guarantees cost (manifest written last and verified on every `exists`, the
Parquet footer check, the per-key lock of `claim`) against the same store operations without them, in one process,
on the shapes of the demo search (configs/demo.yaml).

python bench/store_overhead.py [--quick] [--repeats N] [--demo-seconds 84] [--rerun-seconds 15] [--big-mb 100]

Shapes (measured in a demo run's store): 6 model folders (4 zoo models + 2 merges; model.safetensors 2.4 MB,
tokenizer.json and 5 small files), 20 adapter folders (adapter_model.safetensors 449 KB, README.md,
adapter_config.json, train_metrics.json), 24 outputs Parquet files (40 rows), 66 judgment Parquet files (80 rows).
File contents are random bytes and random strings: nothing is trained.

- guarded: the real Store API as the stage functions call it (finetune_task, generate_task, judge_task, the zoo
  and merges): `with store.claim(rel) as todo: if todo: with store.new_dir(rel) as tmp: ...` and
  `store.write_parquet(rel, df)`; the re-run is `store.claim(rel)` finding every result, in a fresh process
  (its per-process caches cleared, the store opened again: probe and temp sweep).
- plain: what an unguarded store does: `os.path.exists`, the folder's files written into a temp folder and one
  `os.replace`, `DataFrame.to_parquet` to a temp file and one `os.replace`; the re-run is `os.path.exists`.
The sides alternate (guarded, plain, guarded, plain, ...), each repetition in a new store folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import header, table  # noqa: E402

import tasks.store.store as store_mod  # noqa: E402
import tasks.store.verify as verify_mod  # noqa: E402
from tasks.store.guards import write_manifest  # noqa: E402
from tasks.store.store import Store  # noqa: E402

# File sizes in bytes, as in a demo run's store.
MODEL_FILES = {"model.safetensors": 2_415_984, "tokenizer.json": 55_486, "config.json": 674,
               "generation_config.json": 216, "tokenizer_config.json": 332, "chat_template.jinja": 133,
               "zoo.json": 503}
ADAPTER_FILES = {"adapter_model.safetensors": 449_480, "README.md": 5_222, "adapter_config.json": 1_189,
                 "train_metrics.json": 315}
N_MODELS, N_ADAPTERS, N_OUTPUTS, N_JUDGMENTS = 6, 20, 24, 66
OUTPUT_ROWS, JUDGMENT_ROWS = 40, 80
BIG_NAME_GB = 14.0  # a Mistral 7B in bf16, for the linear extrapolation


def words(rng: np.random.Generator, n: int, length: int) -> list[str]:
    """n random lowercase strings of about `length` characters."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz {}:,\""))
    return ["".join(rng.choice(letters, length)) for _ in range(n)]


def outputs_frame(rng: np.random.Generator) -> pd.DataFrame:
    """An outputs table with the columns of generate's (40 rows)."""
    n = OUTPUT_ROWS
    return pd.DataFrame({
        "dataset": "extraction", "example_id": [f"extraction-2-{i}" for i in range(n)], "contender": "zephyr",
        "output": words(rng, n, 60), "prompt_tokens": rng.integers(30, 90, n), "completion_tokens": rng.integers(5, 40, n),
        "latency_s": rng.random(n), "error": [None] * n,
    })


def judgments_frame(rng: np.random.Generator) -> pd.DataFrame:
    """A judgment batch with the columns of the metric judge's (80 rows)."""
    n = JUDGMENT_ROWS
    return pd.DataFrame({
        "dataset": "extraction", "example_id": [f"extraction-2-{i // 2}" for i in range(n)], "contender_a": "zephyr",
        "contender_b": "neural", "order": ["ab", "ba"] * (n // 2), "winner": rng.choice(["a", "b", "tie"], n),
        "strength": rng.integers(0, 2, n), "judge": "metric:json",
        "raw": [f'{{"score_a": {a:.2f}, "score_b": {b:.2f}}}' for a, b in rng.random((n, 2))],
        "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "error": [None] * n,
    })


class Demo:
    """The results of one demo first run: rel path -> folder files ({name: bytes}) or a DataFrame."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        model = {n: rng.bytes(s) for n, s in MODEL_FILES.items()}
        adapter = {n: rng.bytes(s) for n, s in ADAPTER_FILES.items()}
        out, judg = outputs_frame(rng), judgments_frame(rng)
        key = lambda kind, i: f"{kind}/{hashlib.sha256(f'{kind}{i}'.encode()).hexdigest()[:16]}"  # noqa: E731
        self.folders = {key("models", i): model for i in range(N_MODELS)}
        self.folders |= {key("adapters", i): adapter for i in range(N_ADAPTERS)}
        self.tables = {key("outputs", i) + ".parquet": out for i in range(N_OUTPUTS)}
        self.tables |= {key("judgments", i) + ".parquet": judg for i in range(N_JUDGMENTS)}
        self.bytes = sum(len(b) for f in self.folders.values() for b in f.values())

    @property
    def count(self) -> int:
        return len(self.folders) + len(self.tables)


def fresh_process(root: str) -> None:
    """Forget what this process verified and opened, as a new run's process starts."""
    verify_mod._VERIFIED.clear()
    verify_mod._DEEP.clear()
    store_mod._OPENED.discard(("LocalFileSystem", str(Path(root).resolve())))


def fill(folder: Path, files: dict[str, bytes]) -> None:
    """Write a result folder's files."""
    for name, data in files.items():
        (folder / name).write_bytes(data)


def guarded_first(root: str, demo: Demo) -> None:
    """Every result of a first run through claim + new_dir / write_parquet, as the stages write them."""
    store = Store(root)
    for rel, files in demo.folders.items():
        with store.claim(rel) as todo:
            if todo:
                with store.new_dir(rel) as tmp:
                    fill(tmp, files)
    for rel, df in demo.tables.items():
        with store.claim(rel) as todo:
            if todo:
                store.write_parquet(rel, df)


def guarded_rerun(root: str, demo: Demo) -> None:
    """A re-run in a new process: the store opened again, every result found by claim."""
    store = Store(root)
    for rel in [*demo.folders, *demo.tables]:
        with store.claim(rel) as todo:
            assert not todo, rel


def plain_tmp(parent: str) -> str:
    return f"{parent}/.tmp-{uuid.uuid4().hex[:12]}"


def plain_first(root: str, demo: Demo) -> None:
    """The same results written by an unguarded store: exists, files + one rename, to_parquet + one rename."""
    os.makedirs(root, exist_ok=True)
    for rel, files in demo.folders.items():
        target = f"{root}/{rel}"
        if not os.path.exists(target):
            parent = target.rsplit("/", 1)[0]
            os.makedirs(parent, exist_ok=True)
            tmp = plain_tmp(parent)
            os.mkdir(tmp)
            fill(Path(tmp), files)
            os.replace(tmp, target)
    for rel, df in demo.tables.items():
        target = f"{root}/{rel}"
        if not os.path.exists(target):
            parent = target.rsplit("/", 1)[0]
            os.makedirs(parent, exist_ok=True)
            tmp = plain_tmp(parent)
            df.to_parquet(tmp, index=False)
            os.replace(tmp, target)


def plain_rerun(root: str, demo: Demo) -> None:
    for rel in [*demo.folders, *demo.tables]:
        assert os.path.exists(f"{root}/{rel}"), rel


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def per_call_us(fn, loops: int, before=None) -> float:
    """Median microseconds of one call of fn() over `loops` calls (before() run untimed ahead of each)."""
    times = []
    for _ in range(loops):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def demo_runs(base: Path, demo: Demo, repeats: int) -> dict[str, list[float]]:
    """First run and re-run seconds of each side, the sides alternating, each repetition in a new folder."""
    t: dict[str, list[float]] = {k: [] for k in ("g_first", "g_rerun", "p_first", "p_rerun")}
    for i in range(repeats + 1):  # the first round warms imports and the page cache; not counted
        g, p = str(base / f"guarded-{i}"), str(base / f"plain-{i}")
        fresh_process(g)
        g_first = timed(guarded_first, g, demo)
        fresh_process(g)
        g_rerun = timed(guarded_rerun, g, demo)
        p_first = timed(plain_first, p, demo)
        p_rerun = timed(plain_rerun, p, demo)
        if i:
            for k, v in zip(t, (g_first, g_rerun, p_first, p_rerun)):
                t[k].append(v)
        shutil.rmtree(g)
        shutil.rmtree(p)
    return t


def operations(base: Path, demo: Demo, loops: int) -> list[dict]:
    """Per-call cost of each guard against its plain counterpart, on a filled demo store."""
    root = str(base / "ops")
    fresh_process(root)
    guarded_first(root, demo)
    store = Store(root)
    model = next(r for r in demo.folders if r.startswith("models/"))
    adapter = next(r for r in demo.folders if r.startswith("adapters/"))
    judg = next(r for r in demo.tables if r.startswith("judgments/"))
    missing = "judgments/0000000000000000.parquet"

    def claim_missing() -> None:
        with store.claim(missing) as todo:
            assert todo

    def plain_folder_write(files: dict[str, bytes]) -> None:
        tmp = plain_tmp(root)
        os.mkdir(tmp)
        fill(Path(tmp), files)
        shutil.rmtree(tmp)

    def manifest_of(files: dict[str, bytes]) -> None:
        tmp = Path(plain_tmp(root))
        tmp.mkdir()
        fill(tmp, files)
        t0 = time.perf_counter()
        write_manifest(tmp)
        spent.append(time.perf_counter() - t0)
        shutil.rmtree(tmp)

    rows = []
    for what, rel in (("a model folder (7 files)", model), ("an adapter folder (4 files)", adapter)):
        rows.append({"operation": f"exists, {what} present: manifest read + stats",
                     "plain": "os.path.exists",
                     "plain us": per_call_us(lambda: os.path.exists(f"{root}/{rel}"), loops),
                     "guarded us": per_call_us(lambda: store.exists(rel), loops)})
    rows.append({"operation": "exists, a judgment Parquet present, first in a process: footer parse",
                 "plain": "os.path.exists", "plain us": per_call_us(lambda: os.path.exists(f"{root}/{judg}"), loops),
                 "guarded us": per_call_us(lambda: store.exists(judg), loops, before=verify_mod._VERIFIED.clear)})
    rows.append({"operation": "exists, the same Parquet again in this process (size + mtime cached)",
                 "plain": "os.path.exists", "plain us": per_call_us(lambda: os.path.exists(f"{root}/{judg}"), loops),
                 "guarded us": per_call_us(lambda: store.exists(judg), loops)})
    rows.append({"operation": "claim of a missing key: 2 checks + flock + owner file, nothing written",
                 "plain": "os.path.exists", "plain us": per_call_us(lambda: os.path.exists(f"{root}/{missing}"), loops),
                 "guarded us": per_call_us(claim_missing, loops)})
    for what, files in (("model", demo.folders[model]), ("adapter", demo.folders[adapter])):
        spent: list[float] = []
        for _ in range(max(loops // 20, 5)):
            manifest_of(files)
        mb = sum(map(len, files.values())) / 1e6
        write_us = per_call_us(lambda: plain_folder_write(files), max(loops // 20, 5))
        rows.append({"operation": f"manifest of a new {what} folder ({mb:.2f} MB): sha256 of every file "
                                  f"(writing its files: {write_us:,.0f} us, both sides)",
                     "plain": "no manifest", "plain us": 0.0, "guarded us": statistics.median(spent) * 1e6})
    shutil.rmtree(root)
    for r in rows:
        r["guarded - plain us"] = f"{r['guarded us'] - r['plain us']:.1f}"
        r["plain us"], r["guarded us"] = f"{r['plain us']:.1f}", f"{r['guarded us']:.1f}"
    return rows


def big_model(base: Path, mb: int, repeats: int) -> dict[str, float]:
    """One `mb` MB model folder: write + manifest + install (guarded) vs write + rename (plain), verify on exists."""
    rng = np.random.default_rng(1)
    files = {"model.safetensors": rng.bytes(mb * 1_000_000), "config.json": rng.bytes(674),
             "tokenizer.json": rng.bytes(55_486), "tokenizer_config.json": rng.bytes(332)}
    size = sum(map(len, files.values()))
    root = str(base / "big")
    rel = "models/big0000000000000"
    r: dict[str, list[float]] = {k: [] for k in ("guarded", "plain", "manifest", "exists", "plain_exists", "rehash")}
    for i in range(repeats):
        fresh_process(root)
        store = Store(root)
        spent: list[float] = []
        real = store_mod.write_manifest

        def timed_manifest(folder: Path):  # the manifest's share of the guarded write, timed inside new_dir
            t0 = time.perf_counter()
            try:
                return real(folder)
            finally:
                spent.append(time.perf_counter() - t0)

        store_mod.write_manifest = timed_manifest
        try:
            t0 = time.perf_counter()
            with store.claim(rel) as todo:
                if todo:
                    with store.new_dir(rel) as tmp:
                        fill(tmp, files)
            r["guarded"].append(time.perf_counter() - t0)
        finally:
            store_mod.write_manifest = real
        r["manifest"].append(spent[0])
        fresh_process(root)
        r["exists"].append(per_call_us(lambda: store.exists(rel), 200, before=verify_mod._VERIFIED.clear) / 1e6)
        r["plain_exists"].append(per_call_us(lambda: os.path.exists(f"{root}/{rel}"), 200) / 1e6)
        # A copy without its times (cp without -p): the next exists hashes the changed file once, then records it.
        st = os.stat(f"{root}/{rel}/model.safetensors")
        os.utime(f"{root}/{rel}/model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        fresh_process(root)
        t0 = time.perf_counter()
        assert store.exists(rel)
        r["rehash"].append(time.perf_counter() - t0)
        shutil.rmtree(root)
        p = f"{base}/big-plain"
        t0 = time.perf_counter()
        os.makedirs(f"{p}/models", exist_ok=True)
        tmp = plain_tmp(f"{p}/models")
        os.mkdir(tmp)
        fill(Path(tmp), files)
        os.replace(tmp, f"{p}/{rel}")
        r["plain"].append(time.perf_counter() - t0)
        shutil.rmtree(p)
    out = {k: min(v) for k, v in r.items()}
    out["bytes"] = size
    return out


def main() -> int:
    """Run the benchmark and print its tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repetitions, a 20 MB big model (seconds, for CI)")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions of each side (default 15, --quick 3)")
    ap.add_argument("--demo-seconds", type=float, default=84.0,
                    help="a demo first run's wall time (default 84: BENCHMARKS.md, demo per stage)")
    ap.add_argument("--rerun-seconds", type=float, default=15.0,
                    help="an unchanged demo re-run's wall time (default 15: BENCHMARKS.md, demo per stage)")
    ap.add_argument("--big-mb", type=int, default=None, help="size of the one big model folder (default 100, --quick 20)")
    ap.add_argument("--dir", default=None, help="where the stores are written (default: a temp folder)")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 15)
    big_mb = args.big_mb or (20 if args.quick else 100)
    loops = 100 if args.quick else 1000

    demo = Demo()
    base = Path(tempfile.mkdtemp(prefix="store-overhead-", dir=args.dir))
    t_start = time.perf_counter()
    try:
        t = demo_runs(base, demo, repeats)
        ops = operations(base, demo, loops)
        big = big_model(base, big_mb, 1 if args.quick else 3)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    wall = time.perf_counter() - t_start

    rows = []
    for phase, g, p, ref, ref_name in (
            ("first run: writes + checks", t["g_first"], t["p_first"], args.demo_seconds, "of a demo first run"),
            ("re-run: checks only", t["g_rerun"], t["p_rerun"], args.rerun_seconds, "of an unchanged re-run")):
        d_best, d_med = min(g) - min(p), statistics.median(g) - statistics.median(p)
        rows.append({
            "phase": phase, "results": demo.count,
            "plain best s": f"{min(p):.4f}", "plain median s": f"{statistics.median(p):.4f}",
            "guarded best s": f"{min(g):.4f}", "guarded median s": f"{statistics.median(g):.4f}",
            "guarded - plain s (best / median)": f"{d_best:+.4f} / {d_med:+.4f}",
            "x plain (median)": f"{statistics.median(g) / statistics.median(p):.2f}x",
            "share (median diff)": f"{100 * d_med / ref:.2f}% {ref_name} ({ref:g} s)",
        })
    cols = list(rows[0])

    gb = BIG_NAME_GB * 1e9 / big["bytes"]
    big_rows = [
        {"what": f"write one {big['bytes'] / 1e6:.0f} MB model folder (4 files)", "plain": f"{big['plain']:.3f} s",
         "guarded": f"{big['guarded']:.3f} s", "guarded - plain": f"{big['guarded'] - big['plain']:+.3f} s",
         f"{BIG_NAME_GB:g} GB (linear extrapolation)": f"{(big['guarded'] - big['plain']) * gb:+.1f} s"},
        {"what": "  of which the manifest (sha256 of every file)", "plain": "-",
         "guarded": f"{big['manifest']:.3f} s ({big['bytes'] / big['manifest'] / 1e6:,.0f} MB/s)",
         "guarded - plain": f"+{big['manifest']:.3f} s",
         f"{BIG_NAME_GB:g} GB (linear extrapolation)": f"+{big['manifest'] * gb:.1f} s"},
        {"what": "exists on it, new process: manifest read + sizes + mtimes, no re-hash",
         "plain": f"{big['plain_exists'] * 1e6:.1f} us", "guarded": f"{big['exists'] * 1e6:.1f} us",
         "guarded - plain": f"+{(big['exists'] - big['plain_exists']) * 1e6:.1f} us",
         f"{BIG_NAME_GB:g} GB (linear extrapolation)": "same: per file, not per byte"},
        {"what": "exists after its weights' mtime changed (a copy without -p): re-hash once",
         "plain": "-", "guarded": f"{big['rehash']:.3f} s", "guarded - plain": f"+{big['rehash']:.3f} s",
         f"{BIG_NAME_GB:g} GB (linear extrapolation)": f"+{big['rehash'] * gb:.1f} s (once, then recorded)"},
    ]

    mode = " --quick" if args.quick else ""
    print(f"# store overhead: the demo's results ({demo.count}: {N_MODELS} model folders, {N_ADAPTERS} adapter folders, "
          f"{N_OUTPUTS} outputs + {N_JUDGMENTS} judgment Parquet files, {demo.bytes / 1e6:.1f} MB), "
          f"guarded (Store API) vs plain (os calls), alternating, {repeats} repetitions each after one warm-up{mode}")
    print(header())
    try:
        fs = os.statvfs(base.parent)
        print(f"stores in: {base.parent} ({fs.f_bavail * fs.f_frsize / 1e9:.0f} GB free); bench wall {wall:.1f} s")
    except OSError:
        print(f"stores in: {base.parent}; bench wall {wall:.1f} s")
    print()
    print(table(rows, cols))
    print()
    print(f"# per operation, median of {loops} calls (manifest rows: of {max(loops // 20, 5)}), demo shapes")
    print(table(ops, ["operation", "plain", "plain us", "guarded us", "guarded - plain us"]))
    print()
    print(f"# one big model folder, best of {1 if args.quick else 3}; the {BIG_NAME_GB:g} GB column multiplies the "
          f"seconds by {gb:.0f} (an extrapolation, not a measurement: it assumes the files stay in the page cache)")
    print(table(big_rows, list(big_rows[0])))
    print()
    print(f"# share: (median guarded - median plain) / the demo's wall time; {args.demo_seconds:g} s first run and "
          f"{args.rerun_seconds:g} s unchanged re-run are the figures of BENCHMARKS.md (demo per stage) unless "
          "--demo-seconds / --rerun-seconds say otherwise")
    print("# the re-run's guarded side includes opening the store again (write probe + temp sweep), as a new process does")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
