"""What a count is: tokens, and whether they are exactly what the provider bills."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RawCount:
    """The tokenizer's count of a request's prompt, before any calibration factor."""

    tokens: int
    exact: bool

    def __add__(self, other: RawCount) -> RawCount:
        return RawCount(self.tokens + other.tokens, self.exact and other.exact)


@dataclass(frozen=True)
class PromptCount:
    """A pre-flight count as the gateway reserves it."""

    tokens: int
    raw_tokens: int
    exact: bool
    tokenizer: str
    factor: float
    # How the count was made, for people: e.g. "openai-chat with o200k_base".
    method: str
    # Exact or estimate, and why: e.g. "exact: Meta's Llama 3 tokenizer (llama-models)".
    reason: str
