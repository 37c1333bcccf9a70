"""Pre-flight counts without forwarding: Anthropic's count_tokens and our own count endpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway import state
from gateway.errors import InvalidRequest
from gateway.requests import read_json_object, resolve_model, validate_messages


def route_of(body: Mapping[str, Any]) -> str:
    """Which OpenAI endpoint a body is for, by the field that holds its prompt."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completions"
    if "input" in body:
        return "embeddings"
    raise InvalidRequest("The body needs 'messages', 'prompt' or 'input' to be counted.", param="messages")


async def count_openai_request(request: web.Request) -> web.Response:
    """POST /v1/tokens/count: the gateway's pre-flight count of an OpenAI request body."""
    body, raw, _ = await read_json_object(request)
    size = len(raw)
    model = resolve_model(request, body)
    route = route_of(body)
    if route == "chat":
        validate_messages(body)
    counter = request.app[state.COUNTER]
    profile = counter.registry.profile(model.upstream_model, model.tokenizer)
    count = await counter.count(route, body, profile, size)
    return web.json_response(
        {
            "object": "token_count",
            "model": model.name,
            "route": route,
            "prompt_tokens": count.tokens,
            "raw_tokens": count.raw_tokens,
            "exact": count.exact,
            "tokenizer": count.tokenizer,
            "factor": count.factor,
        }
    )


async def count_anthropic_request(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens in Anthropic's shape: {"input_tokens": N}."""
    body, raw, _ = await read_json_object(request)
    size = len(raw)
    model = resolve_model(request, body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Field required", param="messages")
    counter = request.app[state.COUNTER]
    profile = counter.registry.profile(model.upstream_model, model.tokenizer)
    count = await counter.count("messages", body, profile, size)
    return web.json_response({"input_tokens": count.tokens})
