"""What the search's own merges add to the demo: the demo without them and as shipped (search.rounds 2), same zoo.

    python bench/search_loop.py [--config configs/demo.yaml]

Run 1 builds the zoo (the config with search.rounds 0 on a fresh store; reported, not compared). Stores B and C start
as copies of what run 1 built before any fine-tune (the zoo and merged models, `models/`, and the measured rates,
`rates/`). Run 2: search.rounds 0 on C; run 3: the config as given on B. With search.refit off (the demo's) the two
runs fine-tune on different rows (all training rows, or all but the development rows), so nothing of run 2 can serve
run 3: the loop's extra time is run 3's wall - run 2's wall, what a user pays for turning the loop on; stage by stage
from run 3's stages.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header, table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(config: Path, store: Path) -> tuple[float, str]:
    """(wall seconds, run id) of one `python -m flows.search` run."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.search", "--config", str(config), "--store", str(store)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the search on {store} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - t0, (store / "runs" / "LATEST").read_text().strip()


def without_search(config: Path, folder: Path) -> Path:
    """The config with search.rounds 0, written beside the original (its relative paths stay valid)."""
    raw = yaml.safe_load(config.read_text())
    raw["search"] = {**(raw.get("search") or {}), "rounds": 0}
    out = config.parent / f".bench-no-search-{folder.name}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def seeded(src: Path, dst: Path) -> Path:
    """A new store holding only src's built models and measured rates (no fine-tune, output or judgment)."""
    for part in ("models", "rates"):
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part)
    return dst


def main() -> None:
    """Three runs; the loop's stages and extra wall time."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = parser.parse_args()
    config = Path(args.config).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        plain = without_search(config, Path(tmp))
        try:
            zoo_wall, _ = run(plain, Path(tmp) / "a")
            base_wall, _ = run(plain, seeded(Path(tmp) / "a", Path(tmp) / "c"))
        finally:
            plain.unlink()
        store = seeded(Path(tmp) / "a", Path(tmp) / "b")
        loop_wall, run_id = run(config, store)
        stages = json.loads((store / "runs" / run_id / "stages.json").read_text())
        path = json.loads((store / "runs" / run_id / "search" / "search.json").read_text())
    busy = [s for s in stages if s["computed"] and s["stage"] not in ("check", "report")]
    groups: dict[str, list[float]] = {}
    for s in busy:
        kind = s["stage"].split(":")[0].split(" ")[0]
        where = "dev" if s["stage"].endswith(".dev") or s["stage"].startswith("search:") else "test"
        groups.setdefault(f"{kind} ({where})", []).append(s["seconds"])
    rows = [{"stage": k, "runs": len(v), "seconds": f"{sum(v):.1f}"} for k, v in groups.items()]
    print(header())
    print(f"zoo build run (rounds 0, fresh store): {zoo_wall:.1f} s; then on stores holding that zoo: without the loop "
          f"{base_wall:.1f} s, with it {loop_wall:.1f} s")
    print(f"loop's extra wall time (with - without): {loop_wall - base_wall:.1f} s")
    print(f"rounds run: {len(path['rounds'])}, proposals: {sum(len(r['proposals']) for r in path['rounds'])}, "
          f"kept: {', '.join(path['kept']) or 'none'}; stop: {path['stop']}")
    print(table(rows, ["stage", "runs", "seconds"]))


if __name__ == "__main__":
    main()
