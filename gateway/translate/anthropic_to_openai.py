"""Anthropic Messages callers served by an OpenAI chat deployment (docs/translation.md).

The caller's `POST /v1/messages` body becomes a chat completions body; the provider's
chat.completion (or its chunks) becomes an Anthropic message (or its events); usage is
the provider's own. Whatever OpenAI's chat API cannot do as asked is refused with a 400
`unsupported_by_provider` naming the field, never dropped in silence.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal, TypeGuard

from gateway.errors import InvalidRequest
from gateway.providers.anthropic_wire import ANTHROPIC_ERROR_TYPES
from gateway.providers.base import Usage
from gateway.providers.openai_wire import chunk_object, event_data, usage_from_object
from gateway.translate.base import StreamContext

# OpenAI's chat API takes at most this many stop sequences.
MAX_STOP_SEQUENCES = 4
# What message_start reports as output so far, as Anthropic's own streams do.
STARTING_OUTPUT_TOKENS = 1
# A tool call whose arguments are not a JSON object comes back as {"_raw": "<text>"},
# and goes out again as that text when the conversation returns.
RAW_ARGUMENTS_KEY = "_raw"
# How an Anthropic tool_result with is_error reaches the model: OpenAI's tool
# messages have no error flag, so the model is told in the content itself.
TOOL_ERROR_PREFIX = "Error: "
# OpenAI requires a name for a json_schema response format; Anthropic's has none.
RESPONSE_FORMAT_NAME = "output"
DEFAULT_PDF_FILENAME = "document.pdf"

MaxTokensField = Literal["max_completion_tokens", "max_tokens"]

# Top-level fields mapped by `request`.
_MAPPED_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stream",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
        "output_config",
        "output_format",
    }
)
# Top-level fields left out: they change how the request is served or billed, never
# the answer (OpenAI caches prompts by itself; its service tiers are its own).
_DROPPED_FIELDS = frozenset({"cache_control", "service_tier", "diagnostics"})
_EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})
UNKNOWN_FIELD = "not a field this gateway can carry to OpenAI's chat API"
# The fields each nested object may have (cache_control everywhere: dropped, as above).
_MESSAGE_KEYS = frozenset({"role", "content"})
_BLOCK_KEYS = {
    "text": frozenset({"type", "text", "cache_control", "citations"}),
    "image": frozenset({"type", "source", "cache_control", "transformations"}),
    "document": frozenset({"type", "source", "cache_control", "citations", "context", "title"}),
    "tool_use": frozenset({"type", "id", "name", "input", "cache_control", "caller"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
}
_SOURCE_KEYS = {
    "base64": frozenset({"type", "media_type", "data"}),
    "url": frozenset({"type", "url"}),
    "text": frozenset({"type", "media_type", "data"}),
}
_TOOL_KEYS = frozenset(
    {"type", "name", "description", "input_schema", "cache_control", "strict", "eager_input_streaming"}
    | {"input_examples", "defer_loading", "allowed_callers"}
)
_TOOL_CHOICE_KEYS = frozenset({"type", "name", "disable_parallel_tool_use"})
_THINKING_KEYS = frozenset({"type", "budget_tokens", "display"})
_FORMAT_KEYS = frozenset({"type", "schema"})
_FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _unsupported(param: str, why: str) -> InvalidRequest:
    # The code written out: tests/test_errors.py finds every code in the sources this way.
    return InvalidRequest(
        f"'{param}': {why} (this model is served through OpenAI's chat API).",
        param=param,
        code="unsupported_by_provider",
    )


def _check_keys(obj: Mapping[str, Any], known: frozenset[str], path: str) -> None:
    """Unknown fields are refused, not dropped: one that was meant could change the
    answer. A null is absent (SDKs send unset optional fields as null)."""
    for key, value in obj.items():
        if key not in known and value is not None:
            raise _unsupported(f"{path}.{key}", UNKNOWN_FIELD)


def _malformed(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' {what}.", param=param)


class AnthropicToOpenAI:
    """Messages API callers, OpenAI chat completions providers."""

    caller = "anthropic"
    provider = "openai"
    provider_path = "chat/completions"
    provider_count_route = "chat"

    def __init__(self, max_tokens_field: MaxTokensField = "max_completion_tokens") -> None:
        # OpenAI's current name for the completion cap, and the only one its reasoning
        # models accept; a compatible server that reads only `max_tokens` needs the other.
        self.max_tokens_field = max_tokens_field

    def request(
        self, body: Mapping[str, Any], upstream_model: str, stream: bool, max_tokens: int
    ) -> dict[str, Any]:
        for key, value in body.items():
            if key not in _MAPPED_FIELDS and key not in _DROPPED_FIELDS and value is not None:
                raise _unsupported(key, UNKNOWN_FIELD)
        out: dict[str, Any] = {"model": upstream_model, "messages": chat_messages(body)}
        caller_max = body.get("max_tokens")
        out[self.max_tokens_field] = caller_max if _is_int(caller_max) else max_tokens
        stop = _stop_sequences(body.get("stop_sequences"))
        if stop:
            out["stop"] = stop
        for key in ("temperature", "top_p"):
            if body.get(key) is not None:
                out[key] = body[key]
        if body.get("top_k") is not None:
            raise _unsupported("top_k", "OpenAI's chat API has no top_k sampling; leave it out")
        out.update(_tools(body))
        _check_thinking(body.get("thinking"))
        out.update(_output_config(body))
        user = _metadata_user(body.get("metadata"))
        if user is not None:
            out["user"] = user
        if stream:
            # The usage chunk is what settles the reservation: always ask for it.
            out["stream"] = True
            out["stream_options"] = {"include_usage": True}
        return out

    def response(self, body: Mapping[str, Any]) -> dict[str, Any]:
        choice = _first_choice(body.get("choices"))
        message = choice.get("message") if choice is not None else None
        message = message if isinstance(message, Mapping) else {}
        content: list[dict[str, Any]] = []
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            content.append({"type": "text", "text": refusal})
        for index, call in enumerate(_objects(message.get("tool_calls"))):
            function = call.get("function")
            function = function if isinstance(function, Mapping) else {}
            content.append(
                {
                    "type": "tool_use",
                    "id": _call_id(call.get("id"), index),
                    "name": _string(function.get("name")),
                    "input": tool_input(_string(function.get("arguments"))),
                }
            )
        stop_reason, stop_sequence = _stop_reason(choice, refused=isinstance(refusal, str) and bool(refusal))
        return {
            "id": _message_id(body.get("id")),
            "type": "message",
            "role": "assistant",
            "model": _string(body.get("model")),
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": anthropic_usage(self.usage(body)),
        }

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        return usage_from_object(body)

    def stream(self, context: StreamContext) -> ChunksToEvents:
        return ChunksToEvents(context)


# ---- the request ------------------------------------------------------------------


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The system prompt and every turn as chat messages, tool results as tool messages
    right after the assistant turn that called them."""
    out: list[dict[str, Any]] = []
    system = _system_content(body.get("system"))
    if system:  # an empty system prompt says nothing
        out.append({"role": "system", "content": system})
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _malformed("messages", "must be an array of messages")
    for index, message in enumerate(messages):
        path = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise _malformed(path, "must be an object")
        _check_keys(message, _MESSAGE_KEYS, path)
        role = message.get("role")
        if role == "user":
            out.extend(_user_turn(message.get("content"), path))
        elif role == "assistant":
            if index == len(messages) - 1:
                # Anthropic continues a final assistant turn (a prefill); OpenAI's chat
                # would answer after it instead, which is another answer.
                raise _unsupported(path, "a final assistant turn (prefill) cannot be continued")
            turn = _assistant_turn(message.get("content"), path)
            if turn is not None:
                out.append(turn)
        else:
            raise _malformed(f"{path}.role", "must be 'user' or 'assistant'")
    return out


def _system_content(system: Any) -> str | list[dict[str, Any]]:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _malformed("system", "must be a string or an array of text blocks")
    texts = []
    for index, block in enumerate(system):
        path = f"system[{index}]"
        if not isinstance(block, Mapping) or block.get("type") != "text":
            raise _malformed(path, "must be a text block")
        _check_keys(block, _BLOCK_KEYS["text"], path)
        _refuse_citations(block, path)
        texts.append(_text(block, path))
    return _text_content(texts) if texts else ""


def _user_turn(content: Any, path: str) -> list[dict[str, Any]]:
    """One user turn: its tool results first (each a tool message), then what the user
    wrote, if anything (Anthropic requires the tool results to come first anyway)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(_blocks(content, f"{path}.content")):
        block_path = f"{path}.content[{index}]"
        kind = block.get("type")
        if isinstance(kind, str) and kind in _BLOCK_KEYS:
            _check_keys(block, _BLOCK_KEYS[kind], block_path)
        if kind == "text":
            _refuse_citations(block, block_path)
            parts.append({"type": "text", "text": _text(block, block_path)})
        elif kind == "image":
            parts.append(_image_part(block, block_path))
        elif kind == "document":
            parts.append(_document_part(block, block_path))
        elif kind == "tool_result":
            tool_messages.append(_tool_message(block, block_path))
        else:
            raise _unsupported(f"{block_path}.type", f"OpenAI's chat API has no '{kind}' content")
    if not parts:
        return tool_messages
    only_text = len(parts) == 1 and parts[0]["type"] == "text"
    return [*tool_messages, {"role": "user", "content": parts[0]["text"] if only_text else parts}]


def _assistant_turn(content: Any, path: str) -> dict[str, Any] | None:
    """An assistant turn: its text, and its tool_use blocks as tool_calls. Thinking blocks
    are left out: they are Claude's own reasoning, signed for Claude, and OpenAI's chat
    takes no prior reasoning (its own models' reasoning is never sent back either)."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(_blocks(content, f"{path}.content")):
        block_path = f"{path}.content[{index}]"
        kind = block.get("type")
        if kind in ("text", "tool_use"):
            _check_keys(block, _BLOCK_KEYS[kind], block_path)
        if kind == "text":
            # Citations describe where earlier text came from; the text itself is kept.
            texts.append(_text(block, block_path))
        elif kind == "tool_use":
            calls.append(_tool_call(block, block_path))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _unsupported(f"{block_path}.type", f"OpenAI's chat API has no '{kind}' content")
    if not texts and not calls:
        return None
    turn: dict[str, Any] = {"role": "assistant", "content": _text_content(texts) if texts else None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _tool_call(block: Mapping[str, Any], path: str) -> dict[str, Any]:
    caller = block.get("caller")
    if caller is not None and caller != {"type": "direct"}:
        # Called from Anthropic's code execution: OpenAI's model never ran that code.
        raise _unsupported(f"{path}.caller", "only the model's own (direct) tool calls can be sent")
    call_id, name, tool_input_value = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(tool_input_value, Mapping):
        raise _malformed(path, "must be a tool_use block with a string id and name and an object input")
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments(tool_input_value)},
    }


def arguments(tool_input_value: Mapping[str, Any]) -> str:
    """A tool_use input as OpenAI's arguments string (compact JSON, as OpenAI writes it)."""
    raw = tool_input_value.get(RAW_ARGUMENTS_KEY)
    if len(tool_input_value) == 1 and isinstance(raw, str):
        return raw
    return json.dumps(tool_input_value, ensure_ascii=False, separators=(",", ":"))


def _tool_message(block: Mapping[str, Any], path: str) -> dict[str, Any]:
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str):
        raise _malformed(f"{path}.tool_use_id", "must be a string")
    content = block.get("content")
    texts: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        for index, part in enumerate(_blocks(content, f"{path}.content")):
            part_path = f"{path}.content[{index}]"
            if part.get("type") != "text":
                # OpenAI's tool messages carry text only.
                raise _unsupported(
                    f"{part_path}.type", f"a tool result cannot hold '{part.get('type')}' content"
                )
            _check_keys(part, _BLOCK_KEYS["text"], part_path)
            _refuse_citations(part, part_path)
            texts.append(_text(part, part_path))
    if block.get("is_error") is True:
        texts = [TOOL_ERROR_PREFIX + texts[0], *texts[1:]] if texts else [TOOL_ERROR_PREFIX.rstrip()]
    return {"role": "tool", "tool_call_id": tool_use_id, "content": _text_content(texts) if texts else ""}


def _image_part(block: Mapping[str, Any], path: str) -> dict[str, Any]:
    if block.get("transformations"):  # an empty object asks for nothing
        raise _unsupported(f"{path}.transformations", "OpenAI's chat API does not transform images")
    source = _source(block, path)
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str):
            raise _malformed(f"{path}.source", "must give a string media_type and data")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str):
            raise _malformed(f"{path}.source.url", "must be a string")
        return {"type": "image_url", "image_url": {"url": url}}
    raise _unsupported(f"{path}.source.type", f"an image from a '{kind}' source cannot be sent")


def _document_part(block: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A PDF as OpenAI's file part (base64 data), plain text as a text part."""
    _refuse_citations(block, path)
    if block.get("context") is not None:
        raise _unsupported(f"{path}.context", "a document's context has no counterpart")
    source = _source(block, path)
    kind, data, title = source.get("type"), source.get("data"), block.get("title")
    if kind == "base64" and source.get("media_type") == "application/pdf" and isinstance(data, str):
        filename = title if isinstance(title, str) and title else DEFAULT_PDF_FILENAME
        return {
            "type": "file",
            "file": {"filename": filename, "file_data": f"data:application/pdf;base64,{data}"},
        }
    if kind == "text" and isinstance(data, str):
        if title is not None:
            raise _unsupported(f"{path}.title", "a plain-text document's title has no counterpart")
        return {"type": "text", "text": data}
    raise _unsupported(f"{path}.source", "only base64 PDF and plain-text documents can be sent")


def _source(block: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise _malformed(f"{path}.source", "must be an object")
    kind = source.get("type")
    if isinstance(kind, str) and kind in _SOURCE_KEYS:
        _check_keys(source, _SOURCE_KEYS[kind], f"{path}.source")
    return source


def _refuse_citations(block: Mapping[str, Any], path: str) -> None:
    citations = block.get("citations")
    enabled = citations.get("enabled") if isinstance(citations, Mapping) else bool(citations)
    if enabled:
        raise _unsupported(f"{path}.citations", "OpenAI's chat API cannot cite documents")


def _stop_sequences(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _malformed("stop_sequences", "must be an array of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise _unsupported(
            "stop_sequences", f"OpenAI's chat API takes at most {MAX_STOP_SEQUENCES} stop sequences"
        )
    return list(value)


def _tools(body: Mapping[str, Any]) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` of the chat body."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _malformed("tools", "must be an array")
    functions = [_function_tool(tool, f"tools[{index}]") for index, tool in enumerate(tools or [])]
    out: dict[str, Any] = {"tools": functions} if functions else {}
    choice = body.get("tool_choice")
    if choice is None:
        return out
    if not isinstance(choice, Mapping):
        raise _malformed("tool_choice", "must be an object")
    _check_keys(choice, _TOOL_CHOICE_KEYS, "tool_choice")
    kind = choice.get("type")
    if kind in ("auto", "none"):
        if functions:  # OpenAI refuses a tool_choice without tools; without any, both mean the same
            out["tool_choice"] = kind
    elif kind in ("any", "tool"):
        if not functions:
            raise _malformed("tool_choice", f"of type '{kind}' needs tools")
        name = choice.get("name")
        if kind == "tool" and not isinstance(name, str):
            raise _malformed("tool_choice.name", "must be a string")
        out["tool_choice"] = "required" if kind == "any" else {"type": "function", "function": {"name": name}}
    else:
        raise _malformed("tool_choice.type", "must be one of auto, any, tool, none")
    if choice.get("disable_parallel_tool_use") is True and functions:
        out["parallel_tool_calls"] = False
    return out


def _function_tool(tool: Any, path: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise _malformed(path, "must be an object")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        # web_search, code_execution, bash, computer...: tools Anthropic runs itself.
        raise _unsupported(f"{path}.type", f"OpenAI's chat API cannot run Anthropic's '{kind}' tool")
    _check_keys(tool, _TOOL_KEYS, path)
    name, schema = tool.get("name"), tool.get("input_schema")
    if not isinstance(name, str) or not isinstance(schema, Mapping):
        raise _malformed(path, "must have a string name and an object input_schema")
    for key in ("input_examples", "defer_loading", "allowed_callers"):
        if tool.get(key):
            raise _unsupported(f"{path}.{key}", "OpenAI's function tools have no such field")
    function: dict[str, Any] = {"name": name}
    description = tool.get("description")
    if isinstance(description, str):
        function["description"] = description
    function["parameters"] = schema
    if tool.get("strict") is True:
        function["strict"] = True
    return {"type": "function", "function": function}


def _check_thinking(thinking: Any) -> None:
    """Disabled or adaptive thinking needs nothing (an adaptive answer may have no thinking
    block); thinking asked for outright is refused: OpenAI's chat returns no reasoning
    text, and a thinking budget has no counterpart."""
    if thinking is None:
        return
    kind = thinking.get("type") if isinstance(thinking, Mapping) else None
    if isinstance(thinking, Mapping):
        _check_keys(thinking, _THINKING_KEYS, "thinking")
    if kind not in ("disabled", "adaptive"):
        raise _unsupported(
            "thinking", "OpenAI's chat API returns no thinking blocks; send it disabled or leave it out"
        )


def _output_config(body: Mapping[str, Any]) -> dict[str, Any]:
    """Structured output as `response_format` (json_schema, strict) and effort as
    `reasoning_effort`."""
    out: dict[str, Any] = {}
    config = body.get("output_config")
    if config is not None and not isinstance(config, Mapping):
        raise _malformed("output_config", "must be an object")
    config = config or {}
    for key, value in config.items():
        if key not in ("format", "effort") and value is not None:
            raise _unsupported(f"output_config.{key}", UNKNOWN_FIELD)
    formats = [("output_config.format", config.get("format")), ("output_format", body.get("output_format"))]
    for param, output_format in formats:
        if output_format is None:
            continue
        schema = output_format.get("schema") if isinstance(output_format, Mapping) else None
        if not isinstance(output_format, Mapping) or output_format.get("type") != "json_schema":
            raise _unsupported(f"{param}.type", "only json_schema output formats can be sent")
        _check_keys(output_format, _FORMAT_KEYS, param)
        if not isinstance(schema, Mapping):
            raise _malformed(f"{param}.schema", "must be an object")
        # strict: Anthropic's structured outputs always follow the schema.
        json_schema = {"name": RESPONSE_FORMAT_NAME, "schema": schema, "strict": True}
        out["response_format"] = {"type": "json_schema", "json_schema": json_schema}
    effort = config.get("effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise _malformed("output_config.effort", f"must be one of {', '.join(sorted(_EFFORTS))}")
        out["reasoning_effort"] = effort
    return out


def _metadata_user(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise _malformed("metadata", "must be an object")
    for key, value in metadata.items():
        if key != "user_id" and value is not None:
            raise _unsupported(f"metadata.{key}", UNKNOWN_FIELD)
    user = metadata.get("user_id")
    if user is not None and not isinstance(user, str):
        raise _malformed("metadata.user_id", "must be a string")
    return user


def _blocks(content: Any, param: str) -> list[Mapping[str, Any]]:
    """The blocks of a `content` field (`param` names it)."""
    if not isinstance(content, list) or not all(isinstance(block, Mapping) for block in content):
        raise _malformed(param, "must be a string or an array of content blocks")
    return content


def _text(block: Mapping[str, Any], path: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _malformed(f"{path}.text", "must be a string")
    return text


def _text_content(texts: list[str]) -> str | list[dict[str, Any]]:
    """One text as a plain string (what every compatible server reads), several as parts."""
    return texts[0] if len(texts) == 1 else [{"type": "text", "text": text} for text in texts]


# ---- the answer ---------------------------------------------------------------------


def anthropic_usage(usage: Usage | None) -> dict[str, int]:
    """An Anthropic usage block: input_tokens excludes what was read from the cache.
    A provider that reported no usage shows zeros (the gateway settles on its count)."""
    if usage is None:
        usage = Usage(0, 0)
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_prompt_tokens - usage.cache_write_prompt_tokens,
        "cache_creation_input_tokens": usage.cache_write_prompt_tokens,
        "cache_read_input_tokens": usage.cached_prompt_tokens,
        "output_tokens": usage.completion_tokens,
    }


def tool_input(arguments_text: str) -> dict[str, Any]:
    """OpenAI's arguments string as a tool_use input: a JSON object as it is, nothing as
    {}, anything else kept whole as {"_raw": text} rather than lost."""
    if not arguments_text.strip():
        return {}
    try:
        parsed = json.loads(arguments_text)
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {RAW_ARGUMENTS_KEY: arguments_text}


def _stop_reason(choice: Mapping[str, Any] | None, refused: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a choice. OpenAI's `stop` does not say
    whether a stop sequence matched; vLLM-style servers name it in `stop_reason`."""
    if refused:
        return "refusal", None
    finish_reason = choice.get("finish_reason") if choice is not None else None
    matched = choice.get("stop_reason") if choice is not None else None
    if finish_reason == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    return _FINISH_TO_STOP.get(str(finish_reason), "end_turn"), None


def _first_choice(choices: Any) -> Mapping[str, Any] | None:
    """The choice of index 0 (the only one asked for: Anthropic has no `n`)."""
    for choice in _objects(choices):
        if choice.get("index", 0) == 0:
            return choice
    return None


def _message_id(provider_id: Any) -> str:
    # The provider's id kept inside ours, so the two can be matched in logs.
    return f"msg_{provider_id}" if isinstance(provider_id, str) and provider_id else f"msg_{uuid.uuid4().hex}"


def _call_id(provider_id: Any, index: int) -> str:
    return (
        provider_id
        if isinstance(provider_id, str) and provider_id
        else f"call_{uuid.uuid4().hex[:24]}_{index}"
    )


def _objects(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- the stream ---------------------------------------------------------------------


def sse_event(data: Mapping[str, Any]) -> bytes:
    """One Anthropic SSE event: its type named on the `event:` line and in the data."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {data['type']}\ndata: {payload}\n\n".encode()


# What of a provider's error may be repeated: short identifiers (as docs/errors.md says).
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# An OpenAI error's type or status → Anthropic's error type.
_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_exceeded": "rate_limit_error",
    "rate_limit_error": "rate_limit_error",
    "tokens": "rate_limit_error",
    "requests": "rate_limit_error",
    "overloaded_error": "overloaded_error",
}
# Anthropic's error type for each status (the table the gateway's own Anthropic routes answer with),
# plus 503, which an OpenAI-compatible server sends when overloaded.
_STATUS_ERROR_TYPES = {**ANTHROPIC_ERROR_TYPES, 503: "overloaded_error"}


def error_event(error: Mapping[str, Any]) -> bytes:
    """OpenAI's in-stream `{"error": {...}}` as Anthropic's `error` event. The provider's
    own message stays out, as with every provider error (docs/errors.md: it can hold
    internal addresses); its type and code are named when they are plain identifiers."""
    provider_type, code = error.get("type"), error.get("code")
    kind = _ERROR_TYPES.get(str(provider_type)) or _ERROR_TYPES.get(str(code))
    if kind is None and _is_int(code):
        kind = _STATUS_ERROR_TYPES.get(code)
    named = [str(value) for value in (provider_type, code) if _is_identifier(value)]
    detail = f" ({', '.join(named)})" if named else ""
    message = f"The provider's stream ended with an error{detail}."
    return sse_event({"type": "error", "error": {"type": kind or "api_error", "message": message}})


def _is_identifier(value: Any) -> bool:
    if _is_int(value):
        return 100 <= value <= 599
    return isinstance(value, str) and _IDENTIFIER.fullmatch(value) is not None


class ChunksToEvents:
    """One stream: OpenAI chat.completion.chunk events in, Anthropic Messages events out.

    message_start comes with the first chunk (input tokens: the gateway's pre-flight
    count, the only figure known then); each run of text and each tool call is one
    content block, started when the kind of content or the tool call's index changes;
    message_delta waits for the provider's usage chunk, which follows the chunk with
    finish_reason, or for [DONE]; then message_stop.
    """

    def __init__(self, context: StreamContext) -> None:
        self.usage: Usage | None = None
        # [DONE] or an error chunk was seen (or the stream stopped after its finish_reason).
        self.finished = False
        self._context = context
        self._started = False
        self._ended = False
        self._blocks = 0
        # The open block: "text" or the OpenAI index of a tool call; None when closed.
        self._open: str | int | None = None
        # OpenAI tool-call index → Anthropic block index.
        self._tool_blocks: dict[int, int] = {}
        self._finish: Mapping[str, Any] | None = None
        self._refused = False

    def feed(self, event: bytes) -> list[bytes]:
        payload = event_data(event)
        if payload is None:
            return []
        if payload.strip() == b"[DONE]":
            self.finished = True
            return self._ending(done=True)
        chunk = chunk_object(payload)
        if chunk is None or self._ended:
            return []
        error = chunk.get("error")
        if isinstance(error, Mapping):
            # Anthropic's streams end with the error event: no block or message is closed.
            self.finished = self._ended = True
            return [error_event(error)]
        out = [] if self._started else self._start(chunk)
        choice = _first_choice(chunk.get("choices"))
        if choice is not None:
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                out.extend(self._delta(delta))
            if choice.get("finish_reason") is not None:
                self._finish = choice
                out.extend(self._close_block())
        usage = usage_from_object(chunk)
        if usage is not None:
            self.usage = usage
            out.extend(self._ending(done=False))
        return out

    def finish(self) -> list[bytes]:
        """The closing events if the provider's answer was whole (a finish_reason came),
        else nothing: a cut stream gets no fabricated message_stop."""
        if self._ended or self._finish is None:
            return []
        self.finished = True
        return self._ending(done=True)

    def _start(self, chunk: Mapping[str, Any]) -> list[bytes]:
        self._started = True
        model = chunk.get("model")
        message: dict[str, Any] = {
            "id": _message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": model if isinstance(model, str) and model else self._context.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self._context.prompt_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": STARTING_OUTPUT_TOKENS,
            },
        }
        return [sse_event({"type": "message_start", "message": message})]

    def _delta(self, delta: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        for field in ("content", "refusal"):
            text = delta.get(field)
            if isinstance(text, str) and text:
                self._refused = self._refused or field == "refusal"
                out.extend(self._text(text))
        for position, call in enumerate(_objects(delta.get("tool_calls"))):
            index = call.get("index")
            out.extend(self._tool_call(call, index if _is_int(index) else position))
        return out

    def _text(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._open != "text":
            out.extend(self._close_block())
            out.append(self._open_block("text", {"type": "text", "text": ""}))
        delta = {"type": "text_delta", "text": text}
        out.append(sse_event({"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}))
        return out

    def _tool_call(self, call: Mapping[str, Any], tool_index: int) -> list[bytes]:
        out: list[bytes] = []
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        if tool_index not in self._tool_blocks:
            out.extend(self._close_block())
            block = {
                "type": "tool_use",
                "id": _call_id(call.get("id"), tool_index),
                "name": _string(function.get("name")),
                "input": {},
            }
            out.append(self._open_block(tool_index, block))
            self._tool_blocks[tool_index] = self._blocks - 1
        pieces = function.get("arguments")
        if isinstance(pieces, str) and pieces:
            # A piece for an earlier call (servers that interleave calls) goes to that
            # call's block: clients gather input_json_delta by block index.
            delta = {"type": "input_json_delta", "partial_json": pieces}
            index = self._tool_blocks[tool_index]
            out.append(sse_event({"type": "content_block_delta", "index": index, "delta": delta}))
        return out

    def _open_block(self, kind: str | int, block: Mapping[str, Any]) -> bytes:
        self._open = kind
        self._blocks += 1
        return sse_event({"type": "content_block_start", "index": self._blocks - 1, "content_block": block})

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [sse_event({"type": "content_block_stop", "index": self._blocks - 1})]

    def _ending(self, done: bool) -> list[bytes]:
        """message_delta and message_stop, once the answer and its usage are known (or
        [DONE] says no usage will come)."""
        if self._ended or (not done and (self._finish is None or self.usage is None)):
            return []
        self._ended = True
        out = [] if self._started else self._start({})
        out.extend(self._close_block())
        stop_reason, stop_sequence = _stop_reason(self._finish, refused=self._refused)
        usage: dict[str, int] = {"output_tokens": 0}
        if self.usage is not None:
            usage = anthropic_usage(self.usage)
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        out.append(sse_event({"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(sse_event({"type": "message_stop"}))
        return out
