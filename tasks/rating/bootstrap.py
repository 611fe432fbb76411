"""Bootstrap replicates of the rating counts: each dataset's examples redrawn with replacement, and the (dataset,
outcome, i, j) counts of every replicate made by one sparse product of the (rounds x examples) resampling weights with
the (examples x cells) per-example counts."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp

from tasks.rating.judged import Judged

# Bootstrap draws (rounds x examples) up to which numpy's multinomial is used as before: ~0.1 s at ~50 ns a draw.
EXACT_DRAWS = 2_000_000


def multinomial_weights(p: Judged, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """(rounds, examples) multinomial counts: each dataset's examples are redrawn with replacement."""
    e = len(p.ex_ds)
    r = np.zeros((rounds, e))
    for d in np.unique(p.ex_ds):
        cols = np.flatnonzero(p.ex_ds == d)
        r[:, cols] = rng.multinomial(len(cols), np.full(len(cols), 1.0 / len(cols)), size=rounds)
    return r


def dataset_ranges(p: Judged) -> list[tuple[int, int]]:
    """(first, end) example codes of each dataset: examples are numbered dataset by dataset, so each is one range."""
    if not len(p.ex_ds):
        return []
    cuts = np.flatnonzero(np.diff(p.ex_ds)) + 1
    return list(zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(p.ex_ds)].tolist()))


def drawn_weights(p: Judged, rounds: int, rng: np.random.Generator,
                  ranges: list[tuple[int, int]] | None = None, transposed: bool = False) -> np.ndarray:
    """The same redraw as multinomial_weights by counting uniform index draws: O(examples) per round, not one binomial
    per example (20 rounds of 632,000 examples: 1.1-2.0 s for numpy's multinomial, 0.26-0.32 s for this, load 5).
    ranges: dataset_ranges(p), made once by the caller (np.unique of 5M example codes took 0.12 s per call);
    transposed: (examples, rounds), C-ordered, as the sparse products take it (no 160 MB copy per chunk at 5M).

    (Storing the rows in the order of the examples' cells made the products 3x faster at 5M, but mapping each draw
    to its row cost as much: 57.3 CPU s against 57.4 for 5M judgments with length control; not kept.)"""
    e = len(p.ex_ds)
    r = np.zeros((e, rounds) if transposed else (rounds, e))
    for first, end in ranges if ranges is not None else dataset_ranges(p):
        n = end - first
        for b in range(rounds):  # a round at a time: the same stream as (rounds, n) at once, 1/rounds of the memory
            # counted in place: 0.29-0.44 s for 4 rounds of 5M against 0.43-0.60 s for bincount, which also made an
            # int64 copy of the indices and one of the counts (80 MB)
            np.add.at(r[first:end, b] if transposed else r[b, first:end],
                      rng.integers(0, n, size=(1, n), dtype=np.uint32)[0], 1.0)
    return r


def resamples(p: Judged, rounds: int, chunk: int, rng: np.random.Generator, max_floats: int,
              transposed: bool = False) -> Iterator[np.ndarray]:
    """Bootstrap resampling weights, (chunk, examples) at a time, or (examples, chunk) C-ordered if transposed.

    Up to EXACT_DRAWS examples x rounds the multinomial draw of before (the same seed gives the same intervals as
    earlier versions); beyond, where that draw dominated the run, index counts drawn chunk by chunk (the same
    distribution, another stream), so 1M examples never need the whole (rounds x examples) matrix at once.
    """
    if rounds * len(p.ex_ds) <= EXACT_DRAWS:
        resample = multinomial_weights(p, rounds, rng)
        for start in range(0, rounds, chunk):
            part = resample[start : start + chunk]
            yield np.ascontiguousarray(part.T) if transposed else part
        return
    chunk = max(1, min(chunk, max_floats // max(len(p.ex_ds), 1)))
    ranges = dataset_ranges(p)
    for start in range(0, rounds, chunk):
        yield drawn_weights(p, min(chunk, rounds - start), rng, ranges, transposed)


def per_example_counts(p: Judged) -> tuple[sp.csr_matrix, np.ndarray]:
    """(used cells x examples) sparse weighted counts, and which of the (datasets, 3, K, K) cells are used."""
    k, nd = len(p.names), len(p.datasets)
    flat = ((p.ds * 3 + p.out) * k + p.i) * k + p.j
    used = np.bincount(flat, minlength=nd * 3 * k * k) > 0
    small = np.int32 if max(len(p.ex_ds), nd * 3 * k * k) < 2**31 else np.int64  # what scipy would convert them to
    col = (np.cumsum(used) - 1).astype(small)[flat]
    del flat  # 5M judgments: each of these is 20-40 MB, and this runs beside the length-controlled fit's cells
    # duplicates (same example, same cell) are summed on construction.
    return sp.csr_matrix((p.w, (col, p.ex.astype(small))), shape=(int(used.sum()), len(p.ex_ds))), used


def replicate_counts(p: Judged, resample_t: np.ndarray, per_example: tuple[sp.csr_matrix, np.ndarray]) -> np.ndarray:
    """Counts of every bootstrap replicate at once: (E, cells)' per-example counts @ (E, B) resampling weights, the
    transpose C-ordered (made once per chunk and shared with length control; scipy copies a transposed view)."""
    k, nd = len(p.names), len(p.datasets)
    matrix, used = per_example
    rounds = resample_t.shape[1]
    reps = np.asarray(matrix @ resample_t).T
    full = np.zeros((rounds, nd * 3 * k * k))
    full[:, used] = reps
    return full.reshape(rounds, nd, 3, k, k)
