"""Typed keys for what the application shares: each opened and closed in app.py."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import Authenticator, FailedAuthentications
from gateway.config import GatewayConfig
from gateway.ledger import LedgerStore, LedgerWriter
from gateway.metrics import Metrics
from gateway.policies import PolicyHolder
from gateway.providers import Provider
from gateway.quota.service import QuotaService
from gateway.routing import Router
from gateway.settlement import Settlement
from gateway.tokens import PromptCounter

CONFIG = web.AppKey("config", GatewayConfig)
METRICS = web.AppKey("metrics", Metrics)
COUNTER = web.AppKey("counter", PromptCounter)
POLICIES = web.AppKey("policies", PolicyHolder)
QUOTA = web.AppKey("quota", QuotaService)
STORE = web.AppKey("store", LedgerStore)
LEDGER = web.AppKey("ledger", LedgerWriter)
AUTH = web.AppKey("auth", Authenticator)
AUTH_FAILURES = web.AppKey("auth_failures", FailedAuthentications)
PROVIDERS = web.AppKey("providers", dict[str, Provider])
SETTLEMENT = web.AppKey("settlement", Settlement)
ROUTER = web.AppKey("router", Router)
ADMIN_RUNNER = web.AppKey("admin_runner", web.AppRunner)
