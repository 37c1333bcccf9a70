"""Prompts of /v1/completions and inputs of /v1/embeddings: text, lists, token arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest
from gateway.tokens.counts import RawCount
from gateway.tokens.registry import ModelProfile


@dataclass(frozen=True)
class PromptInputs:
    count: RawCount
    # How many prompts the request holds (each gets its own completion).
    prompts: int


def count_prompt_input(value: Any, profile: ModelProfile, param: str) -> PromptInputs:
    """A string, a list of strings, a token array, or a list of token arrays."""
    if isinstance(value, str):
        return PromptInputs(profile.tokenizer.measure(value) + RawCount(0, profile.exact), 1)
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            measured = [profile.tokenizer.measure(item) for item in value]
            tokens = sum(count.tokens for count in measured)
            exact = profile.exact and all(count.exact for count in measured)
            return PromptInputs(RawCount(tokens, exact), len(value))
        if all(_is_token(item) for item in value):
            # Token arrays are billed by their length: no tokenizer involved.
            return PromptInputs(RawCount(len(value), True), 1)
        if all(isinstance(item, list) and item and all(_is_token(t) for t in item) for item in value):
            return PromptInputs(RawCount(sum(len(item) for item in value), True), len(value))
    raise InvalidRequest(
        f"'{param}' must be a string, an array of strings, an array of token ids, "
        "or an array of token-id arrays, none of them empty.",
        param=param,
    )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def prompt_multiplicity(value: Any) -> int:
    """How many prompts a completions `prompt` holds (each gets its own completion)."""
    if isinstance(value, list) and value and all(isinstance(item, str | list) for item in value):
        return len(value)
    return 1
