"""Soak: a gateway process under steady load for a while; memory, descriptors, threads, tasks.

Run: ./scripts/bench soak [SECONDS]   (default 600; not part of the tests)
The gateway runs the shipped embedded config (mock provider) in its own process, with
steady load from this one; every 30 s the gateway's RSS, open file descriptors and
threads are sampled from /proc, and its asyncio task count from /metrics
(`gateway_event_loop_tasks`). Flat lines are the goal.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.http.processes import free_port

REPO = Path(__file__).resolve().parents[1]
KEY = "gw-demo-key-change-me"


def sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"].strip()),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


async def main(seconds: float) -> None:
    folder = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    shutil.copy(REPO / "gateway.yaml", folder / "gateway.yaml")
    shutil.copytree(REPO / "policies", folder / "policies")
    (folder / "policies" / "default.yaml").write_text(
        "policies:\n  - {name: roomy, scope: user, limits: [{requests: 100000000, per: minute}]}\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml", "--port", str(port)],
        cwd=folder,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    samples: list[dict[str, float]] = []
    sent = 0
    try:
        await asyncio.sleep(3)
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:

            async def client(stream: bool) -> None:
                nonlocal sent
                while time.monotonic() - started < seconds:
                    async with session.post(
                        url, json={**body, "stream": stream}, headers={"Authorization": f"Bearer {KEY}"}
                    ) as response:
                        await response.read()
                        sent += 1
                    await asyncio.sleep(0.002)

            async def tasks() -> int:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    text = await response.text()
                line = next(x for x in text.splitlines() if x.startswith("gateway_event_loop_tasks "))
                return int(float(line.split()[1]))

            async def take_sample() -> None:
                samples.append(
                    {
                        "t": round(time.monotonic() - started),
                        "requests": sent,
                        **sample(process.pid),
                        "tasks": await tasks(),
                    }
                )
                print(json.dumps(samples[-1]), flush=True)

            async def sampler() -> None:
                while time.monotonic() - started < seconds:
                    await take_sample()
                    await asyncio.sleep(30)

            await asyncio.gather(sampler(), *(client(i % 2 == 0) for i in range(8)))
            await take_sample()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
    first, settled, last = samples[0], samples[min(2, len(samples) - 1)], samples[-1]
    print(
        f"\n{sent:,} requests in {last['t']} s ({sent / max(last['t'], 1):,.0f}/s); "
        f"RSS {first['rss_kb'] / 1024:.1f} MB at start, {settled['rss_kb'] / 1024:.1f} MB after a minute, "
        f"{last['rss_kb'] / 1024:.1f} MB at the end; fds {first['fds']} → {last['fds']}; "
        f"threads {first['threads']} → {last['threads']}; "
        f"asyncio tasks {min(x['tasks'] for x in samples)} to {max(x['tasks'] for x in samples)}"
    )


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 600.0))
