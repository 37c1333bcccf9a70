"""Counting has a ceiling: long runs are cut before BPE (the count then an estimate), and
the count endpoints hold the caller to its model list and request limits."""

from __future__ import annotations

import base64
import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import TokensConfig
from gateway.metrics import Metrics
from gateway.tokens import Calibration, PromptCounter, RawCount, Tokenizer, TokenizerRegistry
from gateway.tokens.runs import BOUNDARY, MAX_RUN_CHARS, count_in_runs, forced_cuts, run_ends
from tests.conftest import USER_KEY, RunningGateway, StartGateway
from tests.fakes.openai_upstream import FakeUpstream
from tests.test_access import add_key

REGISTRY = TokenizerRegistry()
ENCODINGS = ("o200k_base", "cl100k_base", "llama3", "llama4")
ROOT = Path(__file__).parent.parent
HI = [{"role": "user", "content": "hi"}]


def ordinary_texts() -> dict[str, str]:
    """Texts longer than MAX_RUN_CHARS of the kinds people send."""
    chinese = "今天天气很好，我们去公园散步。孩子们在草地上玩耍，老人们在树下下棋、聊天。" * 60  # noqa: RUF001
    japanese = (
        "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。「ニャーニャー」と泣いていた。"
        * 80
    )
    korean = "대한민국의 수도는 서울입니다. 오늘은 날씨가 좋아서 산책을 했습니다. " * 60
    russian = "Москва — столица России, город федерального значения. " * 80
    rows = "\n".join(f"| {i} | item-{i} | {i * 3.5:.2f} | ok |" for i in range(200))
    data = {"items": [{"id": i, "name": f"name{i}", "tags": ["a", "b"], "price": i / 7} for i in range(300)]}
    return {
        "markdown docs": (ROOT / "docs" / "token-counting.md").read_text(),
        "python source": (ROOT / "gateway" / "proxy.py").read_text(),
        "chinese": chinese,
        "japanese": japanese,
        "korean": korean,
        "russian": russian,
        "markdown table": "| id | name | price | state |\n|---|---|---|---|\n" + rows,
        "compact json": json.dumps(data, separators=(",", ":")),
        "base64": base64.b64encode(random.Random(3).randbytes(30_000)).decode(),
        "hex digest list": "\n".join(f"{random.Random(i).getrandbits(256):064x}" for i in range(200)),
        "long url": "https://example.com/search?" + "&".join(f"q{i}=value{i}" for i in range(400)),
    }


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", list(ordinary_texts()))
def test_ordinary_texts_are_counted_whole_and_exact(encoding: str, kind: str) -> None:
    text = ordinary_texts()[kind]
    tokenizer = REGISTRY.tokenizer(encoding)
    assert len(text) > MAX_RUN_CHARS
    assert forced_cuts(text) == []
    assert tokenizer.measure(text) == RawCount(len(tokenizer.encoding.encode_ordinary(text)), True)
    assert tokenizer.count(text) == len(tokenizer.encoding.encode_ordinary(text))


# Characters on either side of every rule of BOUNDARY and of the encodings' expressions:
# letters of each case and script, marks, digits and other numerals, apostrophes and
# contractions, "/", punctuation, symbols, and whitespace that Python and Rust disagree on.
TRICKY = st.sampled_from(
    [
        *"aZéß日本語ーアあ한ก",
        *"、。，！？「」（）",  # noqa: RUF001
        *" \u3000\t\n\r\xa0\x1c\u200b\u2028",
        *"'’/!.,:;-_()[]{}\"#@",  # noqa: RUF001
        *"0123²½٣",
        "\u0301",
        "🙂",
        "🇫🇷",
        "'s",
        "'LL",
        "\r\n",
        "  \n",
        " \t ",
    ]
)
texts = st.lists(TRICKY, min_size=1, max_size=60).map("".join)


def pieces(pattern: str, text: str) -> list[str]:
    """The pieces an encoding's expression makes of `text` (the `regex` package reads
    tiktoken's expressions as its Rust engine does)."""
    return [match.group() for match in regex.finditer(pattern, text)]


def piece_ends(pattern: str, text: str) -> set[int]:
    ends, position = set(), 0
    for piece in pieces(pattern, text):
        position += len(piece)
        ends.add(position)
    return ends


@settings(max_examples=400, deadline=None)
@given(texts)
def test_boundaries_end_a_piece_in_every_builtin_expression(text: str) -> None:
    cuts = [match.end() for match in BOUNDARY.finditer(text)]
    parts = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for name in ENCODINGS:
        encoding = REGISTRY.tokenizer(name).encoding
        assert set(cuts) <= piece_ends(encoding._pat_str, text)
        # And by tiktoken itself: encoded apart at every boundary, the count is the same.
        assert sum(len(encoding.encode_ordinary(part)) for part in parts) == len(
            encoding.encode_ordinary(text)
        )


@settings(max_examples=400, deadline=None)
@given(texts, st.integers(min_value=2, max_value=24))
def test_no_piece_reaching_bpe_is_longer_than_a_run(text: str, max_run: int) -> None:
    ends = list(run_ends(text, max_run))
    positions = [0, *(end for end, _ in ends), len(text)]
    assert all(0 < later - earlier <= max_run for earlier, later in itertools.pairwise(positions))
    assert all(BOUNDARY.match(text, end - 1) for end, forced in ends if not forced)
    cuts = forced_cuts(text, max_run)
    parts = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for name in ENCODINGS:
        encoding = REGISTRY.tokenizer(name).encoding
        assert (
            max((len(piece) for part in parts for piece in pieces(encoding._pat_str, part)), default=0)
            <= max_run
        )
        # Uncut, the text is encoded whole: the count is tiktoken's own.
        counted, cut = count_in_runs(encoding.encode_ordinary, text, max_run)
        assert cut == len(cuts)
        if cut == 0:
            assert counted == len(encoding.encode_ordinary(text))


SHAPES = {
    "letter": "a",
    "capital": "A",
    "spaces": " ",
    "tabs": "\t",
    "line breaks": "\n",
    "punctuation": "!",
    "CJK": "日",
    "emoji": "🙂",
    "combining accent": "a\u0301",
    "cyrillic": "привет",
    "digits": "1234567890",
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_long_runs_are_cut_and_counted_within_one_token_per_cut(encoding: str, shape: str) -> None:
    text = (SHAPES[shape] * 20_000)[:20_000]
    tokenizer = REGISTRY.tokenizer(encoding)
    cuts = forced_cuts(text)
    assert len(cuts) == 9  # 20,000 characters in runs of 2,048
    measured = tokenizer.measure(text)
    assert measured.exact is False
    assert abs(measured.tokens - len(tokenizer.encoding.encode_ordinary(text))) <= len(cuts)
    # No piece handed to BPE is longer than a run.
    parts = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    longest = max(len(piece) for part in parts for piece in pieces(tokenizer.encoding._pat_str, part))
    assert longest <= MAX_RUN_CHARS


class Recorder:
    """encode_ordinary, recording the length of every text it is given."""

    def __init__(self, encode: object) -> None:
        self._encode = encode
        self.calls: list[int] = []

    def __call__(self, text: str) -> Sequence[int]:
        self.calls.append(len(text))
        return self._encode(text)  # type: ignore[operator,no-any-return]


def test_a_megabyte_run_is_encoded_in_bounded_calls() -> None:
    encoding = REGISTRY.tokenizer("o200k_base").encoding
    recorder = Recorder(encoding.encode_ordinary)
    tokens, cuts = count_in_runs(recorder, "a" * 1_000_000)
    # 1,000,000 = 488 x 2,048 + 576: one call per run, none longer than a run.
    assert (cuts, len(recorder.calls), max(recorder.calls), sum(recorder.calls)) == (
        488,
        489,
        2048,
        1_000_000,
    )
    # o200k_base makes a token of 8 a's: 256 per run, 72 for the last.
    assert tokens == 488 * 256 + 72


def test_a_megabyte_of_spaces_is_counted() -> None:
    """tiktoken alone panics here: o200k_base's expression overflows its stack."""
    tokenizer = REGISTRY.tokenizer("o200k_base")
    assert tokenizer.measure(" " * 1_000_000) == RawCount(7_813, False)


class RecordingEncoding:
    """An encoding whose encode_ordinary records the length of every text it is given."""

    def __init__(self, name: str) -> None:
        self.recorder = Recorder(REGISTRY.tokenizer(name).encoding.encode_ordinary)
        self.encode_ordinary = self.recorder


def test_short_texts_are_encoded_once() -> None:
    """Roles, names and enum items: a body of a million one-digit items made a million calls."""
    encoding = RecordingEncoding("o200k_base")
    tokenizer = Tokenizer("o200k_base", encoding)
    for _ in range(1000):
        assert tokenizer.count("user") == 1
        assert tokenizer.measure("7") == RawCount(1, True)
        assert tokenizer.count("a longer text than sixteen characters") == 6
    assert encoding.recorder.calls == [4, 1, 37] + [37] * 999


def make_counter() -> PromptCounter:
    config = TokensConfig()
    return PromptCounter(TokenizerRegistry(config), Calibration(config, Metrics()))


@pytest.mark.parametrize("route", ["chat", "completions", "embeddings"])
async def test_a_cut_run_makes_the_prompt_count_an_estimate(route: str) -> None:
    counter = make_counter()
    profile = counter.registry.profile("gpt-4o")
    run = "a" * 100_000
    fields = {"chat": ("messages", [{"role": "user", "content": run}]), "completions": ("prompt", run)}
    field, value = fields.get(route, ("input", [run, "hello"]))
    counted = await counter.count(route, {field: value}, profile, 100_000)
    assert counted.exact is False
    ordinary = {"chat": ("messages", HI), "completions": ("prompt", "hi")}
    field, value = ordinary.get(route, ("input", ["hi", "hello"]))
    assert (await counter.count(route, {field: value}, profile, 10)).exact is True


def test_chat_parts_functions_and_llama3_are_estimates_when_cut() -> None:
    counter = make_counter()
    gpt = counter.registry.profile("gpt-4o")
    parts = [{"role": "user", "content": [{"type": "text", "text": "b" * 5000}]}]
    assert counter.count_raw("chat", {"messages": parts}, gpt).exact is False
    tools = [{"type": "function", "function": {"name": "f", "description": "c" * 5000}}]
    assert counter.count_raw("chat", {"messages": HI, "tools": tools}, gpt).exact is False
    assert counter.count_raw(
        "chat", {"messages": HI, "tools": [{**tools[0], "function": {"name": "f"}}]}, gpt
    ).exact
    llama = counter.registry.profile("llama-3.1-8b")
    long_role = [{"role": "x" * 5000, "content": "hi"}]
    assert counter.count_raw("chat", {"messages": long_role}, llama).exact is False
    assert counter.count_raw("chat", {"messages": HI}, llama) == RawCount(11, True)


async def post_count(
    gateway: RunningGateway, path: str, body: object, key: str = USER_KEY
) -> tuple[int, dict, dict[str, str]]:  # type: ignore[type-arg]
    headers = {"Authorization": f"Bearer {key}", "x-api-key": key, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}{path}", json=body, headers=headers) as response,
    ):
        return response.status, await response.json(), dict(response.headers)


async def test_the_count_endpoint_counts_a_megabyte_of_spaces(gateway: RunningGateway) -> None:
    """Before runs were cut, tiktoken panicked and the connection was dropped."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": " " * 1_000_000}]}
    status, counted, _ = await post_count(gateway, "/v1/tokens/count", body)
    # 3 priming + 3 for the message + "user" 1 + the spaces 7,813.
    assert (status, counted["prompt_tokens"], counted["exact"]) == (200, 7_820, False)


async def test_count_endpoints_refuse_a_model_the_key_may_not_use(
    start_gateway: StartGateway, pg: asyncpg.Connection, database_url: str
) -> None:
    gateway = await start_gateway()
    key = "gw-count-key-000001"
    await add_key(database_url, key, models=["gpt-4o-mini"])
    status, body, _ = await post_count(gateway, "/v1/tokens/count", {"model": "gpt-4", "messages": HI}, key)
    assert (status, body["error"]) == (
        403,
        {
            "message": "This key may not use model `gpt-4`.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_allowed",
        },
    )
    status, body, _ = await post_count(
        gateway, "/v1/messages/count_tokens", {"model": "claude-sonnet", "messages": HI}, key
    )
    assert (status, body["type"], body["error"]["type"]) == (403, "error", "permission_error")
    status, body, _ = await post_count(
        gateway, "/v1/tokens/count", {"model": "gpt-4o-mini", "messages": HI}, key
    )
    assert (status, body["prompt_tokens"]) == (200, 8)


async def test_count_endpoints_refuse_a_model_a_policy_denies(
    start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway("policies:\n  - {name: no-gpt-4, scope: key, models: {deny: ['gpt-4*']}}\n")
    status, body, _ = await post_count(gateway, "/v1/tokens/count", {"model": "gpt-4", "messages": HI})
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")
    assert body["error"]["message"] == "Policy 'no-gpt-4' does not allow model `gpt-4` for this key."


async def test_counts_are_charged_as_requests_never_as_tokens(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        "policies:\n"
        "  - {name: per-key, scope: key, limits: [{requests: 3, per: minute}, {tokens: 50, per: minute}]}\n"
    )
    # 204 tokens: more than the token limit, which counting neither checks nor charges.
    long = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * 196}]}
    remaining = []
    for _ in range(2):
        status, body, headers = await post_count(gateway, "/v1/tokens/count", long)
        assert (status, body["prompt_tokens"]) == (200, 204)
        remaining.append(headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1"]
    assert "x-ratelimit-remaining-tokens" not in headers
    # The third request of the minute goes upstream: 8 + 5 tokens fit in 50.
    answer = await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    assert answer.choices
    status, body, headers = await post_count(
        gateway, "/v1/messages/count_tokens", {**long, "model": "claude-sonnet"}
    )
    assert status == 429
    assert (body["type"], body["error"]["type"]) == ("error", "rate_limit_error")
    status, body, headers = await post_count(gateway, "/v1/tokens/count", long)
    assert (status, body["error"]["code"], body["error"]["type"]) == (429, "rate_limit_exceeded", "requests")
    assert headers["x-ratelimit-limit-name"] == "requests_per_minute"
    assert len(fake_upstream.requests) == 1


async def test_a_count_gives_back_its_place_in_flight(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway("policies:\n  - {name: lanes, scope: user, limits: [{concurrent: 1}]}\n")
    for path, model in [
        ("/v1/tokens/count", "gpt-4o-mini"),
        ("/v1/messages/count_tokens", "claude-sonnet"),
    ] * 2:
        status, _, _ = await post_count(gateway, path, {"model": model, "messages": HI})
        assert status == 200
    # Even after a count that fails once admitted: 'prompt' must be a string or a list.
    status, body, _ = await post_count(gateway, "/v1/tokens/count", {"model": "gpt-4o-mini", "prompt": 5})
    assert (status, body["error"]["param"]) == (400, "prompt")
    answer = await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    assert answer.choices
