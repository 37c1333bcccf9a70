"""The request path: parse → count → reserve → forward → relay → settle.

Provider details live in providers/, accounting in quota/ and ledger/; this module
only puts them in order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from gateway import state
from gateway.auth import Principal
from gateway.config import ModelConfig
from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, RequestTooLarge
from gateway.exchange import Exchange
from gateway.providers import UpstreamRequest
from gateway.quota import ratelimit_headers
from gateway.quota.service import amounts_for
from gateway.relay import relay_body, relay_stream

PRINCIPAL = web.RequestKey("principal", Principal)
REQUEST_ID = web.RequestKey("request_id", str)
MODEL_LABEL = web.RequestKey("model_label", str)
MAX_CLIENT_REQUEST_ID = 128
# nginx's convention for "the client closed the connection before the answer".
CLIENT_CLOSED_REQUEST = 499


async def read_json_object(request: web.Request) -> tuple[dict[str, Any], int]:
    """The body as a JSON object and its size, or a 400/413 that says what is wrong."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[state.CONFIG].server.max_body_bytes
        raise RequestTooLarge(f"Request body exceeds the gateway's limit of {limit} bytes.") from exc
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send valid JSON (UTF-8)."
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body, len(raw)


def resolve_model(request: web.Request, body: Mapping[str, Any]) -> ModelConfig:
    model_name = body.get("model")
    if not isinstance(model_name, str) or not model_name:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    model = request.app[state.CONFIG].models.get(model_name)
    if model is None:
        shown = model_name if len(model_name) <= 100 else model_name[:100] + "…"
        raise ModelNotFound(
            f"The model `{shown}` does not exist or you do not have access to it.", param="model"
        )
    request[MODEL_LABEL] = model.name
    return model


def validate_messages(body: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of message objects.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{index}] must be an object with a string 'role'.",
                param=f"messages[{index}]",
            )
    return messages


MAX_TOKENS_FIELDS = ("max_completion_tokens", "max_tokens")


def requested_max_tokens(body: Mapping[str, Any]) -> int | None:
    """The request's own completion cap, if it gives one."""
    for field in MAX_TOKENS_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"'{field}' must be a positive integer.", param=field)
        return value
    return None


def wants_stream(body: Mapping[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    return stream


def client_request_id(request: web.Request) -> str | None:
    value = request.headers.get("X-Client-Request-Id") or request.headers.get("X-Request-Id")
    if value and len(value) <= MAX_CLIENT_REQUEST_ID and value.isprintable():
        return value
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app[state.CONFIG]
    principal = request[PRINCIPAL]
    body, body_bytes = await read_json_object(request)
    model = resolve_model(request, body)
    validate_messages(body)
    stream = wants_stream(body)
    quota = app[state.QUOTA]
    decision = quota.request_policy(principal, model)
    requested = requested_max_tokens(body)
    max_completion = quota.completion_budget(decision, requested, config.quota.default_max_completion_tokens)
    if decision.max_tokens_cap is not None and (requested is None or requested > max_completion):
        # The policy's cap goes upstream too, so the provider cannot bill past it.
        field = next((f for f in MAX_TOKENS_FIELDS if f in body), "max_tokens")
        body = {**body, field: max_completion}

    counter = app[state.COUNTER]
    profile = counter.registry.profile(model.upstream_model, model.tokenizer)
    prompt = await counter.count("chat", body, profile, body_bytes)
    reserved_tokens = prompt.tokens + max_completion
    ticket = await quota.admit(decision, amounts_for(model, prompt.tokens, max_completion))
    admission = ticket.admission

    exchange = Exchange(
        request_id=request[REQUEST_ID],
        route="chat/completions",
        principal=principal,
        model=model,
        profile=profile,
        stream=stream,
        prompt=prompt,
        reserved_tokens=reserved_tokens,
        ticket=ticket,
        client_request_id=client_request_id(request),
    )
    headers = {**ratelimit_headers(admission), "x-request-id": exchange.request_id}
    try:
        return await _forward(request, body, exchange, headers)
    except GatewayError as exc:
        exchange.status, exchange.error_code = exc.status, exc.code
        exc.headers = {**headers, **exc.headers}
        raise
    except asyncio.CancelledError:
        # The client went away (aiohttp cancels the handler): what was produced is charged.
        exchange.upstream_finished()
        exchange.status = exchange.status or CLIENT_CLOSED_REQUEST
        exchange.error_code = "client_disconnected"
        raise
    except BaseException:
        exchange.status, exchange.error_code = 500, "server_error"
        raise
    finally:
        # Synchronous: runs even when the handler is being cancelled.
        app[state.SETTLEMENT].settle_later(exchange)


async def _forward(
    request: web.Request, body: dict[str, Any], exchange: Exchange, headers: dict[str, str]
) -> web.StreamResponse:
    provider = request.app[state.PROVIDERS][exchange.model.provider]
    upstream_body = {**body, "model": exchange.model.upstream_model}
    client_wants_usage = False
    if exchange.stream:
        options = body.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        # Always ask for usage: it is what the reservation is settled with.
        upstream_body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    exchange.upstream_began()
    reply = await provider.send(UpstreamRequest("chat/completions", upstream_body, exchange.stream))
    if reply.chunks is None:
        exchange.upstream_finished()
        response = relay_body(reply, exchange, headers)
        exchange.status = response.status
        return response
    exchange.status = 200
    return await relay_stream(request, reply, exchange, headers, client_wants_usage)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex
