"""finetune.search on the demo: its extra fine-tuning time against the demo's one fixed setting, and both rankings.

    python bench/finetune_search.py [--rounds 0] [--store-models store/models]

Runs the demo search twice through the real command line, each on a fresh store (the zoo models copied in, so
neither pays for building them): once as configs/demo.yaml has it (finetune.search off: the learning rate and epochs
tuned by hand for the zoo), once with finetune.search on (3 rates around the demo's 3e-3 tried on the development
rows, the best continued, the epochs where its loss was lowest). The baseline is the demo's own hand-tuned setting,
the best fixed setting we know for it. Prints, per run: the seconds every fine-tune spent training (its search
included; from each adapter's train_metrics.json), the fine-tune stages' wall seconds, and the pooled ranking. The
target: the search's fine-tuning time at most 2x the fixed setting's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from bench._machine import header, table  # noqa: E402


def config(tmp: Path, search: bool, rounds: int | None) -> Path:
    """The demo config with finetune.search on or off (and search.rounds when given), its paths made absolute."""
    raw = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    raw["finetune"]["search"] = {"enabled": search}
    if rounds is not None:
        raw["search"]["rounds"] = rounds
    for d in [*raw["datasets"], raw["validation"]["dataset"]]:
        d["train"], d["test"] = (str(ROOT / "configs" / d[k]) for k in ("train", "test"))
    path = tmp / f"demo-search-{'on' if search else 'off'}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(cfg: Path, store: Path, models: Path) -> dict:
    """One demo search on a fresh store: fine-tuning seconds, stage seconds, wall seconds and the pooled ranking."""
    store.mkdir()
    if models.is_dir():
        shutil.copytree(models, store / "models")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_HOME": tempfile.mkdtemp()}
    t0 = time.perf_counter()
    with open(store / "search.log", "w") as log:  # the search's own lines, kept out of the bench's table
        subprocess.run([sys.executable, "-m", "flows.search", "--config", str(cfg), "--store", str(store)], cwd=ROOT,
                       env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    metrics = [json.loads(p.read_text()) for p in (store / "adapters").glob("*/train_metrics.json")]
    run_dir = store / "runs" / (store / "runs" / "LATEST").read_text().strip()
    stages = json.loads((run_dir / "stages.json").read_text())
    ratings = pd.read_parquet(run_dir / "ratings.parquet")
    pooled = ratings[ratings["scope"] == "overall"].sort_values("rating", ascending=False)
    return {"fine-tunes": len(metrics), "training s": sum(m.get("plan_seconds", m["seconds"]) for m in metrics),
            "finetune stages s": sum(s.get("seconds", 0) for s in stages if s["stage"].startswith(("finetune", "search"))),
            "wall s": wall, "ranking": list(pooled["contender"]),
            "rates": sorted({round(m["learning_rate"], 5) for m in metrics})}


def main() -> None:
    """Both runs, then the table and the rankings."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=None, help="search.rounds (default: the demo's)")
    ap.add_argument("--store-models", default=str(ROOT / "store/models"), help="zoo models to copy into each store")
    args = ap.parse_args()
    print(header())
    tmp = Path(tempfile.mkdtemp(prefix="ftsearch-"))
    out = {on: run(config(tmp, on, args.rounds), tmp / f"store-{on}", Path(args.store_models)) for on in (False, True)}
    rows = [{"finetune.search": "on" if on else "off (demo)", "fine-tunes": r["fine-tunes"],
             "training s": f"{r['training s']:.1f}", "finetune stages s": f"{r['finetune stages s']:.1f}",
             "wall s": f"{r['wall s']:.0f}", "learning rates used": ", ".join(f"{x:g}" for x in r["rates"])}
            for on, r in out.items()]
    print(table(rows, list(rows[0])))
    off, on = out[False], out[True]
    print(f"training time with the search / without: {on['training s'] / off['training s']:.2f}x (target <= 2x); "
          f"per fine-tune: {on['training s'] / on['fine-tunes'] / (off['training s'] / off['fine-tunes']):.2f}x")
    print(f"pooled ranking without: {' > '.join(off['ranking'])}")
    print(f"pooled ranking with:    {' > '.join(on['ranking'])}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
