"""policies/*.yaml → typed policies, and which limits apply to a request.

A policy names whose counter it keeps (`scope`: key, user or team), which requests it
matches (by key, user, team, key tags and model), its limits, and what it does with
models and max_tokens. Every limit of every matching policy applies to a request.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from gateway.auth import Principal
from gateway.config import IDENTIFIER
from gateway.yamlnode import ConfigError, Node, load_yaml_file

ROLLING_WINDOW_SECONDS = {"second": 1, "minute": 60, "hour": 3600}
CALENDAR_WINDOWS = ("day", "month")
WINDOWS = (*ROLLING_WINDOW_SECONDS, *CALENDAR_WINDOWS)
# Kinds measured over a window; `concurrent` counts requests in flight instead.
AMOUNT_KINDS = ("requests", "tokens", "input_tokens", "output_tokens", "cost_usd")
LIMIT_KINDS = (*AMOUNT_KINDS, "concurrent")
SCOPES = {"key", "user", "team"}
# A rolling window is kept as this many buckets; the oldest is counted whole.
BUCKETS_PER_WINDOW = 60
# Cost limits are kept in millionths of a dollar, so the scripts add integers.
MICRO_USD = 1_000_000


@dataclass(frozen=True)
class LimitRule:
    """One limit of a policy, e.g. 40,000 tokens per minute, or 5 requests in flight."""

    kind: str
    window: str | None
    # In the kind's unit: requests, tokens, micro-USD, or requests in flight.
    capacity: int

    @property
    def calendar(self) -> bool:
        return self.window in CALENDAR_WINDOWS

    @property
    def window_ms(self) -> int:
        assert self.window in ROLLING_WINDOW_SECONDS, "calendar and concurrent limits have no fixed length"
        return ROLLING_WINDOW_SECONDS[self.window] * 1000

    @property
    def bucket_ms(self) -> int:
        return self.window_ms // BUCKETS_PER_WINDOW

    @property
    def label(self) -> str:
        """Bounded metric label, e.g. `tokens_per_minute` or `concurrent`."""
        return self.kind if self.window is None else f"{self.kind}_per_{self.window}"

    def describe(self) -> str:
        amount = f"${self.capacity / MICRO_USD:g}" if self.kind == "cost_usd" else str(self.capacity)
        if self.kind == "concurrent":
            return f"{amount} requests in flight"
        unit = "" if self.kind == "cost_usd" else f" {self.kind.replace('_', ' ')}"
        return f"{amount}{unit} per {self.window}"


@dataclass(frozen=True)
class Policy:
    name: str
    scope: str
    keys: frozenset[str] | None
    users: frozenset[str] | None
    teams: frozenset[str] | None
    tags: frozenset[str] | None
    # Model name patterns this policy applies to (None: every model).
    models: tuple[str, ...] | None
    limits: tuple[LimitRule, ...]
    # shadow: count and log what would be rejected, reject nothing.
    mode: str = "enforce"
    # What happens when Redis is unreachable: closed → 503, open → admit.
    fail: str = "closed"
    allow_models: tuple[str, ...] | None = None
    deny_models: tuple[str, ...] = ()
    max_tokens_cap: int | None = None
    require_max_tokens: bool = False

    def matches(self, principal: Principal, model: str) -> bool:
        if self.scope == "team" and principal.team is None:
            return False
        if self.models is not None and not _any_match(model, self.models):
            return False
        if self.tags is not None and not (self.tags & principal.tags):
            return False
        return (
            _admits(self.keys, principal.key_id)
            and _admits(self.users, principal.user)
            and _admits(self.teams, principal.team)
        )

    def subject(self, principal: Principal) -> str:
        """Whose counter this policy charges for the principal."""
        if self.scope == "key":
            return principal.key_id
        if self.scope == "user":
            return principal.user
        assert principal.team is not None
        return principal.team

    def allows_model(self, model: str) -> bool:
        if _any_match(model, self.deny_models):
            return False
        return self.allow_models is None or _any_match(model, self.allow_models)


@dataclass(frozen=True)
class AppliedLimit:
    """A limit rule bound to one counter (a pair of Redis keys) for one request."""

    policy: str
    scope: str
    subject: str
    rule: LimitRule
    enforced: bool = True
    fail_open: bool = False

    @property
    def hash_tag(self) -> str:
        # Every counter of one subject lives in one Redis Cluster slot.
        return f"{{{self.scope}:{self.subject}}}"

    def redis_keys(self, prefix: str) -> tuple[str, str]:
        """The usage buckets and the pending reservations of this counter."""
        window = self.rule.window or "inflight"
        base = f"{prefix}{self.hash_tag}:{self.policy}:{self.rule.kind}:{window}"
        return f"{base}:b", f"{base}:p"

    def sync_marker(self, prefix: str) -> str:
        """Set once this subject's calendar counters were rebuilt from the ledger."""
        return f"{prefix}{self.hash_tag}:synced"

    def script_keys(self, prefix: str) -> tuple[str, str, str]:
        """`redis_keys` and `sync_marker`, made once: remembered decisions reuse their limits."""
        made = self.__dict__.get("_script_keys")
        if made is None or made[0] != prefix:
            made = (prefix, *self.redis_keys(prefix), self.sync_marker(prefix))
            # Frozen, so past __setattr__; not a field, so outside equality and hashing.
            self.__dict__["_script_keys"] = made
        return made[1], made[2], made[3]


@dataclass(frozen=True)
class RequestPolicy:
    """What the matching policies say about one request."""

    limits: tuple[AppliedLimit, ...]
    denied_by: str | None = None
    max_tokens_cap: int | None = None
    requires_max_tokens: str | None = None


# Decisions remembered per policy set (a reload makes a new set, so a fresh memory).
DECISIONS_REMEMBERED = 10_000


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...]
    files: tuple[Path, ...]
    # (principal, model) -> decision: the same few callers ask again and again.
    _decisions: dict[tuple[Principal, str], RequestPolicy] = field(
        default_factory=dict, compare=False, repr=False
    )

    def for_request(self, principal: Principal, model: str) -> RequestPolicy:
        key = (principal, model)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= DECISIONS_REMEMBERED:
                self._decisions.clear()
            decision = self._decisions[key] = self._decide(principal, model)
        return decision

    def _decide(self, principal: Principal, model: str) -> RequestPolicy:
        limits: list[AppliedLimit] = []
        denied_by: str | None = None
        cap: int | None = None
        requires: str | None = None
        for policy in self.policies:
            if not policy.matches(principal, model):
                continue
            if not policy.allows_model(model) and denied_by is None and policy.mode == "enforce":
                denied_by = policy.name
            if policy.max_tokens_cap is not None:
                cap = policy.max_tokens_cap if cap is None else min(cap, policy.max_tokens_cap)
            if policy.require_max_tokens and requires is None:
                requires = policy.name
            subject = policy.subject(principal)
            limits.extend(
                AppliedLimit(
                    policy.name,
                    policy.scope,
                    subject,
                    rule,
                    enforced=policy.mode == "enforce",
                    fail_open=policy.fail == "open",
                )
                for rule in policy.limits
            )
        return RequestPolicy(tuple(limits), denied_by, cap, requires)

    def limits_for(self, principal: Principal, model: str = "") -> list[AppliedLimit]:
        return list(self.for_request(principal, model).limits)

    def limits_of_principal(self, principal: Principal) -> list[AppliedLimit]:
        """Every limit that can apply to this caller, whatever the model."""
        return [
            AppliedLimit(p.name, p.scope, p.subject(principal), rule, enforced=p.mode == "enforce")
            for p in self.policies
            if any(p.matches(principal, model) for model in (p.models or ("",)))
            for rule in p.limits
        ]

    def limits_of_subject(self, scope: str, subject: str) -> list[AppliedLimit]:
        """Every counter a subject may have (for quota show and reset)."""
        return [
            AppliedLimit(policy.name, scope, subject, rule, enforced=policy.mode == "enforce")
            for policy in self.policies
            if policy.scope == scope
            for rule in policy.limits
        ]


def load_policies(files: tuple[Path, ...]) -> PolicySet:
    """Read every policy file; raises ConfigError naming the file, line and key path."""
    policies: list[Policy] = []
    seen: dict[str, str] = {}
    for path in files:
        root = load_yaml_file(path)
        root.mapping({"policies"})
        policies_node = root.get("policies")
        if policies_node is None:
            continue
        for entry in policies_node.elements():
            policy = _policy(entry)
            if policy.name in seen:
                entry.child("name", None).fail(
                    f"policy {policy.name!r} is already defined in {seen[policy.name]}"
                )
            seen[policy.name] = str(path)
            policies.append(policy)
    return PolicySet(policies=tuple(policies), files=files)


def _policy(node: Node) -> Policy:
    node.mapping(
        {"name", "scope", "match", "limits", "mode", "fail", "models", "max_tokens_cap", "require_max_tokens"}
    )
    name_node = node.require("name")
    name = name_node.as_str()
    if not IDENTIFIER.match(name) or ":" in name:
        name_node.fail("may use letters, digits and . _ @ + - (at most 128 characters)")
    scope = node.require("scope").as_choice(SCOPES)
    keys = users = teams = tags = None
    models: tuple[str, ...] | None = None
    if (match := node.get("match")) is not None:
        match.mapping({"keys", "users", "teams", "tags", "models"})
        keys, users, teams, tags = (_names(match.get(field)) for field in ("keys", "users", "teams", "tags"))
        model_names = _names(match.get("models"))
        models = tuple(sorted(model_names)) if model_names is not None else None
    limits_node = node.get("limits")
    limits = tuple(_limit(entry) for entry in limits_node.elements()) if limits_node is not None else ()
    if limits_node is not None and not limits:
        limits_node.fail("a policy needs at least one limit (or leave `limits` out)")
    allow_models: tuple[str, ...] | None = None
    deny_models: tuple[str, ...] = ()
    if (models_node := node.get("models")) is not None:
        models_node.mapping({"allow", "deny"})
        allowed = _names(models_node.get("allow"))
        allow_models = tuple(sorted(allowed)) if allowed is not None else None
        denied = models_node.get("deny")
        deny_models = tuple(element.as_str() for element in denied.elements()) if denied else ()
    mode, fail = node.get("mode"), node.get("fail")
    cap, require = node.get("max_tokens_cap"), node.get("require_max_tokens")
    return Policy(
        name=name,
        scope=scope,
        keys=keys,
        users=users,
        teams=teams,
        tags=tags,
        models=models,
        limits=limits,
        mode=mode.as_choice({"enforce", "shadow"}) if mode else "enforce",
        fail=fail.as_choice({"open", "closed"}) if fail else "closed",
        allow_models=allow_models,
        deny_models=deny_models,
        max_tokens_cap=cap.as_int(minimum=1) if cap else None,
        require_max_tokens=require.as_bool() if require else False,
    )


def _limit(node: Node) -> LimitRule:
    node.mapping({*LIMIT_KINDS, "per"})
    kinds = [kind for kind in LIMIT_KINDS if node.get(kind) is not None]
    if len(kinds) != 1:
        node.fail(
            f"a limit names exactly one of {', '.join(LIMIT_KINDS)}, e.g. {{tokens: 40000, per: minute}}"
        )
    kind = kinds[0]
    if kind == "concurrent":
        if node.get("per") is not None:
            node.child("per", None).fail("concurrent limits count requests in flight and take no window")
        return LimitRule(kind=kind, window=None, capacity=node.require(kind).as_int(minimum=1))
    if kind == "cost_usd":
        capacity = round(node.require(kind).as_float(minimum=0.000001) * MICRO_USD)
    else:
        capacity = node.require(kind).as_int(minimum=1)
    window = node.require("per").as_choice(set(WINDOWS))
    return LimitRule(kind=kind, window=window, capacity=capacity)


def _names(node: Node | None) -> frozenset[str] | None:
    """None (anyone) when absent or when the list holds "*"."""
    if node is None:
        return None
    names = frozenset(element.as_str() for element in node.elements())
    return None if "*" in names else names


def _admits(allowed: frozenset[str] | None, value: str | None) -> bool:
    return allowed is None or (value is not None and value in allowed)


def _any_match(model: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


__all__ = [
    "AppliedLimit",
    "ConfigError",
    "LimitRule",
    "Policy",
    "PolicySet",
    "RequestPolicy",
    "load_policies",
]
