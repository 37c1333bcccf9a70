"""Model renames and usage requests spliced into the caller's bytes, or left to json.dumps."""

from __future__ import annotations

import json

import pytest

from gateway.rewrite import spliced_body


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"alias","messages":[{"role":"user","content":"hi"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "model": "alias"}',
        b'\n  {\n  "max_tokens": 5,\n  "model" :\t"alias",\n  "stream": true\n}\n',
        # Content that holds the word and quotes, escaped as JSON requires.
        b'{"messages":[{"role":"user","content":"say \\"model\\": \\"x\\""}],"model":"al\\"ias"}',
        # Text beyond ASCII, sent unescaped.
        '{"model":"alias","messages":[{"role":"user","content":"żaba 模型"}]}'.encode(),
    ],
)
@pytest.mark.parametrize("ask_for_usage", [False, True])
def test_the_splice_parses_as_the_edited_body(raw: bytes, ask_for_usage: bool) -> None:
    expected = {**json.loads(raw), "model": "gpt-4o-mini-2024"}
    if ask_for_usage:
        expected["stream_options"] = {"include_usage": True}
    spliced = spliced_body(raw, "gpt-4o-mini-2024", ask_for_usage)
    assert spliced is not None
    assert json.loads(spliced) == expected
    # Only the edit changed: the rest of the bytes are the caller's.
    assert spliced.replace(b'"stream_options":{"include_usage":true},', b"").count(b"gpt-4o-mini-2024") == 1


def test_an_upstream_name_that_needs_escaping_is_escaped() -> None:
    spliced = spliced_body(b'{"model":"a","n":1}', 'we"ird\\name', False)
    assert spliced is not None and json.loads(spliced) == {"model": 'we"ird\\name', "n": 1}


@pytest.mark.parametrize(
    ("raw", "ask_for_usage"),
    [
        # "model" also as a nested key, or as a string value: which one is top-level?
        (b'{"model":"a","metadata":{"model":"b"}}', False),
        (b'{"model":"a","messages":[{"role":"user","content":"model"}]}', False),
        # A \u escape anywhere: the key itself could be written escaped.
        (b'{"mod\\u0065l":"a","messages":[{"role":"user","content":"model"}]}', False),
        (b'{"model":"a","messages":[{"role":"user","content":"\\u00e9"}]}', False),
        # Not a string.
        (b'{"model":7}', False),
        # The caller's own stream_options: merged into theirs by the dict path.
        (b'{"model":"a","stream":true,"stream_options":{"foo":1}}', True),
    ],
)
def test_doubtful_bytes_are_left_to_the_dict_path(raw: bytes, ask_for_usage: bool) -> None:
    assert spliced_body(raw, "b", ask_for_usage) is None
