"""One pipelined connection to Redis for the quota scripts.

Every request makes two script calls. Through redis-py's pool each batch of them
takes a connection (a lock, a readiness check), sends under a timeout task, reads each
reply under its own timeout and gives the connection back; that, not Redis, was most
of what quota admission cost. Here commands are written to one connection as they
come and each reply resolves its caller's future straight from the socket callback
(Redis answers in order), parsed by hiredis. No task, timer or copy is made per call.

Replies are watched by one timer per connection, not one per call: it fires every
`reply_timeout` while replies are owed, and if a command sent before the last firing is
still unanswered, the connection is dropped and everything waiting on it fails. A
reply that never comes is thus noticed within one to two `reply_timeout`s.

Plain TCP and Unix sockets, with AUTH and SELECT. Anything else (TLS, a fake Redis)
gets None from `for_pool` and the caller keeps using redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def pack(*arguments: bytes | str | int) -> bytes:
    """A command in Redis's wire format (RESP); hiredis packs it in C."""
    # hiredis's stub declares a one-item tuple; any length is packed.
    return cast(bytes, hiredis.pack_command(cast(Any, arguments)))


def bulk(value: bytes) -> bytes:
    """One argument of a command, in RESP: for commands packed ahead in parts."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def bulk_int(value: int) -> bytes:
    return bulk(b"%d" % value)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.lost = False
        # Commands written and replies read since connecting: what the watchdog compares.
        self.sent = 0
        self.answered = 0
        self._reader = hiredis.Reader(replyError=ResponseError)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def write(self, commands: bytes, futures: Sequence[asyncio.Future[Any]]) -> None:
        assert self.transport is not None
        self.waiting.extend(futures)
        self.sent += len(futures)
        self.transport.write(commands)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self.waiting
        while (reply := self._reader.gets()) is not False:
            self.answered += 1
            future = waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(_error_class(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"Connection to Redis lost ({exc or 'closed by server'})."))

    def fail(self, error: Exception) -> None:
        self.lost = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RespConnection:
    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = 2.0,
        reply_timeout: float = 5.0,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._db, self._username, self._password = db, username, password
        self._connect_timeout, self._reply_timeout = connect_timeout, reply_timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def for_pool(cls, connection_class: type, kwargs: dict[str, Any]) -> RespConnection | None:
        """One speaking to the server a redis-py pool was made for, if we can."""
        if connection_class is Connection:
            host, port, path = str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)), None
        elif connection_class is UnixDomainSocketConnection:
            host, port, path = None, 0, str(kwargs["path"])
        else:
            return None
        return cls(
            host=host,
            port=port,
            path=path,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            connect_timeout=float(kwargs.get("socket_connect_timeout") or 2.0),
            reply_timeout=float(kwargs.get("socket_timeout") or 5.0),
        )

    @property
    def owes_nothing(self) -> bool:
        """Connected, with every command sent so far answered."""
        protocol = self._protocol
        return protocol is not None and not protocol.lost and not protocol.waiting

    def submit(self, commands: bytes, futures: Sequence[asyncio.Future[Any]]) -> bool:
        """Write packed commands now, one future per command, if connected; else False.

        Each future gets its reply; an error reply is set as its exception (a
        NoScriptError for NOSCRIPT), as is a lost connection or a reply timeout.
        """
        protocol = self._protocol
        if protocol is None or protocol.lost:
            return False
        protocol.write(commands, futures)
        if self._watchdog is None:
            self._watch(protocol)
        return True

    async def submit_when_connected(self, commands: bytes, futures: Sequence[asyncio.Future[Any]]) -> None:
        """`submit`, connecting first; a failure to connect is set on every future."""
        try:
            while not self.submit(commands, futures):
                await self.connect()
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    async def send(self, commands: Sequence[bytes]) -> list[Any]:
        """Replies to these commands, in order; error replies are returned, not raised."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        await self.submit_when_connected(b"".join(commands), futures)
        return [await _reply_or_error(future) for future in futures]

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    def _watch(self, protocol: _Protocol) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self._reply_timeout, self._check, protocol, protocol.sent)

    def _check(self, protocol: _Protocol, sent_before: int) -> None:
        self._watchdog = None
        current = self._protocol
        if current is None or current.lost:
            return
        if protocol is current and current.answered < sent_before:
            # Later replies would be matched to the wrong callers: start afresh.
            current.fail(RedisTimeoutError(f"Redis did not answer within {self._reply_timeout:g} s."))
            if current.transport is not None:
                current.transport.abort()
        elif current.waiting:
            # Armed for an earlier connection, the count restarts with this one.
            self._watch(current)

    async def connect(self) -> None:
        async with self._connecting:
            if self._protocol is not None and not self._protocol.lost:
                return
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    if self._path is not None:
                        _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                    else:
                        _, protocol = await loop.create_connection(_Protocol, self._host or "", self._port)
            except (OSError, TimeoutError) as exc:
                where = self._path or f"{self._host}:{self._port}"
                raise RedisConnectionError(f"Error connecting to Redis at {where}: {exc}") from exc
            try:
                await self._handshake(protocol)
            except BaseException:
                assert protocol.transport is not None
                protocol.transport.close()
                raise
            self._protocol = protocol

    async def _handshake(self, protocol: _Protocol) -> None:
        handshake: list[bytes] = []
        if self._password is not None:
            credentials = [self._username, self._password] if self._username else [self._password]
            handshake.append(pack("AUTH", *credentials))
        if self._db:
            handshake.append(pack("SELECT", self._db))
        if not handshake:
            return
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in handshake]
        protocol.write(b"".join(handshake), futures)
        try:
            async with asyncio.timeout(self._reply_timeout):
                for future in futures:
                    reply = await _reply_or_error(future)
                    if isinstance(reply, ResponseError):
                        raise RedisConnectionError(f"Redis refused the connection setup: {reply}")
        except TimeoutError:
            raise RedisTimeoutError(f"Redis did not answer within {self._reply_timeout:g} s.") from None


async def _reply_or_error(future: asyncio.Future[Any]) -> Any:
    try:
        return await future
    except ResponseError as error:
        return error


def _error_class(reply: ResponseError) -> ResponseError:
    if str(reply).startswith("NOSCRIPT"):
        return NoScriptError(str(reply))
    return reply
