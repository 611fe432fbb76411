"""What an ingest leaves beside its rows: ingest.json (the manifest: source, options, window, counts at every step,
sha256 of every output) and ingest.md (what was kept, dropped and changed, with a few examples of each).

Both hold only what the source and the options determine (no clock time, no output path), so the same source and
options give the same bytes. No example shows a find of the scrubber: snippets are masked whatever --keep-pii says.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.ingest.ingest import Plan, Tally
    from tasks.ingest.scrub import Scrubber

MANIFEST_VERSION = 1


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read 1 MB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    temp = path.with_name(f".ingest-{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def _iso(moment: Any) -> str | None:
    """A datetime as ISO text (None stays None)."""
    return moment.isoformat() if moment is not None else None


def _window(plan: Plan, tally: Tally) -> dict[str, Any]:
    """The window asked for, the one observed in the kept rows, and the frozen one that reproduces this ingest."""
    cfg = plan.cfg
    end = tally.last + timedelta(microseconds=1) if tally.last else None  # until is exclusive
    return {"since": _iso(cfg.since), "until": _iso(cfg.until), "first": _iso(tally.first), "last": _iso(tally.last),
            "frozen": {"since": _iso(cfg.since or tally.first), "until": _iso(cfg.until or end)}}


def _counts(plan: Plan, tally: Tally, scrubber: Scrubber) -> dict[str, Any]:
    """Counts at every step, in the pipeline's order."""
    unreadable = sum(tally.unreadable.values())
    return {
        "lines": tally.lines,
        "unreadable": dict(sorted(tally.unreadable.items())),
        "rows_read": tally.lines - unreadable,
        "dropped": dict(sorted(tally.dropped.items())),
        "kept_after_filters": tally.kept,
        "changed": dict(sorted(tally.changed.items())),
        "pii_found": dict(sorted(scrubber.found.items())),
        "rows_with_pii": scrubber.rows,
        "pii_replaced": plan.cfg.scrub_pii,
        "exact_duplicates": tally.duplicates["exact"],
        "near_duplicates": tally.duplicates["near"],
        "duplicates_dropped": tally.duplicates_dropped,
        "rows": tally.rows,
        "static_prompt_rows": tally.static_rows,
        "split": {s: {"rows": tally.sides[s], "groups": len(tally.groups[s])} for s in tally.groups
                  if s != "held_out" or plan.cfg.held_out_share},
        "grouped_by": plan.cfg.group_by or "near-duplicate cluster",
        "rows_without_group_key": tally.without_group,
    }


def _source(plan: Plan) -> dict[str, Any]:
    """The source as read: each file's size and sha256, or what the stored-completions API was asked and answered."""
    if plan.listing is not None:
        return {"path": plan.cfg.source, "api": plan.listing.manifest()}
    return {"path": plan.cfg.source, "files": [{"path": str(f), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
                                               for f in plan.files]}


def manifest(plan: Plan, tally: Tally, scrubber: Scrubber, static_text: str | None,
             outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest as a dict (ingest.json)."""
    cfg = plan.cfg
    static = None
    if static_text is not None:
        static = {"sha256": hashlib.sha256(static_text.encode()).hexdigest(), "chars": len(static_text),
                  "rows": tally.static_rows, "share": round(tally.static_rows / tally.rows, 4),
                  "pruned": cfg.prune_static, "file": "static_prompt.txt" if cfg.prune_static else None}
    rows = {f"{s}.jsonl": tally.sides[s] for s in tally.groups}
    return {
        "manifest_version": MANIFEST_VERSION,
        "source": _source(plan),
        "options": cfg.model_dump(mode="json", exclude={"out"}),
        "window": _window(plan, tally),
        "counts": _counts(plan, tally, scrubber),
        "static_prompt": static,
        "outputs": {name: {"rows": rows.get(name), **info} for name, info in outputs.items()},
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in rows])


def _reasons(counts: dict[str, int]) -> str:
    """'3 error, 2 cut (length)' or 'none'."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def shortfall(c: dict[str, Any]) -> str | None:
    """A line when a side is too small for the search (fewer test rows than its intervals need, or no training row),
    with how many lines each step took away; else None."""
    from tasks.data.load import MIN_TEST_ROWS

    test, train = c["split"]["test"]["rows"], c["split"]["train"]["rows"]
    if test >= MIN_TEST_ROWS and train:
        return None
    return (f"too few rows for a search: {train} train and {test} test (it needs a training row and {MIN_TEST_ROWS} "
            f"test rows); of {c['lines']} lines, unreadable: {_reasons(c['unreadable'])}; dropped: "
            f"{_reasons(c['dropped'])}; duplicates dropped: {c['duplicates_dropped']}")


def markdown(m: dict[str, Any], examples: dict[str, list[str]], static_text: str | None) -> str:
    """ingest.md: the steps with their counts, the examples, the window and the outputs."""
    c, o = m["counts"], m["options"]
    split = c["split"]
    steps = [
        ["read", c["lines"], c["rows_read"], f"unreadable: {_reasons(c['unreadable'])}"],
        ["filters", c["rows_read"], c["kept_after_filters"], f"dropped: {_reasons(c['dropped'])}"],
        ["normalised", c["kept_after_filters"], c["kept_after_filters"], f"rows changed: {_reasons(c['changed'])}"],
        ["personal data and secrets", c["kept_after_filters"], c["kept_after_filters"],
         f"{c['rows_with_pii']} rows: {_reasons(c['pii_found'])}; "
         + ("replaced by <TYPE> placeholders" if c["pii_replaced"] else "only counted (--keep-pii)")],
        ["duplicates", c["kept_after_filters"], c["rows"],
         f"{c['exact_duplicates']} exact, {c['near_duplicates']} near (Jaccard >= {o['near_threshold']:g}, word {o['shingle_words']}-grams); {c['duplicates_dropped']} dropped"],
        ["static system prompt", c["rows"], c["rows"], f"{c['static_prompt_rows']} rows"
         + ((" (pruned, in static_prompt.txt)" if o["prune_static"] else " (kept in the rows; --prune-static "
            "removes it)") if static_text is not None else ": none in "
            f"{o['static_share']:.0%} of the rows or more")],
        ["split", c["rows"], c["rows"], "; ".join(f"{s} {v['rows']} rows in {v['groups']} "
                                                  f"group{'s' * (v['groups'] != 1)}" for s, v in split.items()) + f", grouped by {c['grouped_by']}"
         + (f" ({c['rows_without_group_key']} rows without it: by cluster)" if c["rows_without_group_key"] else "")],
    ]
    written = ", ".join(f"{s} {v['rows']}" for s, v in split.items())
    lines = [f"# Ingest of {m['source']['path']}", "",
             f"{c['lines']} lines read, {c['rows']} rows written: {written}.", "",
             "## Steps", "", _table(["step", "rows in", "rows out", "what"], steps), ""]
    short = shortfall(c)
    if short:
        lines[3:3] = [f"**Warning: {short}.**", ""]
    if static_text is not None:
        shown = static_text if len(static_text) <= 400 else static_text[:400] + "..."
        lines += ["## Static system prompt", "", "```", shown.replace("```", "'''"), "```", ""]
    if examples:
        lines += ["## Examples", "", "Text is masked: no e-mail, phone, card, IBAN, IP or key is shown here.", ""]
        for kind in sorted(examples):
            lines += [f"**{kind}**", ""] + [f"- {e}" for e in examples[kind]] + [""]
    w = m["window"]
    lines += ["## Window", "", f"Asked: since {w['since'] or '-'}, until {w['until'] or '-'}. Rows from "
              f"{w['first'] or '-'} to {w['last'] or '-'}. To reproduce: --since {w['frozen']['since'] or '-'} --until "
              f"{w['frozen']['until'] or '-'}.", "",
              "## Outputs", "", _table(["file", "rows", "bytes", "sha256"],
                                       [[n, v["rows"] if v["rows"] is not None else "", v["bytes"], v["sha256"]]
                                        for n, v in m["outputs"].items()]), ""]
    return "\n".join(lines)


def finish(plan: Plan, tally: Tally, scrubber: Scrubber, static_text: str | None, written: dict[str, dict[str, Any]],
           log: Callable[[str], None]) -> dict[str, Any]:
    """Write static_prompt.txt (when pruned), ingest.md and ingest.json; remove an earlier ingest's leftovers."""
    out, cfg = plan.out, plan.cfg
    outputs = dict(written)
    if cfg.prune_static and static_text is not None:
        _write_atomic(out / "static_prompt.txt", static_text)
        outputs["static_prompt.txt"] = {"bytes": len(static_text.encode()),
                                        "sha256": file_sha256(out / "static_prompt.txt")}
    for stale in ("held_out.jsonl", "static_prompt.txt"):
        if stale not in outputs:
            (out / stale).unlink(missing_ok=True)
    m = manifest(plan, tally, scrubber, static_text, outputs)
    report = markdown(m, tally.examples, static_text)
    _write_atomic(out / "ingest.md", report)
    m["outputs"]["ingest.md"] = {"rows": None, "bytes": len(report.encode()),
                                 "sha256": hashlib.sha256(report.encode()).hexdigest()}
    _write_atomic(out / "ingest.json", json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    c = m["counts"]
    log(f"{c['lines']} lines: {c['rows_read']} read, {c['kept_after_filters']} kept by the filters "
        f"(dropped: {_reasons(c['dropped'])}), {c['rows']} after dedup ({c['exact_duplicates']} exact, "
        f"{c['near_duplicates']} near; {c['duplicates_dropped']} dropped)")
    log(f"personal data and secrets: {c['rows_with_pii']} rows, {_reasons(c['pii_found'])} "
        f"({'replaced' if c['pii_replaced'] else 'kept: --keep-pii'})")
    if c["unreadable"]:
        log(f"unreadable lines skipped: {_reasons(c['unreadable'])}, first {tally.first_unreadable}")
    log("written: " + ", ".join(f"{s} {v['rows']} rows" for s, v in c["split"].items()))
    short = shortfall(c)
    if short:
        log(f"warning: {short}")
    return m
