"""When an API endpoint (the LLM judge, a reference) fails too often, and the one line that says so.

A run whose calls to one endpoint fail beyond MAX_FAILED_SHARE stops: what succeeded is kept in the store, what
failed is asked again on the next run, and nothing is ranked from failures. Once failure is certain (more failed
than the share of every call planned so far) or the endpoint looks dead (FAILED_STREAK failures in a row), no
further call is sent.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

# A run stops when more than 5% of this run's calls to an endpoint failed: a judge that answers without a verdict,
# a dead or rate-limited server. Below it, the few failures are left out of the ratings (and asked again next run).
MAX_FAILED_SHARE = 0.05
MIN_FAILED = 2  # ...but one odd reply of a small run (12 calls: 1 is 8%) never stops it, unless it was the only call
FAILED_STREAK = 20  # this many failures in a row: the endpoint is down or broken, stop sending at once


def error_kind(error: str) -> str:
    """The class of an error line, for counting: 'api: 500', 'api: connection error', 'unparseable', 'refused'."""
    parts = [p.strip() for p in error.split(":")]
    if parts[0] == "api" and len(parts) > 1:
        return f"api: {parts[1]}"
    return parts[0]


def too_many(failed: int, total: int) -> bool:
    """Whether `failed` of `total` calls is beyond the share a run may lose."""
    return failed > MAX_FAILED_SHARE * total and (failed >= MIN_FAILED or failed == total)


@dataclass
class Tally:
    """Outcomes of one run's calls to an endpoint: the failure share, the most common error, one raw answer."""

    planned: int = 0  # calls planned in this run so far (the share of these is the certain outcome)
    done: int = 0  # calls that came back (answered or failed)
    failed: int = 0
    streak: int = 0  # failures in a row, the latest last
    halted: int = 0  # calls not sent because the endpoint had already failed
    kinds: Counter = field(default_factory=Counter)  # error kind -> count
    examples: dict[str, str] = field(default_factory=dict)  # error kind -> its first full error line
    raw: str | None = None  # one answer of a failed call (a reply that held no verdict)

    def add(self, error: str | None, raw: str | None = None) -> None:
        """Count one call that came back, failed when `error` is set."""
        self.done += 1
        if error is None:
            self.streak = 0
            return
        self.failed += 1
        self.streak += 1
        kind = error_kind(error)
        self.kinds[kind] += 1
        self.examples.setdefault(kind, error)
        if raw and self.raw is None:
            self.raw = raw

    @property
    def tripped(self) -> bool:
        """Whether to send nothing more: the run is sure to end beyond the share, or the endpoint looks dead."""
        return too_many(self.failed, self.planned) or self.streak >= FAILED_STREAK

    @property
    def over(self) -> bool:
        """Whether this run's calls so far failed beyond the share."""
        return too_many(self.failed, self.done)

    def most_common(self) -> tuple[str, int, str]:
        """(kind, count, one full error line) of the most common failure."""
        kind, n = self.kinds.most_common(1)[0]
        return kind, n, self.examples[kind]


def api_hint(kind: str, knob: str, where: str) -> str | None:
    """What to change for a failure of the endpoint itself; `knob` names the config section. None for other kinds."""
    if kind == "api: connection error":
        return f"{where} stopped answering: check that the server is up, then run again"
    if kind == "api: timeout":
        return f"raise {knob}.timeout_s or lower {knob}.concurrency, then run again"
    if kind == "api: 429":
        return f"lower {knob}.concurrency or set {knob}.rpm and {knob}.tpm to the endpoint's limits"
    if re.fullmatch(r"api: 5\d\d", kind):
        return "the server failed (see its logs): run again once it is healthy"
    if kind == "api: not a chat completion":
        return f"is {knob}.base_url an OpenAI-compatible API (it usually ends in /v1)?"
    if kind.startswith("api: 4"):
        return f"the server rejected the requests (see its message): check {knob}.model and {knob}.max_tokens"
    return None


def kept_line(ok: int, what: str) -> str:
    """What a stopped run keeps: its `ok` successful results (`what`: verdicts, answered rows)."""
    if ok == 0:
        return "nothing succeeded, so nothing is kept; the next run asks again"
    return f"the {ok} {what} that succeeded are kept in the store, the failed ones are asked again on the next run"


def failure_line(who: str, what: str, tally: Tally, kept: str, hint: str) -> str:
    """One line: how many calls failed and why (the most common error), one raw answer, what is kept, what to do."""
    _, n, example = tally.most_common()
    raw = f"; one answer: {json.dumps(tally.raw[:80])}" if tally.raw else ""
    halted = f", {tally.halted} more not sent" if tally.halted else ""
    return (f"{who}: {tally.failed} of {tally.done} {what} failed in this run{halted} (most common, {n}x: {example}"
            f"{raw}); {kept}. To fix: {hint}")


def fatal_line(who: str, fatal: str, where: str, api_key_env: str, kept: str) -> str:
    """One line for a 401/403/404 met mid-run (`fatal` is 'api: <status>: <message>')."""
    _, code, msg = (fatal.split(":", 2) + ["", ""])[:3]
    code, msg = code.strip(), msg.strip()
    if code == "401":
        what = f"rejected the API key from ${api_key_env} (401) at /chat/completions: set a valid key"
    elif code == "403":
        what = f"refused access with this API key (403: {msg})"
    else:
        what = f"answered {code} to /chat/completions ({msg}): check the model id and base_url"
    return f"{who}: {where} {what}; {kept}"
