"""Admission decisions → OpenAI's x-ratelimit-* headers and the 429 error."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from gateway.errors import RateLimited
from gateway.quota.limiter import Admission, LimitState

# Past this wait the SDKs' blind retries cannot help: tell them not to retry.
MAX_USEFUL_RETRY_MS = 60_000


def go_duration(milliseconds: int) -> str:
    """Format like Go's time.Duration, as OpenAI does: 12ms, 1.5s, 6m0s, 1h2m3s."""
    if milliseconds <= 0:
        return "0s"
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


# Which x-ratelimit-* trio each limit kind is reported in (cost has none).
HEADER_FAMILY = {
    "requests": "requests",
    "concurrent": "requests",
    "tokens": "tokens",
    "input_tokens": "tokens",
    "output_tokens": "tokens",
}


# Header names of each family's trio: limit, remaining, reset.
_TRIOS = {
    family: tuple(f"x-ratelimit-{part}-{family}" for part in ("limit", "remaining", "reset"))
    for family in ("requests", "tokens")
}


def ratelimit_headers(admission: Admission) -> dict[str, str]:
    """The -requests and -tokens trios, each describing the tightest limit of its kind.

    Tightest: the least remaining, then the latest reset; on a tie, the first listed.
    """
    # One pass, made for every request: a state per family and the key it won with.
    tightest: dict[str, tuple[tuple[int, int], int, LimitState]] = {}
    for state in admission.states:
        rule = state.limit.rule
        family = HEADER_FAMILY.get(rule.kind)
        if family is None:
            continue
        # LimitState.remaining, written out: this loop runs for every request.
        remaining = rule.capacity - state.used
        rank = (remaining if remaining > 0 else 0, -state.reset_ms)
        known = tightest.get(family)
        if known is None or rank < known[0]:
            tightest[family] = (rank, rule.capacity, state)
    headers: dict[str, str] = {}
    for family, (limit_name, remaining_name, reset_name) in _TRIOS.items():
        if family in tightest:
            (remaining, _), capacity, state = tightest[family]
            headers[limit_name] = str(capacity)
            headers[remaining_name] = str(remaining)
            headers[reset_name] = go_duration(state.reset_ms)
    return headers


def rejection_error(admission: Admission) -> RateLimited:
    """The 429 for a rejected admission, with Retry-After and x-should-retry."""
    state = admission.rejected_by
    assert state is not None
    rule = state.limit.rule
    headers = ratelimit_headers(admission)
    scope = f"{state.limit.scope} '{state.limit.subject}'"
    what = f"{rule.label} of {scope} (policy '{state.limit.policy}', {rule.describe()})"
    if admission.retry_after_ms < 0:
        message = (
            f"Request too large for {what}: limit {rule.capacity}, requested "
            f"{admission.requested}. Send a shorter prompt or a smaller max_tokens."
        )
        headers["x-should-retry"] = "false"
    else:
        wait_ms = max(admission.retry_after_ms, 1)
        message = (
            f"Rate limit reached for {what}: limit {rule.capacity}, used {state.used}, "
            f"requested {admission.requested}. Please try again in {go_duration(wait_ms)}."
        )
        headers["retry-after"] = str(math.ceil(wait_ms / 1000))
        headers["retry-after-ms"] = str(wait_ms)
        headers["x-should-retry"] = "true" if wait_ms <= MAX_USEFUL_RETRY_MS else "false"
    headers["x-ratelimit-limit-name"] = rule.label
    error_type = HEADER_FAMILY.get(rule.kind, rule.kind)
    return RateLimited(message, headers=headers, error_type=error_type)


_ANTHROPIC_NAMES = {
    "x-ratelimit-limit-requests": "anthropic-ratelimit-requests-limit",
    "x-ratelimit-remaining-requests": "anthropic-ratelimit-requests-remaining",
    "x-ratelimit-limit-tokens": "anthropic-ratelimit-tokens-limit",
    "x-ratelimit-remaining-tokens": "anthropic-ratelimit-tokens-remaining",
}
_ANTHROPIC_RESETS = {
    "x-ratelimit-reset-requests": "anthropic-ratelimit-requests-reset",
    "x-ratelimit-reset-tokens": "anthropic-ratelimit-tokens-reset",
}


def anthropic_ratelimit_headers(headers: dict[str, str], now: datetime | None = None) -> dict[str, str]:
    """OpenAI-style x-ratelimit-* headers as Anthropic's: same figures, resets as RFC 3339 times."""
    moment = now or datetime.now(UTC)
    translated: dict[str, str] = {}
    for name, value in headers.items():
        if name in _ANTHROPIC_NAMES:
            translated[_ANTHROPIC_NAMES[name]] = value
        elif name in _ANTHROPIC_RESETS:
            at = moment + timedelta(milliseconds=parse_go_duration(value))
            translated[_ANTHROPIC_RESETS[name]] = at.isoformat(timespec="seconds").replace("+00:00", "Z")
        else:
            translated[name] = value
    return translated


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_go_duration(text: str) -> int:
    """Milliseconds in a duration written by go_duration (e.g. 1m1.5s, 12ms)."""
    scale = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
    return round(sum(float(number) * scale[unit] for number, unit in _DURATION_PART.findall(text)))
