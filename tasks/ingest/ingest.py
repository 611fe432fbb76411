"""The ingest, planned then run: one streaming pass reads, filters, normalises, scrubs and de-duplicates into a
temporary file; a second pass over it splits the rows and writes the outputs; the manifest and the report last.

Memory per row is the dedup index (an exact digest and a MinHash LSH entry per kept row, an offset into the
temporary file) and, for rows that have duplicates, the source ids they absorbed; the rows themselves stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tasks.core.errors import UserError
from tasks.ingest.config import IngestConfig
from tasks.ingest.dedup import Dedup, StaticPrompt
from tasks.ingest.filters import drop_reason
from tasks.ingest.normalize import Unreadable
from tasks.ingest.scrub import Scrubber, snippet
from tasks.ingest.sources import raw_rows, source_files, to_record
from tasks.ingest.split import SIDES, group_hash, group_key, side
from tasks.ingest.stored import Listing, is_stored, listing_of, stored_rows

OUTPUTS = ("train.jsonl", "test.jsonl", "held_out.jsonl", "static_prompt.txt", "ingest.json", "ingest.md")
RELABEL_OUTPUTS = ("relabel.json", ".relabeled.jsonl")  # kept by a new ingest: the next relabel asks only new rows
EARLY_LINES = 100  # the first lines all unreadable: the wrong file, said at once instead of after a full read


@dataclass(frozen=True)
class Plan:
    """What an ingest will read and write, checked before anything is read."""

    cfg: IngestConfig
    files: tuple[Path, ...]
    out: Path
    listing: Listing | None = None  # a stored-completions source: what is asked of the API, and what it answered

    def reads(self) -> str:
        """What the ingest reads, in words."""
        if self.listing is not None:
            asked = ", ".join(f"{k} {v}" for k, v in self.listing.filters.items()) or "no filter"
            return (f"list the stored completions of {self.listing.where} ({asked}; oldest first, "
                    f"{self.cfg.page_size} a page), then each kept one's messages")
        size = sum(f.stat().st_size for f in self.files)
        return (f"read {len(self.files)} file(s), {size / 1e6:.1f} MB: {', '.join(str(f) for f in self.files[:3])}"
                + (" ..." if len(self.files) > 3 else ""))

    def rows(self) -> Iterator[tuple[str, Any]]:
        """(where, raw row or Unreadable) for every row of the source, in order."""
        if self.listing is not None:
            yield from stored_rows(self.cfg, self.listing)
            return
        for path in self.files:
            for number, raw in raw_rows(path):
                yield f"{path}:{number}", raw

    def lines(self) -> list[str]:
        """The plan in words: the source, each step on or off, the outputs."""
        c = self.cfg
        keep = [f"models {', '.join(c.models)}" if c.models else "",
                " ".join(f"{k}={v}" for k, v in c.metadata.items()),
                f"since {c.since.isoformat()}" if c.since else "", f"until {c.until.isoformat()}" if c.until else ""]
        return [
            self.reads(),
            f"keep {'; '.join(k for k in keep if k) or 'every model and time'}; drop errors, cut answers, refusals, "
            f"empty answers, images" + (", tool calls" if c.tool_calls == "drop" else ""),
            f"personal data and secrets: {'replaced by placeholders' if c.scrub_pii else 'counted only (--keep-pii)'}",
            f"duplicates: exact {'dropped' if c.exact_dedup else 'kept'}, near (Jaccard >= {c.near_threshold:g} on "
            f"word {c.shingle_words}-grams) {'dropped' if c.near_dedup else 'kept'}",
            f"split by {c.group_by or 'near-duplicate cluster'}: test {c.test_share:.0%}"
            + (f", held out {c.held_out_share:.0%}" if c.held_out_share else "")
            + f"; static system prompt {'pruned' if c.prune_static else 'reported'}",
            f"write {self.out}/: train.jsonl, test.jsonl" + (", held_out.jsonl" if c.held_out_share else "")
            + ", ingest.json, ingest.md",
        ]


def relabel_output(name: str) -> bool:
    """Whether a file in the output folder is relabel's (left alone by an ingest into the same folder)."""
    return name == RELABEL_OUTPUTS[0] or name.endswith(RELABEL_OUTPUTS[1])


def plan_ingest(cfg: IngestConfig) -> Plan:
    """Check the source and the output folder; UserError in one line when either is wrong."""
    listing = listing_of(cfg) if is_stored(cfg.source) else None
    files = [] if listing else source_files(cfg.source)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{cfg.out}: exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and not p.name.startswith(".ingest-")
                         and not relabel_output(p.name))
        if foreign:
            raise UserError(f"{cfg.out}: holds files an ingest did not write ({', '.join(foreign[:3])}); name a new "
                            "or empty folder, or an earlier ingest's")
    resolved = out.resolve()
    for f in files:
        if f.resolve().parent == resolved and f.name in OUTPUTS:
            raise UserError(f"{f}: the source is one of the files this ingest would write; name another --out")
    return Plan(cfg, tuple(files), out, listing)


@dataclass
class Tally:
    """Counts at every step, and a few examples of each kind for the report."""

    shown: int
    lines: int = 0
    unreadable: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    changed: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)  # exact / near found
    duplicates_dropped: int = 0
    kept: int = 0  # rows after the filters
    rows: int = 0  # rows after dedup
    first: datetime | None = None
    last: datetime | None = None
    without_group: int = 0
    static_rows: int = 0
    sides: Counter[str] = field(default_factory=Counter)
    groups: dict[str, set[str]] = field(default_factory=lambda: {s: set() for s in SIDES})
    examples: dict[str, list[str]] = field(default_factory=dict)
    first_unreadable: str = ""

    def wants(self, kind: str) -> bool:
        """Whether another example of a kind is still wanted (asked first: making one costs a scrub)."""
        return len(self.examples.get(kind, ())) < self.shown

    def example(self, kind: str, text: str) -> None:
        """Keep an example line of a kind, up to `shown` of them."""
        if self.wants(kind):
            self.examples.setdefault(kind, []).append(text)

    def saw_time(self, moment: datetime | None) -> None:
        """Widen the observed window."""
        if moment is not None:
            self.first = moment if self.first is None or moment < self.first else self.first
            self.last = moment if self.last is None or moment > self.last else self.last


class TempRows:
    """Rows appended to a temporary JSONL file, each re-readable by index (the dedup's exact confirmation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "w+b")  # noqa: SIM115 - closed by close(), the pass's finally
        self.offsets = array("q")
        self.end = 0

    def append(self, row: dict[str, Any]) -> int:
        """Write a row; its index."""
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        self.offsets.append(self.end)
        self.fh.write(data)
        self.end += len(data)
        return len(self.offsets) - 1

    def get(self, index: int) -> dict[str, Any]:
        """The row at an index."""
        self.fh.flush()
        start = self.offsets[index]
        stop = self.offsets[index + 1] if index + 1 < len(self.offsets) else self.end
        return json.loads(os.pread(self.fh.fileno(), stop - start, start))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every row in order."""
        self.fh.flush()
        with open(self.path, "rb") as fh:
            for line in fh:
                yield json.loads(line)

    def close(self) -> None:
        """Close and delete the file."""
        self.fh.close()
        self.path.unlink(missing_ok=True)


def row_id(messages: list[dict[str, str]]) -> str:
    """A row's stable id: 16 hex digits of the blake2b of its normalised conversation (as read, before scrubbing)."""
    text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _last_user(messages: list[dict[str, str]]) -> str:
    """The last user turn's text (what a reader recognises a row by)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _read(plan: Plan, tally: Tally, scrubber: Scrubber, temp: TempRows, static: StaticPrompt) -> dict[int, list[str]]:
    """Pass one: every line read, filtered, normalised, scrubbed, de-duplicated; kept rows appended to `temp`.
    Returns representative index -> the source ids of the duplicates it absorbed."""
    cfg = plan.cfg
    # near-duplicates are looked for even with near_dedup off: kept, they are grouped with their first row
    dedup = Dedup(cfg.near_threshold, cfg.shingle_words, True, lambda i: temp.get(i)["messages"][:-1])
    absorbed: dict[int, list[str]] = {}
    kept_copies: Counter[int] = Counter()  # exact copies kept (dedup off): their ids get a suffix to stay unique
    for where, raw in plan.rows():
        tally.lines += 1
        try:
            rec = to_record(raw, where, cfg.tool_calls, cfg.group_by)
        except Unreadable as e:
            tally.unreadable[str(e)] += 1
            tally.first_unreadable = tally.first_unreadable or f"{where}: {e}"
            tally.example(f"unreadable: {e}", where)
            if tally.lines == EARLY_LINES and sum(tally.unreadable.values()) == EARLY_LINES:
                raise UserError(f"{tally.first_unreadable}; and so are the next {EARLY_LINES - 1} lines: not a "
                                "log of chat-completion requests nor fine-tuning rows") from None
            continue
        reason = drop_reason(rec, cfg)
        if reason:
            tally.dropped[reason] += 1
            if tally.wants(f"dropped: {reason}"):
                tally.example(f"dropped: {reason}", f"{where}: {snippet(_last_user(rec.messages), scrubber)}")
            continue
        tally.kept += 1
        tally.changed.update(rec.changes)
        finds: Counter[str] = Counter()
        messages = scrubber.messages(rec.messages, finds)
        expected = scrubber.value(rec.expected, finds)
        scrubber.tally(finds)
        rid = row_id(rec.messages)
        if finds and tally.wants("personal data and secrets"):
            listed = ", ".join(f"{n} {kind}" for kind, n in sorted(finds.items()))
            shown = snippet(_last_user(messages), scrubber)
            tally.example("personal data and secrets", f"{rid} ({listed}): {shown}")
        match, keys = dedup.match(messages[:-1])
        cluster = rid
        if match.kind:
            tally.duplicates[match.kind] += 1
            if tally.wants(f"duplicate ({match.kind})"):
                how = "exact" if match.kind == "exact" else f"near, Jaccard {match.similarity:.2f}"
                tally.example(f"duplicate ({match.kind})", f"{where} repeats {temp.get(match.rep)['id']} ({how})")
            if cfg.exact_dedup if match.kind == "exact" else cfg.near_dedup:
                tally.duplicates_dropped += 1
                absorbed.setdefault(match.rep, []).append(rec.source_id)
                continue
            cluster = temp.get(match.rep)["cluster"]
            if match.kind == "exact":
                kept_copies[match.rep] += 1
                rid = f"{rid}-{kept_copies[match.rep]}"
        row = {"id": rid, "source_id": rec.source_id, "messages": messages, "group": rec.group, "cluster": cluster}
        if expected is not None:
            row["expected"] = expected
        index = temp.append(row)
        if not match.kind:
            dedup.add(index, keys)
        tally.rows += 1
        tally.saw_time(rec.time)
        static.see(messages)
    return absorbed


def _check_read(plan: Plan, tally: Tally) -> None:
    """Refuse a source with too many unreadable lines, or nothing left, in one line."""
    bad = sum(tally.unreadable.values())
    if not tally.lines:
        empty = "no stored completion listed" if plan.listing else "the file or folder is empty"
        raise UserError(f"{plan.cfg.source}: no rows ({empty})")
    if bad and bad / tally.lines > plan.cfg.max_unreadable:
        raise UserError(f"{tally.first_unreadable}; {bad} of {tally.lines} lines unreadable ({bad / tally.lines:.1%}), "
                        f"over --max-unreadable ({plan.cfg.max_unreadable:.0%}): fix the source or raise it")
    if not tally.rows:
        dropped = ", ".join(f"{n} {reason}" for reason, n in tally.dropped.most_common())
        raise UserError(f"{plan.cfg.source}: no row left of {tally.lines} lines ({dropped or 'all unreadable'}); "
                        "check --model, --metadata, --since and --until")


class Outputs:
    """The split files, written to temporary names, hashed as written, renamed into place at the end."""

    def __init__(self, out: Path, sides: tuple[str, ...]) -> None:
        self.out = out
        self.files = {s: open(out / f".ingest-{s}.tmp", "wb") for s in sides}  # noqa: SIM115 - closed in finish
        self.hashes = {s: hashlib.sha256() for s in sides}
        self.sizes = Counter[str]()

    def write(self, where: str, row: dict[str, Any]) -> None:
        """Append a row to a side's file."""
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        self.files[where].write(data)
        self.hashes[where].update(data)
        self.sizes[where] += len(data)

    def finish(self) -> dict[str, dict[str, Any]]:
        """Close, rename into place; file name -> {bytes, sha256}."""
        done = {}
        for s, fh in self.files.items():
            fh.close()
            os.replace(fh.name, self.out / f"{s}.jsonl")
            done[f"{s}.jsonl"] = {"bytes": self.sizes[s], "sha256": self.hashes[s].hexdigest()}
        return done

    def discard(self) -> None:
        """Close and delete the temporary files (after a failure)."""
        for fh in self.files.values():
            fh.close()
            Path(fh.name).unlink(missing_ok=True)


def _write(plan: Plan, tally: Tally, temp: TempRows, absorbed: dict[int, list[str]], static_text: str | None,
           outputs: Outputs, scrubber: Scrubber) -> None:
    """Pass two: each kept row given its source ids and side, its static prompt pruned, written."""
    cfg = plan.cfg
    for index, row in enumerate(temp):
        messages = row["messages"]
        if static_text is not None and messages[0]["role"] == "system" and messages[0]["content"] == static_text:
            tally.static_rows += 1
            if cfg.prune_static:
                messages = messages[1:]
        if cfg.group_by and row["group"] is None:
            tally.without_group += 1
        hashed = group_hash(group_key(row["group"], row["cluster"]))
        where = side(hashed, cfg.test_share, cfg.held_out_share)
        out = {"id": row["id"], "messages": messages, "source_ids": [row["source_id"], *absorbed.get(index, [])],
               "group": hashed}
        if "expected" in row:
            out["expected"] = row["expected"]
        outputs.write(where, out)
        tally.sides[where] += 1
        tally.groups[where].add(hashed)
        if tally.wants(f"kept ({where})"):
            tally.example(f"kept ({where})", f"{row['id']}: {snippet(_last_user(messages), scrubber)}")


def run_ingest(cfg: IngestConfig, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Ingest `cfg.source` into `cfg.out`; return the manifest (also written as ingest.json)."""
    from tasks.ingest.report import finish

    plan = plan_ingest(cfg)
    for line in plan.lines():
        log(line)
    plan.out.mkdir(parents=True, exist_ok=True)
    tally, scrubber, static = Tally(cfg.examples), Scrubber(cfg.phone_region, cfg.scrub_pii), StaticPrompt()
    temp = TempRows(plan.out / f".ingest-{os.getpid()}.tmp")
    sides = SIDES if cfg.held_out_share else SIDES[:2]
    outputs = None
    try:
        absorbed = _read(plan, tally, scrubber, temp, static)
        _check_read(plan, tally)
        static_text = static.static(cfg.static_share)
        outputs = Outputs(plan.out, sides)
        _write(plan, tally, temp, absorbed, static_text, outputs, scrubber)
        written = outputs.finish()
        outputs = None
    finally:
        temp.close()
        if outputs is not None:
            outputs.discard()
    return finish(plan, tally, scrubber, static_text, written, log)
