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
    """Everything a whole chat, completions or Responses body generated, joined (to count
    it): text, refusals, reasoning, and the name and arguments of every tool call."""
    if not isinstance(obj, Mapping):
        return ""
    pieces: list[str] = []
    for choice in _items(obj.get("choices")):
        _add(pieces, choice.get("text"))
        message = choice.get("message")
        if isinstance(message, Mapping):
            _add_message(pieces, message)
    for item in _items(obj.get("output")):
        _add_output_item(pieces, item)
    return "".join(pieces)


def _add_message(pieces: list[str], message: Mapping[str, Any]) -> None:
    """A chat message or stream delta: content, refusal, reasoning (as some compatible
    servers send it), tool calls and the legacy function_call."""
    content = message.get("content")
    if isinstance(content, list):  # content parts, from some compatible servers
        for part in _items(content):
            _add(pieces, part.get("text"))
    else:
        _add(pieces, content)
    _add(pieces, message.get("refusal"))
    _add(pieces, message.get("reasoning_content"))
    for call in _items(message.get("tool_calls")):
        _add_call(pieces, call.get("function"))
    _add_call(pieces, message.get("function_call"))


def _add_output_item(pieces: list[str], item: Mapping[str, Any]) -> None:
    """A Responses output item: message parts (text, refusal), reasoning (summary and
    text), function and custom tool calls (name, arguments or input)."""
    if item.get("type") in ("function_call", "custom_tool_call"):
        _add(pieces, item.get("name"))
        _add(pieces, item.get("arguments"))
        _add(pieces, item.get("input"))
    for part in _items(item.get("summary")):
        _add(pieces, part.get("text"))
    for part in _items(item.get("content")):
        _add(pieces, part.get("text"))
        _add(pieces, part.get("refusal"))


def _add_call(pieces: list[str], function: Any) -> None:
    if isinstance(function, Mapping):
        _add(pieces, function.get("name"))
        _add(pieces, function.get("arguments"))


def _add(pieces: list[str], value: Any) -> None:
    if isinstance(value, str):
        pieces.append(value)


def _items(value: Any) -> list[Mapping[str, Any]]:
    """The objects of a JSON array (anything else in it, or a non-array, is skipped)."""
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


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


# Responses stream events whose `delta` is generated text.
_RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)


def chunk_text(chunk: Mapping[str, Any]) -> str:
    """The generated text a stream chunk or event carries: content, refusal, reasoning,
    tool-call names and arguments (and the legacy function_call's)."""
    kind = chunk.get("type")
    if kind is not None:
        if kind in _RESPONSES_TEXT_DELTAS and isinstance(chunk.get("delta"), str):
            return str(chunk["delta"])
        item = chunk.get("item")
        if kind == "response.output_item.added" and isinstance(item, Mapping):
            # A call's name comes once, here; its arguments follow as deltas.
            name = item.get("name") if item.get("type") in ("function_call", "custom_tool_call") else None
            return name if isinstance(name, str) else ""
    pieces: list[str] = []
    for choice in _items(chunk.get("choices")):
        _add(pieces, choice.get("text"))
        delta = choice.get("delta")
        if isinstance(delta, Mapping):
            _add_message(pieces, delta)
    return "".join(pieces)


def error_event(message: str, code: str) -> bytes:
    """An SSE event carrying an OpenAI-style error, for failures after headers were sent."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"
