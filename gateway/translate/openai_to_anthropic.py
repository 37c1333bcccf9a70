"""OpenAI chat completions callers served by an Anthropic Messages deployment.

The caller's body becomes a Messages body, Claude's message (whole or streamed) becomes
a chat completion (or its chunks), and Claude's usage is read on the way with its cache
reads and writes kept apart. What Claude cannot do as asked is a 400
`unsupported_by_provider` naming the field; docs/translation.md has the whole table.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.errors import InvalidRequest
from gateway.providers import anthropic_wire
from gateway.providers.base import Usage
from gateway.providers.openai_wire import DONE_EVENT, chunk_object, event_data
from gateway.translate.base import StreamContext

# The tool through which a JSON answer is asked for when Claude's structured outputs
# cannot carry it (json_object, a json_schema without strict): forced, so Claude answers
# only by calling it, and its input comes back as the message content. Responses are
# translated without their request, so the name alone marks it: a caller's tool may not
# take it.
JSON_ANSWER_TOOL = "json_answer"

# Top-level fields this module carries to Claude, each by its own mapping below.
_CARRIED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "stop",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "user",
        "safety_identifier",
        "service_tier",
    }
)
# Fields that never reach the model, so dropping them changes no answer: OpenAI's own
# bookkeeping (metadata of stored completions) and prompt-cache routing hints.
_WITHOUT_EFFECT = frozenset(
    {"metadata", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"}
)


def _never(_: Any) -> bool:
    return False


# Fields Claude cannot honour: each is refused unless it holds the value that asks for
# nothing (a null is always absent), with the reason the caller reads.
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda value: value == 1, "Claude returns one choice per request; send n: 1 or leave it out."),
    "logprobs": (lambda value: value is False, "Claude does not return log probabilities."),
    "top_logprobs": (lambda value: value == 0, "Claude does not return log probabilities."),
    "frequency_penalty": (lambda value: value == 0, "Claude has no frequency penalty."),
    "presence_penalty": (lambda value: value == 0, "Claude has no presence penalty."),
    "logit_bias": (lambda value: value == {}, "Claude takes no logit bias."),
    "seed": (_never, "Claude has no seeded sampling: its answers cannot be made repeatable."),
    "audio": (_never, "Claude does not answer in audio."),
    "modalities": (lambda value: value == ["text"], "Claude answers in text only."),
    "prediction": (_never, "Claude takes no predicted output."),
    "store": (lambda value: value is False, "Completions of Claude models are not stored by OpenAI."),
    "reasoning_effort": (
        lambda value: value == "none",
        "Claude's extended thinking cannot be carried through chat completions (its thinking "
        "blocks must be sent back with tool results); use /v1/messages for it.",
    ),
    "verbosity": (lambda value: value == "medium", "Claude has no verbosity setting."),
    "web_search_options": (_never, "Claude's web search is a server tool of the Messages API."),
    "moderation": (_never, "Claude models are not moderated by OpenAI's moderation."),
    "functions": (_never, "the legacy functions are not translated; send them as tools."),
    "function_call": (_never, "the legacy function_call is not translated; send tool_choice."),
}

# OpenAI's service tiers Claude has: auto (priority capacity when the organisation has
# it, else standard) and default (standard capacity only).
_SERVICE_TIERS = {"auto": "auto", "default": "standard_only"}
_ANSWERED_TIERS = {"standard": "default", "priority": "priority"}

# Claude's temperature runs 0-1, OpenAI's 0-2; both are the same softmax temperature,
# so values up to 1 mean the same and above 1 there is nothing to map them to.
MAX_TEMPERATURE = 1.0

IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    # Only server tools pause a turn, and none are sent; should one, the answer is
    # unfinished, which of OpenAI's reasons only `length` says.
    "pause_turn": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_MESSAGE_KEYS = {
    "system": frozenset({"role", "content", "name"}),
    "developer": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset(
        {"role", "content", "name", "tool_calls", "refusal", "audio", "function_call", "annotations"}
    ),
    "tool": frozenset({"role", "content", "tool_call_id", "name"}),
}


def _refuse(param: str, reason: str) -> InvalidRequest:
    # The code written out: tests/test_errors.py finds every code in the sources this way.
    return InvalidRequest(f"{param}: {reason}", param=param, code="unsupported_by_provider")


def _invalid(param: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"{param} must be {expected}.", param=param)


def _present(obj: Mapping[str, Any], key: str) -> bool:
    """A key holding null is absent: SDKs serialise unset optional fields as null."""
    return obj.get(key) is not None


def _check_keys(obj: Mapping[str, Any], known: frozenset[str], path: str) -> None:
    """Unknown fields are refused, not dropped: one that was meant would change the answer."""
    for key in obj:
        if key not in known and obj[key] is not None:
            where = f"{path}.{key}" if path else key
            raise _refuse(where, "not a field this gateway can carry to Claude models.")


class OpenAIToAnthropic:
    """POST /v1/chat/completions for a model whose deployment speaks Anthropic's Messages API."""

    caller = "openai"
    provider = "anthropic"
    provider_path = "messages"
    provider_count_route = "messages"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        # `created` of the chat completions (Claude's messages carry no time).
        self._clock = clock

    def request(
        self, body: Mapping[str, Any], upstream_model: str, stream: bool, max_tokens: int
    ) -> dict[str, Any]:
        _check_top_level(body)
        system, messages = _conversation(body.get("messages"))
        out: dict[str, Any] = {"model": upstream_model, "max_tokens": _max_tokens(body, max_tokens)}
        if system:
            out["system"] = system
        out["messages"] = messages
        out.update(_sampling(body))
        out.update(_tools(body))
        out.update(_response_format(body, has_tools=bool(out.get("tools"))))
        # Both name the end user; safety_identifier is the newer of the two.
        for field in ("safety_identifier", "user"):
            if _present(body, field):
                if not isinstance(body[field], str):
                    raise _invalid(field, "a string")
                out["metadata"] = {"user_id": body[field]}
                break
        if _present(body, "service_tier"):
            tier = _SERVICE_TIERS.get(body["service_tier"])
            if tier is None:
                raise _refuse("service_tier", "Claude offers the auto and default tiers only.")
            out["service_tier"] = tier
        if stream:
            out["stream"] = True
        return out

    def response(self, body: Mapping[str, Any]) -> dict[str, Any]:
        content = body.get("content")
        blocks = content if isinstance(content, list) else []
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        json_answer: str | None = None
        for block in blocks:
            if not isinstance(block, Mapping):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif block.get("type") == "tool_use":
                arguments = json.dumps(block.get("input", {}), ensure_ascii=False, separators=(",", ":"))
                if block.get("name") == JSON_ANSWER_TOOL:
                    json_answer = arguments
                else:
                    calls.append(
                        {
                            "id": block.get("id"),
                            "type": "function",
                            "function": {"name": block.get("name"), "arguments": arguments},
                        }
                    )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": json_answer if json_answer is not None else ("".join(texts) if texts else None),
            "refusal": None,
            "annotations": [],
        }
        if calls:
            message["tool_calls"] = calls
        answered_in_json = json_answer is not None and not calls
        finish = finish_reason(body.get("stop_reason"), answered_in_json)
        out: dict[str, Any] = {
            "id": body.get("id"),
            "object": "chat.completion",
            "created": int(self._clock()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": openai_usage(self.usage(body)),
        }
        usage = body.get("usage")
        tier = usage.get("service_tier") if isinstance(usage, Mapping) else None
        if isinstance(tier, str) and tier in _ANSWERED_TIERS:
            out["service_tier"] = _ANSWERED_TIERS[tier]
        return out

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        return anthropic_wire.message_usage(body.get("usage"))

    def stream(self, context: StreamContext) -> ChunkStream:
        return ChunkStream(context, created=int(self._clock()))


# ---------------------------------------------------------------- the request


def _check_top_level(body: Mapping[str, Any]) -> None:
    for field, value in body.items():
        if value is None or field in _CARRIED or field in _WITHOUT_EFFECT:
            continue
        refused = _REFUSED.get(field)
        if refused is None:
            raise _refuse(field, "not a chat completions field this gateway can carry to Claude models.")
        asks_nothing, reason = refused
        if not asks_nothing(value):
            raise _refuse(field, reason)


def _max_tokens(body: Mapping[str, Any], reserved: int) -> int:
    """Claude requires a cap: the caller's (the newer field first), else what the gateway reserved."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _invalid(field, "a whole number of at least 1")
            return value
    return reserved


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ("temperature", "top_p"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _invalid(field, "a number")
        out[field] = value
    if out.get("temperature", 0) > MAX_TEMPERATURE:
        raise _refuse("temperature", "Claude's temperature runs from 0 to 1; send a value of at most 1.")
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        if stop:
            out["stop_sequences"] = list(stop)
    elif stop is not None:
        raise _invalid("stop", "a string or an array of strings")
    return out


# ---------------------------------------------------------------- messages


def _conversation(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system text blocks, alternating user/assistant turns) for the caller's messages.

    System and developer messages go to `system` in their order wherever they stand:
    Claude takes no instructions between turns. Consecutive messages of one role are
    merged into one turn, and tool messages become tool_result blocks of a user turn.
    """
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "a non-empty array of messages")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for position, message in enumerate(messages):
        path = f"messages[{position}]"
        if not isinstance(message, Mapping):
            raise _invalid(path, "an object")
        role = message.get("role")
        known = _MESSAGE_KEYS.get(role) if isinstance(role, str) else None
        if known is None:
            raise _refuse(f"{path}.role", f"the role {role!r} has no Claude equivalent.")
        _check_keys(message, known, path)
        if _present(message, "name") and role != "tool":
            # A tool message's name repeats its call's; a participant's name has no place in Claude's turns.
            raise _refuse(f"{path}.name", "Claude's messages carry no participant names.")
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content"), f"{path}.content"))
        elif role == "user":
            _add_turn(turns, "user", _user_blocks(message.get("content"), f"{path}.content"))
        elif role == "assistant":
            _add_turn(turns, "assistant", _assistant_blocks(message, path))
        else:
            _add_turn(turns, "user", [_tool_result(message, path)])
    if not turns:
        raise _refuse("messages", "Claude needs at least one user message besides the system messages.")
    return system, turns


def _add_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _parts(content: Any, path: str) -> list[tuple[str, Mapping[str, Any]]]:
    """(path, part) for each content part; a string is one text part."""
    if isinstance(content, str):
        return [(path, {"type": "text", "text": content})]
    if not isinstance(content, list):
        raise _invalid(path, "a string or an array of content parts")
    parts: list[tuple[str, Mapping[str, Any]]] = []
    for position, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise _invalid(f"{path}[{position}]", "a content part with a type")
        parts.append((f"{path}[{position}]", part))
    return parts


# Content part fields besides the part's own: a prompt-cache breakpoint changes no answer.
_PART_COMMON = frozenset({"type", "prompt_cache_breakpoint"})


def _text_block(part: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
    _check_keys(part, _PART_COMMON | {"text"}, path)
    text = part.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{path}.text", "a string")
    # Claude refuses empty text blocks; an empty part says nothing.
    return [{"type": "text", "text": text}] if text else []


def _text_blocks(content: Any, path: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part_path, part in _parts(content, path):
        if part["type"] != "text":
            raise _refuse(f"{part_path}.type", "only text parts are allowed here.")
        blocks.extend(_text_block(part, part_path))
    return blocks


def _user_blocks(content: Any, path: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part_path, part in _parts(content, path):
        kind = part["type"]
        if kind == "text":
            blocks.extend(_text_block(part, part_path))
        elif kind == "image_url":
            blocks.append(_image_block(part, part_path))
        elif kind == "file":
            blocks.append(_document_block(part, part_path))
        elif kind == "input_audio":
            raise _refuse(f"{part_path}.type", "Claude takes no audio input.")
        else:
            raise _refuse(f"{part_path}.type", f"the content part type {kind!r} has no Claude equivalent.")
    return blocks


def _data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a base64 data: URL, or None for anything else."""
    if not url.startswith("data:") or "," not in url:
        return None
    header, data = url[5:].split(",", 1)
    media_type, *parameters = header.split(";")
    if "base64" not in parameters:
        return None
    return media_type.strip().lower(), data


def _image_block(part: Mapping[str, Any], path: str) -> dict[str, Any]:
    _check_keys(part, _PART_COMMON | {"image_url"}, path)
    image = part.get("image_url")
    if not isinstance(image, Mapping) or not isinstance(image.get("url"), str):
        raise _invalid(f"{path}.image_url.url", "a string")
    # `detail` chooses OpenAI's image resolution; Claude sizes every image its own way.
    _check_keys(image, frozenset({"url", "detail"}), f"{path}.image_url")
    url: str = image["url"]
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    inline = _data_url(url)
    if inline is None:
        raise _refuse(f"{path}.image_url.url", "Claude takes images by http(s) URL or base64 data: URL.")
    media_type, data = inline
    if media_type == "image/jpg":
        media_type = "image/jpeg"  # a common misspelling of the registered type
    if media_type not in IMAGE_MEDIA_TYPES:
        raise _refuse(
            f"{path}.image_url.url", f"Claude takes JPEG, PNG, GIF and WebP images, not {media_type!r}."
        )
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _document_block(part: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A PDF given inline: Claude reads it as a document block. Files uploaded to OpenAI
    (file_id) are out of its reach."""
    _check_keys(part, _PART_COMMON | {"file"}, path)
    file = part.get("file")
    if not isinstance(file, Mapping):
        raise _invalid(f"{path}.file", "an object")
    _check_keys(file, frozenset({"file_data", "file_id", "filename"}), f"{path}.file")
    if _present(file, "file_id"):
        raise _refuse(f"{path}.file.file_id", "files uploaded to OpenAI cannot be read by Claude.")
    file_data = file.get("file_data")
    filename = file.get("filename")
    if not isinstance(file_data, str):
        raise _invalid(f"{path}.file.file_data", "a string")
    inline = _data_url(file_data)
    if inline is None and isinstance(filename, str) and filename.lower().endswith(".pdf"):
        inline = ("application/pdf", file_data)
    if inline is None or inline[0] != "application/pdf":
        raise _refuse(f"{path}.file.file_data", "Claude takes files as PDF documents only.")
    source = {"type": "base64", "media_type": "application/pdf", "data": inline[1]}
    return {"type": "document", "source": source}


def _assistant_blocks(message: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
    for field in ("audio", "function_call"):
        if _present(message, field):
            raise _refuse(f"{path}.{field}", "Claude's turns carry no audio and no legacy function_call.")
    blocks: list[dict[str, Any]] = []
    content = message.get("content")
    if content is not None:
        for part_path, part in _parts(content, f"{path}.content"):
            if part["type"] == "text":
                blocks.extend(_text_block(part, part_path))
            elif part["type"] == "refusal":
                blocks.extend(_refusal_block(part, part_path))
            else:
                raise _refuse(f"{part_path}.type", "assistant messages hold text and refusal parts only.")
    refusal = message.get("refusal")
    if refusal is not None:
        blocks.extend(_refusal_block({"type": "refusal", "refusal": refusal}, f"{path}.refusal"))
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _invalid(f"{path}.tool_calls", "an array")
        blocks.extend(_tool_use(call, f"{path}.tool_calls[{index}]") for index, call in enumerate(calls))
    return blocks


def _refusal_block(part: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
    """An earlier refusal is what the assistant said: Claude reads it as its own text."""
    _check_keys(part, _PART_COMMON | {"refusal"}, path)
    text = part.get("refusal")
    if not isinstance(text, str):
        raise _invalid(path, "a string")
    return [{"type": "text", "text": text}] if text else []


def _tool_use(call: Any, path: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise _invalid(path, "an object")
    if call.get("type", "function") != "function":
        raise _refuse(f"{path}.type", "only function tool calls can be carried to Claude.")
    _check_keys(call, frozenset({"id", "type", "function"}), path)
    function = call.get("function")
    if not isinstance(call.get("id"), str) or not isinstance(function, Mapping):
        raise _invalid(path, "a tool call with an id and a function")
    _check_keys(function, frozenset({"name", "arguments"}), f"{path}.function")
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise _invalid(f"{path}.function", "a name and arguments, both strings")
    try:
        # Some models write "" for a function without parameters.
        tool_input = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        tool_input = None
    if not isinstance(tool_input, dict):
        raise _refuse(
            f"{path}.function.arguments",
            "Claude takes a tool call's arguments as a JSON object; this is not one.",
        )
    return {"type": "tool_use", "id": call["id"], "name": name, "input": tool_input}


def _tool_result(message: Mapping[str, Any], path: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise _invalid(f"{path}.tool_call_id", "a string")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            result["content"] = content
    else:
        blocks = _text_blocks(content, f"{path}.content")
        if blocks:
            result["content"] = blocks
    return result


# ---------------------------------------------------------------- tools and formats


def _tools(body: Mapping[str, Any]) -> dict[str, Any]:
    tools = body.get("tools")
    if tools is None or tools == []:
        choice = body.get("tool_choice")
        if choice is not None and choice not in ("none", "auto"):
            raise _invalid("tool_choice", "none or auto when no tools are given")
        return {}
    if not isinstance(tools, list):
        raise _invalid("tools", "an array")
    out: dict[str, Any] = {"tools": [_tool(tool, f"tools[{index}]") for index, tool in enumerate(tools)]}
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and choice.get("type") != "none":
        # Claude's switch lives on tool_choice; auto is its default.
        choice = {"type": "auto", **choice, "disable_parallel_tool_use": True}
    if choice:
        out["tool_choice"] = choice
    return out


def _tool(tool: Any, path: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise _invalid(path, "an object")
    if tool.get("type") != "function":
        raise _refuse(f"{path}.type", "only function tools can be carried to Claude.")
    _check_keys(tool, frozenset({"type", "function"}), path)
    function = tool.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise _invalid(f"{path}.function.name", "a string")
    _check_keys(function, frozenset({"name", "description", "parameters", "strict"}), f"{path}.function")
    name: str = function["name"]
    if name == JSON_ANSWER_TOOL:
        raise _refuse(f"{path}.function.name", f"{JSON_ANSWER_TOOL!r} is reserved for JSON answers.")
    out: dict[str, Any] = {"name": name}
    if _present(function, "description"):
        out["description"] = function["description"]
    # Claude requires a schema; OpenAI's default is a function without parameters.
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    if function.get("strict") is True:
        out["strict"] = True
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice is None:
        return {}
    named = {"none": "none", "auto": "auto", "required": "any"}
    if isinstance(choice, str) and choice in named:
        return {"type": named[choice]}
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            return {"type": "tool", "name": function["name"]}
    if isinstance(choice, Mapping) and choice.get("type") in ("allowed_tools", "custom"):
        raise _refuse("tool_choice", "Claude takes none, auto, required or one named function.")
    raise _invalid("tool_choice", "none, auto, required or {type: function, function: {name}}")


def _response_format(body: Mapping[str, Any], has_tools: bool) -> dict[str, Any]:
    """A strict json_schema is Claude's structured output (generally available, the same
    guarantee); anything else asking for JSON is a forced call of JSON_ANSWER_TOOL, which
    the caller's own tools would compete with."""
    response_format = body.get("response_format")
    if response_format is None:
        return {}
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return {}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise _invalid("response_format.json_schema.schema", "a JSON schema object")
        if spec.get("strict") is True:
            return {"output_config": {"format": {"type": "json_schema", "schema": spec["schema"]}}}
        if spec["schema"].get("type") != "object":
            raise _refuse(
                "response_format.json_schema.schema",
                "without strict, Claude answers JSON as a tool's input, which must be an object; "
                "set strict: true for other schemas.",
            )
        description = f"Give your answer as this tool's input ({spec.get('name', 'response')})."
        if isinstance(spec.get("description"), str):
            description += " " + spec["description"]
        return _json_answer_tool(dict(spec["schema"]), description, has_tools)
    if kind == "json_object":
        return _json_answer_tool({"type": "object"}, "Give your answer as this tool's input.", has_tools)
    raise _invalid("response_format.type", "text, json_schema or json_object")


def _json_answer_tool(schema: dict[str, Any], description: str, has_tools: bool) -> dict[str, Any]:
    if has_tools:
        raise _refuse(
            "response_format",
            "with tools, Claude answers in JSON only by structured outputs: "
            "send a json_schema with strict: true.",
        )
    tool = {"name": JSON_ANSWER_TOOL, "description": description, "input_schema": schema}
    return {"tools": [tool], "tool_choice": {"type": "tool", "name": JSON_ANSWER_TOOL}}


# ---------------------------------------------------------------- the answer


def finish_reason(stop_reason: Any, answered_in_json: bool = False) -> str:
    """OpenAI's finish_reason for Claude's stop_reason; a JSON answer given as a forced
    tool call finished as a message would."""
    if stop_reason == "tool_use" and answered_in_json:
        return "stop"
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def openai_usage(usage: Usage | None) -> dict[str, Any] | None:
    """A chat completion's usage block: prompt tokens include Claude's cache reads and writes."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_prompt_tokens,
            "cache_write_tokens": usage.cache_write_prompt_tokens,
        },
    }


def _sse(chunk: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ChunkStream:
    """Claude's stream events in, chat.completion.chunk events out.

    message_start gives the role chunk, text and tool-input deltas the content and
    tool-call chunks, message_delta the finish chunk and message_stop the usage chunk
    (when asked for) and [DONE]; an error event becomes OpenAI's error chunk.
    """

    def __init__(self, context: StreamContext, created: int) -> None:
        self.usage: Usage | None = None
        self.finished = False
        self._include_usage = context.include_usage
        self._id = ""
        self._model = context.model
        self._created = created
        # Claude's usage fields as last reported: message_start's, then message_delta's
        # (cumulative; newer API versions repeat the input and cache figures there too).
        self._usage_fields: dict[str, Any] = {}
        # Claude's content block index → the OpenAI tool call index of its tool_use.
        self._tool_calls: dict[int, int] = {}
        # The content block index of a JSON_ANSWER_TOOL call, whose input is the content.
        self._json_block: int | None = None
        self._stop_reason: Any = None
        self._finish_sent = False

    def feed(self, event: bytes) -> list[bytes]:
        payload = event_data(event)
        data = chunk_object(payload) if payload is not None else None
        if data is None or self.finished:
            return []
        kind = data.get("type")
        if kind == "message_start":
            return self._start(data.get("message"))
        if kind == "content_block_start":
            return self._block_start(data.get("index"), data.get("content_block"))
        if kind == "content_block_delta":
            return self._block_delta(data.get("index"), data.get("delta"))
        if kind == "message_delta":
            return self._message_delta(data)
        if kind == "message_stop":
            return self._stop()
        if kind == "error":
            self.finished = True
            return [_error_chunk(data.get("error"))]
        return []  # ping, content_block_stop, and event types added later

    def finish(self) -> list[bytes]:
        # Everything was sent when message_stop came; a stream cut before it gets no
        # ending made up here (the request path says it was cut).
        return []

    def _chunk(self, delta: Mapping[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self._include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    def _start(self, message: Any) -> list[bytes]:
        if isinstance(message, Mapping):
            if isinstance(message.get("id"), str):
                self._id = message["id"]
            if isinstance(message.get("model"), str):
                self._model = message["model"]
            self._note_usage(message.get("usage"))
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, index: Any, block: Any) -> list[bytes]:
        if not isinstance(block, Mapping) or not isinstance(index, int):
            return []
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []  # thinking and server tool blocks: never asked for
        if block.get("name") == JSON_ANSWER_TOOL:
            self._json_block = index
            return []
        position = len(self._tool_calls)
        self._tool_calls[index] = position
        call = {
            "index": position,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": ""},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, index: Any, delta: Any) -> list[bytes]:
        if not isinstance(delta, Mapping):
            return []
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str) and self._json_block is None:
            return [self._chunk({"content": delta["text"]})]
        piece = delta.get("partial_json")
        if kind != "input_json_delta" or not isinstance(piece, str) or not piece:
            return []
        if index == self._json_block:
            return [self._chunk({"content": piece})]
        if index in self._tool_calls:
            call = {"index": self._tool_calls[index], "function": {"arguments": piece}}
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _message_delta(self, data: Mapping[str, Any]) -> list[bytes]:
        self._note_usage(data.get("usage"))
        delta = data.get("delta")
        if isinstance(delta, Mapping) and delta.get("stop_reason") is not None:
            self._stop_reason = delta["stop_reason"]
        return [self._finish_chunk()]

    def _finish_chunk(self) -> bytes:
        self._finish_sent = True
        answered_in_json = self._json_block is not None and not self._tool_calls
        return self._chunk({}, finish_reason(self._stop_reason, answered_in_json))

    def _stop(self) -> list[bytes]:
        self.finished = True
        events = [] if self._finish_sent else [self._finish_chunk()]
        if self._include_usage:
            usage = {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": openai_usage(self.usage),
            }
            events.append(_sse(usage))
        events.append(DONE_EVENT)
        return events

    def _note_usage(self, usage: Any) -> None:
        if not isinstance(usage, Mapping):
            return
        self._usage_fields.update((key, value) for key, value in usage.items() if value is not None)
        self.usage = anthropic_wire.message_usage(self._usage_fields)


# Claude's error types are short identifiers; anything else is not repeated.
_ERROR_TYPE = re.compile(r"[a-z_]{1,64}")


def _error_chunk(error: Any) -> bytes:
    """OpenAI's in-stream error chunk for Claude's error event. Claude's own message
    stays out, as with every provider error (docs/errors.md); its type is named."""
    kind = error.get("type") if isinstance(error, Mapping) else None
    named = f" ({kind})" if isinstance(kind, str) and _ERROR_TYPE.fullmatch(kind) else ""
    body = {
        "error": {
            "message": f"The provider's stream ended with an error{named}.",
            "type": "server_error",
            "param": None,
            "code": "upstream_stream_error",
        }
    }
    return _sse(body)
