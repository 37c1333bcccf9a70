"""The accounting state of one proxied request, from admission to its ledger row."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, NamedTuple

from gateway.auth import Principal
from gateway.config import ModelConfig
from gateway.providers import Usage
from gateway.providers.base import Delivery
from gateway.quota.service import Ticket
from gateway.tokens import ModelProfile, PromptCount

if TYPE_CHECKING:
    from gateway.routing import Routed
    from gateway.translate import Translator

# nginx's convention for "the client closed the connection before the answer".
CLIENT_CLOSED_REQUEST = 499


class FinalUsage(NamedTuple):
    usage: Usage | None
    # provider | counted | estimated | none (see Exchange.final_usage)
    source: str


class Exchange:
    """Filled in as the request moves along; read once by settlement.

    A plain class, not a dataclass: its __init__ sets the dozen fields known at admission,
    and the twenty filled in later (or never) are read from these class defaults until
    set, where a dataclass's __init__ set all of them for every request (making one took
    19,000 instructions, now 13,000).
    """

    upstream_started_at: float | None = None
    upstream_ended_at: float | None = None
    first_event_at: float | None = None
    status: int = 0
    error_code: str | None = None
    # What more is known of the error, from a small fixed set (GatewayError.detail).
    error_detail: str | None = None
    usage: Usage | None = None
    # Tokens of the text the provider sent (relayed or not), counted only when usage never came.
    relayed_tokens: int | None = None
    # Prompt tokens the provider reported before the stream broke off (Anthropic's message_start).
    reported_prompt_tokens: int | None = None
    # Only when server.log_prompts is on: the request's prompt, for its log line.
    prompt_text: str | None = None
    client_disconnected: bool = False
    # The provider answered with an error of its own: it bills nothing for that.
    refused_by_provider: bool = False
    # Some attempt's reply is what the client got (else every attempt failed, or none ran).
    replied: bool = False
    # Set when the deployment that answered speaks another API family than the caller:
    # the translator its answer goes through (docs/translation.md).
    translator: Translator | None = None
    # A non-streamed call still running when its client left (settlement finishes it).
    upstream_call: asyncio.Task[Routed] | None = None

    def __init__(
        self,
        request_id: str,
        route: str,
        principal: Principal,
        model: ModelConfig,
        profile: ModelProfile,
        stream: bool,
        prompt: PromptCount,
        reserved_tokens: int,
        ticket: Ticket,
        client_request_id: str | None = None,
        delivery: Delivery | None = None,
        wire_format: str = "openai",
    ) -> None:
        """wire_format: the API family the caller spoke, "openai" or "anthropic"; delivery:
        whether the provider got the request (then it is never charged zero)."""
        self.request_id, self.route, self.principal = request_id, route, principal
        self.model, self.profile, self.stream, self.prompt = model, profile, stream, prompt
        self.reserved_tokens, self.ticket = reserved_tokens, ticket
        self.client_request_id, self.wire_format = client_request_id, wire_format
        self.delivery = delivery if delivery is not None else Delivery()
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        # Which deployment served it (its provider name), until another answers.
        self.deployment = model.provider
        self.upstream_model = model.upstream_model

    def log_fields(self) -> dict[str, object]:
        """What the request's log line adds from the request path (no prompt, no key)."""
        upstream = self.upstream_seconds
        final = self.final_usage()
        fields: dict[str, object] = {
            "client_request_id": self.client_request_id,
            "provider": self.deployment,
            "upstream_model": self.upstream_model,
            "attempts": self.attempts,
            "stream": self.stream,
            "prompt_tokens_estimated": self.prompt.tokens,
            "prompt_estimate_exact": self.prompt.exact,
            "prompt_tokens": final.usage.prompt_tokens if final.usage else None,
            "completion_tokens": final.usage.completion_tokens if final.usage else None,
            "usage_source": final.source,
            "upstream_latency_ms": round(upstream * 1000, 3) if upstream is not None else None,
        }
        if self.error_code:
            fields["error_code"] = self.error_code
        if self.error_detail:
            fields["error_detail"] = self.error_detail
        if self.prompt_text is not None:
            fields["prompt"] = self.prompt_text
        return fields

    def final_usage(self) -> FinalUsage:
        """What the request is charged, and how that was found (docs/reliability.md).

        The provider's usage when it gave one. Else, once the provider had the request,
        at least the prompt (the provider's own input figure when it sent one, else our
        pre-flight count) plus the completion tokens counted from everything it sent:
        "counted" when both figures come from an exact tokenizer or the provider,
        "estimated" otherwise. Nothing ("none") when the request never reached a provider
        or the provider refused it with an error of its own.

        Attempts that reached a provider and got no answer before another was sent
        (a timeout, a lost connection, then a retry) add their prompts: the provider may
        have processed each. The row is then "counted" or "estimated", no longer the
        provider's own figures alone.
        """
        final = self._final_attempt_usage()
        lost = self.delivery.unanswered - (0 if self.replied or not self.delivery.unanswered else 1)
        if lost <= 0:
            return final
        extra = lost * self.prompt.tokens
        base = final.usage or Usage(0, 0)
        exact = self.prompt.exact and final.source in ("provider", "counted", "none")
        return FinalUsage(
            Usage(
                base.prompt_tokens + extra,
                base.completion_tokens,
                base.cached_prompt_tokens,
                base.cache_write_prompt_tokens,
            ),
            "counted" if exact else "estimated",
        )

    def _final_attempt_usage(self) -> FinalUsage:
        """What the attempt that ended the request is charged (final_usage)."""
        if self.usage is not None:
            return FinalUsage(self.usage, "provider")
        if not self.delivery.sent or self.refused_by_provider:
            return FinalUsage(None, "none")
        reported = self.reported_prompt_tokens
        prompt = self.prompt.tokens if reported is None else reported
        completion = self.relayed_tokens or 0
        if completion and not self.profile.exact:
            # Counted by an estimating tokenizer: calibrated as the prompt's count was.
            completion = math.ceil(completion * self.prompt.factor)
        exact = (reported is not None or self.prompt.exact) and (completion == 0 or self.profile.exact)
        return FinalUsage(Usage(prompt, completion), "counted" if exact else "estimated")

    @property
    def attempts(self) -> int:
        """Sends to providers, each counted as it went (so also when every one failed)."""
        return self.delivery.attempts

    def routed(self, routed: Routed) -> None:
        """Note which deployment answered."""
        self.replied = True
        self.deployment = routed.deployment.provider
        self.upstream_model = routed.deployment.upstream_model
        self.translator = routed.translator

    @property
    def provider_api(self) -> str | None:
        """The API family of the deployment that answered; None when none did."""
        if not self.replied:
            return None
        return self.wire_format if self.translator is None else self.translator.provider

    def upstream_began(self) -> None:
        self.upstream_started_at = time.monotonic()

    def upstream_finished(self) -> None:
        if self.upstream_started_at is not None and self.upstream_ended_at is None:
            self.upstream_ended_at = time.monotonic()

    @property
    def upstream_seconds(self) -> float | None:
        if self.upstream_started_at is None or self.upstream_ended_at is None:
            return None
        return self.upstream_ended_at - self.upstream_started_at
