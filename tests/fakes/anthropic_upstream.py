"""A fake Anthropic Messages API on a real aiohttp server, in Anthropic's wire format.

By default it answers a few words of text. On demand it calls tools (`tool_calls`, with
the input streamed as input_json_delta pieces), describes the images it was sent (an
image block in the last user turn), reports cache writes and reads, repeats the input
and cache figures in message_delta's usage as newer API versions do, and ends a stream
with an error event (`mode = "stream_error"`): each as the Messages API reference shows.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

REPLY_WORDS = ["Hello", " from", " the", " fake", " Anthropic", " upstream", "!"]
# Text before the tool calls, as Claude often writes when not forced to a tool.
TOOL_PREAMBLE = "Let me check."
# The size of the pieces a tool's JSON input is streamed in.
JSON_PIECE_CHARS = 8


@dataclass
class FakeAnthropic:
    input_tokens: int = 21
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    mode: str = "ok"  # ok | overloaded | cut_stream | stream_error
    # Tools to call, (name, input) each, when the request offers tools: a forced tool
    # (tool_choice type tool) is called alone, with the input given for its name.
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # message_delta's usage repeats input_tokens and the cache figures (newer API versions).
    delta_repeats_input: bool = False
    # Pause after a stream's last event before ending the response.
    linger_seconds: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        return app

    def _usage(self, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_creation_input_tokens,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    def _delta_usage(self, output_tokens: int) -> dict[str, Any]:
        if not self.delta_repeats_input:
            return {"output_tokens": output_tokens}
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": output_tokens,
        }

    def _calls(self, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if not body.get("tools") or not self.tool_calls:
            return []
        choice = body.get("tool_choice") or {}
        if choice.get("type") == "tool":
            inputs = dict(self.tool_calls)
            return [(choice["name"], inputs.get(choice["name"], self.tool_calls[0][1]))]
        return list(self.tool_calls)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers_seen.append(dict(request.headers))
        if self.mode == "overloaded":
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return web.json_response(error, status=529)
        calls = self._calls(body)
        forced = (body.get("tool_choice") or {}).get("type") in ("tool", "any")
        if calls:
            # A forced tool is called without a word before it.
            words = [] if forced else [TOOL_PREAMBLE]
        else:
            seen = _images_seen(body)
            words = _words(seen) if seen else REPLY_WORDS
            words = words[: body["max_tokens"]]
        content: list[dict[str, Any]] = [{"type": "text", "text": "".join(words)}] if words else []
        for number, (name, tool_input) in enumerate(calls):
            content.append(
                {"type": "tool_use", "id": f"toolu_fake_{number}", "name": name, "input": tool_input}
            )
        output_tokens = len(words) + sum(len(json.dumps(call[1])) // 4 for call in calls)
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": "tool_use" if calls else "end_turn",
            "stop_sequence": None,
            "usage": self._usage(output_tokens),
        }
        if not body.get("stream"):
            return web.json_response(message)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def event(name: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        start = {**message, "content": [], "stop_reason": None, "usage": self._usage(1)}
        await event("message_start", {"type": "message_start", "message": start})
        index = 0
        if words:
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
                if self.mode == "stream_error" and position == 3:
                    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
                    await event("error", error)
                    return response
                delta = {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                }
                await event("content_block_delta", delta)
            await event("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        for number, (name, tool_input) in enumerate(calls):
            block = {"type": "tool_use", "id": f"toolu_fake_{number}", "name": name, "input": {}}
            await event(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
            )
            # The first piece of a tool's input is empty, as Claude streams it.
            text = json.dumps(tool_input)
            for piece in [
                "",
                *(text[i : i + JSON_PIECE_CHARS] for i in range(0, len(text), JSON_PIECE_CHARS)),
            ]:
                delta = {"type": "input_json_delta", "partial_json": piece}
                await event(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                )
            await event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        await event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": self._delta_usage(output_tokens),
            },
        )
        await event("message_stop", {"type": "message_stop"})
        await asyncio.sleep(self.linger_seconds)
        return response


def _words(text: str) -> list[str]:
    """The text in pieces of a word each, as the stream sends it."""
    first, *rest = text.split(" ")
    return [first, *(" " + word for word in rest)]


def _images_seen(body: dict[str, Any]) -> str:
    """What the last user turn's images were, in words ("" without images)."""
    turns = [message for message in body["messages"] if message["role"] == "user"]
    content = turns[-1]["content"] if turns else ""
    images = [
        block["source"] for block in content if isinstance(block, dict) and block.get("type") == "image"
    ]
    described = [
        f"a base64 {source['media_type']} image of {len(source['data'])} characters"
        if source["type"] == "base64"
        else f"the image at {source['url']}"
        for source in images
    ]
    return f"I see {' and '.join(described)}." if described else ""
