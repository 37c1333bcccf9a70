"""Pre-flight counting speed: tokens per second, time per request, and the message cache;
with --worst, the costliest bodies within server.max_body_bytes.

Run: ./scripts/bench tokens [--worst [--before]]   (or .venv/bin/python -m bench.tokens)
Figures are ratios and rates measured side by side in one run; machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from gateway.config import ServerConfig, TokensConfig
from gateway.metrics import Metrics
from gateway.tokens import Calibration, PromptCounter, TokenizerRegistry
from gateway.tokens.chat import count_chat
from gateway.tokens.runs import MAX_RUN_CHARS, forced_cuts

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
    parser = argparse.ArgumentParser(prog="bench.tokens")
    parser.add_argument("--worst", action="store_true", help="time the costliest bodies instead")
    parser.add_argument("--before", action="store_true", help="with --worst: also encode each text whole")
    options = parser.parse_args()
    if options.worst:
        worst_bodies(options.before)
        return
    config = TokensConfig()
    registry = TokenizerRegistry(config)
    profile = registry.profile("gpt-4o")
    # "whole": one encode_ordinary call per text, as before texts were cut into runs.
    print("prompt size   median per request   tokens/s       whole text    runs / whole")
    for size in (200, 8_000, 100_000):
        text = text_of(size, registry)
        body = {"messages": [{"role": "user", "content": text}]}
        tokens = count_chat(body, profile, (1024, 1024)).tokens
        repeats = 200 if size <= 8_000 else 20
        encode = profile.tokenizer.encoding.encode_ordinary
        # Interleaved, so that both see the same machine.
        runs: list[float] = []
        whole: list[float] = []
        for _ in range(repeats):
            runs.extend(timed(functools.partial(profile.tokenizer.count, text), 1))
            whole.extend(timed(functools.partial(encode, text), 1))
        median = statistics.median(timed(functools.partial(count_chat, body, profile, (1024, 1024)), repeats))
        ratio = statistics.median(runs) / statistics.median(whole)
        print(
            f"{tokens:>11,}   {median * 1e3:>14.3f} ms   {tokens / median:>12,.0f}"
            f"   {statistics.median(whole) * 1e3:>10.3f} ms   {ratio:>10.3f}"
        )

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


# The costliest shapes we know for tiktoken, and prose for scale. Each is repeated (or
# drawn at random) to fill one chat message of a body of exactly max_body_bytes.
SHAPES: dict[str, Callable[[int], str]] = {
    "one letter (a)": lambda n: "a" * n,
    "one capital (A)": lambda n: "A" * n,
    "spaces": lambda n: " " * n,
    "line breaks": lambda n: "\n" * n,
    "punctuation (!)": lambda n: "!" * n,
    "'/' and line breaks": lambda n: "!" + "/\n" * n,
    "digits": lambda n: "1234567890" * (n // 10 + 1),
    "base64": lambda n: base64.b64encode(random.Random(1).randbytes(n)).decode(),
    "one CJK character": lambda n: "日" * n,
    "CJK, random": lambda n: "".join(chr(c) for c in random.Random(2).choices(range(0x4E00, 0xA000), k=n)),
    "emoji": lambda n: "🙂" * n,
    "combining accents": lambda n: "a\u0301" * n,
    "prose": lambda n: " ".join(WORDS * (n // 50 + 1)),
}


def filling(shape: Callable[[int], str], model: str, body_bytes: int) -> tuple[dict[str, Any], int]:
    """The body whose one message the shape fills up to body_bytes of JSON, and its size."""
    empty = {"model": model, "messages": [{"role": "user", "content": ""}]}
    room = body_bytes - len(json.dumps(empty, ensure_ascii=False).encode())
    text = shape(room)
    # Cut to fit: JSON escapes some characters (a line break takes 2 bytes).
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if len(json.dumps(text[:middle], ensure_ascii=False).encode()) - 2 <= room:
            low = middle
        else:
            high = middle - 1
    body = {"model": model, "messages": [{"role": "user", "content": text[:low]}]}
    return body, len(json.dumps(body, ensure_ascii=False).encode())


# Bodies of many small parts, each its own call into the counting rules (and tiktoken),
# and parts counted as JSON with non-ASCII escaped (six characters or twelve for one).
# route, model, and the body of n parts.
MANY: dict[str, tuple[str, str, Callable[[int], dict[str, Any]]]] = {
    "distinct messages": ("chat", "gpt-4o", lambda n: {"messages": [_user(str(i)) for i in range(n)]}),
    "messages with names": (
        "chat",
        "gpt-4o",
        lambda n: {"messages": [{**_user("a"), "name": str(i)} for i in range(n)]},
    ),
    "audio parts": (
        "chat",
        "gpt-4o",
        lambda n: {"messages": [_user([{"type": "input_audio", "input_audio": {"data": "a"}}] * n)]},
    ),
    "enum items": ("chat", "gpt-4o", lambda n: {"messages": [_user("a")], "tools": [_enum(list(range(n)))]}),
    "prompts": ("completions", "gpt-4o", lambda n: {"prompt": [str(i) for i in range(n)]}),
    "responses items": ("responses", "gpt-4o", lambda n: {"input": [_user(str(i)) for i in range(n)]}),
    "llama 3 messages": ("chat", "llama-3.1-8b", lambda n: {"messages": [_user(str(i)) for i in range(n)]}),
    "json schema of emoji": (
        "chat",
        "gpt-4o",
        lambda n: {
            "messages": [_user("a")],
            "response_format": {"type": "json_schema", "json_schema": "🙂" * n},
        },
    ),
    "claude tool input, emoji": (
        "messages",
        "claude-sonnet-4-5",
        lambda n: {"messages": [_user([{"type": "tool_use", "id": "t", "name": "t", "input": "🙂" * n}])]},
    ),
}


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _enum(items: list[Any]) -> dict[str, Any]:
    properties = {"p": {"type": "string", "enum": items}}
    return {"type": "function", "function": {"name": "f", "parameters": {"properties": properties}}}


def most_parts(make: Callable[[int], dict[str, Any]], body_bytes: int) -> tuple[dict[str, Any], int]:
    """The body of the most parts that fits in body_bytes, as parsed from JSON, and its size."""
    low, high = 1, body_bytes
    while low < high:
        middle = (low + high + 1) // 2
        if len(json.dumps(make(middle), ensure_ascii=False).encode()) <= body_bytes:
            low = middle
        else:
            high = middle - 1
    text = json.dumps(make(low), ensure_ascii=False)
    return json.loads(text), len(text.encode())


def worst_bodies(before: bool) -> None:
    body_bytes = ServerConfig().max_body_bytes
    config = TokensConfig()
    counter = PromptCounter(TokenizerRegistry(config), Calibration(config, Metrics()))
    print(f"bodies of {body_bytes:,} bytes (server.max_body_bytes), runs cut at {MAX_RUN_CHARS} characters")
    print("CPU time of the counting thread; µs/KB: microseconds per 1,000 bytes of body;")
    print("tokens: the message's text, without the chat format's")
    header = f"{'model':<7} {'shape':<21} {'characters':>10} {'counted':>9} {'µs/KB':>6} {'tokens':>9}"
    header += " exact cuts"
    print(header + (" | whole text  µs/KB    tokens" if before else ""))
    slowest, slowest_whole = 0.0, 0.0
    for model in ("gpt-4o", "gpt-4"):
        profile = counter.registry.profile(model)
        for name, shape in SHAPES.items():
            body, size = filling(shape, model, body_bytes)
            content: str = body["messages"][0]["content"]
            empty = {"messages": [{"role": "user", "content": ""}]}
            started = time.thread_time()
            counted = counter.count_raw("chat", body, profile)
            seconds = time.thread_time() - started
            slowest = max(slowest, seconds / size)
            tokens = counted.tokens - counter.count_raw("chat", empty, profile).tokens
            line = (
                f"{model:<7} {name:<21} {len(content):>10,} {seconds:>7.2f} s {seconds / size * 1e9:>6.0f}"
                f" {tokens:>9,} {counted.exact!s:<5} {len(forced_cuts(content)):>4}"
            )
            if before:
                whole, whole_seconds = _whole(profile.tokenizer.encoding.encode_ordinary, content, size)
                slowest_whole = max(slowest_whole, whole_seconds / size)
                line += " | " + whole
            print(line, flush=True)
    print(f"\n{'route':<11} {'many':<25} {'parts':>9} {'counted':>9} {'µs/KB':>6} {'tokens':>11} exact")
    for name, (route, model, make) in MANY.items():
        body, size = most_parts(make, body_bytes)
        profile = counter.registry.profile(model)
        started = time.thread_time()
        counted = counter.count_raw(route, body, profile)
        seconds = time.thread_time() - started
        slowest = max(slowest, seconds / size)
        parts = _parts(body)
        print(
            f"{route:<11} {name:<25} {parts:>9,} {seconds:>7.2f} s {seconds / size * 1e9:>6.0f}"
            f" {counted.tokens:>11,} {counted.exact}",
            flush=True,
        )
    print(
        f"\nceiling on this machine: {slowest * 1e9:.0f} µs per KB of body, "
        f"{slowest * body_bytes:.1f} s for a body of {body_bytes:,} bytes"
    )
    if before:
        print(
            f"encoded whole (as before): {slowest_whole * 1e9:.0f} µs per KB, "
            f"{slowest_whole * body_bytes:.1f} s for {body_bytes:,} bytes, and no bound in general"
        )


def _parts(body: dict[str, Any]) -> int:
    """How many things the body repeats: its longest list, or its longest text."""
    longest = 0
    for value in body.values():
        if isinstance(value, list):
            longest = max(longest, len(value), *(_parts(item) for item in value if isinstance(item, dict)))
        elif isinstance(value, dict):
            longest = max(longest, _parts(value))
        elif isinstance(value, str):
            longest = max(longest, len(value))
    return longest


def _whole(encode: Callable[[str], list[int]], text: str, size: int) -> tuple[str, float]:
    """How the text fares encoded whole, as every text was before runs were cut."""
    started = time.thread_time()
    try:
        tokens = f"{len(encode(text)):>9,}"
    except BaseException as exc:  # tiktoken's Rust panics are BaseExceptions
        tokens = f"{type(exc).__name__}"
    seconds = time.thread_time() - started
    return f"{seconds:>8.2f} s {seconds / size * 1e9:>6.0f} {tokens}", seconds


if __name__ == "__main__":
    main()
