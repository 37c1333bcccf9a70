"""gateway.yaml is read once into typed objects; mistakes name file, key path and problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.quota.policy import load_policies

REPO = Path(__file__).resolve().parents[1]
MINIMAL = "providers:\n  mock: {type: mock}\nmodels:\n  m: {provider: mock}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_shipped_config_is_the_embedded_default_with_the_mock_provider() -> None:
    config = load_config(REPO / "gateway.yaml")
    assert config.backends.redis is None and config.backends.postgres is None
    assert config.backends.sqlite.path == REPO / "var" / "gateway.db"
    assert {model.provider for model in config.models.values()} == {"mock"}
    assert config.providers["mock"].type == "mock"
    assert load_policies(tuple(sorted(REPO.glob(config.quota.policy_glob)))).policies


def test_defaults_fill_what_is_left_out(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.models["m"].upstream_model == "m"
    assert config.quota.default_max_completion_tokens == 4096
    assert config.keys == ()
    assert config.providers["mock"].max_connections == 0


def test_environment_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_PORT", "9123")
    monkeypatch.setenv("GW_TEST_REDIS", "redis://example.invalid:6379/2")
    monkeypatch.delenv("GW_TEST_UNSET", raising=False)
    text = (
        MINIMAL
        + "server: {port: '${GW_TEST_PORT}', host: '${GW_TEST_UNSET:-0.0.0.0}'}\n"
        + "backends:\n  redis: {url: '${GW_TEST_REDIS}'}\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.server.port == 9123
    assert config.server.host == "0.0.0.0"
    assert config.backends.redis is not None
    assert config.backends.redis.url == "redis://example.invalid:6379/2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            MINIMAL + "server: {port: '${GW_TEST_UNSET}'}\n",
            "server.port: environment variable GW_TEST_UNSET is not set",
        ),
        (MINIMAL + "server: {prot: 8080}\n", "server.prot: unknown key"),
        (MINIMAL + "server: {port: eighty}\n", "server.port: expected an integer"),
        (MINIMAL + "server: {port: -1}\n", "server.port: must be at least 0, got -1"),
        (
            "providers:\n  mock: {type: mock, max_connections: -5}\nmodels:\n  m: {provider: mock}\n",
            "providers.mock.max_connections: must be at least 0, got -5",
        ),
        ("models:\n  m: {provider: mock}\n", "providers: is required"),
        (
            "providers:\n  mock: {type: mock}\nmodels:\n  m: {provider: nope}\n",
            "models.m.provider: no provider named 'nope'",
        ),
        (
            "providers:\n  x: {type: carrier-pigeon}\nmodels: {}\n",
            "providers.x.type: must be one of anthropic, azure, mock, openai",
        ),
        (
            MINIMAL + "keys:\n  - {id: k, sha256: abc, user: u}\n",
            "keys[0].sha256: must be the 64-hex-digit SHA-256",
        ),
        (MINIMAL + "keys:\n  - {id: k, sha256: '" + "a" * 64 + "'}\n", "keys[0].user: is required"),
        (MINIMAL + "backends:\n  redis: {}\n", "backends.redis.url: is required"),
        (
            MINIMAL + "quota: {default_max_completion_tokens: 0}\n",
            "quota.default_max_completion_tokens: must be at least 1",
        ),
        (
            "providers:\n  p: {type: openai, base_url: 'http://p', proxy: 'socks5://x:1'}\nmodels: {}\n",
            'providers.p.proxy: must be an http:// or https:// proxy URL, or "direct"',
        ),
        (
            "providers:\n  p: {type: openai, base_url: 'http://p', tls: {ca_file: /nonexistent/ca.pem}}\nmodels: {}\n",
            "providers.p.tls.ca_file: /nonexistent/ca.pem is not a readable file",
        ),
        (
            "providers:\n  p: {type: openai, base_url: 'http://p', tls: {cafile: x}}\nmodels: {}\n",
            "providers.p.tls.cafile: unknown key",
        ),
        (
            "providers:\n  p: {type: openai, base_url: 'http://p', addresses: [10.0.0.1, nope]}\nmodels: {}\n",
            "providers.p.addresses[1]: must be an IPv4 or IPv6 address",
        ),
        (
            "providers:\n  p: {type: openai, base_url: 'http://p', max_response_bytes: 10}\nmodels: {}\n",
            "providers.p.max_response_bytes: must be at least 1024, got 10",
        ),
        ("providers: [1, 2\n", "invalid YAML at line"),
        ("- just\n- a list\n", "expected a mapping, got a list"),
    ],
)
def test_invalid_configs_name_the_key_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.delenv("GW_TEST_UNSET", raising=False)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert re.match(rf"{re.escape(str(path))}(:\d+)?: ", str(caught.value))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "policies:\n  - {name: a, scope: planet, limits: [{tokens: 1, per: minute}]}\n",
            "policies[0].scope: must be one of key, team, user",
        ),
        (
            "policies:\n  - {name: a, scope: user, limits: []}\n",
            "policies[0].limits: a policy needs at least one limit",
        ),
        (
            "policies:\n  - {name: a, scope: user, limits: [{tokens: 5, requests: 1, per: minute}]}\n",
            "policies[0].limits[0]: a limit names exactly one of",
        ),
        (
            "policies:\n  - {name: a, scope: user, limits: [{tokens: 0, per: minute}]}\n",
            "policies[0].limits[0].tokens: must be at least 1",
        ),
        (
            "policies:\n  - {name: a, scope: user, limits: [{tokens: 5, per: minute}]}\n"
            "  - {name: a, scope: team, limits: [{tokens: 5, per: minute}]}\n",
            "policies[1].name: policy 'a' is already defined",
        ),
    ],
)
def test_invalid_policies_name_the_key_path(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policies((path,))
    assert message in str(caught.value)
    assert re.match(rf"{re.escape(str(path))}:[23]: ", str(caught.value))


def test_production_example_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://redis.internal:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://gateway:secret@db.internal:5432/gateway")
    config = load_config(REPO / "deploy" / "gateway.production.yaml")
    assert config.backends.redis is not None and config.backends.postgres is not None
    assert config.providers["openai"].api_key_env == "OPENAI_API_KEY"
    assert {model.provider for model in config.models.values()} == {"openai"}


LLAMA_FILE = "llama_models/llama3/tokenizer.model"


def test_tokenizer_rules_and_bpe_files_from_config(tmp_path: Path) -> None:
    from importlib import resources

    from gateway.tokens import TokenizerRegistry
    from gateway.tokens.chat import count_chat
    from gateway.tokens.llama import LLAMA3_PATTERN

    model_file = Path(str(resources.files("llama_models").joinpath("llama3/tokenizer.model")))
    (tmp_path / "house.model").write_bytes(model_file.read_bytes())
    text = MINIMAL + (
        "tokens:\n"
        "  fallback: cl100k_base\n"
        "  bpe_files:\n"
        "    house:\n"
        "      path: house.model\n"
        f"      pattern: {LLAMA3_PATTERN!r}\n"
        "      special_tokens: ['<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',\n"
        "        '<|reserved_special_token_1|>', '<|finetune_right_pad_id|>', '<|step_id|>',\n"
        "        '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>', '<|python_tag|>',\n"
        "        '<|image|>']\n"
        "      reserved_special_tokens: 256\n"
        "  rules:\n"
        "    - {models: 'house-*', tokenizer: house, chat_format: llama3, exact: true}\n"
        "    - {models: [gpt-4o*], tokenizer: cl100k_base, factor: 1.5}\n"
    )
    config = load_config(write(tmp_path, text))
    registry = TokenizerRegistry(config.tokens)
    house, builtin = registry.profile("house-7b"), registry.profile("llama-3-8b")
    assert (house.tokenizer.name, house.chat_format, house.exact) == ("house", "llama3", True)
    body = {"messages": [{"role": "user", "content": "Bonjour, 世界"}]}
    assert count_chat(body, house, (1, 1)) == count_chat(body, builtin, (1, 1))
    # A user rule comes before the built-in ones; unknown models take the fallback.
    assert (registry.profile("gpt-4o").tokenizer.name, registry.profile("gpt-4o").factor) == (
        "cl100k_base",
        1.5,
    )
    assert (registry.profile("unknown-model").tokenizer.name, registry.profile("unknown-model").exact) == (
        "cl100k_base",
        False,
    )


def test_a_missing_tokenizer_stops_start_up(tmp_path: Path) -> None:
    from gateway.app import create_app

    text = (
        "providers:\n  mock: {type: mock}\nmodels:\n  m: {provider: mock, upstream_model: house-1}\n"
        "tokens:\n  bpe_files:\n    house: {path: missing.model, pattern: 'x'}\n"
        "  rules:\n    - {models: 'house-*', tokenizer: house}\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        create_app(load_config(path))
    assert str(caught.value).startswith(f"{path}: models.m: cannot load BPE file")


def test_errors_point_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "policies:\n"
        "  - name: fine\n"
        "    scope: user\n"
        "    limits:\n"
        "      - {requests: 5, per: minute}\n"
        "  - name: broken\n"
        "    scope: user\n"
        "    limits:\n"
        "      - tokens: 10\n"
        "        per: fortnight\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_policies((path,))
    assert caught.value.line == 10
    assert str(caught.value) == (
        f"{path}:10: policies[1].limits[0].per: must be one of day, hour, minute, month, second; got 'fortnight'"
    )
