"""The HTTP side shared by every remote provider: one session, timeouts, streaming reads."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp

from gateway.config import ProviderConfig
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.providers.base import UpstreamReply, UpstreamRequest

# Provider headers a client may see; everything else (cookies, auth, hop-by-hop) stays.
RELAYED_RESPONSE_HEADERS = ("Retry-After",)


class HttpProvider:
    """A provider reached over HTTP; subclasses say where and with which credentials."""

    wire_formats: frozenset[str] = frozenset({"openai"})

    def __init__(self, config: ProviderConfig) -> None:
        assert config.base_url is not None
        self.name = config.name
        self._config = config
        self._base_url = config.base_url
        self._timeouts = config.timeouts
        # Read once at start-up; the key never leaves this object except upstream.
        self._api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self._session = aiohttp.ClientSession(
            # aiohttp's default pool holds 100 connections, and its `connect` timeout counts
            # the wait for one: model calls last long, so the 101st call at once would fail
            # after connect_seconds. The pool is as large as the operator says (unbounded by
            # default), connect_seconds bounds the connection itself, and a wait for a free
            # connection counts towards the first byte.
            connector=aiohttp.TCPConnector(limit=config.max_connections),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=config.timeouts.connect_seconds,
                sock_read=config.timeouts.idle_seconds,
            ),
            auto_decompress=True,
            # The provider's cookies are never kept, so never mixed between callers.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        await self._session.close()

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
        try:
            async with asyncio.timeout_at(started + sooner) as deadline:
                response = await self._session.post(
                    self.url(request), data=payload, headers=self.headers(request)
                )
                deadline.reschedule(None if total is None else started + total)
                if request.stream and response.status == 200:
                    return UpstreamReply(
                        status=200,
                        content_type=response.headers.get("Content-Type", "text/event-stream"),
                        chunks=self._chunks(response),
                        close=_releaser(response),
                    )
                try:
                    body = await response.read()
                finally:
                    response.release()
        except TimeoutError as exc:
            raise UpstreamTimeout(f"Provider '{self.name}' did not answer in time.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Provider '{self.name}' could not be reached ({type(exc).__name__}).",
                code="upstream_unreachable",
            ) from exc
        return UpstreamReply(
            status=response.status,
            content_type=response.headers.get("Content-Type", "application/json"),
            body=body,
            retry_after=response.headers.get("Retry-After"),
        )

    async def _chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for data in response.content.iter_any():
                yield data
        except TimeoutError as exc:
            raise UpstreamTimeout(f"Provider '{self.name}' stalled mid-stream.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Provider '{self.name}' cut the stream ({type(exc).__name__}).", code="upstream_stream_cut"
            ) from exc


def _releaser(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        # A stream left unread must not go back to the pool: close its connection.
        if response.content.at_eof():
            response.release()
        else:
            response.close()

    return release


def safe_headers(headers: Mapping[str, str], allowed: tuple[str, ...]) -> dict[str, str]:
    lowered = {name.lower(): value for name, value in headers.items()}
    return {name: lowered[name] for name in allowed if name in lowered}
