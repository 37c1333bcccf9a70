"""Script calls of concurrent requests share one trip to Redis (gateway/quota/batching.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.quota.batching import ScriptBatcher

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL_ON_NEGATIVE = "if tonumber(ARGV[1]) < 0 then return redis.error_reply('negative') end return ARGV[1]"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis(connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=64))
    yield client
    await client.aclose()


async def commands_processed(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_commands_processed"])


async def test_concurrent_calls_go_as_one_pipeline_on_one_connection(redis: Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    batcher = ScriptBatcher(redis)
    script = redis.register_script(INCR)
    await batcher.call(script, [key], [0])  # loads the script
    connections_before = len(redis.connection_pool._available_connections)  # type: ignore[union-attr]

    replies = await asyncio.gather(*(batcher.call(script, [key], [1]) for _ in range(50)))

    # Redis ran them in the order sent: the counter climbs 1..50 through the replies.
    assert sorted(replies) == list(range(1, 51))
    assert replies == list(range(1, 51))
    # 50 calls at once through the plain client would have opened up to 50 connections.
    assert len(redis.connection_pool._available_connections) == connections_before == 1  # type: ignore[union-attr]
    assert int(await redis.get(key)) == 50
    await redis.delete(key)


async def test_batches_are_cut_at_max_batch(redis: Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    batcher = ScriptBatcher(redis, max_batch=8)
    script = redis.register_script(INCR)
    await batcher.call(script, [key], [0])
    replies = await asyncio.gather(*(batcher.call(script, [key], [1]) for _ in range(20)))
    assert sorted(replies) == list(range(1, 21))
    # 20 calls in batches of 8: three pipelines sent side by side, on three connections.
    assert len(redis.connection_pool._available_connections) == 3  # type: ignore[union-attr]
    await redis.delete(key)


async def test_one_failing_call_does_not_fail_the_others(redis: Redis) -> None:
    batcher = ScriptBatcher(redis)
    script = redis.register_script(FAIL_ON_NEGATIVE)
    await batcher.call(script, [], [0])
    results = await asyncio.gather(
        *(batcher.call(script, [], [value]) for value in (1, -1, 2)), return_exceptions=True
    )
    assert results[0] == b"1" and results[2] == b"2"
    assert isinstance(results[1], ResponseError) and "negative" in str(results[1])


async def test_scripts_are_loaded_again_after_redis_forgot_them(redis: Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    batcher = ScriptBatcher(redis)
    script = redis.register_script(INCR)
    await batcher.call(script, [key], [1])
    await redis.script_flush()
    # Alone (straight through) and in a batch (pipelined): both find the script missing.
    assert await batcher.call(script, [key], [1]) == 2
    await redis.script_flush()
    replies = await asyncio.gather(*(batcher.call(script, [key], [1]) for _ in range(5)))
    assert sorted(replies) == [3, 4, 5, 6, 7]
    await redis.delete(key)


async def test_a_dead_redis_fails_every_waiting_call() -> None:
    # Nothing listens on this port.
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    batcher = ScriptBatcher(client)
    script = client.register_script(INCR)
    results = await asyncio.gather(
        *(batcher.call(script, ["k"], [1]) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(result, RedisConnectionError) for result in results), results
    await client.aclose()


async def test_a_deferred_call_rides_with_the_next_call_sent(redis: Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    batcher = ScriptBatcher(redis, defer_seconds=30.0)
    script = redis.register_script(INCR)
    await batcher.call(script, [key], [0])
    deferred = asyncio.ensure_future(batcher.call(script, [key], [10], defer=True))
    await asyncio.sleep(0.05)
    # Held back: Redis has not seen it.
    assert not deferred.done() and int(await redis.get(key)) == 0
    # The next call goes at once and takes the deferred one along, sent first.
    assert await batcher.call(script, [key], [1]) == 11
    assert await deferred == 10
    await redis.delete(key)


async def test_a_deferred_call_alone_goes_after_its_delay(redis: Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    batcher = ScriptBatcher(redis, defer_seconds=0.05)
    script = redis.register_script(INCR)
    assert await asyncio.wait_for(batcher.call(script, [key], [3], defer=True), timeout=5) == 3
    await redis.delete(key)
