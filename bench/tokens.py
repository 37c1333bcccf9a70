"""Pre-flight counting speed: tokens per second, time per request, and the message cache.

Run: ./scripts/bench tokens   (or .venv/bin/python -m bench.tokens)
Figures are ratios and rates measured side by side in one run; machines are noisy.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from gateway.config import TokensConfig
from gateway.metrics import Metrics
from gateway.tokens import Calibration, PromptCounter, TokenizerRegistry
from gateway.tokens.chat import count_chat

WORDS = (
    "the quick brown fox jumps over the lazy dog while 日本語 text and emoji 🙂 appear now and then".split()
)


def text_of(tokens: int, registry: TokenizerRegistry) -> str:
    """A prompt of about `tokens` tokens in o200k_base."""
    encoding = registry.tokenizer("o200k_base")
    words: list[str] = []
    while encoding.count(" ".join(words)) < tokens:
        words.extend(WORDS * max(1, (tokens - encoding.count(" ".join(words))) // 20))
    return " ".join(words)


def timed(work: Callable[[], Any], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    return samples


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a patient tutor who explains physics. " * 10}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: why is the sky blue at noon? " * 8})
        messages.append(
            {"role": "assistant", "content": f"Answer {turn}: Rayleigh scattering of light. " * 12}
        )
    return messages


def main() -> None:
    config = TokensConfig()
    registry = TokenizerRegistry(config)
    profile = registry.profile("gpt-4o")
    print("prompt size   median per request   tokens/s")
    for size in (200, 8_000, 100_000):
        body = {"messages": [{"role": "user", "content": text_of(size, registry)}]}
        tokens = count_chat(body, profile, (1024, 1024)).tokens
        repeats = 200 if size <= 8_000 else 10
        median = statistics.median(timed(lambda body=body: count_chat(body, profile, (1024, 1024)), repeats))
        print(f"{tokens:>11,}   {median * 1e3:>14.3f} ms   {tokens / median:>12,.0f}")

    # A 50-turn conversation resent whole on every turn, as chat clients do.
    def run_turns(counter: PromptCounter) -> float:
        started = time.perf_counter()
        for turns in range(1, 51):
            counter.count_raw("chat", {"messages": conversation(turns)}, profile)
        return time.perf_counter() - started

    uncached = PromptCounter(TokenizerRegistry(TokensConfig(cache_entries=0)), Calibration(config, Metrics()))
    cached = PromptCounter(TokenizerRegistry(config), Calibration(config, Metrics()))
    without = statistics.median(run_turns(uncached) for _ in range(3))
    with_cache = statistics.median(
        run_turns(PromptCounter(TokenizerRegistry(config), Calibration(config, Metrics()))) for _ in range(3)
    )
    run_turns(cached)
    print(f"\n50 turns, all counted: {without * 1e3:.1f} ms uncached, {with_cache * 1e3:.1f} ms cached")
    hits, misses = cached.cache.hits, cached.cache.misses
    print(f"cache saving: {without / with_cache:.1f}x less time ({hits} hits, {misses} misses)")

    # What the event loop sees: a 100k-token body counted inline vs in a worker thread.
    big = {"messages": [{"role": "user", "content": text_of(100_000, registry)}]}
    inline = PromptCounter(
        TokenizerRegistry(TokensConfig(thread_threshold_bytes=10**12)), Calibration(config, Metrics())
    )
    threaded = PromptCounter(
        TokenizerRegistry(TokensConfig(thread_threshold_bytes=0)), Calibration(config, Metrics())
    )

    async def longest_loop_stall(counter: PromptCounter) -> float:
        stalls: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                stalls.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        await counter.count("chat", big, counter.registry.profile("gpt-4o"), 10**6)
        await asyncio.sleep(0.01)
        task.cancel()
        return max(stalls)

    inline_stall = asyncio.run(longest_loop_stall(inline))
    thread_stall = asyncio.run(longest_loop_stall(threaded))
    print(
        f"\nlongest event-loop stall counting 100k tokens: inline {inline_stall * 1e3:.1f} ms, "
        f"in a thread {thread_stall * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
