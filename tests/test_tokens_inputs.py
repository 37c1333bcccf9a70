"""Completions prompts, embeddings inputs and Anthropic messages: every accepted shape."""

from __future__ import annotations

import base64
import math
import struct
import zlib

import pytest
import tiktoken

from gateway.errors import InvalidRequest
from gateway.tokens import RawCount, TokenizerRegistry
from gateway.tokens.anthropic import count_anthropic_messages
from gateway.tokens.prompts import PromptInputs, count_prompt_input

REGISTRY = TokenizerRegistry()
O200K = tiktoken.get_encoding("o200k_base")
CL100K = tiktoken.get_encoding("cl100k_base")


def prompt(value: object, model: str = "gpt-4o") -> PromptInputs:
    return count_prompt_input(value, REGISTRY.profile(model), "prompt")


def test_prompt_as_text_and_list_of_texts() -> None:
    text = "Once upon a time, 日本 🙂"
    assert prompt(text) == PromptInputs(RawCount(len(O200K.encode(text)), True), 1)
    assert prompt(["a b c", text]) == PromptInputs(RawCount(3 + len(O200K.encode(text)), True), 2)
    assert prompt(text, "text-embedding-3-small") == PromptInputs(RawCount(len(CL100K.encode(text)), True), 1)
    assert prompt("") == PromptInputs(RawCount(0, True), 1)


def test_token_arrays_count_by_length_whatever_the_model() -> None:
    assert prompt([1, 2, 3, 4]) == PromptInputs(RawCount(4, True), 1)
    assert prompt([[1, 2], [3, 4, 5]]) == PromptInputs(RawCount(5, True), 2)
    assert prompt([5, 6], "some-unknown-model") == PromptInputs(RawCount(2, True), 1)


@pytest.mark.parametrize(
    "value", [None, 5, [], [[]], ["a", 1], [1, "a"], [True], [-1], {"a": 1}, [[1], ["x"]]]
)
def test_malformed_prompts_are_400(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        prompt(value)
    assert caught.value.param == "prompt"


def png_base64(width: int, height: int) -> str:
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return base64.b64encode(data + b"\x00" * 32).decode()


def anthropic(body: dict[str, object]) -> RawCount:
    return count_anthropic_messages(body, REGISTRY.profile("claude-sonnet-4-5"), (1024, 1024))


def test_anthropic_blocks_system_and_tools() -> None:
    def n(text: str) -> int:
        return len(O200K.encode(text))

    body = {
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": png_base64(600, 400)},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": "cat"}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "A cat."}],
                    }
                ],
            },
        ],
        "tools": [{"name": "lookup", "description": "Look things up", "input_schema": {"type": "object"}}],
    }
    expected = (
        3
        + n("You are terse.")
        + (3 + n("user") + n("What is in this image?") + math.ceil(600 * 400 / 750))
        + (3 + n("assistant") + n("lookup") + n('{"q": "cat"}'))
        + (3 + n("user") + n("A cat."))
        + (10 + n("lookup:Look things up") + n('{"type":"object"}'))
    )
    assert anthropic(body) == RawCount(expected, False)


def test_anthropic_string_content_and_remote_images() -> None:
    plain = anthropic({"messages": [{"role": "user", "content": "hello"}]})
    assert plain == RawCount(3 + 3 + 1 + 1, False)
    remote = anthropic(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}],
                }
            ]
        }
    )
    assert remote.tokens == 3 + 3 + 1 + math.ceil(1024 * 1024 / 750)
