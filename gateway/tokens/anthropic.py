"""Anthropic /v1/messages prompts, estimated: Claude's tokenizer is not public.

The text of every block is counted with the model's chosen encoding; the gateway's
calibration (see calibration.py) corrects the result with the provider's own counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from gateway.jsontext import compact
from gateway.tokens.counts import RawCount
from gateway.tokens.images import image_size
from gateway.tokens.registry import ModelProfile

# Anthropic's published rule of thumb: an image costs about width * height / 750 tokens.
PIXELS_PER_IMAGE_TOKEN = 750
TOKENS_PER_MESSAGE = 3
TOKENS_PER_TOOL = 10
REQUEST_OVERHEAD = 3


def count_anthropic_messages(
    body: Mapping[str, Any], profile: ModelProfile, remote_image_size: tuple[int, int]
) -> RawCount:
    count = profile.tokenizer.count
    tokens = REQUEST_OVERHEAD + _blocks_tokens(body.get("system"), profile, remote_image_size)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, Mapping):
            tokens += TOKENS_PER_MESSAGE + count(str(message.get("role", "")))
            tokens += _blocks_tokens(message.get("content"), profile, remote_image_size)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, Mapping):
            schema = compact(tool.get("input_schema", {}))
            tokens += (
                TOKENS_PER_TOOL
                + count(f"{tool.get('name', '')}:{tool.get('description', '')}")
                + count(schema)
            )
    return RawCount(tokens, False)


def _blocks_tokens(content: Any, profile: ModelProfile, remote_image_size: tuple[int, int]) -> int:
    count = profile.tokenizer.count
    if isinstance(content, str):
        return count(content)
    if not isinstance(content, list):
        return 0
    tokens = 0
    for block in content:
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text":
            tokens += count(str(block.get("text", "")))
        elif kind == "image":
            tokens += _image_tokens(block.get("source"), remote_image_size)
        elif kind == "tool_use":
            tokens += count(str(block.get("name", ""))) + count(json.dumps(block.get("input", {})))
        elif kind == "tool_result":
            tokens += _blocks_tokens(block.get("content"), profile, remote_image_size)
        elif kind == "thinking":
            tokens += count(str(block.get("thinking", "")))
        else:
            tokens += count(compact(block)[:4096])
    return tokens


def _image_tokens(source: Any, remote_image_size: tuple[int, int]) -> int:
    size = None
    if isinstance(source, Mapping) and source.get("type") == "base64":
        data = source.get("data")
        if isinstance(data, str):
            size = _base64_image_size(data)
    width, height = size or remote_image_size
    return math.ceil(width * height / PIXELS_PER_IMAGE_TOKEN)


def _base64_image_size(data: str) -> tuple[int, int] | None:
    import base64
    import binascii

    prefix = data[: 64 * 1024 // 3 * 4]
    try:
        return image_size(base64.b64decode(prefix[: len(prefix) // 4 * 4], validate=True))
    except (binascii.Error, ValueError):
        return None
