"""The gateway's own JSON lines (request log, usage spool), and a relayed answer read for
its usage: orjson, with the standard library for the little orjson refuses.

Every request writes two such lines. orjson makes a request's 24-field log line in
0.4 µs where the standard library's C encoder took 5.9 µs, and reads a spool line in a
fifth of json.loads's time (docs/performance.md, tenth round). It reads integers past
64 bits as floats: bodies the gateway rewrites are read by json.loads.

What orjson refuses is still written, by the standard library, all in ASCII: a string
holding a lone surrogate (a caller's odd header or JSON escape), an integer past 64 bits.
Such a line is read back by json.loads, which takes what orjson.loads does not.
"""

from __future__ import annotations

import json
from datetime import date, datetime, time
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS
# ASCII, so a lone surrogate is written as its escape and the line stays valid UTF-8.
_FALLBACK = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=lambda value: _text(value))


def dumps(value: Any) -> bytes:
    """Compact JSON in UTF-8. Keys that are not strings are written as their text, values
    JSON has no form for by str() (as json.dumps(default=str) would), NaN and the
    infinities as null (JSON has no form for them either)."""
    try:
        return orjson.dumps(value, default=str, option=_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: a surrogate, a huge int, a cycle
        return _FALLBACK.encode(_finite(value)).encode("ascii")


def loads(data: bytes | str) -> Any:
    """What dumps wrote (or any JSON); raises ValueError for what is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _text(value: Any) -> str:
    """A value JSON has no form for, as orjson writes it (datetimes) or as str() does."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and the infinities as None, as orjson writes them, in a dict's values and lists."""
    if isinstance(value, float) and value - value != 0.0:
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
