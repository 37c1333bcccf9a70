"""Relaying a provider's reply to the client: whole bodies, or SSE event by event.

Streams are never buffered whole: each complete event is written as soon as it
arrives, and `write()` waits for a slow client (backpressure) instead of queueing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

from aiohttp import web

from gateway.errors import GatewayError, UpstreamError
from gateway.exchange import Exchange
from gateway.providers import UpstreamReply
from gateway.providers.openai_wire import (
    SseSplitter,
    chunk_object,
    chunk_text,
    error_event,
    event_data,
    usage_from_object,
)

log = logging.getLogger("gateway.relay")

_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_DONE = b"[DONE]"


def relay_body(reply: UpstreamReply, exchange: Exchange, headers: Mapping[str, str]) -> web.Response:
    """A whole (non-streamed) reply: the provider's bytes, untouched, plus our headers."""
    if reply.status != 200:
        raise upstream_failure(reply, exchange.model.provider)
    try:
        completion = json.loads(reply.body)
    except ValueError as exc:
        raise UpstreamError(
            f"Provider '{exchange.model.provider}' answered with a body that is not JSON.",
            code="upstream_invalid_response",
        ) from exc
    exchange.usage = usage_from_object(completion)
    if exchange.usage is None and isinstance(completion, Mapping):
        for choice in completion.get("choices") or []:
            message = choice.get("message") if isinstance(choice, Mapping) else None
            if isinstance(message, Mapping) and isinstance(message.get("content"), str):
                exchange.relayed_text.append(message["content"])
    return web.Response(status=200, body=reply.body, content_type="application/json", headers=headers)


async def relay_stream(
    request: web.Request,
    reply: UpstreamReply,
    exchange: Exchange,
    headers: Mapping[str, str],
    client_wants_usage: bool,
) -> web.StreamResponse:
    """Pass SSE events through as they come; note usage; survive either side leaving."""
    assert reply.chunks is not None
    response = web.StreamResponse(
        status=200,
        headers={
            **headers,
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    await response.prepare(request)
    splitter = SseSplitter()
    try:
        async for data in reply.chunks:
            for event in splitter.feed(data):
                if _note_event(event, exchange) or client_wants_usage:
                    await response.write(event)
        exchange.upstream_finished()
        if splitter.remainder().strip():
            await response.write(splitter.remainder() + b"\n\n")
    except GatewayError as exc:
        # Headers are gone already: tell the client in-band, as OpenAI does.
        exchange.upstream_finished()
        exchange.error_code = exc.code
        log.warning("stream %s failed upstream: %s", exchange.request_id, exc.message)
        await _write_quietly(response, error_event(exc.message, exc.code), exchange)
    except ConnectionError:
        exchange.upstream_finished()
        exchange.client_disconnected = True
        exchange.error_code = "client_disconnected"
    finally:
        await reply.close()
    if not exchange.client_disconnected:
        await _write_eof_quietly(response, exchange)
    return response


def _note_event(event: bytes, exchange: Exchange) -> bool:
    """Record what the event carries; False for the usage-only chunk we asked for ourselves."""
    payload = event_data(event)
    if payload is None or payload == _DONE:
        return True
    if _HAS_USAGE.search(payload):
        chunk = chunk_object(payload)
        usage = usage_from_object(chunk)
        if usage is not None:
            exchange.usage = usage
            if chunk is not None and chunk.get("choices") == []:
                return False
    if exchange.usage is None:
        chunk = chunk_object(payload)
        if chunk is not None:
            exchange.relayed_text.append(chunk_text(chunk))
    return True


async def _write_quietly(response: web.StreamResponse, data: bytes, exchange: Exchange) -> None:
    try:
        await response.write(data)
    except ConnectionError:
        exchange.client_disconnected = True


async def _write_eof_quietly(response: web.StreamResponse, exchange: Exchange) -> None:
    try:
        await response.write_eof()
    except ConnectionError:
        exchange.client_disconnected = True


def upstream_failure(reply: UpstreamReply, provider: str) -> GatewayError:
    """A provider's non-200 answer as our error: its own message where it gave one."""
    message = f"Provider '{provider}' answered HTTP {reply.status}."
    try:
        body = json.loads(reply.body)
        upstream_message = body["error"]["message"]
        if isinstance(upstream_message, str):
            message = f"{message} {upstream_message}"
    except (ValueError, KeyError, TypeError):
        pass
    if reply.status in (401, 403):
        # Our provider credentials were refused: not the caller's key, so not a 401.
        return UpstreamError(message, code="upstream_auth_failed")
    if reply.status == 429:
        headers = {"retry-after": reply.retry_after} if reply.retry_after else {}
        return GatewayError(
            message, headers=headers, code="upstream_rate_limited", error_type="requests"
        ).with_status(429)
    if 400 <= reply.status < 500:
        error = GatewayError(message, code="upstream_rejected", error_type="invalid_request_error")
        return error.with_status(reply.status)
    return UpstreamError(message, code="upstream_error")
