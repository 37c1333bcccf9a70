"""Parsing and validating request bodies, before anything is counted or reserved."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from gateway import jsontext, state
from gateway.auth import Principal
from gateway.config import ModelConfig
from gateway.errors import InvalidRequest, ModelNotFound, RequestTimeout, RequestTooLarge
from gateway.jsontext import ObjectText

PRINCIPAL = web.RequestKey("principal", Principal)
MODEL_LABEL = web.RequestKey("model_label", str)
REQUEST_ID = web.RequestKey("request_id", str)
# What the request path learned (usage, deployment, ...), for the request's log line.
EXCHANGE = web.RequestKey("exchange", object)
MAX_CLIENT_REQUEST_ID = 128
# No model completes more; a larger cap is a mistake (and would overflow the counters).
MAX_COMPLETION_TOKENS = 100_000_000
# OpenAI's documented ranges: n completions per prompt, best_of candidates (legacy completions).
MAX_N = 128
MAX_BEST_OF = 20


def new_request_id() -> str:
    # Random like uuid4, without building a UUID object per request.
    return "req_" + os.urandom(16).hex()


async def read_json_object(
    request: web.Request, *, spans: bool = False
) -> tuple[dict[str, Any], bytes, ObjectText | None]:
    """The body as a JSON object, as bytes and, if `spans` and large, as ObjectText;
    or a 400/413 that says what is wrong."""
    server = request.app[state.CONFIG].server
    try:
        # A client that trickles its body (slowloris) holds a connection: bound the wait.
        # A body that arrived with the headers (the common case) needs no timer.
        wait = None if request.content.is_eof() else server.body_timeout_seconds
        async with asyncio.timeout(wait):
            raw = await request.read()
    except TimeoutError as exc:
        raise RequestTimeout(
            f"The request body did not arrive within {server.body_timeout_seconds:g} s."
        ) from exc
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[state.CONFIG].server.max_body_bytes
        raise RequestTooLarge(f"Request body exceeds the gateway's limit of {limit} bytes.") from exc
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body, text = jsontext.parse(raw) if spans else (json.loads(raw), None)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send valid JSON (UTF-8)."
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body, raw, text


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


def requested_max_tokens(
    body: Mapping[str, Any], fields: Sequence[str] = ("max_completion_tokens", "max_tokens")
) -> int | None:
    """The request's own completion cap, if it gives one: the largest of `fields`, each
    one present validated.

    OpenAI's chat honours max_completion_tokens over max_tokens, but a compatible server
    may read either, so the largest is what the provider could generate (and bill).
    """
    largest: int | None = None
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not _is_whole(value, 1, MAX_COMPLETION_TOKENS):
            raise InvalidRequest(
                f"'{field}' must be a whole number from 1 to {MAX_COMPLETION_TOKENS:,}.", param=field
            )
        if largest is None or value > largest:
            largest = value
    return largest


def requested_choices(body: Mapping[str, Any], *, best_of: bool) -> int:
    """How many completions of each prompt the provider generates (and bills): `n`, or,
    with `best_of` (legacy completions), the best_of candidates it makes to return n."""
    n = body.get("n")
    if n is None:
        n = 1
    elif not _is_whole(n, 1, MAX_N):
        raise InvalidRequest(f"'n' must be a whole number from 1 to {MAX_N}.", param="n")
    candidates = body.get("best_of") if best_of else None
    if candidates is None:
        return int(n)
    if not _is_whole(candidates, 1, MAX_BEST_OF) or candidates < n:
        raise InvalidRequest(
            f"'best_of' must be a whole number from 1 to {MAX_BEST_OF}, and at least 'n' ({n}).",
            param="best_of",
        )
    return int(candidates)


def _is_whole(value: Any, least: int, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


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


def validate_input(body: Mapping[str, Any], field: str) -> None:
    """`prompt` (completions) or `input` (embeddings) must be present; its shape is
    checked when it is counted."""
    if field not in body:
        raise InvalidRequest(f"You must provide '{field}'.", param=field)


def validate_responses_input(body: Mapping[str, Any]) -> None:
    value = body.get("input")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise InvalidRequest("'input' must be a string or a non-empty array of input items.", param="input")


def validate_anthropic_messages(body: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: Field required (a non-empty array)", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(
                f"messages.{index}: each message needs role 'user' or 'assistant'", param=f"messages[{index}]"
            )
        if not isinstance(message.get("content"), str | list):
            raise InvalidRequest(f"messages.{index}.content: Field required", param=f"messages[{index}]")
