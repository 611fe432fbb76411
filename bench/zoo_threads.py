"""Which torch thread count trains the demo zoo's tiny model fastest: 1 and 2 threads, alternated in one process.

    python bench/zoo_threads.py [--steps 40] [--repeats 3]

Each measurement is `steps` full-parameter AdamW steps of the zoo's base recipe (tasks.demo.zoo: 4 layers of width 96,
batches of 16 packed rows), the same rows for every thread count, run in turns (1, 2, 1, 2, ...) so that a
change in the machine's load hits both alike. Prints wall and CPU seconds per step and the ratio.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._machine import header  # noqa: E402
from tasks.demo import zoo  # noqa: E402
from tasks.train.loop import train_steps


def cpu_s() -> float:
    """CPU seconds (user + system) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    """Alternate thread counts and print seconds per step."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    tok = zoo.build_tokenizer(0)
    spec = zoo.ZOO["base"]
    rng = random.Random(0)
    texts = [t for corpus, share in spec.mix for t in zoo._texts(tok, corpus, int(share * args.steps * 16), rng)]
    rows = [(ids, ids) for ids in (tok(t, add_special_tokens=False)["input_ids"][:256] for t in texts)]
    print(header())
    print(f"zoo base shape {zoo.SHAPE}, {args.steps} steps x batch 16, repeats {args.repeats}")
    results: dict[int, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for n in (int(x) for x in args.threads.split(",")):
            torch.set_num_threads(n)
            model = zoo._new_model(tok, 0)
            w0, c0 = time.perf_counter(), cpu_s()
            train_steps(model, rows, lr=spec.lr, steps=args.steps, batch_size=16, seed=0, pad_id=tok.pad_token_id,
                        packing=True)
            results.setdefault(n, []).append(((time.perf_counter() - w0) / args.steps, (cpu_s() - c0) / args.steps))
    print(f"{'threads':>7} {'wall s/step (best, median)':>28} {'cpu s/step (median)':>20}")
    for n, runs in results.items():
        walls = sorted(w for w, _ in runs)
        cpus = sorted(c for _, c in runs)
        print(f"{n:>7} {walls[0]:>13.4f} {walls[len(walls) // 2]:>14.4f} {cpus[len(cpus) // 2]:>20.4f}")
    one, two = (sorted(w for w, _ in results[k])[len(results[k]) // 2] for k in (1, 2))
    print(f"median wall, 2 threads / 1 thread: {two / one:.2f}x")


if __name__ == "__main__":
    main()
