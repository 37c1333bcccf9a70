"""Providers: one module per upstream wire format."""

import ssl
from collections.abc import Mapping

from gateway.config import ProviderConfig
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Provider, UpstreamReply, UpstreamRequest, Usage
from gateway.providers.http import HttpProvider
from gateway.providers.mock import MockProvider
from gateway.providers.openai import AzureOpenAIProvider, OpenAIProvider
from gateway.tokens import TokenizerRegistry


def build_providers(
    configs: Mapping[str, ProviderConfig], tokenizers: TokenizerRegistry
) -> dict[str, Provider]:
    """Every configured provider; those reached over https share one TLS context."""
    https = any((config.base_url or "").startswith("https://") for config in configs.values())
    tls = ssl.create_default_context() if https else None
    return {name: _build_provider(config, tokenizers, tls) for name, config in configs.items()}


def _build_provider(
    config: ProviderConfig, tokenizers: TokenizerRegistry, tls: ssl.SSLContext | None
) -> Provider:
    if config.type == "mock":
        return MockProvider(config, tokenizers)
    return build_http_provider(config, tls)


def build_http_provider(config: ProviderConfig, tls: ssl.SSLContext | None = None) -> HttpProvider:
    """A provider reached over HTTP (any type but mock)."""
    if config.type == "azure":
        return AzureOpenAIProvider(config, tls)
    if config.type == "anthropic":
        return AnthropicProvider(config, tls)
    return OpenAIProvider(config, tls)


__all__ = ["Provider", "UpstreamReply", "UpstreamRequest", "Usage", "build_http_provider", "build_providers"]
