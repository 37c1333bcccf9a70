"""Bad input and bad keys get OpenAI-shaped errors with the right status, never a 500."""

from __future__ import annotations

import aiohttp
import asyncpg
import openai
import pytest

from tests.conftest import USER_KEY, RunningGateway
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


def assert_openai_error(body: dict[str, object], code: str, error_type: str) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["type"]) == (code, error_type)
    assert isinstance(error["message"], str) and error["message"]


async def test_unknown_model_is_404_model_not_found(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.client().chat.completions.create(model="no-such-model", messages=HI)
    body = caught.value.response.json()
    assert_openai_error(body, "model_not_found", "invalid_request_error")
    assert body["error"]["param"] == "model"
    assert fake_upstream.requests == []


async def test_missing_key_is_401_invalid_api_key(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gateway.url}/v1/chat/completions", json={"model": "gpt-4o-mini"}
        ) as response:
            assert response.status == 401
            assert_openai_error(await response.json(), "invalid_api_key", "invalid_request_error")


async def test_wrong_key_is_401_and_never_echoed(gateway: RunningGateway) -> None:
    wrong = "gw-this-is-not-a-key"
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.client(key=wrong).chat.completions.create(model="gpt-4o-mini", messages=HI)
    response = caught.value.response
    assert response.status_code == 401
    assert_openai_error(response.json(), "invalid_api_key", "invalid_request_error")
    assert wrong not in response.text


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [', None),
        (b"\xff\xfe not utf-8", None),
        (b"[1, 2, 3]", None),
        (b"", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "gpt-4o-mini"}', "messages"),
        (b'{"model": "gpt-4o-mini", "messages": []}', "messages"),
        (b'{"model": "gpt-4o-mini", "messages": ["hi"]}', "messages[0]"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}], "max_tokens": -5}', "max_tokens"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}], "max_tokens": "9"}', "max_tokens"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}], "stream": "yes"}', "stream"),
        (b'{"model": 42, "messages": [{"role": "user"}]}', "model"),
    ],
    ids=[
        "truncated-json",
        "invalid-utf8",
        "not-an-object",
        "empty-body",
        "no-model",
        "no-messages",
        "empty-messages",
        "message-not-object",
        "negative-max-tokens",
        "string-max-tokens",
        "string-stream",
        "numeric-model",
    ],
)
async def test_malformed_requests_are_400(
    gateway: RunningGateway, fake_upstream: FakeUpstream, payload: bytes, param: str | None
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gateway.url}/v1/chat/completions",
            data=payload,
            headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
            body = await response.json()
    assert_openai_error(body, "invalid_request_error", "invalid_request_error")
    assert body["error"]["param"] == param
    assert fake_upstream.requests == []


async def test_body_over_the_size_limit_is_413(gateway: RunningGateway) -> None:
    big = (
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        + b"x" * (9 * 1024 * 1024)
        + b'"}]}'
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gateway.url}/v1/chat/completions",
            data=big,
            headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"},
        ) as response:
            assert response.status == 413
            assert_openai_error(await response.json(), "request_too_large", "invalid_request_error")


async def test_unknown_route_and_method_are_openai_shaped(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {USER_KEY}"}
        async with session.post(f"{gateway.url}/v1/nothing-here", headers=headers, json={}) as response:
            assert response.status == 404
            assert_openai_error(await response.json(), "unknown_url", "invalid_request_error")
        async with session.get(f"{gateway.url}/v1/chat/completions", headers=headers) as response:
            assert response.status == 405
            assert_openai_error(await response.json(), "method_not_allowed", "invalid_request_error")


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("error_500", 502, "upstream_error"),
        ("garbage", 502, "upstream_invalid_response"),
        ("error_429", 429, "upstream_rate_limited"),
    ],
)
# A provider's own error answer bills nothing; a 200 whose body is garbage was processed,
# so its prompt (8 tokens, by the exact pre-flight count) is charged.
async def test_upstream_failures_are_clean_errors(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
    mode: str,
    status: int,
    code: str,
) -> None:
    fake_upstream.mode = mode
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    assert caught.value.status_code == status
    body = caught.value.response.json()
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    await gateway.settle()
    (row,) = await pg.fetch(
        "SELECT status, error_code, prompt_tokens, completion_tokens, usage_source FROM usage_events"
    )
    charged = (8, 0, "counted") if mode == "garbage" else (None, None, "none")
    assert tuple(row) == (status, code, *charged)


async def test_unreachable_upstream_is_502(start_gateway, pg: asyncpg.Connection, config_writer) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import free_port

    config_writer.upstream_url = f"http://127.0.0.1:{free_port()}/v1"
    gateway = await start_gateway()
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    assert caught.value.status_code == 502
    assert caught.value.response.json()["error"]["code"] == "upstream_unreachable"


def test_every_error_code_is_documented() -> None:
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    source = "\n".join(path.read_text() for path in (repo / "gateway").rglob("*.py"))
    codes = set(re.findall(r'code\s*=\s*"([a-z_]+)"', source))
    documented = set(
        re.findall(r"^\| `([a-z_]+)` \|", (repo / "docs" / "errors.md").read_text(), re.MULTILINE)
    )
    assert len(codes) >= 20
    assert codes <= documented, f"undocumented: {sorted(codes - documented)}"
    # ... and every documented code is one the gateway can produce.
    assert documented <= codes, f"documented but never raised: {sorted(documented - codes)}"
