"""The mock provider's Responses API, through a gateway on the embedded store, with the
official SDK: the wire format OpenAI documents, exact usage, and the ledger row it settles.

No Redis and no PostgreSQL: the gateway runs as the shipped config does (fast tier).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import load_config
from gateway.providers.mock import REPLY_TEXT
from tests.conftest import RunningGateway

KEY = "gw-test-key-mock-responses"
O200K = tiktoken.get_encoding("o200k_base")
REPLY_TOKENS = O200K.encode(REPLY_TEXT)
ROW = (
    "SELECT route, model, stream, status, error_code, prompt_tokens_estimated, reserved_tokens, "
    "prompt_tokens, completion_tokens, usage_source FROM usage_events ORDER BY created_at"
)


def chat_prompt_tokens(*messages: tuple[str, str]) -> int:
    """OpenAI's published rule for chat prompts: 3 per message, its role and content
    encoded, and 3 for the reply's priming. The gateway counts a Responses input as the
    equivalent chat (instructions as the system message)."""
    return 3 + sum(3 + len(O200K.encode(role)) + len(O200K.encode(content)) for role, content in messages)


@pytest.fixture
async def mock_gateway(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text(
        "policies:\n  - {name: per-user, scope: user, limits: [{requests: 100, per: minute}]}\n"
    )
    (tmp_path / "gateway.yaml").write_text(
        f"""\
server: {{host: 127.0.0.1, port: 0}}
backends: {{sqlite: {{path: var/gateway.db}}}}
providers: {{mock: {{type: mock}}}}
models: {{gpt-4o-mini: {{provider: mock}}}}
keys:
  - {{id: alice-key, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, user: alice}}
quota: {{policies: policies/*.yaml, default_max_completion_tokens: 100}}
ledger: {{batch_size: 100, flush_interval_seconds: 0.02}}
"""
    )
    app = create_app(load_config(tmp_path / "gateway.yaml"))
    server = TestServer(app)
    await server.start_server()
    running = RunningGateway(app=app, url=str(server.make_url("")).rstrip("/"), clients=[])
    yield running
    for client in running.clients:
        await client.close()
    await server.close()


def ledger_rows(gateway: RunningGateway) -> list[tuple[Any, ...]]:
    with sqlite3.connect(gateway.config.base_dir / "var" / "gateway.db") as connection:
        return connection.execute(ROW).fetchall()


def usage_figures(usage: Any) -> tuple[int, int, int, int, int]:
    return (
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
        usage.input_tokens_details.cached_tokens,
        usage.output_tokens_details.reasoning_tokens,
    )


async def test_a_whole_response_is_openais_response_object_with_exact_usage(
    mock_gateway: RunningGateway,
) -> None:
    client = mock_gateway.client(KEY)
    response = await client.responses.create(
        model="gpt-4o-mini", instructions="Answer briefly.", input="hi", max_output_tokens=60
    )
    prompt = chat_prompt_tokens(("system", "Answer briefly."), ("user", "hi"))
    assert prompt == 15
    assert response.id.startswith("resp_")
    assert (response.object, response.status, response.incomplete_details) == ("response", "completed", None)
    assert response.model == "gpt-4o-mini"
    assert response.instructions == "Answer briefly."
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert [part.type for part in message.content] == ["output_text"]
    assert response.output_text == REPLY_TEXT
    assert response.usage is not None
    assert usage_figures(response.usage) == (15, len(REPLY_TOKENS), 15 + len(REPLY_TOKENS), 0, 0)
    assert len(REPLY_TOKENS) == 28

    await mock_gateway.settle()
    # Reserved: the pre-flight count (the same reading, uncalibrated so far) + max_output_tokens.
    assert ledger_rows(mock_gateway) == [
        ("responses", "gpt-4o-mini", 0, 200, None, 15, 15 + 60, 15, 28, "provider")
    ]


async def test_a_streamed_response_sends_each_event_in_order_and_settles_exact_usage(
    mock_gateway: RunningGateway,
) -> None:
    client = mock_gateway.client(KEY)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}]
    stream = await client.responses.create(model="gpt-4o-mini", input=items, stream=True)
    events = [event async for event in stream]

    deltas = len(REPLY_TOKENS)
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(deltas + 8))
    created, completed = events[0], events[-1]
    assert created.response.status == "in_progress" and created.response.usage is None
    assert created.response.id == completed.response.id and completed.response.id.startswith("resp_")
    item_ids = {event.item_id for event in events if hasattr(event, "item_id")}
    assert item_ids == {completed.response.output[0].id}
    # One token per delta: the text the client receives is what the usage counts.
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == REPLY_TEXT == events[deltas + 4].text == completed.response.output_text
    prompt = chat_prompt_tokens(("user", "Say hello."))
    assert prompt == 10
    assert completed.response.status == "completed"
    assert usage_figures(completed.response.usage) == (10, 28, 38, 0, 0)

    await mock_gateway.settle()
    # No max_output_tokens: the reservation is quota.default_max_completion_tokens (100).
    assert ledger_rows(mock_gateway) == [
        ("responses", "gpt-4o-mini", 1, 200, None, 10, 10 + 100, 10, 28, "provider")
    ]


async def test_max_output_tokens_cuts_the_reply_and_makes_it_incomplete(mock_gateway: RunningGateway) -> None:
    client = mock_gateway.client(KEY)
    whole = await client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=16)
    assert whole.status == "incomplete"
    assert whole.incomplete_details is not None and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output[0].status == "incomplete"
    assert whole.output_text == O200K.decode(REPLY_TOKENS[:16])
    assert whole.usage is not None and usage_figures(whole.usage) == (8, 16, 24, 0, 0)

    stream = await client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=16, stream=True)
    events = [event async for event in stream]
    # OpenAI ends a cut stream with response.incomplete, not response.completed.
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == O200K.decode(REPLY_TOKENS[:16])
    assert usage_figures(last.response.usage) == (8, 16, 24, 0, 0)
    assert sum(event.type == "response.output_text.delta" for event in events) == 16

    await mock_gateway.settle()
    assert ledger_rows(mock_gateway) == [
        ("responses", "gpt-4o-mini", 0, 200, None, 8, 8 + 16, 8, 16, "provider"),
        ("responses", "gpt-4o-mini", 1, 200, None, 8, 8 + 16, 8, 16, "provider"),
    ]


async def test_the_stream_is_framed_with_event_lines(mock_gateway: RunningGateway) -> None:
    """Below the SDK: every event is `event: <type>` then `data: <json>` whose type matches,
    and no `[DONE]` (the Responses API has none)."""
    client = mock_gateway.client(KEY)
    raw = await client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="hi", max_output_tokens=16, stream=True
    )
    body = (await raw.http_response.aread()).decode()
    blocks = [block for block in body.split("\n\n") if block]
    assert len(blocks) == 16 + 8
    for block in blocks:
        event_line, data_line = block.split("\n")
        name = event_line.removeprefix("event: ")
        assert data_line.startswith('data: {"type":"' + name + '"')
    assert "[DONE]" not in body
