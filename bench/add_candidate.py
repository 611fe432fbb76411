"""What adding one candidate to a finished search costs, against that candidate's share of a full run.

    python bench/add_candidate.py [--steps N] [--repeats R]

On the miniature search of the tests (tiny random Mistrals, two datasets, one merge; no held-out check):
  full   a fresh store, every model (alpha, beta, their merge, gamma) from scratch: T_full
  base   a fresh store, the search without gamma
  add    gamma appended to the candidate list, `search-rerun` on the base store: T_add
gamma's share of the full run is T_full / (models in it): the fine-tunes, outputs and judgments are the
same amount of work for every model, and the fixed stages (check, rating, report) are split
evenly. Goal: T_add <= 1.5 x share. Times are the flows' wall times in one warm process (Python imports and
Prefect's temporary server start are left out: a re-run on a server pays neither).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import yaml  # noqa: E402

from tests.conftest import make_tiny_model, mini_config_dict, write_jsonl  # noqa: E402 (sets an offline env)


def build_fixtures(root: Path) -> tuple[dict[str, Path], dict[str, tuple[Path, Path]], Path]:
    """Tiny models alpha and beta, the demo datasets, and the candidate to add (gamma)."""
    from tasks.demo.data import make_rows
    from tasks.demo.zoo import build_tokenizer

    tok = build_tokenizer()
    models = {name: make_tiny_model(root / name, seed, tok) for seed, name in enumerate(["alpha", "beta"])}
    data = {t: (write_jsonl(root / f"{t}_train.jsonl", make_rows(t, 16, 1)),
                write_jsonl(root / f"{t}_test.jsonl", make_rows(t, 6, 2)))
            for t in ("extraction", "classification", "orders")}
    return models, data, make_tiny_model(root / "gamma", 7, tok)


def timed(fn, *args) -> tuple[float, dict]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def computed(result: dict) -> str:
    """`finetune 2, generate 2, judge 7`: what a run computed, by stage kind."""
    kinds: dict[str, int] = {}
    for s in result["stages"]:
        kind = s["stage"].split(":")[0]
        if kind in ("merges", "finetune", "generate", "judge"):
            kinds[kind] = kinds.get(kind, 0) + s["computed"]
    return ", ".join(f"{k} {v}" for k, v in kinds.items())


def main() -> int:
    """Run full / base / add `--repeats` times and print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="LoRA steps per fine-tune (the tests use 3)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each run; medians are reported")
    args = parser.parse_args()

    from prefect import flow

    from flows.cli import stop_temporary_server
    from flows.rerun import search_rerun
    from flows.search import search
    from tasks.config.schema import SearchConfig

    root = Path(tempfile.mkdtemp(prefix="bench-add-"))
    models, data, gamma = build_fixtures(root)
    base_cfg = mini_config_dict(models, data)
    base_cfg["finetune"]["max_steps"] = args.steps
    base_cfg.pop("validation")  # the held-out check is the winner's, not a candidate's, work; left out of both sides
    config = root / "search.yaml"
    config.write_text(yaml.safe_dump(base_cfg, sort_keys=False))
    listing = root / "candidates.yaml"
    listing.write_text(f"- {{name: gamma, path: {gamma}}}\n")
    full_cfg = SearchConfig.model_validate(base_cfg | {"candidates": [*base_cfg["candidates"],
                                                                        {"name": "gamma", "path": str(gamma)}]})
    flow(lambda: None, name="warm-up")()  # start Prefect's temporary server before any timing

    full, add, base = [], [], []
    for i in range(args.repeats):
        t, full_result = timed(search, full_cfg, str(root / f"full-{i}"))
        full.append(t)
        t, _ = timed(search, str(config), str(root / f"base-{i}"))
        base.append(t)
        t, add_result = timed(search_rerun, str(config), str(listing), str(root / f"base-{i}"))
        add.append(t)
    stop_temporary_server()

    n_models = len(full_cfg.candidates) + len(full_cfg.merges)
    t_full, t_base, t_add = (statistics.median(x) for x in (full, base, add))
    share = t_full / n_models
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"command: python bench/add_candidate.py --steps {args.steps} --repeats {args.repeats}")
    print(f"full run, {n_models} models from scratch : {t_full:6.1f} s  ({computed(full_result)})")
    print(f"search without gamma             : {t_base:6.1f} s")
    print(f"gamma added, search-rerun        : {t_add:6.1f} s  ({computed(add_result)})")
    print(f"gamma's share of the full run    : {share:6.1f} s  (= {t_full:.1f} / {n_models})")
    print(f"marginal cost in the full run    : {t_full - t_base:6.1f} s  (full - without gamma)")
    ratio = t_add / share
    print(f"rerun / share = {ratio:.2f}  (goal <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
