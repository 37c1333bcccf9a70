"""policies/*.yaml → typed policies, and which limits apply to a caller.

A policy names whose counter it keeps (`scope`: key, user or team), which callers it
matches, and its limits. Every limit of every matching policy applies to a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.auth import Principal
from gateway.config import IDENTIFIER
from gateway.yamlnode import ConfigError, Node, load_yaml_file

WINDOW_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
LIMIT_KINDS = ("requests", "tokens")
SCOPES = {"key", "user", "team"}
# A rolling window is kept as this many buckets; the oldest is counted whole.
BUCKETS_PER_WINDOW = 60


@dataclass(frozen=True)
class LimitRule:
    """One limit of a policy, e.g. 40,000 tokens per minute."""

    kind: str
    window: str
    capacity: int

    @property
    def window_ms(self) -> int:
        return WINDOW_SECONDS[self.window] * 1000

    @property
    def bucket_ms(self) -> int:
        return self.window_ms // BUCKETS_PER_WINDOW

    @property
    def label(self) -> str:
        """Bounded metric label, e.g. `tokens_per_minute`."""
        return f"{self.kind}_per_{self.window}"


@dataclass(frozen=True)
class Policy:
    name: str
    scope: str
    keys: frozenset[str] | None
    users: frozenset[str] | None
    teams: frozenset[str] | None
    limits: tuple[LimitRule, ...]

    def matches(self, principal: Principal) -> bool:
        if self.scope == "team" and principal.team is None:
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


@dataclass(frozen=True)
class AppliedLimit:
    """A limit rule bound to one counter (a Redis key) for one request."""

    policy: str
    scope: str
    subject: str
    rule: LimitRule

    def redis_key(self, prefix: str) -> str:
        # The hash tag keeps every counter of one subject in one Redis Cluster slot.
        return f"{prefix}{{{self.scope}:{self.subject}}}:{self.policy}:{self.rule.kind}:{self.rule.window}"


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...]
    files: tuple[Path, ...]

    def limits_for(self, principal: Principal) -> list[AppliedLimit]:
        applied: list[AppliedLimit] = []
        for policy in self.policies:
            if policy.matches(principal):
                subject = policy.subject(principal)
                applied.extend(
                    AppliedLimit(policy.name, policy.scope, subject, rule) for rule in policy.limits
                )
        return applied


def load_policies(files: tuple[Path, ...]) -> PolicySet:
    """Read every policy file; raises ConfigError naming the file and key path."""
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
    node.mapping({"name", "scope", "match", "limits"})
    name_node = node.require("name")
    name = name_node.as_str()
    if not IDENTIFIER.match(name) or ":" in name:
        name_node.fail("may use letters, digits and . _ @ + - (at most 128 characters)")
    scope = node.require("scope").as_choice(SCOPES)
    keys = users = teams = None
    if (match := node.get("match")) is not None:
        match.mapping({"keys", "users", "teams"})
        keys, users, teams = (_names(match.get(field)) for field in ("keys", "users", "teams"))
    limits_node = node.require("limits")
    limits = tuple(_limit(entry) for entry in limits_node.elements())
    if not limits:
        limits_node.fail("a policy needs at least one limit")
    return Policy(name=name, scope=scope, keys=keys, users=users, teams=teams, limits=limits)


def _limit(node: Node) -> LimitRule:
    node.mapping({*LIMIT_KINDS, "per"})
    kinds = [kind for kind in LIMIT_KINDS if node.get(kind) is not None]
    if len(kinds) != 1:
        node.fail(
            f"a limit names exactly one of {', '.join(LIMIT_KINDS)}, e.g. {{tokens: 40000, per: minute}}"
        )
    kind = kinds[0]
    capacity = node.require(kind).as_int(minimum=1)
    window = node.require("per").as_choice(set(WINDOW_SECONDS))
    return LimitRule(kind=kind, window=window, capacity=capacity)


def _names(node: Node | None) -> frozenset[str] | None:
    """None (anyone) when absent or when the list holds "*"."""
    if node is None:
        return None
    names = frozenset(element.as_str() for element in node.elements())
    return None if "*" in names else names


def _admits(allowed: frozenset[str] | None, value: str | None) -> bool:
    return allowed is None or (value is not None and value in allowed)


__all__ = ["AppliedLimit", "ConfigError", "LimitRule", "Policy", "PolicySet", "load_policies"]
