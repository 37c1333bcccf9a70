"""Pre-flight token counting: tokenizers per model, counting rules per request shape."""

from gateway.tokens.calibration import Calibration
from gateway.tokens.counter import ROUTES, PromptCounter
from gateway.tokens.counts import PromptCount, RawCount
from gateway.tokens.errors import TokenizerFilesMissing, TokenizerUnavailable
from gateway.tokens.registry import ModelProfile, Tokenizer, TokenizerRegistry

__all__ = [
    "ROUTES",
    "Calibration",
    "ModelProfile",
    "PromptCount",
    "PromptCounter",
    "RawCount",
    "Tokenizer",
    "TokenizerFilesMissing",
    "TokenizerRegistry",
    "TokenizerUnavailable",
]
