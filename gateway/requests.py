"""Parsing and validating request bodies, before anything is counted or reserved."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from gateway import jsontext, state
from gateway.auth import Principal
from gateway.config import ModelConfig
from gateway.errors import (
    InvalidRequest,
    ModelNotFound,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedContentEncoding,
)
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
    or a 400/413 that says what is wrong.

    Refused with a 400 besides malformed JSON: a body that is not UTF-8, a key given
    twice in one object (the gateway and a provider could read different values of it),
    and a lone UTF-16 surrogate in any string (not text: it cannot be encoded, counted
    or forwarded as UTF-8).
    """
    server = request.app[state.CONFIG].server
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        # aiohttp would inflate it (within max_body_bytes): some 8 KB of gzip buys a full
        # body to parse and count. No SDK compresses its requests.
        raise UnsupportedContentEncoding(
            "Compressed request bodies are not accepted; send the JSON uncompressed.",
            param="Content-Encoding",
        )
    try:
        if request.content.is_eof():
            # The body came with the headers (the common case): no timer, nor asyncio.timeout's
            # coroutines to enter and leave (some 10,000 instructions even with no timer).
            raw = await request.read()
        else:
            # A client that trickles its body (slowloris) holds a connection: bound the wait.
            async with asyncio.timeout(server.body_timeout_seconds):
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
    body, text = _checked_object(raw, spans)
    return body, raw, text


def _checked_object(raw: bytes, spans: bool) -> tuple[dict[str, Any], ObjectText | None]:
    try:
        body, text = _parse(raw, spans)
    except DuplicateKey as exc:
        where = _duplicate_key_path(raw)
        raise InvalidRequest(
            f"The key {_shown(exc.key)!r} is given more than once in the same JSON object"
            f"{f' (at {where})' if where else ''}; send each key once.",
            param=where or None,
            code="duplicate_key",
        ) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send valid JSON (UTF-8)."
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if _may_hold_surrogates(raw):
        found = _lone_surrogate_path(body)
        if found is not None:
            raise InvalidRequest(
                f"{found} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                "which is not text; send valid Unicode.",
                param=found,
                code="invalid_unicode",
            )
    return body, text


class DuplicateKey(Exception):
    """A JSON object gives `key` more than once."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return value


# json.loads with a key given twice refused, at any depth. Made once: json.loads with
# a hook builds a decoder per call (about 5 µs). The hook runs once per object, so a
# body of few objects (one long message) parses as fast as with json.loads, and one of
# hundreds of small objects about 0.3 µs per object slower (docs/security.md).
_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys)
# Where a lone surrogate can come from: an escape of one (JSON's \\uXXXX; group 1 set for
# a high surrogate, which must be followed by a low one), or its UTF-8 form (0xED
# 0xA0-0xBF), which json.loads accepts as well.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD](?:([89abAB])|[c-fC-F])[0-9a-fA-F]{2}")
_LOW_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")


def _parse(raw: bytes, spans: bool) -> tuple[Any, ObjectText | None]:
    """json.loads(raw), but only UTF-8 (RFC 8259: JSON between systems is UTF-8, and
    the body is forwarded as sent) and each key once per object, at any depth (DuplicateKey)."""
    encoding = jsontext.encoding_of(raw)
    if encoding != "utf-8" and encoding != "utf-8-sig":
        raise ValueError(f"JSON must be UTF-8, not {encoding}")
    if spans:
        return jsontext.parse(raw, _STRICT)
    return _STRICT.decode(raw.decode(encoding, "surrogatepass")), None


def _may_hold_surrogates(raw: bytes) -> bool:
    """False when no string of the body can hold a lone surrogate; True when one may
    (the body is then walked to find it, see _lone_surrogate_path).

    Cheap where it matters: a one-byte search (memchr: under 1 µs for 48 KB) rules out
    most bodies; one with a backslash costs a regex search (about 17 µs for 48 KB), and
    each escaped surrogate pair (an emoji written by json.dumps) a step of this loop.
    """
    if b"\xed" in raw and _ENCODED_SURROGATE.search(raw) is not None:
        return True
    if b"\\" not in raw:
        return False
    at = 0
    while (escape := _SURROGATE_ESCAPE.search(raw, at)) is not None:
        start = escape.start()
        if start and raw[start - 1] == 0x5C:
            return True  # after a backslash: perhaps text, perhaps an escape
        if escape[1] is None or _LOW_SURROGATE_ESCAPE.match(raw, escape.end()) is None:
            return True  # a low surrogate alone, or a high one without its low one
        at = escape.end() + 6
    return False


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        # Encoding is C speed (about 20 µs for 48 K characters; a regex takes 80).
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _lone_surrogate_path(body: dict[str, Any]) -> str | None:
    """Where the first string (a value or a key) holding a lone surrogate is, if any."""
    # A loop, not recursion: the body may be nested as deep as json.loads allows.
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return _path(path)
        elif isinstance(value, dict):
            for key in value:
                if _has_surrogate(key):
                    return _path((*path, key))
            stack.extend(((child, (*path, key)) for key, child in reversed(value.items())))
        elif isinstance(value, list):
            stack.extend((value[index], (*path, index)) for index in reversed(range(len(value))))
    return None


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its list of (key, value), duplicates kept."""


def _duplicate_key_path(raw: bytes) -> str:
    """Where the first key given twice is (the error path only: parses again)."""
    try:
        tree = json.loads(raw, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return ""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(tree, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _Pairs):
            seen: set[str] = set()
            for key, _ in value:
                if key in seen:
                    return _path((*path, key))
                seen.add(key)
            stack.extend(((child, (*path, key)) for key, child in reversed(value)))
        elif isinstance(value, list):
            stack.extend((value[index], (*path, index)) for index in reversed(range(len(value))))
    return ""


def _path(path: tuple[str | int, ...]) -> str:
    """messages[0].content, as the error's param."""
    parts: list[str] = []
    for step in path:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            parts.append(f".{_shown(step)}" if parts else _shown(step))
    return "".join(parts)


def _shown(key: str) -> str:
    """A key as an error may quote it: lone surrogates escaped, at most 100 characters."""
    key = key if len(key) <= 100 else key[:100] + "…"
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


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
