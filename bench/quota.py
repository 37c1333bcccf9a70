"""Quota engine speed against the local Redis: admissions per second, round trips each.

Run: ./scripts/bench quota   (REDIS_URL overrides redis://127.0.0.1:6379/0)
Each request reserves against three limits (requests/minute, tokens/minute, tokens/day)
and settles; figures are from one run on this machine, side by side.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import redis.asyncio as redis_asyncio
import uvloop

from gateway.quota.limiter import Charge, QuotaLimiter
from gateway.quota.policy import AppliedLimit, LimitRule

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


async def evalsha_calls(client: redis_asyncio.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def run(concurrency: int, requests: int) -> tuple[float, float, float]:
    # The pool the gateway uses (gateway/quota/store.py).
    pool = redis_asyncio.BlockingConnectionPool.from_url(REDIS_URL, max_connections=64, timeout=20)
    client = redis_asyncio.Redis(connection_pool=pool)
    limiter = QuotaLimiter(client, f"bench:{uuid.uuid4().hex[:8]}:")
    users = [f"user{i}" for i in range(50)]
    for user in users:
        await client.set(
            AppliedLimit("b", "user", user, LimitRule("tokens", "day", 1)).sync_marker(limiter.key_prefix), 1
        )

    def charges(user: str) -> list[Charge]:
        return [
            Charge(AppliedLimit("b", "user", user, LimitRule("requests", "minute", 10**9)), 1),
            Charge(AppliedLimit("b", "user", user, LimitRule("tokens", "minute", 10**12)), 1_200),
            Charge(AppliedLimit("b", "user", user, LimitRule("tokens", "day", 10**12)), 1_200),
        ]

    queue = list(range(requests))
    before = await evalsha_calls(client)

    settlements: list[asyncio.Task[None]] = []

    async def worker() -> None:
        while queue:
            index = queue.pop()
            admission = await limiter.reserve(charges(users[index % len(users)]))
            # As in the gateway: the answer does not wait for the settlement, which
            # rides with the next script call (or goes after 5 ms on its own).
            settlements.append(asyncio.create_task(limiter.settle(admission.reservation, [1, 700, 700])))

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.gather(*settlements)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    calls = await evalsha_calls(client) - before
    keys = [key async for key in client.scan_iter(f"{limiter.key_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    return requests / elapsed, calls / requests, cpu / requests * 1e6


def main() -> None:
    print("concurrency   admitted+settled/s   script calls/request   client CPU-µs/request")
    for concurrency, requests in ((1, 3_000), (32, 10_000)):
        rate, calls, cpu_us = uvloop.run(run(concurrency, requests))
        print(f"{concurrency:>11}   {rate:>18,.0f}   {calls:>20.2f}   {cpu_us:>21,.0f}")


if __name__ == "__main__":
    main()
