"""Provider errors reach callers in our words, never with the provider's free text.

A leaky provider's error bodies embed a key, a private address, a bearer token and a
URL with credentials. Callers see the provider's status, error type and code and our
request id, in the route's own error shape; the provider's message only where its
operator set `expose_errors`, and then redacted. The log gets the whole body, with
secrets redacted but addresses kept (an operator needs them to find what failed).
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import asyncpg
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.providers import UpstreamReply
from gateway.redact import redact
from gateway.relay import ProviderError, upstream_failure
from tests.conftest import USER_KEY, ConfigWriter, RunningGateway, StartGateway

HI: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
ANTHROPIC_HI: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]

KEY = "sk-proj-AbCdEf0123456789AbCdEf0123456789-9c1e"
ADDRESS = "dial tcp 10.12.4.7:8000"
TOKEN = "tok_9f8e7d6c5b4a3f2e1d0c"
URL = "https://user:hunter2@internal.example/x"
LEAKY = (
    f"Incorrect API key provided: {KEY}; {ADDRESS}: connect: connection refused;"
    f" retried with Bearer {TOKEN} via {URL}"
)
# What the log (and, with expose_errors, the caller) gets of LEAKY: secrets go, the address stays.
LEAKY_REDACTED = (
    "Incorrect API key provided: [redacted]; dial tcp 10.12.4.7:8000: connect: connection refused;"
    " retried with Bearer [redacted] via https://[redacted]@internal.example/x"
)
# Nothing of these may reach a caller; the first four never reach the log either.
SECRETS = (KEY, "9c1e", TOKEN, "hunter2")
PRIVATE = ("10.12.4.7", "internal.example", "dial tcp", "Incorrect API key")

HTML = (
    "<html><head><title>500 Internal Server Error</title></head><body>"
    f"<h1>upstream {ADDRESS} failed</h1><p>Authorization: Bearer {TOKEN}</p></body></html>"
)
HTML_REDACTED = (
    "<html><head><title>500 Internal Server Error</title></head><body>"
    "<h1>upstream dial tcp 10.12.4.7:8000 failed</h1><p>Authorization: Bearer [redacted]</p></body></html>"
)


# --- redact() -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LEAKY, LEAKY_REDACTED),
        (
            "Incorrect API key provided: sk-proj-********************9c1e. You can find your API key"
            " at https://platform.openai.com/account/api-keys.",
            "Incorrect API key provided: [redacted]. You can find your API key"
            " at https://platform.openai.com/account/api-keys.",
        ),
        ("x-api-key: sk-ant-api03-AAAAbbbbCCCC1111-xyz", "x-api-key: [redacted]"),
        ("Authorization: Bearer abc.def-123_XYZ and more", "Authorization: Bearer [redacted] and more"),
        ('{"authorization": "Basic dXNlcjpwYXNz"}', '{"authorization": "Basic [redacted]"}'),
        (
            '{"api_key": "abc", "password":"hunter2", "note": "ok"}',
            '{"api_key": "[redacted]", "password":"[redacted]", "note": "ok"}',
        ),
        ("postgres://gateway:s3cret@10.0.0.5:5432/db", "postgres://[redacted]@10.0.0.5:5432/db"),
        (
            "GET https://maps.example/api?key=AIzaSyAbc123&q=1&token=xyz",
            "GET https://maps.example/api?key=[redacted]&q=1&token=[redacted]",
        ),
        ("monkey=banana keyboard=qwerty", "monkey=banana keyboard=qwerty"),
        (
            "our key gw-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-abcd, AWS AKIAIOSFODNN7EXAMPLE",
            "our key [redacted], AWS [redacted]",
        ),
        ("azure key 0123456789abcdef0123456789abcdef.", "azure key [redacted]."),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl end", "jwt [redacted] end"),
        # Ordinary text, ids and model names are left alone.
        ("Bearer authentication failed; bearer token missing", None),
        ("The model `gpt-4o-2024-08-06` does not exist or you do not have access to it.", None),
        ("claude-3-5-sonnet-20241022 and ft:gpt-4o-mini-2024-07-18:my-org:custom:9AbcXyZ1", None),
        ("request req_0123456789abcdef0123456789abcdef (Anthropic's: req_011CV6u2ZcFq9s8TQzYkR7Ud)", None),
        (
            "chatcmpl-AbCdEf0123456789AbCdEf0123 msg_01XFDUDYJgAACzvnptvVoYEL org-AbCdEf0123456789AbCdEf01",
            None,
        ),
        ("trace 550e8400-e29b-41d4-a716-446655440000 at 10.12.4.7:8000", None),
        ("Internationalization is a VeryLongIdentifierWithoutAnyDigitsAtAll", None),
    ],
)
def test_redact_replaces_secrets_and_nothing_else(text: str, expected: str | None) -> None:
    assert redact(text) == (text if expected is None else expected)


def test_redact_cuts_long_text_first_and_drops_the_token_the_cut_went_through() -> None:
    text = "a " * 995 + KEY + " " + "b" * 5000
    # 1990 characters of "a ", then the cut goes through the key: it is dropped whole.
    assert redact(text) == "a " * 995 + "…[truncated]"
    assert redact("short " + KEY, limit=10) == "short …[truncated]"
    assert redact("x" * 2000) == "x" * 2000


# --- upstream_failure(): what a caller may learn of a provider's error ---------------


def reply(status: int, body: bytes | str, retry_after: str | None = None) -> UpstreamReply:
    raw = body.encode() if isinstance(body, str) else body
    return UpstreamReply(status, "application/json", body=raw, retry_after=retry_after)


def openai_body(message: str, kind: object = None, code: object = None) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def anthropic_body(kind: str, message: str) -> str:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}})


@pytest.mark.parametrize(
    ("answer", "status", "code", "error_type", "named"),
    [
        (
            reply(401, openai_body(LEAKY, "invalid_request_error", "invalid_api_key")),
            502,
            "upstream_auth_failed",
            "server_error",
            " (type invalid_request_error, code invalid_api_key)",
        ),
        (
            reply(403, anthropic_body("permission_error", LEAKY)),
            502,
            "upstream_auth_failed",
            "server_error",
            " (type permission_error)",
        ),
        (
            reply(429, openai_body(LEAKY, "tokens", "rate_limit_exceeded"), retry_after="7"),
            429,
            "upstream_rate_limited",
            "requests",
            " (type tokens, code rate_limit_exceeded)",
        ),
        (
            reply(404, openai_body(LEAKY, "invalid_request_error", "model_not_found")),
            404,
            "upstream_rejected",
            "invalid_request_error",
            " (type invalid_request_error, code model_not_found)",
        ),
        # Type and code only as short identifiers; free text in their place is dropped.
        (
            reply(400, openai_body(LEAKY, f"see {ADDRESS}", "x" * 65)),
            400,
            "upstream_rejected",
            "invalid_request_error",
            "",
        ),
        (
            reply(400, openai_body(LEAKY, "a" * 64, 400)),
            400,
            "upstream_rejected",
            "invalid_request_error",
            f" (type {'a' * 64}, code 400)",
        ),
        # Compatible servers: fields at the top level, or a bare string under "error".
        (
            reply(
                422, json.dumps({"object": "error", "message": LEAKY, "type": "BadRequestError", "code": 422})
            ),
            422,
            "upstream_rejected",
            "invalid_request_error",
            " (type BadRequestError, code 422)",
        ),
        (reply(400, json.dumps({"error": LEAKY})), 400, "upstream_rejected", "invalid_request_error", ""),
        (
            reply(529, anthropic_body("overloaded_error", LEAKY)),
            502,
            "upstream_error",
            "server_error",
            " (type overloaded_error)",
        ),
        (reply(500, HTML), 502, "upstream_error", "server_error", ""),
        (reply(503, b"\xff\xfe" + KEY.encode()), 502, "upstream_error", "server_error", ""),
    ],
)
def test_upstream_failure_tells_status_type_code_and_request_id_only(
    answer: UpstreamReply, status: int, code: str, error_type: str, named: str
) -> None:
    error = upstream_failure(answer, "leaky", "req_0123")
    assert isinstance(error, ProviderError)
    assert (error.status, error.code, error.error_type) == (status, code, error_type)
    assert error.message == f"Provider 'leaky' answered HTTP {answer.status}{named}. Request id req_0123."
    assert error.headers == ({"retry-after": "7"} if answer.status == 429 else {})


def test_exposing_adds_the_providers_message_redacted_and_only_once() -> None:
    error = upstream_failure(reply(400, openai_body(LEAKY, "invalid_request_error")), "leaky", "req_1")
    assert error.provider_message == LEAKY_REDACTED
    error.expose()
    error.expose()
    expected = "Provider 'leaky' answered HTTP 400 (type invalid_request_error). Request id req_1."
    assert error.message == f"{expected} Provider message: {LEAKY_REDACTED}"
    # A body without a message (HTML here) has nothing to expose.
    html = upstream_failure(reply(500, HTML), "leaky", "req_2")
    html.expose()
    assert (html.provider_message, html.message) == (
        None,
        "Provider 'leaky' answered HTTP 500. Request id req_2.",
    )


def test_a_huge_error_body_is_logged_cut_and_never_parsed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    huge = openai_body(LEAKY + " " + "x" * 100_000, "invalid_request_error", "too_long")
    error = upstream_failure(reply(400, huge), "leaky", "req_3")
    assert error.message == "Provider 'leaky' answered HTTP 400. Request id req_3."
    (record,) = caplog.records
    logged = record.getMessage()
    assert logged.startswith("provider leaky answered HTTP 400 to request req_3: ")
    assert logged.endswith("…[truncated]") and len(logged) < 2100
    assert not any(secret in logged for secret in SECRETS)


# --- through the gateway, with the official SDKs ----------------------------------------


@dataclass
class LeakyProvider:
    """Answers every chat or messages call with one scripted error."""

    status: int = 500
    body: str = ""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    calls: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        app.router.add_post("/v1/messages", self._answer)
        return app

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        return web.Response(
            status=self.status, text=self.body, content_type=self.content_type, headers=self.headers
        )


@pytest.fixture
async def leaky() -> AsyncIterator[tuple[LeakyProvider, str]]:
    provider = LeakyProvider()
    server = TestServer(provider.app())
    await server.start_server()
    yield provider, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def gateway(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    leaky: tuple[LeakyProvider, str],
    pg: asyncpg.Connection,
) -> RunningGateway:
    """Four leaky providers: OpenAI and Anthropic types, each without and with expose_errors."""
    _, url = leaky
    providers, models = [], []
    for name, kind, base_url, key_env in (
        ("leaky", "openai", f"{url}/v1", "FAKE_PROVIDER_KEY"),
        ("leaky-anthropic", "anthropic", url, "FAKE_ANTHROPIC_KEY"),
    ):
        for suffix, exposed in (("", "false"), ("-open", "true")):
            providers.append(
                f"{name}{suffix}:\n  type: {kind}\n  base_url: {base_url}\n"
                f"  api_key_env: {key_env}\n  expose_errors: {exposed}\n"
            )
            upstream_model = "claude-sonnet-4-5" if kind == "anthropic" else "gpt-4o-mini"
            models.append(
                f"{name}{suffix}-model:\n  provider: {name}{suffix}\n  upstream_model: {upstream_model}\n"
            )
    config_writer.extra_providers = "".join(providers)
    config_writer.extra_models = "".join(models)
    # One attempt, and no breaker in the way: each call is one provider answer.
    routing = textwrap.dedent(
        """\
        routing:
          attempts_per_deployment: 1
          breaker_failures: 1000
        """
    )
    return await start_gateway(extra=routing)


def upstream_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "gateway.upstream"]


def assert_nothing_private(text: str) -> None:
    leaked = [piece for piece in (*SECRETS, *PRIVATE) if piece in text]
    assert leaked == []


@pytest.mark.parametrize(
    ("status", "body", "headers", "exception", "our_status", "code", "error_type", "named", "logged"),
    [
        (
            401,
            openai_body(LEAKY, "invalid_request_error", "invalid_api_key"),
            {},
            openai.InternalServerError,
            502,
            "upstream_auth_failed",
            "server_error",
            " (type invalid_request_error, code invalid_api_key)",
            openai_body(LEAKY_REDACTED, "invalid_request_error", "invalid_api_key"),
        ),
        (
            400,
            openai_body(LEAKY, "invalid_request_error", "context_length_exceeded"),
            {},
            openai.BadRequestError,
            400,
            "upstream_rejected",
            "invalid_request_error",
            " (type invalid_request_error, code context_length_exceeded)",
            openai_body(LEAKY_REDACTED, "invalid_request_error", "context_length_exceeded"),
        ),
        (
            429,
            openai_body(LEAKY, "requests", "rate_limit_exceeded"),
            {"retry-after": "7"},
            openai.RateLimitError,
            429,
            "upstream_rate_limited",
            "requests",
            " (type requests, code rate_limit_exceeded)",
            openai_body(LEAKY_REDACTED, "requests", "rate_limit_exceeded"),
        ),
        (500, HTML, {}, openai.InternalServerError, 502, "upstream_error", "server_error", "", HTML_REDACTED),
    ],
    ids=["401", "400-type-code", "429", "500-html"],
)
async def test_openai_route_tells_the_provider_error_without_its_text(
    gateway: RunningGateway,
    leaky: tuple[LeakyProvider, str],
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: str,
    headers: dict[str, str],
    exception: type[openai.APIStatusError],
    our_status: int,
    code: str,
    error_type: str,
    named: str,
    logged: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    provider, _ = leaky
    provider.status, provider.body, provider.headers = status, body, headers
    provider.content_type = "text/html" if body.startswith("<html>") else "application/json"
    with pytest.raises(exception) as caught:
        await gateway.client().chat.completions.create(model="leaky-model", messages=HI, max_tokens=5)
    response = caught.value.response
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("req_") and response.headers["x-gateway-request-id"] == request_id
    assert response.status_code == our_status
    assert response.json() == {
        "error": {
            "message": f"Provider 'leaky' answered HTTP {status}{named}. Request id {request_id}.",
            "type": error_type,
            "param": None,
            "code": code,
        }
    }
    assert response.headers.get("retry-after") == headers.get("retry-after")
    assert_nothing_private(response.text)
    # The log has one line with the whole body: secrets redacted, the address kept.
    assert upstream_lines(caplog) == [
        f"provider leaky answered HTTP {status} to request {request_id}: {logged}"
    ]
    assert provider.calls == 1


async def test_expose_errors_shows_the_providers_message_redacted(
    gateway: RunningGateway, leaky: tuple[LeakyProvider, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    provider, _ = leaky
    provider.status, provider.body = (
        400,
        openai_body(LEAKY, "invalid_request_error", "context_length_exceeded"),
    )
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="leaky-open-model", messages=HI, max_tokens=5)
    error = caught.value.response.json()["error"]
    request_id = caught.value.response.headers["x-request-id"]
    assert error["message"] == (
        f"Provider 'leaky-open' answered HTTP 400 (type invalid_request_error, code context_length_exceeded)."
        f" Request id {request_id}. Provider message: {LEAKY_REDACTED}"
    )
    assert (error["code"], error["type"]) == ("upstream_rejected", "invalid_request_error")
    assert not any(secret in caught.value.response.text for secret in SECRETS)
    # An HTML page has no message to show, even here.
    provider.status, provider.body, provider.content_type = 500, HTML, "text/html"
    with pytest.raises(openai.InternalServerError) as html:
        await gateway.client().chat.completions.create(model="leaky-open-model", messages=HI, max_tokens=5)
    html_id = html.value.response.headers["x-request-id"]
    assert html.value.response.json()["error"]["message"] == (
        f"Provider 'leaky-open' answered HTTP 500. Request id {html_id}."
    )
    assert_nothing_private(html.value.response.text)
    assert len(upstream_lines(caplog)) == 2


async def test_the_message_names_our_request_id_when_the_caller_sent_its_own(
    gateway: RunningGateway, leaky: tuple[LeakyProvider, str]
) -> None:
    provider, _ = leaky
    provider.status, provider.body = 401, openai_body(LEAKY, "invalid_request_error", "invalid_api_key")
    client = gateway.client(default_headers={"X-Client-Request-Id": "trace-42"})
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="leaky-model", messages=HI, max_tokens=5)
    response = caught.value.response
    ours = response.headers["x-gateway-request-id"]
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["error"]["message"].endswith(f"Request id {ours}.")


@pytest.mark.parametrize(
    ("status", "kind", "headers", "exception", "our_status", "our_type"),
    [
        (401, "authentication_error", {}, anthropic.InternalServerError, 502, "api_error"),
        (400, "invalid_request_error", {}, anthropic.BadRequestError, 400, "invalid_request_error"),
        (429, "rate_limit_error", {"retry-after": "3"}, anthropic.RateLimitError, 429, "rate_limit_error"),
        (529, "overloaded_error", {}, anthropic.InternalServerError, 502, "api_error"),
    ],
)
async def test_anthropic_route_answers_in_anthropics_shape_without_the_text(
    gateway: RunningGateway,
    leaky: tuple[LeakyProvider, str],
    caplog: pytest.LogCaptureFixture,
    status: int,
    kind: str,
    headers: dict[str, str],
    exception: type[anthropic.APIStatusError],
    our_status: int,
    our_type: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    provider, _ = leaky
    provider.status, provider.body, provider.headers = status, anthropic_body(kind, LEAKY), headers
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    try:
        with pytest.raises(exception) as caught:
            await client.messages.create(model="leaky-anthropic-model", max_tokens=5, messages=ANTHROPIC_HI)
    finally:
        await client.close()
    response = caught.value.response
    request_id = response.headers["x-request-id"]
    assert response.status_code == our_status
    assert response.json() == {
        "type": "error",
        "error": {
            "type": our_type,
            "message": f"Provider 'leaky-anthropic' answered HTTP {status} (type {kind}). Request id {request_id}.",
        },
    }
    assert response.headers.get("retry-after") == headers.get("retry-after")
    assert_nothing_private(response.text)
    logged = anthropic_body(kind, LEAKY_REDACTED)
    assert upstream_lines(caplog) == [
        f"provider leaky-anthropic answered HTTP {status} to request {request_id}: {logged}"
    ]


async def test_anthropic_route_with_expose_errors(
    gateway: RunningGateway, leaky: tuple[LeakyProvider, str]
) -> None:
    provider, _ = leaky
    provider.status, provider.body = 400, anthropic_body("invalid_request_error", LEAKY)
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    try:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(
                model="leaky-anthropic-open-model", max_tokens=5, messages=ANTHROPIC_HI
            )
    finally:
        await client.close()
    request_id = caught.value.response.headers["x-request-id"]
    body: dict[str, Any] = caught.value.response.json()
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": f"Provider 'leaky-anthropic-open' answered HTTP 400 (type invalid_request_error)."
        f" Request id {request_id}. Provider message: {LEAKY_REDACTED}",
    }
    assert not any(secret in caught.value.response.text for secret in SECRETS)
