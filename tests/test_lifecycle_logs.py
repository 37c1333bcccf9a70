"""What a real `gateway serve` logs from start to SIGTERM: start-up in the order it
happens, and one line at the end saying what shutdown waited for and wrote."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import USER_KEY, ConfigWriter, free_port
from tests.fakes.openai_upstream import FakeUpstream
from tests.processes import serve, wait_healthy

HI = [{"role": "user", "content": "hi"}]
# /metrics of this test's gateway after two chat requests: 239 lines, and 310 with the
# `_created` series (PROMETHEUS_DISABLE_CREATED_SERIES=false), 71 of them. The bound
# leaves room for a few more metrics, not for the `_created` series to return.
METRICS_LINES_BOUND = 260


async def test_start_up_in_order_and_one_line_saying_what_shutdown_flushed(
    config_writer: ConfigWriter, fake_upstream: FakeUpstream
) -> None:
    # SQLite in a fresh folder: "database migrated" is logged on every run of this test.
    config_writer.write(embedded=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(config_writer.directory, port)
    try:
        await wait_healthy(port, process)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {USER_KEY}"}) as session:

            async def chat() -> int:
                body = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 2}
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    await response.read()
                    return response.status

            assert [await chat(), await chat()] == [200, 200]
            metrics = await written_to_ledger(session, url, 2)
            created = [line for line in metrics if "_created" in line]
            assert created == []
            assert len(metrics) <= METRICS_LINES_BOUND, len(metrics)

            # A third request is with the provider when SIGTERM comes: it is answered,
            # settled and written before the process exits.
            fake_upstream.delay_seconds = 1.0
            third = asyncio.ensure_future(chat())
            while fake_upstream.delayed == 0:
                await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            assert await third == 200
        assert await exit_code(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    lines = log_lines(config_writer.directory / f"gateway-{port}.log")
    messages = [line["message"] for line in lines if line["logger"] == "gateway"]

    def first(prefix: str) -> int:
        return next(index for index, message in enumerate(messages) if message.startswith(prefix))

    assert (
        first("tokenizers loaded for ")
        < first("database migrated to version ")
        < first("ledger and keys: sqlite ")
        < first("quota store: embedded")
        < first("gateway ")  # "gateway 0.1.0 listening on ..."
    )
    assert f"listening on {url} " in messages[first("gateway ")]

    shutdown = [line for line in lines if line["message"].startswith("shut down in ")]
    assert len(shutdown) == 1
    assert shutdown[0] is lines[-1]
    fields = {key: value for key, value in shutdown[0].items() if key not in ("time", "message")}
    drained = fields.pop("settlements_drained")
    seconds = fields.pop("shutdown_seconds")
    assert fields == {
        "level": "info",
        "logger": "gateway",
        "requests_in_flight": 1,
        "ledger_rows_written": 1,  # the third request's row: the first two were written before
        "ledger_rows_written_since_start": 3,
        "ledger_rows_still_spooled": 0,
    }
    # Its settlement may or may not still be running once its answer has gone.
    assert drained in (0, 1)
    # The third request had about a second to go at the signal.
    assert 0.5 <= seconds < 10
    with sqlite3.connect(config_writer.directory / "var" / "test.db") as connection:
        assert connection.execute("SELECT count(*) FROM usage_events").fetchone() == (3,)


async def written_to_ledger(session: aiohttp.ClientSession, url: str, rows: int) -> list[str]:
    """/metrics's lines, once `rows` ledger rows are written (within 5 s)."""
    for _ in range(100):
        async with session.get(f"{url}/metrics") as response:
            lines = (await response.text()).splitlines()
        if f"gateway_ledger_rows_written_total {rows:.1f}" in lines:
            return lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger did not reach {rows} rows")


async def exit_code(process: subprocess.Popen[bytes], timeout_seconds: float = 15) -> int:
    """Waits without blocking the loop (the fake provider answering the gateway runs on it)."""
    for _ in range(int(timeout_seconds / 0.05)):
        code = process.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway did not exit after SIGTERM")


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
