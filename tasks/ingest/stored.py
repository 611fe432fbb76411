"""OpenAI stored completions (`store=true` traffic) as a source: listed page by page through the openai client,
oldest first, then each completion's input messages, each turned into the logged-request shape sources.py reads.

The listing asks the API for what it can filter (one model, flat metadata values) and the ingest's filters check
every row again (dated snapshots, dotted keys, the time window, which the API cannot filter: the listing stops at the
first completion at or after `until`, since it comes oldest first). A completion the selection leaves out never
costs its messages request. The key is read as the judge's is (tasks/api/client.py): never logged, never written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.core.errors import UserError
from tasks.ingest.filters import not_selected
from tasks.ingest.normalize import Unreadable
from tasks.ingest.sources import to_record

if TYPE_CHECKING:
    from openai import OpenAI

    from tasks.ingest.config import IngestConfig

STORED = "openai:stored-completions"  # the SOURCE that names this source
WHO = "ingest"  # how key and endpoint errors name the asker
MAX_RETRIES = 6  # 429, 5xx, timeouts: retried by the openai client with backoff (Retry-After honoured)
TIMEOUT_S = 60.0


def is_stored(source: str) -> bool:
    """Whether a SOURCE names the stored completions rather than a file or folder."""
    return source == STORED


def api_filters(cfg: IngestConfig) -> dict[str, Any]:
    """The list call's filters: one model (several: none, checked here), metadata keys without dots (OpenAI's
    metadata is flat text; a dotted key is checked here)."""
    filters: dict[str, Any] = {}
    if len(cfg.models) == 1:
        filters["model"] = cfg.models[0]
    flat = {k: v for k, v in cfg.metadata.items() if "." not in k}
    if flat:
        filters["metadata"] = flat
    return filters


@dataclass
class Listing:
    """What was asked of the API and what it answered: the manifest's account of a stored-completions source."""

    where: str
    filters: dict[str, Any]
    page_size: int
    completions: int = 0  # listed (up to `until`)
    fetched: int = 0  # completions whose messages were read (the others were left out by the selection)
    list_pages: int = 0
    message_pages: int = 0
    digest: Any = field(default_factory=hashlib.sha256)  # over every completion and messages read, in order

    def manifest(self) -> dict[str, Any]:
        """The listing as the manifest's `source.api` (no key, only where it was read from)."""
        return {"base_url": self.where, "filters": self.filters, "order": "asc", "page_size": self.page_size,
                "completions_listed": self.completions, "messages_fetched": self.fetched,
                "list_pages": self.list_pages, "message_pages": self.message_pages,
                "sha256": self.digest.hexdigest()}


def listing_of(cfg: IngestConfig) -> Listing:
    """A Listing for the options, the key checked first: a missing key is one line before any request."""
    from tasks.api.client import resolve_api_key

    resolve_api_key(cfg.api_key_env, cfg.api_key_secret, WHO)
    return Listing(cfg.base_url or "https://api.openai.com/v1", api_filters(cfg), cfg.page_size)


def _client(cfg: IngestConfig) -> OpenAI:
    """An openai client for the endpoint, its key read where it is used."""
    from openai import OpenAI

    from tasks.api.client import resolve_api_key

    key = resolve_api_key(cfg.api_key_env, cfg.api_key_secret, WHO)
    return OpenAI(api_key=key, base_url=cfg.base_url, max_retries=MAX_RETRIES, timeout=TIMEOUT_S)


def _message(stored: Any) -> dict[str, Any]:
    """A stored message as a request message: its content parts (when it had them, so images are seen) or text."""
    m = stored.to_dict(mode="json")
    parts = m.pop("content_parts", None)
    m.pop("id", None)
    if parts:
        m["content"] = parts
    return m


def _messages(client: OpenAI, cid: str, page_size: int) -> tuple[list[dict[str, Any]] | Unreadable, int]:
    """(a completion's input messages, every page, or Unreadable when it is gone since listed; pages read)."""
    import openai

    pages = 0
    try:
        page = client.chat.completions.messages.list(cid, limit=page_size, order="asc")
        out = []
        while True:
            pages += 1
            out += [_message(m) for m in page.data]
            if not page.has_next_page():
                return out, pages
            page = page.get_next_page()
    except openai.NotFoundError:
        return Unreadable("stored completion gone (404 on its messages)"), pages


def _logged(completion: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A stored completion and its messages as a logged request/response line (sources.py's shape)."""
    response = completion.to_dict(mode="json")
    return {"id": response["id"], "request": {"model": response.get("model"), "messages": messages},
            "response": response, "metadata": response.get("metadata") or {}, "timestamp": response.get("created")}


def _wanted(raw: dict[str, Any], cfg: IngestConfig) -> bool:
    """Whether the selection (model, metadata, window) keeps a completion: only then are its messages read."""
    try:
        rec = to_record(raw, "", cfg.tool_calls, None)
    except Unreadable:
        return True  # read in full, it is counted under its reason
    return not_selected(rec, cfg) is None


def _api_error(e: Exception, cfg: IngestConfig, where: str, route: str) -> UserError:
    """One line for a failed listing: the key, the route, the endpoint (never the key itself)."""
    import openai

    from tasks.api.client import short

    if isinstance(e, openai.AuthenticationError):
        return UserError(f"{WHO}: {where} rejected the API key from ${cfg.api_key_env} (401)")
    if isinstance(e, openai.NotFoundError):
        return UserError(f"{WHO}: {where} has no stored completions (404 at {route}): is base_url an OpenAI-compatible "
                         "endpoint that stores completions?")
    if isinstance(e, openai.APITimeoutError):
        return UserError(f"{WHO}: {where} did not answer {route} within {TIMEOUT_S:g} s")
    if isinstance(e, openai.APIConnectionError):
        return UserError(f"{WHO}: cannot reach {where} ({type(e.__cause__ or e).__name__})")
    status = getattr(e, "status_code", "?")
    return UserError(f"{WHO}: {where} answered {status} at {route}: {short(e)}")


def stored_rows(cfg: IngestConfig, listing: Listing) -> Iterator[tuple[str, Any]]:
    """(where, raw logged-request row or Unreadable) for each stored completion, oldest first, up to `until`."""
    import openai

    client = _client(cfg)
    until = cfg.until.timestamp() if cfg.until else None
    route = "GET /chat/completions"
    try:
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            page = client.chat.completions.list(**listing.filters, limit=cfg.page_size, order="asc")
            while True:
                listing.list_pages += 1
                batch = [c for c in page.data if until is None or c.created < until]
                listing.completions += len(batch)
                raws = [_logged(c, []) for c in batch]
                wanted = [_wanted(r, cfg) for r in raws]
                listing.fetched += sum(wanted)
                route = "GET /chat/completions/{id}/messages"
                fetched = iter(pool.map(lambda c: _messages(client, c.id, cfg.page_size),
                                        [c for c, w in zip(batch, wanted) if w]))
                for raw, w in zip(raws, wanted):
                    messages, pages = next(fetched) if w else ([], 0)
                    listing.message_pages += pages
                    row: Any = messages if isinstance(messages, Unreadable) else {**raw, "request": {
                        **raw["request"], "messages": messages}}
                    if not isinstance(row, Unreadable):
                        listing.digest.update(json.dumps(row, sort_keys=True).encode() + b"\n")
                    yield f"{STORED}/{raw['id']}", row
                route = "GET /chat/completions"
                if len(batch) < len(page.data) or not page.has_next_page():
                    return
                page = page.get_next_page()
    except openai.OpenAIError as e:
        raise _api_error(e, cfg, listing.where, route) from None
    finally:
        client.close()
