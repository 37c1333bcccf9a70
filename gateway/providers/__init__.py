"""Providers: one module per upstream wire format."""

from gateway.config import ProviderConfig
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Provider, UpstreamReply, UpstreamRequest, Usage
from gateway.providers.mock import MockProvider
from gateway.providers.openai import AzureOpenAIProvider, OpenAIProvider
from gateway.tokens import TokenizerRegistry


def build_provider(config: ProviderConfig, tokenizers: TokenizerRegistry) -> Provider:
    if config.type == "mock":
        return MockProvider(config, tokenizers)
    if config.type == "azure":
        return AzureOpenAIProvider(config)
    if config.type == "anthropic":
        return AnthropicProvider(config)
    return OpenAIProvider(config)


__all__ = ["Provider", "UpstreamReply", "UpstreamRequest", "Usage", "build_provider"]
