"""What the search's own merges add to the demo: the demo without them, then as shipped (search.rounds 2), on one store.

    python bench/search_loop.py [--config configs/demo.yaml]

Run 1: the config with search.rounds 0 on a fresh store (everything but the loop). Run 2: the config as given on the
same store: everything run 1 made is reused, so what run 2 computes is the loop (development splits, proposals'
merges, fine-tunes, outputs, judgments, dev ratings) and the kept proposals' fine-tunes, outputs and judgments on the
test split. Run 3: the config as given again (a re-run: nothing computed). Loop's extra time = run 2's wall - run 3's
wall (the same process overhead); stage by stage from run 2's stages.json.
"""

from __future__ import annotations

import argparse
import json
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
    subprocess.run([sys.executable, "-m", "flows.search", "--config", str(config), "--store", str(store)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, (store / "runs" / "LATEST").read_text().strip()


def without_search(config: Path, folder: Path) -> Path:
    """The config with search.rounds 0, written beside the original (its relative paths stay valid)."""
    raw = yaml.safe_load(config.read_text())
    raw["search"] = {**(raw.get("search") or {}), "rounds": 0}
    out = config.parent / f".bench-no-search-{folder.name}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def main() -> None:
    """Three runs; the loop's stages and extra wall time."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = parser.parse_args()
    config = Path(args.config).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        plain = without_search(config, Path(tmp))
        try:
            base_wall, _ = run(plain, store)
        finally:
            plain.unlink()
        loop_wall, run_id = run(config, store)
        rerun_wall, _ = run(config, store)
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
    print(f"demo without the loop (fresh store): {base_wall:.1f} s; with it (same store): {loop_wall:.1f} s; "
          f"re-run: {rerun_wall:.1f} s")
    print(f"loop's extra wall time (with - re-run): {loop_wall - rerun_wall:.1f} s; stages that computed: "
          f"{sum(float(r['seconds']) for r in rows):.1f} s")
    print(f"rounds run: {len(path['rounds'])}, proposals: {sum(len(r['proposals']) for r in path['rounds'])}, "
          f"kept: {', '.join(path['kept']) or 'none'}; stop: {path['stop']}")
    print(table(rows, ["stage", "runs", "seconds"]))


if __name__ == "__main__":
    main()
