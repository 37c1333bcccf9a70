"""A fake provider whose every answer is scripted by the test: so many pieces, then an ending.

One real aiohttp server speaks the three wire formats the gateway relays, in the shapes
of tests/fakes/openai_upstream.py and anthropic_upstream.py: OpenAI chat completions
(`/v1/chat/completions`), the OpenAI Responses API (`/v1/responses`) and Anthropic
Messages (`/v1/messages`), whole or streamed. Each request names its script by a tag
in the body (`user` on OpenAI routes, `metadata.user_id` on Anthropic's); untagged
requests follow `default`. Every piece of content is PIECE, so what a request was sent
is known in tokens without asking the gateway.

What the provider did is kept per request (`Call`): whether it got the request, what
text it wrote, whether it wrote a usage block or Anthropic's message_start, and whether
the gateway closed the connection before the script was over.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from aiohttp import web

from tests.fakes.openai_upstream import chat_completion, openai_chat_prompt_tokens

PIECE = " word"
# The provider's figures differ from the gateway's own counts on purpose, so a test can
# tell which one was charged: OpenAI adds prompt tokens of its own and bills reasoning
# tokens as output; Anthropic counts input with a tokenizer of its own.
HIDDEN_PROMPT_TOKENS = 7
REASONING_TOKENS = 3
ANTHROPIC_INPUT_TOKENS = 9

# How an answer ends (see Script).
ENDINGS = (
    "complete",  # every piece, then the usage and the format's last event
    "delay_head",  # complete, after pause_seconds without a byte
    "pause_body",  # complete, with a pause of pause_seconds after `after` pieces (half a body)
    "stall_head",  # no byte at all, until the connection is closed
    "stall",  # `after` pieces (half a body), then nothing until the connection is closed
    "cut_head",  # the request is read, then the connection is closed without an answer
    "cut",  # `after` pieces (half a body), then the connection is closed
    "garbage",  # 200 and bytes that are neither JSON nor SSE
    "truncated",  # stream: `after` pieces, half an event, a clean end; whole: half a JSON body
    "json",  # a whole JSON answer, even to a stream request
    "error_event",  # stream: `after` pieces, then the format's in-band error event, a clean end
    "error_status",  # the provider's own error: 500 (OpenAI) or 529 (Anthropic), JSON body
)

ROUTES = {"/v1/chat/completions": "chat", "/v1/responses": "responses", "/v1/messages": "messages"}


@dataclass(frozen=True)
class Script:
    ending: str = "complete"
    # Content pieces of a whole answer.
    pieces: int = 6
    # Pieces sent before a stall, cut, truncation, pause or error event.
    after: int = 2
    pause_seconds: float = 0.2

    def __post_init__(self) -> None:
        assert self.ending in ENDINGS, self.ending
        assert 0 <= self.after <= self.pieces


@dataclass
class Call:
    """One request as the provider saw it, and what it sent back."""

    route: str
    tag: str | None
    body: dict[str, Any]
    script: Script
    stream: bool
    # Content text written on the wire in whole events (or the whole body's text).
    text: str = ""
    head_sent: bool = False
    # Anthropic's message_start (with the provider's input tokens) was written.
    started: bool = False
    # The usage the provider wrote, as (prompt, completion), if it wrote one.
    usage: tuple[int, int] | None = None
    # The gateway closed the connection before the script was over.
    closed_early: bool = False
    # Set once the provider waits (a stall or a pause), or when it has answered.
    waiting: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class ScriptedUpstream:
    default: Script = field(default_factory=Script)
    scripts: dict[str, Script] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    # Set whenever a request arrives (tests wait on it, then clear it).
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        for path in ROUTES:
            app.router.add_post(path, self._serve)
        return app

    def calls_of(self, tag: str) -> list[Call]:
        return [call for call in self.calls if call.tag == tag]

    async def wait_for_call(self, tag: str | None = None, timeout: float = 5.0) -> Call:
        """The first request with this tag (any request when None), once it has arrived."""
        async with asyncio.timeout(timeout):
            while True:
                for call in self.calls:
                    if tag is None or call.tag == tag:
                        return call
                self.arrived.clear()
                await self.arrived.wait()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        route = ROUTES[request.path]
        body = await request.json()
        tag = _tag(route, body)
        script = self.scripts.get(tag, self.default) if tag is not None else self.default
        call = Call(route, tag, body, script, bool(body.get("stream")))
        self.calls.append(call)
        self.arrived.set()
        answer = _Answer(route, body, call)
        try:
            if call.stream and script.ending != "json":
                return await answer.stream(request)
            return await answer.whole(request)
        except asyncio.CancelledError:
            # aiohttp cancels a handler whose connection is gone: the gateway closed it.
            call.closed_early = True
            raise
        finally:
            call.done.set()


def _tag(route: str, body: Mapping[str, Any]) -> str | None:
    if route == "messages":
        metadata = body.get("metadata")
        tag = metadata.get("user_id") if isinstance(metadata, Mapping) else None
    else:
        tag = body.get("user")
    return tag if isinstance(tag, str) else None


async def _hang(call: Call) -> None:
    """Nothing more, until the gateway closes the connection (this handler is cancelled)."""
    call.waiting.set()
    await asyncio.sleep(3600)


def _cut(request: web.Request) -> None:
    assert request.transport is not None
    request.transport.close()


class _Answer:
    """One request's answer in its route's wire format."""

    def __init__(self, route: str, body: dict[str, Any], call: Call) -> None:
        self.route, self.body, self.call = route, body, call
        self.script = call.script
        self.encoding = tiktoken.get_encoding("o200k_base")
        self.created = int(time.time())

    # Usage, as each provider would bill it.

    def usage(self, text: str) -> dict[str, Any]:
        """The route's usage block for an answer of `text`; noted on the call as it is sent."""
        output = len(self.encoding.encode(text))
        if self.route == "messages":
            return {
                "input_tokens": ANTHROPIC_INPUT_TOKENS,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": output,
            }
        if self.route == "chat":
            messages = self.body["messages"]
        else:
            value = self.body["input"]
            messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
        prompt = openai_chat_prompt_tokens(messages, "o200k_base") + HIDDEN_PROMPT_TOKENS
        completion = output + REASONING_TOKENS
        if self.route == "chat":
            return {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": REASONING_TOKENS},
            }
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": REASONING_TOKENS},
            "total_tokens": prompt + completion,
        }

    def note_usage(self, usage: Mapping[str, Any]) -> None:
        if self.route == "chat":
            self.call.usage = (usage["prompt_tokens"], usage["completion_tokens"])
        else:
            self.call.usage = (usage["input_tokens"], usage["output_tokens"])

    # Whole answers.

    def whole_object(self, text: str) -> dict[str, Any]:
        usage = self.usage(text)
        if self.route == "chat":
            return chat_completion("chatcmpl-scripted", self.created, self.body["model"], text, usage)
        if self.route == "responses":
            return self.response_object("completed", text, usage)
        return self.message_object(text, "end_turn", usage)

    def response_object(self, status: str, text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        output = [
            {
                "id": "msg_scripted",
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        return {
            "id": "resp_scripted",
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.body["model"],
            "output": output,
            "usage": usage,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
        }

    def message_object(self, text: str, stop_reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "msg_scripted",
            "type": "message",
            "role": "assistant",
            "model": self.body["model"],
            "content": [{"type": "text", "text": text}] if text else [],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }

    def error_body(self) -> tuple[int, dict[str, Any]]:
        if self.route == "messages":
            return 529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        error = {"message": "The server had an error.", "type": "server_error", "param": None, "code": None}
        return 500, {"error": error}

    async def whole(self, request: web.Request) -> web.StreamResponse:
        script, call = self.script, self.call
        ending = script.ending
        early = await self.before_head(request)
        if early is not None:
            return early
        if ending == "garbage":
            call.head_sent = True
            return web.Response(
                status=200, text="<html>502 Bad Gateway</html>", content_type="application/json"
            )
        text = PIECE * script.pieces
        whole = self.whole_object(text)
        data = json.dumps(whole).encode()
        if ending == "truncated":
            call.head_sent = True
            return web.Response(status=200, body=data[: len(data) // 2], content_type="application/json")
        if ending in ("pause_body", "stall", "cut"):
            # The head and half the body, then the scripted trouble.
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.content_length = len(data)
            await response.prepare(request)
            call.head_sent = True
            await response.write(data[: len(data) // 2])
            if ending == "stall":
                await _hang(call)
            if ending == "cut":
                _cut(request)
                await _hang(call)
            call.waiting.set()
            await asyncio.sleep(script.pause_seconds)
            await response.write(data[len(data) // 2 :])
            call.text = text
            self.note_usage(whole["usage"])
            await response.write_eof()
            return response
        call.head_sent = True
        call.text = text
        self.note_usage(whole["usage"])
        return web.json_response(whole)

    async def before_head(self, request: web.Request) -> web.StreamResponse | None:
        """The endings that come before any answer (shared by whole answers and streams):
        a stall or cut, an error status; a delayed head returns None after its pause."""
        script, call = self.script, self.call
        if script.ending in ("stall_head", "cut_head"):
            return await self.fail_before_head(request)
        if script.ending == "delay_head":
            call.waiting.set()
            await asyncio.sleep(script.pause_seconds)
        if script.ending == "error_status":
            status, error = self.error_body()
            call.head_sent = True
            return web.json_response(error, status=status)
        return None

    async def fail_before_head(self, request: web.Request) -> web.StreamResponse:
        if self.script.ending == "cut_head":
            _cut(request)
        await _hang(self.call)
        raise AssertionError("unreachable: the handler is cancelled")

    # Streams.

    async def stream(self, request: web.Request) -> web.StreamResponse:
        script, call = self.script, self.call
        ending = script.ending
        early = await self.before_head(request)
        if early is not None:
            return early
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        call.head_sent = True
        if ending == "garbage":
            await response.write(b"<html><body>502 Bad Gateway</body></html>")
            await response.write_eof()
            return response
        for event in self.prelude():
            await response.write(event)
            if self.route == "messages":
                call.started = True
        whole = ending in ("complete", "delay_head", "pause_body")
        sent = script.pieces if whole else script.after
        for index in range(sent):
            if ending == "pause_body" and index == script.after:
                call.waiting.set()
                await asyncio.sleep(script.pause_seconds)
            await response.write(self.piece_event(index))
            call.text += PIECE
        if ending == "stall":
            await _hang(call)
        if ending == "cut":
            _cut(request)
            await _hang(call)
        if ending == "truncated":
            half = self.piece_event(sent)
            await response.write(half[: len(half) // 2])
        elif ending == "error_event":
            await response.write(self.error_event())
        else:
            for event in self.closing(call.text):
                await response.write(event)
        await response.write_eof()
        return response

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        payload = json.dumps(data, separators=(",", ":")).encode()
        if self.route == "chat":
            return b"data: " + payload + b"\n\n"
        return f"event: {name}\ndata: ".encode() + payload + b"\n\n"

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": "chatcmpl-scripted",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.body["model"],
            "choices": choices,
        }
        if (self.body.get("stream_options") or {}).get("include_usage"):
            data["usage"] = usage
        return self.event("chunk", data)

    def prelude(self) -> list[bytes]:
        if self.route == "chat":
            return [self.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
        if self.route == "responses":
            created = {**self.response_object("in_progress", "", None), "output": []}
            item = {
                "id": "msg_scripted",
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": []}
            return [
                self.responses_event("response.created", {"response": created}, 0),
                self.responses_event("response.in_progress", {"response": created}, 1),
                self.responses_event("response.output_item.added", {"output_index": 0, "item": item}, 2),
                self.responses_event(
                    "response.content_part.added",
                    {"item_id": "msg_scripted", "output_index": 0, "content_index": 0, "part": part},
                    3,
                ),
            ]
        usage = {**self.usage(""), "output_tokens": 1}
        start = self.message_object("", None, usage)
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return [
            self.event("message_start", {"type": "message_start", "message": start}),
            self.event("content_block_start", block),
            self.event("ping", {"type": "ping"}),
        ]

    def responses_event(self, name: str, data: dict[str, Any], sequence: int) -> bytes:
        return self.event(name, {"type": name, **data, "sequence_number": sequence})

    def piece_event(self, index: int) -> bytes:
        if self.route == "chat":
            return self.chunk([{"index": 0, "delta": {"content": PIECE}, "finish_reason": None}])
        if self.route == "responses":
            delta = {"item_id": "msg_scripted", "output_index": 0, "content_index": 0, "delta": PIECE}
            return self.responses_event("response.output_text.delta", delta, 4 + index)
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": PIECE}}
        return self.event("content_block_delta", delta)

    def closing(self, text: str) -> list[bytes]:
        usage = self.usage(text)
        if self.route == "chat":
            events = [self.chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])]
            if (self.body.get("stream_options") or {}).get("include_usage"):
                events.append(self.chunk([], usage))
                self.note_usage(usage)
            return [*events, b"data: [DONE]\n\n"]
        if self.route == "responses":
            sequence = 4 + len(text) // len(PIECE)
            part = {"type": "output_text", "text": text, "annotations": []}
            where = {"item_id": "msg_scripted", "output_index": 0, "content_index": 0}
            whole = self.response_object("completed", text, usage)
            self.note_usage(usage)
            return [
                self.responses_event("response.output_text.done", {**where, "text": text}, sequence),
                self.responses_event("response.content_part.done", {**where, "part": part}, sequence + 1),
                self.responses_event(
                    "response.output_item.done", {"output_index": 0, "item": whole["output"][0]}, sequence + 2
                ),
                self.responses_event("response.completed", {"response": whole}, sequence + 3),
            ]
        self.note_usage(usage)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        }
        return [
            self.event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            self.event("message_delta", delta),
            self.event("message_stop", {"type": "message_stop"}),
        ]

    def error_event(self) -> bytes:
        """The provider's own in-band error, as each API sends it mid-stream."""
        if self.route == "chat":
            error = {
                "message": "The server had an error.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            return self.event("error", {"error": error})
        if self.route == "responses":
            failed = self.response_object("failed", self.call.text, None)
            failed["error"] = {"code": "server_error", "message": "The server had an error."}
            return self.responses_event("response.failed", {"response": failed}, 4 + self.script.after)
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return self.event("error", error)
