"""Messages as the datasets hold them: system/user/assistant turns with plain text.

Logged requests carry more: content as a list of parts (text, images, audio, files), the `developer` role, an
assistant's tool calls (content null) and the tools' results (role `tool`). Text parts are joined with a newline;
a row with an image, audio or a file is refused (a text model cannot learn from what it never sees); `developer`
becomes `system`; with tool calls kept, a call becomes its JSON text and a tool's result a user turn. Each change is
named, so the manifest counts the rows it touched.
"""

from __future__ import annotations

import json
from typing import Any

TEXT_PARTS = {"text", "input_text", "output_text"}
MEDIA_PARTS = {"image_url": "image", "input_image": "image", "image": "image", "input_audio": "audio",
               "audio": "audio", "file": "file", "input_file": "file"}
TOOL_RESULT = "[tool result]"  # what starts a tool's result turned into a user turn


class Unreadable(Exception):
    """A line that is not a row: broken JSON, not UTF-8, an unknown shape. The message is its one counted reason."""


def _text(content: Any, changes: set[str]) -> tuple[str, str | None]:
    """(the text of a message's content, the defect that refuses the row or None)."""
    if content is None:
        return "", None
    if isinstance(content, str):
        if "\r\n" in content:
            changes.add("line endings made \\n")
            content = content.replace("\r\n", "\n")
        return content, None
    if not isinstance(content, list):
        return "", "content neither text nor parts"
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            return "", MEDIA_PARTS[kind]
        if kind == "refusal":
            return "", "refusal"
        if kind in TEXT_PARTS or (kind is None and isinstance(part, dict) and isinstance(part.get("text"), str)):
            texts.append(str(part.get("text") or ""))
        elif isinstance(part, str):
            texts.append(part)
        else:
            return "", f"content part '{kind}'"
    if len(texts) > 1:
        changes.add("text parts joined")
    text, _ = _text("\n".join(texts), changes)
    return text, None


def _calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant message's tool calls (or legacy function call) as [{name, arguments}], arguments parsed."""
    raw = message.get("tool_calls") or ([{"function": message["function_call"]}] if message.get("function_call")
                                        else [])
    calls = []
    for call in raw if isinstance(raw, list) else []:
        fn = (call.get("function") if isinstance(call, dict) else None) or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass  # a model's malformed arguments stay as it wrote them
        calls.append({"name": fn.get("name"), "arguments": args})
    return calls


def answer_of(message: Any, tool_calls: str, changes: set[str]) -> tuple[str, str | None]:
    """(the answer's text, the defect that refuses the row or None) of an assistant message."""
    if not isinstance(message, dict):
        return "", "answer not a message"
    text, defect = _text(message.get("content"), changes)
    calls = _calls(message)
    if defect or not calls:
        return text, defect
    if tool_calls == "drop":
        return text, "tool call"
    changes.add("tool calls as JSON text")
    as_json = json.dumps({"tool_calls": calls}, ensure_ascii=False)
    return (f"{text}\n{as_json}" if text.strip() else as_json), None


def normalize_messages(messages: list[Any], tool_calls: str, changes: set[str]) -> tuple[list[dict[str, str]],
                                                                                           str | None]:
    """(the prompt's messages as system/user/assistant text turns, the first defect that refuses the row or None)."""
    out: list[dict[str, str]] = []
    defect = None
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role == "assistant":
            text, problem = answer_of(m, tool_calls, changes)
        elif role in ("tool", "function"):
            if tool_calls == "drop":
                problem, text = "tool call", ""
            else:
                text, problem = _text(m.get("content"), changes)
                text, role = f"{TOOL_RESULT}\n{text}", "user"
                changes.add("tool results as user turns")
        elif role in ("system", "developer", "user"):
            text, problem = _text(m.get("content"), changes)
            if role == "developer":
                role = "system"
                changes.add("developer role as system")
        else:
            text, problem = "", "unknown role"
        defect = defect or problem
        out.append({"role": str(role), "content": text})
    return out, defect
