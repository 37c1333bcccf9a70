"""Console sessions with `server.workers: 2`: a real `gateway serve`, one session seen
by both worker processes, and a logout that ends it in both."""

from __future__ import annotations

import asyncio
import re
import signal

import aiohttp
import asyncpg

from tests.conftest import ADMIN_KEY, ConfigWriter, free_port
from tests.processes import serve, wait_healthy

PAGES = 30


async def fresh_get(url: str, session_id: str) -> tuple[int, str]:
    """A new connection each time, so the kernel spreads the requests over the workers."""
    async with (
        aiohttp.ClientSession() as client,
        client.get(url, headers={"Cookie": f"gw_console={session_id}"}, allow_redirects=False) as response,
    ):
        return response.status, response.headers.get("Location", "")


async def test_a_session_works_on_every_worker_and_logout_ends_it_on_every_worker(
    config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = "server: {workers: 2}\n"
    config_writer.write()
    port = free_port()
    process = serve(config_writer.directory, port)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(port, process)
        await asyncio.sleep(1.0)  # both workers up
        for _ in range(5):  # refused on whichever worker: the overview adds them up
            async with (
                aiohttp.ClientSession() as client,
                client.get(f"{url}/v1/models", headers={"Authorization": "Bearer gw-not-a-key"}) as response,
            ):
                assert response.status == 401
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.get(f"{url}/ui/login") as response:
                token = re.search(r'name="csrf_token" value="([^"]+)"', await response.text())[1]  # type: ignore[index]
            async with browser.post(
                f"{url}/ui/login",
                data={"csrf_token": token, "admin_key": ADMIN_KEY, "next": "/ui/"},
                allow_redirects=False,
            ) as response:
                assert response.status == 303
                cookie = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("gw_console="))
            session_id = cookie.split(";")[0].split("=", 1)[1]
            # 30 connections over two workers: each worker serves some of them (all on one
            # would happen once in 2^29 runs), and every one knows the session.
            for _ in range(PAGES):
                assert await fresh_get(f"{url}/ui/keys", session_id) == (200, "")
            for _ in range(4):
                async with (
                    aiohttp.ClientSession() as client,
                    client.get(f"{url}/ui/", headers={"Cookie": f"gw_console={session_id}"}) as response,
                ):
                    overview = await response.text()
                    assert response.status == 200
                assert re.search(r'<tr data-name="401">.*?data-value="5"', overview), overview
            async with browser.get(f"{url}/ui/") as response:
                csrf = re.search(r'name="csrf_token" value="([^"]+)"', await response.text())[1]  # type: ignore[index]
            async with browser.post(
                f"{url}/ui/logout", data={"csrf_token": csrf}, allow_redirects=False
            ) as response:
                assert response.status == 303
            for _ in range(PAGES):
                assert await fresh_get(f"{url}/ui/keys", session_id) == (303, "/ui/login?next=/ui/keys")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0
