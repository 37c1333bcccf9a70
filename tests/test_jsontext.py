"""Request bodies keep their text: parsed as json.loads parses them, with the span of each
top-level value, and changed by replacing values where they stand."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.jsontext import MAX_SPANNED_KEYS, encoding_of, parse
from tests.strategies import json_values

PADDING = "x" * 4096  # as long prompts are

layouts = st.sampled_from(
    [
        {},
        {"separators": (",", ":")},
        {"indent": 2},
        {"indent": "\t", "ensure_ascii": False},
        {"ensure_ascii": False, "separators": (" , ", " :  ")},
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    layouts,
    st.sampled_from(["", " \n\t\r "]),
    st.booleans(),
)
def test_parse_gives_what_json_loads_gives_and_each_values_span(
    fields: dict[str, Any], layout: dict[str, Any], around: str, padded: bool
) -> None:
    raw = (
        around + json.dumps({**fields, "padding": PADDING} if padded else fields, **layout) + around
    ).encode()
    value, text = parse(raw)
    assert value == json.loads(raw)
    # A key written with escapes (json.dumps escapes control characters, quotes and, with
    # ensure_ascii, anything past ASCII) leaves the body without spans.
    escapes = layout.get("ensure_ascii", True)
    if any("\\" in json.dumps(key, ensure_ascii=escapes) for key in value):
        assert text is None
        return
    assert text is not None
    assert text.spans.keys() == value.keys()
    for key, (start, end) in text.spans.items():
        assert json.loads(text.text[start:end]) == value[key]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1,}',  # trailing comma
        b'{"a": 1} {"b": 2}',  # extra data
        b'{"a": [1, 2',  # cut short
        b'{"a" 1}',  # no colon
        b"{a: 1}",  # unquoted key
        b'{"a": tru}',
        b'{"a": "\x01"}',  # a control character in a string
        b'{"a": "\xff"}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # too deep
    ],
)
def test_parse_fails_where_json_loads_fails(raw: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)) as expected:
        json.loads(raw)
    with pytest.raises(type(expected.value)):
        parse(raw)


@pytest.mark.parametrize(
    "raw",
    [
        ("[1, " + json.dumps(PADDING) + "]").encode(),  # not an object
        ('{"a": 1, "a": 2, "p": ' + json.dumps(PADDING) + "}").encode(),  # a key twice
        ("\ufeff" + '{"p": ' + json.dumps(PADDING) + "}").encode(),  # a byte order mark
        ('{"p": ' + json.dumps(PADDING) + "}").encode("utf-16"),
        ('{"a\\u00e9": 1, "p": ' + json.dumps(PADDING) + "}").encode(),  # a key written with escapes
        # One key more than are spanned.
        json.dumps({"p": PADDING, **{f"k{index}": index for index in range(MAX_SPANNED_KEYS)}}).encode(),
    ],
)
def test_other_bodies_are_parsed_as_json_loads_does_without_spans(raw: bytes) -> None:
    value, text = parse(raw)
    assert value == json.loads(raw)
    assert text is None


def test_json_loads_extensions_are_kept_as_it_keeps_them() -> None:
    raw = (
        '{"a": NaN, "b": -Infinity, "c": 12345678901234567890123, "p": ' + json.dumps(PADDING) + "}"
    ).encode()
    value, text = parse(raw)
    assert repr(value) == repr(json.loads(raw))  # repr: NaN is not equal to itself
    assert text is not None
    assert text.with_values({"model": "m"}) == b'{"model":"m",' + raw[1:]


def test_changed_values_replace_the_old_ones_where_they_stand_and_the_rest_is_kept_byte_for_byte() -> None:
    # Raw UTF-8, escapes json.dumps would write otherwise, a lone surrogate, odd spacing.
    head = (
        '{ "model" :"team-model" ,\n  "messages":[{"role":"user","content":"caf\u00e9 \\u00e9 \\ud800 \\/"}],'
    )
    raw = (head + ' "max_tokens": 900, "stream": true, "padding": "' + PADDING + '" }').encode()
    value, text = parse(raw)
    assert text is not None and value["max_tokens"] == 900
    changed = text.with_values(
        {"model": "gpt-4o-mini", "max_tokens": 64, "stream_options": {"include_usage": True}}
    )
    expected = raw.replace(b'"team-model"', b'"gpt-4o-mini"').replace(b"900", b"64")
    assert changed == b'{"stream_options":{"include_usage":true},' + expected[1:]
    assert json.loads(changed) == {
        "stream_options": {"include_usage": True},
        **value,
        "model": "gpt-4o-mini",
        "max_tokens": 64,
    }


def test_an_empty_object_gets_its_fields_inside_the_braces() -> None:
    raw = b"{ \n }"
    value, text = parse(raw)
    assert value == {} and text is not None
    assert json.loads(text.with_values({"model": "m", "n": 1})) == {"model": "m", "n": 1}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"{}",
        b'{"a": 1}',
        b"[1]",
        b" {}",
        "{}".encode("utf-16-le"),
        "{}".encode("utf-16"),
        "{}".encode("utf-32-le"),
        "{}".encode("utf-32"),
        "{}".encode("utf-8-sig"),
        b"{\x00",
        b"{\x00\x00\x00",
    ],
)
def test_encoding_of_is_json_detect_encoding(raw: bytes) -> None:
    assert encoding_of(raw) == json.detect_encoding(raw)
