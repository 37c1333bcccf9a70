"""The connection guards on raw sockets: the header deadline, the header size bound and
the per-address limit, each with exact counts.

The gateway is the shipped gateway.yaml (embedded stores, mock provider) with a server
block of the test's own, served in-process through gateway.connections as `gateway
serve` serves it, and once as a real `gateway serve` process (uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from gateway import connections
from gateway.app import create_app
from gateway.config import ServerConfig, load_config
from gateway.connections import ConnectionGuards, GuardCounts, GuardedSite
from tests.conftest import free_port
from tests.processes import wait_healthy

REPO = Path(__file__).resolve().parents[1]
DEMO_KEY = "gw-demo-key-change-me"
HEALTH = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"
# Far longer than any deadline here, one byte every 0.2 s: only the server ends it.
TRICKLED = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + b"k" * 200
CLOSED = None  # what status_of returns for a connection the server closed


def write_gateway(directory: Path, server: str) -> Path:
    """The shipped gateway.yaml and policies, with `server` (YAML) added to its server block."""
    shutil.copytree(REPO / "policies", directory / "policies")
    shipped = (REPO / "gateway.yaml").read_text()
    block = "  host: 127.0.0.1\n  port: 0\n" + textwrap.indent(textwrap.dedent(server), "  ")
    config = shipped.replace("  host: ${GATEWAY_HOST:-127.0.0.1}\n  port: ${GATEWAY_PORT:-8080}\n", block)
    assert config != shipped
    (directory / "gateway.yaml").write_text(config)
    return directory / "gateway.yaml"


@contextlib.asynccontextmanager
async def listening(directory: Path, server: str) -> AsyncIterator[GuardedSite]:
    config = load_config(write_gateway(directory, server))
    runner, site = await connections.start(create_app(config), config.server, "127.0.0.1", 0)
    try:
        yield site
    finally:
        await runner.cleanup()


def request_of(size: int, path: bytes = b"/health") -> bytes:
    """A GET whose request line and headers, blank line included, take exactly `size` bytes."""
    head = b"GET " + path + b" HTTP/1.1\r\nHost: gateway\r\nX-Padding: "
    return head + b"p" * (size - len(head) - 4) + b"\r\n\r\n"


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """The status and body of one response; None when the server closed instead."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split(" ")[1]), body


async def status_of(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int | None:
    try:
        writer.write(request)
        await writer.drain()
    except ConnectionError:
        return CLOSED
    answer = await read_answer(reader)
    return CLOSED if answer is None else answer[0]


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sends before it closes (b'' for nothing)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=10)
    except ConnectionResetError:
        return b""


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    for index in range(len(data)):
        writer.write(data[index : index + 1])
        await asyncio.sleep(0.2)


async def trickled_connection(port: int) -> tuple[bytes, float]:
    """Trickles TRICKLED on a new connection: what came back, and when the server closed it."""
    loop = asyncio.get_running_loop()
    # Timed from before connecting: the server's deadline runs from its accept, and on a
    # busy loop this coroutine may resume well after that.
    opened = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    feeding = asyncio.create_task(trickle(writer, TRICKLED))
    received = await until_closed(reader)
    closed_after = loop.time() - opened
    feeding.cancel()
    writer.close()
    return received, closed_after


async def test_trickled_headers_are_closed_at_the_deadline_while_others_are_served(tmp_path: Path) -> None:
    async with listening(tmp_path, "header_timeout_seconds: 1\n") as site:
        trickled = [asyncio.create_task(trickled_connection(site.port)) for _ in range(50)]
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{site.port}") as session:
            async with session.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {DEMO_KEY}"},
                json={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                },
            ) as response:
                assert response.status == 200
                assert (await response.json())["choices"][0]["message"]["content"] == "This is a mock"
        results = await asyncio.gather(*trickled)
        counts = site.guards.counts
    assert [received for received, _ in results] == [b""] * 50
    closed_after = sorted(seconds for _, seconds in results)
    print(f"50 trickled connections closed after {closed_after[0]:.3f} to {closed_after[-1]:.3f} s")
    assert closed_after[0] >= 0.95 and closed_after[-1] <= 1.5
    assert counts == GuardCounts(header_timeouts=50)


async def test_a_kept_alive_connection_idles_freely_but_its_next_headers_have_the_deadline(
    tmp_path: Path,
) -> None:
    async with listening(tmp_path, "header_timeout_seconds: 0.5\n") as site:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        assert await status_of(reader, writer, HEALTH) == 200
        # Idle longer than the header deadline: waiting for a request is keep-alive's time.
        await asyncio.sleep(0.7)
        # Headers in three parts, complete within the deadline: served, and the deadline
        # armed by the first part is cancelled by the last.
        for part in (HEALTH[:10], HEALTH[10:20]):
            writer.write(part)
            await asyncio.sleep(0.15)
        assert await status_of(reader, writer, HEALTH[20:]) == 200
        await asyncio.sleep(0.7)
        assert await status_of(reader, writer, HEALTH) == 200
        started = loop.time()
        feeding = asyncio.create_task(trickle(writer, TRICKLED))
        assert await until_closed(reader) == b""
        closed_after = loop.time() - started
        feeding.cancel()
        writer.close()
        counts = site.guards.counts
    print(f"the kept-alive connection's trickled request closed {closed_after:.3f} s after its first byte")
    assert 0.45 <= closed_after <= 0.75
    assert counts == GuardCounts(header_timeouts=1)


async def test_headers_past_max_header_bytes_are_answered_431(tmp_path: Path) -> None:
    async with listening(tmp_path, "max_header_bytes: 1024\n") as site:

        async def answer_to(*parts: bytes) -> tuple[int | None, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.01)
            answer = await read_answer(reader)
            writer.close()
            if answer is None:
                return CLOSED, b""
            if answer[0] == 431:
                assert await until_closed(reader) == b""  # and the server closes
            return answer

        exact, over = request_of(1024), request_of(1025)
        assert len(exact) == 1024 and len(over) == 1025
        assert (await answer_to(exact))[0] == 200
        status, body = await answer_to(over)
        assert status == 431
        assert json.loads(body)["error"] == {
            "message": "The request line and headers exceed 1024 bytes.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
        # The same bytes in 100-byte pieces: the bound holds across reads.
        pieces = [over[start : start + 100] for start in range(0, len(over), 100)]
        assert (await answer_to(*pieces))[0] == 431
        # Empty lines before a request line are skipped by the parser and not counted,
        # but they cannot hide headers behind an early blank line either.
        assert (await answer_to(b"\r\n" * 50 + exact))[0] == 200
        assert (await answer_to(b"\r\n\r\n", over))[0] == 431
        # A kept-alive connection's next request has the same bound.
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        assert await status_of(reader, writer, exact) == 200
        assert await status_of(reader, writer, over) == 431
        writer.close()
        counts = site.guards.counts
    assert counts == GuardCounts(headers_too_large=4)


async def test_a_line_past_aiohttps_limit_is_its_400_not_a_500(tmp_path: Path) -> None:
    """With the default 32 KiB in all, one header line may still take 8190 bytes, no more."""
    async with listening(tmp_path, "") as site:
        for value_bytes, status in (
            (connections.MAX_LINE_BYTES + 1, 400),
            (connections.MAX_LINE_BYTES - 100, 200),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            request = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Long: " + b"l" * value_bytes + b"\r\n\r\n"
            assert await status_of(reader, writer, request) == status
            writer.close()
        assert site.guards.counts == GuardCounts()


async def test_connections_per_address_are_limited_and_freed(tmp_path: Path) -> None:
    server = "max_connections_per_address: 5\ntrusted_proxies: [127.0.0.3]\n"
    async with listening(tmp_path, server) as site:

        async def connect(local: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", site.port, local_addr=(local, 0))

        first = [await connect() for _ in range(10)]
        assert [await status_of(r, w, HEALTH) for r, w in first] == [200] * 5 + [CLOSED] * 5
        assert site.guards.open_by_address == {"127.0.0.1": 5}
        # Another address is not affected.
        other = await connect("127.0.0.2")
        assert await status_of(*other, HEALTH) == 200
        # A trusted proxy carries many clients: not limited, not counted.
        proxied = [await connect("127.0.0.3") for _ in range(7)]
        assert [await status_of(r, w, HEALTH) for r, w in proxied] == [200] * 7
        assert site.guards.open_by_address == {"127.0.0.1": 5, "127.0.0.2": 1}
        # Two of 127.0.0.1's connections close: two new ones are taken, the next is not.
        for _, writer in first[:2]:
            writer.close()
            await writer.wait_closed()
        for _ in range(100):
            if site.guards.open_by_address["127.0.0.1"] == 3:
                break
            await asyncio.sleep(0.01)
        again = [await connect() for _ in range(3)]
        assert [await status_of(r, w, HEALTH) for r, w in again] == [200, 200, CLOSED]
        assert site.guards.open_by_address == {"127.0.0.1": 5, "127.0.0.2": 1}
        counts = site.guards.counts
        for _, writer in [*first, other, *proxied, *again]:
            writer.close()
    assert counts == GuardCounts(refused=6)


def test_addresses_counted_together() -> None:
    guards = ConnectionGuards.of(ServerConfig(max_connections_per_address=3))
    assert guards.address_of(("192.0.2.7", 5000)) == "192.0.2.7"
    assert guards.address_of(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    # An IPv6 subscriber holds a /64: its addresses count together.
    assert guards.address_of(("2001:db8:1:2::1", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert guards.address_of(("2001:db8:1:2:ffff::9", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert guards.address_of("/run/gateway.sock") is None  # a Unix socket
    proxies = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    proxied = ConnectionGuards.of(ServerConfig(max_connections_per_address=3, trusted_proxies=proxies))
    assert proxied.address_of(("10.1.2.3", 5000)) is None
    assert proxied.address_of(("::ffff:10.1.2.3", 5000, 0, 0)) is None
    assert proxied.address_of(("2001:db8:5::1", 5000, 0, 0)) is None
    assert proxied.address_of(("192.0.2.7", 5000)) == "192.0.2.7"
    unlimited = ConnectionGuards.of(ServerConfig(max_connections_per_address=0))
    assert unlimited.address_of(("192.0.2.7", 5000)) is None


async def test_gateway_serve_applies_the_guards(tmp_path: Path) -> None:
    """The real command, on uvloop: a trickle closed, a third connection refused, 431."""
    write_gateway(
        tmp_path, "header_timeout_seconds: 1\nmax_header_bytes: 1024\nmax_connections_per_address: 2\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml", "--port", str(port)],
        cwd=tmp_path,
        stderr=(tmp_path / "gateway.log").open("w"),
        env=os.environ.copy(),
    )
    try:
        await wait_healthy(port, process)
        received, closed_after = await trickled_connection(port)
        assert received == b"" and 0.95 <= closed_after <= 1.5
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        assert [await status_of(r, w, HEALTH) for r, w in held] == [200, 200, CLOSED]
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await status_of(reader, writer, request_of(1025)) == 431
        writer.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    log = (tmp_path / "gateway.log").read_text()
    assert process.returncode == 0, log
    assert "Traceback" not in log
