"""A JSON object as the caller sent it, with where each top-level value lies in its text.

The gateway changes a few top-level fields of what it forwards (the model's alias,
usage asked for in streams, a policy's max_tokens cap). Serialising the whole object
again for that costs about three times parsing it: 64 µs for a 48 KB prompt, on the
event loop, and some milliseconds for a long context. With the spans, the upstream
body is the caller's bytes with those values replaced and everything else passed
through byte for byte.

Finding the spans costs a pass over the top-level keys in Python (3 to 4 µs), more than
serialising a small body again, so only bodies of `SPANS_FROM_BYTES` or more get them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

# Below this, json.dumps of the changed body costs less than finding the spans.
SPANS_FROM_BYTES = 4096
# Requests have at most a few dozen top-level fields. The loop takes about a microsecond
# for each, where json.loads takes a tenth of that for a tiny one; past this many it
# stops and json.loads parses the body, so a body made of tiny fields costs at most
# some 60 µs more than json.loads alone.
MAX_SPANNED_KEYS = 64

_COMPACT = json.JSONEncoder(separators=(",", ":"))
_WHITESPACE = " \t\n\r"  # JSON's, as json.decoder has it
# json.loads's own scanners, in C: a value from an index, a string from after its quote.
_PLAIN = json.JSONDecoder()
_scan_string: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ObjectText:
    """A JSON object's text as the caller sent it; `spans` are offsets into it."""

    text: str
    spans: Mapping[str, tuple[int, int]]
    inside: int  # just after the opening brace

    def with_values(self, changes: Mapping[str, Any]) -> bytes:
        """The object with `changes` made: a present key's value replaced where it stands,
        an absent key added first; the rest exactly as sent."""
        spans = self.spans
        added = ",".join(f"{compact(key)}:{compact(new)}" for key, new in changes.items() if key not in spans)
        edits = sorted((*spans[key], compact(new)) for key, new in changes.items() if key in spans)
        text, at = self.text, 0
        pieces: list[str] = []
        if added:
            # Before the first field, so followed by a comma unless there is none.
            pieces += (text[: self.inside], added + "," if spans else added)
            at = self.inside
        for start, end, value in edits:
            pieces += (text[at:start], value)
            at = end
        pieces.append(text[at:])
        return "".join(pieces).encode("utf-8", "surrogatepass")


class ParsedObject(NamedTuple):
    value: Any  # what json.loads gives
    text: ObjectText | None  # for an object of SPANS_FROM_BYTES or more in UTF-8


def parse(raw: bytes, decoder: json.JSONDecoder = _PLAIN) -> ParsedObject:
    """json.loads(raw) with `decoder`'s hooks, with the same result and errors (and
    whatever its hooks raise); large objects also with their spans."""
    encoding = json.detect_encoding(raw)
    text = raw.decode(encoding, "surrogatepass")
    if len(raw) >= SPANS_FROM_BYTES and encoding == "utf-8":
        try:
            found = _object_text(text, decoder.scan_once)  # type: ignore[attr-defined]
        except (ValueError, StopIteration, RecursionError):
            found = None  # decoder.decode below says what is wrong
        if found is not None:
            return found
    return ParsedObject(decoder.decode(text), None)


def _object_text(text: str, scan_value: Callable[[str, int], tuple[Any, int]]) -> ParsedObject | None:
    """The object json.loads would make, and its spans; None for anything but a plain object
    (not an object, a key given twice: which one a provider takes is its own choice, or
    more than MAX_SPANNED_KEYS keys)."""
    at = _skip(text, 0)
    if text[at : at + 1] != "{":
        return None
    inside = at + 1
    at = _skip(text, inside)
    value: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    if text[at : at + 1] == "}":
        return _whole(text, value, spans, inside, _skip(text, at + 1))
    while True:
        if text[at : at + 1] != '"':
            return None
        key, at = _scan_string(text, at + 1)
        at = _skip(text, at)
        if text[at : at + 1] != ":" or key in spans or len(spans) == MAX_SPANNED_KEYS:
            return None
        start = _skip(text, at + 1)
        value[key], end = scan_value(text, start)
        spans[key] = (start, end)
        at = _skip(text, end)
        separator = text[at : at + 1]
        if separator == "}":
            return _whole(text, value, spans, inside, _skip(text, at + 1))
        if separator != ",":
            return None
        at = _skip(text, at + 1)


def _skip(text: str, at: int) -> int:
    """The first index from `at` on that is not JSON whitespace (or the end)."""
    end = len(text)
    while at < end and text[at] in _WHITESPACE:
        at += 1
    return at


def _whole(
    text: str, value: dict[str, Any], spans: dict[str, tuple[int, int]], inside: int, end: int
) -> ParsedObject | None:
    # Anything after the object is json.loads's "Extra data" error.
    return ParsedObject(value, ObjectText(text, spans, inside)) if end == len(text) else None


def compact(value: Any) -> str:
    """json.dumps(value, separators=(",", ":")), from one encoder made at import:
    json.dumps with options builds an encoder on every call (about 1.6 µs)."""
    return _COMPACT.encode(value)
