"""A whole answer's body is parsed as json.loads parses it (relay._json_body), and a relayed
one's as well but for integers past 64 bits (relay._relayed_json, by orjson)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.relay import _json_body, _relayed_json
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


# JSON values with integers in 64 bits: past them orjson reads a float where json.loads
# reads an int (the one difference, and only usage figures are read of a relayed body).
values_in_64_bits = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    values_in_64_bits,
    st.sampled_from(["", " ", "\n\t ", " x", "}", ", 1"]),
    st.sampled_from(["utf-8", "utf-16-le"]),
)
def test_a_relayed_body_parses_as_json_loads_parses_it(value: object, after: str, encoding: str) -> None:
    # Text with lone surrogates, infinities and other encodings are orjson's refusals, read
    # by _json_body: the same values and the same errors.
    raw = (json.dumps(value, ensure_ascii=False) + after).encode(encoding, "surrogatepass")
    assert outcome(_relayed_json, raw) == outcome(json.loads, raw)


def test_a_relayed_body_past_64_bits_reads_a_float() -> None:
    assert _relayed_json(b'{"usage": {"prompt_tokens": 36893488147419103232}}') == {
        "usage": {"prompt_tokens": 3.6893488147419103e19}
    }
