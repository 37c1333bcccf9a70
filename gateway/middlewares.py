"""Request ids, errors in OpenAI's shape, authentication and request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import state
from gateway.auth import hash_key, presented_key
from gateway.client_address import CLIENT_ADDRESS, client_address
from gateway.errors import (
    GatewayError,
    InvalidApiKey,
    MethodNotAllowed,
    RateLimited,
    RequestTooLarge,
    RouteNotFound,
    ServerError,
)
from gateway.exchange import CLIENT_CLOSED_REQUEST
from gateway.logs import log_request
from gateway.metrics import UNKNOWN_MODEL, Metrics
from gateway.providers.anthropic_wire import ANTHROPIC_ERROR_TYPES
from gateway.quota.headers import anthropic_ratelimit_headers
from gateway.relay import ProviderError
from gateway.requests import EXCHANGE, MODEL_LABEL, PRINCIPAL, REQUEST_ID, new_request_id

log = logging.getLogger("gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API_PREFIX = "/v1/"
ADMIN_PREFIX = "/admin/"


ANTHROPIC_PREFIX = "/v1/messages"


def error_response(error: GatewayError, request_id: str, anthropic: bool = False) -> web.Response:
    body = error.body()
    # A caller's own request id (already in the headers) wins over ours.
    headers = {"x-request-id": request_id, "x-gateway-request-id": request_id, **error.headers}
    if anthropic:
        kind = ANTHROPIC_ERROR_TYPES.get(
            error.status, "api_error" if error.status >= 500 else "invalid_request_error"
        )
        body = {"type": "error", "error": {"type": kind, "message": error.message}}
        headers = anthropic_ratelimit_headers(headers)
    return web.Response(
        status=error.status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def _expose_if_allowed(error: ProviderError, app: web.Application) -> None:
    """The provider's own message reaches callers only where its operator opted in.

    Decided here, where the configuration is at hand: the relay that makes the error
    knows the provider's name, not its settings.
    """
    provider = app[state.CONFIG].providers.get(error.provider)
    if provider is not None and provider.expose_errors:
        error.expose()


def _translate(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPNotFound):
        return RouteNotFound(f"Unknown request URL: {exc.reason}. Check the path and method.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"Method {exc.method} is not allowed here.")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge("Request body is too large.")
    error = GatewayError(exc.reason, code="http_error", error_type="invalid_request_error")
    return error.with_status(exc.status)


Authenticate = Callable[[web.Request], Awaitable[None]]


def errors_and_metrics(authenticate: Authenticate) -> Middleware:
    """The one middleware of an application, which authenticates with `authenticate`
    (authenticate_api or authenticate_admin).

    One layer for everything: each layer is one more frame that every resumption of the
    request's coroutine passes through, and aiohttp adds one of its own to any chain.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer gets a request id, errors get OpenAI's shape, all are counted.

        API requests (not scrapes or health checks) are counted in flight here too. Their
        answer is sent before they are counted and logged: that bookkeeping then overlaps
        the client reading the answer instead of delaying it.
        """
        started = time.monotonic()
        request_id = new_request_id()
        request[REQUEST_ID] = request_id
        metrics = request.app[state.METRICS]
        api = request.path.startswith(API_PREFIX)
        if api:
            metrics.in_flight.inc()
        status = 500
        error_code: str | None = None
        try:
            try:
                await authenticate(request)
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                raise _translate(exc) from exc
            status = response.status
            exchange = request.get(EXCHANGE)
            if exchange is not None and exchange.client_disconnected:
                # A stream whose client left: its 200 went out, but it was not delivered.
                status, error_code = CLIENT_CLOSED_REQUEST, "client_disconnected"
        except GatewayError as exc:
            status, error_code = exc.status, exc.code
            if isinstance(exc, ProviderError):
                _expose_if_allowed(exc, request.app)
            response = error_response(exc, request_id, request.path.startswith(ANTHROPIC_PREFIX))
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            if api:
                _count_and_log(request, metrics, request_id, started, status, error_code)
            raise
        except Exception:
            error_code = "server_error"
            log.exception("unhandled error serving %s %s", request.method, request.path)
            error = ServerError("The gateway had an internal error.")
            response = error_response(error, request_id, request.path.startswith(ANTHROPIC_PREFIX))
        if api:
            try:
                await _send(request, response)
            finally:
                _count_and_log(request, metrics, request_id, started, status, error_code)
        return response

    return middleware


async def _send(request: web.Request, response: web.StreamResponse) -> None:
    """Send the whole answer now (aiohttp would do it after the middlewares return)."""
    # A client that is gone: aiohttp's own send would fail the same way and drop it.
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()


def _count_and_log(
    request: web.Request,
    metrics: Metrics,
    request_id: str,
    started: float,
    status: int,
    error_code: str | None,
) -> None:
    metrics.in_flight.dec()
    route = request.match_info.route.resource
    route_label = route.canonical if route is not None else "unmatched"
    model = request.get(MODEL_LABEL, UNKNOWN_MODEL)
    elapsed = time.monotonic() - started
    series = metrics.series_of(route_label, model)
    series.answered(status).inc()
    series.duration.observe(elapsed)
    exchange = request.get(EXCHANGE)
    upstream = exchange.upstream_seconds if exchange is not None else None
    if upstream is not None:
        series.overhead().observe(max(0.0, elapsed - upstream))
    log_request(request_log_fields(request, request_id, route_label, status, elapsed, error_code))


async def authenticate_api(request: web.Request) -> None:
    """The caller's gateway key on API routes, the admin key on admin routes; the rest is open."""
    path = request.path
    if path.startswith(API_PREFIX):
        await _authenticate_caller(request)
    elif path.startswith(ADMIN_PREFIX):
        _authenticate_admin(request)


async def authenticate_admin(request: web.Request) -> None:
    """The admin site's: the admin key on admin routes (the site serves nothing else)."""
    if request.path.startswith(ADMIN_PREFIX):
        _authenticate_admin(request)


async def _authenticate_caller(request: web.Request) -> None:
    try:
        token = presented_key(request.headers.get("Authorization"), request.headers.get("x-api-key"))
        request[PRINCIPAL] = await request.app[state.AUTH].authenticate(token)
    except InvalidApiKey as refused:
        _count_failure(request, refused)
        raise


def _authenticate_admin(request: web.Request) -> None:
    """The admin API needs the admin key (never a caller's key); without one it is off."""
    expected = request.app[state.CONFIG].admin_key_sha256
    if expected is None:
        raise RouteNotFound("The admin API is disabled: set admin.key_sha256 in gateway.yaml.")
    try:
        token = presented_key(request.headers.get("Authorization"), request.headers.get("x-api-key"))
        if not hmac.compare_digest(hash_key(token), expected):
            raise InvalidApiKey("Incorrect admin key.")
    except InvalidApiKey as refused:
        _count_failure(request, refused)
        raise


def _count_failure(request: web.Request, refused: InvalidApiKey) -> None:
    """Count a failed key check against the client's address; past the limit, answer
    429 instead of the 401 (raised here).

    The key is always checked before this: a valid key is never refused because others
    behind the same address (a NAT, a load balancer) keep failing. A guess past the limit
    still costs its key lookup (a database query unless cached): refusing it unchecked
    could refuse a valid key. Guessing a 256-bit key is hopeless either way; the 429 is
    for clients stuck on a wrong key, telling them to stop (x-should-retry: false).
    """
    failures = request.app.get(state.AUTH_FAILURES)
    if failures is None:  # an application without the limiter (tests' bare apps)
        return
    address = client_address(request, request.app[state.CONFIG].server.trusted_proxies)
    request[CLIENT_ADDRESS] = address
    wait = failures.failed(address)
    if wait is not None:
        raise RateLimited(
            f"Too many failed authentications from this address; this one: {refused.message}",
            code="too_many_failed_authentications",
            error_type="requests",
            headers={"retry-after": str(max(1, math.ceil(wait))), "x-should-retry": "false"},
        )


def request_log_fields(
    request: web.Request, request_id: str, route: str, status: int, elapsed: float, error_code: str | None
) -> dict[str, object]:
    """The request's log line: never a key, never a prompt unless server.log_prompts."""
    principal = request.get(PRINCIPAL)
    fields: dict[str, object] = {
        "request_id": request_id,
        "method": request.method,
        "route": route,
        "status": status,
        "latency_ms": round(elapsed * 1000, 3),
        "key_id": principal.key_id if principal else None,
        "user": principal.user if principal else None,
        "team": principal.team if principal else None,
        "model": request.get(MODEL_LABEL),
    }
    if (address := request.get(CLIENT_ADDRESS)) is not None:
        fields["client_address"] = address  # set where authentication failed
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        fields.update(exchange.log_fields())
    if error_code is not None:
        fields["error_code"] = error_code
    return fields
