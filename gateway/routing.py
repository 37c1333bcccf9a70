"""Which deployment serves a request: weighted choice, retries, failover, circuit breakers.

Everything here happens before the first byte reaches the client: connection errors,
timeouts, 429 and 5xx are retried with backoff, then the next deployment is tried. A
deployment that keeps failing is taken out for a cool-down, then probed back in by a
single request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import DeploymentConfig, ModelConfig, RoutingConfig
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable, UpstreamError
from gateway.metrics import Metrics
from gateway.providers import Provider, UpstreamReply, UpstreamRequest

log = logging.getLogger("gateway.routing")

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


@dataclass
class Breaker:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False

    def state(self, now: float) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "open" if now < self.open_until else "half_open"


@dataclass(frozen=True)
class Routed:
    reply: UpstreamReply
    deployment: DeploymentConfig
    attempts: int


class Router:
    def __init__(
        self,
        providers: dict[str, Provider],
        config: RoutingConfig,
        metrics: Metrics,
        choose: Callable[[list[float]], list[int]] | None = None,
    ) -> None:
        self._providers = providers
        self._config = config
        self._metrics = metrics
        self._breakers: dict[str, Breaker] = {}
        self._choose = choose or _weighted_order
        for name in providers:
            # Every provider's series from the start; after that it is set when it changes.
            metrics.breaker_open.labels(name).set(0)

    def breaker(self, provider: str) -> Breaker:
        return self._breakers.setdefault(provider, Breaker())

    def breaker_states(self) -> dict[str, str]:
        now = time.monotonic()
        return {name: self.breaker(name).state(now) for name in self._providers}

    def check_serves(self, model: ModelConfig, wire_format: str) -> None:
        """400 unless some deployment of the model speaks this API."""
        if not any(wire_format in self._providers[d.provider].wire_formats for d in model.deployments):
            api = "Anthropic Messages" if wire_format == "anthropic" else "OpenAI"
            raise InvalidRequest(
                f"Model `{model.name}` is not served through the {api} API here.",
                param="model",
                code="wrong_api_for_model",
            )

    def _candidates(self, model: ModelConfig, wire_format: str) -> list[DeploymentConfig]:
        now = time.monotonic()
        usable: list[DeploymentConfig] = []
        for deployment in model.deployments:
            if wire_format not in self._providers[deployment.provider].wire_formats:
                continue
            breaker = self.breaker(deployment.provider)
            state = breaker.state(now)
            if state == "closed":
                usable.append(deployment)
            elif state == "half_open" and not breaker.probing:
                # One request probes a cooled-down deployment; the others keep away.
                breaker.probing = True
                usable.append(deployment)
        order = self._choose([deployment.weight for deployment in usable])
        return [usable[index] for index in order]

    async def send(
        self, model: ModelConfig, make: Callable[[DeploymentConfig], UpstreamRequest], wire_format: str
    ) -> Routed:
        """The first good reply, or the last failure (raised, or returned as the reply)."""
        self.check_serves(model, wire_format)
        candidates = self._candidates(model, wire_format)
        if not candidates:
            raise ServiceUnavailable(
                f"Every deployment of model `{model.name}` is cooling down after failures; try again soon.",
                code="no_healthy_deployment",
                headers={"retry-after": str(max(1, round(self._config.breaker_cooldown_seconds)))},
            )
        attempts = 0
        last_error: GatewayError | None = None
        last_reply: tuple[UpstreamReply, DeploymentConfig] | None = None
        for deployment in candidates:
            provider = self._providers[deployment.provider]
            for retry in range(self._config.attempts_per_deployment):
                if attempts:
                    await asyncio.sleep(self._config.backoff_seconds * (2**retry) * random.uniform(0.5, 1.0))
                attempts += 1
                request = make(deployment)
                request.delivery.attempts += 1
                try:
                    reply = await provider.send(request)
                except UpstreamError as exc:  # also UpstreamTimeout
                    last_error = exc
                    if self._failed(deployment, exc.detail or "other"):
                        break
                    continue
                if reply.status in RETRYABLE_STATUSES:
                    await reply.close()
                    last_reply = (reply, deployment)
                    if self._failed(deployment, _status_cause(reply.status)):
                        break  # taken out: go straight to the next deployment
                    continue
                self._succeeded(deployment)
                return Routed(reply, deployment, attempts)
        if last_reply is not None and (last_error is None or last_reply[1] == candidates[-1]):
            return Routed(last_reply[0], last_reply[1], attempts)
        assert last_error is not None
        raise last_error

    def _failed(self, deployment: DeploymentConfig, cause: str) -> bool:
        """Count a failure; True when the deployment is now taken out."""
        breaker = self.breaker(deployment.provider)
        breaker.failures += 1
        self._metrics.upstream_failures.labels(deployment.provider, cause).inc()
        now = time.monotonic()
        if breaker.probing or breaker.failures >= self._config.breaker_failures:
            if breaker.state(now) != "open":
                log.warning(
                    "deployment %s taken out for %.0fs (%s)",
                    deployment.provider,
                    self._config.breaker_cooldown_seconds,
                    cause,
                )
                self._metrics.breaker_openings.labels(deployment.provider).inc()
            breaker.open_until = now + self._config.breaker_cooldown_seconds
            breaker.probing = False
        taken_out = breaker.state(now) == "open"
        self._metrics.breaker_open.labels(deployment.provider).set(1 if taken_out else 0)
        return taken_out

    def _succeeded(self, deployment: DeploymentConfig) -> None:
        breaker = self.breaker(deployment.provider)
        if not (breaker.failures or breaker.open_until or breaker.probing):
            return  # the usual case: nothing to reset, and the gauge is already 0
        if breaker.open_until:
            log.info("deployment %s is back", deployment.provider)
        breaker.failures, breaker.open_until, breaker.probing = 0, 0.0, False
        self._metrics.breaker_open.labels(deployment.provider).set(0)


def _status_cause(status: int) -> str:
    """The failure label of a retryable answer: status_408, status_409, status_429 or status_5xx."""
    return f"status_{status}" if status < 500 else "status_5xx"


def _weighted_order(weights: list[float]) -> list[int]:
    """Indexes in a random order where heavier weights tend to come first."""
    keyed = [
        (random.random() ** (1.0 / weight) if weight > 0 else -1.0, index)
        for index, weight in enumerate(weights)
    ]
    return [index for _, index in sorted(keyed, reverse=True)]
