"""The request-path counter: message cache, worker threads, calibration."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from gateway.config import TokensConfig
from gateway.metrics import Metrics
from gateway.tokens import Calibration, PromptCounter, TokenizerRegistry
from gateway.tokens.chat import count_chat


def make_counter(**settings: Any) -> PromptCounter:
    config = TokensConfig(**settings)
    return PromptCounter(TokenizerRegistry(config), Calibration(config, Metrics()))


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a patient tutor. " * 20}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: why is the sky blue? " * 10})
        messages.append({"role": "assistant", "content": f"Answer {turn}: Rayleigh scattering. " * 10})
    return messages


async def test_growing_conversation_counts_only_its_new_messages() -> None:
    counter = make_counter()
    profile = counter.registry.profile("gpt-4o")
    for turns in range(1, 51):
        body = {"messages": conversation(turns)}
        counted = await counter.count("chat", body, profile, 1000)
        uncached = count_chat(body, profile, (1024, 1024))
        assert (counted.tokens, counted.exact) == (uncached.tokens, True)
    # 50 turns resend 1 + 2 + ... messages; only 1 + 2 x 50 distinct ones were encoded.
    assert counter.cache.misses == 1 + 2 * 50
    assert counter.cache.hits == sum(1 + 2 * turns for turns in range(1, 51)) - counter.cache.misses


async def test_the_cache_never_takes_one_message_for_another() -> None:
    counter = make_counter()
    profile = counter.registry.profile("gpt-4o")
    lookalikes = [
        {"role": "user", "content": "one two three"},
        {"role": "user", "content": "one two three", "name": "bob"},  # a name costs tokens
        {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
        {"role": "use", "content": "rone two three"},  # same bytes if role and content ran together
        {"role": "user", "content": "one two three four"},
    ]
    for _ in range(2):  # the second pass is served from the cache
        for message in lookalikes:
            body = {"messages": [message]}
            counted = await counter.count("chat", body, profile, 100)
            assert counted.tokens == count_chat(body, profile, (1024, 1024)).tokens, message
    assert (counter.cache.misses, counter.cache.hits) == (5, 5)


async def test_large_bodies_are_counted_in_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = make_counter(thread_threshold_bytes=1000)
    profile = counter.registry.profile("gpt-4o")
    threads: list[str] = []
    original = counter.count_raw

    def spy(route: str, body: Any, prof: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(route, body, prof)

    monkeypatch.setattr(counter, "count_raw", spy)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    await counter.count("chat", body, profile, 999)
    await counter.count("chat", body, profile, 1001)
    assert threads[0] == threading.main_thread().name
    assert threads[1] != threading.main_thread().name


def test_calibration_moves_toward_the_providers_counts() -> None:
    metrics = Metrics()
    config = TokensConfig(apply_calibration=True, calibration_min_samples=5)
    counter = PromptCounter(TokenizerRegistry(config), Calibration(config, metrics))
    profile = counter.registry.profile("claude-sonnet-4-5")
    calibration = counter.calibration
    # Before learning: the configured starting factor for Claude.
    assert calibration.factor(profile) == pytest.approx(1.15)
    # The provider bills 1.3x what o200k_base counts.
    reserved = []
    for raw in (100, 200, 300, 400, 500, 600, 700, 800):
        count = counter.finish(count_raw := _raw(raw), profile, "messages")
        reserved.append(count.tokens)
        calibration.observe(profile, count.tokens, count_raw.tokens, int(raw * 1.3))
    learned = calibration.learned("claude-sonnet-4-5")
    assert learned is not None
    assert learned[1] == 8
    assert learned[0] == pytest.approx(1.3, rel=1e-3)
    # Used from the sixth request on (min samples 5): 600 x 1.3 = 780.
    assert reserved[:5] == [115, 230, 345, 460, 575]
    assert reserved[5:] == [780, 910, 1040]
    samples = {
        (s.name, tuple(s.labels.items())): s.value for f in metrics.registry.collect() for s in f.samples
    }
    assert samples[("gateway_prompt_calibration_ratio", (("model", "claude-sonnet-4-5"),))] == pytest.approx(
        1.3
    )
    assert samples[("gateway_prompt_estimate_error_ratio_count", (("model", "claude-sonnet-4-5"),))] == 8


def test_exact_models_are_never_scaled_but_their_error_is_measured() -> None:
    counter = make_counter(apply_calibration=True, calibration_min_samples=1)
    profile = counter.registry.profile("gpt-4o")
    counter.calibration.observe(profile, 100, 100, 150)
    assert counter.calibration.factor(profile) == 1.0
    assert counter.calibration.learned("gpt-4o") is None


def _raw(tokens: int) -> Any:
    from gateway.tokens import RawCount

    return RawCount(tokens, False)
