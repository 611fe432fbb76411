"""Duplicate prompts, found in one pass: exact (after folding case and whitespace) and near (MinHash LSH).

A row is compared by its prompt (every message before the answer), as the search's leak check compares them
(tasks/data/overlap.py): the same question asked twice is one training example, and its two answers must not end
up one in train and one in test. The first row of a cluster is its representative; a later row joins the cluster of
the representative it repeats, so rows appended to a log never change the clusters of the rows before them.

Near-duplicates: Jaccard similarity of the word n-gram sets (5 words, as distilabel's MinHash dedup) of the folded
prompt without its system messages (a system prompt shared by every row would make every pair look alike).
Candidates come from MinHash LSH (datasketch's MinHash, and the bands and rows datasketch's MinHashLSH picks) asked
LSH_SLACK below the threshold (at the threshold itself LSH finds a pair right at it about half the time), and each
candidate's similarity is then computed exactly from its text, re-read from the pass's temporary file: a
near-duplicate reported is one, and one missed is rare. Only representatives are indexed, so the index holds one
entry per kept row: the only memory a row costs, with the exact-match digests. The buckets are kept in one dict of
64-bit band hashes (Bands) rather than in MinHashLSH itself, which holds a set per bucket and a list of band keys per
row: 4.6 KB a row, 278 MB for the 62,000 rows of bench/ingest_speed.py's 100,000 requests, against 1.5 KB here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasketch import MinHash

PERMUTATIONS = 128  # 128 hash values per MinHash, as tasks/data/overlap.py
LSH_SLACK = 0.2  # the index answers pairs this far below the threshold (never under 0.5): recall over speed
DIGEST = 8  # bytes of blake2b per key: 2^64 values, no collision in a billion rows to speak of


def folded(text: str) -> str:
    """Case folded, whitespace runs made one space, ends stripped (as tasks/data/overlap.py folds, without its
    regex: str.split is 3x faster, and this runs on every row twice)."""
    return " ".join(text.split()).casefold()


def prompt_key(prompt: list[dict[str, str]]) -> bytes:
    """The exact-duplicate key of a prompt: a digest of its messages, roles kept, case and whitespace folded."""
    text = folded("\n".join(f"{m['role']}: {m['content']}" for m in prompt))
    return hashlib.blake2b(text.encode(), digest_size=DIGEST).digest()


def shingles(prompt: list[dict[str, str]], words_per: int) -> set[str]:
    """The word n-grams of a folded prompt without its system messages (all of it when it has fewer words)."""
    words = folded(" ".join(m["content"] for m in prompt if m["role"] != "system")).split(" ")
    return {" ".join(words[i:i + words_per]) for i in range(max(1, len(words) - words_per + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b| (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True)
class Match:
    """What a prompt repeats: `kind` exact or near, the representative's index and the similarity; kind None: new."""

    kind: str | None
    rep: int = -1
    similarity: float = 1.0


class Bands:
    """MinHash LSH's banding in one dict: 64-bit hash of (band number, band's values) -> the rows in that bucket."""

    def __init__(self, threshold: float) -> None:
        from datasketch import MinHashLSH

        probe = MinHashLSH(threshold=threshold, num_perm=PERMUTATIONS)  # its (bands, rows) for this threshold
        self.bands, self.rows = probe.b, probe.r
        self.buckets: dict[int, int | list[int]] = {}  # one row (most buckets), or the rows sharing it

    def _keys(self, sketch: MinHash) -> list[int]:
        """The bucket of each band."""
        import xxhash

        values = sketch.hashvalues
        return [xxhash.xxh64_intdigest(values[i * self.rows:(i + 1) * self.rows].tobytes(), seed=i)
                for i in range(self.bands)]

    def query(self, sketch: MinHash) -> set[int]:
        """The rows sharing a bucket with the sketch in any band."""
        found: set[int] = set()
        for key in self._keys(sketch):
            held = self.buckets.get(key)
            if isinstance(held, list):
                found.update(held)
            elif held is not None:
                found.add(held)
        return found

    def insert(self, index: int, sketch: MinHash) -> None:
        """Put a row in its bucket of every band."""
        for key in self._keys(sketch):
            held = self.buckets.get(key)
            if held is None:
                self.buckets[key] = index
            elif isinstance(held, list):
                held.append(index)
            else:
                self.buckets[key] = [held, index]


class Dedup:
    """The index of representatives' prompts: exact digests and a MinHash LSH of their n-grams."""

    def __init__(self, threshold: float, words_per: int, near: bool, fetch: Callable[[int], list[dict[str, str]]]):
        """`fetch(index)` returns a representative's prompt (re-read, to confirm a near candidate exactly)."""
        self.threshold, self.words_per, self.near, self.fetch = threshold, words_per, near and threshold < 1, fetch
        self.exact: dict[bytes, int] = {}
        self._lsh: Bands | None = None
        if self.near:
            import xxhash
            from datasketch import MinHash

            # xxh32 hashes an n-gram 3x faster than datasketch's default sha1 (97 against 300 us a 150-gram row)
            self._hash = xxhash.xxh32_intdigest
            self._perms = MinHash(num_perm=PERMUTATIONS).permutations
            self._lsh = Bands(max(0.5, threshold - LSH_SLACK))

    def _sketch(self, grams: set[str]) -> MinHash:
        """The MinHash of an n-gram set."""
        from datasketch import MinHash

        m = MinHash(num_perm=PERMUTATIONS, permutations=self._perms, scheme="affine32", hashfunc=self._hash)
        m.update_batch([g.encode() for g in grams])  # a minimum: the order is of no matter
        return m

    def match(self, prompt: list[dict[str, str]]) -> tuple[Match, tuple[bytes, MinHash | None]]:
        """Whether a prompt repeats a representative's, and its keys (for `add` when it is a new representative)."""
        key = prompt_key(prompt)
        if key in self.exact:
            return Match("exact", self.exact[key]), (key, None)
        if not self.near:
            return Match(None), (key, None)
        grams = shingles(prompt, self.words_per)
        sketch = self._sketch(grams)
        best = Match(None)
        for rep in sorted(self._lsh.query(sketch)):  # sorted: the earliest of equally similar ones wins
            similarity = jaccard(grams, shingles(self.fetch(rep), self.words_per))
            if similarity >= self.threshold and similarity > (best.similarity if best.kind else 0.0):
                best = Match("near", rep, similarity)
        return best, (key, sketch)

    def add(self, index: int, keys: tuple[bytes, MinHash | None]) -> None:
        """Index a new representative under its row index."""
        key, sketch = keys
        self.exact.setdefault(key, index)
        if self._lsh is not None and sketch is not None:
            self._lsh.insert(index, sketch)


class StaticPrompt:
    """The system prompt most rows share, found in one pass with Misra-Gries' heavy hitters (COUNTERS counters).

    A prompt held by more than 1/(COUNTERS + 1) of the rows is sure to be among the counters, and its count there
    is low by at most rows/(COUNTERS + 1) (1.5% of the rows): the decision "static" is taken on that lower bound,
    so it is never taken wrongly; the exact count is made while writing.
    """

    COUNTERS = 64

    def __init__(self) -> None:
        self.rows = 0
        self.counts: dict[bytes, int] = {}
        self.texts: dict[bytes, str] = {}

    def see(self, messages: list[dict[str, str]]) -> None:
        """Count a row's first system message (a row without one counts toward the total only)."""
        self.rows += 1
        text = next((m["content"] for m in messages[:-1] if m["role"] == "system"), None)
        if text is None:
            return
        key = hashlib.blake2b(text.encode(), digest_size=DIGEST).digest()
        if key in self.counts:
            self.counts[key] += 1
        elif len(self.counts) < self.COUNTERS:
            self.counts[key], self.texts[key] = 1, text
        else:
            for k in list(self.counts):
                self.counts[k] -= 1
                if not self.counts[k]:
                    del self.counts[k], self.texts[k]

    def static(self, share: float) -> str | None:
        """The system prompt held by at least `share` of the rows (on the lower bound of its count), or None."""
        if not self.counts:
            return None
        key = max(self.counts, key=lambda k: (self.counts[k], k))
        return self.texts[key] if self.counts[key] >= share * self.rows else None
