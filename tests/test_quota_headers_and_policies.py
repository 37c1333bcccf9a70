"""Rate-limit header formats, and which policies apply to whom."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import Principal
from gateway.quota.headers import go_duration
from gateway.quota.policy import load_policies


@pytest.mark.parametrize(
    ("milliseconds", "text"),
    [
        (0, "0s"),
        (12, "12ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (61_000, "1m1s"),
        (360_000, "6m0s"),
        (3_723_000, "1h2m3s"),
        (86_400_000, "24h0m0s"),
        (90_061_250, "25h1m1.25s"),
    ],
)
def test_durations_are_written_like_go(milliseconds: int, text: str) -> None:
    assert go_duration(milliseconds) == text


POLICIES = """
policies:
  - name: everyone
    scope: user
    limits: [{requests: 10, per: minute}]
  - name: research
    scope: team
    match: {teams: [research]}
    limits: [{tokens: 1000, per: day}]
  - name: one-key
    scope: key
    match: {keys: [k2]}
    limits: [{tokens: 5, per: second}, {requests: 1, per: hour}]
"""


def test_every_matching_policy_applies(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICIES)
    policies = load_policies((path,))

    def applied(principal: Principal) -> list[tuple[str, str, str]]:
        return [(limit.policy, limit.subject, limit.rule.label) for limit in policies.limits_for(principal)]

    assert applied(Principal("k1", "alice", "research")) == [
        ("everyone", "alice", "requests_per_minute"),
        ("research", "research", "tokens_per_day"),
    ]
    assert applied(Principal("k2", "bob", None)) == [
        ("everyone", "bob", "requests_per_minute"),
        ("one-key", "k2", "tokens_per_second"),
        ("one-key", "k2", "requests_per_hour"),
    ]
    # A team policy never applies to a caller without a team.
    assert applied(Principal("k3", "carol", None)) == [("everyone", "carol", "requests_per_minute")]


def test_decisions_are_remembered_per_caller_and_model(tmp_path: Path) -> None:
    from gateway.quota import policy as policy_module

    path = tmp_path / "p.yaml"
    path.write_text(POLICIES)
    policies = load_policies((path,))
    alice, bob = Principal("k1", "alice", "research"), Principal("k2", "bob", None)
    first = policies.for_request(alice, "gpt-4o")
    assert policies.for_request(Principal("k1", "alice", "research"), "gpt-4o") is first
    assert policies.for_request(alice, "gpt-4o-mini") is not first
    assert policies.for_request(bob, "gpt-4o").limits != first.limits
    # Bounded: past the limit the memory starts again rather than growing.
    for index in range(policy_module.DECISIONS_REMEMBERED + 5):
        policies.for_request(Principal(f"k{index}", "u", None), "m")
    assert len(policies._decisions) <= policy_module.DECISIONS_REMEMBERED
    assert policies.for_request(alice, "gpt-4o") == first
