"""Counting in time linear in the text: no run longer than MAX_RUN_CHARS reaches BPE whole.

tiktoken first splits a text into pieces with its encoding's regular expression, then
merges each piece's bytes by BPE. Both cost more than linearly in a piece's length: a
7 MB run of one letter took 12 s to count, and o200k_base's expression overflows its
stack on a million spaces (tiktoken panics). Ordinary text is made of short pieces.

So a long text is scanned for places where the encodings' pieces always end (BOUNDARY,
below). Wherever MAX_RUN_CHARS characters pass without one, the text is cut there (a
"forced" cut) and the parts are encoded apart. A text with no forced cut is encoded
whole, as before, so its count is tiktoken's to the token; a forced cut makes the count
an estimate, since BPE cannot merge across it (on the long runs we measured, within one
token per cut; not a bound in general).

BOUNDARY holds for the built-in expressions (o200k_base, cl100k_base, Llama 3 and 4). A
tokenizer of one's own (tokens.bpe_files) is cut at the same places; if its expression
makes pieces across them, its cost is not bounded by this.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

# Longer runs without a boundary are cut. On the worst shapes, runs of 1,024 to 4,096
# characters cost about the same per byte (one of 65,536 about twice as much); none of
# the ordinary texts in tests/test_tokens_ceiling.py has a run as long.
MAX_RUN_CHARS = 2048

# Ranges, not Unicode properties, so that Python's tables and tiktoken's cannot disagree
# on them. (A boundary that was none would let a piece run on past it: slower, never a
# different count, since only forced cuts split what tiktoken is given.)
_LETTER = "[A-Za-z\u4e00-\u9fff\u3041-\u3096\u30a1-\u30fa\uac00-\ud7a3]"
_DIGIT = "[0-9]"
_PUNCTUATION = r"[!-/:-@\[-`{-~]"
# Without the apostrophe, which may start a contraction ("it's" is one piece).
# CJK's: 、。 〈〉《》「」『』【】 and the full-width forms of ! ( ) , . : ; ?
_ENDS_A_WORD = r"[!-&(-/:-@\[-`{-~\u3001\u3002\u3008-\u3011\uff01\uff08\uff09\uff0c\uff0e\uff1a\uff1b\uff1f]"

# A match ends where o200k_base, cl100k_base and Llama 3's expressions always end a piece
# (tests/test_tokens_ceiling.py checks it against them): a letter before a digit or
# punctuation, punctuation before a digit, a digit before a letter or punctuation, any
# visible character before a space or tab, and a line break before a visible character
# other than "/" (o200k_base keeps "/" with a punctuation piece's line breaks).
BOUNDARY = re.compile(
    rf"{_LETTER}(?={_DIGIT}|{_ENDS_A_WORD})"
    rf"|{_PUNCTUATION}(?={_DIGIT})"
    rf"|{_DIGIT}(?={_LETTER}|{_PUNCTUATION})"
    r"|\S(?=[ \t])"
    r"|[\r\n](?=[^\s/])"
)


def forced_cuts(text: str, max_run: int = MAX_RUN_CHARS) -> list[int]:
    """Where `text` must be cut so that no run between boundaries exceeds `max_run`."""
    return [end for end, forced in run_ends(text, max_run) if forced]


def run_ends(text: str, max_run: int = MAX_RUN_CHARS) -> Iterator[tuple[int, bool]]:
    """Ends of successive runs, each at most `max_run` characters: (position, forced).

    Each step looks for a boundary in the last eighth of the next `max_run` characters
    (ordinary text has one within a few characters: one short search per run), then for
    the last one before that, then cuts. A step that finds only an early boundary is
    followed by one that goes far or cuts, so the scan takes time linear in the text.
    """
    start, near_end = 0, max_run - max(1, max_run // 8)
    while len(text) - start > max_run:
        limit = start + max_run
        found = BOUNDARY.search(text, start + near_end, limit)
        if found is not None:
            start = found.end()
            yield start, False
            continue
        earlier = [match.end() for match in BOUNDARY.finditer(text, start, start + near_end + 1)]
        start, forced = (earlier[-1], False) if earlier else (limit, True)
        yield start, forced


def count_in_runs(
    encode: Callable[[str], Sequence[int]], text: str, max_run: int = MAX_RUN_CHARS
) -> tuple[int, int]:
    """Tokens of `text` encoded apart at its forced cuts, and how many cuts there were."""
    if len(text) <= max_run:
        return len(encode(text)), 0
    cuts = forced_cuts(text, max_run)
    if not cuts:
        return len(encode(text)), 0
    tokens, start = 0, 0
    for end in [*cuts, len(text)]:
        tokens += len(encode(text[start:end]))
        start = end
    return tokens, len(cuts)
