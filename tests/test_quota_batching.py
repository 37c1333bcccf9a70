"""Script calls of concurrent requests share one trip to Redis (gateway/quota/batching.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.quota.batching import ScriptBatcher, evalsha
from gateway.quota.resp import RespConnection
from tests.conftest import REDIS_KEY_PREFIX

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL_ON_NEGATIVE = "if tonumber(ARGV[1]) < 0 then return redis.error_reply('negative') end return ARGV[1]"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis(connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=64))
    yield client
    await client.aclose()


def batcher_on(redis: Redis, defer_seconds: float = 0.005) -> ScriptBatcher:
    """A batcher on a connection of its own to the Redis of this client, as the limiter makes it."""
    pool = redis.connection_pool
    connection = RespConnection.for_pool(pool.connection_class, pool.connection_kwargs)
    return ScriptBatcher(connection, defer_seconds=defer_seconds)


@pytest.fixture
async def batcher(redis: Redis) -> AsyncIterator[ScriptBatcher]:
    batcher = batcher_on(redis)
    yield batcher
    await batcher.close()


def count_writes(batcher: ScriptBatcher) -> list[int]:
    """Calls per write on the batcher's connection, from now on."""
    protocol = batcher._connection._protocol
    assert protocol is not None
    writes: list[int] = []
    write = protocol.write

    def counted(commands: bytes, futures: Sequence[asyncio.Future[Any]]) -> None:
        writes.append(len(futures))
        write(commands, futures)

    protocol.write = counted  # type: ignore[method-assign]
    return writes


async def test_concurrent_calls_go_as_one_pipeline_on_one_connection(
    redis: Redis, batcher: ScriptBatcher
) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    script = redis.register_script(INCR)
    await batcher.call(script, [key], [0])  # loads the script and connects
    writes = count_writes(batcher)
    clients_before = len(await redis.client_list())

    replies = await asyncio.gather(*(batcher.call(script, [key], [1]) for _ in range(50)))

    # Redis ran them in the order sent: the counter climbs 1..50 through the replies.
    assert replies == list(range(1, 51))
    # The first goes at once (nothing owed); the other 49 share the next write.
    assert writes == [1, 49]
    # No connection was opened for them (50 calls through redis-py could open 50).
    assert len(await redis.client_list()) == clients_before
    assert int(await redis.get(key)) == 50
    await redis.delete(key)


async def test_one_failing_call_does_not_fail_the_others(redis: Redis, batcher: ScriptBatcher) -> None:
    script = redis.register_script(FAIL_ON_NEGATIVE)
    await batcher.call(script, [], [0])
    results = await asyncio.gather(
        *(batcher.call(script, [], [value]) for value in (1, -1, 2)), return_exceptions=True
    )
    assert results[0] == b"1" and results[2] == b"2"
    assert isinstance(results[1], ResponseError) and "negative" in str(results[1])


async def test_scripts_are_loaded_again_after_redis_forgot_them(redis: Redis, batcher: ScriptBatcher) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    script = redis.register_script(INCR)
    await batcher.call(script, [key], [1])
    await redis.script_flush()
    # Alone (straight through) and in a batch (pipelined): both find the script missing.
    assert await batcher.call(script, [key], [1]) == 2
    await redis.script_flush()
    replies = await asyncio.gather(*(batcher.call(script, [key], [1]) for _ in range(5)))
    assert sorted(replies) == [3, 4, 5, 6, 7]
    assert await redis.script_exists(script.sha) == [True]
    await redis.delete(key)


async def test_a_script_redis_refuses_to_load_fails_its_call(redis: Redis, batcher: ScriptBatcher) -> None:
    broken = redis.register_script("return (")
    with pytest.raises(ResponseError, match="Error compiling script"):
        await batcher.call(broken, [], [])


async def test_a_dead_redis_fails_every_waiting_call(redis: Redis) -> None:
    # Nothing listens on this port.
    batcher = ScriptBatcher(RespConnection(host="127.0.0.1", port=1, connect_timeout=1))
    script = redis.register_script(INCR)
    results = await asyncio.gather(
        *(batcher.call(script, ["k"], [1]) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(result, RedisConnectionError) for result in results), results
    await batcher.close()


async def test_a_deferred_call_rides_with_the_next_call_sent(redis: Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    batcher = batcher_on(redis, defer_seconds=30.0)
    script = redis.register_script(INCR)
    await batcher.call(script, [key], [0])
    deferred = asyncio.ensure_future(batcher.call(script, [key], [10], defer=True))
    await asyncio.sleep(0.05)
    # Held back: Redis has not seen it.
    assert not deferred.done() and int(await redis.get(key)) == 0
    # The next call goes at once and takes the deferred one along, sent first.
    assert await batcher.call(script, [key], [1]) == 11
    assert await deferred == 10
    await batcher.close()
    await redis.delete(key)


async def test_a_deferred_call_alone_goes_after_its_delay(redis: Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    batcher = batcher_on(redis, defer_seconds=0.05)
    script = redis.register_script(INCR)
    assert await asyncio.wait_for(batcher.call(script, [key], [3], defer=True), timeout=5) == 3
    await batcher.close()
    await redis.delete(key)


@pytest.mark.parametrize("cancelled", ["while owed", "as the reply arrives", "just after the reply"])
async def test_a_cancelled_callers_reply_is_handed_over_whenever_it_comes(
    redis: Redis, batcher: ScriptBatcher, cancelled: str
) -> None:
    """Redis runs a call whose caller left: its reply goes to `orphaned` (QuotaService
    releases a cancelled admission's reservation so), whichever comes first."""
    key = f"{REDIS_KEY_PREFIX}batch:{uuid.uuid4().hex}"
    script = redis.register_script(INCR)
    await batcher.call(script, [key], [0])  # loads the script and connects
    handed: list[asyncio.Future[Any]] = []
    calling = asyncio.create_task(
        batcher.call_packed(script, evalsha(script, [key], [5]), orphaned=handed.append)
    )
    await asyncio.sleep(0)  # written: nothing was owed
    protocol = batcher._connection._protocol
    assert protocol is not None
    receive = protocol.data_received

    def received(data: bytes) -> None:
        # Before the caller's task can see its cancellation: the reply finds its future
        # cancelled, or already answered.
        if cancelled == "as the reply arrives":
            calling.cancel()
        receive(data)
        if cancelled == "just after the reply":
            calling.cancel()

    protocol.data_received = received  # type: ignore[method-assign]
    if cancelled == "while owed":
        calling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await calling
    assert len(handed) == 1
    assert await asyncio.wait_for(handed[0], timeout=5) == 5
    assert int(await redis.get(key)) == 5
    # Nothing is kept for calls that are over.
    assert batcher._connection._spares == {}
    assert await batcher.call(script, [key], [1]) == 6
    assert batcher._connection._spares == {}
