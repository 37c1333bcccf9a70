"""One pipelined connection to Redis for the quota scripts.

Every request makes two script calls. Through redis-py's pool each batch of them
takes a connection (a lock, a readiness check), sends under a timeout task, reads each
reply under its own timeout and gives the connection back; that, not Redis, was most
of what quota admission cost. Here commands are written to one connection as they
come and each reply resolves its caller's future straight from the socket callback
(Redis answers in order), parsed by hiredis. No task, timer or copy is made per call.

A caller cancelled while its command is on its way (a client that left) does not stop
Redis from running it: the reply can go to a spare future instead (`spare_reply`), for
whoever must undo what the command did.

Replies are watched by one timer per connection, not one per call: it fires every
`reply_timeout` while replies are owed, and if a command sent before the last firing is
still unanswered, the connection is dropped and everything waiting on it fails. A
reply that never comes is thus noticed within one to two `reply_timeout`s.

It speaks to the servers a redis-py client is made for from a URL: redis:// (TCP),
rediss:// (TLS, with the URL's ssl_* settings) and unix://, logging in with AUTH
(a password, or an ACL user and its password) and choosing the database with SELECT.
TLS changes only how the connection is opened: asyncio's TLS transport hands the
same protocol the decrypted bytes. A connection class it cannot speak for is refused
at start-up (`for_pool`), never worked around.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
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
    def __init__(self, spares: dict[asyncio.Future[Any], asyncio.Future[Any]]) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        # Callers' futures → the spares their replies go to if they are cancelled (spare_reply).
        self.spares = spares
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
            if future.done():  # its caller was cancelled: the reply may go to a spare
                spare = self.spares.pop(future, None) if self.spares else None
                if spare is None or spare.done():
                    continue
                future = spare
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
            if future.done() and self.spares:
                future = self.spares.pop(future, future)
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
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 2.0,
        reply_timeout: float = 5.0,
    ) -> None:
        """tls: given, TCP connections are made over TLS with it (rediss://)."""
        self._host, self._port, self._path = host, port, path
        self._db, self._username, self._password = db, username, password
        self._tls = tls
        self._connect_timeout, self._reply_timeout = connect_timeout, reply_timeout
        self._protocol: _Protocol | None = None
        self._spares: dict[asyncio.Future[Any], asyncio.Future[Any]] = {}
        self._connecting = asyncio.Lock()
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def for_pool(cls, connection_class: type, kwargs: Mapping[str, Any]) -> RespConnection:
        """One speaking to the server a redis-py pool was made for, as that pool would.

        Raises ValueError for a connection class other than redis-py's TCP, TLS and
        Unix socket ones, or settings it would not honour: start-up should stop there
        rather than run the quota scripts some other way than configured.
        """
        where = f"{connection_class.__module__}.{connection_class.__qualname__}"
        if kwargs.get("credential_provider") is not None:
            raise ValueError(f"{where}: a credential_provider is not supported; put the user in the URL")
        tls = None
        if connection_class is Connection or connection_class is SSLConnection:
            host, port, path = str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)), None
            if connection_class is SSLConnection:
                tls = tls_context(kwargs)
        elif connection_class is UnixDomainSocketConnection:
            host, port, path = None, 0, str(kwargs["path"])
        else:
            raise ValueError(
                f"the quota scripts cannot reach Redis through {where}: "
                "only redis://, rediss:// and unix:// connections are supported"
            )
        return cls(
            host=host,
            port=port,
            path=path,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=tls,
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
                if future.done() and self._spares:
                    future = self._spares.pop(future, future)
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def spare_reply(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """A spare future for the reply to the command of `future`, should `future` be
        cancelled (its caller left) before the reply comes: the command runs all the same.

        The spare gets what `future` would have: the reply, or the error that it is or
        that a lost connection or a reply timeout is. Taken before the command is written;
        `drop_spare(future)` once it is not needed (its caller had the reply, or failed).
        """
        spare: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._spares[future] = spare
        return spare

    def drop_spare(self, future: asyncio.Future[Any]) -> None:
        self._spares.pop(future, None)

    async def send(self, commands: Sequence[bytes]) -> list[Any]:
        """Replies to these commands, in order; error replies are returned, not raised."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        await self.submit_when_connected(b"".join(commands), futures)
        return [await _reply_or_error(future) for future in futures]

    async def close(self) -> None:
        for future, spare in self._spares.items():
            if future.cancelled() and not spare.done():
                spare.set_exception(RedisConnectionError("Connection to Redis closed."))
        self._spares.clear()
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
                        _, protocol = await loop.create_unix_connection(self._new_protocol, self._path)
                    else:
                        _, protocol = await loop.create_connection(
                            self._new_protocol, self._host or "", self._port, ssl=self._tls
                        )
            # ssl.SSLError (a certificate refused, a TLS port spoken to in plain) is an OSError.
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

    def _new_protocol(self) -> _Protocol:
        return _Protocol(self._spares)

    async def _handshake(self, protocol: _Protocol) -> None:
        """AUTH and SELECT, as one write; raises what refused them, as a connection error."""
        # Each command with the error that its refusal is: the connection is of no use.
        steps: list[tuple[bytes, type[RedisConnectionError], str]] = []
        if self._password is not None:
            # With a user, AUTH logs in as that ACL user; without, as the default user.
            credentials = [self._username, self._password] if self._username else [self._password]
            steps.append((pack("AUTH", *credentials), AuthenticationError, "Redis refused the login"))
        if self._db:
            steps.append((pack("SELECT", self._db), RedisConnectionError, f"Redis refused db {self._db}"))
        if not steps:
            return
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in steps]
        protocol.write(b"".join([command for command, _, _ in steps]), futures)
        try:
            async with asyncio.timeout(self._reply_timeout):
                for (_, error, refused), future in zip(steps, futures, strict=True):
                    reply = await _reply_or_error(future)
                    if isinstance(reply, ResponseError):
                        raise error(f"{refused}: {reply}")
        except TimeoutError:
            raise RedisTimeoutError(f"Redis did not answer within {self._reply_timeout:g} s.") from None
        finally:
            # After a failure, the replies not awaited (their errors would be logged as
            # never retrieved) and those still owed (the connection is closed) are dropped.
            for future in futures:
                if not future.cancel() and not future.cancelled():
                    future.exception()


_VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TLS_SETTINGS = frozenset(
    {
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_include_verify_flags",
        "ssl_exclude_verify_flags",
    }
)


def tls_context(kwargs: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS settings of redis-py's SSLConnection (its ssl_* arguments), as an SSLContext.

    Defaults as redis-py's: the server's certificate is required and its host name
    checked, against the system's CAs unless ssl_ca_certs (or _data, _path) names others.
    Raises ValueError for an ssl_* setting it does not know, rather than ignore it.
    """
    unknown = sorted(name for name in kwargs if name.startswith("ssl_") and name not in _TLS_SETTINGS)
    if unknown:
        raise ValueError(f"TLS settings the quota scripts' connection lacks: {', '.join(unknown)}")
    verify_mode = kwargs.get("ssl_cert_reqs") or "required"
    if isinstance(verify_mode, str):
        if verify_mode not in _VERIFY_MODES:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_VERIFY_MODES)}, not {verify_mode!r}")
        verify_mode = _VERIFY_MODES[verify_mode]
    context = ssl.create_default_context()
    # Before verify_mode: a context checking host names refuses CERT_NONE.
    context.check_hostname = bool(kwargs.get("ssl_check_hostname", True)) and verify_mode != ssl.CERT_NONE
    context.verify_mode = verify_mode
    for flag in kwargs.get("ssl_include_verify_flags") or ():
        context.verify_flags |= flag
    for flag in kwargs.get("ssl_exclude_verify_flags") or ():
        context.verify_flags &= ~flag
    certfile, keyfile = kwargs.get("ssl_certfile"), kwargs.get("ssl_keyfile")
    if keyfile and not certfile:
        raise ValueError("ssl_keyfile is given without ssl_certfile, the certificate it is the key of")
    if certfile:
        # A client certificate, for servers started with tls-auth-clients yes.
        context.load_cert_chain(certfile, keyfile, kwargs.get("ssl_password"))
    ca_file, ca_path, ca_data = (kwargs.get(f"ssl_ca_{name}") for name in ("certs", "path", "data"))
    if ca_file or ca_path or ca_data:
        context.load_verify_locations(cafile=ca_file, capath=ca_path, cadata=ca_data)
    if kwargs.get("ssl_min_version") is not None:
        context.minimum_version = ssl.TLSVersion(kwargs["ssl_min_version"])
    if kwargs.get("ssl_ciphers"):
        context.set_ciphers(kwargs["ssl_ciphers"])
    return context


async def _reply_or_error(future: asyncio.Future[Any]) -> Any:
    try:
        return await future
    except ResponseError as error:
        return error


def _error_class(reply: ResponseError) -> ResponseError:
    if str(reply).startswith("NOSCRIPT"):
        return NoScriptError(str(reply))
    return reply
