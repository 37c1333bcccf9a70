"""The Redis the quota scripts run on: a real server, or in-process for the embedded default."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import RedisConfig


def open_redis(config: RedisConfig | None) -> tuple[Redis | RedisCluster, str]:
    """A client and a description for the start-up log (never with a password)."""
    if config is None:
        # fakeredis runs the same Lua scripts in-process (through lupa): one gateway
        # process, state lost on restart. Good for trying the gateway, not for production.
        import fakeredis

        client: Redis = fakeredis.FakeAsyncRedis()
        return client, "embedded (in-process, not shared, not persistent)"
    if config.cluster:
        cluster = RedisCluster.from_url(
            config.url, max_connections=config.max_connections, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        return cluster, f"redis cluster via {_where(config.url)}"
    # A blocking pool: under a burst, requests wait briefly for a connection instead of
    # failing (redis-py's default pool raises once 100 connections are in use).
    pool = BlockingConnectionPool.from_url(
        config.url,
        max_connections=config.max_connections,
        timeout=config.pool_timeout_seconds,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
    )
    client = Redis(connection_pool=pool)
    pool_kwargs = pool.connection_kwargs
    where = f"{pool_kwargs.get('host', pool_kwargs.get('path', '?'))}:{pool_kwargs.get('port', '')}"
    return client, f"redis {where} db {pool_kwargs.get('db', 0)}"


def _where(url: str) -> str:
    """host:port of a Redis URL, without credentials."""
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1].split("/", 1)[0]
