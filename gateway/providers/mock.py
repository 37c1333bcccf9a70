"""A built-in provider that answers in OpenAI's format, so the gateway runs with no account.

Its usage block is exact: prompt tokens by OpenAI's chat formula in the model's
tokenizer, completion tokens as the encoded length of the text it returns.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from gateway.errors import InvalidRequest
from gateway.providers.base import UpstreamReply, UpstreamRequest, Usage
from gateway.providers.openai_wire import DONE_EVENT
from gateway.tokens import TokenizerRegistry
from gateway.tokens.chat import count_chat

REPLY_TEXT = (
    "This is a mock completion from the gateway's built-in provider. "
    "Point this model at a real provider in gateway.yaml to get real answers."
)


class MockProvider:
    def __init__(self, name: str, tokenizers: TokenizerRegistry) -> None:
        self.name = name
        self._tokenizers = tokenizers

    async def close(self) -> None:
        return None

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        if request.path != "chat/completions":
            raise InvalidRequest(f"The mock provider does not serve /v1/{request.path}.")
        body = request.body
        model = str(body["model"])
        profile = self._tokenizers.profile(model)
        tokenizer = profile.tokenizer
        text_tokens = tokenizer.encode(REPLY_TEXT)
        limit = _max_tokens(body)
        finish_reason = "length" if limit is not None and limit < len(text_tokens) else "stop"
        tokens = text_tokens[:limit] if limit is not None else text_tokens
        # Bills the prompt as an OpenAI model would, by the same published rules.
        prompt_tokens = count_chat(body, profile, (1024, 1024)).tokens
        usage = Usage(prompt_tokens, len(tokens))
        completion_id = "chatcmpl-mock" + uuid.uuid4().hex[:20]
        created = int(time.time())
        if not request.stream:
            text = tokenizer.encoding.decode(tokens)
            completion = _completion(completion_id, created, model, text, finish_reason, usage)
            return UpstreamReply(200, "application/json", body=json.dumps(completion).encode())
        pieces = [tokenizer.encoding.decode([token]) for token in tokens]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = _stream(completion_id, created, model, pieces, finish_reason, usage, include_usage)
        return UpstreamReply(200, "text/event-stream", chunks=events)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int):
            return value
    return None


def _usage_block(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _completion(
    completion_id: str, created: int, model: str, text: str, finish_reason: str, usage: Usage
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": _usage_block(usage),
        "system_fingerprint": None,
    }


async def _stream(
    completion_id: str,
    created: int,
    model: str,
    pieces: list[str],
    finish_reason: str,
    usage: Usage,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], usage_block: dict[str, int] | None) -> bytes:
        obj: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            obj["usage"] = usage_block
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    yield chunk(choice({"role": "assistant", "content": ""}), None)
    for piece in pieces:
        yield chunk(choice({"content": piece}), None)
    yield chunk(choice({}, finish_reason), None)
    if include_usage:
        yield chunk([], _usage_block(usage))
    yield DONE_EVENT
