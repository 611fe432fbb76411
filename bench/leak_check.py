"""The up-front leak check on 3 datasets of 5,000 training and 1,000 test rows: seconds, against the 10 s target.

    python bench/leak_check.py [--train 5000] [--test 1000] [--leak 0.3]

Each dataset's test rows copy `leak` of their prompts from training (two thirds verbatim, one third with case and
spacing changed), so every kind of the check runs. Baseline in the same process: the same check with the LSH index
built at the threshold itself (datasketch's plain use), to show what the recall margin (LSH_SLACK) costs. Prints
wall and CPU seconds and the counts found, which must equal the leaks made.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import header  # noqa: E402
from tasks.config.schema import DataConfig, DatasetSpec  # noqa: E402
from tasks.data import overlap as ov  # noqa: E402
from tasks.data.load import Example  # noqa: E402
from tasks.demo.data import make_split  # noqa: E402


def cpu_s() -> float:
    """CPU seconds (user + system) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def leaky(task: str, n_train: int, n_test: int, leak: float) -> tuple[DatasetSpec, list[Example], list[Example]]:
    """A demo task's split with `leak` of its test prompts copied from training."""
    train, test = make_split(task, n_train, n_test)
    ex = lambda r: Example(r["id"], r["messages"][:-1], r["messages"][-1]["content"])  # noqa: E731
    copies = int(leak * n_test)
    verbatim = [ex(r) for r in train[: copies * 2 // 3]]
    folded = [Example(f"f{r.id}", [{**m, "content": m["content"].upper()} for m in r.prompt], r.answer)
              for r in map(ex, train[copies * 2 // 3: copies])]
    return (DatasetSpec(name=task, train=f"{task}_train.jsonl", test=f"{task}_test.jsonl"), [ex(r) for r in train],
            verbatim + folded + [ex(r) for r in test[copies:]])


def timed(splits: dict, slack: float) -> tuple[float, float, list[str]]:
    """(wall s, CPU s, warning lines) of one check with this LSH slack."""
    ov.LSH_SLACK = slack
    w0, c0 = time.perf_counter(), cpu_s()
    lines = ov.check_leaks(DataConfig(max_overlap=1.0), splits)
    return time.perf_counter() - w0, cpu_s() - c0, lines


def main() -> None:
    """Build the datasets, run the check both ways, print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--leak", type=float, default=0.3)
    args = ap.parse_args()
    print(header())
    splits = {t: leaky(t, args.train, args.test, args.leak) for t in ("extraction", "summarization", "orders")}
    slack = ov.LSH_SLACK
    ours = timed(splits, slack)
    plain = timed(splits, 0.0)
    print(f"{len(splits)} datasets x {args.train} train / {args.test} test rows, {args.leak:.0%} of test prompts copied")
    print(f"| check | wall s | CPU s |\n|---|---|---|\n| basesearch (LSH {slack} below the threshold) | "
          f"{ours[0]:.2f} | {ours[1]:.2f} |\n| datasketch LSH at the threshold (baseline) | {plain[0]:.2f} | {plain[1]:.2f} |")
    print(f"ratio (ours / baseline wall): {ours[0] / plain[0]:.2f}x; target: under 10 s wall")
    for line in ours[2]:
        print(line)


if __name__ == "__main__":
    main()
