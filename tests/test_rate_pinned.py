"""rate() gives the same tables as commit 4723ccf in every column that commit wrote: text and integers exactly,
floats to 1e-9 relative, about a millionth of an Elo point (numpy and scipy releases move the last bits: a rating
1003.7033922853077 became ...076 and a Fisher bound 941.7766263264336 became ...242473 with numpy 2.4 and scipy 1.17;
any change of ours moves far more than that).

tests/data/ratings_4723ccf.json was written by `python tests/test_rate_pinned.py` run at commit 4723ccf (before
the Arena-comparable column, length control and the faster bootstrap draw): these cases pin that the new columns and
options leave the old numbers alone when the options are off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.config.schema import RatingConfig
from tasks.rating.rate import rate  # noqa: E402
from tests.test_rate import simulate  # noqa: E402

PINNED = ROOT / "tests" / "data" / "ratings_4723ccf.json"


def cases() -> dict[str, tuple[pd.DataFrame, dict]]:
    """Judgments and config of each pinned case: tie models, intervals, anchor, weights, datasets, guards."""
    two = simulate(2400, k=6, seed=21, nu=0.7, n_examples=120, datasets=("d0", "d1"))
    strong = two.assign(strength=np.where((two.winner != "tie") & (np.arange(len(two)) % 4 == 0), 2, two.strength))
    # m5 never loses nor ties (unbeaten guard) and two contenders are never compared with the rest (groups)
    guard = simulate(1500, k=5, seed=22, nu=0.5, n_examples=90)
    guard = guard[~((guard.contender_a == "m4") | (guard.contender_b == "m4"))]
    sweep = pd.DataFrame({"dataset": "d0", "example_id": np.arange(60) % 30, "contender_a": "m5",
                          "contender_b": np.array(["m0", "m1", "m2"])[np.arange(60) % 3], "order": "ab",
                          "winner": "a", "strength": 1, "error": None})
    apart = pd.DataFrame({"dataset": "d0", "example_id": np.arange(40), "contender_a": "x1", "contender_b": "x2",
                          "order": "ab", "winner": np.where(np.arange(40) % 3 == 0, "b", "a"), "strength": 1,
                          "error": None})
    guard = pd.concat([guard, sweep, apart], ignore_index=True)
    return {
        "davidson-bootstrap": (two, {}),
        "davidson-fisher": (two, {"ci": "fisher"}),
        "half-bootstrap": (two, {"ties": "half", "bootstrap_rounds": 120, "seed": 3}),
        "rao-kupper-fisher-90": (two, {"ties": "rao-kupper", "ci": "fisher", "confidence": 0.9}),
        "strong-anchor": (strong, {"strong_weight": 3.0, "anchor": "m2", "anchor_rating": 1200.0}),
        "one-dataset": (simulate(900, k=4, seed=23, nu=0.4, n_examples=60), {"bootstrap_rounds": 80}),
        "guards": (guard, {}),
    }


def table_values(r: pd.DataFrame) -> dict[str, list]:
    """Every column as a JSON-safe list (floats as repr strings, so equality is bit for bit)."""
    out = {}
    for c in r.columns:
        v = r[c].tolist()
        out[c] = [repr(float(x)) if isinstance(x, (float, np.floating)) else
                  (int(x) if isinstance(x, (bool, np.bool_, int, np.integer)) else str(x)) for x in v]
    return out


def test_tables_identical_to_4723ccf():
    pinned = json.loads(PINNED.read_text())
    for name, (df, kw) in cases().items():
        now = table_values(rate(df, {}, RatingConfig(**kw)))
        for col, values in pinned[name].items():
            assert len(now[col]) == len(values) and all(map(_same, now[col], values)), f"{name}: column {col} changed"


def _same(now: object, then: object) -> bool:
    """Equal, or for floats written by repr equal to 1e-9 relative (NaN equal to NaN)."""
    if now == then:
        return True
    try:
        a, b = float(now), float(then)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return isinstance(now, str) and isinstance(then, str) and (np.isclose(a, b, rtol=1e-9, atol=0.0)
                                                                or (np.isnan(a) and np.isnan(b)))


if __name__ == "__main__":
    PINNED.write_text(json.dumps({n: table_values(rate(df, {}, RatingConfig(**kw))) for n, (df, kw) in cases().items()}))
    print(PINNED)
