"""A fake OpenAI-compatible provider on a real aiohttp server, speaking OpenAI's wire format.

It bills like OpenAI: prompt tokens by the published chat formula in the model's
encoding (computed here independently, from tiktoken), completion tokens as the
encoded length of what it sends, unless a test overrides either figure.

Given tools and a user turn last, its chat calls tools as OpenAI does (whole, or streamed
as tool-call deltas: the call's id, type and name first, then its arguments in pieces);
after a tool result it answers text, so a tool round trip can run against it.
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
    """OpenAI's formula, written out as the cookbook gives it (string fields), plus the
    text of content parts and the names and arguments of tool calls (no published rule)."""
    encoding = tiktoken.get_encoding(encoding_name)
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            if isinstance(value, str):
                total += len(encoding.encode_ordinary(value))
            elif key == "content" and isinstance(value, list):
                texts = [part["text"] for part in value if part.get("type") == "text"]
                total += sum(len(encoding.encode_ordinary(text)) for text in texts)
            elif key == "tool_calls":
                total += sum(_call_tokens(call, encoding) for call in value)
            if key == "name":
                total += 1
    return total


def _call_tokens(call: dict[str, Any], encoding: Any) -> int:
    function = call["function"]
    return len(encoding.encode_ordinary(function["name"])) + len(
        encoding.encode_ordinary(function["arguments"])
    )


def arguments_for(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Arguments that fit a function's JSON schema: a made-up value per required property
    (every property when none is marked required)."""
    properties: dict[str, Any] = (parameters or {}).get("properties") or {}
    names = (parameters or {}).get("required") or list(properties)
    samples = {"string": "fake", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    return {name: samples.get(properties.get(name, {}).get("type"), "fake") for name in names}


@dataclass
class FakeUpstream:
    encoding_name: str = "o200k_base"
    reply: str = REPLY
    # Overrides of the usage it reports; None means "bill like OpenAI".
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Report completion_tokens = max_tokens, whatever was sent (to fill reservations).
    bill_max_tokens: bool = False
    # ok | error_500 | error_429 | garbage | cut_stream | stall_stream | no_usage
    # | stream_error (an in-stream error chunk after the first content chunk, then the end)
    mode: str = "ok"
    # Report prompt_tokens_details.cached_tokens; None sends no details (as some
    # compatible servers do).
    cached_tokens: int | None = None
    # Tool calls per answer (cycling through the tools) unless parallel_tool_calls is
    # false or tool_choice names one; their arguments (None: made from each schema).
    tool_calls_per_turn: int = 1
    tool_arguments: dict[str, Any] | None = None
    delay_seconds: float = 0.0
    # Chat requests inside their delay now, and the most there were at once.
    delayed: int = 0
    most_delayed: int = 0
    # Pause between stream chunks (and, in stall_stream mode, the stall after the first).
    chunk_delay_seconds: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Every request body as the bytes that arrived.
    raw_requests: list[bytes] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    azure_calls: list[tuple[str, str]] = field(default_factory=list)

    # Extra headers on every answer (tests check that provider cookies never leak).
    response_headers: dict[str, str] = field(default_factory=dict)
    # Streams: bytes written so far and handlers still running (backpressure tests).
    bytes_streamed: int = 0
    active_streams: int = 0
    # Stream this many 32 KiB events instead of the reply's tokens.
    big_events: int = 0
    # Pause after a stream's last event before ending the response.
    linger_seconds: float = 0.0
    # A misbehaving provider: this many 32 KiB events after [DONE], then the linger.
    events_after_done: int = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._extra_headers])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        # Azure OpenAI's deployment URLs.
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure_chat)
        return app

    @web.middleware
    async def _extra_headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.raw_requests.append(await request.read())
        response: web.StreamResponse = await handler(request)
        if not response.prepared:
            response.headers.update(self.response_headers)
        return response

    async def _azure_chat(self, request: web.Request) -> web.StreamResponse:
        self.azure_calls.append((request.match_info["deployment"], request.query.get("api-version", "")))
        return await self._chat(request)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers_seen.append(dict(request.headers))
        if self.mode == "error_500":
            return _error(500, "The server had an error while processing your request.", "server_error")
        encoding = tiktoken.get_encoding(self.encoding_name)
        prompts = (
            body["prompt"]
            if isinstance(body["prompt"], list) and isinstance(body["prompt"][0], str)
            else [body["prompt"]]
        )
        tokens = encoding.encode(self.reply)[: body.get("max_tokens", 16)]
        text = encoding.decode(tokens)
        prompt_tokens = sum(len(encoding.encode(p)) if isinstance(p, str) else len(p) for p in prompts)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens) * len(prompts),
            "total_tokens": prompt_tokens + len(tokens) * len(prompts),
        }
        created = int(time.time())
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "length"}
            for i in range(len(prompts))
        ]
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "created": created,
                    "model": body["model"],
                    "choices": choices,
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for token in tokens:
            chunk: dict[str, Any] = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": created,
                "model": body["model"],
                "choices": [
                    {"index": 0, "text": encoding.decode([token]), "logprobs": None, "finish_reason": None}
                ],
            }
            if include_usage:
                chunk["usage"] = None
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if include_usage:
            final = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": created,
                "model": body["model"],
                "choices": [],
                "usage": usage,
            }
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        encoding = tiktoken.get_encoding("cl100k_base")
        inputs = (
            body["input"]
            if isinstance(body["input"], list) and not isinstance(body["input"][0], int)
            else [body["input"]]
        )
        tokens = sum(len(encoding.encode(item)) if isinstance(item, str) else len(item) for item in inputs)
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        encoding = tiktoken.get_encoding(self.encoding_name)
        tokens = encoding.encode(self.reply)[: body.get("max_output_tokens", 1000)]
        text = encoding.decode(tokens)
        usage = {
            "input_tokens": self.prompt_tokens or 12,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(tokens),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": (self.prompt_tokens or 12) + len(tokens),
        }
        message = {
            "id": "msg_fake",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        response_obj = {
            "id": "resp_fake",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": body["model"],
            "output": [message],
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
        if not body.get("stream"):
            return web.json_response(response_obj)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def event(name: str, data: dict[str, Any]) -> None:
            await response.write(
                f"event: {name}\ndata: ".encode() + json.dumps({"type": name, **data}).encode() + b"\n\n"
            )

        created = {**response_obj, "status": "in_progress", "output": [], "usage": None}
        await event("response.created", {"response": created, "sequence_number": 0})
        for index, token in enumerate(tokens):
            await event(
                "response.output_text.delta",
                {
                    "item_id": "msg_fake",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": encoding.decode([token]),
                    "sequence_number": index + 1,
                },
            )
        await event("response.completed", {"response": response_obj, "sequence_number": len(tokens) + 1})
        await asyncio.sleep(self.linger_seconds)
        return response

    def _usage(self, body: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
        prompt = self.prompt_tokens
        if prompt is None:
            prompt = openai_chat_prompt_tokens(body["messages"], self.encoding_name)
        completion = self.completion_tokens if self.completion_tokens is not None else completion_tokens
        if self.bill_max_tokens:
            completion = body.get("max_completion_tokens") or body["max_tokens"]
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens, "audio_tokens": 0}
        return usage

    def _tool_calls(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The calls OpenAI's model would make: with tools, a user turn last and
        tool_choice not none; none after a tool result, so the next turn is text."""
        functions = [tool["function"] for tool in body.get("tools") or [] if tool.get("type") == "function"]
        messages = body.get("messages") or []
        choice = body.get("tool_choice", "auto")
        if not functions or not messages or messages[-1].get("role") != "user" or choice == "none":
            return []
        if isinstance(choice, dict):
            functions = [f for f in functions if f["name"] == choice["function"]["name"]]
            if not functions:
                return []
        count = 1 if body.get("parallel_tool_calls") is False else self.tool_calls_per_turn
        calls = []
        for index in range(count):
            function = functions[index % len(functions)]
            arguments = self.tool_arguments
            if arguments is None:
                arguments = arguments_for(function.get("parameters"))
            calls.append(
                {
                    "id": f"call_fake{index}",
                    "type": "function",
                    "function": {
                        "name": function["name"],
                        "arguments": json.dumps(arguments, separators=(",", ":")),
                    },
                }
            )
        return calls

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers_seen.append(dict(request.headers))
        if self.delay_seconds:
            self.delayed += 1
            self.most_delayed = max(self.most_delayed, self.delayed)
            try:
                await asyncio.sleep(self.delay_seconds)
            finally:
                self.delayed -= 1
        if self.mode == "error_500":
            return _error(500, "The server had an error while processing your request.", "server_error")
        if self.mode == "error_429":
            return _error(429, "Rate limit reached for requests", "requests", headers={"retry-after": "7"})
        if self.mode == "garbage":
            return web.Response(status=200, text="<html>not json", content_type="application/json")
        if self.mode == "truncated_json":
            return web.Response(
                status=200, text='{"id": "chatcmpl-fake", "choices": [{"mess', content_type="application/json"
            )
        encoding = tiktoken.get_encoding(self.encoding_name)
        tokens = encoding.encode(self.reply)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is not None:
            tokens = tokens[:limit]
        text = encoding.decode(tokens)
        calls = self._tool_calls(body)
        generated = sum(_call_tokens(call, encoding) for call in calls) if calls else len(tokens)
        usage = self._usage(body, generated)
        created = int(time.time())
        if not body.get("stream"):
            completion = chat_completion("chatcmpl-fake", created, body["model"], text, usage, calls)
            if self.mode == "no_usage":
                del completion["usage"]
            return web.json_response(completion)
        if calls:
            return await self._stream_tool_calls(request, body, calls, encoding, usage, created)
        return await self._stream(request, body, tokens, encoding, usage, created)

    async def _stream_tool_calls(
        self,
        request: web.Request,
        body: dict[str, Any],
        calls: list[dict[str, Any]],
        encoding: Any,
        usage: dict[str, Any],
        created: int,
    ) -> web.StreamResponse:
        """Tool calls as OpenAI streams them: each call's index, id, type and name with
        empty arguments first (the first with the role), then its arguments in pieces."""
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            await response.write(_chunk_event(body, created, [choice], include_usage))

        for index, call in enumerate(calls):
            header = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            delta: dict[str, Any] = {"tool_calls": [header]}
            if index == 0:
                delta = {"role": "assistant", "content": None, **delta, "refusal": None}
            await send(delta)
            for token in encoding.encode(call["function"]["arguments"]):
                piece = encoding.decode([token])
                await send({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        await send({}, "tool_calls")
        if include_usage:
            await response.write(_chunk_event(body, created, [], include_usage, usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

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
        self.active_streams += 1
        try:
            return await self._write_stream(
                request, response, body, tokens, encoding, usage, created, include_usage
            )
        finally:
            self.active_streams -= 1

    async def _write_stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        body: dict[str, Any],
        tokens: list[int],
        encoding: Any,
        usage: dict[str, int],
        created: int,
        include_usage: bool,
    ) -> web.StreamResponse:
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
        if self.big_events:
            # Large events, cheap to make: for backpressure tests that must outgrow socket buffers.
            piece = ("stream " * 4_682)[:32_768]
            for _ in range(self.big_events):
                data = event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
                await response.write(data)
                self.bytes_streamed += len(data)
            tokens = tokens[:0]
        for position, token in enumerate(tokens):
            if self.mode == "cut_stream" and position == len(tokens) // 2:
                # Close the connection mid-stream, as a crashing upstream would.
                assert request.transport is not None
                request.transport.close()
                return response
            if self.mode == "stall_stream" and position == 1:
                await asyncio.sleep(3600)
            if self.mode == "stream_error" and position == 1:
                await response.write(STREAM_ERROR_EVENT)
                await response.write_eof()
                return response
            if self.chunk_delay_seconds:
                await asyncio.sleep(self.chunk_delay_seconds)
            piece = encoding.decode([token])
            data = event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            await response.write(data)
            self.bytes_streamed += len(data)
        await response.write(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if include_usage and self.mode != "no_usage":
            await response.write(event([], usage))
        await response.write(b"data: [DONE]\n\n")
        for _ in range(self.events_after_done):
            await response.write(b"data: " + b"x" * 32_762 + b"\n\n")
        await asyncio.sleep(self.linger_seconds)
        await response.write_eof()
        return response


def chat_completion(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    usage: dict[str, Any],
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A whole chat.completion of one choice, in OpenAI's shape: text, or tool calls
    (content null, finish_reason tool_calls)."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls, "refusal": None}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if tool_calls else "stop",
            }
        ],
        "usage": usage,
    }


# OpenAI's in-stream error: a chunk carrying only `error`, and no [DONE] after it.
STREAM_ERROR_EVENT = (
    b'data: {"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","param":null,"code":null}}\n\n'
)


def _chunk_event(
    body: dict[str, Any],
    created: int,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage: dict[str, Any] | None = None,
) -> bytes:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": created,
        "model": body["model"],
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)
