"""The OpenAI chat → Anthropic Messages translator, on recorded shapes.

Requests as OpenAI's SDK sends them, answers and event sequences as the Messages API
reference shows them; every output is compared whole, and parsed by the official SDKs'
own types (OpenAI's chunk accumulator rebuilds a streamed answer, which must equal the
whole one). The last tests run the translator against the fake Anthropic server.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pydantic
import pytest
from aiohttp.test_utils import TestServer
from anthropic.types import ContentBlockParam, Message, RawMessageStreamEvent, TextBlockParam, ToolParam
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.errors import InvalidRequest
from gateway.providers.base import Usage
from gateway.providers.openai_wire import SseSplitter
from gateway.translate.base import StreamContext, Translator
from gateway.translate.openai_to_anthropic import JSON_ANSWER_TOOL, OpenAIToAnthropic
from tests.fakes.anthropic_upstream import FakeAnthropic

CREATED = 1_750_000_000
UPSTREAM_MODEL = "claude-sonnet-4-5-20250929"
RESERVED = 4096
PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
PDF_BASE64 = "JVBERi0xLjQKJcOkw7zDtsOfCjEgMCBvYmoKPDwvVHlwZS9DYXRhbG9nPj4KZW5kb2JqCg=="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
    },
}
STRICT_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def translator() -> OpenAIToAnthropic:
    return OpenAIToAnthropic(clock=lambda: CREATED + 0.75)


def translate(body: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    out = translator().request({"model": "claude", **body}, UPSTREAM_MODEL, stream, RESERVED)
    _parse_as_anthropic_request(out)
    return out


def _parse_as_anthropic_request(out: dict[str, Any]) -> None:
    """The Anthropic SDK's own types over what is sent (its request types are TypedDicts
    of lazy iterables, so each list is checked on its own)."""
    pydantic.TypeAdapter(list[TextBlockParam]).validate_python(out.get("system", []))
    for message in out["messages"]:
        assert message["role"] in ("user", "assistant")
        pydantic.TypeAdapter(list[ContentBlockParam]).validate_python(message["content"])
    pydantic.TypeAdapter(list[ToolParam]).validate_python(out.get("tools", []))


def refusal(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        translator().request({"model": "claude", **body}, UPSTREAM_MODEL, False, RESERVED)
    return caught.value


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


HI = [user("Hi")]


# ---------------------------------------------------------------- requests


def test_every_carried_field_of_a_request() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You are a weather assistant."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in one sentence."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare these two skies."},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/sky.jpg", "detail": "high"},
                    },
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_BASE64}"}},
                ],
            },
            {"role": "assistant", "content": "The first is cloudier."},
            {"role": "user", "content": "And the weather in Paris?"},
        ],
        "max_completion_tokens": 300,
        "temperature": 0.4,
        "top_p": 0.9,
        "stop": ["\n\nHuman:", "END"],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "user": "user-1234",
        "service_tier": "default",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert translate(body, stream=True) == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 300,
        "system": [
            {"type": "text", "text": "You are a weather assistant."},
            {"type": "text", "text": "Answer in one sentence."},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare these two skies."},
                    # detail is dropped: Claude sizes every image its own way.
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/sky.jpg"}},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_BASE64},
                    },
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "The first is cloudier."}]},
            {"role": "user", "content": [{"type": "text", "text": "And the weather in Paris?"}]},
        ],
        "temperature": 0.4,
        "top_p": 0.9,
        "stop_sequences": ["\n\nHuman:", "END"],
        "tools": [WEATHER_TOOL_ANTHROPIC],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "user-1234"},
        "service_tier": "standard_only",
        "stream": True,
    }


def test_the_tool_call_round_trip_with_parallel_calls() -> None:
    """An assistant's two calls, their two results and the next question: one assistant
    turn of tool_use blocks, one user turn of tool_result blocks and the text after."""
    body = {
        "messages": [
            user("Weather and time in Paris?"),
            {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_weather_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location": "Paris, France"}'},
                    },
                    {
                        "id": "call_time_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_weather_1", "content": "18°C, light rain"},
            {
                "role": "tool",
                "tool_call_id": "call_time_2",
                "content": [{"type": "text", "text": "14:05 CEST"}],
            },
            user("Should I take an umbrella?"),
        ],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": "auto",
    }
    out = translate(body)
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather and time in Paris?"}]},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_weather_1",
                    "name": "get_weather",
                    "input": {"location": "Paris, France"},
                },
                # Empty arguments (a function without parameters): an empty input.
                {"type": "tool_use", "id": "call_time_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_weather_1", "content": "18°C, light rain"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_time_2",
                    "content": [{"type": "text", "text": "14:05 CEST"}],
                },
                {"type": "text", "text": "Should I take an umbrella?"},
            ],
        },
    ]
    assert out["tools"] == [
        WEATHER_TOOL_ANTHROPIC,
        {
            "name": "get_time",
            "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}},
        },
    ]
    assert out["tool_choice"] == {"type": "auto"}
    assert out["max_tokens"] == RESERVED


def test_turns_of_one_role_merge_and_late_system_messages_join_the_system_prompt() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            user("First question."),
            user(""),  # says nothing: Claude refuses empty text blocks
            user("Second question."),
            {"role": "developer", "content": "From now on, answer in French."},
            {"role": "assistant", "content": [{"type": "text", "text": "Un."}]},
            {"role": "assistant", "content": "Deux.", "refusal": None, "annotations": []},
            {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            user("Third."),
        ]
    }
    out = translate(body)
    assert out["system"] == [
        {"type": "text", "text": "Be terse."},
        {"type": "text", "text": "From now on, answer in French."},
    ]
    assert out["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First question."},
                {"type": "text", "text": "Second question."},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Un."},
                {"type": "text", "text": "Deux."},
                {"type": "text", "text": "I can't help with that."},
            ],
        },
        {"role": "user", "content": [{"type": "text", "text": "Third."}]},
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, RESERVED),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 70}, 70),
        ({"max_tokens": 50, "max_completion_tokens": 70}, 70),
        ({"max_tokens": None, "max_completion_tokens": None}, RESERVED),
    ],
)
def test_max_tokens_the_newer_field_first_else_the_reserved_budget(
    fields: dict[str, Any], expected: int
) -> None:
    assert translate({"messages": HI, **fields})["max_tokens"] == expected


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("none", None, {"type": "none"}),
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, None, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice_and_parallel_tool_calls(
    choice: Any, parallel: bool | None, expected: dict[str, Any] | None
) -> None:
    out = translate(
        {"messages": HI, "tools": [WEATHER_TOOL], "tool_choice": choice, "parallel_tool_calls": parallel}
    )
    assert out.get("tool_choice") == expected


def test_strict_tools_stay_strict() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": STRICT_SCHEMA, "strict": True}}
    assert translate({"messages": HI, "tools": [tool]})["tools"] == [
        {"name": "f", "input_schema": STRICT_SCHEMA, "strict": True}
    ]


def test_a_strict_json_schema_is_claudes_structured_output() -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "city", "strict": True, "schema": STRICT_SCHEMA},
    }
    out = translate({"messages": HI, "response_format": response_format, "tools": [WEATHER_TOOL]})
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": STRICT_SCHEMA}}
    assert out["tools"] == [WEATHER_TOOL_ANTHROPIC]
    assert "tool_choice" not in out


def test_json_without_strict_is_asked_for_by_a_forced_tool() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "city", "description": "The city named.", "schema": schema},
    }
    out = translate({"messages": HI, "response_format": response_format})
    assert (out["tools"], out["tool_choice"]) == (
        [
            {
                "name": JSON_ANSWER_TOOL,
                "description": "Give your answer as this tool's input (city). The city named.",
                "input_schema": schema,
            }
        ],
        {"type": "tool", "name": JSON_ANSWER_TOOL},
    )
    out = translate({"messages": HI, "response_format": {"type": "json_object"}})
    assert (out["tools"], out["tool_choice"]) == (
        [
            {
                "name": JSON_ANSWER_TOOL,
                "description": "Give your answer as this tool's input.",
                "input_schema": {"type": "object"},
            }
        ],
        {"type": "tool", "name": JSON_ANSWER_TOOL},
    )
    assert "output_config" not in translate({"messages": HI, "response_format": {"type": "text"}})


def test_a_pdf_file_part_is_a_document() -> None:
    parts = [
        {
            "type": "file",
            "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF_BASE64}"},
        },
        {"type": "file", "file": {"filename": "notes.pdf", "file_data": PDF_BASE64}},
        {"type": "text", "text": "Summarise both.", "prompt_cache_breakpoint": {"mode": "explicit"}},
    ]
    document = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_BASE64},
    }
    assert translate({"messages": [{"role": "user", "content": parts}]})["messages"] == [
        {"role": "user", "content": [document, document, {"type": "text", "text": "Summarise both."}]}
    ]


def test_fields_that_ask_for_nothing_and_fields_without_effect_are_accepted() -> None:
    body = {
        "messages": HI,
        "n": 1,
        "logprobs": False,
        "top_logprobs": 0,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logit_bias": {},
        "store": False,
        "modalities": ["text"],
        "reasoning_effort": "none",
        "verbosity": "medium",
        "seed": None,
        "audio": None,
        "metadata": {"team": "search"},
        "prompt_cache_key": "tenant-7",
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "stop": [],
        "service_tier": "auto",
        "safety_identifier": "hashed-user",
        "user": "user-1234",
    }
    assert translate(body) == {
        "model": UPSTREAM_MODEL,
        "max_tokens": RESERVED,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "metadata": {"user_id": "hashed-user"},
        "service_tier": "auto",
    }


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -0.2}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"seed": 42}, "seed"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "draft"}}, "prediction"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"temperature": 1.5}, "temperature"),
        ({"a_field_from_the_future": True}, "a_field_from_the_future"),
        ({"tools": [{"type": "custom", "custom": {"name": "grammar"}}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": JSON_ANSWER_TOOL}}]}, "tools[0].function.name"),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
            },
            "tool_choice",
        ),
        ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "list", "schema": {"type": "array"}},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_what_claude_cannot_do_is_a_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    error = refusal({"messages": HI, **fields})
    assert (error.status, error.code, error.param) == (400, "unsupported_by_provider", param)
    assert error.body()["error"]["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user", "content": "Hi", "name": "alice"}], "messages[0].name"),
        ([{"role": "function", "name": "f", "content": "{}"}], "messages[0].role"),
        (
            [user("Hi"), {"role": "assistant", "content": "x", "audio": {"id": "audio_1"}}],
            "messages[1].audio",
        ),
        (
            [
                user("Hi"),
                {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            ],
            "messages[1].function_call",
        ),
        (
            [{"role": "user", "content": "Hi", "cache_control": {"type": "ephemeral"}}],
            "messages[0].cache_control",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
                }
            ],
            "messages[0].content[0].type",
        ),
        (
            [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc123"}}]}],
            "messages[0].content[0].file.file_id",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "file", "file": {"file_data": "data:text/csv;base64,YSxi"}}],
                }
            ],
            "messages[0].content[0].file.file_data",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}],
                }
            ],
            "messages[0].content[0].image_url.url",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}],
                }
            ],
            "messages[0].content[0].image_url.url",
        ),
        (
            [
                {
                    "role": "system",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                },
                user("Hi"),
            ],
            "messages[0].content[0].type",
        ),
        (
            [
                user("Hi"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"city": "Par'},
                        }
                    ],
                },
            ],
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            [
                user("Hi"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}
                    ],
                },
            ],
            "messages[1].tool_calls[0].function.arguments",
        ),
        ([{"role": "system", "content": "Only instructions."}], "messages"),
    ],
)
def test_messages_claude_cannot_take_are_a_400_naming_the_place(
    messages: list[dict[str, Any]], param: str
) -> None:
    error = refusal({"messages": messages})
    assert (error.status, error.code, error.param) == (400, "unsupported_by_provider", param)


def test_malformed_fields_are_an_ordinary_400() -> None:
    error = refusal({"messages": HI, "temperature": "hot"})
    assert (error.code, error.param) == ("invalid_request_error", "temperature")
    error = refusal({"messages": [user("Hi"), {"role": "tool", "content": "x"}]})
    assert (error.code, error.param) == ("invalid_request_error", "messages[1].tool_call_id")


def test_an_image_jpg_media_type_is_read_as_jpeg() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/4AAQ"}}
    out = translate({"messages": [{"role": "user", "content": [part]}]})
    assert out["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}}
    ]


# ---------------------------------------------------------------- whole answers

# A Messages answer as the API reference shows one, with cache writes and reads.
TEXT_MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": UPSTREAM_MODEL,
    "content": [{"type": "text", "text": "Hello! How can I help you today?"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 1500,
        "cache_read_input_tokens": 2048,
        "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 10,
        "service_tier": "standard",
    },
}
TOOL_USE_MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": UPSTREAM_MODEL,
    "content": [
        {"type": "text", "text": "I'll check the weather in both cities."},
        {
            "type": "tool_use",
            "id": "toolu_01A09q90qw90lq917835lq9",
            "name": "get_weather",
            "input": {"location": "Paris, France"},
        },
        {
            "type": "tool_use",
            "id": "toolu_01B19r81rx81mr028946mr0",
            "name": "get_weather",
            "input": {"location": "Tokyo, Japan", "unit": "celsius"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 410, "output_tokens": 96},
}
JSON_ANSWER_MESSAGE = {
    "id": "msg_01JsonAnswer",
    "type": "message",
    "role": "assistant",
    "model": UPSTREAM_MODEL,
    "content": [
        {
            "type": "tool_use",
            "id": "toolu_01Json",
            "name": JSON_ANSWER_TOOL,
            "input": {"city": "Paris", "population": 2102650},
        }
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 380, "output_tokens": 31},
}


def answer(message: dict[str, Any]) -> dict[str, Any]:
    Message.model_validate(message)  # the recorded shape is what Anthropic's SDK parses
    out = translator().response(message)
    ChatCompletion.model_validate(out)
    return out


def test_a_text_answer_with_cache_writes_and_reads() -> None:
    assert answer(TEXT_MESSAGE) == {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "object": "chat.completion",
        "created": CREATED,
        "model": UPSTREAM_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I help you today?",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        # prompt tokens: 12 plain + 1,500 written to the cache + 2,048 read from it
        "usage": {
            "prompt_tokens": 3560,
            "completion_tokens": 10,
            "total_tokens": 3570,
            "prompt_tokens_details": {"cached_tokens": 2048, "cache_write_tokens": 1500},
        },
        "service_tier": "default",
    }
    assert translator().usage(TEXT_MESSAGE) == Usage(
        3560, 10, cached_prompt_tokens=2048, cache_write_prompt_tokens=1500
    )


def test_a_tool_use_answer_is_tool_calls() -> None:
    out = answer(TOOL_USE_MESSAGE)
    assert out["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "I'll check the weather in both cities.",
                "refusal": None,
                "annotations": [],
                "tool_calls": [
                    {
                        "id": "toolu_01A09q90qw90lq917835lq9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Paris, France"}'},
                    },
                    {
                        "id": "toolu_01B19r81rx81mr028946mr0",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"location":"Tokyo, Japan","unit":"celsius"}',
                        },
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]
    assert out["usage"] == {
        "prompt_tokens": 410,
        "completion_tokens": 96,
        "total_tokens": 506,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    }


def test_a_json_answer_tool_call_is_the_content() -> None:
    out = answer(JSON_ANSWER_MESSAGE)
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": '{"city":"Paris","population":2102650}',
        "refusal": None,
        "annotations": [],
    }
    assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("pause_turn", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
    ],
)
def test_finish_reason_from_stop_reason(stop_reason: str | None, finish_reason: str) -> None:
    assert (
        answer({**TEXT_MESSAGE, "stop_reason": stop_reason})["choices"][0]["finish_reason"] == finish_reason
    )


def test_an_answer_without_usage_has_none() -> None:
    message = {key: value for key, value in TEXT_MESSAGE.items() if key != "usage"}
    assert translator().response(message)["usage"] is None
    assert translator().usage(message) is None


# ---------------------------------------------------------------- streams


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def message_start(usage: dict[str, Any]) -> bytes:
    message = {
        "id": "msg_01StreamedAnswer",
        "type": "message",
        "role": "assistant",
        "model": UPSTREAM_MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return event("message_start", {"type": "message_start", "message": message})


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return event(
        "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
    )


def text_delta(index: int, text: str) -> bytes:
    return event(
        "content_block_delta",
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
    )


def json_delta(index: int, piece: str) -> bytes:
    return event(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": piece},
        },
    )


def block_stop(index: int) -> bytes:
    return event("content_block_stop", {"type": "content_block_stop", "index": index})


def message_delta(stop_reason: str, usage: dict[str, Any]) -> bytes:
    return event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": usage,
        },
    )


MESSAGE_STOP = event("message_stop", {"type": "message_stop"})
PING = event("ping", {"type": "ping"})

# The reference's text stream, with cache writes and reads in message_start.
TEXT_STREAM = [
    message_start(
        {
            "input_tokens": 12,
            "cache_creation_input_tokens": 1500,
            "cache_read_input_tokens": 2048,
            "output_tokens": 1,
        }
    ),
    block_start(0, {"type": "text", "text": ""}),
    PING,
    text_delta(0, "Hello"),
    text_delta(0, "!"),
    block_stop(0),
    message_delta("end_turn", {"output_tokens": 15}),
    MESSAGE_STOP,
]
# The reference's tool-use stream: text, then a tool_use block whose input comes as
# input_json_delta pieces (the first one empty).
TOOL_STREAM = [
    message_start({"input_tokens": 472, "output_tokens": 2}),
    block_start(0, {"type": "text", "text": ""}),
    text_delta(0, "Okay, let's check."),
    block_stop(0),
    block_start(
        1, {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}
    ),
    json_delta(1, ""),
    json_delta(1, '{"location":'),
    json_delta(1, ' "San Francisco, CA"}'),
    block_stop(1),
    block_start(
        2, {"type": "tool_use", "id": "toolu_02U2y2gK45rBnl3uOUsO8Vq7", "name": "get_time", "input": {}}
    ),
    json_delta(2, '{"timezone": "America/Los_Angeles"}'),
    block_stop(2),
    message_delta("tool_use", {"output_tokens": 89}),
    MESSAGE_STOP,
]


def run(events: list[bytes], include_usage: bool = True) -> tuple[Any, list[Any]]:
    """The events through SseSplitter and the translation, as the request path feeds them;
    (the stream translation, its output parsed: chunk objects and "[DONE]")."""
    for data in events:
        payload = json.loads(data.split(b"data: ", 1)[1])
        if payload["type"] not in ("ping", "error"):  # the SDK's stream reader handles these two itself
            pydantic.TypeAdapter(RawMessageStreamEvent).validate_python(payload)
    stream = translator().stream(StreamContext(model="claude", include_usage=include_usage, prompt_tokens=9))
    out: list[bytes] = []
    for whole in SseSplitter().feed(b"".join(events)):
        out.extend(stream.feed(whole))
    out.extend(stream.finish())
    parsed: list[Any] = []
    for sent in out:
        assert sent.startswith(b"data: ") and sent.endswith(b"\n\n") and sent.count(b"\n\n") == 1
        data = sent[6:-2]
        parsed.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return stream, parsed


def chunk(delta: dict[str, Any], finish_reason: str | None = None, usage: bool = True) -> dict[str, Any]:
    out = {
        "id": "msg_01StreamedAnswer",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return {**out, "usage": None} if usage else out


def rebuilt(chunks: list[Any]) -> ChatCompletion:
    """OpenAI's SDK accumulating the chunks as its streaming helper does."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for item in chunks:
        if item != "[DONE]":
            state.handle_chunk(ChatCompletionChunk.model_validate(item))
    return state.get_final_completion()


def test_a_text_stream_with_the_usage_chunk() -> None:
    stream, chunks = run(TEXT_STREAM)
    assert chunks == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": "!"}),
        chunk({}, "stop"),
        {
            "id": "msg_01StreamedAnswer",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": UPSTREAM_MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": 3560,
                "completion_tokens": 15,
                "total_tokens": 3575,
                "prompt_tokens_details": {"cached_tokens": 2048, "cache_write_tokens": 1500},
            },
        },
        "[DONE]",
    ]
    assert (stream.finished, stream.usage) == (
        True,
        Usage(3560, 15, cached_prompt_tokens=2048, cache_write_prompt_tokens=1500),
    )
    final = rebuilt(chunks)
    assert (final.choices[0].message.content, final.choices[0].finish_reason) == ("Hello!", "stop")


def test_without_include_usage_no_usage_chunk_and_no_usage_fields() -> None:
    stream, chunks = run(TEXT_STREAM, include_usage=False)
    assert chunks == [
        chunk({"role": "assistant", "content": ""}, usage=False),
        chunk({"content": "Hello"}, usage=False),
        chunk({"content": "!"}, usage=False),
        chunk({}, "stop", usage=False),
        "[DONE]",
    ]
    # The gateway still settles with Claude's own usage.
    assert stream.usage == Usage(3560, 15, cached_prompt_tokens=2048, cache_write_prompt_tokens=1500)


def test_a_tool_use_stream_with_parallel_calls() -> None:
    stream, chunks = run(TOOL_STREAM, include_usage=False)
    call = {"type": "function"}
    assert chunks == [
        chunk({"role": "assistant", "content": ""}, usage=False),
        chunk({"content": "Okay, let's check."}, usage=False),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                        **call,
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            usage=False,
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"location":'}}]}, usage=False),
        chunk(
            {"tool_calls": [{"index": 0, "function": {"arguments": ' "San Francisco, CA"}'}}]}, usage=False
        ),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "toolu_02U2y2gK45rBnl3uOUsO8Vq7",
                        **call,
                        "function": {"name": "get_time", "arguments": ""},
                    }
                ]
            },
            usage=False,
        ),
        chunk(
            {"tool_calls": [{"index": 1, "function": {"arguments": '{"timezone": "America/Los_Angeles"}'}}]},
            usage=False,
        ),
        chunk({}, "tool_calls", usage=False),
        "[DONE]",
    ]
    assert stream.usage == Usage(472, 89)
    final = rebuilt(chunks).choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in final.message.tool_calls or []] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", '{"location": "San Francisco, CA"}'),
        ("toolu_02U2y2gK45rBnl3uOUsO8Vq7", "get_time", '{"timezone": "America/Los_Angeles"}'),
    ]


def test_a_streamed_json_answer_is_content() -> None:
    events = [
        message_start({"input_tokens": 380, "output_tokens": 1}),
        block_start(0, {"type": "tool_use", "id": "toolu_01Json", "name": JSON_ANSWER_TOOL, "input": {}}),
        json_delta(0, ""),
        json_delta(0, '{"city": "Paris", '),
        json_delta(0, '"population": 2102650}'),
        block_stop(0),
        message_delta("tool_use", {"output_tokens": 31}),
        MESSAGE_STOP,
    ]
    _, chunks = run(events, include_usage=False)
    assert chunks == [
        chunk({"role": "assistant", "content": ""}, usage=False),
        chunk({"content": '{"city": "Paris", '}, usage=False),
        chunk({"content": '"population": 2102650}'}, usage=False),
        chunk({}, "stop", usage=False),
        "[DONE]",
    ]


def test_message_delta_usage_repeating_input_and_cache_figures_is_taken_as_the_latest() -> None:
    events = [
        message_start(
            {
                "input_tokens": 40,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            }
        ),
        block_start(0, {"type": "text", "text": ""}),
        text_delta(0, "Hi"),
        block_stop(0),
        # Newer API versions repeat the input figures here, and they may have changed
        # (a server tool's iterations); nulls say nothing new.
        message_delta(
            "end_turn",
            {
                "input_tokens": 52,
                "cache_creation_input_tokens": 7,
                "cache_read_input_tokens": None,
                "output_tokens": 3,
            },
        ),
        MESSAGE_STOP,
    ]
    stream, chunks = run(events)
    assert stream.usage == Usage(59, 3, cached_prompt_tokens=0, cache_write_prompt_tokens=7)
    assert chunks[-2]["usage"] == {
        "prompt_tokens": 59,
        "completion_tokens": 3,
        "total_tokens": 62,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 7},
    }


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("max_tokens", "length"), ("stop_sequence", "stop"), ("refusal", "content_filter")],
)
def test_a_streamed_finish_reason(stop_reason: str, finish_reason: str) -> None:
    events = [*TEXT_STREAM[:-2], message_delta(stop_reason, {"output_tokens": 15}), MESSAGE_STOP]
    _, chunks = run(events, include_usage=False)
    assert chunks[-2] == chunk({}, finish_reason, usage=False)


def test_an_error_event_becomes_openais_error_chunk_and_ends_the_stream() -> None:
    error = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    stream, chunks = run([*TEXT_STREAM[:4], error, text_delta(0, "ignored")])
    assert chunks == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        {
            "error": {
                "message": "The provider's stream ended with an error (overloaded_error).",
                "type": "server_error",
                "param": None,
                "code": "upstream_stream_error",
            }
        },
    ]
    assert stream.finished
    # What message_start reported: the input, and the output so far.
    assert stream.usage == Usage(3560, 1, cached_prompt_tokens=2048, cache_write_prompt_tokens=1500)


def test_a_cut_stream_gets_no_made_up_ending() -> None:
    stream, chunks = run(TEXT_STREAM[:4])
    assert chunks == [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"})]
    assert not stream.finished
    assert stream.usage == Usage(3560, 1, cached_prompt_tokens=2048, cache_write_prompt_tokens=1500)
    # Cut after message_delta, before message_stop: the finish chunk went, nothing else.
    stream, chunks = run(TEXT_STREAM[:-1])
    assert chunks[-1] == chunk({}, "stop")
    assert not stream.finished


def test_a_stream_that_never_started_has_no_usage() -> None:
    stream, chunks = run([])
    assert (chunks, stream.finished, stream.usage) == ([], False, None)


def test_the_translator_meets_the_interface() -> None:
    t: Translator = translator()
    assert (t.caller, t.provider, t.provider_path, t.provider_count_route) == (
        "openai",
        "anthropic",
        "messages",
        "messages",
    )


# ---------------------------------------------------------------- against the fake Claude


async def exchange(
    fake: FakeAnthropic, body: dict[str, Any], include_usage: bool = True
) -> tuple[dict[str, Any], list[Any]]:
    """The translated request to the fake Anthropic, whole and streamed: (the whole
    answer translated, the stream's chunks translated)."""
    server = TestServer(fake.app())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("/v1/messages"))
            whole = translate(body)
            async with session.post(url, json=whole) as reply:
                answer_ = translator().response(await reply.json())
            stream = translator().stream(
                StreamContext(model="claude", include_usage=include_usage, prompt_tokens=9)
            )
            splitter = SseSplitter()
            sent: list[bytes] = []
            async with session.post(url, json=translate(body, stream=True)) as reply:
                async for data in reply.content.iter_any():
                    for whole_event in splitter.feed(data):
                        sent.extend(stream.feed(whole_event))
            sent.extend(stream.finish())
    finally:
        await server.close()
    chunks = [json.loads(item[6:]) if item != b"data: [DONE]\n\n" else "[DONE]" for item in sent]
    return ChatCompletion.model_validate(answer_).model_dump(exclude_none=True), chunks


async def test_the_fake_claude_calls_tools_in_parallel_whole_and_streamed() -> None:
    fake = FakeAnthropic(
        cache_creation_input_tokens=30,
        cache_read_input_tokens=200,
        tool_calls=[
            ("get_weather", {"location": "Paris, France"}),
            ("get_time", {"timezone": "Europe/Paris"}),
        ],
    )
    whole, chunks = await exchange(
        fake, {"messages": [user("Weather and time in Paris?")], "tools": [WEATHER_TOOL, TIME_TOOL]}
    )
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert whole["usage"]["prompt_tokens"] == 21 + 30 + 200
    streamed = rebuilt(chunks)
    assert streamed.choices[0].message.content == whole["choices"][0]["message"]["content"] == "Let me check."
    calls = [
        (c.function.name, json.loads(c.function.arguments))
        for c in streamed.choices[0].message.tool_calls or []
    ]
    assert calls == [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in whole["choices"][0]["message"]["tool_calls"]
    ]
    assert calls == [
        ("get_weather", {"location": "Paris, France"}),
        ("get_time", {"timezone": "Europe/Paris"}),
    ]
    assert (
        chunks[-2]["usage"]
        == whole["usage"]
        == {
            "prompt_tokens": 251,
            "completion_tokens": 15,
            "total_tokens": 266,
            "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 30},
        }
    )


async def test_the_fake_claude_answers_json_by_the_forced_tool() -> None:
    fake = FakeAnthropic(tool_calls=[(JSON_ANSWER_TOOL, {"city": "Paris", "population": 2102650})])
    whole, chunks = await exchange(
        fake,
        {"messages": [user("Largest French city, as JSON.")], "response_format": {"type": "json_object"}},
    )
    assert fake.requests[0]["tool_choice"] == {"type": "tool", "name": JSON_ANSWER_TOOL}
    streamed = rebuilt(chunks).choices[0]
    assert (
        json.loads(whole["choices"][0]["message"]["content"])
        == json.loads(streamed.message.content or "")
        == {"city": "Paris", "population": 2102650}
    )
    assert whole["choices"][0]["finish_reason"] == streamed.finish_reason == "stop"


async def test_the_fake_claude_sees_both_images() -> None:
    content = [
        {"type": "text", "text": "What do you see?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/sky.jpg"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_BASE64}", "detail": "low"}},
    ]
    whole, chunks = await exchange(
        FakeAnthropic(), {"messages": [{"role": "user", "content": content}], "max_tokens": 100}
    )
    text = "I see the image at https://example.com/sky.jpg and a base64 image/png image of 96 characters."
    assert whole["choices"][0]["message"]["content"] == rebuilt(chunks).choices[0].message.content == text


async def test_the_fake_claudes_error_event_and_repeated_usage() -> None:
    fake = FakeAnthropic(mode="stream_error")
    _, chunks = await exchange(fake, {"messages": HI})
    assert [item.get("error", {}).get("code") for item in chunks] == [
        None,
        None,
        None,
        None,
        "upstream_stream_error",
    ]
    fake = FakeAnthropic(delta_repeats_input=True, cache_read_input_tokens=5)
    whole, chunks = await exchange(fake, {"messages": HI})
    assert (
        chunks[-2]["usage"]
        == whole["usage"]
        == {
            "prompt_tokens": 26,
            "completion_tokens": 7,
            "total_tokens": 33,
            "prompt_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 0},
        }
    )
