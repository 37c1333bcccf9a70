"""Learning how far estimates are from what the provider bills, per model.

For models without a public tokenizer, each estimate is compared with the provider's
reported prompt tokens. The ratio actual / estimate is kept as decayed sums, so it
follows a model that changes but is not thrown about by one odd request.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import TokensConfig
from gateway.metrics import Metrics
from gateway.tokens.registry import ModelProfile

# Each observation weighs this much more than the one before it (about the last 200).
DECAY = 0.995


@dataclass
class _Ratio:
    actual: float = 0.0
    estimated: float = 0.0
    samples: int = 0

    @property
    def value(self) -> float:
        return self.actual / self.estimated if self.estimated else 1.0


class Calibration:
    """Per-model ratios of billed to estimated prompt tokens (one per gateway process)."""

    def __init__(self, config: TokensConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._ratios: dict[str, _Ratio] = {}

    def factor(self, profile: ModelProfile) -> float:
        """What an estimate is multiplied by before it is reserved (1 for exact counts)."""
        if profile.exact:
            return 1.0
        ratio = self._ratios.get(profile.model)
        if (
            self._config.apply_calibration
            and ratio is not None
            and ratio.samples >= self._config.calibration_min_samples
        ):
            return ratio.value
        return profile.factor

    def learned(self, model: str) -> tuple[float, int] | None:
        """The learned ratio of a model and how many requests it rests on."""
        ratio = self._ratios.get(model)
        return (ratio.value, ratio.samples) if ratio else None

    def observe(
        self, profile: ModelProfile, reserved_tokens: int, raw_tokens: int, billed_tokens: int
    ) -> None:
        """Record one request: what was reserved, what the tokenizer counted, what was billed."""
        if billed_tokens > 0:
            self._metrics.estimate_error.labels(profile.model).observe(
                (reserved_tokens - billed_tokens) / billed_tokens
            )
        if profile.exact or not self._config.learn_calibration or raw_tokens <= 0:
            return
        ratio = self._ratios.setdefault(profile.model, _Ratio())
        ratio.actual = ratio.actual * DECAY + billed_tokens
        ratio.estimated = ratio.estimated * DECAY + raw_tokens
        ratio.samples += 1
        self._metrics.calibration_ratio.labels(profile.model).set(ratio.value)
