"""The listening socket, and what each client connection must do to be read at all.

aiohttp reads a request's line and headers with no time limit, and lets one address
hold any number of connections. Each accepted connection therefore meets a
GuardedConnection first, which hands its bytes to aiohttp's own RequestHandler:

- `server.max_connections_per_address`: a connection from an address (an IPv6 /64)
  that already holds this many is closed at once, before aiohttp sees it. Counted per
  worker process and per listener; peers in `server.trusted_proxies` are not limited
  (their connections carry many clients). 0: no limit.
- `server.header_timeout_seconds`: a request's line and headers must be complete this
  long after the connection was accepted (its first request) or after the first byte
  of a later request on a kept-alive connection; else the connection is closed without
  an answer. Between requests a connection may idle for KEEPALIVE_SECONDS.
- `server.max_header_bytes`: the request line and headers, up to and including the
  blank line that ends them, may take this many bytes; one more is answered 431 and
  the connection closes. aiohttp itself answers 400 to a line longer than
  MAX_LINE_BYTES (or max_header_bytes, when smaller) and to more than 128 header lines.

A request that a client pipelines behind one still in progress is read by aiohttp
alone: its line and headers meet aiohttp's limits on a line and on their count (some
1 MiB in all, as without these guards), not the total, and the time limit counts only
from the first byte that arrives once the earlier request is done (if none does, the
connection idles as kept-alive ones do). Clients do not pipeline; attackers may.

Over TLS the handshake has header_timeout_seconds of its own, and the deadline and the
per-address count start once it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.config import ServerConfig
from gateway.errors import RequestTooLarge

# How long a kept-alive connection may wait for its next request (web.run_app's default).
# Longer than the idle timeout of the load balancers in front (AWS ALB: 60 s), so they
# never send a request on a connection the gateway is closing.
KEEPALIVE_SECONDS = 75.0
# aiohttp's default bound on a request line or one header line. Raising it with
# max_header_bytes would let a pipelined request, which only aiohttp reads, buffer up
# to 128 such lines.
MAX_LINE_BYTES = 8190
_END_OF_HEADERS = b"\r\n\r\n"
_BLANK_LINE_BYTES = (ord("\r"), ord("\n"))


@dataclass
class GuardCounts:
    """Connections the guards closed since start-up, in this process and listener."""

    header_timeouts: int = 0
    headers_too_large: int = 0
    refused: int = 0


@dataclass
class ConnectionGuards:
    """One listener's limits, and the connections it holds open per client address."""

    header_timeout_seconds: float
    max_header_bytes: int
    max_connections_per_address: int
    unlimited_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    open_by_address: dict[str, int] = field(default_factory=dict)
    counts: GuardCounts = field(default_factory=GuardCounts)

    @classmethod
    def of(cls, server: ServerConfig) -> ConnectionGuards:
        return cls(
            header_timeout_seconds=server.header_timeout_seconds,
            max_header_bytes=server.max_header_bytes,
            max_connections_per_address=server.max_connections_per_address,
            unlimited_networks=server.trusted_proxies,
        )

    def address_of(self, peername: Any) -> str | None:
        """The address a connection from `peername` counts against; None: not limited."""
        if self.max_connections_per_address == 0 or not isinstance(peername, tuple):
            return None  # no limit, or a Unix socket
        host: str = peername[0]
        if ":" not in host and not self.unlimited_networks:
            return host
        ip = ipaddress.ip_address(host.partition("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.unlimited_networks):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            # One subscriber gets a /64 or more: a limit per address would be no limit.
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def take(self, address: str) -> bool:
        """Counts one more connection from `address`; False (and nothing counted) at the limit."""
        held = self.open_by_address.get(address, 0)
        if held >= self.max_connections_per_address:
            self.counts.refused += 1
            return False
        self.open_by_address[address] = held + 1
        return True

    def release(self, address: str) -> None:
        held = self.open_by_address[address] - 1
        if held:
            self.open_by_address[address] = held
        else:
            del self.open_by_address[address]

    def too_large_response(self) -> bytes:
        """The whole HTTP response to headers past max_header_bytes."""
        error = RequestTooLarge(f"The request line and headers exceed {self.max_header_bytes} bytes.")
        body = json.dumps(error.body()).encode()
        head = (
            "HTTP/1.1 431 Request Header Fields Too Large\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body


class GuardedConnection(asyncio.Protocol):
    """One client connection: the guards, in front of aiohttp's RequestHandler.

    While a request's line and headers are awaited (from the accept, or from the first
    byte after an earlier request), each chunk is measured before aiohttp parses it and
    a timer runs; aiohttp's count of parsed requests (`_request_count`) tells when the
    headers are complete, and its pending `_waiter` that it waits for a next request.
    Every other chunk goes straight to aiohttp.
    """

    __slots__ = (
        "_address",
        "_deadline",
        "_discarding",
        "_guards",
        "_handler",
        "_header_bytes",
        "_line_started",
        "_loop",
        "_reading_headers",
        "_requests_parsed",
        "_server",
        "_tail",
        "_transport",
    )

    def __init__(self, server: web.Server, guards: ConnectionGuards, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._guards = guards
        self._loop = loop
        self._handler: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._address: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        # The request whose line and headers are being read (see _begin_headers).
        self._reading_headers = False
        self._requests_parsed = 0
        self._line_started = False
        self._header_bytes = 0
        self._tail = b""
        # After a 431: what else the client sends is read and dropped until it closes.
        self._discarding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        guards = self._guards
        address = guards.address_of(transport.get_extra_info("peername"))
        if address is not None and not guards.take(address):
            transport.close()
            return
        self._address = address
        self._transport = transport
        handler = self._handler = self._server()
        handler.connection_made(transport)
        self._begin_headers(handler)
        self._deadline = self._loop.call_later(guards.header_timeout_seconds, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        handler = self._handler
        if handler is None or self._discarding:
            return
        if not self._reading_headers:
            if not (data and _awaits_request(handler)):
                handler.data_received(data)  # a body, or a request pipelined behind another
                return
            self._begin_headers(handler)
        self._header_bytes += self._header_part(data)
        if self._header_bytes > self._guards.max_header_bytes:
            self._reject_headers()
            return
        handler.data_received(data)
        if handler._request_count != self._requests_parsed:
            self._end_headers()
        elif self._deadline is None:
            self._deadline = self._loop.call_later(self._guards.header_timeout_seconds, self._header_timeout)

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            self._handler.eof_received()
        return None  # the transport closes: a client that half-closes is gone

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._address is not None:
            self._guards.release(self._address)
            self._address = None
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def _begin_headers(self, handler: RequestHandler) -> None:
        self._reading_headers = True
        self._requests_parsed = handler._request_count
        self._line_started = False
        self._header_bytes = 0
        self._tail = b""

    def _end_headers(self) -> None:
        self._reading_headers = False
        self._tail = b""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_part(self, data: bytes) -> int:
        """How many bytes of `data` belong to the request line and headers.

        Empty lines before a request line are skipped, as aiohttp's parser skips them,
        and not counted; the headers end at the first blank line after it.
        """
        start = 0
        if not self._line_started:
            while start < len(data) and data[start] in _BLANK_LINE_BYTES:
                start += 1
            if start == len(data):
                return 0
            self._line_started = True
        tail = self._tail
        if tail:
            across = (tail + data[:3]).find(_END_OF_HEADERS)
            if across >= 0:
                return across + len(_END_OF_HEADERS) - len(tail)
        end = data.find(_END_OF_HEADERS, start)
        if end >= 0:
            return end + len(_END_OF_HEADERS) - start
        self._tail = (tail + data[-3:])[-3:]
        return len(data) - start

    def _reject_headers(self) -> None:
        """Answers 431 and stops reading requests; the client closes, or the deadline does."""
        self._guards.counts.headers_too_large += 1
        self._discarding = True
        transport = self._transport
        assert transport is not None
        transport.write(self._guards.too_large_response())
        if transport.can_write_eof():
            transport.write_eof()
        if self._deadline is None:
            self._deadline = self._loop.call_later(self._guards.header_timeout_seconds, self._header_timeout)

    def _header_timeout(self) -> None:
        self._deadline = None
        handler = self._handler
        if handler is None or not self._reading_headers:
            return
        if handler._request_count != self._requests_parsed:
            # aiohttp parsed a request it had buffered without our seeing the bytes.
            self._end_headers()
            return
        if not self._discarding:
            self._guards.counts.header_timeouts += 1
        handler.force_close()


def _awaits_request(handler: RequestHandler) -> bool:
    """Whether aiohttp waits for a next request (not reading a body, nor handling one)."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections meet the guards before aiohttp reads them."""

    __slots__ = ("_bound_port", "_host", "_port", "_reuse_port", "guards")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guards: ConnectionGuards,
        *,
        ssl_context: Any = None,
        reuse_port: bool = False,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._bound_port = port
        self._reuse_port = reuse_port
        self.guards = guards

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._bound_port}"

    @property
    def port(self) -> int:
        """The port listened on (the one the kernel chose, for port 0)."""
        return self._bound_port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guards = self.guards
        self._server = await loop.create_server(
            lambda: GuardedConnection(server, guards, loop),
            self._host,
            self._port,
            ssl=self._ssl_context,
            # A TLS client gets no longer for its handshake than for its headers.
            ssl_handshake_timeout=guards.header_timeout_seconds if self._ssl_context else None,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]


def app_runner(app: web.Application, server: ServerConfig, **options: Any) -> web.AppRunner:
    """An AppRunner whose request handlers hold each header line to the guards' bound."""
    line_bytes = min(MAX_LINE_BYTES, server.max_header_bytes)
    return web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=KEEPALIVE_SECONDS,
        max_line_size=line_bytes,
        max_field_size=line_bytes,
        **options,
    )


async def start(
    app: web.Application,
    server: ServerConfig,
    host: str,
    port: int,
    *,
    ssl_context: Any = None,
    reuse_port: bool = False,
    **options: Any,
) -> tuple[web.AppRunner, GuardedSite]:
    """Starts `app` (its startup and cleanup contexts) and listens; stop with runner.cleanup()."""
    runner = app_runner(app, server, **options)
    await runner.setup()
    site = GuardedSite(
        runner, host, port, ConnectionGuards.of(server), ssl_context=ssl_context, reuse_port=reuse_port
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


def run(
    app: web.Application,
    server: ServerConfig,
    host: str,
    port: int,
    *,
    loop: asyncio.AbstractEventLoop,
    ssl_context: Any = None,
    reuse_port: bool = False,
    on_serving: Callable[[GuardedSite], None] | None = None,
    **options: Any,
) -> None:
    """Serves until SIGINT or SIGTERM, as web.run_app does, then shuts down and closes `loop`.

    `on_serving` is called once the application has started and the socket listens.
    `options` go to the AppRunner (shutdown_timeout, handler_cancellation, ...).
    """

    async def serve() -> None:
        runner, site = await start(
            app,
            server,
            host,
            port,
            ssl_context=ssl_context,
            reuse_port=reuse_port,
            handle_signals=True,
            **options,
        )
        try:
            if on_serving is not None:
                on_serving(site)
            await asyncio.Future()  # until a signal raises GracefulExit, or cancelled
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            # The graceful part first: in-flight requests finish, settle and are recorded.
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
