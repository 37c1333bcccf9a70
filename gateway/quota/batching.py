"""Script calls of concurrent requests, sent to Redis together.

Each request makes two script calls (reserve, settle). Through redis-py each call
costs far more client CPU than Redis spends running it: a connection taken from the
pool, the command packed, written, read and parsed on its own. Calls made in the same
turn of the event loop are sent instead as one pipeline: one connection, one write,
one read for all of them. A call that is alone goes straight through, so a quiet
gateway waits no longer than before; under load, batches form by themselves.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import NoScriptError


class Script(Protocol):
    """A Lua script known by its SHA-1 (redis-py's registered scripts are such)."""

    script: str | bytes
    sha: str


@dataclass
class _Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[str | int]
    reply: asyncio.Future[Any]


class ScriptBatcher:
    def __init__(self, redis: Redis, max_batch: int = 128, defer_seconds: float = 0.005) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._defer_seconds = defer_seconds
        self._waiting: list[_Call] = []
        self._flush_scheduled = False
        self._deferred_flush: asyncio.TimerHandle | None = None

    async def call(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int], *, defer: bool = False
    ) -> Any:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(_Call(script, keys, args, reply))
        if defer and self._defer_seconds > 0:
            if not self._flush_scheduled and self._deferred_flush is None:
                self._deferred_flush = loop.call_later(self._defer_seconds, self._flush)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            # After every callback ready in this turn has run, so their calls join in.
            loop.call_soon(self._flush)
        return await reply

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._deferred_flush is not None:
            self._deferred_flush.cancel()
            self._deferred_flush = None
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), self._max_batch):
            batch = waiting[start : start + self._max_batch]
            # Held by the loop until done; a failure is delivered through each future.
            task = asyncio.ensure_future(self._send(batch))
            task.add_done_callback(_retrieve)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            if len(batch) == 1:
                call = batch[0]
                _deliver(call, await self._evalsha(call))
                return
            replies = await self._pipeline(batch)
            for call, reply in zip(batch, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    # Redis restarted or its scripts were flushed: load and run this one alone.
                    reply = await self._evalsha(call)
                _deliver(call, reply)
        except BaseException as exc:
            for call in batch:
                if not call.reply.done():
                    call.reply.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in batch:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            return list(await pipe.execute(raise_on_error=False))

    async def _evalsha(self, call: _Call) -> Any:
        try:
            return await self._redis.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        except NoScriptError:
            await self._redis.script_load(call.script.script)
            return await self._redis.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)


def _deliver(call: _Call, reply: Any) -> None:
    if call.reply.done():  # the caller was cancelled
        return
    if isinstance(reply, Exception):
        call.reply.set_exception(reply)
    else:
        call.reply.set_result(reply)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
