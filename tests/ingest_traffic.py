"""A synthetic production-traffic log for the ingest's tests and bench, with the truth of every step computed while
it is written.

Requests are logged as an SDK wrapper writes them ({"id", "timestamp", "metadata", "request", "response"}). Of n
requests: 25% exact duplicates of an earlier single-turn request (its user text upper-cased or its spacing changed,
which folding undoes), 10% near-duplicates (its user text with the last word changed: Jaccard of the 5-gram sets
(n-1)/(n+1), 0.96 for a 60-word text), 1.5% errors and 1.5% answers cut at the token limit, and the rest fresh: a
third single-turn, the rest in threads of 2-5 turns (each turn's request carries the thread so far). A fresh user text
holds an e-mail address, a phone number or a card number one time in 12 (over 5% of the rows once copies and
threads carry them). 90% of the fresh requests share one system prompt. One line is broken JSON. Words are random
syllables, so two unrelated texts share no 5-gram.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

STATIC = ("You are the support assistant of Acme Parcel. Answer in two sentences or fewer, in the customer's "
          "language, and never promise a refund: say that a human agent will confirm it.")
START = datetime(2025, 3, 3, tzinfo=timezone.utc)
USER_WORDS = 60
ANSWER_WORDS = 12


@dataclass
class Truth:
    """What every step must find, counted while the log was written."""

    lines: int = 0
    errors: int = 0
    cut: int = 0
    exact: int = 0
    near: int = 0
    kept: int = 0  # rows past the filters
    rows: int = 0  # rows past dedup
    static_rows: int = 0  # of `rows`
    pii: Counter[str] = field(default_factory=Counter)  # occurrences in rows past the filters
    pii_rows: int = 0
    thread_of: dict[str, str] = field(default_factory=dict)  # request id -> thread id, of rows past dedup
    first: datetime | None = None
    last: datetime | None = None


def luhn_card(rng: random.Random) -> str:
    """A 16-digit Visa-like number that passes the Luhn check, in groups of 4."""
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit will sit at the right: double every other from it
        d2 = d * 2 if i % 2 == 0 else d
        total += d2 - 9 if d2 > 9 else d2
    digits.append((10 - total % 10) % 10)
    text = "".join(map(str, digits))
    return " ".join(text[i:i + 4] for i in range(0, 16, 4))


class Traffic:
    """Writes the log and keeps the truth."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        self.vocab = sorted({"".join(self.rng.choice(syllables) for _ in range(self.rng.randint(2, 4)))
                             for _ in range(6000)})
        self.truth = Truth()
        self.pii_of: dict[str, Counter[str]] = {}  # user text -> the finds in it
        self.singles: list[tuple[list[dict[str, str]], str]] = []  # (prompt, thread) of good single-turn rows
        self.k = 0  # requests written
        self.unique = 0  # words made unique (near-duplicates' last words)

    def words(self, n: int) -> str:
        """n random words."""
        return " ".join(self.rng.choice(self.vocab) for _ in range(n))

    def pii(self) -> tuple[str, str]:
        """(kind, a phrase holding one find of that kind)."""
        kind = self.rng.choice(["EMAIL", "PHONE", "CARD"])
        n = self.rng.randrange(10**6)
        if kind == "EMAIL":
            return kind, f"write to me at {self.rng.choice(self.vocab)}.{n}@example.com please"
        if kind == "PHONE":
            return kind, self.rng.choice([f"call me on (415) 555-{n % 10000:04d} today",
                                          f"my number is +44 20 7946 {n % 10000:04d} ok"])
        return kind, f"charge my card {luhn_card(self.rng)} again"

    def user_text(self, with_pii: bool) -> str:
        """A fresh user text (with one find when asked), registered with its finds."""
        text = self.words(USER_WORDS)
        if with_pii:
            kind, phrase = self.pii()
            cut = USER_WORDS // 2
            parts = text.split(" ")
            text = " ".join(parts[:cut]) + " " + phrase + " " + " ".join(parts[cut:])
            self.pii_of[text] = Counter({kind: 1})
        return text

    def line(self, prompt: list[dict[str, str]], thread: str, outcome: str = "stop") -> dict[str, Any]:
        """A logged request/response pair; its answer a fresh text."""
        self.k += 1
        time = START + timedelta(seconds=60 * self.k)
        response: dict[str, Any] | None = {
            "id": f"chatcmpl-{self.k}", "object": "chat.completion", "created": int(time.timestamp()),
            "model": "gpt-4o-2024-08-06", "usage": {"prompt_tokens": 100, "completion_tokens": 20},
            "choices": [{"index": 0, "finish_reason": "length" if outcome == "cut" else "stop",
                         "message": {"role": "assistant", "content": self.words(ANSWER_WORDS)}}]}
        row: dict[str, Any] = {"id": f"req-{self.k:07d}", "timestamp": time.isoformat().replace("+00:00", "Z"),
                               "metadata": {"thread_id": thread, "app": "support"},
                               "request": {"model": "gpt-4o", "messages": prompt, "temperature": 0}}
        if outcome == "error":
            response, row["error"] = None, {"type": "server_error", "message": "upstream timed out"}
        row["response"] = response
        return row

    def keep(self, row: dict[str, Any], new: bool) -> None:
        """Count a row past the filters (and past dedup when `new`)."""
        t = self.truth
        t.kept += 1
        finds = Counter()
        for m in row["request"]["messages"]:
            finds.update(self.pii_of.get(m["content"], Counter()))
        t.pii.update(finds)
        t.pii_rows += bool(finds)
        if new:
            t.rows += 1
            t.static_rows += row["request"]["messages"][0]["content"] == STATIC
            t.thread_of[row["id"]] = row["metadata"]["thread_id"]
            time = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00"))
            t.first, t.last = t.first or time, time

    def system(self) -> list[dict[str, str]]:
        """The static system prompt 9 times in 10, else a request-specific one."""
        if self.rng.random() < 0.9:
            return [{"role": "system", "content": STATIC}]
        return [{"role": "system", "content": f"You help customer {self.words(3)} with parcel {self.k}."}]

    def single(self) -> list[dict[str, Any]]:
        """A fresh single-turn request."""
        prompt = [*self.system(), {"role": "user", "content": self.user_text(self.rng.random() < 1 / 12)}]
        thread = f"th-{self.k + 1}"
        row = self.line(prompt, thread)
        self.singles.append((prompt, thread))
        if len(self.singles) > 10_000:  # copies pick from the last 5,000: the bench's 1M rows stay small
            del self.singles[:5_000]
        self.keep(row, True)
        return [row]

    def thread(self, turns: int) -> list[dict[str, Any]]:
        """A thread: each turn's request carries the earlier turns and their answers."""
        history, rows, thread = self.system(), [], f"th-{self.k + 1}"
        for _ in range(turns):
            history = [*history, {"role": "user", "content": self.user_text(self.rng.random() < 1 / 12)}]
            row = self.line(history, thread)
            self.keep(row, True)
            rows.append(row)
            history = [*history, row["response"]["choices"][0]["message"]]
        return rows

    def copy(self, near: bool) -> list[dict[str, Any]]:
        """A later request repeating an earlier single one: folded-equal, or with its last word changed."""
        prompt, _ = self.rng.choice(self.singles[-5000:])
        text = prompt[-1]["content"]
        if near:
            self.unique += 1
            new = text.rsplit(" ", 1)[0] + f" zx{self.unique}q"
            self.truth.near += 1
        else:
            new = text.upper() if self.rng.random() < 0.5 else "  " + text.replace(" ", "  ", 1) + "\n"
            self.truth.exact += 1
        if text in self.pii_of:
            self.pii_of[new] = self.pii_of[text]
        row = self.line([*prompt[:-1], {"role": "user", "content": new}], f"th-{self.k + 1}")
        self.keep(row, False)
        return [row]

    def bad(self, outcome: str) -> list[dict[str, Any]]:
        """An error or a cut answer (a fresh prompt, dropped by the filters)."""
        if outcome == "error":
            self.truth.errors += 1
        else:
            self.truth.cut += 1
        return [self.line([*self.system(), {"role": "user", "content": self.user_text(False)}], f"th-{self.k + 1}",
                          outcome)]

    def plan(self, n: int) -> list[Any]:
        """The units to write, in order: shuffled, a single first (copies need an original)."""
        n_exact, n_near, n_err, n_cut = round(0.25 * n), round(0.10 * n), round(0.015 * n), round(0.015 * n)
        fresh = n - n_exact - n_near - n_err - n_cut
        threads: list[int] = []
        while sum(threads) < fresh * 2 // 3 - 5:
            threads.append(self.rng.randint(2, 5))
        singles = fresh - sum(threads)
        units: list[Any] = (["exact"] * n_exact + ["near"] * n_near + ["error"] * n_err + ["cut"] * n_cut
                            + ["single"] * (singles - 1) + threads)
        self.rng.shuffle(units)
        return ["single", *units]


def write_traffic(path: Path, n: int, seed: int = 0, broken_at: int | None = None) -> Truth:
    """Write n logged requests (and one broken line after `broken_at` of them, default half-way) to a JSONL file."""
    traffic = Traffic(seed)
    broken_at = n // 2 if broken_at is None else broken_at
    make = {"single": traffic.single, "exact": lambda: traffic.copy(False), "near": lambda: traffic.copy(True),
            "error": lambda: traffic.bad("error"), "cut": lambda: traffic.bad("cut")}
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        for unit in traffic.plan(n):
            for row in (traffic.thread(unit) if isinstance(unit, int) else make[unit]()):
                fh.write(json.dumps(row) + "\n")
                traffic.truth.lines += 1
                written += 1
                if written == broken_at:
                    fh.write('{"id": "req-broken", "request": {"model": "gpt-4o", "messa\n')
                    traffic.truth.lines += 1
    return traffic.truth
