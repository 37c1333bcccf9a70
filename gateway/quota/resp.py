"""One pipelined connection to Redis for the quota scripts.

Every request makes two script calls. Through redis-py's pool each batch of them
takes a connection (a lock, a readiness check), sends under a timeout task, reads each
reply under its own timeout and gives the connection back; that, not Redis, was most
of what quota admission cost. Here commands are written to one connection as they
come and replies are matched to callers in order (Redis answers in order), parsed by
hiredis. Nothing else is done per call.

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
    """A command in Redis's wire format (RESP)."""
    parts = [b"*%d\r\n" % len(arguments)]
    for argument in arguments:
        data = argument if isinstance(argument, bytes) else str(argument).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.lost = False
        self._reader = hiredis.Reader(replyError=ResponseError)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        error = RedisConnectionError(f"Connection to Redis lost ({exc or 'closed by server'}).")
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

    async def send(self, commands: Sequence[bytes]) -> list[Any]:
        """Replies to these commands, in order; error replies are returned, not raised."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connect()
        replies = await self._exchange(protocol, commands)
        return [_error_class(reply) for reply in replies]

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def _exchange(self, protocol: _Protocol, commands: Sequence[bytes]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.waiting.extend(futures)
        assert protocol.transport is not None
        protocol.transport.write(b"".join(commands))
        try:
            async with asyncio.timeout(self._reply_timeout):
                return [await future for future in futures]
        except TimeoutError:
            # Later replies would be matched to the wrong callers: start afresh.
            protocol.lost = True
            protocol.transport.abort()
            raise RedisTimeoutError(f"Redis did not answer within {self._reply_timeout:g} s.") from None

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            if self._protocol is not None and not self._protocol.lost:
                return self._protocol
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
            handshake: list[bytes] = []
            if self._password is not None:
                credentials = [self._username, self._password] if self._username else [self._password]
                handshake.append(pack("AUTH", *credentials))
            if self._db:
                handshake.append(pack("SELECT", self._db))
            if handshake:
                for reply in await self._exchange(protocol, handshake):
                    if isinstance(reply, ResponseError):
                        assert protocol.transport is not None
                        protocol.transport.close()
                        raise RedisConnectionError(f"Redis refused the connection setup: {reply}")
            self._protocol = protocol
            return protocol


def _error_class(reply: Any) -> Any:
    if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
        return NoScriptError(str(reply))
    return reply
