"""What every provider offers the proxy: send a request, get a reply to relay."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Usage:
    """Tokens the provider reports for one request."""

    prompt_tokens: int
    completion_tokens: int
    # Of the prompt tokens, those served from the provider's prompt cache (cheaper).
    cached_prompt_tokens: int = 0
    # Of the prompt tokens, those written to the provider's prompt cache (Anthropic's
    # cache_creation_input_tokens, priced above plain input).
    cache_write_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Delivery:
    """Whether a request's bytes went out to a provider, on any attempt, and how many attempts.

    Settlement reads it: once a provider has the prompt it bills it, so such a request
    is never charged zero; one that never left (refused, failed to connect) is.
    """

    __slots__ = ("attempts", "sent", "unanswered")

    def __init__(self) -> None:
        self.sent = False
        # Sends to a provider (retries and failover included), each a call it may bill.
        self.attempts = 0
        # Of those, the ones that may have reached it and got no answer (a timeout, a lost
        # connection): the provider may have processed each, so each one's prompt is charged.
        self.unanswered = 0

    def mark_sent(self) -> None:
        self.sent = True


@dataclass(frozen=True)
class UpstreamRequest:
    """A request ready for a provider: the body already names the upstream model.

    `path` is the API path after the version: chat/completions, completions,
    embeddings, responses (OpenAI's) or messages (Anthropic's).
    """

    path: str
    body: Mapping[str, Any]
    stream: bool
    upstream_model: str = ""
    # Only headers on an allow-list (anthropic-version, anthropic-beta), never credentials.
    headers: Mapping[str, str] = field(default_factory=dict)
    # The caller's bytes when `body` is exactly what they sent: forwarded as they are,
    # since serialising the same JSON again costs time for nothing.
    raw: bytes | None = None
    # Shared by every attempt of one client request (see Delivery).
    delivery: Delivery = field(default_factory=Delivery)


async def _nothing_to_close() -> None:
    return None


def _not_known_to_be_over() -> bool:
    return False


@dataclass
class UpstreamReply:
    """The provider's answer: a whole body, or raw SSE bytes as they arrive."""

    status: int
    content_type: str
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None
    close: Callable[[], Awaitable[None]] = field(default=_nothing_to_close)
    retry_after: str | None = None
    # Whether every chunk of the stream has been taken (True only once that is known).
    chunks_over: Callable[[], bool] = field(default=_not_known_to_be_over)


class Provider(Protocol):
    name: str
    # Which API families it speaks: "openai", "anthropic".
    wire_formats: frozenset[str]

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        """Send; raises UpstreamError or UpstreamTimeout when no reply can be had."""
        ...

    async def close(self) -> None: ...
