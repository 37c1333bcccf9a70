"""Providers: one module per upstream wire format."""

from gateway.config import ProviderConfig
from gateway.providers.base import Provider, UpstreamReply, UpstreamRequest, Usage
from gateway.providers.mock import MockProvider
from gateway.providers.openai import OpenAIProvider
from gateway.tokens import TokenizerRegistry


def build_provider(config: ProviderConfig, tokenizers: TokenizerRegistry) -> Provider:
    if config.type == "mock":
        return MockProvider(config.name, tokenizers)
    return OpenAIProvider(config)


__all__ = ["Provider", "UpstreamReply", "UpstreamRequest", "Usage", "build_provider"]
