"""Why a tokenizer could not be had, each with what to do about it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TokenizerUnavailable(Exception):
    """A configured tokenizer could not be loaded (file missing, unknown name)."""


class TokenizerPackageMissing(TokenizerUnavailable):
    """A tokenizer file shipped inside a Python package that is not installed."""


class TokenizerFilesMissing(TokenizerUnavailable):
    """tiktoken encoding files absent from (or damaged in) the local cache.

    The gateway never downloads them at run time: `gateway tokenizers fetch` does.
    """

    def __init__(self, cache_dir: Path, problems: list[str], named_encodings: Sequence[str] = ()) -> None:
        self.cache_dir = cache_dir
        self.problems = problems
        # Encodings the fetch gets only when told to (--encoding): their files are not
        # among those it fetches by default.
        self.named_encodings = tuple(named_encodings)
        listed = "; ".join(problems)
        super().__init__(f"tokenizer files missing or damaged in {cache_dir}: {listed}. {self.fix}")

    @property
    def fix(self) -> str:
        named = "".join(f" --encoding {name}" for name in self.named_encodings)
        return (
            f"Run `gateway tokenizers fetch --cache-dir {self.cache_dir}{named}` (without internet access, "
            "add --from MIRROR_URL or --from DIR holding the files; see docs/token-counting.md)"
        )
