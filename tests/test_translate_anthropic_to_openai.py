"""The Anthropic Messages → OpenAI chat translator: requests, whole answers, streams.

Recorded shapes from both API references go in; the exact bodies and events that come
out are asserted, and the official SDKs' own types parse them. The last tests run a tool
round trip against the fake OpenAI provider (a real aiohttp server, no other service).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from pydantic import TypeAdapter

from gateway.errors import InvalidRequest
from gateway.providers.base import Usage
from gateway.providers.openai_wire import SseSplitter
from gateway.translate.anthropic_to_openai import AnthropicToOpenAI, anthropic_usage
from gateway.translate.base import StreamContext, Translator
from tests.fakes.openai_upstream import FakeUpstream, openai_chat_prompt_tokens

TRANSLATOR = AnthropicToOpenAI()
STREAM_EVENTS: TypeAdapter[Any] = TypeAdapter(anthropic.types.RawMessageStreamEvent)
CHAT_REQUEST: TypeAdapter[Any] = TypeAdapter(
    openai.types.chat.completion_create_params.CompletionCreateParamsStreaming
)
CONTEXT = StreamContext(model="gpt-4o", include_usage=False, prompt_tokens=118)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location"],
}
TIME_SCHEMA = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}

# A Messages request using every field the translator maps.
FULL_REQUEST: dict[str, Any] = {
    "model": "gpt-4o",
    "max_tokens": 1024,
    "system": [
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Answer in French."},
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these pictures, and the weather in Paris?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "thinking",
                    "thinking": "Two images, then the weather.",
                    "signature": "EqQBCgIYAhIM",
                },
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
                {"type": "text", "text": "A cat and a chart. Checking the weather."},
                {
                    "type": "tool_use",
                    "id": "call_abc",
                    "name": "get_weather",
                    "input": {"location": "Paris", "unit": "celsius"},
                },
                {"type": "tool_use", "id": "call_def", "name": "get_time", "input": {"zone": "CET"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_abc", "content": "18°C, cloudy"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_def",
                    "content": [{"type": "text", "text": "clock unavailable"}],
                    "is_error": True,
                },
                {"type": "text", "text": "Thanks. Summarise.", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ],
    "tools": [
        {
            "name": "get_weather",
            "description": "The current weather in a city",
            "input_schema": WEATHER_SCHEMA,
            "cache_control": {"type": "ephemeral"},
        },
        {"name": "get_time", "input_schema": TIME_SCHEMA, "strict": True},
    ],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "stop_sequences": ["\n\nHuman:", "END"],
    "temperature": 0.2,
    "top_p": 0.9,
    "metadata": {"user_id": "user-7f3a"},
    "output_config": {"effort": "low"},
    "service_tier": "auto",
    "stream": True,
}

FULL_CHAT_REQUEST: dict[str, Any] = {
    "model": "gpt-4o-2024-08-06",
    "messages": [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "You are terse."},
                {"type": "text", "text": "Answer in French."},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these pictures, and the weather in Paris?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": "A cat and a chart. Checking the weather.",
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location":"Paris","unit":"celsius"}'},
                },
                {
                    "id": "call_def",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"zone":"CET"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "18°C, cloudy"},
        {"role": "tool", "tool_call_id": "call_def", "content": "Error: clock unavailable"},
        {"role": "user", "content": "Thanks. Summarise."},
    ],
    "max_completion_tokens": 1024,
    "stop": ["\n\nHuman:", "END"],
    "temperature": 0.2,
    "top_p": 0.9,
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city",
                "parameters": WEATHER_SCHEMA,
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA, "strict": True}},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning_effort": "low",
    "user": "user-7f3a",
    "stream": True,
    "stream_options": {"include_usage": True},
}


def user_turn(text: str = "Hi") -> dict[str, Any]:
    return {"role": "user", "content": text}


def request(body: dict[str, Any], stream: bool = False, max_tokens: int = 4096) -> dict[str, Any]:
    return TRANSLATOR.request(body, "gpt-4o-2024-08-06", stream, max_tokens)


# ---- the request ------------------------------------------------------------------


def test_the_translator_offers_the_interface() -> None:
    translator: Translator = TRANSLATOR
    assert (translator.caller, translator.provider) == ("anthropic", "openai")
    assert (translator.provider_path, translator.provider_count_route) == ("chat/completions", "chat")


def test_every_field_of_a_request_is_mapped() -> None:
    out = request(FULL_REQUEST, stream=True)
    assert out == FULL_CHAT_REQUEST
    CHAT_REQUEST.validate_python(out)


def test_a_plain_request_and_the_default_completion_cap() -> None:
    body = {"model": "gpt-4o", "system": "Be brief.", "messages": [user_turn("Hello")]}
    assert request(body, max_tokens=777) == {
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        "max_completion_tokens": 777,
    }


def test_an_empty_system_prompt_is_left_out() -> None:
    for system in ("", []):
        assert request({"model": "m", "max_tokens": 9, "system": system, "messages": [user_turn()]})[
            "messages"
        ] == [{"role": "user", "content": "Hi"}]


def test_the_cap_can_go_out_as_max_tokens_for_servers_that_read_only_that() -> None:
    body = {"model": "m", "max_tokens": 64, "messages": [user_turn()]}
    out = AnthropicToOpenAI(max_tokens_field="max_tokens").request(body, "llama3", False, 4096)
    assert out == {"model": "llama3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}


def test_json_schema_output_goes_as_a_strict_response_format() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    for body in (
        {
            "model": "m",
            "max_tokens": 9,
            "messages": [user_turn()],
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        },
        {
            "model": "m",
            "max_tokens": 9,
            "messages": [user_turn()],
            "output_format": {"type": "json_schema", "schema": schema},
        },
    ):
        out = request(body)
        assert out["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": True},
        }
        assert "reasoning_effort" not in out


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        (
            {"type": "tool", "name": "get_time"},
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        ),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
        (
            {"type": "tool", "name": "get_time", "disable_parallel_tool_use": False},
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        ),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    body = {
        "model": "m",
        "max_tokens": 9,
        "messages": [user_turn()],
        "tools": FULL_REQUEST["tools"],
        "tool_choice": choice,
    }
    out = request(body)
    assert {key: out[key] for key in ("tool_choice", "parallel_tool_calls") if key in out} == expected


def test_without_tools_auto_and_none_tool_choice_mean_nothing() -> None:
    for kind in ("auto", "none"):
        out = request(
            {"model": "m", "max_tokens": 9, "messages": [user_turn()], "tool_choice": {"type": kind}}
        )
        assert "tool_choice" not in out and "tools" not in out


def test_stop_sequences_up_to_four() -> None:
    four = ["a", "b", "c", "d"]
    assert (
        request({"model": "m", "max_tokens": 9, "messages": [user_turn()], "stop_sequences": four})["stop"]
        == four
    )
    assert "stop" not in request(
        {"model": "m", "max_tokens": 9, "messages": [user_turn()], "stop_sequences": []}
    )


def test_thinking_disabled_or_adaptive_and_thinking_in_history_send_nothing() -> None:
    history = [
        user_turn("2+2?"),
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "4", "signature": "sig"},
                {"type": "text", "text": "4"},
            ],
        },
        user_turn("And 3+3?"),
    ]
    for thinking in ({"type": "disabled"}, {"type": "adaptive"}, None):
        out = request({"model": "m", "max_tokens": 9, "messages": history, "thinking": thinking})
        assert out["messages"] == [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ]
        assert set(out) == {"model", "messages", "max_completion_tokens"}


def test_nulls_and_fields_that_ask_for_nothing_are_accepted() -> None:
    body = {
        "model": "m",
        "max_tokens": 9,
        "temperature": None,
        "top_k": None,
        "container": None,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://x/a.png"},
                        "transformations": {},
                        "cache_control": None,
                    }
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t", "name": "f", "input": {}, "caller": {"type": "direct"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok", "is_error": False}],
            },
        ],
        "tools": [
            {
                "name": "f",
                "input_schema": TIME_SCHEMA,
                "defer_loading": False,
                "input_examples": [],
                "eager_input_streaming": True,
            }
        ],
        "thinking": {"type": "adaptive", "display": "omitted"},
        "metadata": {"user_id": None},
    }
    assert request(body) == {
        "model": "gpt-4o-2024-08-06",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "t", "content": "ok"},
        ],
        "max_completion_tokens": 9,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": TIME_SCHEMA}}],
    }


def test_an_assistant_turn_of_thinking_only_is_left_out() -> None:
    history = [
        user_turn("a"),
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
        user_turn("b"),
    ]
    assert request({"model": "m", "max_tokens": 9, "messages": history})["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ]


def test_documents_pdf_as_a_file_part_and_plain_text_as_text() -> None:
    content = [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"},
            "title": "report.pdf",
        },
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0y"},
        },
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Plain notes."}},
        {"type": "text", "text": "Compare them."},
    ]
    out = request({"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": content}]})
    assert out["messages"] == [
        {
            "role": "user",
            "content": [
                {
                    "type": "file",
                    "file": {"filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"},
                },
                {
                    "type": "file",
                    "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBERi0y"},
                },
                {"type": "text", "text": "Plain notes."},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]


def test_tool_results_empty_several_texts_or_an_error_without_text() -> None:
    content = [
        {"type": "tool_result", "tool_use_id": "t1"},
        {
            "type": "tool_result",
            "tool_use_id": "t2",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"type": "tool_result", "tool_use_id": "t3", "is_error": True},
        {"type": "tool_result", "tool_use_id": "t4", "content": "", "is_error": False},
    ]
    out = request({"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": content}]})
    assert out["messages"] == [
        {"role": "tool", "tool_call_id": "t1", "content": ""},
        {
            "role": "tool",
            "tool_call_id": "t2",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "tool", "tool_call_id": "t3", "content": "Error:"},
        {"role": "tool", "tool_call_id": "t4", "content": ""},
    ]


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"top_k": 40}, "top_k"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
    ({"stop_sequences": ["1", "2", "3", "4", "5"]}, "stop_sequences"),
    ({"container": "container_011CU"}, "container"),
    ({"mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}]}, "mcp_servers"),
    ({"context_management": {"edits": []}}, "context_management"),
    ({"inference_geo": "us"}, "inference_geo"),
    ({"metadata": {"user_id": "u", "session": "s"}}, "metadata.session"),
    ({"output_config": {"task_budget": 100}}, "output_config.task_budget"),
    ({"output_config": {"format": {"type": "xml"}}}, "output_config.format.type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}, "tools[0].type"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type"),
    (
        {"tools": [{"name": "f", "input_schema": TIME_SCHEMA, "input_examples": [{"zone": "CET"}]}]},
        "tools[0].input_examples",
    ),
    (
        {"tools": [{"name": "f", "input_schema": TIME_SCHEMA, "defer_loading": True}]},
        "tools[0].defer_loading",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "file", "file_id": "file_011"}}],
                }
            ]
        },
        "messages[0].content[0].source.type",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}],
                }
            ]
        },
        "messages[0].content[0].source",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "x"},
                            "context": "from a memo",
                        }
                    ],
                }
            ]
        },
        "messages[0].content[0].context",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                            "citations": {"enabled": True},
                        }
                    ],
                }
            ]
        },
        "messages[0].content[0].citations",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [
                                {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}
                            ],
                        }
                    ],
                }
            ]
        },
        "messages[0].content[0].content[0].type",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "search_result", "source": "s", "title": "t", "content": []}],
                }
            ]
        },
        "messages[0].content[0].type",
    ),
    (
        {
            "messages": [
                user_turn(),
                {
                    "role": "assistant",
                    "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}],
                },
                user_turn(),
            ]
        },
        "messages[1].content[0].type",
    ),
    ({"messages": [user_turn(), {"role": "assistant", "content": "The answer is"}]}, "messages[1]"),
    # Unknown fields, at every level.
    ({"user_profile_id": "up_1"}, "user_profile_id"),
    ({"messages": [{"role": "user", "content": "Hi", "name": "ann"}]}, "messages[0].name"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "lang": "en"}]}]},
        "messages[0].content[0].lang",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://x/a.png"},
                            "transformations": {"oversized_image": "error"},
                        }
                    ],
                }
            ]
        },
        "messages[0].content[0].transformations",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://x/a.png", "detail": "low"},
                        }
                    ],
                }
            ]
        },
        "messages[0].content[0].source.detail",
    ),
    (
        {
            "messages": [
                user_turn(),
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "t",
                            "name": "f",
                            "input": {},
                            "caller": {"type": "code_execution_20250825", "tool_id": "s"},
                        }
                    ],
                },
                user_turn(),
            ]
        },
        "messages[1].content[0].caller",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t", "content": "ok", "toolset_name": "mcp"}
                    ],
                }
            ]
        },
        "messages[0].content[0].toolset_name",
    ),
    ({"tools": [{"name": "f", "input_schema": TIME_SCHEMA, "mcp_server": "x"}]}, "tools[0].mcp_server"),
    (
        {"tools": [{"name": "f", "input_schema": TIME_SCHEMA}], "tool_choice": {"type": "auto", "bias": 1}},
        "tool_choice.bias",
    ),
    (
        {"output_config": {"format": {"type": "json_schema", "schema": {}, "name": "x"}}},
        "output_config.format.name",
    ),
    ({"thinking": {"type": "adaptive", "budget": 5}}, "thinking.budget"),
]


@pytest.mark.parametrize(("fields", "param"), REFUSED, ids=[param for _, param in REFUSED])
def test_what_openai_chat_cannot_do_is_a_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    body = {"model": "m", "max_tokens": 9, "messages": [user_turn()], **fields}
    with pytest.raises(InvalidRequest) as refused:
        request(body)
    assert (refused.value.status, refused.value.code, refused.value.param) == (
        400,
        "unsupported_by_provider",
        param,
    )
    assert refused.value.message.startswith(f"'{param}': ")
    assert refused.value.message.endswith("(this model is served through OpenAI's chat API).")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"system": [{"type": "image"}]}, "system[0]"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
    ],
)
def test_a_malformed_request_is_a_plain_invalid_request(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        request({"model": "m", "max_tokens": 9, "messages": [user_turn()], **fields})
    assert (refused.value.code, refused.value.param) == ("invalid_request_error", param)


# ---- the whole answer ---------------------------------------------------------------

# OpenAI's chat.completion with text, two parallel tool calls and cached prompt tokens.
TOOL_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                    },
                    {
                        "id": "call_def",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
                    },
                ],
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

TOOL_MESSAGE: dict[str, Any] = {
    "id": "msg_chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "type": "message",
    "role": "assistant",
    "model": "gpt-4o-2024-08-06",
    "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_abc", "name": "get_weather", "input": {"location": "Paris"}},
        {"type": "tool_use", "id": "call_def", "name": "get_time", "input": {"zone": "CET"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 86,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 1920,
        "output_tokens": 300,
    },
}


def completion(message: dict[str, Any], finish_reason: str | None, **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "logprobs": None,
                "finish_reason": finish_reason,
                **choice,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def test_a_whole_answer_with_parallel_tool_calls_and_cached_tokens() -> None:
    openai.types.chat.ChatCompletion.model_validate(TOOL_COMPLETION)
    message = TRANSLATOR.response(TOOL_COMPLETION)
    assert message == TOOL_MESSAGE
    anthropic.types.Message.model_validate(message)


def test_usage_is_the_providers_own_with_the_cache_read_apart() -> None:
    assert TRANSLATOR.usage(TOOL_COMPLETION) == Usage(
        prompt_tokens=2006, completion_tokens=300, cached_prompt_tokens=1920
    )
    assert TRANSLATOR.usage({"choices": []}) is None
    # Cache writes, were a provider to report them, leave input_tokens too.
    assert anthropic_usage(Usage(2006, 300, 1920, 50)) == {
        "input_tokens": 36,
        "cache_creation_input_tokens": 50,
        "cache_read_input_tokens": 1920,
        "output_tokens": 300,
    }


@pytest.mark.parametrize(
    ("finish_reason", "choice", "stop"),
    [
        ("stop", {}, ("end_turn", None)),
        ("length", {}, ("max_tokens", None)),
        ("tool_calls", {}, ("tool_use", None)),
        ("function_call", {}, ("tool_use", None)),
        ("content_filter", {}, ("refusal", None)),
        (None, {}, ("end_turn", None)),
        # vLLM names the stop string it matched; EOS is a token id there.
        ("stop", {"stop_reason": "END"}, ("stop_sequence", "END")),
        ("stop", {"stop_reason": 128009}, ("end_turn", None)),
    ],
)
def test_stop_reason_from_finish_reason(
    finish_reason: str | None, choice: dict[str, Any], stop: tuple[str, str | None]
) -> None:
    message = TRANSLATOR.response(completion({"content": "Hi"}, finish_reason, **choice))
    assert (message["stop_reason"], message["stop_sequence"]) == stop
    assert message["content"] == [{"type": "text", "text": "Hi"}]
    assert message["usage"] == {
        "input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 5,
    }
    anthropic.types.Message.model_validate(message)


def test_a_refusal_is_text_with_stop_reason_refusal() -> None:
    message = TRANSLATOR.response(completion({"content": None, "refusal": "I can't help with that."}, "stop"))
    assert message["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert message["stop_reason"] == "refusal"


@pytest.mark.parametrize(
    ("arguments", "tool_input"),
    [
        ('{"a": [1, 2]}', {"a": [1, 2]}),
        ("", {}),
        ('{"location": "Par', {"_raw": '{"location": "Par'}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
    ],
)
def test_tool_arguments_become_an_object_and_go_back_as_they_came(
    arguments: str, tool_input: dict[str, Any]
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    message = TRANSLATOR.response(completion({"content": None, "tool_calls": [call]}, "tool_calls"))
    assert message["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": tool_input}]
    history = [user_turn(), {"role": "assistant", "content": message["content"]}, user_turn()]
    sent = request({"model": "m", "max_tokens": 9, "messages": history})["messages"][1]["tool_calls"][0]
    assert sent["function"]["arguments"] == (
        arguments if tool_input.get("_raw") else json.dumps(tool_input, separators=(",", ":"))
    )


def test_an_empty_answer_and_one_without_usage() -> None:
    body = completion({"content": ""}, "stop")
    del body["usage"]
    message = TRANSLATOR.response(body)
    assert message["content"] == []
    assert message["usage"] == {
        "input_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 0,
    }
    assert TRANSLATOR.usage(body) is None


# ---- the stream ---------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None, **extra: Any) -> bytes:
    """One chat.completion.chunk event as OpenAI frames it (compact JSON, usage null)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    body = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_f9f4fb6dbf",
        "choices": choices,
        "usage": None,
        **extra,
    }
    openai.types.chat.ChatCompletionChunk.model_validate(body)
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


USAGE_CHUNK = chunk(
    usage={
        "prompt_tokens": 120,
        "completion_tokens": 45,
        "total_tokens": 165,
        "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
)
DONE = b"data: [DONE]\n\n"

# Text, then two parallel tool calls, as OpenAI streams them.
TOOL_STREAM = [
    chunk({"role": "assistant", "content": "", "refusal": None}),
    chunk({"content": "Let me"}),
    chunk({"content": " check."}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"location'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '": "Paris"}'}}]}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_def",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"zone": "CET"}'}}]}),
    chunk({}, "tool_calls"),
    USAGE_CHUNK,
    DONE,
]

TOOL_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "type": "message",
            "role": "assistant",
            "model": "gpt-4o-2024-08-06",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 118,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " check."}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_abc", "name": "get_weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"location'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '": "Paris"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "call_def", "name": "get_time", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": '{"zone": "CET"}'},
    },
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 56,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 64,
            "output_tokens": 45,
        },
    },
    {"type": "message_stop"},
]


def events_of(out: list[bytes]) -> list[dict[str, Any]]:
    """Each event's data, after checking its framing: `event: <type>`, `data: <json>`."""
    parsed = []
    for event in out:
        name, data, end = event.split(b"\n", 2)
        assert end == b"\n" and name.startswith(b"event: ") and data.startswith(b"data: ")
        body = json.loads(data[len(b"data: ") :])
        assert body["type"] == name[len(b"event: ") :].decode()
        parsed.append(body)
    return parsed


def run(chunks: list[bytes], context: StreamContext = CONTEXT) -> tuple[list[dict[str, Any]], Any]:
    stream = TRANSLATOR.stream(context)
    out: list[bytes] = []
    for event in chunks:
        out.extend(stream.feed(event))
    out.extend(stream.finish())
    return events_of(out), stream


def rebuilt(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The message the Anthropic SDK assembles from the events."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in events:
        snapshot = accumulate_event(
            event=STREAM_EVENTS.validate_python(event), current_snapshot=snapshot, json_bufs=json_bufs
        )
    assert snapshot is not None
    return snapshot.to_dict(exclude_none=False)


def test_a_stream_of_text_and_parallel_tool_calls_in_anthropics_event_order() -> None:
    events, stream = run(TOOL_STREAM)
    assert events == TOOL_EVENTS
    assert stream.usage == Usage(prompt_tokens=120, completion_tokens=45, cached_prompt_tokens=64)
    assert stream.finished
    # The SDK assembles what the whole answer would have been.
    message = rebuilt(events)
    assert message["content"] == TOOL_MESSAGE["content"]
    assert (message["stop_reason"], message["usage"]["output_tokens"], message["usage"]["input_tokens"]) == (
        "tool_use",
        45,
        56,
    )


def test_the_events_are_framed_as_anthropic_frames_them() -> None:
    stream = TRANSLATOR.stream(CONTEXT)
    stream.feed(TOOL_STREAM[0])
    assert stream.feed(TOOL_STREAM[1]) == [
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me"}}\n\n',
    ]


def test_message_delta_waits_for_the_usage_chunk_after_finish_reason() -> None:
    stream = TRANSLATOR.stream(CONTEXT)
    for event in TOOL_STREAM[:8]:
        stream.feed(event)
    assert events_of(stream.feed(TOOL_STREAM[8])) == [{"type": "content_block_stop", "index": 2}]
    assert not stream.finished and stream.usage is None
    assert [e["type"] for e in events_of(stream.feed(USAGE_CHUNK))] == ["message_delta", "message_stop"]
    assert stream.feed(DONE) == []
    assert stream.finished
    assert stream.finish() == []


def test_a_stream_whose_server_sends_no_usage_ends_at_done() -> None:
    events, stream = run([chunk({"role": "assistant", "content": "Hi"}), chunk({}, "stop"), DONE])
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[-2] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 0},
    }
    assert stream.usage is None and stream.finished


def test_usage_in_the_finish_chunk_itself_and_a_matched_stop_sequence() -> None:
    last = json.loads(chunk({}, "stop")[6:])
    last["choices"][0]["stop_reason"] = "END"  # vLLM's extra field
    last["usage"] = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    finish_and_usage = b"data: " + json.dumps(last).encode() + b"\n\n"
    events, stream = run([chunk({"role": "assistant", "content": "Hi"}), finish_and_usage, DONE])
    assert events[-2] == {
        "type": "message_delta",
        "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
        "usage": {
            "input_tokens": 9,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 2,
        },
    }
    assert stream.usage == Usage(9, 2)


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [("length", "max_tokens"), ("content_filter", "refusal"), ("stop", "end_turn")],
)
def test_stream_stop_reasons(finish_reason: str, stop_reason: str) -> None:
    events, _ = run(
        [chunk({"role": "assistant", "content": "Hi"}), chunk({}, finish_reason), USAGE_CHUNK, DONE]
    )
    assert events[-2]["delta"] == {"stop_reason": stop_reason, "stop_sequence": None}


def test_a_streamed_refusal_is_text_with_stop_reason_refusal() -> None:
    events, _ = run(
        [
            chunk({"role": "assistant", "content": None, "refusal": ""}),
            chunk({"refusal": "I can't."}),
            chunk({}, "stop"),
            USAGE_CHUNK,
            DONE,
        ]
    )
    assert events[2] == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "I can't."},
    }
    assert events[-2]["delta"]["stop_reason"] == "refusal"


def test_text_after_a_tool_call_and_interleaved_arguments_go_to_their_blocks() -> None:
    events, _ = run(
        [
            chunk(
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "c0",
                            "type": "function",
                            "function": {"name": "a", "arguments": ""},
                        }
                    ],
                }
            ),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "b", "arguments": "{}"},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":1}'}}]}),
            chunk({"content": "Done."}),
            chunk({}, "tool_calls"),
            USAGE_CHUNK,
            DONE,
        ]
    )
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 0),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert [block.get("input") for block in rebuilt(events)["content"]] == [{"x": 1}, {}, None]


def test_an_in_stream_error_becomes_an_anthropic_error_event() -> None:
    error = b'data: {"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}\n\n'
    stream = TRANSLATOR.stream(CONTEXT)
    stream.feed(chunk({"role": "assistant", "content": "Hi"}))
    out = stream.feed(error)
    assert out == [
        b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"The provider\'s stream ended with an error (server_error)."}}\n\n'
    ]
    anthropic.types.ErrorResponse.model_validate(events_of(out)[0])
    assert stream.finished
    assert stream.finish() == []
    assert stream.feed(DONE) == []


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (
            {"message": "slow down", "type": "tokens", "code": "rate_limit_exceeded"},
            "rate_limit_error",
            " (tokens, rate_limit_exceeded)",
        ),
        (
            {"message": "bad", "type": "invalid_request_error"},
            "invalid_request_error",
            " (invalid_request_error)",
        ),
        # vLLM's shape: the status as the code.
        (
            {"object": "error", "message": "busy", "type": "ServiceUnavailableError", "code": 503},
            "overloaded_error",
            " (ServiceUnavailableError, 503)",
        ),
        ({"message": "?"}, "api_error", ""),
        # Free text in the type is not repeated either (it could name an internal host).
        ({"message": "refused by 10.0.0.5:8000", "type": "proxy error at 10.0.0.5"}, "api_error", ""),
    ],
)
def test_an_error_events_type_and_what_it_repeats(error: dict[str, Any], kind: str, message: str) -> None:
    out = TRANSLATOR.stream(CONTEXT).feed(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
    assert events_of(out) == [
        {
            "type": "error",
            "error": {"type": kind, "message": f"The provider's stream ended with an error{message}."},
        }
    ]


def test_a_cut_stream_gets_no_fabricated_ending() -> None:
    stream = TRANSLATOR.stream(CONTEXT)
    for event in TOOL_STREAM[:5]:
        stream.feed(event)
    assert stream.finish() == []
    assert not stream.finished and stream.usage is None


def test_a_stream_that_stops_after_its_finish_reason_is_whole() -> None:
    events, stream = run([chunk({"role": "assistant", "content": "Hi"}), chunk({}, "stop")])
    assert [e["type"] for e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert stream.finished and stream.usage is None


def test_comments_and_non_json_events_are_skipped_and_model_falls_back_to_the_callers() -> None:
    bare = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    events, _ = run(
        [b": keep-alive\n\n", bare, b"data: not json\n\n", DONE], StreamContext("claude-alias", False, 5)
    )
    assert events[0]["message"]["model"] == "claude-alias"
    assert events[0]["message"]["usage"]["input_tokens"] == 5
    assert events[-2]["delta"]["stop_reason"] == "end_turn"


def test_every_event_is_one_the_anthropic_sdk_parses() -> None:
    events, _ = run(TOOL_STREAM)
    for event in events:
        STREAM_EVENTS.validate_python(event)


# ---- against the fake OpenAI provider -----------------------------------------------


async def post(url: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{url}/chat/completions", json=body)
        await response.read()
        return response


async def stream_through(url: str, body: dict[str, Any], prompt_tokens: int) -> list[dict[str, Any]]:
    stream = TRANSLATOR.stream(StreamContext(body["model"], False, prompt_tokens))
    splitter = SseSplitter()
    out: list[bytes] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/chat/completions", json=body) as response,
    ):
        async for data in response.content.iter_any():
            for event in splitter.feed(data):
                out.extend(stream.feed(event))
    out.extend(stream.finish())
    return events_of(out)


WEATHER_REQUEST: dict[str, Any] = {
    "model": "gpt-4o",
    "max_tokens": 200,
    "messages": [user_turn("Weather in Paris and Rome?")],
    "tools": [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER_SCHEMA}],
}


async def test_a_tool_round_trip_against_the_fake_provider(
    fake_upstream: FakeUpstream, upstream_url: str
) -> None:
    fake_upstream.tool_calls_per_turn = 2
    fake_upstream.cached_tokens = 0
    first = await post(upstream_url, request(WEATHER_REQUEST))
    answer = TRANSLATOR.response(await first.json())
    anthropic.types.Message.model_validate(answer)
    assert answer["stop_reason"] == "tool_use"
    assert answer["usage"] == {
        "input_tokens": 13,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 14,
    }
    assert answer["content"] == [
        {"type": "tool_use", "id": "call_fake0", "name": "get_weather", "input": {"location": "fake"}},
        {"type": "tool_use", "id": "call_fake1", "name": "get_weather", "input": {"location": "fake"}},
    ]
    results = [
        {"type": "tool_result", "tool_use_id": block["id"], "content": "21°C"} for block in answer["content"]
    ]
    follow_up = {
        **WEATHER_REQUEST,
        "messages": [
            *WEATHER_REQUEST["messages"],
            {"role": "assistant", "content": answer["content"]},
            {"role": "user", "content": results},
        ],
    }
    sent = request(follow_up)
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool"]
    second = TRANSLATOR.response(await (await post(upstream_url, sent)).json())
    assert second["stop_reason"] == "end_turn"
    assert second["content"][0]["type"] == "text"
    assert (
        fake_upstream.requests[1]["messages"][1]["tool_calls"][0]["function"]["arguments"]
        == '{"location":"fake"}'
    )
    # The fake's figures: its prompt formula over the four messages, its reply's tokens.
    assert openai_chat_prompt_tokens(fake_upstream.requests[1]["messages"], "o200k_base") == 49
    assert second["usage"] == {
        "input_tokens": 49,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 14,
    }


async def test_a_streamed_tool_call_from_the_fake_provider(
    fake_upstream: FakeUpstream, upstream_url: str
) -> None:
    fake_upstream.cached_tokens = 3
    events = await stream_through(upstream_url, request(WEATHER_REQUEST, stream=True), prompt_tokens=50)
    assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]
    assert events[1]["content_block"] == {
        "type": "tool_use",
        "id": "call_fake0",
        "name": "get_weather",
        "input": {},
    }
    message = rebuilt(events)
    assert message["content"] == [
        {"type": "tool_use", "id": "call_fake0", "name": "get_weather", "input": {"location": "fake"}}
    ]
    usage = fake_upstream.requests[0]
    assert usage["stream_options"] == {"include_usage": True}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"]["cache_read_input_tokens"] == 3
    assert events[-1] == {"type": "message_stop"}


async def test_an_in_stream_error_from_the_fake_provider(
    fake_upstream: FakeUpstream, upstream_url: str
) -> None:
    fake_upstream.mode = "stream_error"
    events = await stream_through(
        upstream_url,
        request({"model": "gpt-4o", "max_tokens": 50, "messages": [user_turn()]}, stream=True),
        5,
    )
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert events[-1]["error"]["type"] == "api_error"
