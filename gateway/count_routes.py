"""Pre-flight counts without forwarding: Anthropic's count_tokens and our own count endpoint.

A count is work done for a caller, so it is held to what the caller may do, as the proxy
holds a request: the key's model list and the policies' model rules (the same 403), and
the policies' request limits (`requests` per window and `concurrent`), a count being one
request. Nothing is generated, so token and cost limits are neither checked nor charged.

A model whose usual deployment speaks the other API family is counted as the proxy
counts it: the body translated for that deployment (docs/translation.md), counted by
the provider's rule, so a Messages body for a GPT model is an exact chat count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway import state
from gateway.config import ModelConfig
from gateway.errors import InvalidRequest
from gateway.quota import ratelimit_headers
from gateway.quota.headers import anthropic_ratelimit_headers
from gateway.quota.service import Amounts
from gateway.requests import PRINCIPAL, read_json_object, resolve_model, validate_messages
from gateway.tokens import PromptCount

REQUEST_LIMIT_KINDS = frozenset({"requests", "concurrent"})
# A request limit charges 1 whatever the amounts; the others would charge these.
NOTHING_GENERATED = Amounts(prompt_tokens=0, completion_tokens=0, cost_micro_usd=0)


def route_of(body: Mapping[str, Any]) -> str:
    """Which OpenAI endpoint a body is for, by the field that holds its prompt."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completions"
    if "input" in body:
        return "embeddings"
    raise InvalidRequest("The body needs 'messages', 'prompt' or 'input' to be counted.", param="messages")


async def count_openai_request(request: web.Request) -> web.Response:
    """POST /v1/tokens/count: the gateway's pre-flight count of an OpenAI request body."""
    body, raw, _ = await read_json_object(request)
    model = resolve_model(request, body)
    route = route_of(body)
    if route == "chat":
        validate_messages(body)
    count, headers = await count_for_caller(request, model, "openai", route, body, len(raw))
    return web.json_response(
        {
            "object": "token_count",
            "model": model.name,
            "route": route,
            "prompt_tokens": count.tokens,
            "raw_tokens": count.raw_tokens,
            "exact": count.exact,
            "tokenizer": count.tokenizer,
            "factor": count.factor,
            "reason": count.reason,
        },
        headers=headers,
    )


async def count_anthropic_request(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens in Anthropic's shape: {"input_tokens": N}."""
    body, raw, _ = await read_json_object(request)
    model = resolve_model(request, body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Field required", param="messages")
    count, headers = await count_for_caller(request, model, "anthropic", "messages", body, len(raw))
    return web.json_response({"input_tokens": count.tokens}, headers=anthropic_ratelimit_headers(headers))


async def count_for_caller(
    request: web.Request,
    model: ModelConfig,
    caller: str,
    route: str,
    body: Mapping[str, Any],
    body_bytes: int,
) -> tuple[PromptCount, dict[str, str]]:
    """The count, and the rate-limit headers of the request limits it was admitted by;
    or the proxy's 403 for a model the caller may not use, or a 429 (or a 400 from a
    translation, before anything is charged)."""
    app = request.app
    upstream_model, route, body, body_bytes = _as_sent(app, model, caller, route, body, body_bytes)
    quota = app[state.QUOTA]
    decision = quota.request_policy(request[PRINCIPAL], model)
    request_limits = tuple(limit for limit in decision.limits if limit.rule.kind in REQUEST_LIMIT_KINDS)
    ticket = await quota.admit(dataclasses.replace(decision, limits=request_limits), NOTHING_GENERATED)
    counter = app[state.COUNTER]
    profile = counter.registry.profile(upstream_model, model.tokenizer)

    async def count_then_settle() -> PromptCount:
        try:
            return await counter.count(route, body, profile, body_bytes)
        finally:
            # The request stays charged; its place in flight is given back.
            await quota.settle(ticket, NOTHING_GENERATED)

    # A client that leaves cancels the handler, not a count in a worker thread: the task
    # holds the caller's place in flight until the count is really done.
    counting = asyncio.ensure_future(count_then_settle())
    counting.add_done_callback(_retrieve)
    count = await asyncio.shield(counting)
    return count, ratelimit_headers(ticket.admission)


def _as_sent(
    app: web.Application,
    model: ModelConfig,
    caller: str,
    route: str,
    body: Mapping[str, Any],
    body_bytes: int,
) -> tuple[str, str, Mapping[str, Any], int]:
    """(upstream model, counting route, body, its size) of what the model's usual deployment
    would be sent: the caller's body, or its translation for a deployment of the other
    family. Chat and Messages bodies are translated (the routes the proxy translates);
    a body no deployment serves is counted as it is, with the model's first deployment."""
    if route not in ("chat", "messages"):
        return model.upstream_model, route, body, body_bytes
    plan = app[state.ROUTER].plan(model, caller, translates=True)
    if not plan.deployments:
        return model.upstream_model, route, body, body_bytes
    usual = plan.deployments[0]
    translator = plan.translator(usual)
    if translator is None:
        return usual.upstream_model, route, body, body_bytes
    default_max = app[state.CONFIG].quota.default_max_completion_tokens
    translated = translator.request(body, usual.upstream_model, False, default_max)
    size = len(json.dumps(translated, ensure_ascii=False, separators=(",", ":")).encode())
    return usual.upstream_model, translator.provider_count_route, translated, size


def _retrieve(task: asyncio.Future[PromptCount]) -> None:
    # Nobody awaits the task of a departed client: its error (a 400) is no news.
    if not task.cancelled():
        task.exception()
