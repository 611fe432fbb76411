"""Leakage between splits, found before any model loads: test prompts that also appear in the training rows.

A test row whose prompt the fine-tune saw in training measures memory, not skill: on a task solvable only by
memorising, copied rows scored 41.7% against 4.2% on fresh ones. Three kinds are counted, each test row once, in
this order:
- verbatim: the prompt (every message before the answer) equals a training prompt character for character;
- folded: equal once case is folded and runs of whitespace are one space;
- near: the Jaccard similarity of their word 3-gram sets is at least `data.near_duplicate`, system messages left
  out (a system prompt shared by every row would make every pair look alike). Candidates come from
  datasketch's MinHash LSH, asked LSH_SLACK below the threshold (LSH finds a pair right at its own threshold only
  about half the time; 0.2 below, nearly always), and every candidate's similarity is then computed exactly, so
  a near-duplicate reported is one and one missed is rare.
Duplicate rows within a training split (same prompt and answer, folded) are counted too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tasks.core.errors import UserError

if TYPE_CHECKING:
    from tasks.config.schema import DataConfig, DatasetSpec
    from tasks.data.load import Example

SHINGLE_WORDS = 3  # word 3-grams: short prompts (a ticket, an email) still have a dozen of them
PERMUTATIONS = 128  # MinHash size: 128 hash values per row
SHOWN = 3  # examples named per kind in the report and the error line
LSH_SLACK = 0.2  # the LSH index is built this far below data.near_duplicate (never under 0.5): recall over speed


def prompt_text(ex: Example) -> str:
    """The prompt a model sees for a row: every message before the answer, role and text."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in ex.prompt)


def folded(text: str) -> str:
    """Case folded, whitespace runs made one space, ends stripped."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def shingles(ex: Example) -> set[str]:
    """The word 3-grams of a row's folded prompt without its system messages (all of it when it has fewer words)."""
    words = folded(" ".join(m["content"] for m in ex.prompt if m["role"] != "system")).split(" ")
    return {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}


@dataclass(frozen=True)
class Overlap:
    """How many of a split's prompts also appear in another split, by kind, with a few (test id, train id) pairs."""

    rows: int  # test rows checked
    verbatim: list[tuple[str, str]] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    near: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Test rows that overlap, of any kind."""
        return len(self.verbatim) + len(self.folded) + len(self.near)

    @property
    def share(self) -> float:
        """The overlapping share of the test rows."""
        return self.count / self.rows if self.rows else 0.0

    def words(self) -> str:
        """'12 of 40 test prompts (30%): 8 verbatim, 3 after case/whitespace folding, 1 near-duplicate'."""
        kinds = [f"{len(self.verbatim)} verbatim", f"{len(self.folded)} after case/whitespace folding",
                 f"{len(self.near)} near-duplicate{'s' if len(self.near) != 1 else ''}"]
        return f"{self.count} of {self.rows} test prompts ({self.share:.0%}): {', '.join(kinds)}"

    def examples(self) -> str:
        """A few overlapping pairs as 'test id ~ train id', by kind."""
        pairs = [f"{kind} {t} ~ {r}" for kind, found in (("verbatim", self.verbatim), ("folded", self.folded),
                                                          ("near", self.near)) for t, r in found[:SHOWN]]
        return ", ".join(pairs[:SHOWN])


def overlap(train: list[Example], test: list[Example], near_duplicate: float) -> Overlap:
    """The test rows whose prompt appears in the training rows: verbatim, folded, or near (Jaccard >= threshold)."""
    raw = {prompt_text(ex): ex.id for ex in train}
    fold = {folded(text): rid for text, rid in raw.items()}
    result = Overlap(len(test))
    rest = []
    for ex in test:
        text = prompt_text(ex)
        key = folded(text)
        if text in raw:
            result.verbatim.append((ex.id, raw[text]))
        elif key in fold:
            result.folded.append((ex.id, fold[key]))
        else:
            rest.append((ex.id, shingles(ex)))
    if rest and near_duplicate < 1.0:
        result.near.extend(_near(train, rest, near_duplicate))
    return result


def _near(train: list[Example], rest: list[tuple[str, set[str]]], threshold: float) -> list[tuple[str, str]]:
    """(test id, train id) of each remaining test row with a training prompt at least `threshold` similar."""
    from datasketch import MinHash, MinHashLSH

    # The permutations drawn once: MinHash() draws its 128 from a seeded RandomState each time it is made (the same
    # ones, seed 1), which was half of a dry-run's leak check (3 of 6 CPU s at 3 x 6,000 rows).
    template = MinHash(num_perm=PERMUTATIONS)

    def sketch(words: set[str]) -> MinHash:
        """The MinHash of a shingle set."""
        m = MinHash(num_perm=PERMUTATIONS, permutations=template.permutations, scheme=template.scheme)
        m.update_batch([w.encode() for w in words])
        return m

    train_sets = {ex.id: shingles(ex) for ex in train}
    lsh = MinHashLSH(threshold=max(0.5, threshold - LSH_SLACK), num_perm=PERMUTATIONS)
    for rid, words in train_sets.items():
        lsh.insert(rid, sketch(words))
    found = []
    for tid, words in rest:
        best = max(((len(words & train_sets[r]) / len(words | train_sets[r]), r) for r in lsh.query(sketch(words))),
                   default=(0.0, ""))
        if best[0] >= threshold:
            found.append((tid, best[1]))
    return found


def duplicates(rows: list[Example]) -> list[tuple[str, str]]:
    """(row id, id of the earlier row it repeats) for rows whose folded prompt and answer repeat an earlier row's."""
    seen: dict[tuple[str, str], str] = {}
    out = []
    for ex in rows:
        key = (folded(prompt_text(ex)), folded(ex.answer))
        if key in seen:
            out.append((ex.id, seen[key]))
        else:
            seen[key] = ex.id
    return out


def check_leaks(cfg: DataConfig, splits: dict[str, tuple[DatasetSpec, list[Example], list[Example]]],
                held_out: str | None = None) -> list[str]:
    """Warnings for every overlap and duplicate found; UserError naming the test file when a dataset's overlap is
    over data.max_overlap. The held-out dataset (`held_out`) is compared with every other dataset's rows too."""
    lines = []
    for name, (spec, train, test) in splits.items():
        others = [ex for n, (_, tr, te) in splits.items() if n != name for ex in (*tr, *te)] if name == held_out else []
        found = overlap([*train, *others], test, cfg.near_duplicate)
        where = f"{spec.train}" + (" and every other dataset" if others else "")
        if found.share > cfg.max_overlap:
            raise UserError(f"{spec.test}: {found.words()} also appear in {where} (e.g. {found.examples()}), over "
                            f"data.max_overlap ({cfg.max_overlap:.0%}): a fine-tune would score by memorising them; "
                            f"drop those rows from the test file, or raise data.max_overlap to accept them")
        if found.count:
            lines.append(f"dataset {name}: {found.words()} also appear in {where} (e.g. {found.examples()})")
        dup = duplicates(train)
        if dup:
            shown = ", ".join(f"{a} = {b}" for a, b in dup[:SHOWN])
            lines.append(f"dataset {name}: {len(dup)} of {len(train)} training rows repeat an earlier row (prompt and "
                         f"answer, case and whitespace folded; e.g. {shown}): they weigh double in training")
    return lines
