"""The fake server's stored completions (OpenAI's `store=true` traffic), as OpenAI's API pages them.

GET /v1/chat/completions lists them (filters `model`, `metadata[key]=value`; `order` asc or desc by `created`;
cursor pagination: `limit`, default 20, at most 100, `after` an id, and `has_more`); GET
/v1/chat/completions/{id}/messages pages a completion's input messages the same way (ids `{completion_id}-{i}`).
A chat request with `store: true` is stored as answered; a test seeds completions with chosen times through
FakeOpenAI.stored.add.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlsplit

SNAPSHOT = re.compile(r"\d{4}(?:-\d{2}-\d{2})?")  # a model filter matches its dated snapshots, as OpenAI's does
DEFAULT_LIMIT = 20  # OpenAI's default page size for both lists
MAX_LIMIT = 100


class BadQuery(ValueError):
    """A query the real API answers with 400 (the message is its error)."""


class StoredCompletions:
    """Completions stored in memory, listed and paged as OpenAI does; counts every page served."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[dict[str, Any]] = []  # ChatCompletion dicts, each with its request's `messages`
        self.pages: Counter[str] = Counter()  # "list" / "messages" -> pages served

    def add(self, completion: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        """Store a ChatCompletion (id, created, model, choices, metadata...) with the request's messages."""
        with self.lock:
            self.items.append({**completion, "messages": [dict(m) for m in messages]})

    def clear(self) -> None:
        """Forget every stored completion and count."""
        with self.lock:
            self.items.clear()
            self.pages.clear()

    def route(self, path: str) -> tuple[str, str | None] | None:
        """("list", None) or ("messages", id) for a stored-completions GET path, else None."""
        parts = urlsplit(path).path.rstrip("/").split("/")
        if parts[1:] == ["v1", "chat", "completions"]:
            return "list", None
        if len(parts) == 6 and parts[1:4] == ["v1", "chat", "completions"] and parts[5] == "messages":
            return "messages", parts[4]
        return None

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        """(status, body) for a routed GET."""
        kind, cid = self.route(path) or ("", None)
        query = parse_qsl(urlsplit(path).query, keep_blank_values=True)
        try:
            if kind == "list":
                return 200, self._list(query)
            with self.lock:
                found = next((c for c in self.items if c["id"] == cid), None)
            if found is None:
                return 404, _error(f"No chat completion found with id '{cid}'.", "not_found")
            return 200, self._messages(found, query)
        except BadQuery as e:
            return 400, _error(str(e), "invalid_request_error")

    def _list(self, query: list[tuple[str, str]]) -> dict[str, Any]:
        """One page of the listing, filtered by model and metadata."""
        params = dict(query)
        wanted = {k[len("metadata["):-1]: v for k, v in query if k.startswith("metadata[") and k.endswith("]")}
        model = params.get("model")
        with self.lock:
            items = [c for c in self.items if (not model or _is_model(c["model"], model))
                     and all(str((c.get("metadata") or {}).get(k)) == v for k, v in wanted.items())]
            self.pages["list"] += 1
        items.sort(key=lambda c: (c["created"], c["id"]), reverse=params.get("order") == "desc")
        page, more = _page(items, params)
        return {"object": "list", "data": [{k: v for k, v in c.items() if k != "messages"} for c in page],
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
                "has_more": more}

    def _messages(self, completion: dict[str, Any], query: list[tuple[str, str]]) -> dict[str, Any]:
        """One page of a completion's input messages, each with its id (and content_parts for part lists)."""
        params = dict(query)
        listed = []
        for i, m in enumerate(completion["messages"]):
            content = m.get("content")
            parts = content if isinstance(content, list) else None
            text = "\n".join(p.get("text", "") for p in parts if isinstance(p, dict)) if parts else content
            listed.append({**m, "id": f"{completion['id']}-{i}", "content": text, "content_parts": parts})
        if params.get("order") == "desc":
            listed.reverse()
        with self.lock:
            self.pages["messages"] += 1
        page, more = _page(listed, params)
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": more}


def _is_model(served: str, model: str) -> bool:
    """The model itself, or a dated snapshot of it (gpt-4o-2024-08-06 for gpt-4o; gpt-4o-mini is another model)."""
    return served == model or (served.startswith(f"{model}-") and bool(SNAPSHOT.fullmatch(served[len(model) + 1:])))


def _page(items: list[dict[str, Any]], params: dict[str, str]) -> tuple[list[dict[str, Any]], bool]:
    """The items after `after`, at most `limit` of them, and whether more follow."""
    try:
        limit = int(params.get("limit") or DEFAULT_LIMIT)
    except ValueError:
        raise BadQuery(f"Invalid 'limit': {params.get('limit')!r}.") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadQuery(f"Invalid 'limit': {limit}; it must be between 1 and {MAX_LIMIT}.")
    start = 0
    if params.get("after"):
        ids = [c["id"] for c in items]
        if params["after"] not in ids:
            raise BadQuery(f"Invalid 'after': no item with id '{params['after']}'.")
        start = ids.index(params["after"]) + 1
    return items[start:start + limit], start + limit < len(items)


def _error(message: str, code: str) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}
