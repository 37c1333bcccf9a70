"""Which deployments serve a caller of each API family, and how (gateway/translate, Router.plan);
the providers' max_tokens_field; a failover deployment a translation cannot reach."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from gateway.config import ConfigError, DeploymentConfig, ModelConfig, RoutingConfig, load_config
from gateway.errors import InvalidRequest
from gateway.metrics import Metrics
from gateway.providers import UpstreamReply, UpstreamRequest
from gateway.routing import Router
from gateway.translate import DIRECT, AnthropicToOpenAI, OpenAIToAnthropic, lookup, reach
from tests.conftest import USER_KEY, ConfigWriter, StartGateway
from tests.fakes.openai_upstream import FakeUpstream

BOTH = frozenset({"openai", "anthropic"})


def test_lookup_gives_one_translator_per_pair_of_families() -> None:
    assert isinstance(lookup("openai", "anthropic"), OpenAIToAnthropic)
    to_openai = lookup("anthropic", "openai", "max_tokens")
    assert isinstance(to_openai, AnthropicToOpenAI) and to_openai.max_tokens_field == "max_tokens"
    assert isinstance(lookup("anthropic", "openai"), AnthropicToOpenAI)
    assert lookup("anthropic", "openai").max_tokens_field == "max_completion_tokens"  # type: ignore[union-attr]
    assert lookup("openai", "openai") is None
    assert lookup("openai", "gemini") is None


def test_reach_prefers_the_callers_own_family() -> None:
    assert reach("openai", frozenset({"openai"})) is DIRECT
    assert reach("anthropic", BOTH) is DIRECT  # the mock: never translated
    found = reach("openai", frozenset({"anthropic"}))
    assert found is not None and isinstance(found.translator, OpenAIToAnthropic)
    assert reach("openai", frozenset({"gemini"})) is None


class Provider:
    """A provider that answers 200 to everything, for the router alone."""

    def __init__(self, name: str, wire_formats: frozenset[str]) -> None:
        self.name = name
        self.wire_formats = wire_formats
        self.sent: list[UpstreamRequest] = []

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        self.sent.append(request)
        return UpstreamReply(status=200, content_type="application/json", body=b"{}")

    async def close(self) -> None:
        return None


def router(*providers: Provider) -> Router:
    return Router(
        {provider.name: provider for provider in providers},  # type: ignore[misc]
        RoutingConfig(breaker_cooldown_seconds=0.0),
        Metrics(),
        choose=lambda weights: list(range(len(weights))),
    )


MIXED = ModelConfig(
    name="mixed",
    provider="claude",
    upstream_model="claude-sonnet-4-5",
    deployments=(
        DeploymentConfig("claude", "claude-sonnet-4-5"),
        DeploymentConfig("compat", "claude-sonnet-4-5"),
        DeploymentConfig("mock", "gpt-4o"),
    ),
)


def test_the_plan_lists_every_deployment_a_caller_can_reach_in_order() -> None:
    routes = router(
        Provider("claude", frozenset({"anthropic"})),
        Provider("compat", frozenset({"openai"})),
        Provider("mock", BOTH),
    )
    chat = routes.plan(MIXED, "openai", translates=True)
    assert [d.provider for d in chat.deployments] == ["claude", "compat", "mock"]
    assert isinstance(chat.translator(MIXED.deployments[0]), OpenAIToAnthropic)
    assert chat.translator(MIXED.deployments[1]) is None and chat.translator(MIXED.deployments[2]) is None
    messages = routes.plan(MIXED, "anthropic", translates=True)
    assert list(messages.translators) == ["compat"]
    # A route without a translator (completions, Responses) reaches its own family only.
    responses = routes.plan(MIXED, "openai", translates=False)
    assert [d.provider for d in responses.deployments] == ["compat", "mock"]
    assert responses.translators == {}
    # Made once per model, family and route kind.
    assert routes.plan(MIXED, "openai", translates=True) is chat


async def test_a_deployment_a_translation_refuses_is_skipped_and_its_probe_released() -> None:
    claude = Provider("claude", frozenset({"anthropic"}))
    compat = Provider("compat", frozenset({"openai"}))
    routes = router(claude, compat, Provider("mock", BOTH))
    breaker = routes.breaker("claude")
    breaker.failures, breaker.open_until = 3, time.monotonic() - 1  # cooled down: half open
    plan = routes.plan(MIXED, "openai", translates=True)

    def make(deployment: DeploymentConfig) -> UpstreamRequest:
        if deployment.provider == "claude":
            raise InvalidRequest("n: Claude returns one choice per request.", param="n")
        return UpstreamRequest("chat/completions", {"model": deployment.upstream_model}, stream=False)

    routed = await routes.send(MIXED, make, plan)
    assert routed.deployment.provider == "compat" and routed.translator is None
    assert (routed.attempts, claude.sent, len(compat.sent)) == (1, [], 1)
    # Not a failure of Claude's, and the next request may probe it.
    assert (breaker.failures, breaker.probing, breaker.state(time.monotonic())) == (3, False, "half_open")

    only_claude = routes.plan(
        ModelConfig("c", "claude", "claude-sonnet-4-5", deployments=(MIXED.deployments[0],)),
        "openai",
        translates=True,
    )
    with pytest.raises(InvalidRequest) as refused:
        await routes.send(MIXED, make, only_claude)
    assert refused.value.param == "n"


def write(tmp_path: Path, provider: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"providers:\n  p: {provider}\nmodels:\n  m: {{provider: p}}\n")
    return path


def test_max_tokens_field_is_read_once_and_checked(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "{type: openai, base_url: 'http://p', max_tokens_field: max_tokens}")
    )
    assert config.providers["p"].max_tokens_field == "max_tokens"
    config = load_config(write(tmp_path, "{type: azure, base_url: 'http://p', api_version: '2024-10-21'}"))
    assert config.providers["p"].max_tokens_field == "max_completion_tokens"
    for provider, message in (
        (
            "{type: openai, base_url: 'http://p', max_tokens_field: max_output_tokens}",
            "providers.p.max_tokens_field: must be one of max_completion_tokens, max_tokens; "
            "got 'max_output_tokens'",
        ),
        (
            "{type: anthropic, base_url: 'http://p', max_tokens_field: max_tokens}",
            "providers.p.max_tokens_field: applies only to providers of type openai or azure",
        ),
    ):
        path = write(tmp_path, provider)
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert re.match(rf"{re.escape(str(path))}(:\d+)?: ", str(caught.value))
        assert message in str(caught.value)


async def test_a_messages_request_to_a_server_that_reads_only_max_tokens(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    upstream_url: str,
    pg: asyncpg.Connection,
) -> None:
    import anthropic

    config_writer.extra_providers = textwrap.dedent(
        f"""\
        ollama:
          type: openai
          base_url: {upstream_url}
          max_tokens_field: max_tokens
        """
    )
    config_writer.extra_models = "llama-local: {provider: ollama, upstream_model: gpt-4o-mini}\n"
    gateway = await start_gateway()
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    message = await client.messages.create(
        model="llama-local", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert [getattr(block, "text", None) for block in message.content] == ["Hello from"]
    assert fake_upstream.requests[0]["max_tokens"] == 2
    assert "max_completion_tokens" not in fake_upstream.requests[0]
    # The caller's Anthropic headers are Anthropic's: an OpenAI-family provider gets none.
    assert not [name for name in fake_upstream.headers_seen[0] if name.lower().startswith("anthropic-")]
    await client.close()
