"""Quota: policies, the Redis limiter and its Lua scripts, rate-limit headers."""

from gateway.quota.headers import ratelimit_headers, rejection_error
from gateway.quota.limiter import Admission, Charge, QuotaLimiter, Reservation
from gateway.quota.policy import AppliedLimit, PolicySet, RequestPolicy, load_policies

__all__ = [
    "Admission",
    "AppliedLimit",
    "Charge",
    "PolicySet",
    "QuotaLimiter",
    "RequestPolicy",
    "Reservation",
    "load_policies",
    "ratelimit_headers",
    "rejection_error",
]
