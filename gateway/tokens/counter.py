"""Counting prompts on the request path: cached per message, large ones in a thread."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from gateway.tokens.anthropic import count_anthropic_messages
from gateway.tokens.calibration import Calibration
from gateway.tokens.chat import MessageCounter, count_chat, count_responses
from gateway.tokens.counts import PromptCount, RawCount
from gateway.tokens.prompts import count_prompt_input
from gateway.tokens.registry import ModelProfile, TokenizerRegistry

ROUTES = ("chat", "completions", "embeddings", "messages", "responses")
# Why a count of an exactly counted model is an estimate all the same.
PART_WITHOUT_RULE = (
    "part of the request has no published counting rule (e.g. tool calls, remote images), "
    "or a run too long to encode whole was cut"
)
# Made once: json.dumps with options builds an encoder on every call.
_SORTED = json.JSONEncoder(sort_keys=True, ensure_ascii=False)


class MessageCache:
    """LRU of message counts keyed by model and a hash of the message.

    A conversation resends its whole history each turn; with the cache each turn
    costs only the encoding of its new messages (hashing is far cheaper than BPE).
    """

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, bytes], RawCount] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_count(self, model: str, message: Mapping[str, Any], count: MessageCounter) -> RawCount:
        if self._max_entries == 0:
            return count(message)
        key = (model, hashlib.blake2b(_message_bytes(message), digest_size=16).digest())
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
        result = count(message)
        with self._lock:
            self.misses += 1
            self._entries[key] = result
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return result


def _message_bytes(message: Mapping[str, Any]) -> bytes:
    """What identifies a message for the cache.

    The common text message is taken as is: serialising it (sorted, as JSON) cost more
    than hashing it. Its leading 0x01 can never start JSON, so the forms cannot collide,
    and the role's length ends where the role does.
    """
    role, content = message.get("role"), message.get("content")
    if len(message) == 2 and isinstance(role, str) and isinstance(content, str):
        role_bytes = role.encode()
        return b"\x01%d:%b%b" % (len(role_bytes), role_bytes, content.encode())
    return _SORTED.encode(message).encode()


class PromptCounter:
    def __init__(self, registry: TokenizerRegistry, calibration: Calibration) -> None:
        self.registry = registry
        self.calibration = calibration
        config = registry.config
        self._threshold = config.thread_threshold_bytes
        self._remote_image = (config.remote_image_width, config.remote_image_height)
        self.cache = MessageCache(config.cache_entries)

    async def count(
        self, route: str, body: Mapping[str, Any], profile: ModelProfile, body_bytes: int
    ) -> PromptCount:
        """Count a validated body; large bodies go to a thread (tiktoken releases the GIL)."""
        if body_bytes > self._threshold:
            raw = await asyncio.to_thread(self.count_raw, route, body, profile)
        else:
            raw = self.count_raw(route, body, profile)
        return self.finish(raw, profile, route)

    def count_raw(self, route: str, body: Mapping[str, Any], profile: ModelProfile) -> RawCount:
        if route == "chat":
            return count_chat(body, profile, self._remote_image, self._cached(profile))
        if route == "completions":
            return count_prompt_input(body.get("prompt"), profile, "prompt").count
        if route == "embeddings":
            return count_prompt_input(body.get("input"), profile, "input").count
        if route == "messages":
            return count_anthropic_messages(body, profile, self._remote_image)
        if route == "responses":
            return count_responses(body, profile, self._remote_image)
        raise ValueError(f"unknown route {route!r}")

    def _cached(self, profile: ModelProfile) -> Callable[[Mapping[str, Any], MessageCounter], RawCount]:
        def cached(message: Mapping[str, Any], count: MessageCounter) -> RawCount:
            return self.cache.get_or_count(profile.model, message, count)

        return cached

    def finish(self, raw: RawCount, profile: ModelProfile, route: str) -> PromptCount:
        exact = raw.exact and profile.exact
        factor = 1.0 if exact else self.calibration.factor(profile)
        return PromptCount(
            tokens=math.ceil(raw.tokens * factor),
            raw_tokens=raw.tokens,
            exact=exact,
            tokenizer=profile.tokenizer.name,
            factor=factor,
            method=f"{route} ({profile.chat_format} format) with {profile.tokenizer.name}",
            reason=_reason(exact, profile, factor),
        )


def _reason(exact: bool, profile: ModelProfile, factor: float) -> str:
    """Why a count is exact or an estimate, for people: e.g. "estimate: Claude's tokenizer
    is not public; o200k_base x 1.15"."""
    if exact:
        return f"exact: {profile.reason}"
    why = profile.reason if not profile.exact else PART_WITHOUT_RULE
    scaled = "" if factor == 1.0 else f" x {factor:g}"
    return f"estimate: {why}; {profile.tokenizer.name}{scaled}"
