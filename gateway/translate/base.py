"""What a translator between two API families offers the request path.

One translator per (caller family, provider family) pair, each a module that turns the
caller's request into the provider's, the provider's answer (whole or streamed) back
into the caller's, and reads the provider's own usage on the way: a third family is one
more module (docs/translation.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.providers.base import Usage


@dataclass(frozen=True)
class StreamContext:
    """What a stream translation needs to know of its request."""

    # The model name the caller asked for (what its answer names when the provider's
    # own name is not known yet).
    model: str
    # OpenAI callers: whether they asked for the usage chunk (stream_options.include_usage).
    include_usage: bool
    # The gateway's pre-flight count of the prompt as sent to the provider: Anthropic's
    # message_start carries input tokens before any output, which an OpenAI provider only
    # reports at the end.
    prompt_tokens: int


class StreamTranslation(Protocol):
    """One stream: whole provider SSE events in, whole caller SSE events out."""

    # The provider's own usage, once its stream reported it (with Anthropic's cache
    # reads and writes kept apart); None until then.
    usage: Usage | None
    # The provider's last event (or an error event) was seen.
    finished: bool

    def feed(self, event: bytes) -> list[bytes]:
        """One whole provider event (as SseSplitter cuts them) → the caller's events for it."""
        ...

    def finish(self) -> list[bytes]:
        """The provider's stream ended: the caller's closing events, if it ended whole."""
        ...


class Translator(Protocol):
    # The API family the caller speaks, and the one the provider speaks.
    caller: str
    provider: str
    # The provider's API path (after /v1/) and the counting route of the translated body.
    provider_path: str
    provider_count_route: str

    def request(
        self, body: Mapping[str, Any], upstream_model: str, stream: bool, max_tokens: int
    ) -> dict[str, Any]:
        """The provider's body for the caller's; InvalidRequest (400, naming the field) for
        anything the provider cannot do as asked. `max_tokens`: the completion budget the
        gateway reserved, for a provider that requires one when the caller set none."""
        ...

    def response(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The caller's whole answer for the provider's whole answer (a 200 body)."""
        ...

    def usage(self, body: Mapping[str, Any]) -> Usage | None:
        """The provider's usage in its whole answer, or None when it sent none."""
        ...

    def stream(self, context: StreamContext) -> StreamTranslation: ...
