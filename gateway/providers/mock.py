"""A built-in provider that answers like OpenAI and like Anthropic, so the gateway runs,
demos and benchmarks with no account: chat, completions, embeddings, the Responses API
and Anthropic's Messages, each in its real wire format, streamed or whole.

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
from gateway.tokens.chat import count_chat, count_responses
from gateway.tokens.prompts import count_prompt_input

REPLY_TEXT = (
    "This is a mock completion from the gateway's built-in provider. "
    "Point this model at a real provider in gateway.yaml to get real answers."
)
EMBEDDING_SIZE = 8
# The request field capping the reply, whichever route it came by.
MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


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
        elif request.path == "responses":
            # The gateway's own reading of a Responses input, so the mock bills what it
            # would have counted (its pre-flight count differs only by calibration).
            prompt = count_responses(body, profile, (1024, 1024)).tokens
        else:
            raise InvalidRequest(f"The mock provider does not serve /v1/{request.path}.")
        request.delivery.mark_sent()
        tokens = profile.tokenizer.encode(REPLY_TEXT)
        limit = next((body[f] for f in MAX_OUTPUT_FIELDS if isinstance(body.get(f), int)), None)
        truncated = limit is not None and limit < len(tokens)
        tokens = tokens[:limit] if limit is not None else tokens
        usage = Usage(prompt, len(tokens))
        pieces = [profile.tokenizer.encoding.decode([token]) for token in tokens]
        if not request.stream:
            if self._latency or self._rate:
                await asyncio.sleep(self._latency + (len(tokens) / self._rate if self._rate else 0))
            text = "".join(pieces)
            if request.path == "messages":
                whole = _anthropic_message(body, text, truncated, usage)
            elif request.path == "responses":
                whole = _ResponseDraft(body, truncated).finished(text, usage)
            else:
                whole = _openai_body(request.path, body, text, truncated, usage)
            return UpstreamReply(200, "application/json", body=json.dumps(whole).encode())
        if request.path == "messages":
            events = _anthropic_events(body, pieces, truncated, usage)
        elif request.path == "responses":
            events = _ResponseDraft(body, truncated).events(pieces, usage)
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


def _named_event(name: str, data: Mapping[str, Any]) -> bytes:
    """An SSE event with an `event:` line, as Anthropic and the Responses API send them."""
    return f"event: {name}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


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
    event = _named_event
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


def _responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


class _ResponseDraft:
    """One Responses API answer (one assistant message of one output_text part), whole
    or as the stream of events that builds it, in OpenAI's wire format.

    A reply cut by `max_output_tokens` is `incomplete`, as OpenAI reports it: its stream
    ends with `response.incomplete` instead of `response.completed`.
    """

    def __init__(self, body: Mapping[str, Any], truncated: bool) -> None:
        self._body = body
        self._id = "resp_mock" + uuid.uuid4().hex[:24]
        self._item_id = "msg_mock" + uuid.uuid4().hex[:24]
        self._created_at = int(time.time())
        self._status = "incomplete" if truncated else "completed"

    def finished(self, text: str, usage: Usage) -> dict[str, Any]:
        """The whole `response` object."""
        return self._response(self._status, [self._message(self._status, [self._part(text)])], usage)

    def events(self, pieces: list[str], usage: Usage) -> list[bytes]:
        """The stream, event by event, each with its `sequence_number`."""
        text = "".join(pieces)
        at = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        started = self._response("in_progress", [], None)
        steps: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": self._message("in_progress", []),
            },
            {"type": "response.content_part.added", **at, "part": self._part("")},
        ]
        steps += [
            {"type": "response.output_text.delta", **at, "delta": piece, "logprobs": []} for piece in pieces
        ]
        steps += [
            {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **at, "part": self._part(text)},
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": self._message(self._status, [self._part(text)]),
            },
            {"type": f"response.{self._status}", "response": self.finished(text, usage)},
        ]
        return [
            _named_event(step["type"], {**step, "sequence_number": number})
            for number, step in enumerate(steps)
        ]

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _response(self, status: str, output: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
        body = self._body
        return {
            "id": self._id,
            "object": "response",
            "created_at": self._created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            # The mock keeps nothing: a stored response could not be fetched back.
            "store": False,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []),
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": _responses_usage(usage) if usage is not None else None,
            "metadata": body.get("metadata", {}),
        }
