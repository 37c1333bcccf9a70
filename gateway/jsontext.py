"""A JSON object as the caller sent it, with where each top-level value lies in its text.

The gateway changes a few top-level fields of what it forwards (the model's alias,
usage asked for in streams, a policy's max_tokens cap). Serialising the whole object
again for that costs about three times parsing it: 64 µs for a 48 KB prompt, on the
event loop, and some milliseconds for a long context. With the spans, the upstream
body is the caller's bytes with those values replaced and everything else passed
through byte for byte.

Finding the spans costs a pass over the top-level keys, one regular expression match
and one call of json.loads's own value scanner per key: for the bench's 1.2 KB chat body
61,000 instructions against json.loads's 40,000, where json.dumps of the changed body
took another 74,000 (the spans' edit: 10,000). So every body gets them: a body that
changes costs less from about 150 bytes on, one forwarded unchanged (no alias, no usage
to ask for, no cap) some 20,000 instructions more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

# Requests have at most a few dozen top-level fields. The loop takes some 5,000
# instructions for each, where json.loads takes a tenth of that for a tiny one; past
# this many it stops and json.loads parses the body, so a body made of tiny fields costs
# at most some 300,000 instructions (60 µs) more than json.loads alone.
MAX_SPANNED_KEYS = 64

_COMPACT = json.JSONEncoder(separators=(",", ":"))
# Each step of the loop over the top-level keys is one match (in C) of these: the opening
# brace and the first key up to its value, a comma and the next key, the closing brace.
# Keys are matched as written without escapes (a key with escapes: no spans).
_FIRST_KEY = re.compile(r'[ \t\n\r]*(\{)[ \t\n\r]*"(?P<key>[^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')
_NEXT_KEY = re.compile(r'[ \t\n\r]*,[ \t\n\r]*"(?P<key>[^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')
_CLOSING = re.compile(r"[ \t\n\r]*\}[ \t\n\r]*")
_EMPTY = re.compile(r"[ \t\n\r]*(\{)[ \t\n\r]*\}[ \t\n\r]*")
# json.loads's own scanner, in C: a value from an index.
_PLAIN = json.JSONDecoder()


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
        if len(changes) == 1:
            # The usual change alone (a model's alias), made in one step.
            ((key, new),) = changes.items()
            if key in spans:
                start, end = spans[key]
                return (self.text[:start] + compact(new) + self.text[end:]).encode("utf-8", "surrogatepass")
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
    text: ObjectText | None  # for a plain object in UTF-8 (see _object_text)


def encoding_of(raw: bytes) -> str:
    """json.detect_encoding(raw), at once for what a request body usually is: an object in
    UTF-8 (its first byte a brace, its second not zero, as UTF-16 and 32 would have it)."""
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        return "utf-8"
    return json.detect_encoding(raw)


def parse(raw: bytes, decoder: json.JSONDecoder = _PLAIN) -> ParsedObject:
    """json.loads(raw) with `decoder`'s hooks, with the same result and errors (and
    whatever its hooks raise); objects in UTF-8 also with their spans."""
    encoding = encoding_of(raw)
    text = raw.decode(encoding, "surrogatepass")
    if encoding == "utf-8":
        try:
            found = _object_text(text, decoder.scan_once)  # type: ignore[attr-defined]
        except (ValueError, StopIteration, RecursionError):
            found = None  # decoder.decode below says what is wrong
        if found is not None:
            return found
    return ParsedObject(decoder.decode(text), None)


def _object_text(text: str, scan_value: Callable[[str, int], tuple[Any, int]]) -> ParsedObject | None:
    """The object json.loads would make, and its spans; None for anything but a plain object
    (not an object, a key given twice: which one a provider takes is its own choice, a key
    written with escapes, or more than MAX_SPANNED_KEYS keys)."""
    key = _FIRST_KEY.match(text)
    if key is None:
        empty = _EMPTY.fullmatch(text)
        return ParsedObject({}, ObjectText(text, {}, empty.end(1))) if empty is not None else None
    inside = key.end(1)
    value: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    while True:
        name, start = key["key"], key.end()
        if name in spans or len(spans) == MAX_SPANNED_KEYS:
            return None
        value[name], end = scan_value(text, start)
        spans[name] = (start, end)
        key = _NEXT_KEY.match(text, end)
        if key is None:
            # Anything after the object is json.loads's "Extra data" error.
            closing = _CLOSING.fullmatch(text, end)
            return ParsedObject(value, ObjectText(text, spans, inside)) if closing is not None else None


def compact(value: Any) -> str:
    """json.dumps(value, separators=(",", ":")), from one encoder made at import:
    json.dumps with options builds an encoder on every call (about 1.6 µs)."""
    return _COMPACT.encode(value)
