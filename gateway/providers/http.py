"""The HTTP side shared by every remote provider: aiohttp's client, with our timeouts and limits.

aiohttp carries what a production client needs and we would otherwise owe: proxies
(CONNECT for https), TLS with a private CA or a client certificate, Happy Eyeballs,
decompression in bounded pieces, keep-alive pooling. What is ours:

- timeouts by phase (connect, first byte, idle between reads, total), each failing
  with its own detail, since operators tune them separately;
- a bound on the body after decompression (`max_response_bytes`);
- whether the request may have reached the provider (Delivery), which decides
  whether a failed call is charged;
- a failed connection's cause, from a small fixed set (`CAUSES`), never aiohttp's text,
  which names hosts and addresses.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import socket
import ssl
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import __version__
from gateway.config import ProviderConfig
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.providers.base import UpstreamReply, UpstreamRequest

# Why an attempt failed without an answer: the `cause` label of
# gateway_upstream_failures_total and the ledger's error_detail.
CAUSES = (
    "dns",
    "refused",
    "unreachable",
    "tls",
    "proxy",
    "reset",
    "closed",
    "malformed",
    "too_large",
    "connect_timeout",
    "first_byte_timeout",
    "idle_timeout",
    "total_timeout",
    "other",
)

# An idle connection older than this is closed rather than reused, before the provider
# closes it while a request is on its way.
KEEPALIVE_SECONDS = 15.0
# Encodings aiohttp decodes and we ask for; any other would be relayed still encoded.
_DECODED = frozenset({"", "identity", "gzip", "deflate"})


class _Attempt:
    """One send of a request: whether it got a connection, after which the provider may
    have it (unless a forward proxy refused it)."""

    __slots__ = ("connected", "refused_by_proxy")

    def __init__(self) -> None:
        self.connected = False
        self.refused_by_proxy = False


# The attempt being sent in this task, for the connector to mark (aiohttp's connect
# runs in the caller's task, so the context reaches it).
_SENDING: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar("sending", default=None)


class _Connector(aiohttp.TCPConnector):
    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:  # noqa: ASYNC109 (aiohttp's signature)
        connection = await super().connect(req, traces, timeout)
        attempt = _SENDING.get()
        if attempt is not None:
            attempt.connected = True
        return connection


class _PinnedResolver(aiohttp.abc.AbstractResolver):
    """The operator's addresses for the provider's host (`addresses`), in their order,
    for Happy Eyeballs to race as it would a DNS answer; any other host (a proxy) by DNS."""

    def __init__(self, host: str, addresses: tuple[str, ...]) -> None:
        self._host, self._addresses = host, addresses
        self._dns = aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        if host != self._host:
            return await self._dns.resolve(host, port, family)
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in self._addresses
        ]

    async def close(self) -> None:
        await self._dns.close()


class HttpProvider:
    """A provider reached over HTTP; subclasses say where and with which credentials."""

    wire_formats: frozenset[str] = frozenset({"openai"})

    def __init__(self, config: ProviderConfig, tls: ssl.SSLContext | None = None) -> None:
        """tls: the context for https shared by providers without TLS options of their own
        (each context costs 1 MB and 23 ms to make)."""
        assert config.base_url is not None
        self.name = config.name
        self._config = config
        self._base_url = config.base_url
        self._timeouts = config.timeouts
        self._max_bytes = config.max_response_bytes
        # Read once at start-up; the key never leaves this object except upstream.
        # Stripped: a key kept in a file often ends in a newline, which no header may hold.
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self._api_key = key.strip() if key else None
        self._tls = provider_tls(config, tls)
        self._proxy, self._proxy_headers = proxy_for(config)
        # aiohttp sends proxy_headers only with a CONNECT (https); an http provider's
        # requests go to the proxy as they are, so its credentials ride on each of them.
        self._forwarded_headers = (
            self._proxy_headers
            if self._proxy_headers and not config.base_url.startswith("https://")
            else None
        )
        self._session: aiohttp.ClientSession | None = None
        # Parsed once per URL (a handful: paths and deployments come from gateway.yaml):
        # aiohttp would parse and quote the string again on every call.
        self._parsed_urls: dict[str, URL] = {}
        # The headers of streamed and of whole requests (see headers).
        self._headers: dict[bool, CIMultiDictProxy[str]] = {}

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running loop."""
        host = urlsplit(self._base_url).hostname or ""
        resolver = _PinnedResolver(host, self._config.addresses) if self._config.addresses else None
        connector = _Connector(
            resolver=resolver,
            limit=self._config.max_connections,
            limit_per_host=0,
            ssl=self._tls if self._tls is not None else True,
            keepalive_timeout=KEEPALIVE_SECONDS,
            happy_eyeballs_delay=0.25,
        )
        # Only connecting is timed by aiohttp; the other phases are timed here (send).
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=self._timeouts.connect_seconds, sock_read=None
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": f"llm-gateway/{__version__}", "Accept-Encoding": "gzip, deflate"},
            # Proxies are resolved once (proxy_for), not from the environment on every call.
            trust_env=False,
            auto_decompress=True,
            # No cookie from one caller's answer may reach another's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, request: UpstreamRequest) -> str:
        raise NotImplementedError

    def models_url(self) -> str:
        """The provider's model list: what `gateway doctor` asks for."""
        return self.url(UpstreamRequest("models", {}, stream=False))

    async def probe(self, seconds: float = 10.0) -> int:
        """The status of a GET of the model list, with our credentials, through the very
        client (proxy, TLS options, timeouts) that calls use: doctor's check.

        Raises UpstreamError (its detail one of CAUSES) when no answer comes.
        """
        session = self._session or self._open()
        attempt = _Attempt()
        sending = _SENDING.set(attempt)
        try:
            async with asyncio.timeout(seconds):
                headers = self.headers(UpstreamRequest("models", {}, stream=False))
                response = await self._request(session, "GET", self.models_url(), headers)
                self._proxy_refusal(response, attempt)
                response.close()
                return response.status
        except TimeoutError as exc:
            raise self._timeout(exc, "first_byte_timeout") from exc
        except aiohttp.ClientError as exc:
            raise self._failure(exc, attempt.connected) from exc
        finally:
            _SENDING.reset(sending)

    def credentials(self) -> dict[str, str]:
        raise NotImplementedError

    def headers(self, request: UpstreamRequest) -> Mapping[str, str]:
        """What a request is sent with: the same for every request of a kind (made once,
        as the multidict aiohttp takes without copying it first), plus `extra_headers`."""
        made = self._headers.get(request.stream)
        if made is None:
            made = self._headers[request.stream] = CIMultiDictProxy(
                CIMultiDict(
                    {
                        "Content-Type": "application/json",
                        "Accept": "text/event-stream" if request.stream else "application/json",
                        **self.credentials(),
                    }
                )
            )
        extra = self.extra_headers(request)
        if not extra:
            return made
        headers = CIMultiDict(made)
        headers.update(extra)
        return headers

    def extra_headers(self, request: UpstreamRequest) -> dict[str, str] | None:
        """Headers of this request alone (the caller's that the provider reads)."""
        return None

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        """The provider's answer: its head read, and for a stream its first piece too.

        Timed by phase: connecting by connect_seconds (aiohttp); the head, and a stream's
        first piece, by first_byte_seconds from the start; then every read by
        idle_seconds; a non-streamed call as a whole by total_seconds.
        """
        session = self._session or self._open()
        payload = request.raw if request.raw is not None else json.dumps(request.body).encode()
        timeouts = self._timeouts
        loop = asyncio.get_running_loop()
        started = loop.time()
        total = None if request.stream else timeouts.total_seconds
        first_byte = timeouts.first_byte_seconds if total is None else min(timeouts.first_byte_seconds, total)
        first_byte_at = started + first_byte
        phase = (
            "first_byte_timeout" if total is None or timeouts.first_byte_seconds < total else "total_timeout"
        )
        response: aiohttp.ClientResponse | None = None
        attempt = _Attempt()
        # Whether this send failed (the router may send again): one more call without an answer.
        failed = False
        sending = _SENDING.set(attempt)
        try:
            with _Deadline(loop, first_byte_at) as deadline:
                response = await self._request(
                    session, "POST", self.url(request), self.headers(request), payload
                )
                self._proxy_refusal(response, attempt)
                _check_encodings(response, self.name)
                streamed = request.stream and response.status == 200
                content_type = response.headers.get("Content-Type", "")
                if streamed and content_type.startswith("text/event-stream"):
                    first = await response.content.readany()
                    _read_idle(response, timeouts.idle_seconds)
                    return UpstreamReply(
                        status=200,
                        content_type=content_type,
                        chunks=self._chunks(response, first),
                        close=_closer(response),
                        chunks_over=response.content.at_eof,
                    )
                # Only an event stream is relayed as one: a JSON answer to a stream request
                # (an error, or a provider that ignored `stream`) is read and settled whole.
                if not response.content.is_eof():
                    # More is to come (usually the whole body came with the head, and no
                    # timer is needed): each read waits idle_seconds, all of them total_seconds.
                    _read_idle(response, timeouts.idle_seconds)
                    if total is not None:
                        deadline.reschedule(started + total)
                        phase = "total_timeout"
                body = await self._body(response)
        except TimeoutError as exc:
            failed = True
            if response is not None:
                response.close()
            raise self._timeout(exc, phase) from exc
        except aiohttp.ClientError as exc:
            failed = True
            if response is not None:
                response.close()
            raise self._failure(exc, attempt.connected) from exc
        except BaseException:
            if response is not None:
                response.close()
            raise
        finally:
            _SENDING.reset(sending)
            if attempt.connected and not attempt.refused_by_proxy:
                request.delivery.mark_sent()
                if failed:
                    request.delivery.unanswered += 1
        return UpstreamReply(
            status=response.status,
            content_type=response.headers.get("Content-Type", "application/json"),
            body=body,
            retry_after=response.headers.get("Retry-After"),
        )

    def _parsed_url(self, url: str) -> URL:
        parsed = self._parsed_urls.get(url)
        if parsed is None:
            parsed = self._parsed_urls[url] = URL(url)
        return parsed

    def _request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        headers: Mapping[str, str],
        data: bytes | None = None,
    ) -> Awaitable[aiohttp.ClientResponse]:
        """One request through the provider's proxy (if any), to await for its head; then
        `_proxy_refusal` says whether the proxy refused it. Not a coroutine itself: one
        frame fewer between the provider's answer and the request waiting on it."""
        if self._forwarded_headers is not None:
            headers = {**headers, **self._forwarded_headers}
        return session.request(
            method,
            self._parsed_url(url),
            data=data,
            headers=headers,
            proxy=self._proxy,
            proxy_headers=self._proxy_headers,
            allow_redirects=False,
        )

    def _proxy_refusal(self, response: aiohttp.ClientResponse, attempt: _Attempt) -> None:
        """A forward proxy's 407 is the proxy refusing us, not the provider answering: raised
        as an unreachable provider, and the attempt marked as never sent."""
        if response.status == 407 and self._proxy is not None:
            response.close()
            attempt.refused_by_proxy = True
            raise _BadResponse(
                f"Provider '{self.name}' could not be reached (proxy).",
                code="upstream_unreachable",
                cause="proxy",
            )

    async def _body(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body, at most max_response_bytes of it after decompression."""
        declared = response.content_length
        encoded = response.headers.get("Content-Encoding")
        if declared is not None and declared > self._max_bytes and not encoded:
            raise self._too_large()
        pieces: list[bytes] = []
        size = 0
        content = response.content
        # Until the body is over: no read more once it is (usually it came whole).
        while not content.at_eof() and (piece := await content.readany()):
            size += len(piece)
            if size > self._max_bytes:
                raise self._too_large()
            pieces.append(piece)
        response.release()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _chunks(self, response: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
        """A stream's pieces as they come. Not bounded in total like a body: nothing of it
        is kept (the relay bounds what it holds), and a slow client holds the provider back."""
        try:
            if first:
                yield first
            content = response.content
            while piece := await content.readany():
                yield piece
        except TimeoutError as exc:
            raise self._timeout(exc, "idle_timeout", midway=True) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Provider '{self.name}' cut the stream ({_cause(exc)}).",
                code="upstream_stream_cut",
                detail=_cause(exc),
            ) from exc
        finally:
            response.close()

    def _timeout(self, exc: BaseException, phase: str, midway: bool = False) -> UpstreamTimeout:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            phase = "connect_timeout"
        elif isinstance(exc, aiohttp.SocketTimeoutError):
            phase = "idle_timeout"
        what = {
            "connect_timeout": "could not be connected to in time",
            "first_byte_timeout": "did not begin its answer in time",
            "idle_timeout": "stalled mid-stream" if midway else "stalled mid-answer",
            "total_timeout": "did not finish its answer in time",
        }[phase]
        return UpstreamTimeout(f"Provider '{self.name}' {what} ({phase}).", detail=phase)

    def _failure(self, exc: aiohttp.ClientError, connected: bool) -> UpstreamError:
        cause = _cause(exc)
        if isinstance(exc, _BadResponse):
            return UpstreamError(str(exc), code=exc.code, detail=exc.cause)
        if connected:
            return UpstreamError(
                f"Provider '{self.name}' lost the connection before its answer was complete ({cause}).",
                code="upstream_connection_lost",
                detail=cause,
            )
        return UpstreamError(
            f"Provider '{self.name}' could not be reached ({cause}).",
            code="upstream_unreachable",
            detail=cause,
        )

    def _too_large(self) -> _BadResponse:
        return _BadResponse(
            f"Provider '{self.name}' answered more than max_response_bytes ({self._max_bytes}).",
            code="upstream_response_too_large",
            cause="too_large",
        )


class _Deadline:
    """asyncio.timeout_at's work for one send, as a plain `with`: when `when` passes, the
    task is cancelled, and that cancellation leaves the block as TimeoutError.

    asyncio.timeout's enter and exit are coroutines and its state a machine: some 20,000
    instructions a call, a twentieth of the whole call through aiohttp; this is a timer.
    """

    __slots__ = ("_expired", "_handle", "_loop", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None, "a deadline needs a task to cancel"
        self._loop, self._task = loop, task
        self._expired = False
        self._handle = loop.call_at(when, self._expire)

    def __enter__(self) -> _Deadline:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        self._handle.cancel()
        if self._expired:
            self._task.uncancel()
            if kind is asyncio.CancelledError:
                raise TimeoutError from error

    def reschedule(self, when: float) -> None:
        self._handle.cancel()
        self._handle = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()


class _BadResponse(aiohttp.ClientError):
    """An answer we will not relay (too large, in an encoding we cannot decode)."""

    def __init__(self, message: str, code: str, cause: str) -> None:
        super().__init__(message)
        self.code, self.cause = code, cause


def _check_encodings(response: aiohttp.ClientResponse, provider: str) -> None:
    """Refuses a body aiohttp would hand over still encoded: relayed, it would be garbage."""
    headers = response.headers
    encoding = headers.get("Content-Encoding", "").strip().lower()
    transfer = headers.get("Transfer-Encoding")
    if encoding not in _DECODED or (transfer is not None and transfer.strip().lower() != "chunked"):
        raise _BadResponse(
            f"Provider '{provider}' answered in an encoding the gateway cannot decode.",
            code="upstream_bad_response",
            cause="malformed",
        )


def _read_idle(response: aiohttp.ClientResponse, seconds: float) -> None:
    """From now on every read waits at most `seconds` for the provider's next bytes.

    aiohttp's sock_read would also bound the wait for the head, which first_byte_seconds
    governs; so it is set on the connection once the head (or first piece) is in.
    """
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is not None:
        protocol.read_timeout = seconds
        protocol.start_timeout()


def _cause(exc: BaseException) -> str:
    """One of CAUSES for a failed attempt."""
    if isinstance(exc, _BadResponse):
        return exc.cause
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return "proxy"
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return "tls"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "refused"
        if isinstance(os_error, ssl.SSLError):
            return "tls"
        return "unreachable"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "closed"
    if isinstance(exc, ConnectionResetError | aiohttp.ClientConnectionResetError):
        return "reset"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return "malformed"
    if isinstance(exc, aiohttp.ClientOSError):
        return "reset"
    return "other"


def provider_tls(config: ProviderConfig, shared: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The provider's own context when it names a CA or a client certificate, else the shared one."""
    if config.ca_file is None and config.client_cert_file is None:
        return shared
    context = ssl.create_default_context(cafile=config.ca_file)
    if config.client_cert_file is not None:
        context.load_cert_chain(config.client_cert_file, config.client_key_file)
    return context


def proxy_for(config: ProviderConfig) -> tuple[URL | None, dict[str, str] | None]:
    """The proxy to reach the provider through, and its credentials as a header.

    gateway.yaml's `proxy` first ("direct": none); else HTTPS_PROXY or HTTP_PROXY (by the
    provider's scheme) unless NO_PROXY names its host, as curl and requests read them.
    """
    assert config.base_url is not None
    if config.proxy == "direct":
        return None, None
    address = config.proxy
    if address is None:
        parts = urlsplit(config.base_url)
        host = parts.netloc.rpartition("@")[2]
        # typeshed omits proxy_bypass_environment; it is what proxy_bypass runs on Linux.
        bypass: Callable[[str], bool] = getattr(urllib.request, "proxy_bypass_environment")  # noqa: B009
        if bypass(host):
            return None, None
        address = urllib.request.getproxies_environment().get(parts.scheme)
        if not address:
            return None, None
        if "://" not in address:
            address = f"http://{address}"
    url = URL(address)
    if url.user is None:
        return url, None
    credentials = aiohttp.encode_basic_auth(url.user, url.password or "")
    return url.with_user(None), {"Proxy-Authorization": credentials}


def _closer(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        # A stream left unread does not go back to the pool: its connection is closed.
        response.close()

    return close
