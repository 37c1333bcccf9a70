"""A built-in provider that answers like OpenAI and like Anthropic, so the gateway runs,
demos and benchmarks with no account.

Its usage is exact: prompt tokens by the same published rules the gateway counts with,
completion tokens as the encoded length of what it sends. `latency_seconds` delays the
first token and `tokens_per_second` paces the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from gateway.config import ProviderConfig
from gateway.errors import InvalidRequest
from gateway.providers.base import UpstreamReply, UpstreamRequest, Usage
from gateway.providers.openai_wire import DONE_EVENT
from gateway.tokens import TokenizerRegistry
from gateway.tokens.anthropic import count_anthropic_messages
from gateway.tokens.chat import count_chat
from gateway.tokens.prompts import count_prompt_input

REPLY_TEXT = (
    "This is a mock completion from the gateway's built-in provider. "
    "Point this model at a real provider in gateway.yaml to get real answers."
)
EMBEDDING_SIZE = 8


class MockProvider:
    wire_formats = frozenset({"openai", "anthropic"})

    def __init__(self, config: ProviderConfig, tokenizers: TokenizerRegistry) -> None:
        self.name = config.name
        self._latency = config.latency_seconds
        self._rate = config.tokens_per_second
        self._tokenizers = tokenizers

    async def close(self) -> None:
        return None

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        body = request.body
        profile = self._tokenizers.profile(str(body["model"]))
        if request.path == "embeddings":
            request.delivery.mark_sent()
            return self._embeddings(body, profile)
        if request.path == "chat/completions":
            prompt = count_chat(body, profile, (1024, 1024)).tokens
        elif request.path == "completions":
            prompt = count_prompt_input(body.get("prompt"), profile, "prompt").count.tokens
        elif request.path == "messages":
            prompt = count_anthropic_messages(body, profile, (1024, 1024)).tokens
        else:
            raise InvalidRequest(f"The mock provider does not serve /v1/{request.path}.")
        request.delivery.mark_sent()
        tokens = profile.tokenizer.encode(REPLY_TEXT)
        limit = next(
            (body[f] for f in ("max_completion_tokens", "max_tokens") if isinstance(body.get(f), int)), None
        )
        truncated = limit is not None and limit < len(tokens)
        tokens = tokens[:limit] if limit is not None else tokens
        usage = Usage(prompt, len(tokens))
        pieces = [profile.tokenizer.encoding.decode([token]) for token in tokens]
        if not request.stream:
            if self._latency or self._rate:
                await asyncio.sleep(self._latency + (len(tokens) / self._rate if self._rate else 0))
            text = "".join(pieces)
            whole = (
                _anthropic_message(body, text, truncated, usage)
                if request.path == "messages"
                else _openai_body(request.path, body, text, truncated, usage)
            )
            return UpstreamReply(200, "application/json", body=json.dumps(whole).encode())
        if request.path == "messages":
            events = _anthropic_events(body, pieces, truncated, usage)
        else:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = _openai_events(request.path, body, pieces, truncated, usage, include_usage)
        return UpstreamReply(200, "text/event-stream", chunks=self._paced(events))

    async def _paced(self, events: list[bytes]) -> AsyncIterator[bytes]:
        if self._latency:
            await asyncio.sleep(self._latency)
        for event in events:
            if self._rate:
                await asyncio.sleep(1 / self._rate)
            yield event

    def _embeddings(self, body: Mapping[str, Any], profile: Any) -> UpstreamReply:
        inputs = body.get("input")
        counted = count_prompt_input(inputs, profile, "input")
        items = inputs if isinstance(inputs, list) and counted.prompts > 1 else [inputs]
        data = [
            {"object": "embedding", "index": index, "embedding": _vector(json.dumps(item))}
            for index, item in enumerate(items)
        ]
        tokens = counted.count.tokens
        whole = {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return UpstreamReply(200, "application/json", body=json.dumps(whole).encode())


def _vector(text: str) -> list[float]:
    """A deterministic unit vector per input, so mock embeddings are stable."""
    digest = hashlib.sha256(text.encode()).digest()
    values = [value / 2**31 for value in struct.unpack(">8i", digest)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values[:EMBEDDING_SIZE]]


def _openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _openai_body(
    path: str, body: Mapping[str, Any], text: str, truncated: bool, usage: Usage
) -> dict[str, Any]:
    finish = "length" if truncated else "stop"
    if path == "completions":
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    else:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }
        kind = "chat.completion"
    return {
        "id": "mock-" + uuid.uuid4().hex[:24],
        "object": kind,
        "created": int(time.time()),
        "model": body["model"],
        "choices": [choice],
        "usage": _openai_usage(usage),
        "system_fingerprint": None,
    }


def _openai_events(
    path: str, body: Mapping[str, Any], pieces: list[str], truncated: bool, usage: Usage, include_usage: bool
) -> list[bytes]:
    completion_id, created = "mock-" + uuid.uuid4().hex[:24], int(time.time())
    chat = path == "chat/completions"

    def chunk(choices: list[dict[str, Any]], usage_block: dict[str, int] | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": body["model"],
            "choices": choices,
        }
        if include_usage:
            obj["usage"] = usage_block
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    def choice(piece: str | None, finish: str | None = None, role: bool = False) -> list[dict[str, Any]]:
        if not chat:
            return [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]
        delta: dict[str, Any] = (
            {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
        )
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    events = [chunk(choice(None, role=True))] if chat else []
    events += [chunk(choice(piece)) for piece in pieces]
    events.append(chunk(choice(None, "length" if truncated else "stop")))
    if include_usage:
        events.append(chunk([], _openai_usage(usage)))
    events.append(DONE_EVENT)
    return events


def _anthropic_message(body: Mapping[str, Any], text: str, truncated: bool, usage: Usage) -> dict[str, Any]:
    return {
        "id": "msg_mock" + uuid.uuid4().hex[:20],
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens" if truncated else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens},
    }


def _anthropic_events(
    body: Mapping[str, Any], pieces: list[str], truncated: bool, usage: Usage
) -> list[bytes]:
    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    start = _anthropic_message(body, "", truncated, Usage(usage.prompt_tokens, 1))
    start["content"], start["stop_reason"] = [], None
    events = [
        event("message_start", {"type": "message_start", "message": start}),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        event("ping", {"type": "ping"}),
    ]
    events += [
        event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
        )
        for piece in pieces
    ]
    events += [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens" if truncated else "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": usage.completion_tokens},
            },
        ),
        event("message_stop", {"type": "message_stop"}),
    ]
    return events
