"""tiktoken's encoding files: which ones, how they are named and checked, how they are read.

The gateway reads encodings only from a local folder (tokens.cache_dir) and never
downloads at run time: `gateway tokenizers fetch` fills the folder (fetch.py). Each file
is named as tiktoken names its cache entries, the SHA-1 of the official download address,
so one folder serves the gateway and tiktoken itself (TIKTOKEN_CACHE_DIR), and each is
checked against the SHA-256 that tiktoken expects of it.

tiktoken.get_encoding would download a missing file; so the encodings are built here
from the file, with tiktoken's own expressions and special tokens (tests compare them
with tiktoken's definitions).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Its module-level constants only: its functions would download the files. (tiktoken_ext
# ships no type information.)
from tiktoken_ext import openai_public  # type: ignore[import-untyped]

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


# Addresses, digests, expressions and special tokens as in tiktoken_ext/openai_public.py,
# in its order. Several encodings share a file; each is built from it with its own tokens.
ENDOFTEXT: str = openai_public.ENDOFTEXT
ENDOFPROMPT: str = openai_public.ENDOFPROMPT
FIM_PREFIX: str = openai_public.FIM_PREFIX
FIM_MIDDLE: str = openai_public.FIM_MIDDLE
FIM_SUFFIX: str = openai_public.FIM_SUFFIX
R50K_PATTERN: str = openai_public.r50k_pat_str
R50K_BASE = EncodingFile(
    name="r50k_base",
    url="https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
    sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    pattern=R50K_PATTERN,
    special_tokens={ENDOFTEXT: 50256},
)
# tiktoken builds gpt2 from GPT-2's own two files (vocab.bpe and encoder.json); its
# maintainers say r50k_base holds the same ranks in its own format, with the same
# expression and special token (openai/tiktoken#187). So gpt2 is read from r50k_base's file.
GPT2 = EncodingFile(
    name="gpt2",
    url=R50K_BASE.url,
    sha256=R50K_BASE.sha256,
    pattern=R50K_PATTERN,
    special_tokens={ENDOFTEXT: 50256},
)
P50K_BASE = EncodingFile(
    name="p50k_base",
    url="https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
    sha256="94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    pattern=R50K_PATTERN,
    special_tokens={ENDOFTEXT: 50256},
)
P50K_EDIT = EncodingFile(
    name="p50k_edit",
    url=P50K_BASE.url,
    sha256=P50K_BASE.sha256,
    pattern=R50K_PATTERN,
    special_tokens={ENDOFTEXT: 50256, FIM_PREFIX: 50281, FIM_MIDDLE: 50282, FIM_SUFFIX: 50283},
)
CL100K_BASE = EncodingFile(
    name="cl100k_base",
    url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    pattern=(
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    special_tokens={
        ENDOFTEXT: 100257,
        FIM_PREFIX: 100258,
        FIM_MIDDLE: 100259,
        FIM_SUFFIX: 100260,
        ENDOFPROMPT: 100276,
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
    special_tokens={ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
)
# gpt-oss's chat format: o200k_base's file and expression, more special tokens.
O200K_HARMONY = EncodingFile(
    name="o200k_harmony",
    url=O200K_BASE.url,
    sha256=O200K_BASE.sha256,
    pattern=O200K_PATTERN,
    special_tokens={
        **O200K_BASE.special_tokens,
        "<|startoftext|>": 199998,
        ENDOFTEXT: 199999,
        "<|reserved_200000|>": 200000,
        "<|reserved_200001|>": 200001,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|reserved_200004|>": 200004,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|reserved_200009|>": 200009,
        "<|reserved_200010|>": 200010,
        "<|reserved_200011|>": 200011,
        "<|call|>": 200012,
    }
    | {f"<|reserved_{i}|>": i for i in range(200013, 201088)},
)
ENCODING_FILES = {
    spec.name: spec
    for spec in (GPT2, R50K_BASE, P50K_BASE, P50K_EDIT, CL100K_BASE, O200K_BASE, O200K_HARMONY)
}
# What `gateway tokenizers fetch` gets without being told: the encodings of today's
# models (and the fallback's). Others it gets for the models configured with them, or
# when named with --encoding.
DEFAULT_ENCODINGS = ("cl100k_base", "o200k_base")


def sha256_of(contents: bytes) -> str:
    return hashlib.sha256(contents).hexdigest()


def files_of(encodings: Iterable[str]) -> dict[str, list[str]]:
    """The encodings grouped by the file they read: the first one's name → all their names."""
    by_file: dict[str, list[str]] = {}
    first_of_file: dict[str, str] = {}
    for name in encodings:
        cache_name = ENCODING_FILES[name].cache_name
        first = first_of_file.setdefault(cache_name, name)
        by_file.setdefault(first, []).append(name)
    return by_file


def named_to_fetch(encodings: Iterable[str]) -> tuple[str, ...]:
    """Those of `encodings` whose file `gateway tokenizers fetch` gets only when named."""
    default_files = {ENCODING_FILES[name].cache_name for name in DEFAULT_ENCODINGS}
    return tuple(name for name in encodings if ENCODING_FILES[name].cache_name not in default_files)


def read_cached(spec: EncodingFile, cache_dir: Path) -> bytes:
    """The encoding's file from the cache, checked; TokenizerFilesMissing if absent or wrong."""
    path = cache_dir / spec.cache_name
    try:
        contents = path.read_bytes()
    except FileNotFoundError:
        problem = f"{spec.name} is missing ({spec.cache_name})"
        raise TokenizerFilesMissing(cache_dir, [problem], named_to_fetch([spec.name])) from None
    except OSError as exc:
        problem = f"{spec.name} cannot be read: {exc}"
        raise TokenizerFilesMissing(cache_dir, [problem], named_to_fetch([spec.name])) from exc
    digest = sha256_of(contents)
    if digest != spec.sha256:
        problem = f"{spec.name} ({spec.cache_name}) has sha256 {digest}, not OpenAI's {spec.sha256}"
        raise TokenizerFilesMissing(cache_dir, [problem], named_to_fetch([spec.name]))
    return contents


def require_cached(cache_dir: Path, encodings: Iterable[str]) -> None:
    """Raises TokenizerFilesMissing naming each file of these encodings that is missing or
    damaged (one line per file, however many encodings share it)."""
    problems: list[str] = []
    missing: list[str] = []
    for name in files_of(encodings):
        try:
            read_cached(ENCODING_FILES[name], cache_dir)
        except TokenizerFilesMissing as exc:
            problems.extend(exc.problems)
            missing.append(name)
    if problems:
        raise TokenizerFilesMissing(cache_dir, problems, named_to_fetch(missing))


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
