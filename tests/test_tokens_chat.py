"""Chat prompts counted exactly as OpenAI bills them, checked against independent figures."""

from __future__ import annotations

import base64
import random
import struct
import zlib
from typing import Any

import pytest
import tiktoken

from gateway.tokens import RawCount, TokenizerRegistry
from gateway.tokens.chat import count_chat
from tests.fakes.openai_upstream import openai_chat_prompt_tokens

REGISTRY = TokenizerRegistry()
REMOTE_IMAGE = (1024, 1024)


def chat(messages: list[dict[str, Any]], model: str = "gpt-4o", **extra: Any) -> RawCount:
    return count_chat({"messages": messages, **extra}, REGISTRY.profile(model), REMOTE_IMAGE)


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

# The cookbook's tool example; the API billed 105 (gpt-4, gpt-3.5-turbo) and 101 (gpt-4o).
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_cookbook_messages_match_what_openai_billed(model: str, expected: int) -> None:
    assert chat(COOKBOOK_MESSAGES, model) == RawCount(expected, True)


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4", 105), ("gpt-3.5-turbo", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_cookbook_tools_match_what_openai_billed(model: str, expected: int) -> None:
    assert chat(COOKBOOK_TOOL_MESSAGES, model, tools=COOKBOOK_TOOLS) == RawCount(expected, True)
    # The legacy `functions` parameter carries the same definitions.
    functions = [tool["function"] for tool in COOKBOOK_TOOLS]
    assert chat(COOKBOOK_TOOL_MESSAGES, model, functions=functions).tokens == expected


def test_tools_with_nested_objects_are_counted_and_marked_estimates() -> None:
    nested = {
        "type": "function",
        "function": {
            "name": "book",
            "description": "Book a trip.",
            "parameters": {
                "type": "object",
                "properties": {
                    "traveller": {
                        "type": "object",
                        "description": "Who travels",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    },
                    "class": {"type": "string", "description": "Seat class", "enum": ["economy", "business"]},
                },
            },
        },
    }
    encoding = tiktoken.get_encoding("o200k_base")
    base = chat(COOKBOOK_TOOL_MESSAGES, "gpt-4o").tokens
    counted = chat(COOKBOOK_TOOL_MESSAGES, "gpt-4o", tools=[nested])
    nested_json = '{"properties":{"name":{"type":"string"},"age":{"type":"integer"}}}'
    by_rule = (
        7
        + len(encoding.encode("book:Book a trip"))
        + 3
        + 3
        + len(encoding.encode("traveller:object:Who travels"))
        + len(encoding.encode(nested_json))
        + 3
        - 3
        + (3 + len(encoding.encode("economy")))
        + (3 + len(encoding.encode("business")))
        + len(encoding.encode("class:string:Seat class"))
        + 12
    )
    assert counted == RawCount(base + by_rule, False)


@pytest.mark.parametrize(
    ("model", "encoding", "exact"),
    [
        ("gpt-4o", "o200k_base", True),
        ("gpt-4o-mini-2024-07-18", "o200k_base", True),
        ("gpt-4.1-nano", "o200k_base", True),
        ("o3-mini", "o200k_base", True),
        ("gpt-5", "o200k_base", True),
        ("gpt-4-turbo", "cl100k_base", True),
        ("gpt-4-0613", "cl100k_base", True),
        ("gpt-3.5-turbo-0125", "cl100k_base", True),
        ("text-embedding-3-small", "cl100k_base", True),
        ("claude-sonnet-4-5", "o200k_base", False),
        ("llama-3-70b-instruct", "llama3", True),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", True),
        ("mistral-large", "o200k_base", False),
    ],
)
def test_models_resolve_to_their_tokenizer(model: str, encoding: str, exact: bool) -> None:
    profile = REGISTRY.profile(model)
    assert (profile.tokenizer.name, profile.exact) == (encoding, exact)


def test_small_cases_by_hand() -> None:
    # 3 priming + 3 per message + "user" (1) + "hi" (1)
    assert chat([{"role": "user", "content": "hi"}]) == RawCount(8, True)
    # a name adds its encoding and 1
    assert chat([{"role": "user", "content": "hi", "name": "bob"}]) == RawCount(10, True)
    # empty content costs nothing beyond the message overhead
    assert chat([{"role": "user", "content": ""}]) == RawCount(7, True)
    # special-token text is billed as plain text, never refused
    assert chat([{"role": "user", "content": "<|endoftext|>"}]) == RawCount(3 + 3 + 1 + 7, True)


def test_multibyte_and_emoji_text() -> None:
    encoding = tiktoken.get_encoding("o200k_base")
    text = "Grüße aus Köln! 日本語のテキスト 🙂👩🏽‍💻🏳️‍🌈"
    assert chat([{"role": "user", "content": text}]).tokens == 7 + len(encoding.encode(text))
    cl100k = tiktoken.get_encoding("cl100k_base")
    assert chat([{"role": "user", "content": text}], "gpt-4").tokens == 7 + len(cl100k.encode(text))


def test_content_parts_count_their_text() -> None:
    as_string = [{"role": "user", "content": "Say hello to the gateway."}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Say hello to the gateway."}]}]
    assert chat(as_parts) == chat(as_string) == RawCount(3 + 3 + 1 + 6, True)


def test_a_100k_token_prompt() -> None:
    encoding = tiktoken.get_encoding("o200k_base")
    words = [f"word{i % 977} " for i in range(60_000)]
    text = "".join(words)
    expected = len(encoding.encode(text))
    assert expected > 100_000
    assert chat([{"role": "user", "content": text}]) == RawCount(7 + expected, True)


def test_tool_calls_and_tool_results_are_counted_as_estimates() -> None:
    encoding = tiktoken.get_encoding("o200k_base")
    arguments = '{"location": "Paris, FR"}'
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    expected = (
        3
        + (3 + 1 + len(encoding.encode("Weather in Paris?")))
        + (3 + 1 + 3 + len(encoding.encode("get_weather")) + len(encoding.encode(arguments)))
        + (3 + 1 + len(encoding.encode("call_1")) + len(encoding.encode("18 C, sunny")))
    )
    assert chat(messages) == RawCount(expected, False)


def png(width: int, height: int) -> str:
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = b"IHDR" + header
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return "data:image/png;base64," + base64.b64encode(data + b"\x00" * 64).decode()


@pytest.mark.parametrize(
    ("size", "detail", "model", "image_tokens"),
    [
        ((1024, 1024), "high", "gpt-4o", 765),
        ((1024, 1024), "auto", "gpt-4o", 765),
        ((2048, 4096), "high", "gpt-4o", 1105),
        ((4096, 8192), "low", "gpt-4o", 85),
        ((512, 512), "high", "gpt-4o", 255),
        ((1024, 1024), "high", "gpt-4o-mini", 25501),
    ],
)
def test_inline_images_by_the_tile_rule(
    size: tuple[int, int], detail: str, model: str, image_tokens: int
) -> None:
    text = [{"type": "text", "text": "What is this?"}]
    image = {"type": "image_url", "image_url": {"url": png(*size), "detail": detail}}
    without = chat([{"role": "user", "content": text}], model)
    counted = chat([{"role": "user", "content": [*text, image]}], model)
    assert counted == RawCount(without.tokens + image_tokens, True)


def test_remote_images_use_the_configured_size_and_are_estimates() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    counted = chat([{"role": "user", "content": [image]}])
    # 1024 x 1024 by default: 765 tokens, but the real size is unknown.
    assert counted == RawCount(7 + 765, False)
    low = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}
    assert chat([{"role": "user", "content": [low]}]) == RawCount(7 + 85, True)


def test_response_format_schema_counts_as_an_estimate() -> None:
    plain = chat([{"role": "user", "content": "hi"}])
    schema = {"name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    counted = chat(
        [{"role": "user", "content": "hi"}], response_format={"type": "json_schema", "json_schema": schema}
    )
    assert counted.tokens > plain.tokens and counted.exact is False
    assert chat([{"role": "user", "content": "hi"}], response_format={"type": "json_object"}) == plain


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_random_conversations_match_the_formula(model: str) -> None:
    """Against the formula written out independently in the fake provider."""
    generator = random.Random(20261128)
    alphabet = "abcdefghij klmnop,.!?'\n\tÄéß日本語🙂 <|endoftext|> 12345"
    encoding = REGISTRY.profile(model).tokenizer.name
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
        assert chat(messages, model) == RawCount(openai_chat_prompt_tokens(messages, encoding), True)


def test_llama3_chat_matches_metas_own_chat_format() -> None:
    llama_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
    chat_format = pytest.importorskip("llama_models.llama3.chat_format")
    datatypes = pytest.importorskip("llama_models.datatypes")
    reference = chat_format.ChatFormat(llama_tokenizer.Tokenizer.get_instance())
    conversations = [
        [("user", "hi")],
        [("system", "You are terse."), ("user", "Hello there, 日本語 🙂")],
        [("system", "Be brief."), ("user", "a\n\nb"), ("assistant", "ok!"), ("user", "<|eot_id|> inside")],
    ]
    for conversation in conversations:
        messages = [{"role": role, "content": content} for role, content in conversation]
        expected = reference.encode_dialog_prompt(
            [datatypes.RawMessage(role=role, content=content) for role, content in conversation]
        )
        assert chat(messages, "llama-3-8b-instruct") == RawCount(len(expected.tokens), True)


def test_llama3_contents_are_trimmed_like_the_serving_template() -> None:
    padded = chat([{"role": "user", "content": "  hi  \n"}], "llama-3-8b-instruct")
    assert padded == chat([{"role": "user", "content": "hi"}], "llama-3-8b-instruct")
