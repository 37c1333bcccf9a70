"""The pipelined Redis connection of the quota scripts (gateway/quota/resp.py), on a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import fakeredis
import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.quota.resp import RespConnection, pack


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def connection_for(redis_url: str, **overrides: object) -> RespConnection:
    pool = BlockingConnectionPool.from_url(redis_url, **overrides)
    return RespConnection.for_pool(pool.connection_class, pool.connection_kwargs)


def test_commands_are_packed_as_resp() -> None:
    assert pack(b"SET", "k", 12) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    assert pack("ECHO", "żółw") == b"*2\r\n$4\r\nECHO\r\n$7\r\n\xc5\xbc\xc3\xb3\xc5\x82w\r\n"


async def test_replies_come_back_in_order_and_errors_are_returned(redis: Redis, redis_url: str) -> None:
    key = f"test:resp:{uuid.uuid4().hex}"
    connection = connection_for(redis_url)
    replies = await connection.send(
        [pack("INCRBY", key, 5), pack("LPUSH", key, "x"), pack("INCRBY", key, 2), pack("GET", key)]
    )
    assert replies[0] == 5 and replies[2] == 7 and replies[3] == b"7"
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
    # Concurrent senders share the connection; each gets its own replies.
    results = await asyncio.gather(*(connection.send([pack("INCRBY", key, 1)]) for _ in range(100)))
    assert sorted(reply for (reply,) in results) == list(range(8, 108))
    await connection.close()
    await redis.delete(key)


async def test_an_unknown_script_is_a_noscript_error(redis_url: str) -> None:
    connection = connection_for(redis_url)
    (reply,) = await connection.send([pack("EVALSHA", "0" * 40, 0)])
    assert isinstance(reply, NoScriptError)
    await connection.close()


async def test_the_database_of_the_url_is_selected(redis: Redis, redis_url: str) -> None:
    key = f"test:resp:{uuid.uuid4().hex}"
    connection = connection_for(redis_url.rsplit("/", 1)[0] + "/5")
    await connection.send([pack("SET", key, "in-5")])
    other = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/5")
    assert await other.get(key) == b"in-5"
    assert await redis.get(key) is None
    await other.delete(key)
    await other.aclose()
    await connection.close()


async def test_a_killed_connection_fails_what_waits_and_the_next_call_reconnects(
    redis: Redis, redis_url: str
) -> None:
    connection = connection_for(redis_url)
    (client_id,) = await connection.send([pack("CLIENT", "ID")])
    # A call waiting on Redis when its connection dies.
    waiting = asyncio.ensure_future(connection.send([pack("BLPOP", f"test:resp:{client_id}", 5)]))
    await asyncio.sleep(0.1)
    assert await redis.execute_command("CLIENT", "KILL", "ID", client_id) == 1
    with pytest.raises(RedisConnectionError):
        await waiting
    assert await connection.send([pack("PING")]) == [b"PONG"]
    await connection.close()


async def test_a_reply_that_never_comes_times_out_and_the_connection_starts_afresh(redis_url: str) -> None:
    connection = connection_for(redis_url, socket_timeout=0.3)
    with pytest.raises(RedisTimeoutError):
        await connection.send([pack("BLPOP", f"test:resp:{uuid.uuid4().hex}", 3)])
    # The late BLPOP reply must not be taken for this PING's.
    assert await connection.send([pack("PING")]) == [b"PONG"]
    await connection.close()


async def test_a_reply_owed_on_a_new_connection_is_watched_too(redis: Redis, redis_url: str) -> None:
    connection = connection_for(redis_url, socket_timeout=0.3)
    (client_id,) = await connection.send([pack("CLIENT", "ID")])  # arms the watchdog
    assert await redis.execute_command("CLIENT", "KILL", "ID", client_id) == 1
    await asyncio.sleep(0.05)
    # Sent on the next connection while the first one's watchdog is still armed.
    blocked = connection.send([pack("BLPOP", f"test:resp:{uuid.uuid4().hex}", 20)])
    with pytest.raises(RedisTimeoutError):
        await asyncio.wait_for(blocked, 5)
    assert await connection.send([pack("PING")]) == [b"PONG"]
    await connection.close()


async def test_nothing_listening_is_a_connection_error() -> None:
    connection = RespConnection(host="127.0.0.1", port=1, connect_timeout=1)
    with pytest.raises(RedisConnectionError):
        await connection.send([pack("PING")])


def test_it_speaks_for_plain_tls_and_unix_urls_and_refuses_other_connections() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6380/0", "unix:///run/redis.sock?db=2"):
        pool = BlockingConnectionPool.from_url(url)
        assert isinstance(
            RespConnection.for_pool(pool.connection_class, pool.connection_kwargs), RespConnection
        )
    # Start-up stops with what cannot be used, rather than run the scripts some other way.
    fake = fakeredis.FakeAsyncRedis().connection_pool
    with pytest.raises(ValueError, match="FakeAsyncRedisConnection: only redis://, rediss:// and unix://"):
        RespConnection.for_pool(fake.connection_class, fake.connection_kwargs)
    unknown = BlockingConnectionPool.from_url("rediss://127.0.0.1:6380/0?ssl_crl_file=/etc/crl.pem")
    with pytest.raises(ValueError, match="lacks: ssl_crl_file"):
        RespConnection.for_pool(unknown.connection_class, unknown.connection_kwargs)


async def test_the_script_batcher_runs_on_it(redis: Redis, redis_url: str) -> None:
    from gateway.quota.batching import ScriptBatcher

    key = f"test:resp:{uuid.uuid4().hex}"
    batcher = ScriptBatcher(connection_for(redis_url))
    script = redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    failing = redis.register_script("return redis.error_reply('refused')")
    await redis.script_flush()
    # The first batch finds neither script loaded: each call is loaded and run again.
    results = await asyncio.gather(
        *(batcher.call(script, [key], [1]) for _ in range(20)),
        batcher.call(failing, [], []),
        return_exceptions=True,
    )
    assert sorted(results[:20]) == list(range(1, 21))  # type: ignore[type-var]
    assert isinstance(results[20], ResponseError) and "refused" in str(results[20])
    assert int(await redis.get(key)) == 20
    await batcher.close()
    await redis.delete(key)


async def test_a_call_while_nothing_is_owed_goes_at_once_and_the_rest_batch(
    redis: Redis, redis_url: str
) -> None:
    from gateway.quota.batching import ScriptBatcher

    key = f"test:resp:{uuid.uuid4().hex}"
    connection = connection_for(redis_url)
    batcher = ScriptBatcher(connection, defer_seconds=30.0)
    script = redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert not connection.owes_nothing  # not connected yet
    await batcher.call(script, [key], [0])
    assert connection.owes_nothing
    protocol = connection._protocol
    assert protocol is not None
    writes: list[int] = []
    write = protocol.write

    def counted(commands: bytes, futures: Sequence[asyncio.Future[Any]]) -> None:
        writes.append(len(futures))
        write(commands, futures)

    protocol.write = counted  # type: ignore[method-assign]
    # Started within one turn of the loop: the first finds nothing owed and is written
    # before the turn ends; the other 49 find its reply owed and share the next write.
    replies = await asyncio.gather(*(batcher.call(script, [key], [1]) for _ in range(50)))
    assert replies == list(range(1, 51))
    assert writes == [1, 49]
    # A deferred call waits, even with nothing owed, and rides with the next call.
    deferred = asyncio.ensure_future(batcher.call(script, [key], [10], defer=True))
    await asyncio.sleep(0.05)
    assert writes == [1, 49] and connection.owes_nothing
    call = batcher.call(script, [key], [1])
    assert await call == 61 and await deferred == 60
    assert writes == [1, 49, 2]
    await batcher.close()
    await redis.delete(key)


async def test_work_given_as_meanwhile_runs_once_the_call_is_written(redis: Redis, redis_url: str) -> None:
    """Admission hands the batcher work that does not depend on Redis's answer: it runs
    after the call went out and before the reply is awaited, once."""
    from gateway.quota.batching import ScriptBatcher, evalsha

    key = f"test:resp:{uuid.uuid4().hex}"
    connection = connection_for(redis_url)
    batcher = ScriptBatcher(connection)
    script = redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await batcher.call(script, [key], [0])
    protocol = connection._protocol
    assert protocol is not None
    seen: list[tuple[int, int]] = []

    def meanwhile() -> None:
        seen.append((protocol.sent, protocol.answered))

    sent, answered = protocol.sent, protocol.answered
    assert await batcher.call_packed(script, evalsha(script, [key], [5]), meanwhile=meanwhile) == 5
    # Written (sent one more), not yet answered, when the work ran.
    assert seen == [(sent + 1, answered)]
    await redis.script_flush()  # the call fails with NOSCRIPT and is sent again: the work is not
    assert await batcher.call_packed(script, evalsha(script, [key], [1]), meanwhile=meanwhile) == 6
    assert len(seen) == 2
    await batcher.close()
    await redis.delete(key)


def test_it_runs_on_uvloop_as_gateway_serve_does(redis_url: str) -> None:
    import uvloop

    async def main() -> list[object]:
        connection = connection_for(redis_url)
        replies = await connection.send([pack("PING"), pack("ECHO", "on uvloop")])
        (client_id,) = await connection.send([pack("CLIENT", "ID")])
        killer = Redis.from_url(redis_url)
        await killer.execute_command("CLIENT", "KILL", "ID", client_id)
        await killer.aclose()
        await asyncio.sleep(0.05)
        replies += await connection.send([pack("PING")])  # reconnected
        await connection.close()
        return replies

    assert uvloop.run(main()) == [b"PONG", b"on uvloop", b"PONG"]
