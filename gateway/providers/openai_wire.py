"""OpenAI's wire format: usage blocks, Server-Sent Events framing, error bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.providers.base import Usage

DONE_EVENT = b"data: [DONE]\n\n"


def usage_from_object(obj: Any) -> Usage | None:
    """The usage block of a completion, chunk, embedding list or response, or None.

    Chat and completions report prompt/completion tokens; embeddings only prompt tokens;
    the Responses API input/output tokens (in `response.usage` for stream events).
    """
    if not isinstance(obj, Mapping):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), Mapping):
        usage = obj["response"].get("usage")
    if not isinstance(usage, Mapping):
        return None
    if "input_tokens" in usage:
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens", 0)
        details = usage.get("input_tokens_details")
    else:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
        details = usage.get("prompt_tokens_details")
    if (
        not isinstance(prompt, int)
        or not isinstance(completion, int)
        or not _is_count(prompt)
        or not _is_count(completion)
    ):
        return None
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    cached_count = cached if isinstance(cached, int) and _is_count(cached) and cached <= prompt else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=cached_count)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def body_text(obj: Any) -> str:
    """Generated text of a whole chat, completions or Responses body (to count it)."""
    if not isinstance(obj, Mapping):
        return ""
    pieces: list[str] = []
    for choice in obj.get("choices") or []:
        if not isinstance(choice, Mapping):
            continue
        message = choice.get("message")
        if isinstance(message, Mapping) and isinstance(message.get("content"), str):
            pieces.append(message["content"])
        if isinstance(choice.get("text"), str):
            pieces.append(choice["text"])
    for item in obj.get("output") or []:
        for part in item.get("content") or [] if isinstance(item, Mapping) else []:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                pieces.append(part["text"])
    return "".join(pieces)


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
    """The generated text a stream chunk or event carries (content, tool-call arguments)."""
    pieces: list[str] = []
    if chunk.get("type") == "response.output_text.delta" and isinstance(chunk.get("delta"), str):
        return str(chunk["delta"])
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if isinstance(choice, Mapping) and isinstance(choice.get("text"), str):
            pieces.append(choice["text"])
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
