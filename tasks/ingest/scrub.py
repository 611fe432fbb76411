"""Secrets and personal data found in text and replaced by typed placeholders (<EMAIL>, <PHONE>, <CARD>...).

Phone numbers come from `phonenumbers` (Google's libphonenumber: every region's numbering plan, so "+44 20 7946
0958" and "(415) 555-0132" count and a date or an order number does not). The rest are patterns checked the way
their issuers define them: card numbers by the Luhn checksum (a random 16-digit number passes 1 time in 10), IBANs
by their ISO 7064 mod-97 check (1 in 97), IP addresses by the ipaddress module, API keys by their vendors' fixed
prefixes (sk-, AKIA, ghp_, xox?-, AIza, PEM private keys). Presidio would bring the same patterns but needs spaCy
(17 packages) and loads a spaCy model (en_core_web_lg, about 400 MB downloaded) for its default analyzer: too much
for six patterns, and no download can be counted on where this runs.

Detectors run in the order of DETECTORS on the text with earlier finds already masked, so a card number is never
also read as a phone number, nor an e-mail's digits as anything else.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

KEY_PATTERNS = [
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    r"\bsk-[A-Za-z0-9_-]{20,}",  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), Stripe secret keys (sk_live is below)
    r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b", r"\bgithub_pat_[A-Za-z0-9_]{40,}",  # GitHub tokens
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"\bAIza[0-9A-Za-z_-]{35}",  # Google API keys
    r"\bhf_[A-Za-z0-9]{30,}",  # Hugging Face
]
API_KEY = re.compile("|".join(f"(?:{p})" for p in KEY_PATTERNS))
EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# Groups of 4 after the country and check digits, the last one shorter; the space-separated form is the printed one.
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
# 13-19 digits, spaces or dashes between them, starting 2-6 (Mastercard 2/5, Amex/Diners 3, Visa 4, Discover 6).
CARD = re.compile(r"(?<![\d-])[2-6](?:[ -]?\d){12,18}(?![\d])")
OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\d.]){OCTET}(?:\.{OCTET}){{3}}(?!\d|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE_HINT = re.compile(r"\d[\d\s().-]{5,}\d")  # 7+ digits with separators: only then is phonenumbers asked
# Cheap tests a text must pass before a detector's pattern runs: most texts hold nothing, and the patterns cost
# 5-50 us a text each where `in` and a one-class search cost well under 1 (profiled on the test traffic: the key
# pattern alone took 40% of the ingest before these).
KEY_HINTS = ("sk-", "sk_", "rk_", "AKIA", "ASIA", "gh", "github_pat_", "xox", "AIza", "hf_", "-----BEGIN")
IBAN_HINT = re.compile(r"[A-Z]{2}\d\d")
CARD_HINT = re.compile(r"\d[\d -]{11,}\d")
IPV4_HINT = re.compile(r"\d\.\d")

Span = tuple[int, int]
# Texts remembered with their scrubbed form: a static system prompt recurs in most rows, and each turn of a thread
# repeats the turns before it. 4,096 texts of a few KB: some MB.
CACHED = 4096


def luhn(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """The ISO 7064 mod-97 check of an IBAN (spaces ignored)."""
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _keys(text: str) -> Iterator[Span]:
    """Spans of API keys and private keys."""
    if not any(hint in text for hint in KEY_HINTS):
        return iter(())
    return (m.span() for m in API_KEY.finditer(text))


def _emails(text: str) -> Iterator[Span]:
    """Spans of e-mail addresses."""
    return (m.span() for m in EMAIL.finditer(text)) if "@" in text else iter(())


def _ibans(text: str) -> Iterator[Span]:
    """Spans of IBANs that pass the mod-97 check (without a trailing short word the pattern may have taken)."""
    if not IBAN_HINT.search(text):
        return
    for m in IBAN.finditer(text):
        found = m.group()
        if iban_ok(found):
            yield m.span()
        elif " " in found and iban_ok(found.rsplit(" ", 1)[0]):
            yield m.start(), m.start() + len(found.rsplit(" ", 1)[0])


def _cards(text: str) -> Iterator[Span]:
    """Spans of card numbers that pass the Luhn check."""
    if not CARD_HINT.search(text):
        return
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn(digits):
            yield m.span()


def _ips(text: str) -> Iterator[Span]:
    """Spans of IPv4 and IPv6 addresses (an IPv6 one needs 3 groups written: "12:30:45" is a time)."""
    if IPV4_HINT.search(text):
        yield from (m.span() for m in IPV4.finditer(text))
    if text.count(":") < 2:
        return
    for m in IPV6.finditer(text):
        try:
            ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        if sum(1 for g in m.group().split(":") if g) >= 3:
            yield m.span()


def _phones(region: str) -> Callable[[str], Iterator[Span]]:
    """A detector of valid phone numbers of `region` (and any international one)."""
    def find(text: str) -> Iterator[Span]:
        """Spans of phone numbers phonenumbers holds valid."""
        if not PHONE_HINT.search(text):  # most texts have no digit run: phonenumbers costs ~100 us a text
            return
        from phonenumbers import PhoneNumberMatcher

        yield from ((m.start, m.end) for m in PhoneNumberMatcher(text, region))

    return find


def detectors(region: str) -> list[tuple[str, Callable[[str], Iterator[Span]]]]:
    """(placeholder type, detector) in the order they run."""
    return [("API_KEY", _keys), ("EMAIL", _emails), ("IBAN", _ibans), ("CARD", _cards), ("IP", _ips),
            ("PHONE", _phones(region))]


def mask(text: str, finders: list[tuple[str, Callable[[str], Iterator[Span]]]], counts: Counter[str]) -> str:
    """The text with every find replaced by <TYPE>, each detector run on the text the earlier ones masked."""
    for kind, detect in finders:
        spans = sorted(detect(text))
        if not spans:
            continue
        pieces, last = [], 0
        for start, end in spans:
            if start < last:  # overlapping finds of one detector: the first wins
                continue
            pieces += [text[last:start], f"<{kind}>"]
            last = end
            counts[kind] += 1
        text = "".join(pieces) + text[last:]
    return text


class Scrubber:
    """Finds (and replaces) secrets and personal data; counts what it found by type."""

    def __init__(self, region: str, replace: bool) -> None:
        self.found: Counter[str] = Counter()  # occurrences by type, over every row scrubbed
        self.rows = 0  # rows with at least one find
        self.replace = replace
        self.finders = detectors(region)
        self._seen: dict[str, tuple[str, Counter[str]]] = {}  # recent texts: a static system prompt, a thread's turns

    def text(self, text: str, counts: Counter[str]) -> str:
        """The text with every find replaced by <TYPE> (unchanged with replace off); finds added to counts."""
        if text not in self._seen:
            if len(self._seen) >= CACHED:
                self._seen.clear()
            found: Counter[str] = Counter()
            self._seen[text] = (mask(text, self.finders, found), found)
        masked, found = self._seen[text]
        counts.update(found)
        return masked if self.replace else text

    def value(self, value: Any, counts: Counter[str]) -> Any:
        """Any JSON value with its strings scrubbed."""
        if isinstance(value, str):
            return self.text(value, counts)
        if isinstance(value, list):
            return [self.value(v, counts) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v, counts) for k, v in value.items()}
        return value

    def messages(self, messages: list[dict[str, str]], counts: Counter[str]) -> list[dict[str, str]]:
        """The messages scrubbed; finds added to counts."""
        return [{"role": m["role"], "content": self.text(m["content"], counts)} for m in messages]

    def tally(self, counts: Counter[str]) -> None:
        """Add one row's finds to the totals."""
        self.found.update(counts)
        self.rows += bool(counts)


def snippet(text: str, scrubber: Scrubber, width: int = 160) -> str:
    """A short one-line excerpt for the report, always masked (the report never shows a find, whatever the option)."""
    one = " ".join(text.split())
    shown = mask(one[: width * 2], scrubber.finders, Counter())[:width]
    return shown + ("..." if len(one) > width else "")
