"""tiktoken's encoding files: which ones, how they are named and checked, how they are read.

The gateway reads encodings only from a local folder (tokens.cache_dir) and never
downloads at run time: `gateway tokenizers fetch` fills the folder (fetch.py). Each file
is named as tiktoken names its cache entries, the SHA-1 of the official download address,
so one folder serves the gateway and tiktoken itself (TIKTOKEN_CACHE_DIR), and each is
checked against the SHA-256 that tiktoken expects of it.

tiktoken.get_encoding would download a missing file; so the encodings are built here
from the file, with tiktoken's own expressions and special tokens (tests compare them
with tiktoken's encodings).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from gateway.tokens.errors import TokenizerFilesMissing, TokenizerUnavailable


@dataclass(frozen=True)
class EncodingFile:
    """One of tiktoken's encodings: its file's official address and digest, and how to build it."""

    name: str
    url: str
    sha256: str
    pattern: str
    special_tokens: dict[str, int] = field(hash=False)

    @property
    def file_name(self) -> str:
        """The name at the official address (and on a mirror of it): `o200k_base.tiktoken`."""
        return self.url.rsplit("/", 1)[1]

    @property
    def cache_name(self) -> str:
        """The name tiktoken gives the file in its cache: the SHA-1 of the address."""
        return hashlib.sha1(self.url.encode()).hexdigest()


# Addresses, digests, expressions and special tokens as in tiktoken_ext/openai_public.py.
CL100K_BASE = EncodingFile(
    name="cl100k_base",
    url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    pattern=(
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    special_tokens={
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
)
O200K_PATTERN = "|".join(
    (
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    )
)
O200K_BASE = EncodingFile(
    name="o200k_base",
    url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    pattern=O200K_PATTERN,
    special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
)
ENCODING_FILES = {spec.name: spec for spec in (CL100K_BASE, O200K_BASE)}


def sha256_of(contents: bytes) -> str:
    return hashlib.sha256(contents).hexdigest()


def read_cached(spec: EncodingFile, cache_dir: Path) -> bytes:
    """The encoding's file from the cache, checked; TokenizerFilesMissing if absent or wrong."""
    path = cache_dir / spec.cache_name
    try:
        contents = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerFilesMissing(cache_dir, [f"{spec.name} is missing ({spec.cache_name})"]) from None
    except OSError as exc:
        raise TokenizerFilesMissing(cache_dir, [f"{spec.name} cannot be read: {exc}"]) from exc
    digest = sha256_of(contents)
    if digest != spec.sha256:
        problem = f"{spec.name} ({spec.cache_name}) has sha256 {digest}, not OpenAI's {spec.sha256}"
        raise TokenizerFilesMissing(cache_dir, [problem])
    return contents


def missing_files(cache_dir: Path) -> list[str]:
    """What is wrong with the cache, one line per encoding file: empty when all are usable."""
    problems = []
    for spec in ENCODING_FILES.values():
        try:
            read_cached(spec, cache_dir)
        except TokenizerFilesMissing as exc:
            problems.extend(exc.problems)
    return problems


def parse_ranks(contents: bytes, source: str) -> dict[bytes, int]:
    """tiktoken's file format: one `base64-token rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(contents.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise TokenizerUnavailable(f"{source}:{number} is not in tiktoken's format") from exc
    return ranks
