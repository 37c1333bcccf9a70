"""Anthropic's wire format: message usage, stream events, error bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.providers.base import Usage

# Anthropic's error types by status; the gateway's Anthropic routes answer errors in its own shape.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def message_usage(usage: Any) -> Usage | None:
    """A Messages API usage block: cache reads and writes are input tokens too."""
    if not isinstance(usage, Mapping) or not isinstance(usage.get("input_tokens"), int):
        return None
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_write = _count(usage.get("cache_creation_input_tokens"))
    prompt = _count(usage.get("input_tokens")) + cache_write + cache_read
    return Usage(prompt, _count(usage.get("output_tokens")), cache_read, cache_write)


def message_text(message: Any) -> str:
    """Everything a whole Messages body generated, joined (to count it): text, thinking,
    and the name and JSON input of every tool call."""
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    pieces: list[str] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, Mapping):
            continue
        if block.get("type") in ("tool_use", "server_tool_use"):
            name = block.get("name")
            pieces.append(name if isinstance(name, str) else "")
            if "input" in block:
                pieces.append(json.dumps(block["input"], ensure_ascii=False))
            continue
        for field in ("text", "thinking"):
            value = block.get(field)
            if isinstance(value, str):
                pieces.append(value)
    return "".join(pieces)


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_event(message: str, error_type: str = "api_error") -> bytes:
    return b"event: error\ndata: " + json.dumps(error_body(error_type, message)).encode() + b"\n\n"
