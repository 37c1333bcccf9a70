"""OpenAI's wire format: usage blocks, Server-Sent Events framing, error bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.providers.base import Usage

DONE_EVENT = b"data: [DONE]\n\n"


def usage_from_object(obj: Any) -> Usage | None:
    """The `usage` block of a completion or chunk, or None when absent or malformed."""
    if not isinstance(obj, Mapping):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, Mapping):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, bool) or isinstance(completion, bool):
        return None
    if not isinstance(prompt, int) or not isinstance(completion, int) or min(prompt, completion) < 0:
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if not isinstance(cached, int) or isinstance(cached, bool) or not 0 <= cached <= prompt:
        cached = 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=cached)


class SseSplitter:
    """Cuts a byte stream into whole SSE events (each ending with a blank line)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        if b"\r" in self._pending:
            self._pending = self._pending.replace(b"\r\n", b"\n")
        events: list[bytes] = []
        while True:
            end = self._pending.find(b"\n\n")
            if end < 0:
                return events
            events.append(self._pending[: end + 2])
            self._pending = self._pending[end + 2 :]

    def remainder(self) -> bytes:
        return self._pending


def event_data(event: bytes) -> bytes | None:
    """The payload of an event's `data:` lines joined, or None if it has none."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def chunk_object(data: bytes) -> Mapping[str, Any] | None:
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    return parsed if isinstance(parsed, Mapping) else None


def chunk_text(chunk: Mapping[str, Any]) -> str:
    """The generated text a chat chunk carries (content and tool-call arguments)."""
    pieces: list[str] = []
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        delta = choice.get("delta") if isinstance(choice, Mapping) else None
        if not isinstance(delta, Mapping):
            continue
        if isinstance(delta.get("content"), str):
            pieces.append(delta["content"])
        for call in delta.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
                pieces.append(function["arguments"])
    return "".join(pieces)


def error_event(message: str, code: str) -> bytes:
    """An SSE event carrying an OpenAI-style error, for failures after headers were sent."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"
