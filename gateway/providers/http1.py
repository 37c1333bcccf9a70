"""The HTTP/1.1 client of provider calls: kept-alive connections, one call on each at a time.

aiohttp's client was the largest single part of the gateway's own cost per request
(about a fifth of its CPU at 32 connections): a request object, a header multidict,
a connector, a payload and a stream reader per call, each built for features a
provider call never uses. This client does what a provider call needs and no more:
a POST with a body; the response's head; its body by Content-Length, chunked or
until close, gzip or deflate; connections kept alive and reused; a pause in reading
while the caller is slow (backpressure); a timeout between two reads. No redirects,
cookies or proxies: the gateway never used them.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

# A response head larger than this is refused rather than buffered.
HEAD_LIMIT_BYTES = 64 * 1024
# Body bytes received and not yet taken at which reading pauses, and half of it, at
# which it resumes: a slow client holds the provider back through socket buffers.
PAUSE_AT_BYTES = 256 * 1024
# An idle connection older than this is closed instead of reused (aiohttp's default),
# before the provider closes it while a request is on the way.
KEEPALIVE_SECONDS = 15.0
# zlib's window bits that accept a gzip or a zlib header alike.
_GZIP_OR_ZLIB = zlib.MAX_WBITS | 32

_HEX_DIGITS = b"0123456789abcdefABCDEF"

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ConnectionFailed(Exception):
    """No connection to the provider could be opened (refused, DNS, TLS)."""


class ConnectionDropped(Exception):
    """The connection closed before the response was complete."""


class MalformedResponse(Exception):
    """What came back cannot be read as an HTTP/1.1 response."""


class Response:
    """The head of a provider's response; its body is read once, whole or piece by piece.

    Reading the body to its end gives the connection back to the pool; `close` before
    then closes it (a half-read body cannot be skipped safely).
    """

    __slots__ = ("_connection", "_given_back", "_pool", "headers", "status")

    def __init__(self, pool: ConnectionPool, connection: _Connection) -> None:
        self._pool, self._connection = pool, connection
        self._given_back = False
        self.status = connection.status
        # Lower-case names; a repeated header's values joined by ", ".
        self.headers = connection.headers

    async def read(self) -> bytes:
        connection = self._connection
        pieces = []
        while piece := await connection.next_piece():
            pieces.append(piece)
        self.close()
        return b"".join(pieces)

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in the pieces it arrives in."""
        connection = self._connection
        while piece := await connection.next_piece():
            yield piece
        self.close()

    def close(self) -> None:
        """Gives the connection back if the body was read to its end, else closes it."""
        if not self._given_back:
            self._given_back = True
            self._pool.give_back(self._connection)

    def taken(self) -> bool:
        """Whether the whole body has arrived and been taken."""
        return self._given_back or self._connection.complete


class ConnectionPool:
    """Connections to one provider's origin (scheme, host, port).

    Idle connections are reused newest first and closed after `keepalive_seconds` unused.
    `max_connections` (0: no cap) bounds how many are open; a call past it waits for a
    connection to come back or to close, and that wait is part of whatever timeout the
    caller runs the call under.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_seconds: float,
        idle_seconds: float,
        user_agent: str,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """tls: the context for https (one shared by every pool: each costs 1 MB and
        23 ms to make); by default one of its own with the system's trust store."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = (tls or ssl.create_default_context()) if parts.scheme == "https" else None
        host_header = parts.netloc.rpartition("@")[2]
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._max_connections = max_connections
        self._connect_seconds = connect_seconds
        self._idle_seconds = idle_seconds
        self._keepalive_seconds = keepalive_seconds
        self._head_start = (
            f"\r\nHost: {host_header}\r\nUser-Agent: {user_agent}\r\nAccept-Encoding: gzip, deflate\r\n"
        )
        # Newest on the right, reused first; the oldest, on the left, expire first.
        self._idle: collections.deque[_Connection] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._open = 0
        # Calls waiting for a connection (only with max_connections): each gets one
        # handed over, or None for a free slot to open its own in.
        self._waiting: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False

    async def post(
        self,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        on_sent: Callable[[], None] | None = None,
    ) -> Response:
        """POSTs `body` to `target` (path and query) and waits for the response's head.

        on_sent: called as the call ends, however it ends, if the request was written to
        a connection (the provider may have it).
        """
        message = self._request_head(target, headers, len(body)) + body
        fresh = False
        # Whether the provider may have the request: once written, unless the retry below
        # takes it back (a stale connection that never saw it).
        written = False
        try:
            while True:
                connection, reused = await self._acquire(fresh)
                try:
                    connection.send(message)
                    written = True
                    await connection.head()
                except ConnectionDropped:
                    self._discard(connection)
                    # A kept-alive connection the provider closed as the request went out:
                    # it never saw the request, so it goes once more, on a new connection
                    # (another idle one may be as stale; a provider that reads and then
                    # drops every request must not get it once per idle connection).
                    if reused and not connection.received and not fresh:
                        fresh, written = True, False
                        continue
                    raise
                except BaseException:
                    self._discard(connection)
                    raise
                return Response(self, connection)
        finally:
            # Answered, timed out, cancelled or malformed once written: the provider may have it.
            if written and on_sent is not None:
                on_sent()

    def _request_head(self, target: str, headers: Mapping[str, str], length: int) -> bytes:
        lines = [f"POST {target} HTTP/1.1", self._head_start, f"Content-Length: {length}\r\n"]
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        # One line per header: a CR or LF inside a value would start a header of its own.
        if head.count("\n") != len(headers) + 6 or head.count("\r") != len(headers) + 6:
            raise ValueError("a header name or value holds a line break")
        return head.encode()

    async def _acquire(self, fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection, and whether it was reused; `fresh`: never an idle one."""
        if self._closed:
            raise ConnectionFailed("the connection pool is closed")
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and not fresh:
            connection = self._idle.pop()
            if connection.closed or now - connection.idle_since > self._keepalive_seconds:
                self._discard(connection)
                continue
            return connection, True
        if self._max_connections and self._open >= self._max_connections:
            given = await self._wait_for_connection(loop)
            if given is not None:
                return given, True
            # Handed a slot instead: it is counted already.
        else:
            self._open += 1
        try:
            connection = await self._connect(loop)
        except BaseException:
            self._slot_freed()
            raise
        return connection, False

    async def _wait_for_connection(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed something just as this call gave up: pass it on.
                given = waiter.result()
                if given is not None:
                    self._hand_on(given)
                else:
                    self._slot_freed()
            else:
                self._waiting.remove(waiter)
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        def protocol() -> _Connection:
            return _Connection(loop, self._idle_seconds)

        try:
            async with asyncio.timeout(self._connect_seconds):
                _, connection = await loop.create_connection(
                    protocol,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionFailed(type(exc).__name__) from exc
        return connection

    def give_back(self, connection: _Connection) -> None:
        """Back to the pool if its response was read to the end and it stays open, else closed."""
        if not connection.reusable or self._closed:
            self._discard(connection)
            return
        connection.release()
        self._hand_on(connection)

    def _hand_on(self, connection: _Connection) -> None:
        """A connection ready for its next request: to a waiting call, or else to the idle."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = connection.loop.time()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = connection.loop.call_later(self._keepalive_seconds, self._close_expired)

    def _close_expired(self) -> None:
        """Closes connections idle too long, so a quiet pool holds no sockets open."""
        self._sweep = None
        if not self._idle:
            return
        loop = self._idle[0].loop
        expire_before = loop.time() - self._keepalive_seconds
        while self._idle and self._idle[0].idle_since <= expire_before:
            self._discard(self._idle.popleft())
        if self._idle:
            next_expiry = self._idle[0].idle_since + self._keepalive_seconds
            self._sweep = loop.call_at(next_expiry, self._close_expired)

    def _discard(self, connection: _Connection) -> None:
        if connection.counted:
            connection.counted = False
            connection.abort()
            self._slot_freed()

    def _slot_freed(self) -> None:
        self._open -= 1
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            self._discard(self._idle.popleft())


class _Connection(asyncio.Protocol):
    """One connection and the response being read from it.

    The parser keeps unread bytes in `_buffer` and its place in `_state`; decoded body
    pieces queue in `_pieces` until the caller takes them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_seconds: float) -> None:
        self.loop = loop
        self._idle_seconds = idle_seconds
        self._transport: asyncio.Transport | None = None
        self.closed = False
        # Still counted among the pool's open connections.
        self.counted = True
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self._state = _HEAD
        self._buffer = b""
        self._remaining = 0
        self._keep_alive = True
        self._decoder: Callable[[bytes], bytes] | None = None
        self._flush: Callable[[], bytes] | None = None
        self._pieces: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sent = False
        self.received = False
        self.status = 0
        self.headers: dict[str, str] = {}

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they behave as one.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._sent:
            # Bytes on an idle connection (say, a 408 before the server closes it) would be
            # taken for the next request's response: the connection is done for.
            self.abort()
            return
        self.received = True
        if self._state == _DONE:
            # Bytes after a complete response (or while idle): nothing can follow safely.
            self._keep_alive = False
            return
        self._buffer = self._buffer + data if self._buffer else data
        try:
            self._parse()
        except MalformedResponse as exc:
            self._fail(exc)
            self.abort()
            return
        if self._queued >= PAUSE_AT_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _UNTIL_CLOSE:
            try:
                self._finish()
            except MalformedResponse as exc:
                self._fail(exc)
        elif self._state != _DONE and self._error is None:
            self._error = ConnectionDropped("the provider closed the connection mid-response")
        self._wake()

    # The caller's side

    def send(self, message: bytes) -> None:
        if self.closed or self._transport is None or self._transport.is_closing():
            raise ConnectionDropped("the connection closed before the request went out")
        self._sent = True
        self._transport.write(message)

    async def head(self) -> None:
        while self.status == 0:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def next_piece(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while True:
            if self._pieces:
                piece = self._pieces.popleft()
                self._queued -= len(piece)
                if self._paused and self._queued <= PAUSE_AT_BYTES // 2 and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                return piece
            if self._error is not None:
                raise self._error
            if self._state == _DONE:
                return b""
            await self._wait()

    @property
    def complete(self) -> bool:
        return self._state == _DONE and not self._pieces

    @property
    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.closed and self._error is None

    def release(self) -> None:
        """Ready for the next request (the response was read to its end)."""
        self._reset()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    async def _wait(self) -> None:
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(self._idle_seconds, self._idle_timeout, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _idle_timeout(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._keep_alive = False

    # Parsing

    def _parse(self) -> None:
        buffer = self._buffer
        position = 0
        size = len(buffer)
        while position < size:
            state = self._state
            if state == _LENGTH or state == _CHUNK_DATA:
                end = min(size, position + self._remaining)
                self._body_piece(buffer[position:end])
                self._remaining -= end - position
                position = end
                if self._remaining == 0:
                    if state == _LENGTH:
                        self._finish()
                    else:
                        self._state = _CHUNK_END
            elif state == _HEAD:
                end = buffer.find(b"\r\n\r\n", position)
                if end < 0:
                    if size - position > HEAD_LIMIT_BYTES:
                        raise MalformedResponse("the response head is too large")
                    break
                self._head(buffer[position:end])
                position = end + 4
            elif state == _UNTIL_CLOSE:
                self._body_piece(buffer[position:])
                position = size
            elif state == _CHUNK_SIZE or state == _TRAILERS:
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    if size - position > HEAD_LIMIT_BYTES:
                        raise MalformedResponse("a chunk line is too long")
                    break
                line = buffer[position:end]
                position = end + 2
                if state == _TRAILERS:
                    if not line:
                        self._finish()
                    continue
                digits = line.split(b";", 1)[0].strip()
                # int() alone would take "-1", "0x1f" and "1_0" too.
                if not digits or digits.strip(_HEX_DIGITS):
                    raise MalformedResponse("a chunk size is not hexadecimal")
                self._remaining = int(digits, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif state == _CHUNK_END:
                if size - position < 2:
                    break
                if buffer[position : position + 2] != b"\r\n":
                    raise MalformedResponse("a chunk does not end with CRLF")
                position += 2
                self._state = _CHUNK_SIZE
            else:  # _DONE: more bytes than the response held
                self._keep_alive = False
                position = size
        self._buffer = buffer[position:] if position < size else b""

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit() or (len(rest) > 3 and rest[3] != " "):
            raise MalformedResponse("the response does not begin with an HTTP/1.x status line")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise MalformedResponse("a response header is malformed")
            name, value = name.lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if 100 <= status < 200:
            return  # informational (100 Continue, 103 Early Hints): the real head follows
        self.status, self.headers = status, headers
        if version == "HTTP/1.0" or "close" in headers.get("connection", "").lower():
            self._keep_alive = False
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            decoder = zlib.decompressobj(_GZIP_OR_ZLIB if encoding != "deflate" else zlib.MAX_WBITS)
            self._decoder, self._flush = decoder.decompress, decoder.flush
        elif encoding != "identity":
            raise MalformedResponse(f"the response's content encoding {encoding!r} is not supported")
        transfer = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if status in (204, 304):
            self._finish()
        elif transfer is not None:
            if transfer.lower().rpartition(",")[2].strip() != "chunked":
                raise MalformedResponse(f"the transfer encoding {transfer!r} is not supported")
            self._state = _CHUNK_SIZE
        elif length is not None:
            if not length.isdigit():
                raise MalformedResponse("the Content-Length is not a number")
            self._remaining = int(length)
            self._state = _LENGTH
            if self._remaining == 0:
                self._finish()
        else:
            self._keep_alive = False
            self._state = _UNTIL_CLOSE

    def _body_piece(self, piece: bytes) -> None:
        if self._decoder is not None:
            try:
                piece = self._decoder(piece)
            except zlib.error as exc:
                raise MalformedResponse("the compressed body is corrupt") from exc
        self._queue(piece)

    def _queue(self, piece: bytes) -> None:
        if piece:
            self._pieces.append(piece)
            self._queued += len(piece)

    def _finish(self) -> None:
        if self._flush is not None:
            try:
                rest = self._flush()
            except zlib.error as exc:
                raise MalformedResponse("the compressed body is corrupt") from exc
            self._queue(rest)
        self._state = _DONE
