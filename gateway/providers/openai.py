"""OpenAI itself and any OpenAI-compatible server (vLLM, Ollama, llama.cpp), and Azure OpenAI."""

from __future__ import annotations

from urllib.parse import quote

from gateway.providers.base import UpstreamRequest
from gateway.providers.http import HttpProvider


class OpenAIProvider(HttpProvider):
    """`{base_url}/{path}` with a bearer key."""

    def url(self, request: UpstreamRequest) -> str:
        return f"{self._base_url}/{request.path}"

    def credentials(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}


class AzureOpenAIProvider(HttpProvider):
    """Azure's deployment URLs: the upstream model is the deployment's name."""

    def url(self, request: UpstreamRequest) -> str:
        deployment = quote(request.upstream_model, safe="")
        return (
            f"{self._base_url}/openai/deployments/{deployment}/{request.path}"
            f"?api-version={quote(self._config.api_version or '', safe='')}"
        )

    def models_url(self) -> str:
        return f"{self._base_url}/openai/models?api-version={quote(self._config.api_version or '', safe='')}"

    def credentials(self) -> dict[str, str]:
        return {"api-key": self._api_key} if self._api_key else {}
