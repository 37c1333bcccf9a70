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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.config import DeploymentConfig, ModelConfig, ProviderConfig, RoutingConfig
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable, UpstreamError
from gateway.metrics import Metrics
from gateway.providers import Provider, UpstreamReply, UpstreamRequest
from gateway.translate import Translator, reach

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
    # The translator between the caller's API family and the answering deployment's
    # (None: the deployment speaks the caller's family).
    translator: Translator | None = None


@dataclass(frozen=True)
class Plan:
    """The deployments of one model that can serve callers of one API, and how."""

    # In configuration order; the first is the usual one (counted and prepared before admission).
    deployments: tuple[DeploymentConfig, ...]
    # Provider name → the translator its deployments need; a provider that speaks the
    # caller's family is not in it (so a model without translation has it empty).
    translators: Mapping[str, Translator] = field(default_factory=dict)

    def translator(self, deployment: DeploymentConfig) -> Translator | None:
        return self.translators.get(deployment.provider) if self.translators else None


class Router:
    def __init__(
        self,
        providers: dict[str, Provider],
        config: RoutingConfig,
        metrics: Metrics,
        choose: Callable[[list[float]], list[int]] | None = None,
        provider_configs: Mapping[str, ProviderConfig] | None = None,
    ) -> None:
        """provider_configs: the providers' options that shape a translation (max_tokens_field)."""
        self._providers = providers
        self._provider_configs = provider_configs or {}
        self._config = config
        self._metrics = metrics
        self._breakers: dict[str, Breaker] = {}
        self._choose = choose or _weighted_order
        # (model, caller family, whether the route translates) → its Plan, made on first use.
        self._plans: dict[tuple[str, str, bool], Plan] = {}
        for name in providers:
            # Every provider's series from the start; after that it is set when it changes.
            metrics.breaker_open.labels(name).set(0)

    def breaker(self, provider: str) -> Breaker:
        return self._breakers.setdefault(provider, Breaker())

    def breaker_states(self) -> dict[str, str]:
        now = time.monotonic()
        return {name: self.breaker(name).state(now) for name in self._providers}

    def plan(self, model: ModelConfig, caller: str, translates: bool) -> Plan:
        """Which deployments of the model serve a caller of this API family: those whose
        provider speaks it, and when the route `translates`, those a translator reaches
        (docs/translation.md). Its `deployments` may be empty (the proxy says why)."""
        key = (model.name, caller, translates)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(model, caller, translates)
        return plan

    def _make_plan(self, model: ModelConfig, caller: str, translates: bool) -> Plan:
        usable: list[DeploymentConfig] = []
        translators: dict[str, Translator] = {}
        for deployment in model.deployments:
            wire_formats = self._providers[deployment.provider].wire_formats
            options = self._provider_configs.get(deployment.provider)
            max_tokens_field = (
                options.max_tokens_field if options is not None else ProviderConfig.max_tokens_field
            )
            found = reach(caller, wire_formats, max_tokens_field)
            if found is None or (found.translator is not None and not translates):
                continue
            usable.append(deployment)
            if found.translator is not None:
                translators[deployment.provider] = found.translator
        return Plan(tuple(usable), translators)

    def _candidates(self, plan: Plan) -> list[DeploymentConfig]:
        now = time.monotonic()
        usable: list[DeploymentConfig] = []
        for deployment in plan.deployments:
            breaker = self.breaker(deployment.provider)
            state = breaker.state(now)
            if state == "closed":
                usable.append(deployment)
            elif state == "half_open" and not breaker.probing:
                # One request probes a cooled-down deployment; the others keep away.
                breaker.probing = True
                usable.append(deployment)
        if len(usable) < 2:  # the usual model, of one deployment: no order to draw
            return usable
        order = self._choose([deployment.weight for deployment in usable])
        return [usable[index] for index in order]

    async def send(
        self, model: ModelConfig, make: Callable[[DeploymentConfig], UpstreamRequest], plan: Plan
    ) -> Routed:
        """The first good reply, or the last failure (raised, or returned as the reply).

        `make` may refuse a deployment (InvalidRequest: a translation its API family
        cannot carry): the next is tried, and the refusal is raised only when no
        deployment was tried at all.
        """
        candidates = self._candidates(plan)
        if not candidates:
            raise ServiceUnavailable(
                f"Every deployment of model `{model.name}` is cooling down after failures; try again soon.",
                code="no_healthy_deployment",
                headers={"retry-after": str(max(1, round(self._config.breaker_cooldown_seconds)))},
            )
        attempts = 0
        last_error: GatewayError | None = None
        last_reply: tuple[UpstreamReply, DeploymentConfig] | None = None
        refused: InvalidRequest | None = None
        tried: list[DeploymentConfig] = []
        for deployment in candidates:
            provider = self._providers[deployment.provider]
            try:
                request = make(deployment)
            except InvalidRequest as exc:
                # Its API family cannot carry this request; not the deployment's failure.
                refused = exc
                self._release_probe(deployment)
                continue
            tried.append(deployment)
            for retry in range(self._config.attempts_per_deployment):
                if attempts:
                    await asyncio.sleep(self._config.backoff_seconds * (2**retry) * random.uniform(0.5, 1.0))
                attempts += 1
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
                return Routed(reply, deployment, attempts, plan.translator(deployment))
        if last_reply is not None and (last_error is None or last_reply[1] == tried[-1]):
            return Routed(last_reply[0], last_reply[1], attempts, plan.translator(last_reply[1]))
        if last_error is None:
            assert refused is not None
            raise refused
        raise last_error

    def _release_probe(self, deployment: DeploymentConfig) -> None:
        """A cooled-down deployment picked to probe and then not sent to: another request probes it."""
        breaker = self.breaker(deployment.provider)
        if breaker.probing and breaker.state(time.monotonic()) == "half_open":
            breaker.probing = False

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
