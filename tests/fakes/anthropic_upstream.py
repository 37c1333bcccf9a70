"""A fake Anthropic Messages API on a real aiohttp server, in Anthropic's wire format."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

REPLY_WORDS = ["Hello", " from", " the", " fake", " Anthropic", " upstream", "!"]


@dataclass
class FakeAnthropic:
    input_tokens: int = 21
    cache_read_input_tokens: int = 0
    mode: str = "ok"  # ok | overloaded | cut_stream
    # Pause after a stream's last event before ending the response.
    linger_seconds: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        return app

    def _usage(self, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": output_tokens,
        }

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers_seen.append(dict(request.headers))
        if self.mode == "overloaded":
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return web.json_response(error, status=529)
        words = REPLY_WORDS[: body["max_tokens"]]
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "".join(words)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self._usage(len(words)),
        }
        if not body.get("stream"):
            return web.json_response(message)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def event(name: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        start = {**message, "content": [], "stop_reason": None, "usage": self._usage(1)}
        await event("message_start", {"type": "message_start", "message": start})
        await event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        await event("ping", {"type": "ping"})
        for position, word in enumerate(words):
            if self.mode == "cut_stream" and position == 3:
                assert request.transport is not None
                request.transport.close()
                return response
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
            await event("content_block_delta", delta)
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        await event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(words)},
            },
        )
        await event("message_stop", {"type": "message_stop"})
        await asyncio.sleep(self.linger_seconds)
        return response
