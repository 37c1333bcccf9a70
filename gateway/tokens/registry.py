"""Model name → tokenizer, loaded once per encoding and shared by every request."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import tiktoken

# OpenAI publishes which encoding each family uses; counts for these are exact.
_EXACT_FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4|gpt-oss)"), "o200k_base"),
    (re.compile(r"^(gpt-4|gpt-3\.5|text-embedding-3|text-embedding-ada-002)"), "cl100k_base"),
)
FALLBACK_ENCODING = "o200k_base"


@dataclass(frozen=True)
class Tokenizer:
    """An encoding and whether counts made with it equal what the provider bills."""

    encoding_name: str
    exact: bool

    @property
    def encoding(self) -> Any:
        return _load_encoding(self.encoding_name)

    def count(self, text: str) -> int:
        # Special-token strings in user text are billed as plain text.
        return len(self.encoding.encode_ordinary(text))


@cache
def _load_encoding(name: str) -> Any:
    return tiktoken.get_encoding(name)


class TokenizerRegistry:
    """Chooses the tokenizer for an upstream model name."""

    def for_model(self, upstream_model: str, configured_encoding: str | None = None) -> Tokenizer:
        for pattern, encoding_name in _EXACT_FAMILIES:
            if pattern.match(upstream_model):
                return Tokenizer(configured_encoding or encoding_name, exact=True)
        return Tokenizer(configured_encoding or FALLBACK_ENCODING, exact=False)

    @staticmethod
    def known_encoding(name: str) -> bool:
        return name in tiktoken.list_encoding_names()

    def self_test(self, encoding_name: str) -> bool:
        """True when the encoding loads and round-trips a known string."""
        tokenizer = Tokenizer(encoding_name, exact=True)
        sample = "hello world"
        return bool(tokenizer.encoding.decode(tokenizer.encoding.encode(sample)) == sample)
