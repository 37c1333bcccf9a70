"""Script calls of concurrent requests, sent to Redis together.

Each request makes two script calls (reserve, settle). Through redis-py each call
costs far more client CPU than Redis spends running it: a connection taken from the
pool, the command packed, written, read and parsed on its own. Calls made in the same
turn of the event loop are sent instead as one pipeline on our own connection (see
resp.py): one write for all of them, each reply handed to its caller as it is read.
A call made while Redis owes no reply goes at once, so a quiet gateway does not wait
a turn of the loop; under load, replies are always owed and batches form by themselves.

Calls nobody waits on (settlements: the response is already on its way) may be
deferred: they wait up to `defer_seconds` for the next call that is sent anyway, and
travel with it. At one request at a time, each settlement then rides along with the
next request's admission instead of costing a trip of its own. A reservation is held
that much longer, which can only refuse, never admit, more than the limit allows.

Each EVALSHA stays atomic on its own, as before: a pipeline (without MULTI) only
shares the trip, and Redis runs its scripts one after another in the order sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from redis.exceptions import NoScriptError

from gateway.quota.resp import RespConnection, pack


class Script(Protocol):
    """A Lua script known by its SHA-1 (redis-py's registered scripts are such)."""

    script: str | bytes
    sha: str


class ScriptBatcher:
    """Script calls over one pipelined connection (see resp.py), which it closes."""

    def __init__(self, connection: RespConnection, defer_seconds: float = 0.005) -> None:
        self._connection = connection
        self._defer_seconds = defer_seconds
        # The calls queued for the next write: each packed EVALSHA, and the future of its reply.
        self._commands: list[bytes] = []
        self._replies: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False
        self._deferred_flush: asyncio.TimerHandle | None = None

    def call(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int], *, defer: bool = False
    ) -> Coroutine[Any, Any, Any]:
        return self.call_packed(script, evalsha(script, keys, args), defer=defer)

    async def call_packed(
        self,
        script: Script,
        command: bytes,
        *,
        defer: bool = False,
        meanwhile: Callable[[], object] | None = None,
        orphaned: Callable[[asyncio.Future[Any]], object] | None = None,
    ) -> Any:
        """`command`: EVALSHA of `script`, packed (see `evalsha`).

        meanwhile: called once the call is queued (and, when Redis owed nothing, already
        written), before its reply is awaited: work for the caller to do while Redis runs it.
        orphaned: called if the caller is cancelled once the call is queued, which Redis
        runs all the same, with a future of its reply (see RespConnection.spare_reply).
        """
        reply = self._enqueue(command, defer)
        spare = None if orphaned is None else self._connection.spare_reply(reply)
        try:
            if meanwhile is not None:
                meanwhile()
            return await reply
        except NoScriptError:
            pass  # Redis restarted or its scripts were flushed: see below.
        except asyncio.CancelledError:
            if orphaned is not None and spare is not None:
                if reply.done() and not reply.cancelled():
                    orphaned(reply)  # answered just before the cancellation reached the caller
                else:
                    orphaned(spare)
                    spare = None  # kept for the reply
            raise
        finally:
            if spare is not None:
                self._connection.drop_spare(reply)
        # Load the script, then run this call again. (Nothing ran: NOSCRIPT was the reply.)
        await self._load(script)
        return await self.call_packed(script, command, orphaned=orphaned)

    def queue(self, command: bytes, *, defer: bool = False) -> asyncio.Future[Any]:
        """`command` (an EVALSHA, packed) queued now, as a future of its reply, for a caller
        that need not await it; a NOSCRIPT reply is its NoScriptError (the caller's to handle)."""
        return self._enqueue(command, defer)

    async def _load(self, script: Script) -> None:
        """SCRIPT LOAD, on the same connection as the calls (and as the same ACL user)."""
        (loaded,) = await self._connection.send([pack(b"SCRIPT", b"LOAD", script.script)])
        if isinstance(loaded, Exception):
            raise loaded

    def _enqueue(self, command: bytes, defer: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._commands.append(command)
        self._replies.append(reply)
        if defer and self._defer_seconds > 0:
            if not self._flush_scheduled and self._deferred_flush is None:
                self._deferred_flush = loop.call_later(self._defer_seconds, self._flush)
        elif self._flush_scheduled:
            pass
        elif self._connection.owes_nothing:
            # As Nagle's algorithm does: with nothing in flight there is no trip to share
            # and nobody to wait for, so the call goes now rather than a loop turn later
            # (at one request at a time, that turn was the whole wait). Calls made later
            # in this turn, while Redis owes a reply, batch as before.
            self._flush()
        else:
            self._flush_scheduled = True
            # After every callback ready in this turn has run, so their calls join in.
            loop.call_soon(self._flush)
        return reply

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._deferred_flush is not None:
            self._deferred_flush.cancel()
            self._deferred_flush = None
        queued, self._commands = self._commands, []
        futures, self._replies = self._replies, []
        # Replies resolve the callers' futures from the socket callback: no task here.
        commands = queued[0] if len(queued) == 1 else b"".join(queued)
        if not self._connection.submit(commands, futures):
            _spawn(self._connection.submit_when_connected(commands, futures))

    async def close(self) -> None:
        await self._connection.close()


def evalsha(script: Script, keys: Sequence[str], args: Sequence[str | int]) -> bytes:
    # Packed by hiredis: redis-py's general packer cost more per argument than
    # everything else a request does with Redis.
    return pack(b"EVALSHA", script.sha, len(keys), *keys, *args)


def _spawn(work: Coroutine[Any, Any, None]) -> None:
    # Held by the loop until done; a failure is delivered through each caller's future.
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
