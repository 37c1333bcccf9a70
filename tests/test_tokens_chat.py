"""Pre-flight counts equal OpenAI's published chat formula, in the model's encoding."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.tokens import TokenizerRegistry, count_chat_prompt
from tests.fakes.openai_upstream import openai_chat_prompt_tokens

REGISTRY = TokenizerRegistry()

# The example of OpenAI's cookbook "How to count tokens with tiktoken"; the API billed
# 129 prompt tokens for gpt-4 / gpt-3.5-turbo and 124 for gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_cookbook_example_matches_what_openai_billed(model: str, expected: int) -> None:
    tokenizer = REGISTRY.for_model(model)
    assert tokenizer.exact
    assert count_chat_prompt(COOKBOOK_MESSAGES, tokenizer) == expected


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
    ],
)
def test_openai_families_use_their_published_encoding(model: str, encoding: str) -> None:
    tokenizer = REGISTRY.for_model(model)
    assert (tokenizer.encoding_name, tokenizer.exact) == (encoding, True)


def test_unknown_models_fall_back_and_are_marked_estimates() -> None:
    tokenizer = REGISTRY.for_model("claude-sonnet-4")
    assert (tokenizer.encoding_name, tokenizer.exact) == ("o200k_base", False)
    assert REGISTRY.for_model("llama-3-70b", "cl100k_base").encoding_name == "cl100k_base"


def test_small_cases_by_hand() -> None:
    tokenizer = REGISTRY.for_model("gpt-4o")
    # 3 priming + 3 per message + "user" (1) + "hi" (1)
    assert count_chat_prompt([{"role": "user", "content": "hi"}], tokenizer) == 8
    # + "name" adds its encoding and 1
    assert count_chat_prompt([{"role": "user", "content": "hi", "name": "bob"}], tokenizer) == 10
    # Special-token text is billed as plain text, never refused.
    assert count_chat_prompt([{"role": "user", "content": "<|endoftext|>"}], tokenizer) == 3 + 3 + 1 + 7


def test_content_parts_count_their_text() -> None:
    tokenizer = REGISTRY.for_model("gpt-4o")
    as_string = [{"role": "user", "content": "Say hello to the gateway."}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Say hello to the gateway."}]}]
    assert count_chat_prompt(as_parts, tokenizer) == count_chat_prompt(as_string, tokenizer) == 3 + 3 + 1 + 6


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_random_conversations_match_the_formula(model: str) -> None:
    """Against the formula written out independently in the fake provider."""
    generator = random.Random(20261128)
    alphabet = "abcdefghij klmnop,.!?'\n\tÄéß日本語🙂 <|endoftext|> 12345"
    tokenizer = REGISTRY.for_model(model)
    for _ in range(200):
        messages: list[dict[str, Any]] = []
        for _ in range(generator.randint(1, 8)):
            message = {
                "role": generator.choice(["system", "user", "assistant"]),
                "content": "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 80))),
            }
            if generator.random() < 0.3:
                message["name"] = generator.choice(["alice", "bob_2", "example_user"])
            messages.append(message)
        expected = openai_chat_prompt_tokens(messages, tokenizer.encoding_name)
        assert count_chat_prompt(messages, tokenizer) == expected
