"""Llama models: recognised in the names people use, counted with Meta's files when they are
installed (the llama extra), and every count saying whether it is exact and why."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from gateway.config import TokensConfig
from gateway.tokens import RawCount, TokenizerRegistry
from gateway.tokens import registry as registry_module
from gateway.tokens.chat import count_chat
from gateway.tokens.llama import LLAMA3_FILE, llama_generation

REGISTRY = TokenizerRegistry()
HELLO = [{"role": "user", "content": "Hello, world!"}]
SENTENCE = "The quick brown fox jumps over the lazy dog."
ACCENTED = "Meta's Llama 3 tokenizer counts “this” sentence — with 12,345 numbers, émigré accents and 日本語."

LLAMA3_NAMES = (
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3-70B",
    "meta-llama/Llama-3.2-3B",
    "meta-llama/Llama-3.3-70B-Instruct",
    "llama3.1:8b",
    "llama3:latest",
    "llama3.2",
    "llama3.1-8b",
    "llama-3.1-8b-instant",
    "Llama-3.3-70B-Instruct-Turbo",
    "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "meta.llama3-1-70b-instruct-v1:0",
    "us.meta.llama3-2-90b-instruct-v1:0",
    "accounts/fireworks/models/llama-v3p1-8b-instruct",
    "LLAMA-3-8B",
    "llama3-8b-8192",
)
LLAMA2_NAMES = ("meta-llama/Llama-2-7b-chat-hf", "llama2:13b", "llama-2", "llama-2-70b-chat", "Llama2")
LLAMA4_NAMES = (
    "meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "llama4:scout",
    "meta.llama4-maverick-17b-instruct-v1:0",
    "meta-llama/llama-4-maverick-17b-128e-instruct",
)
NOT_LLAMA = ("codellama:7b", "tinyllama", "huggyllama/llama-7b", "llama-30b", "ollama", "gpt-4o", "llama")


def count_cli(model: str, body: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "tokens", "count", "--json", "--model", model],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        timeout=60,
        # No gateway.yaml: the built-in rules alone, as on a default install.
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_hello_world_for_gpt4_claude3_and_llama2_says_exact_or_estimate_and_why() -> None:
    answers = {
        model: count_cli(model, {"messages": HELLO})
        for model in ("gpt-4", "claude-3-5-sonnet-latest", "llama-2")
    }
    assert {model: (a["prompt_tokens"], a["exact"], a["reason"]) for model, a in answers.items()} == {
        # 3 per message + "user" + 4 for "Hello, world!" + 3 priming
        "gpt-4": (11, True, "exact: OpenAI's tokenizer and published counting rule"),
        # 11 counted with o200k_base, x 1.15 = 12.65
        "claude-3-5-sonnet-latest": (
            13,
            False,
            "estimate: Claude's tokenizer is not public; o200k_base x 1.15",
        ),
        "llama-2": (
            13,
            False,
            "estimate: Llama 2's SentencePiece vocabulary is not installed; o200k_base x 1.15",
        ),
    }
    # And the Llama 3 that the llama extra counts exactly: <|begin_of_text|>, a header of
    # 4 ("<|start_header_id|>user<|end_header_id|>\n\n"), 4, <|eot_id|>, the reply's header.
    llama3 = count_cli("meta-llama/Llama-3.1-8B-Instruct", {"messages": HELLO})
    assert (llama3["prompt_tokens"], llama3["exact"], llama3["tokenizer"], llama3["reason"]) == (
        14,
        True,
        "llama3",
        "exact: Meta's Llama 3 tokenizer (llama-models)",
    )


@pytest.mark.parametrize("model", LLAMA3_NAMES)
def test_llama3_names_resolve_to_metas_llama3_tokenizer(model: str) -> None:
    profile = REGISTRY.profile(model)
    assert (profile.tokenizer.name, profile.chat_format, profile.exact) == ("llama3", "llama3", True)
    assert count_chat({"messages": HELLO}, profile, (1024, 1024)) == RawCount(14, True)


@pytest.mark.parametrize("model", LLAMA2_NAMES)
def test_llama2_names_are_estimates_saying_why(model: str) -> None:
    profile = REGISTRY.profile(model)
    assert (profile.tokenizer.name, profile.exact, profile.factor) == ("o200k_base", False, 1.15)
    assert profile.reason == "Llama 2's SentencePiece vocabulary is not installed"


@pytest.mark.parametrize("model", LLAMA4_NAMES)
def test_llama4_names_resolve_to_metas_llama4_tokenizer(model: str) -> None:
    profile = REGISTRY.profile(model)
    assert (profile.tokenizer.name, profile.chat_format, profile.exact) == ("llama4", "llama4", True)


@pytest.mark.parametrize("model", NOT_LLAMA)
def test_other_names_are_not_llama(model: str) -> None:
    assert llama_generation(model) is None


def test_llama_text_counts_are_metas() -> None:
    llama3 = pytest.importorskip("llama_models.llama3.tokenizer").Tokenizer.get_instance()
    llama4 = pytest.importorskip("llama_models.llama4.tokenizer").Tokenizer.get_instance()
    for text, in_llama3, in_llama4 in ((SENTENCE, 10, 10), (ACCENTED, 29, 27), ("Hello, world!", 4, 4)):
        assert len(llama3.encode(text, bos=False, eos=False)) == in_llama3
        assert len(llama4.encode(text, bos=False, eos=False)) == in_llama4
        assert REGISTRY.tokenizer("llama3").count(text) == in_llama3
        assert REGISTRY.tokenizer("llama4").count(text) == in_llama4
    # Same vocabulary, same special tokens and ids as Meta's.
    assert REGISTRY.tokenizer("llama4").encoding._special_tokens == llama4.special_tokens
    assert REGISTRY.tokenizer("llama3").encoding._special_tokens == llama3.special_tokens


def test_llama4_chat_is_metas_template() -> None:
    """Meta's llama4 ChatFormat needs torch; its template is rebuilt here from Meta's
    tokenizer as llama_models/llama4/chat_format.py lays it out: <|begin_of_text|>, per
    message <|header_start|> role <|header_end|> "\\n\\n" content <|eot|>, then the
    assistant's header."""
    meta = pytest.importorskip("llama_models.llama4.tokenizer").Tokenizer.get_instance()

    def header(role: str) -> list[int]:
        return [
            meta.special_tokens["<|header_start|>"],
            *meta.encode(role, bos=False, eos=False),
            meta.special_tokens["<|header_end|>"],
            *meta.encode("\n\n", bos=False, eos=False),
        ]

    conversations = [
        [("user", "hi")],
        [("system", "You are terse."), ("user", "Hello there, 日本語 🙂")],
        [("system", "Be brief."), ("user", "a\n\nb"), ("assistant", "ok!"), ("user", "<|eot|> inside")],
    ]
    for conversation in conversations:
        expected = [meta.special_tokens["<|begin_of_text|>"]]
        for role, content in conversation:
            expected += header(role) + meta.encode(content, bos=False, eos=False, allowed_special=set())
            expected.append(meta.special_tokens["<|eot|>"])
        expected += header("assistant")
        messages = [{"role": role, "content": content} for role, content in conversation]
        profile = REGISTRY.profile("llama4:scout")
        assert count_chat({"messages": messages}, profile, (1024, 1024)) == RawCount(len(expected), True)


def test_llama_images_make_an_estimate() -> None:
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
    ]
    profile = REGISTRY.profile("meta-llama/Llama-3.2-11B-Vision-Instruct")
    counted = count_chat({"messages": [{"role": "user", "content": parts}]}, profile, (1024, 1024))
    assert counted.exact is False


def test_a_llama_file_that_is_not_metas_is_an_estimate_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Path(str(resources.files("llama_models").joinpath("llama3/tokenizer.model")))
    altered = tmp_path / "tokenizer.model"
    altered.write_bytes(source.read_bytes().replace(b" 1000\n", b" 1001\n", 1))
    monkeypatch.setattr(registry_module, "LLAMA3_FILE", dataclasses.replace(LLAMA3_FILE, path=altered))
    profile = TokenizerRegistry(TokensConfig()).profile("llama3.1:8b")
    assert (profile.tokenizer.name, profile.exact) == ("o200k_base", False)
    assert profile.reason.startswith(f"{altered} is not the file tokenizer 'llama3' expects (sha256 ")
    assert profile.reason.endswith(f", not {LLAMA3_FILE.sha256})")


def test_without_the_llama_extra_llama3_is_an_estimate_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = dataclasses.replace(LLAMA3_FILE, package_resource="llama_models_absent/llama3/tokenizer.model")
    monkeypatch.setattr(registry_module, "LLAMA3_FILE", absent)
    monkeypatch.setitem(
        registry_module.INSTALL_HINTS, "llama_models_absent", "pip install 'llm-gateway[llama]'"
    )
    profile = TokenizerRegistry(TokensConfig()).profile("meta-llama/Llama-3.1-8B-Instruct")
    assert (profile.tokenizer.name, profile.exact) == ("o200k_base", False)
    assert profile.reason == (
        "tokenizer 'llama3' is not installed: its Python package 'llama_models_absent' is missing "
        "(pip install 'llm-gateway[llama]')"
    )
