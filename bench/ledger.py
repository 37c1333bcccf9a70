"""Ledger speed: rows per second into PostgreSQL, and what recording adds to a request.

Run: ./scripts/bench ledger   (DATABASE_URL overrides postgresql://postgres@127.0.0.1:5432/postgres)
Figures are from one run on this machine, side by side.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from gateway.config import LedgerConfig, PostgresConfig
from gateway.ledger import LedgerWriter, UsageRecord
from gateway.ledger.postgres import PostgresStore
from gateway.ledger.spool import Spool
from gateway.metrics import Metrics

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEMPLATE = UsageRecord(
    request_id="",
    created_at=datetime.now(UTC),
    key_id="bench-key",
    user_id="bench-user",
    team_id="bench-team",
    route="chat/completions",
    model="gpt-4o-mini",
    provider="fake",
    upstream_model="gpt-4o-mini",
    stream=False,
    status=200,
    error_code=None,
    prompt_tokens_estimated=120,
    prompt_estimate_exact=True,
    reserved_tokens=620,
    prompt_tokens=120,
    completion_tokens=230,
    usage_source="provider",
    latency_ms=812.5,
    upstream_latency_ms=801.0,
    client_request_id=None,
    cost_usd=0.000156,
)


async def main() -> None:
    name = f"gateway_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        store = PostgresStore(PostgresConfig(dsn=dsn))
        await store.open()
        await store.migrate()
        with tempfile.TemporaryDirectory() as spool_dir:
            writer = LedgerWriter(store, LedgerConfig(batch_size=500), Metrics(), Spool(Path(spool_dir)))
            writer.start()
            records = [replace(TEMPLATE, request_id=uuid.uuid4().hex) for _ in range(50_000)]
            # What the request path pays: encode + one write(2) into the spool.
            append_times = []
            started = time.perf_counter()
            for record in records:
                before = time.perf_counter()
                writer.record(record)
                append_times.append(time.perf_counter() - before)
            appended = time.perf_counter()
            await writer.flush()
            done = time.perf_counter()
            await writer.stop()
        await store.close()
        append_times.sort()
        print(f"records: {len(records):,}")
        print(
            f"request path: median {statistics.median(append_times) * 1e6:.1f} µs, "
            f"p99 {append_times[int(len(append_times) * 0.99)] * 1e6:.1f} µs per record (spool append)"
        )
        print(f"spooling all: {len(records) / (appended - started):,.0f} records/s")
        rate = len(records) / (done - started)
        print(f"into PostgreSQL (COPY, batches of 500, rollups): {rate:,.0f} rows/s end to end")
        await request_latency()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def request_latency() -> None:
    """Median latency of sequential requests through a gateway (embedded, mock provider),
    with the ledger recording and with recording switched off, measured alternately."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from gateway import state
    from gateway.app import create_app
    from gateway.config import load_config

    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "gateway.yaml"
        config_path.write_text(
            "providers: {mock: {type: mock}}\nmodels: {gpt-4o-mini: {provider: mock}}\n"
            "keys: [{id: k, sha256: " + hashlib.sha256(b"bench").hexdigest() + ", user: u}]\n"
        )
        app = create_app(load_config(config_path))
        server = TestServer(app)
        await server.start_server()
        writer = app[state.LEDGER]
        real_record = writer.record
        timings: dict[str, list[float]] = {"on": [], "off": []}
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        async with ClientSession() as session:
            for index in range(4_000):
                mode = "on" if index % 2 else "off"
                writer.record = real_record if mode == "on" else (lambda record: None)  # type: ignore[method-assign]
                started = time.perf_counter()
                async with session.post(
                    str(server.make_url("/v1/chat/completions")),
                    json=body,
                    headers={"Authorization": "Bearer bench"},
                ) as response:
                    await response.read()
                timings[mode].append(time.perf_counter() - started)
        writer.record = real_record  # type: ignore[method-assign]
        await server.close()
    on, off = statistics.median(timings["on"][100:]), statistics.median(timings["off"][100:])
    print(f"request latency (median, mock provider): ledger on {on * 1e3:.3f} ms, off {off * 1e3:.3f} ms")
    print(f"ratio on / off: {on / off:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
