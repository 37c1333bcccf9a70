"""Model name → how its prompts are counted: tokenizer, chat format, and whether exact.

Rules from gateway.yaml (`tokens.rules`) are tried first, then the built-in rules
below, then the configured fallback (always marked as an estimate). Encodings are
tiktoken's by name, or BPE files in tiktoken's format (`tokens.bpe_files`).
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken

from gateway.config import BpeFileConfig, TokenRuleConfig, TokensConfig, default_tokenizer_cache
from gateway.tokens.counts import RawCount
from gateway.tokens.errors import TokenizerFilesMissing, TokenizerPackageMissing, TokenizerUnavailable
from gateway.tokens.files import ENCODING_FILES, parse_ranks, read_cached, sha256_of
from gateway.tokens.images import ImageCostRule
from gateway.tokens.llama import LLAMA3_FILE, LLAMA4_FILE, llama_generation
from gateway.tokens.runs import MAX_RUN_CHARS, count_in_runs


@dataclass(frozen=True)
class FunctionCost:
    """The constants of OpenAI's published rule for counting function definitions."""

    function_start: int
    properties_start: int
    per_property: int
    enum_start: int
    per_enum_item: int
    end: int


GPT4O_FUNCTIONS = FunctionCost(7, 3, 3, -3, 3, 12)
GPT4_FUNCTIONS = FunctionCost(10, 3, 3, -3, 3, 12)
GPT4O_IMAGES = ImageCostRule(base_tokens=85, tile_tokens=170)
GPT4O_MINI_IMAGES = ImageCostRule(base_tokens=2833, tile_tokens=5667)


@dataclass(frozen=True)
class BuiltinRule:
    models: tuple[str, ...]
    encoding: str
    chat_format: str
    exact: bool
    factor: float = 1.0
    functions: FunctionCost | None = None
    # Only where OpenAI published the constants for that family.
    functions_exact: bool = False
    images: ImageCostRule | None = None
    images_exact: bool = False
    # Why the count is exact, or why it is an estimate: said with every count.
    reason: str = ""
    # Names matched by a function instead of patterns (the Llama generations).
    generation: int | None = None

    def matches(self, model: str) -> bool:
        if self.generation is not None:
            return llama_generation(model) == self.generation
        return _matches(model, self.models)


OPENAI_RULE = "OpenAI's tokenizer and published counting rule"
OPENAI_TEXT_RULE = f"{OPENAI_RULE} (tools and images: constants not published)"
# Facts from OpenAI's and Meta's published material; see docs/token-counting.md.
BUILTIN_RULES: tuple[BuiltinRule, ...] = (
    BuiltinRule(
        ("gpt-4o-mini*",),
        "o200k_base",
        "openai",
        True,
        1.0,
        GPT4O_FUNCTIONS,
        True,
        GPT4O_MINI_IMAGES,
        True,
        reason=OPENAI_RULE,
    ),
    BuiltinRule(
        ("gpt-4o*", "chatgpt-4o*"),
        "o200k_base",
        "openai",
        True,
        1.0,
        GPT4O_FUNCTIONS,
        True,
        GPT4O_IMAGES,
        True,
        reason=OPENAI_RULE,
    ),
    BuiltinRule(
        ("gpt-4.1*", "gpt-4.5*", "gpt-5*", "o1*", "o3*", "o4*", "gpt-oss*"),
        "o200k_base",
        "openai",
        True,
        1.0,
        GPT4O_FUNCTIONS,
        False,
        GPT4O_IMAGES,
        False,
        reason=OPENAI_TEXT_RULE,
    ),
    BuiltinRule(
        ("gpt-4-turbo*", "gpt-4-1106*", "gpt-4-0125*", "gpt-4-vision*"),
        "cl100k_base",
        "openai",
        True,
        1.0,
        GPT4_FUNCTIONS,
        True,
        GPT4O_IMAGES,
        True,
        reason=OPENAI_RULE,
    ),
    BuiltinRule(
        ("gpt-4*", "gpt-3.5*"), "cl100k_base", "openai", True, 1.0, GPT4_FUNCTIONS, True, reason=OPENAI_RULE
    ),
    BuiltinRule(
        ("text-embedding-3*", "text-embedding-ada-002*"), "cl100k_base", "openai", True, reason=OPENAI_RULE
    ),
    # Claude's tokenizer is not public: counted with o200k_base and calibrated.
    BuiltinRule(
        ("claude*", "anthropic/*", "anthropic.claude*"),
        "o200k_base",
        "anthropic",
        False,
        1.15,
        reason="Claude's tokenizer is not public",
    ),
    BuiltinRule((), "llama3", "llama3", True, reason="Meta's Llama 3 tokenizer (llama-models)", generation=3),
    BuiltinRule((), "llama4", "llama4", True, reason="Meta's Llama 4 tokenizer (llama-models)", generation=4),
    # Llama 1 and 2 share a SentencePiece vocabulary of 32,000 pieces that no package we
    # know ships. Meta reports Llama 3's tokenizer takes up to 15% fewer tokens than Llama
    # 2's, and o200k_base counts English about as Llama 3's does: hence 1.15.
    *(
        BuiltinRule(
            (),
            "o200k_base",
            "openai",
            False,
            1.15,
            reason=f"Llama {generation}'s SentencePiece vocabulary is not installed",
            generation=generation,
        )
        for generation in (1, 2)
    ),
)

# Texts this short (roles, names, enum items, tiny prompts) are looked up, not encoded:
# handing one to tiktoken costs more than a dict lookup, and a body of 4 million one-digit
# enum items took 3.8 s of calls. Up to SHORT_TEXTS_REMEMBERED of them, then forgotten.
SHORT_TEXT_CHARS = 16
SHORT_TEXTS_REMEMBERED = 65_536
# Their counts, made once: at most 4 bytes a character, at least 1 byte a token.
_SHORT_COUNTS = tuple(RawCount(tokens, True) for tokens in range(4 * SHORT_TEXT_CHARS + 1))


@dataclass(frozen=True)
class Tokenizer:
    """A loaded encoding and its name."""

    name: str
    encoding: Any = field(repr=False, compare=False)
    # Runs longer than this are cut before BPE (see runs.py); smaller in tests.
    max_run_chars: int = MAX_RUN_CHARS
    _short: dict[str, RawCount] = field(default_factory=dict, init=False, repr=False, compare=False)

    def count(self, text: str) -> int:
        """Tokens of `text`, in time linear in its length (see `measure`)."""
        if len(text) <= SHORT_TEXT_CHARS:
            return self._measure_short(text).tokens
        if len(text) <= self.max_run_chars:
            # Special-token strings in user text are billed as plain text.
            return len(self.encoding.encode_ordinary(text))
        return count_in_runs(self.encoding.encode_ordinary, text, self.max_run_chars)[0]

    def measure(self, text: str) -> RawCount:
        """Tokens of `text`, exact unless a run too long to encode whole had to be cut."""
        if len(text) <= SHORT_TEXT_CHARS:
            return self._measure_short(text)
        if len(text) <= self.max_run_chars:
            return RawCount(len(self.encoding.encode_ordinary(text)), True)
        tokens, cuts = count_in_runs(self.encoding.encode_ordinary, text, self.max_run_chars)
        return RawCount(tokens, cuts == 0)

    def _measure_short(self, text: str) -> RawCount:
        remembered = self._short.get(text)
        if remembered is None:
            if len(self._short) >= SHORT_TEXTS_REMEMBERED:
                self._short.clear()
            remembered = self._short[text] = _SHORT_COUNTS[len(self.encoding.encode_ordinary(text))]
        return remembered

    def encode(self, text: str) -> list[int]:
        return list(self.encoding.encode_ordinary(text))


@dataclass(frozen=True)
class ModelProfile:
    """Everything needed to count one model's prompts, resolved once per model name."""

    model: str
    tokenizer: Tokenizer
    chat_format: str
    exact: bool
    factor: float = 1.0
    functions: FunctionCost | None = None
    functions_exact: bool = False
    images: ImageCostRule | None = None
    images_exact: bool = False
    # Why its counts are exact, or estimates (e.g. "Claude's tokenizer is not public").
    reason: str = ""


# Where a package that ships a tokenizer file comes from.
INSTALL_HINTS = {"llama_models": "install the gateway with its llama extra: pip install 'llm-gateway[llama]'"}


class TokenizerRegistry:
    """Loads encodings once and resolves model names to profiles (both cached).

    tiktoken's encodings are read from tokens.cache_dir only: a missing file is a
    TokenizerFilesMissing naming `gateway tokenizers fetch`, never a download.
    """

    def __init__(self, config: TokensConfig | None = None) -> None:
        self.config = config or TokensConfig()
        self.cache_dir = self.config.cache_dir or default_tokenizer_cache(Path.cwd())
        builtin_files = (LLAMA3_FILE, LLAMA4_FILE)
        self._files = {f.name: f for f in builtin_files} | {f.name: f for f in self.config.bpe_files}
        self._encodings: dict[str, Tokenizer] = {}
        self._profiles: dict[tuple[str, str | None], ModelProfile] = {}
        self._lock = threading.Lock()

    def tokenizer(self, name: str) -> Tokenizer:
        """The named encoding: tiktoken's own, or a configured BPE file."""
        with self._lock:
            loaded = self._encodings.get(name)
            if loaded is None:
                loaded = Tokenizer(name, self._load(name))
                self._encodings[name] = loaded
            return loaded

    def _load(self, name: str) -> Any:
        spec = self._files.get(name)
        if spec is not None:
            encoding = _load_bpe_file(spec)
        elif name in ENCODING_FILES:
            encoding_file = ENCODING_FILES[name]
            encoding = tiktoken.Encoding(
                name=name,
                pat_str=encoding_file.pattern,
                mergeable_ranks=parse_ranks(read_cached(encoding_file, self.cache_dir), name),
                special_tokens=dict(encoding_file.special_tokens),
            )
        else:
            known = ", ".join(sorted({*ENCODING_FILES, *self._files}))
            raise TokenizerUnavailable(
                f"unknown tokenizer {name!r} (known: {known}; others through tokens.bpe_files)"
            )
        # tiktoken keeps a Python dict of every token's bytes only to pickle the encoding;
        # the Rust core holds its own. Dropping it saves ~20 MB per large vocabulary in
        # every worker (we never pickle encodings).
        encoding._mergeable_ranks = {}
        return encoding

    def profile(self, upstream_model: str, configured_tokenizer: str | None = None) -> ModelProfile:
        key = (upstream_model, configured_tokenizer)
        profile = self._profiles.get(key)
        if profile is None:
            profile = self._resolve(upstream_model, configured_tokenizer)
            self._profiles[key] = profile
        return profile

    def encoding_name(self, upstream_model: str, configured_tokenizer: str | None = None) -> str:
        """The encoding `profile` counts this model with, named without loading it.

        (A package's file that is not installed makes `profile` use tokens.fallback.)"""
        if configured_tokenizer:
            return configured_tokenizer
        rule = self._rule_for(upstream_model)
        if isinstance(rule, TokenRuleConfig):
            return rule.tokenizer
        return rule.encoding if rule is not None else self.config.fallback

    def reads_cache(self, name: str) -> bool:
        """Whether the named encoding is one of tiktoken's, read from cache_dir."""
        return name in ENCODING_FILES and name not in self._files

    def _rule_for(self, model: str) -> TokenRuleConfig | BuiltinRule | None:
        """The first of tokens.rules, else of the built-in rules, that matches the model."""
        for rule in self.config.rules:
            if _matches(model, rule.models):
                return rule
        return next((builtin for builtin in BUILTIN_RULES if builtin.matches(model)), None)

    def _resolve(self, model: str, configured_tokenizer: str | None) -> ModelProfile:
        rule = self._rule_for(model)
        if isinstance(rule, TokenRuleConfig):
            return self._from_user_rule(model, rule, configured_tokenizer)
        reason = f"no built-in rule knows {model!r}"
        if rule is not None:
            encoding = configured_tokenizer or rule.encoding
            try:
                return self._from_builtin_rule(model, rule, encoding)
            except TokenizerFilesMissing:
                raise  # the fallback needs them too: fetching them is the fix
            except TokenizerUnavailable as exc:
                # e.g. llama-models not installed: counted as an estimate, saying why.
                reason = str(exc)
        return ModelProfile(
            model=model,
            tokenizer=self.tokenizer(configured_tokenizer or self.config.fallback),
            chat_format="openai",
            exact=False,
            functions=GPT4O_FUNCTIONS,
            images=GPT4O_IMAGES,
            reason=reason,
        )

    def _from_builtin_rule(self, model: str, builtin: BuiltinRule, encoding: str) -> ModelProfile:
        tokenizer = self.tokenizer(encoding)
        replaced = encoding != builtin.encoding
        return ModelProfile(
            model=model,
            tokenizer=tokenizer,
            chat_format=builtin.chat_format,
            exact=builtin.exact and not replaced,
            factor=builtin.factor,
            functions=builtin.functions,
            functions_exact=builtin.functions_exact,
            images=builtin.images,
            images_exact=builtin.images_exact,
            reason=(
                f"the model's tokenizer {encoding} replaces {builtin.encoding}"
                if replaced and builtin.exact
                else builtin.reason
            ),
        )

    def _from_user_rule(
        self, model: str, rule: TokenRuleConfig, configured_tokenizer: str | None
    ) -> ModelProfile:
        return ModelProfile(
            model=model,
            tokenizer=self.tokenizer(configured_tokenizer or rule.tokenizer),
            chat_format=rule.chat_format,
            exact=rule.exact,
            factor=rule.factor,
            functions=GPT4O_FUNCTIONS,
            images=GPT4O_IMAGES,
            reason=f"tokens.rules counts it with {rule.tokenizer}"
            + ("" if rule.exact else ", marked as an estimate"),
        )

    def self_test(self, name: str) -> bool:
        """True when the encoding loads and round-trips a known string."""
        tokenizer = self.tokenizer(name)
        sample = "hello world, 日本語 🙂"
        return bool(tokenizer.encoding.decode(tokenizer.encode(sample)) == sample)


def _matches(model: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


def builtin_file_problems() -> dict[str, str | None]:
    """Each built-in BPE file (Llama's): None when it is installed and checked, else why not."""
    problems: dict[str, str | None] = {}
    for spec in (LLAMA3_FILE, LLAMA4_FILE):
        try:
            _read_bpe_file(spec)
            problems[spec.name] = None
        except TokenizerUnavailable as exc:
            problems[spec.name] = str(exc)
    return problems


def _read_bpe_file(spec: BpeFileConfig) -> tuple[Path, bytes]:
    path = _bpe_path(spec)
    try:
        contents = path.read_bytes()
    except OSError as exc:
        raise TokenizerUnavailable(f"cannot load BPE file {path} for tokenizer {spec.name!r}: {exc}") from exc
    if spec.sha256 is not None and (digest := sha256_of(contents)) != spec.sha256:
        raise TokenizerUnavailable(
            f"{path} is not the file tokenizer {spec.name!r} expects (sha256 {digest}, not {spec.sha256})"
        )
    return path, contents


def _load_bpe_file(spec: BpeFileConfig) -> Any:
    path, contents = _read_bpe_file(spec)
    ranks = parse_ranks(contents, str(path))
    # Reserved names continue after the ones listed by hand (Llama 3 lists 0 and 1).
    specials = _renumber_reserved(spec.special_tokens, spec.reserved_special_tokens)
    base = len(ranks)
    return tiktoken.Encoding(
        name=spec.name,
        pat_str=spec.pattern,
        mergeable_ranks=ranks,
        special_tokens={token: base + index for index, token in enumerate(specials)},
    )


def _renumber_reserved(listed: tuple[str, ...], total: int) -> list[str]:
    reserved_listed = sum(1 for token in listed if token.startswith("<|reserved_special_token_"))
    extra = [f"<|reserved_special_token_{reserved_listed + i}|>" for i in range(max(0, total - len(listed)))]
    return [*listed, *extra]


def _bpe_path(spec: BpeFileConfig) -> Path:
    if spec.path is not None:
        return spec.path
    assert spec.package_resource is not None
    package, _, relative = spec.package_resource.partition("/")
    try:
        return Path(str(resources.files(package).joinpath(relative)))
    except ModuleNotFoundError as exc:
        hint = INSTALL_HINTS.get(package, f"pip install the package that provides {package!r}")
        raise TokenizerPackageMissing(
            f"tokenizer {spec.name!r} is not installed: its Python package {package!r} is missing ({hint})"
        ) from exc
