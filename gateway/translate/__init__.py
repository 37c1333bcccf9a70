"""Translators between API families (docs/translation.md), and which one a caller needs.

A translator carries one route's callers to providers of another family: OpenAI chat
completions callers to Anthropic Messages deployments, Messages callers to OpenAI chat
deployments. The other routes (completions, embeddings, the Responses API) have none, so
they reach only the providers that speak their family (RouteSpec.translates).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.translate.anthropic_to_openai import AnthropicToOpenAI, MaxTokensField
from gateway.translate.base import StreamContext, StreamTranslation, Translator
from gateway.translate.openai_to_anthropic import OpenAIToAnthropic


def lookup(caller: str, provider: str, max_tokens_field: str = "max_completion_tokens") -> Translator | None:
    """The translator from the caller's API family to the provider's, or None when there is none.

    `max_tokens_field`: where an OpenAI-family provider reads the completion cap
    (ProviderConfig.max_tokens_field).
    """
    if caller == "openai" and provider == "anthropic":
        return OpenAIToAnthropic()
    if caller == "anthropic" and provider == "openai":
        field: MaxTokensField = "max_tokens" if max_tokens_field == "max_tokens" else "max_completion_tokens"
        return AnthropicToOpenAI(field)
    return None


@dataclass(frozen=True)
class Reach:
    """How a caller of one API family reaches one provider: in its own family
    (`translator` None), or through a translator to a family the provider speaks."""

    translator: Translator | None = None


DIRECT = Reach()


def reach(
    caller: str, wire_formats: frozenset[str], max_tokens_field: str = "max_completion_tokens"
) -> Reach | None:
    """How a caller of `caller`'s family reaches a provider that speaks `wire_formats`;
    None when it cannot. A provider that speaks the caller's family is reached without
    translation, also when it speaks the other family too (as the mock does)."""
    if caller in wire_formats:
        return DIRECT
    for family in sorted(wire_formats):
        translator = lookup(caller, family, max_tokens_field)
        if translator is not None:
            return Reach(translator)
    return None


__all__ = [
    "DIRECT",
    "AnthropicToOpenAI",
    "OpenAIToAnthropic",
    "Reach",
    "StreamContext",
    "StreamTranslation",
    "Translator",
    "lookup",
    "reach",
]
