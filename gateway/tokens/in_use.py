"""Which of tiktoken's encodings a configuration counts with, so that start-up, `gateway
check`, doctor and `gateway tokenizers fetch` ask for those files and no others."""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.tokens.files import ENCODING_FILES
from gateway.tokens.registry import TokenizerRegistry


def encodings_in_use(config: GatewayConfig) -> tuple[str, ...]:
    """tiktoken's encodings (in tiktoken's order) that this configuration's counts read.

    Each model's, as its profile resolves it; the fallback, which also stands in for a
    tokenizer whose package is not installed; and, for a deployment on the mock provider,
    the encoding of its upstream name alone, since the mock counts its replies with that.
    """
    registry = TokenizerRegistry(config.tokens)
    names = {config.tokens.fallback}
    for model in config.models.values():
        names.add(registry.encoding_name(model.upstream_model, model.tokenizer))
        for deployment in model.deployments:
            if config.providers[deployment.provider].type == "mock":
                names.add(registry.encoding_name(deployment.upstream_model))
    return tuple(name for name in ENCODING_FILES if name in names and registry.reads_cache(name))
