"""Anthropic's Messages API."""

from __future__ import annotations

from gateway.providers.base import UpstreamRequest
from gateway.providers.http import HttpProvider

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


class AnthropicProvider(HttpProvider):
    wire_formats = frozenset({"anthropic"})

    def url(self, request: UpstreamRequest) -> str:
        return f"{self._base_url}/v1/{request.path}"

    def credentials(self) -> dict[str, str]:
        return {"x-api-key": self._api_key} if self._api_key else {}

    def extra_headers(self, request: UpstreamRequest) -> dict[str, str]:
        headers = {"anthropic-version": request.headers.get("anthropic-version", DEFAULT_ANTHROPIC_VERSION)}
        if "anthropic-beta" in request.headers:
            headers["anthropic-beta"] = request.headers["anthropic-beta"]
        return headers
