"""Any OpenAI-compatible upstream (OpenAI itself, vLLM, Ollama, llama.cpp, ...)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp

from gateway.config import ProviderConfig
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.providers.base import UpstreamReply, UpstreamRequest


class OpenAIProvider:
    """Forwards to `base_url`; one ClientSession (connection pool) per provider."""

    def __init__(self, config: ProviderConfig) -> None:
        assert config.base_url is not None
        self.name = config.name
        self._base_url = config.base_url
        self._timeouts = config.timeouts
        # Read once at start-up; the key never leaves this object except upstream.
        self._api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=config.timeouts.connect_seconds,
                sock_read=config.timeouts.read_seconds,
            ),
            auto_decompress=True,
        )

    async def close(self) -> None:
        await self._session.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        url = f"{self._base_url}/{request.path}"
        payload = json.dumps(request.body).encode()
        try:
            async with asyncio.timeout(self._timeouts.total_seconds if not request.stream else None):
                response = await self._session.post(url, data=payload, headers=self._headers())
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
                f"Provider '{self.name}' cut the stream ({type(exc).__name__}).",
                code="upstream_stream_cut",
            ) from exc


def _releaser(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        # A stream left unread must not go back to the pool: close its connection.
        if response.content.at_eof():
            response.release()
        else:
            response.close()

    return release
