"""Every error a client can receive, each with one stable code.

Handlers raise these; the error middleware turns them into the OpenAI error shape
(`{"error": {"message", "type", "param", "code"}}`). docs/errors.md lists every code
with its remedy; keep the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class GatewayError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    status: int = 500
    error_type: str = "server_error"
    code: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
        error_type: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # More than the code says, from a small fixed set (the ledger's error_detail and
        # a metric label): never free text, which could carry a provider's internals.
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        if code is not None:
            self.code = code
        if error_type is not None:
            self.error_type = error_type

    def with_status(self, status: int) -> GatewayError:
        """The same error answered with another status (relayed provider errors)."""
        self.status = status
        return self

    def body(self) -> dict[str, Any]:
        """The JSON body clients see."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    """The request body or parameters are malformed (400)."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request_error"


class InvalidApiKey(GatewayError):
    """The gateway key is missing, unknown or revoked (401)."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(GatewayError):
    """The model is not configured, or the caller may not use it (404)."""

    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(GatewayError):
    """No such endpoint (404)."""

    status = 404
    error_type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(GatewayError):
    """The endpoint exists but not for this HTTP method (405)."""

    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    """The request body arrived too slowly (408)."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class RequestTooLarge(GatewayError):
    """The body exceeds server.max_body_bytes (413)."""

    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedContentEncoding(GatewayError):
    """The request body is compressed (415)."""

    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_content_encoding"


class RateLimited(GatewayError):
    """A quota limit rejected the request (429)."""

    status = 429
    error_type = "tokens"
    code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """The provider failed or answered something unusable (502)."""

    status = 502
    error_type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """The provider did not answer in time (504); detail says which timeout ran out.

    An UpstreamError: retried, failed over and counted by the breaker like the others.
    """

    status = 504
    error_type = "server_error"
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    """A backend the gateway needs to admit requests is unreachable (503)."""

    status = 503
    error_type = "server_error"
    code = "service_unavailable"


class ServerError(GatewayError):
    """A bug in the gateway (500); the log has the traceback."""

    status = 500
    error_type = "server_error"
    code = "server_error"
