"""Chat prompts counted by OpenAI's published formula.

Per message: 3 tokens, plus the encoded length of every string field (role, content,
name, ...), plus 1 when `name` is present; then 3 tokens priming the reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.tokens.registry import Tokenizer

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3


def count_chat_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> int:
    """Prompt tokens of a list of chat messages (already validated as mappings)."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                total += tokenizer.count(value)
            elif key == "content" and isinstance(value, list):
                total += _count_content_parts(value, tokenizer)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def _count_content_parts(parts: list[Any], tokenizer: Tokenizer) -> int:
    total = 0
    for part in parts:
        if isinstance(part, Mapping) and part.get("type") == "text":
            text = part.get("text")
            if isinstance(text, str):
                total += tokenizer.count(text)
    return total
