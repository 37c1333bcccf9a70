"""A fake OpenAI-compatible provider on a real aiohttp server, speaking OpenAI's wire format.

It bills like OpenAI: prompt tokens by the published chat formula in the model's
encoding (computed here independently, from tiktoken), completion tokens as the
encoded length of what it sends, unless a test overrides either figure.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from aiohttp import web

REPLY = "Hello from the fake upstream! It speaks OpenAI's wire format."


def openai_chat_prompt_tokens(messages: list[dict[str, Any]], encoding_name: str) -> int:
    """OpenAI's formula, written out as the cookbook gives it (string fields only)."""
    encoding = tiktoken.get_encoding(encoding_name)
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(encoding.encode_ordinary(value))
            if key == "name":
                total += 1
    return total


@dataclass
class FakeUpstream:
    encoding_name: str = "o200k_base"
    reply: str = REPLY
    # Overrides of the usage it reports; None means "bill like OpenAI".
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Report completion_tokens = max_tokens, whatever was sent (to fill reservations).
    bill_max_tokens: bool = False
    mode: str = "ok"  # ok | error_500 | error_429 | garbage | cut_stream | stall_stream | no_usage
    delay_seconds: float = 0.0
    # Pause between stream chunks (and, in stall_stream mode, the stall after the first).
    chunk_delay_seconds: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    def _usage(self, body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
        prompt = self.prompt_tokens
        if prompt is None:
            prompt = openai_chat_prompt_tokens(body["messages"], self.encoding_name)
        completion = self.completion_tokens if self.completion_tokens is not None else completion_tokens
        if self.bill_max_tokens:
            completion = body.get("max_completion_tokens") or body["max_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers_seen.append(dict(request.headers))
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self.mode == "error_500":
            return _error(500, "The server had an error while processing your request.", "server_error")
        if self.mode == "error_429":
            return _error(429, "Rate limit reached for requests", "requests", headers={"retry-after": "7"})
        if self.mode == "garbage":
            return web.Response(status=200, text="<html>not json", content_type="application/json")
        encoding = tiktoken.get_encoding(self.encoding_name)
        tokens = encoding.encode(self.reply)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is not None:
            tokens = tokens[:limit]
        text = encoding.decode(tokens)
        usage = self._usage(body, len(tokens))
        created = int(time.time())
        if not body.get("stream"):
            completion = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": created,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            if self.mode == "no_usage":
                del completion["usage"]
            return web.json_response(completion)
        return await self._stream(request, body, tokens, encoding, usage, created)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        tokens: list[int],
        encoding: Any,
        usage: dict[str, int],
        created: int,
    ) -> web.StreamResponse:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def event(choices: list[dict[str, Any]], usage_block: dict[str, int] | None = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": body["model"],
                "choices": choices,
            }
            if include_usage:
                chunk["usage"] = usage_block
            # OpenAI's own framing: compact JSON, one event per chunk.
            return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

        await response.write(event([{"index": 0, "delta": {"role": "assistant", "content": ""}}]))
        for position, token in enumerate(tokens):
            if self.mode == "cut_stream" and position == len(tokens) // 2:
                # Close the connection mid-stream, as a crashing upstream would.
                assert request.transport is not None
                request.transport.close()
                return response
            if self.mode == "stall_stream" and position == 1:
                await asyncio.sleep(3600)
            if self.chunk_delay_seconds:
                await asyncio.sleep(self.chunk_delay_seconds)
            piece = encoding.decode([token])
            await response.write(event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        await response.write(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if include_usage and self.mode != "no_usage":
            await response.write(event([], usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)
