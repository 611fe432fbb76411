"""Relabeling: a stronger model writes new answers for an ingest folder's rows, beside the originals.

Each SPLIT.jsonl asked for gets SPLIT.relabeled.jsonl: the same rows, in the same order, with the same ids, the new
answer last and the original in `original`. A row whose call failed, was cut at max_tokens, refused, or was not sent
(the dollar cap, a failing endpoint) keeps its original answer with `relabeled: false`; the next run with the same
model, mode and instructions asks only those (an answered row is never paid for twice). The originals are never
written. Calls go through the judge's client (tasks/api/client.py): its preflight, concurrency, pacing, retries,
prices and dollar cap; the key is read where it is used and never written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.api.client import Caller, Endpoint, Reply, preflight, resolve_api_key, run_async
from tasks.core.errors import UserError
from tasks.ingest.config import RelabelConfig

WHO = "relabel"
MANIFEST = "relabel.json"
REVISE = ("Below are a conversation and the answer it got. Rewrite the answer as the instructions say. Reply with the "
          "rewritten answer only.")


def relabeled_name(split: str) -> str:
    """The file a split's relabeled rows are written to."""
    return f"{split}.relabeled.jsonl"


def _rows(path: Path) -> list[dict[str, Any]]:
    """An ingest output's rows; one line naming the file and line for one that is not a row with an answer."""
    if not path.is_file():
        raise UserError(f"{path}: not found (relabel reads an ingest folder's {path.name})")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: broken JSON line ({e.msg})") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) \
                    or msgs[-1].get("role") != "assistant" or not isinstance(row.get("id"), str):
                raise UserError(f"{path}:{number}: not an ingest row (an id, and messages ending in the answer)")
            rows.append(row)
    return rows


def _settings(cfg: RelabelConfig, instructions: str | None) -> dict[str, Any]:
    """What makes a new answer what it is: a kept answer is reused only under the same settings."""
    return {"model": cfg.model, "base_url": cfg.base_url, "mode": cfg.mode, "max_tokens": cfg.max_tokens,
            "instructions_sha256": hashlib.sha256(instructions.encode()).hexdigest() if instructions else None}


def _ask(row: dict[str, Any], cfg: RelabelConfig, instructions: str | None, static: str | None) -> list[dict[str, str]]:
    """The messages sent for a row: its prompt (the pruned static prompt put back), or the revision request."""
    prompt = [{"role": m["role"], "content": m["content"]} for m in row["messages"][:-1]]
    if static and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": static}, *prompt]
    if cfg.mode == "regenerate":
        return ([{"role": "system", "content": instructions}] if instructions else []) + prompt
    shown = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)
    return [{"role": "system", "content": str(instructions)},
            {"role": "user", "content": f"{REVISE}\n\n<conversation>\n{shown}\n</conversation>\n\n<answer>\n"
                                        f"{row['messages'][-1]['content']}\n</answer>"}]


def _outcome(reply: Reply) -> str:
    """'relabeled', or why the row keeps its original answer."""
    if reply.skipped:
        return "not sent: dollar cap"
    if reply.halted:
        return "not sent: endpoint failing"
    if reply.error:
        return "failed"
    if reply.finish_reason == "length":
        return "cut (max_tokens)"
    if reply.content is None or not reply.content.strip():
        return "refused" if reply.refusal else "empty answer"
    return "relabeled"


@dataclass
class Done:
    """One split's outcome: rows by outcome, how many answers changed, tokens."""

    outcomes: Counter[str] = field(default_factory=Counter)
    changed: int = 0
    reused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _kept(folder: Path, split: str, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Answers an earlier run made under the same settings, by row id (a different model or mode reuses none)."""
    path, manifest = folder / relabeled_name(split), folder / MANIFEST
    if not path.is_file() or not manifest.is_file():
        return {}
    if json.loads(manifest.read_text(encoding="utf-8")).get("settings") != settings:
        raise UserError(f"{path}: made with other settings (model, mode, instructions or max_tokens; see {manifest}); "
                        "delete it to relabel anew")
    return {r["id"]: r for r in _rows(path) if r.get("relabeled")}


async def _answer(make: Callable[[], Caller], asks: list[list[dict[str, str]]],
                  max_tokens: int) -> tuple[Caller, list[Reply]]:
    """The caller (made in the loop that uses its connections) and every request's reply: it caps concurrency and
    dollars, and stops sending to a failing endpoint."""
    caller = make()

    async def one(messages: list[dict[str, str]]) -> Reply:
        reply = await caller.complete(messages, max_tokens)
        if reply.halted:
            caller.tally.halted += 1
        elif not reply.skipped:
            caller.tally.add(reply.error)
        return reply

    caller.tally.planned += len(asks)
    try:
        return caller, list(await asyncio.gather(*(one(m) for m in asks)))
    finally:
        await caller.close()


@dataclass
class Split:
    """One file to relabel: its rows, the answers an earlier run kept, and the rows to ask."""

    name: str
    rows: list[dict[str, Any]]
    kept: dict[str, dict[str, Any]]

    @property
    def todo(self) -> list[dict[str, Any]]:
        """The rows without a kept answer to the same original."""
        return [r for r in self.rows
                if not (r["id"] in self.kept and self.kept[r["id"]]["original"] == r["messages"][-1]["content"])]


def _assemble(split: Split, replies: dict[str, Reply]) -> tuple[list[dict[str, Any]], Done]:
    """A split's rows with their new answers (or originals, or an earlier run's), and what happened."""
    done, out = Done(), []
    for row in split.rows:
        original = row["messages"][-1]["content"]
        if row["id"] not in replies:  # answered by an earlier run under the same settings
            out.append(split.kept[row["id"]])
            done.reused += 1
            done.outcomes["relabeled"] += 1
            done.changed += split.kept[row["id"]]["messages"][-1]["content"] != original
            continue
        reply = replies[row["id"]]
        outcome = _outcome(reply)
        done.outcomes[outcome] += 1
        done.prompt_tokens += reply.prompt_tokens
        done.completion_tokens += reply.completion_tokens
        answer = reply.content if outcome == "relabeled" and reply.content is not None else original
        done.changed += answer != original
        out.append({**row, "messages": [*row["messages"][:-1], {"role": "assistant", "content": answer}],
                    "original": original, "relabeled": outcome == "relabeled"})
    return out, done


def _write(path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write rows under a temporary name, then rename; {rows, bytes, sha256}."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    temp = path.with_name(f".relabel-{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)
    return {"rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _text(path: str | None) -> str | None:
    """A text file's content (the instructions), or None."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"{path}: instructions file not found")
    return Path(path).read_text(encoding="utf-8")


def run_relabel(cfg: RelabelConfig, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Relabel the folder's splits; write SPLIT.relabeled.jsonl and relabel.json; return the manifest."""
    from tasks.config.schema import ModelPrice

    folder = Path(cfg.folder)
    if not (folder / "ingest.json").is_file():
        raise UserError(f"{cfg.folder}: not an ingest folder (no ingest.json; write one with python -m flows.ingest)")
    instructions = _text(cfg.instructions)
    static_file = folder / "static_prompt.txt"
    static = static_file.read_text(encoding="utf-8") if static_file.is_file() else None
    ep = Endpoint(cfg.model, cfg.base_url, cfg.api_key_env, cfg.api_key_secret, cfg.concurrency, cfg.rpm, None,
                  cfg.max_retries, cfg.timeout_s)
    preflight(ep, WHO)  # a wrong key, model or endpoint: one line before anything is asked
    price = ModelPrice(input=cfg.price_input, output=cfg.price_output) if cfg.price_input is not None else None
    log(f"relabel {', '.join(cfg.splits)} of {cfg.folder} with {cfg.model} ({cfg.mode})"
        + (f", at most ${cfg.max_usd:g}" if cfg.max_usd else ""))
    settings = _settings(cfg, instructions)
    splits = [Split(name, _rows(folder / f"{name}.jsonl"), _kept(folder, name, settings)) for name in cfg.splits]
    asks = [(s.name, r["id"], _ask(r, cfg, instructions, static)) for s in splits for r in s.todo]
    caller, replies = run_async(_answer(
        lambda: Caller(ep, resolve_api_key(cfg.api_key_env, cfg.api_key_secret, WHO), price, cfg.max_usd),
        [m for _, _, m in asks], cfg.max_tokens))
    by_split: dict[str, dict[str, Reply]] = {s.name: {} for s in splits}
    for (name, rid, _), reply in zip(asks, replies):
        by_split[name][rid] = reply
    written = {}
    for split in splits:
        rows, done = _assemble(split, by_split[split.name])
        written[split.name] = {
            "rows": len(rows), "outcomes": dict(sorted(done.outcomes.items())), "changed": done.changed,
            "reused": done.reused, "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "output": {"file": relabeled_name(split.name), **_write(folder / relabeled_name(split.name), rows)}}
        left = {k: n for k, n in sorted(done.outcomes.items()) if k != "relabeled"}
        log(f"{split.name}: {done.outcomes['relabeled']} of {len(rows)} rows relabeled ({done.changed} answers "
            f"changed, {done.reused} from the last run)"
            + (f"; kept the original answer: {', '.join(f'{n} {k}' for k, n in left.items())}" if left else ""))
    manifest = {"settings": settings, "api_key_env": cfg.api_key_env,
                "price": price.model_dump() if price else None, "max_usd": cfg.max_usd,
                "requests": caller.requests, "spent_usd": round(caller.spent_usd, 6), "splits": written}
    if caller.tally.failed:
        kind, n, line = caller.tally.most_common()
        log(f"{caller.tally.failed} calls failed (most often {kind}, {n}x: {line}); run again to ask those rows")
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
