"""Relaying a stream from a deployment of another API family, translated on the way.

The provider's bytes are cut into whole events, each fed to the translation, and the
caller's events it gives are relayed by relay_stream like any stream, watched by the
caller's own observer: cut streams, in-stream errors, held final events, backpressure
and the usage chunk's withholding work as they do untranslated. What is settled is the
provider's own usage, as the translation read it (cache reads and writes apart).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping

from aiohttp import web

from gateway.exchange import Exchange
from gateway.providers import UpstreamReply, Usage
from gateway.providers.openai_wire import SseSplitter
from gateway.relay import StreamObserver, TextTally, relay_stream
from gateway.translate import StreamTranslation


async def relay_translated_stream(
    request: web.Request,
    reply: UpstreamReply,
    exchange: Exchange,
    headers: Mapping[str, str],
    observer: StreamObserver,
    translation: StreamTranslation,
) -> web.StreamResponse:
    """relay_stream over the translated events; `observer` is the caller's family's."""
    try:
        return await relay_stream(
            request,
            translated_reply(reply, translation),
            exchange,
            headers,
            TranslatedStream(observer, translation),
        )
    finally:
        if exchange.usage is None and translation.usage is not None:
            # Cut short or ended by an error: the provider's input figure as it reported
            # it (Claude's message_start), the output counted from what was relayed.
            exchange.reported_prompt_tokens = translation.usage.prompt_tokens


def translated_reply(reply: UpstreamReply, translation: StreamTranslation) -> UpstreamReply:
    """The reply with its chunks translated: each a run of whole caller events."""
    assert reply.chunks is not None
    chunks = _translated_chunks(reply.chunks, translation)

    async def close() -> None:
        await chunks.aclose()
        await reply.close()

    return UpstreamReply(
        status=reply.status,
        content_type=reply.content_type,
        chunks=chunks,
        close=close,
        retry_after=reply.retry_after,
        # Whether the provider has sent everything: what was translated last is the end.
        chunks_over=reply.chunks_over,
    )


async def _translated_chunks(
    chunks: AsyncIterator[bytes], translation: StreamTranslation
) -> AsyncGenerator[bytes, None]:
    splitter = SseSplitter()
    async for data in chunks:
        # The events of one read leave together, as relay_stream writes them.
        events = [out for event in splitter.feed(data) for out in translation.feed(event)]
        if events:
            yield b"".join(events)
    # A last event without its closing blank line (some servers end so) counts when it is
    # whole; half an event is not JSON, and translations skip what they cannot parse.
    remainder = splitter.remainder()
    ending = translation.feed(remainder + b"\n\n") if remainder.strip() else []
    ending += translation.finish()
    if ending:
        yield b"".join(ending)


class TranslatedStream:
    """The caller's observer over the translated events, whose usage is the provider's own
    (the translation's) once the caller's stream ended whole; until then, and for a stream
    cut short or ended by an error, none, so the text relayed is counted as for any stream."""

    def __init__(self, observer: StreamObserver, translation: StreamTranslation) -> None:
        self._observer = observer
        self._translation = translation

    @property
    def usage(self) -> Usage | None:
        observer = self._observer
        if observer.finished and observer.error_code is None:
            return self._translation.usage
        return None

    @property
    def finished(self) -> bool:
        return self._observer.finished

    @property
    def error_code(self) -> str | None:
        return self._observer.error_code

    @property
    def text(self) -> TextTally:
        return self._observer.text

    def observe(self, event: bytes) -> bool:
        return self._observer.observe(event)

    def error_event(self, message: str, code: str) -> bytes:
        return self._observer.error_event(message, code)
