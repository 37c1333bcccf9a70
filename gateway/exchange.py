"""The accounting state of one proxied request, from admission to its ledger row."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.auth import Principal
from gateway.config import ModelConfig
from gateway.providers import Usage
from gateway.quota.service import Ticket
from gateway.tokens import ModelProfile, PromptCount

# nginx's convention for "the client closed the connection before the answer".
CLIENT_CLOSED_REQUEST = 499


@dataclass
class Exchange:
    """Filled in as the request moves along; read once by settlement."""

    request_id: str
    route: str
    principal: Principal
    model: ModelConfig
    profile: ModelProfile
    stream: bool
    prompt: PromptCount
    reserved_tokens: int
    ticket: Ticket
    client_request_id: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    upstream_started_at: float | None = None
    upstream_ended_at: float | None = None
    first_event_at: float | None = None
    status: int = 0
    error_code: str | None = None
    usage: Usage | None = None
    # Tokens of the text relayed to the client, counted only when usage never came.
    relayed_tokens: int | None = None
    # Prompt tokens the provider reported before the stream broke off (Anthropic's message_start).
    reported_prompt_tokens: int | None = None
    # Only when server.log_prompts is on: the request's prompt, for its log line.
    prompt_text: str | None = None
    client_disconnected: bool = False
    # Which deployment served it (its provider name) and after how many attempts.
    deployment: str = ""
    upstream_model: str = ""
    attempts: int = 0

    def __post_init__(self) -> None:
        self.deployment = self.deployment or self.model.provider
        self.upstream_model = self.upstream_model or self.model.upstream_model

    def log_fields(self) -> dict[str, object]:
        """What the request's log line adds from the request path (no prompt, no key)."""
        upstream = self.upstream_seconds
        fields: dict[str, object] = {
            "client_request_id": self.client_request_id,
            "provider": self.deployment,
            "upstream_model": self.upstream_model,
            "attempts": self.attempts,
            "stream": self.stream,
            "prompt_tokens_estimated": self.prompt.tokens,
            "prompt_estimate_exact": self.prompt.exact,
            "prompt_tokens": self.usage.prompt_tokens if self.usage else None,
            "completion_tokens": self.usage.completion_tokens if self.usage else self.relayed_tokens,
            "usage_source": "provider"
            if self.usage
            else ("counted" if self.relayed_tokens is not None else "none"),
            "upstream_latency_ms": round(upstream * 1000, 3) if upstream is not None else None,
        }
        if self.error_code:
            fields["error_code"] = self.error_code
        if self.prompt_text is not None:
            fields["prompt"] = self.prompt_text
        return fields

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
