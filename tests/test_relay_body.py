"""A whole answer's body is parsed as json.loads parses it (relay._json_body)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.relay import _json_body
from tests.strategies import json_values


def outcome(parse: object, raw: bytes) -> object:
    try:
        return ("value", repr(parse(raw)))  # type: ignore[operator]
    except (ValueError, RecursionError) as exc:
        return ("error", type(exc).__name__, str(exc))


@settings(max_examples=300, deadline=None)
@given(
    json_values,
    st.sampled_from(["", " ", "\n\t ", " x", "}", ", 1"]),
    st.sampled_from(["utf-8", "utf-16-le", "utf-32"]),
)
def test_a_body_parses_as_json_loads_parses_it(value: object, after: str, encoding: str) -> None:
    raw = (json.dumps(value, ensure_ascii=False) + after).encode(encoding, "surrogatepass")
    assert outcome(_json_body, raw) == outcome(json.loads, raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"{}",
        b'{"a": 1}  \n',
        b'{"a": 1} {}',
        b"{\xff}",
        b'{"a": "\xed\xa0\x80"}',
        b"[1]",
        b"{" * 100_000,
    ],
)
def test_edges_parse_as_json_loads_parses_them(raw: bytes) -> None:
    assert outcome(_json_body, raw) == outcome(json.loads, raw)
