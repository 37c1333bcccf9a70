"""Edits to a caller's JSON body made on its bytes, without serialising it again.

The gateway forwards a body as the caller sent it, except that the model is renamed
to the deployment's upstream name and streams may be asked for their usage. Parsing
and writing out the whole body for that costs microseconds per kilobyte; a body of a
few hundred kilobytes costs most of a millisecond. When the bytes make it safe, the
edit is spliced in instead; otherwise (None) the caller serialises the edited dict.
"""

from __future__ import annotations

import json
import re

_MODEL_KEY = b'"model"'
# The model key, then its value: a JSON string (escapes allowed) and nothing else.
_MODEL_MEMBER = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*"(?:[^"\\]|\\.)*"', re.DOTALL)
_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")


def spliced_body(raw: bytes, model: str, ask_for_usage: bool) -> bytes | None:
    """`raw` with its top-level model set to `model` and, if asked, stream_options added.

    None when the bytes leave any doubt about where the edit goes:
    - an escaped character (\\u...) anywhere, since a key could then be written escaped;
    - "model" more than once, as a key of a nested object or as a string value;
    - stream_options already present (the caller then adds include_usage to its own);
    - a model value that is not a plain string.
    Without escapes, a top-level "model" key appears literally, and a quoted "model"
    cannot appear inside a string (its quotes would be escaped), so a single occurrence
    is the top-level key.
    """
    if b"\\u" in raw or raw.count(_MODEL_KEY) != 1:
        return None
    member = _MODEL_MEMBER.search(raw)
    if member is None:
        return None
    value = json.dumps(model, ensure_ascii=False).encode()
    edited = b'%b"model":%b%b' % (raw[: member.start()], value, raw[member.end() :])
    if not ask_for_usage:
        return edited
    if b'"stream_options"' in raw:
        return None
    start = _OBJECT_START.match(edited)
    if start is None:
        return None
    return b'%b"stream_options":{"include_usage":true},%b' % (edited[: start.end()], edited[start.end() :])
