"""What the load is made of: prompts, request bodies, bench keys and the scenarios.

Prompts are generated deterministically and trimmed until OpenAI's chat rule in
o200k_base (the tokenizer of the upstream model, gpt-4o-mini) gives exactly the
intended count, so the gateway's pre-flight count, the canned upstream's reported
usage and the ledger all agree.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import cache
from typing import Any

import tiktoken

ENCODING = "o200k_base"
UPSTREAM_MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
# OpenAI's chat rule for one user message: 3 per message + "user" (1) + 3 priming the reply.
CHAT_OVERHEAD_TOKENS = 7
# Prompt sizes by name: prompt tokens as the gateway counts them.
PROMPT_SIZES = {"200": 200, "8k": 8000}
CONNECTIONS = (1, 32)
KEY_COUNT = 8
COMPLETION_TEXT = "This is a canned answer from the benchmark upstream."

_WORDS = (
    "gateway token budget request stream model quota ledger latency window policy answer "
    "question summary report table figure engine server client record measure steady river "
    "mountain harbor lantern copper garden winter silver orange market signal kernel thread "
    "bridge castle meadow pencil rocket violin planet forest coffee bottle ticket camera "
    "the of and to in is that for on with as by at from it an be this which or are was"
).split()


@dataclass(frozen=True)
class Scenario:
    mode: str  # "plain" (one JSON answer) or "stream" (Server-Sent Events)
    size: str  # a key of PROMPT_SIZES
    connections: int

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.size}-c{self.connections}"

    @property
    def stream(self) -> bool:
        return self.mode == "stream"

    @property
    def model(self) -> str:
        """The gateway's model name; each routes to its own canned upstream location."""
        return f"bench-{self.mode}-{self.size}"

    @property
    def upstream_path(self) -> str:
        """The nginx location (and the floor's path) of this scenario's canned answer."""
        return f"/{self.mode}/{self.size}/v1"


def scenarios(sizes: tuple[str, ...] = tuple(PROMPT_SIZES)) -> list[Scenario]:
    return [
        Scenario(mode, size, connections)
        for mode in ("plain", "stream")
        for size in sizes
        for connections in CONNECTIONS
    ]


@dataclass(frozen=True)
class BenchKey:
    key: str
    key_id: str
    user: str
    team: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()


def bench_keys() -> list[BenchKey]:
    """8 keys across 4 users and 2 teams, so user and team counters are shared by several keys."""
    return [
        BenchKey(
            f"gw-bench-key-{index}",
            f"bench-key-{index}",
            f"bench-user-{index % 4}",
            f"bench-team-{index % 2}",
        )
        for index in range(KEY_COUNT)
    ]


@cache
def _encoding() -> Any:
    return tiktoken.get_encoding(ENCODING)


def count_text(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


@cache
def prompt_text(prompt_tokens: int) -> str:
    """A message content whose chat prompt counts exactly `prompt_tokens` in o200k_base."""
    target = prompt_tokens - CHAT_OVERHEAD_TOKENS
    chooser = random.Random(prompt_tokens)
    words: list[str] = []
    # Words tokenize independently enough that a running estimate keeps this linear.
    while count_text(" ".join(words)) < target:
        words.extend(
            chooser.choice(_WORDS) for _ in range(max(1, (target - count_text(" ".join(words))) // 2))
        )
    while count_text(" ".join(words)) > target:
        words.pop()
    while count_text(" ".join(words)) < target:
        words.append("the")
    text = " ".join(words)
    if count_text(text) != target:
        raise AssertionError(f"could not build a prompt of exactly {prompt_tokens} tokens")
    return text


def request_body(scenario: Scenario) -> bytes:
    body = {
        "model": scenario.model,
        "messages": [{"role": "user", "content": prompt_text(PROMPT_SIZES[scenario.size])}],
        "max_tokens": MAX_TOKENS,
        "stream": scenario.stream,
    }
    return json.dumps(body).encode()


def usage(size: str) -> dict[str, int]:
    prompt_tokens = PROMPT_SIZES[size]
    completion_tokens = count_text(COMPLETION_TEXT)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def canned_completion(size: str) -> str:
    """The non-streamed answer: one chat.completion object with its usage."""
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": COMPLETION_TEXT},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage(size),
        },
        separators=(",", ":"),
    )


def canned_stream(size: str) -> str:
    """The streamed answer: a role chunk, one chunk per word, a finish chunk, a usage chunk, [DONE]."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        event = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"

    pieces = COMPLETION_TEXT.split(" ")
    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    for position, piece in enumerate(pieces):
        text = piece if position == 0 else f" {piece}"
        events.append(chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}]))
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    events.append(chunk([], usage=usage(size)))
    events.append("data: [DONE]\n\n")
    return "".join(events)
