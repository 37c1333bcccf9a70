"""The request path: parse → count → reserve → route → relay → settle.

One handler serves every proxied endpoint; a RouteSpec says what differs between them.
Provider details live in providers/ and routing.py, accounting in quota/ and ledger/;
this module only puts them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import requests, state
from gateway.config import DeploymentConfig, ModelConfig
from gateway.errors import GatewayError, InvalidRequest
from gateway.exchange import CLIENT_CLOSED_REQUEST, Exchange
from gateway.jsontext import ObjectText
from gateway.providers import UpstreamRequest
from gateway.providers.base import Delivery
from gateway.quota import ratelimit_headers
from gateway.quota.headers import anthropic_ratelimit_headers
from gateway.quota.service import amounts_for
from gateway.relay import (
    AnthropicStream,
    OpenAIStream,
    ResponsesStream,
    StreamObserver,
    relay_body,
    relay_stream,
)
from gateway.requests import (
    EXCHANGE,
    PRINCIPAL,
    REQUEST_ID,
    client_request_id,
    read_json_object,
    resolve_model,
)
from gateway.routing import Plan, Routed
from gateway.tokens.prompts import prompt_multiplicity
from gateway.translate import StreamContext, Translator
from gateway.translated_stream import relay_translated_stream

# Caller headers a provider may see; everything else (credentials, cookies, hop-by-hop) stays here.
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")


@dataclass(frozen=True)
class RouteSpec:
    """What one proxied endpoint needs: its upstream path, counting rule and wire format."""

    name: str
    path: str
    count_route: str
    wire_format: str
    validate: Callable[[Mapping[str, Any]], object]
    # Every field that caps the completion, each validated; the last is where a policy's
    # cap goes when the request sets none (chat: max_tokens, which every compatible server reads).
    max_fields: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
    # Completion tokens reserved when the request sets none (None: the configured default).
    default_max: int | None = None
    streams: bool = True
    requires_max: bool = False
    # Whether the upstream is asked for usage in streams (stream_options.include_usage).
    injects_usage: bool = False
    # Whether the route generates `n` completions per prompt (and `best_of` candidates).
    takes_n: bool = False
    takes_best_of: bool = False
    # Whether deployments of the other API family serve it through a translator
    # (gateway/translate; docs/translation.md).
    translates: bool = False


ROUTES = {
    "chat": RouteSpec(
        "chat/completions",
        "chat/completions",
        "chat",
        "openai",
        requests.validate_messages,
        injects_usage=True,
        takes_n=True,
        translates=True,
    ),
    "completions": RouteSpec(
        "completions",
        "completions",
        "completions",
        "openai",
        lambda body: requests.validate_input(body, "prompt"),
        max_fields=("max_tokens",),
        default_max=16,  # OpenAI's documented default for legacy completions
        injects_usage=True,
        takes_n=True,
        takes_best_of=True,
    ),
    "embeddings": RouteSpec(
        "embeddings",
        "embeddings",
        "embeddings",
        "openai",
        lambda body: requests.validate_input(body, "input"),
        max_fields=(),
        default_max=0,
        streams=False,
    ),
    "responses": RouteSpec(
        "responses",
        "responses",
        "responses",
        "openai",
        requests.validate_responses_input,
        max_fields=("max_output_tokens",),
    ),
    "messages": RouteSpec(
        "messages",
        "messages",
        "messages",
        "anthropic",
        requests.validate_anthropic_messages,
        max_fields=("max_tokens",),
        requires_max=True,
        translates=True,
    ),
}


def handler(spec: RouteSpec) -> Callable[[web.Request], Any]:
    # A partial, not a wrapping coroutine: one frame fewer on every resumption.
    return functools.partial(proxy, spec=spec)


async def proxy(request: web.Request, spec: RouteSpec) -> web.StreamResponse:
    app = request.app
    config = app[state.CONFIG]
    principal = request[PRINCIPAL]
    forwarded = forwarded_headers(request.headers)
    body, raw, text = await read_json_object(request, spans=True)
    model = resolve_model(request, body)
    spec.validate(body)
    plan = app[state.ROUTER].plan(model, spec.wire_format, spec.translates)
    if not plan.deployments:
        raise _not_served(model, spec)
    stream = requests.wants_stream(body) if spec.streams else False
    if not spec.streams and body.get("stream"):
        raise InvalidRequest(f"/v1/{spec.name} does not stream.", param="stream")
    quota = app[state.QUOTA]
    decision = quota.request_policy(principal, model)
    requested = requests.requested_max_tokens(body, spec.max_fields) if spec.max_fields else None
    if spec.requires_max and requested is None:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    default = config.quota.default_max_completion_tokens if spec.default_max is None else spec.default_max
    max_completion = quota.completion_budget(decision, requested, default) if spec.max_fields else 0
    capped: dict[str, int] = {}
    if (
        decision.max_tokens_cap is not None
        and spec.max_fields
        and (requested is None or requested > max_completion)
    ):
        # The policy's cap goes upstream too, in every field a provider might read, so it
        # cannot bill past it; a field the caller set lower stays as it is.
        for field in spec.max_fields:
            value = body.get(field)
            if value is not None and value > max_completion:
                capped[field] = max_completion
        if requested is None:
            capped[spec.max_fields[-1]] = max_completion
    choices = _choices(body, spec)

    counter = app[state.COUNTER]
    usual = plan.deployments[0]
    profile = counter.registry.profile(usual.upstream_model, model.tokenizer)
    upstream = UpstreamBodies(forwarded, body, raw, text, capped, spec, stream, usual, plan, max_completion)
    translator = plan.translator(usual)
    if translator is None:
        prompt = await counter.count(spec.count_route, body, profile, len(raw))
    else:
        # Translated before admission, so a request its provider's API cannot carry is a
        # 400 that costs nothing; counted as the provider will read it.
        sent = upstream.for_deployment(usual)
        prompt = await counter.count(
            translator.provider_count_route, sent.body, profile, len(sent.raw or b"")
        )
    completions = max_completion * choices
    # The usual deployment's body is serialised while Redis decides the admission.
    ticket = await quota.admit(decision, amounts_for(model, prompt.tokens, completions), upstream.prepare)
    admission = ticket.admission

    exchange = Exchange(
        request_id=request[REQUEST_ID],
        route=spec.name,
        principal=principal,
        model=model,
        profile=profile,
        stream=stream,
        prompt=prompt,
        reserved_tokens=prompt.tokens + completions,
        ticket=ticket,
        client_request_id=client_request_id(request),
        delivery=upstream.delivery,
        wire_format=spec.wire_format,
    )
    request[EXCHANGE] = exchange
    if config.server.log_prompts:
        exchange.prompt_text = json.dumps(
            {key: body[key] for key in ("messages", "prompt", "input", "system") if key in body},
            ensure_ascii=False,
        )[:16_384]
    headers = {**ratelimit_headers(admission), **_ids(exchange)}
    if spec.wire_format == "anthropic":
        headers = anthropic_ratelimit_headers(headers)
    try:
        return await _forward(request, upstream, spec, exchange, headers, plan)
    except GatewayError as exc:
        exchange.status, exchange.error_code = exc.status, exc.code
        exchange.error_detail = exc.detail
        exc.headers = {**headers, **exc.headers}
        raise
    except asyncio.CancelledError:
        # The client went away (aiohttp cancels the handler): what was produced is charged,
        # and a call still under way is finished by settlement (see _forward).
        if exchange.upstream_call is None:
            exchange.upstream_finished()
        exchange.status = CLIENT_CLOSED_REQUEST
        exchange.error_code = "client_disconnected"
        raise
    except BaseException:
        exchange.status, exchange.error_code = 500, "server_error"
        raise
    finally:
        # Synchronous: runs even when the handler is being cancelled.
        app[state.SETTLEMENT].settle_later(exchange)


def _not_served(model: ModelConfig, spec: RouteSpec) -> InvalidRequest:
    """Why no deployment of the model serves this route (400)."""
    if spec.count_route == "responses":
        # Responses are not translated to Messages (docs/translation.md says why).
        return InvalidRequest(
            f"Model `{model.name}` is served by Anthropic's Messages API here, and the Responses API "
            "is served only by OpenAI deployments: use /v1/chat/completions or /v1/messages.",
            param="model",
            code="unsupported_by_provider",
        )
    api = "Anthropic Messages" if spec.wire_format == "anthropic" else "OpenAI"
    return InvalidRequest(
        f"Model `{model.name}` is not served through the {api} API here.",
        param="model",
        code="wrong_api_for_model",
    )


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's headers that go to the provider, each printable ASCII (400 otherwise).

    Checked before admission: aiohttp hands over other bytes (0xff) as lone surrogates,
    which could not be sent, and a provider would refuse non-ASCII after it was counted.
    """
    forwarded = {name: headers[name] for name in FORWARDED_HEADERS if name in headers}
    for name, value in forwarded.items():
        if not (value.isascii() and value.isprintable()):
            raise InvalidRequest(
                f"The {name} header must be printable ASCII characters.", param=name, code="invalid_header"
            )
    return forwarded


def _choices(body: Mapping[str, Any], spec: RouteSpec) -> int:
    """How many completions the provider generates and bills: n (or best_of, when larger)
    for each prompt; legacy completions take several prompts."""
    if not spec.takes_n:
        return 1
    choices = requests.requested_choices(body, best_of=spec.takes_best_of)
    if spec.count_route == "completions":
        return choices * prompt_multiplicity(body.get("prompt"))
    return choices


def _ids(exchange: Exchange) -> dict[str, str]:
    # The caller's id comes back when given (and is in the ledger as client_request_id).
    return {
        "x-request-id": exchange.client_request_id or exchange.request_id,
        "x-gateway-request-id": exchange.request_id,
    }


class UpstreamBodies:
    """What each deployment is sent, made at most once per upstream model name.

    Made before admission, so that `prepare` can serialise the usual deployment's body
    while Redis decides; a deployment reached by failover gets its own when asked.
    The caller's bytes go as they are when nothing changes; when something does (the
    model's alias, usage asked for in a stream, a policy's cap), the body keeps its text
    with those values replaced (see jsontext); one jsontext gave no spans is serialised again.
    A deployment of another API family gets the caller's body (with the policy's caps)
    translated into its own (see gateway/translate).
    """

    __slots__ = (
        "_body",
        "_capped",
        "_made",
        "_max_completion",
        "_raw",
        "_text",
        "_translated",
        "_translators",
        "_usual",
        "adds_usage_option",
        "client_wants_usage",
        "delivery",
        "headers",
        "path",
        "stream",
    )

    def __init__(
        self,
        caller_headers: Mapping[str, str],
        body: dict[str, Any],
        raw: bytes,
        text: ObjectText | None,
        capped: dict[str, int],
        spec: RouteSpec,
        stream: bool,
        usual: DeploymentConfig,
        plan: Plan,
        max_completion: int,
    ) -> None:
        """body, raw, text: the caller's (see read_json_object); capped: the fields a policy
        capped; max_completion: the completion budget reserved (for a translation to a
        provider that requires a cap the caller did not set)."""
        self._body, self._raw, self._text, self._capped = body, raw, text, capped
        self._usual = usual
        self._translators = plan.translators
        self._max_completion = max_completion
        self.path, self.stream = spec.path, stream
        options = body.get("stream_options")
        self.client_wants_usage = (
            stream
            and spec.injects_usage
            and isinstance(options, dict)
            and options.get("include_usage") is True
        )
        # Usage must be asked for in streams: it is what the reservation is settled with.
        self.adds_usage_option = stream and spec.injects_usage and not self.client_wants_usage
        self.headers = {name: caller_headers[name] for name in FORWARDED_HEADERS if name in caller_headers}
        self._made: dict[str, UpstreamRequest] = {}
        self._translated: dict[tuple[str, Translator], UpstreamRequest] = {}
        # One for every deployment tried: did any of them get the request?
        self.delivery = Delivery()

    def prepare(self) -> None:
        """Serialise the usual deployment's body now; never raises (`for_model` would, later)."""
        with contextlib.suppress(Exception):
            self.for_deployment(self._usual)

    def for_deployment(self, deployment: DeploymentConfig) -> UpstreamRequest:
        """InvalidRequest (400) when a translation cannot carry the request to this deployment."""
        translator = self._translators.get(deployment.provider) if self._translators else None
        if translator is None:
            return self.for_model(deployment.upstream_model)
        key = (deployment.upstream_model, translator)
        made = self._translated.get(key)
        if made is None:
            made = self._translated[key] = self._translate(deployment.upstream_model, translator)
        return made

    def for_model(self, upstream_model: str) -> UpstreamRequest:
        made = self._made.get(upstream_model)
        if made is None:
            made = self._made[upstream_model] = self._make(upstream_model)
        return made

    def _make(self, upstream_model: str) -> UpstreamRequest:
        body = self._body
        changes: dict[str, Any] = dict(self._capped)
        if body.get("model") != upstream_model:
            changes["model"] = upstream_model
        if self.adds_usage_option:
            options = body.get("stream_options")
            options = options if isinstance(options, dict) else {}
            changes["stream_options"] = {**options, "include_usage": True}
        if not changes:
            return self._request(body, upstream_model, self._raw)
        upstream_body = {**body, **changes}
        if self._text is not None:
            raw = self._text.with_values(changes)
        else:
            raw = json.dumps(upstream_body).encode()
        return self._request(upstream_body, upstream_model, raw)

    def _request(self, body: Mapping[str, Any], upstream_model: str, raw: bytes) -> UpstreamRequest:
        return UpstreamRequest(
            self.path, body, self.stream, upstream_model, self.headers, raw=raw, delivery=self.delivery
        )

    def _translate(self, upstream_model: str, translator: Translator) -> UpstreamRequest:
        body = {**self._body, **self._capped} if self._capped else self._body
        translated = translator.request(body, upstream_model, self.stream, self._max_completion)
        # Only the caller's headers of the provider's own family (anthropic-version and
        # anthropic-beta go to Anthropic's API, never to OpenAI's).
        headers = self.headers if translator.provider == "anthropic" else {}
        return UpstreamRequest(
            translator.provider_path,
            translated,
            self.stream,
            upstream_model,
            headers,
            raw=json.dumps(translated, ensure_ascii=False, separators=(",", ":")).encode(),
            delivery=self.delivery,
        )


async def _forward(
    request: web.Request,
    upstream: UpstreamBodies,
    spec: RouteSpec,
    exchange: Exchange,
    headers: dict[str, str],
    plan: Plan,
) -> web.StreamResponse:
    exchange.upstream_began()
    app = request.app
    sending = app[state.ROUTER].send(exchange.model, upstream.for_deployment, plan)
    if exchange.stream or app[state.CONFIG].server.on_client_disconnect == "abort":
        # A client that leaves cancels this await, which closes the provider's connection.
        routed = await sending
    else:
        # A whole answer the provider is making is not abandoned with its client: it is
        # read to its end and settled with the provider's own usage (Settlement).
        loop = asyncio.get_running_loop()
        call = exchange.upstream_call = loop.create_task(sending)
        # asyncio.shield's work, lighter: a client that leaves cancels this wait, not the call.
        over: asyncio.Future[None] = loop.create_future()
        call.add_done_callback(functools.partial(_call_over, over))
        await over
        exchange.upstream_call = None
        routed = call.result()
    exchange.routed(routed)
    reply = routed.reply
    if reply.chunks is None:
        exchange.upstream_finished()
        response = relay_body(reply, exchange, headers)
        exchange.status = response.status
        return response
    exchange.status = 200
    count = exchange.profile.tokenizer.count
    observer: StreamObserver
    if spec.wire_format == "anthropic":
        observer = AnthropicStream(count)
    elif spec.count_route == "responses":
        observer = ResponsesStream(count)
    else:
        observer = OpenAIStream(count, withhold_usage_chunk=not upstream.client_wants_usage)
    if routed.translator is None:
        return await relay_stream(request, reply, exchange, headers, observer)
    context = StreamContext(exchange.model.name, upstream.client_wants_usage, exchange.prompt.tokens)
    translation = routed.translator.stream(context)
    return await relay_translated_stream(request, reply, exchange, headers, observer, translation)


def _call_over(over: asyncio.Future[None], call: asyncio.Task[Routed]) -> None:
    if not over.done():  # else its waiter was cancelled: settlement finishes the call
        over.set_result(None)


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the models this key may use, in OpenAI's list shape."""
    principal = request[PRINCIPAL]
    policies = request.app[state.POLICIES].current
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "gateway"}
        for name in sorted(request.app[state.CONFIG].models)
        if policies.for_request(principal, name).denied_by is None
    ]
    return web.json_response({"object": "list", "data": data})
