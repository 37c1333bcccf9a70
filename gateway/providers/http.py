"""The HTTP side shared by every remote provider: a connection pool, timeouts, streaming reads."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

from gateway import __version__
from gateway.config import ProviderConfig
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.providers.base import UpstreamReply, UpstreamRequest
from gateway.providers.http1 import (
    ConnectionDropped,
    ConnectionFailed,
    ConnectionPool,
    MalformedResponse,
    Response,
)


class HttpProvider:
    """A provider reached over HTTP; subclasses say where and with which credentials."""

    wire_formats: frozenset[str] = frozenset({"openai"})

    def __init__(self, config: ProviderConfig, tls: ssl.SSLContext | None = None) -> None:
        """tls: the context for https, shared with the other providers (see ConnectionPool)."""
        assert config.base_url is not None
        self.name = config.name
        self._config = config
        self._base_url = config.base_url
        self._timeouts = config.timeouts
        # Read once at start-up; the key never leaves this object except upstream.
        # Stripped: a key kept in a file often ends in a newline, which no header may hold.
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self._api_key = key.strip() if key else None
        # As many connections as calls run at once, unless the operator caps them;
        # connect_seconds bounds opening one, and a wait for a free one (past the cap)
        # counts towards the first byte.
        self._pool = ConnectionPool(
            config.base_url,
            max_connections=config.max_connections,
            connect_seconds=config.timeouts.connect_seconds,
            idle_seconds=config.timeouts.idle_seconds,
            user_agent=f"llm-gateway/{__version__}",
            tls=tls,
        )
        self._origin_length = len(self._pool.origin)

    async def close(self) -> None:
        await self._pool.close()

    def url(self, request: UpstreamRequest) -> str:
        raise NotImplementedError

    def credentials(self) -> dict[str, str]:
        raise NotImplementedError

    def headers(self, request: UpstreamRequest) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if request.stream else "application/json",
            **self.credentials(),
        }

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        payload = request.raw if request.raw is not None else json.dumps(request.body).encode()
        timeouts = self._timeouts
        loop = asyncio.get_running_loop()
        started = loop.time()
        # One timer for both limits (a nested pair cost a timer and a task check each):
        # first the sooner of first byte and total, then what is left of the total.
        total = None if request.stream else timeouts.total_seconds
        sooner = timeouts.first_byte_seconds if total is None else min(timeouts.first_byte_seconds, total)
        # url() begins with base_url, whose origin is the pool's.
        target = self.url(request)[self._origin_length :]
        try:
            async with asyncio.timeout_at(started + sooner) as deadline:
                response = await self._pool.post(
                    target, self.headers(request), payload, request.delivery.mark_sent
                )
                deadline.reschedule(None if total is None else started + total)
                content_type = response.headers.get("content-type", "")
                # Only an event stream is relayed as one: a JSON answer to a stream request
                # (an error, or a provider that ignored `stream`) is read and settled whole.
                if request.stream and response.status == 200 and content_type.startswith("text/event-stream"):
                    return UpstreamReply(
                        status=200,
                        content_type=content_type,
                        chunks=self._chunks(response),
                        close=_closer(response),
                        chunks_over=response.taken,
                    )
                try:
                    body = await response.read()
                finally:
                    response.close()
        except TimeoutError as exc:
            raise UpstreamTimeout(f"Provider '{self.name}' did not answer in time.") from exc
        except (ConnectionFailed, ConnectionDropped, MalformedResponse) as exc:
            if request.delivery.sent:
                raise UpstreamError(
                    f"Provider '{self.name}' lost the connection before its answer was complete "
                    f"({type(exc).__name__}).",
                    code="upstream_connection_lost",
                ) from exc
            raise UpstreamError(
                f"Provider '{self.name}' could not be reached ({type(exc).__name__}).",
                code="upstream_unreachable",
            ) from exc
        return UpstreamReply(
            status=response.status,
            content_type=response.headers.get("content-type", "application/json"),
            body=body,
            retry_after=response.headers.get("retry-after"),
        )

    async def _chunks(self, response: Response) -> AsyncIterator[bytes]:
        try:
            async for data in response.pieces():
                yield data
        except TimeoutError as exc:
            raise UpstreamTimeout(f"Provider '{self.name}' stalled mid-stream.") from exc
        except (ConnectionDropped, MalformedResponse) as exc:
            raise UpstreamError(
                f"Provider '{self.name}' cut the stream ({type(exc).__name__}).", code="upstream_stream_cut"
            ) from exc


def _closer(response: Response) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        # A stream left unread does not go back to the pool: its connection is closed.
        response.close()

    return close
