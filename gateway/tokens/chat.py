"""OpenAI chat requests counted by OpenAI's published rules, and Llama 3's and 4's templates.

OpenAI: per message 3 tokens, plus the encoded length of every string field, plus 1
when `name` is present; then 3 tokens priming the reply. Function definitions follow
the rule of OpenAI's cookbook; images the published tile rule. Parts with no published
rule (tool calls, audio, JSON schemas) are counted as faithfully as known and the count
is marked as an estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.jsontext import compact
from gateway.tokens.counts import RawCount
from gateway.tokens.images import data_url_image_size, image_tokens
from gateway.tokens.registry import ModelProfile

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# Not published: what a tool call costs beyond its name and arguments.
TOKENS_PER_TOOL_CALL = 3
EXACT_MESSAGE_FIELDS = frozenset({"role", "content", "name"})

MessageCounter = Callable[[Mapping[str, Any]], RawCount]
# Each Llama turn's header: its two special tokens around the role, then a blank line.
LLAMA_HEADERS = {
    "llama3": "<|start_header_id|><|end_header_id|>\n\n",
    "llama4": "<|header_start|><|header_end|>\n\n",
}


def count_chat(
    body: Mapping[str, Any],
    profile: ModelProfile,
    remote_image_size: tuple[int, int],
    cached: Callable[[Mapping[str, Any], MessageCounter], RawCount] | None = None,
) -> RawCount:
    """Prompt tokens of a chat completions body (messages already validated)."""
    messages: Sequence[Mapping[str, Any]] = body["messages"]
    if profile.chat_format in LLAMA_HEADERS:
        return count_llama_chat(messages, profile)

    def one(message: Mapping[str, Any]) -> RawCount:
        return count_openai_message(message, profile, remote_image_size)

    total = RawCount(REPLY_PRIMING_TOKENS, profile.exact)
    for message in messages:
        total += cached(message, one) if cached is not None else one(message)
    definitions = _function_definitions(body)
    if definitions:
        total += count_functions(definitions, profile)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        # The schema is shown to the model in a form OpenAI has not published.
        schema = compact(response_format.get("json_schema"))
        total += RawCount(profile.tokenizer.count(schema), False)
    return total


def count_openai_message(
    message: Mapping[str, Any], profile: ModelProfile, remote_image_size: tuple[int, int]
) -> RawCount:
    tokenizer = profile.tokenizer
    tokens, exact = TOKENS_PER_MESSAGE, True
    for key, value in message.items():
        if key == "content" and isinstance(value, list):
            parts = count_content_parts(value, profile, remote_image_size)
            tokens, exact = tokens + parts.tokens, exact and parts.exact
        elif key in ("tool_calls", "function_call"):
            calls = value if isinstance(value, list) else [{"function": value}]
            tokens += sum(_tool_call_tokens(call, profile) for call in calls)
            exact = False
        elif isinstance(value, str):
            measured = tokenizer.measure(value)
            tokens += measured.tokens
            exact = exact and measured.exact and key in EXACT_MESSAGE_FIELDS
        if key == "name":
            tokens += TOKENS_PER_NAME
    return RawCount(tokens, exact)


def count_content_parts(
    parts: list[Any], profile: ModelProfile, remote_image_size: tuple[int, int]
) -> RawCount:
    tokens, exact = 0, True
    for part in parts:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if isinstance(text, str):
                measured = profile.tokenizer.measure(text)
                tokens, exact = tokens + measured.tokens, exact and measured.exact
        elif kind == "image_url":
            image = _image_part_tokens(part.get("image_url"), profile, remote_image_size)
            tokens, exact = tokens + image.tokens, exact and image.exact
        else:
            # Audio and files: no published rule; their text (if any) is a lower bound.
            tokens += profile.tokenizer.count(compact(part)[:4096])
            exact = False
    return RawCount(tokens, exact)


def _image_part_tokens(image: Any, profile: ModelProfile, remote_image_size: tuple[int, int]) -> RawCount:
    if profile.images is None:
        return RawCount(0, False)
    url = image.get("url") if isinstance(image, Mapping) else image
    detail = image.get("detail", "auto") if isinstance(image, Mapping) else "auto"
    size = data_url_image_size(url) if isinstance(url, str) else None
    exact = profile.images_exact and (size is not None or detail == "low")
    width, height = size or remote_image_size
    return RawCount(image_tokens(width, height, str(detail), profile.images), exact)


def _tool_call_tokens(call: Any, profile: ModelProfile) -> int:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping):
        return TOKENS_PER_TOOL_CALL
    pieces = [function.get("name"), function.get("arguments")]
    return TOKENS_PER_TOOL_CALL + sum(profile.tokenizer.count(p) for p in pieces if isinstance(p, str))


def _function_definitions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    definitions: list[Mapping[str, Any]] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
            definitions.append(tool["function"])
    functions = body.get("functions")
    for function in functions if isinstance(functions, list) else []:
        if isinstance(function, Mapping):
            definitions.append(function)
    return definitions


def count_functions(definitions: list[Mapping[str, Any]], profile: ModelProfile) -> RawCount:
    """OpenAI cookbook's rule: per function a start cost and `name:description`; per
    property a cost and `name:type:description`; enums a start cost plus per item a cost
    and its text; one end cost. Nested schemas fall outside the rule (estimated)."""
    cost = profile.functions
    if cost is None:
        return RawCount(0, False)
    cut = False

    def count(text: str) -> int:
        nonlocal cut
        measured = profile.tokenizer.measure(text)
        cut = cut or not measured.exact
        return measured.tokens

    tokens, exact = cost.end, profile.functions_exact
    for function in definitions:
        description = _strip_period(function.get("description"))
        tokens += cost.function_start + count(f"{function.get('name', '')}:{description}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if not isinstance(properties, Mapping) or not properties:
            continue
        tokens += cost.properties_start
        for name, schema in properties.items():
            tokens += cost.per_property
            if not isinstance(schema, Mapping):
                exact = False
                continue
            enum = schema.get("enum")
            if isinstance(enum, list):
                tokens += cost.enum_start
                for item in enum:
                    tokens += cost.per_enum_item + count(str(item))
                    exact = exact and isinstance(item, str)
            kind = schema.get("type", "")
            tokens += count(f"{name}:{kind}:{_strip_period(schema.get('description'))}")
            nested = {key: schema[key] for key in ("properties", "items", "anyOf", "oneOf") if key in schema}
            if nested or not isinstance(kind, str):
                tokens += count(compact(nested))
                exact = False
    return RawCount(tokens, exact and not cut)


def _strip_period(description: Any) -> str:
    text = description if isinstance(description, str) else ""
    return text[:-1] if text.endswith(".") else text


def count_llama_chat(messages: Sequence[Mapping[str, Any]], profile: ModelProfile) -> RawCount:
    """Llama 3's and Llama 4's chat template, encoded as Meta's reference does: each header
    with its special tokens, each content as plain text, then end of turn. Contents are
    trimmed, as the template that serving engines (vLLM, llama.cpp) apply does. Parts
    other than text (images) are left out, and the count is then an estimate."""
    tokenizer = profile.tokenizer
    header = LLAMA_HEADERS[profile.chat_format]
    header_tokens = len(tokenizer.encoding.encode(header, allowed_special="all"))
    tokens, exact = 1, profile.exact  # <|begin_of_text|>
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            text_parts = [p for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
            exact = exact and len(text_parts) == len(content)
            content = "".join(str(part.get("text", "")) for part in text_parts)
        role = "ipython" if message["role"] == "tool" else message["role"]
        counted = tokenizer.measure(role) + tokenizer.measure(str(content or "").strip())
        tokens += header_tokens + counted.tokens + 1  # end of turn
        exact = exact and counted.exact
    tokens += header_tokens + tokenizer.count("assistant")
    return RawCount(tokens, exact)


def count_responses(
    body: Mapping[str, Any], profile: ModelProfile, remote_image_size: tuple[int, int]
) -> RawCount:
    """The Responses API's input, counted as the equivalent chat (an estimate: OpenAI has
    not published how `instructions` and input items are laid out)."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    value = body.get("input")
    items = (
        [{"role": "user", "content": value}]
        if isinstance(value, str)
        else value
        if isinstance(value, list)
        else []
    )
    for item in items:
        if not isinstance(item, Mapping):
            continue
        content = item.get("content")
        if isinstance(item.get("role"), str) and isinstance(content, str | list):
            parts = content if isinstance(content, str) else [_as_chat_part(part) for part in content]
            messages.append({"role": item["role"], "content": parts})
        else:
            messages.append({"role": "tool", "content": compact(item)})
    counted = count_chat({**body, "messages": messages}, profile, remote_image_size)
    return RawCount(counted.tokens, False)


def _as_chat_part(part: Any) -> Any:
    if not isinstance(part, Mapping):
        return part
    if part.get("type") in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text", "")}
    if part.get("type") == "input_image":
        return {
            "type": "image_url",
            "image_url": {"url": part.get("image_url", ""), "detail": part.get("detail", "auto")},
        }
    return part
