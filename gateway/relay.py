"""Relaying a provider's reply to the client: whole bodies, or SSE event by event.

Streams are never buffered whole: each complete event is written as soon as it
arrives, and `write()` waits for a slow client (backpressure) instead of queueing, so
memory per stream stays bounded by one read from the provider. Only the final events
wait, for the usage record (see SseResponse).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from aiohttp import web

from gateway import jsonlines
from gateway.errors import GatewayError, UpstreamError
from gateway.exchange import CLIENT_CLOSED_REQUEST, Exchange
from gateway.providers import UpstreamReply, Usage, anthropic_wire, openai_wire
from gateway.providers.openai_wire import SseSplitter, chunk_object, event_data, usage_from_object
from gateway.redact import redact

log = logging.getLogger("gateway.relay")

_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_DONE = b"[DONE]"
# The Responses API's last event: its data's own type (escaped quotes in text never match).
_RESPONSE_OVER = re.compile(rb'"type"\s*:\s*"response\.(completed|failed|incomplete)"')

UNPARSED_LIMIT_BYTES = 256 * 1024
# What a stream's end may hold back (see SseResponse); past it, held events are sent.
HOLD_LIMIT_BYTES = 256 * 1024


TALLY_FLUSH_CHARS = 64 * 1024


class TextTally:
    """Counts relayed text in pieces of at most 64K characters, so memory stays bounded
    however long the stream (only used when the provider's usage never arrives)."""

    def __init__(self, count: Callable[[str], int]) -> None:
        self._count = count
        self._pending: list[str] = []
        self._pending_chars = 0
        self._tokens = 0

    def add(self, piece: str) -> None:
        if not piece:
            return
        self._pending.append(piece)
        self._pending_chars += len(piece)
        if self._pending_chars >= TALLY_FLUSH_CHARS:
            self._tokens += self._count("".join(self._pending))
            self._pending, self._pending_chars = [], 0

    @property
    def tokens(self) -> int:
        return self._tokens + (self._count("".join(self._pending)) if self._pending else 0)

    @property
    def empty(self) -> bool:
        return not self._tokens and not self._pending


class StreamObserver(Protocol):
    """Reads each event of one wire format: usage, text, and whether to pass it on."""

    @property
    def usage(self) -> Usage | None: ...

    # The wire format's last event (or an error event) was observed: what follows is the
    # stream's end, held for the usage record; a stream that never gets here was cut short.
    @property
    def finished(self) -> bool: ...

    # Set when the provider reported an error inside the stream.
    @property
    def error_code(self) -> str | None: ...

    @property
    def text(self) -> TextTally: ...

    def observe(self, event: bytes) -> bool: ...

    def error_event(self, message: str, code: str) -> bytes: ...


class OpenAIStream:
    """Chat and completions chunks; the final usage chunk may be ours to withhold.

    Text is counted only if the provider's usage never arrives (we always ask for it),
    so chunks are kept unparsed until then: parsing every chunk of every stream for a
    count that is almost never needed was the largest cost of relaying a stream. What
    is kept is bounded; past UNPARSED_LIMIT_BYTES it is counted and dropped.
    """

    def __init__(self, count: Callable[[str], int], withhold_usage_chunk: bool) -> None:
        self.usage: Usage | None = None
        self.finished = False
        self.error_code: str | None = None
        self._text = TextTally(count)
        self._withhold = withhold_usage_chunk
        self._unparsed: list[bytes] = []
        self._unparsed_bytes = 0

    @property
    def text(self) -> TextTally:
        self._tally_unparsed()
        return self._text

    def observe(self, event: bytes) -> bool:
        if len(event) < 32 and event_data(event) == _DONE:
            self.finished = True
            return True
        if b'"error"' in event:
            self._note_error(_chunk_of(event))
        if _HAS_USAGE.search(event):
            chunk = _chunk_of(event)
            usage = usage_from_object(chunk)
            if usage is not None:
                self.usage = usage
                self._unparsed, self._unparsed_bytes = [], 0
                if self._withhold and chunk is not None and chunk.get("choices") == []:
                    return False
        if self.usage is None:
            # Kept whole; its data is taken out only if it must be counted.
            self._unparsed.append(event)
            self._unparsed_bytes += len(event)
            if self._unparsed_bytes >= UNPARSED_LIMIT_BYTES:
                self._tally_unparsed()
        return True

    def _note_error(self, chunk: Mapping[str, Any] | None) -> None:
        # OpenAI's in-stream error chunk, or the Responses API's `error` event.
        if chunk is not None and (isinstance(chunk.get("error"), Mapping) or chunk.get("type") == "error"):
            self.error_code = "upstream_stream_error"
            self.finished = True

    def _tally_unparsed(self) -> None:
        for event in self._unparsed:
            chunk = _chunk_of(event)
            if chunk is not None:
                self._text.add(openai_wire.chunk_text(chunk))
        self._unparsed, self._unparsed_bytes = [], 0

    def error_event(self, message: str, code: str) -> bytes:
        return openai_wire.error_event(message, code)


def _chunk_of(event: bytes) -> Mapping[str, Any] | None:
    """The JSON object an event carries, or None ([DONE], comments, not JSON)."""
    payload = event_data(event)
    return chunk_object(payload) if payload is not None and payload != _DONE else None


class ResponsesStream(OpenAIStream):
    """Responses API events: text deltas, and usage in `response.completed`."""

    def __init__(self, count: Callable[[str], int]) -> None:
        super().__init__(count, withhold_usage_chunk=False)

    def observe(self, event: bytes) -> bool:
        over = _RESPONSE_OVER.search(event)
        if over is not None:
            self.finished = True
            if over.group(1) == b"failed":
                self.error_code = "upstream_stream_error"
        return super().observe(event)

    def error_event(self, message: str, code: str) -> bytes:
        # The Responses API ends a failed stream with `response.failed`, not an error chunk.
        failed = {
            "type": "response.failed",
            "response": {
                "id": "resp_failed",
                "object": "response",
                "created_at": int(time.time()),
                "status": "failed",
                "error": {"code": code, "message": message},
                "incomplete_details": None,
                "output": [],
                "usage": None,
            },
        }
        return b"event: response.failed\ndata: " + json.dumps(failed).encode() + b"\n\n"


class AnthropicStream:
    """Messages events: input tokens in message_start, output tokens in message_delta."""

    def __init__(self, count: Callable[[str], int]) -> None:
        self.usage: Usage | None = None
        self.finished = False
        self.error_code: str | None = None
        self.text = TextTally(count)
        # message_start's usage: the input tokens, known before any output.
        self.started: Usage | None = None

    def observe(self, event: bytes) -> bool:
        payload = event_data(event)
        data = chunk_object(payload) if payload is not None else None
        if data is None:
            return True
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message")
            self.started = anthropic_wire.message_usage(
                message.get("usage") if isinstance(message, Mapping) else None
            )
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            self.error_code = "upstream_stream_error"
            self.finished = True
        elif kind == "message_delta" and self.started is not None:
            usage = data.get("usage")
            output = usage.get("output_tokens") if isinstance(usage, Mapping) else None
            if isinstance(output, int):
                started = self.started
                self.usage = Usage(
                    started.prompt_tokens,
                    output,
                    started.cached_prompt_tokens,
                    started.cache_write_prompt_tokens,
                )
        elif kind == "content_block_start":
            block = data.get("content_block")
            if isinstance(block, Mapping) and isinstance(block.get("name"), str):
                self.text.add(block["name"])  # a tool call's name is generated too
        elif kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, Mapping):
                piece = delta.get("text", delta.get("partial_json", delta.get("thinking")))
                if isinstance(piece, str):
                    self.text.add(piece)
        return True

    def error_event(self, message: str, code: str) -> bytes:
        return anthropic_wire.error_event(message)


def take_body_usage(reply: UpstreamReply, exchange: Exchange) -> Any:
    """Note a whole reply's usage on the exchange, and return its parsed body; raise the
    error it amounts to, if any.

    Without a usage block, what the provider generated is counted instead. A reply
    from a deployment of another API family is read in that family's format.
    """
    if reply.status != 200:
        exchange.refused_by_provider = True
        raise upstream_failure(reply, exchange.deployment, exchange.request_id)
    try:
        # Translated, the body is rewritten: every value as json.loads reads it. Relayed,
        # it goes as the provider's bytes, and only its usage and text are read.
        body = _json_body(reply.body) if exchange.translator is not None else _relayed_json(reply.body)
    except (ValueError, RecursionError) as exc:
        raise UpstreamError(
            f"Provider '{exchange.deployment}' answered with a body that is not JSON.",
            code="upstream_invalid_response",
        ) from exc
    translator = exchange.translator
    anthropic = (exchange.wire_format if translator is None else translator.provider) == "anthropic"
    if translator is not None:
        exchange.usage = translator.usage(body) if isinstance(body, Mapping) else None
    elif anthropic:
        exchange.usage = anthropic_wire.message_usage(
            body.get("usage") if isinstance(body, Mapping) else None
        )
    else:
        exchange.usage = usage_from_object(body)
    if exchange.usage is None:
        text = anthropic_wire.message_text(body) if anthropic else openai_wire.body_text(body)
        exchange.relayed_tokens = exchange.profile.tokenizer.count(text) if text else 0
    return body


def _json_body(raw: bytes) -> Any:
    """json.loads(raw), with its result and its errors (ValueError, RecursionError), in
    fewer steps for the usual body, an object in UTF-8: no encoding to detect, and the
    C scanner called at once (44,000 instructions for a 330-byte completion, now 30,000)."""
    if raw[:1] != b"{" or raw[1:2] == b"\x00":  # else json.loads would find UTF-16 or 32
        return json.loads(raw)
    text = raw.decode("utf-8", "surrogatepass")
    try:
        value, end = _scan_json(text, 0)
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    if end != len(text):
        end = _JSON_WHITESPACE.match(text, end).end()  # type: ignore[union-attr]
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    return value


def _relayed_json(raw: bytes) -> Any:
    """json.loads(raw) by orjson (a 330-byte completion in a sixth of the instructions;
    see gateway.jsonlines), which turns an integer past 64 bits into a float."""
    return jsonlines.loads(raw)


_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def relay_body(reply: UpstreamReply, exchange: Exchange, headers: Mapping[str, str]) -> web.Response:
    """A whole (non-streamed) reply: the provider's bytes, untouched, plus our headers;
    from a deployment of another API family, its answer translated into the caller's."""
    body = take_body_usage(reply, exchange)
    translator = exchange.translator
    if translator is None:
        return web.Response(status=200, body=reply.body, content_type="application/json", headers=headers)
    if not isinstance(body, Mapping):
        raise UpstreamError(
            f"Provider '{exchange.deployment}' answered with a body that is not a JSON object.",
            code="upstream_invalid_response",
        )
    answer = json.dumps(translator.response(body), ensure_ascii=False, separators=(",", ":")).encode()
    return web.Response(status=200, body=answer, content_type="application/json", headers=headers)


async def relay_stream(
    request: web.Request,
    reply: UpstreamReply,
    exchange: Exchange,
    headers: Mapping[str, str],
    observer: StreamObserver,
) -> web.StreamResponse:
    """Pass SSE events through as they come; note usage; survive either side leaving."""
    assert reply.chunks is not None
    response = SseResponse(
        status=200,
        headers={
            **headers,
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    splitter = SseSplitter()
    first_event = True
    try:
        # Inside the try: a client may be gone before the headers go out.
        await response.prepare(request)
        async for data in reply.chunks:
            # Events that arrived together leave together: one write, not one per event.
            passed = [event for event in splitter.feed(data) if observer.observe(event)]
            if passed:
                events = b"".join(passed)
                if response.holding or reply.chunks_over() or observer.finished:
                    # The end of the answer: it leaves after the usage is recorded.
                    response.hold(events)
                    if response.held_bytes > HOLD_LIMIT_BYTES:
                        # A provider still sending after its last event: passed on, not kept.
                        await response.write(response.take_held())
                else:
                    await response.write(events)
                if first_event:
                    first_event = False
                    exchange.first_event_at = time.monotonic()
        exchange.upstream_finished()
        _end_of_stream(response, splitter.remainder(), observer, exchange)
    except GatewayError as exc:
        exchange.upstream_finished()
        log.warning("stream %s failed upstream: %s", exchange.request_id, exc.message)
        if observer.finished:
            # Failed after its last event (while lingering): the client has the whole answer.
            if observer.error_code is not None:
                exchange.error_code = observer.error_code
        else:
            # Headers are gone already: tell the client in-band, as the provider would.
            exchange.error_code, exchange.error_detail = exc.code, exc.detail
            response.hold(observer.error_event(exc.message, exc.code))
    except ConnectionError:
        exchange.upstream_finished()
        exchange.client_disconnected = True
        exchange.status = CLIENT_CLOSED_REQUEST
        exchange.error_code = "client_disconnected"
    finally:
        await reply.close()
        exchange.usage = observer.usage
        if observer.usage is None and not observer.text.empty:
            exchange.relayed_tokens = observer.text.tokens
        if isinstance(observer, AnthropicStream) and observer.started is not None:
            exchange.reported_prompt_tokens = observer.started.prompt_tokens
    # Ended by the outermost middleware (see SseResponse) once the handler has recorded the usage.
    return response


def _end_of_stream(
    response: SseResponse, remainder: bytes, observer: StreamObserver, exchange: Exchange
) -> None:
    """The provider's stream is over: was it whole? A cut one ends in our error event.

    A last event without its closing blank line is passed on when it is whole (some
    servers end so); half an event is dropped, never relayed.
    """
    if remainder.strip():
        payload = event_data(remainder)
        if payload is not None and (payload == _DONE or chunk_object(payload) is not None):
            if observer.observe(remainder):
                response.hold(remainder.rstrip(b"\n") + b"\n\n")
    if observer.error_code is not None:
        exchange.error_code = observer.error_code
    elif not observer.finished and observer.usage is None:
        exchange.error_code = "upstream_stream_cut"
        message = f"Provider '{exchange.deployment}' ended the stream before finishing it."
        response.hold(observer.error_event(message, "upstream_stream_cut"))


class SseResponse(web.StreamResponse):
    """A stream whose last events go out with its end, after the handler returns.

    The handler spools the usage record as it returns, and the outermost middleware
    (or aiohttp) then calls write_eof: so a client never holds a whole answer whose record is not on disk, and
    a gateway killed in between loses no answered request. Holding costs no latency:
    it starts only once the provider's stream is over or has sent its final event.
    """

    # The held bytes; usually one piece, so kept joined.
    _tail = b""

    @property
    def holding(self) -> bool:
        return bool(self._tail)

    @property
    def held_bytes(self) -> int:
        return len(self._tail)

    def hold(self, data: bytes) -> None:
        self._tail += data

    def take_held(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail

    async def write_eof(self, data: bytes = b"") -> None:
        tail = self.take_held()
        await super().write_eof(tail + data if tail else data)


# One WARNING line per provider error answer, with its text (redacted) for operators.
upstream_log = logging.getLogger("gateway.upstream")

# A provider's error type or code reaches the caller only if it is an identifier like this.
_SAFE_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Error bodies are short; of a larger one this much is logged (redact() cuts it further)
# and nothing is parsed, so a huge body costs little.
_LOGGED_ERROR_BYTES = 8 * 1024
_PARSED_ERROR_BYTES = 64 * 1024


class ProviderError(UpstreamError):
    """A provider's own error answer, told in our words (see upstream_failure).

    `provider_message` is the provider's text, redacted; it joins our message only
    through `expose()`, for a provider whose operator set `expose_errors`.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        provider_message: str | None,
        status: int,
        code: str,
        error_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, error_type=error_type, headers=headers)
        self.status = status
        self.provider = provider
        self.provider_message = provider_message
        self.exposed = False

    def expose(self) -> None:
        """Put the provider's (redacted) message after ours, once."""
        if self.provider_message and not self.exposed:
            self.message = f"{self.message} Provider message: {self.provider_message}"
            self.exposed = True


def upstream_failure(reply: UpstreamReply, provider: str, request_id: str) -> ProviderError:
    """A provider's non-200 answer as our error: its status, error type and code, our request id.

    Never the provider's free text, which can hold internal addresses or a fragment of
    our credentials: that goes to the log (redacted), and to the caller only through
    ProviderError.expose(). Our `code` stays ours (upstream_*), so SDKs see one vocabulary.
    """
    upstream_log.warning(
        "provider %s answered HTTP %d to request %s: %s",
        provider,
        reply.status,
        request_id,
        redact(reply.body[:_LOGGED_ERROR_BYTES].decode("utf-8", errors="replace")),
        extra={"fields": {"request_id": request_id, "provider": provider, "upstream_status": reply.status}},
    )
    provider_type, provider_code, provider_message = _provider_error_fields(reply.body)
    named = ", ".join(
        f"{label} {value}" for label, value in (("type", provider_type), ("code", provider_code)) if value
    )
    message = (
        f"Provider '{provider}' answered HTTP {reply.status}{f' ({named})' if named else ''}."
        f" Request id {request_id}."
    )
    ours = _our_error(reply.status)
    headers = {"retry-after": reply.retry_after} if reply.status == 429 and reply.retry_after else {}
    return ProviderError(
        message,
        provider=provider,
        provider_message=redact(provider_message) if provider_message else None,
        status=ours.status,
        code=ours.code,
        error_type=ours.error_type,
        headers=headers,
    )


class _OurError(NamedTuple):
    status: int
    code: str
    error_type: str


def _our_error(provider_status: int) -> _OurError:
    """Our status, code and type for a provider's error status."""
    if provider_status in (401, 403):
        # Our provider credentials were refused: not the caller's key, so not a 401.
        return _OurError(502, code="upstream_auth_failed", error_type="server_error")
    if provider_status == 429:
        return _OurError(429, code="upstream_rate_limited", error_type="requests")
    if 400 <= provider_status < 500:
        return _OurError(provider_status, code="upstream_rejected", error_type="invalid_request_error")
    return _OurError(502, code="upstream_error", error_type="server_error")


def _provider_error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(type, code, message) from an OpenAI or Anthropic error body; None where absent.

    Both put them under "error" (Anthropic has no code); some compatible servers put a
    bare string there, or the fields at the top level. Type and code count only as
    short identifiers: anything else could be free text in disguise.
    """
    if len(body) > _PARSED_ERROR_BYTES:
        return None, None, None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None, None, None  # an HTML page from a load balancer, say
    if not isinstance(parsed, Mapping):
        return None, None, None
    error = parsed.get("error")
    if isinstance(error, str):
        return None, None, error
    fields = error if isinstance(error, Mapping) else parsed
    message = fields.get("message")
    return (
        _identifier(fields.get("type")),
        _identifier(fields.get("code")),
        message if isinstance(message, str) else None,
    )


def _identifier(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # some servers repeat the status as the code
    if isinstance(value, str) and _SAFE_IDENTIFIER.fullmatch(value):
        return value
    return None
