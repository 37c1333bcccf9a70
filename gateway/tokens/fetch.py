"""`gateway tokenizers fetch`: fill the tokenizer cache, the only place files are downloaded.

Each encoding file comes from its official address, or from `--from`: a mirror's base
URL (BASE/o200k_base.tiktoken) or a local folder holding the files under either name
(o200k_base.tiktoken, or tiktoken's cache name, so a copied tiktoken cache works too).
A file is written only once its SHA-256 is the one tiktoken expects, through a
temporary file renamed into place, so a reader never sees half a file. Encodings that
share a file (p50k_base and p50k_edit, r50k_base and gpt2, o200k_base and o200k_harmony)
share its line too: it is fetched once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.tokens.files import DEFAULT_ENCODINGS, ENCODING_FILES, EncodingFile, files_of, sha256_of

# An encoding file is a few MB; a mirror slower than this is broken.
FETCH_TIMEOUT_SECONDS = 120
MAX_FILE_BYTES = 64 << 20


@dataclass(frozen=True)
class FetchOutcome:
    """What became of one encoding file: `present`, `fetched` or `failed`, and a line for people."""

    # The encodings that read the file: "p50k_base, p50k_edit".
    encoding: str
    status: str
    detail: str


class SourceError(Exception):
    """The file could not be had from its source (HTTP error, unreadable file, too large)."""


def encodings_to_fetch(*wanted: Iterable[str]) -> tuple[str, ...]:
    """The default encodings and every one in `wanted`, once each, in tiktoken's order."""
    names = {*DEFAULT_ENCODINGS, *(name for group in wanted for name in group)}
    return tuple(name for name in ENCODING_FILES if name in names)


async def fetch_encoding_files(
    cache_dir: Path, source: str | None = None, encodings: Iterable[str] = DEFAULT_ENCODINGS
) -> list[FetchOutcome]:
    """Fetches the files of these encodings (names from ENCODING_FILES) that are missing
    from (or damaged in) cache_dir: one outcome per file."""
    outcomes = []
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    # trust_env: behind a company proxy, HTTPS_PROXY is how the way out is named.
    async with aiohttp.ClientSession(timeout=timeout, trust_env=True) as session:
        for first, sharing in files_of(encodings).items():
            outcome = await _fetch_one(session, ENCODING_FILES[first], cache_dir, source)
            outcomes.append(FetchOutcome(", ".join(sharing), outcome.status, outcome.detail))
    return outcomes


async def _fetch_one(
    session: aiohttp.ClientSession, spec: EncodingFile, cache_dir: Path, source: str | None
) -> FetchOutcome:
    target = cache_dir / spec.cache_name
    if _holds(target, spec):
        return FetchOutcome(spec.name, "present", f"already in {target}")
    where = _address(spec, source)
    try:
        contents = await _read_source(session, where)
    except SourceError as exc:
        return FetchOutcome(spec.name, "failed", f"cannot fetch {where}: {exc}")
    digest = sha256_of(contents)
    if digest != spec.sha256:
        return FetchOutcome(
            spec.name,
            "failed",
            f"{where} has sha256 {digest}, not OpenAI's {spec.sha256}: not written",
        )
    try:
        _write_atomically(target, contents)
    except OSError as exc:
        return FetchOutcome(spec.name, "failed", f"cannot write {target}: {exc}")
    return FetchOutcome(spec.name, "fetched", f"{where} -> {target} (sha256 checked)")


def _holds(target: Path, spec: EncodingFile) -> bool:
    try:
        return sha256_of(target.read_bytes()) == spec.sha256
    except OSError:
        return False


def _address(spec: EncodingFile, source: str | None) -> str:
    """Where to read the file: a URL, or a path in the local folder `source`."""
    if source is None:
        return spec.url
    if source.startswith(("http://", "https://")):
        return f"{source.rstrip('/')}/{spec.file_name}"
    folder = Path(source)
    by_cache_name = folder / spec.cache_name
    return str(by_cache_name if by_cache_name.exists() else folder / spec.file_name)


async def _read_source(session: aiohttp.ClientSession, where: str) -> bytes:
    if not where.startswith(("http://", "https://")):
        return _read_local(Path(where))
    try:
        async with session.get(where) as response:
            if response.status != 200:
                raise SourceError(f"HTTP {response.status}")
            chunks, size = [], 0
            async for chunk in response.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise SourceError(f"larger than {MAX_FILE_BYTES} bytes")
                chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SourceError(str(exc) or type(exc).__name__) from exc
    return b"".join(chunks)


def _read_local(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SourceError(f"larger than {MAX_FILE_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise SourceError(exc.strerror or str(exc)) from exc


def _write_atomically(target: Path, contents: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(contents)
            file.flush()
            os.fsync(file.fileno())
        # Readable by the gateway's user, whoever fetched (mkstemp makes it 0600).
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
