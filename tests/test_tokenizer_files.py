"""Tokenizer files: read only from the cache, fetched only by `gateway tokenizers fetch`.

Nothing here reaches the network: the mirror is an aiohttp server in the test serving the
genuine files copied from the shared tiktoken cache, and every gateway process started
here has its HTTP(S) proxy set to a closed local port, so that a download attempt by
mistake would fail on this machine instead of leaving it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import TokensConfig, load_config
from gateway.tokens import TokenizerFilesMissing, TokenizerRegistry
from gateway.tokens.fetch import fetch_encoding_files
from gateway.tokens.files import CL100K_BASE, ENCODING_FILES, O200K_BASE

SHARED_CACHE = Path(os.environ["TIKTOKEN_CACHE_DIR"])
SENTENCE = "Hello, world! 日本語 🙂 <|endoftext|> 12345"
HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello, world!"}]}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def offline_env(cache_dir: Path) -> dict[str, str]:
    """The environment of a gateway process that can reach nothing beyond this machine."""
    nowhere = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("NO_PROXY", "TIKTOKEN_CACHE_DIR")}
    return env | {
        "TIKTOKEN_CACHE_DIR": str(cache_dir),
        "HTTPS_PROXY": nowhere,
        "HTTP_PROXY": nowhere,
        "https_proxy": nowhere,
        "http_proxy": nowhere,
    }


def gateway(
    *args: str, cache_dir: Path, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=offline_env(cache_dir),
        cwd=cwd,
    )


def write_config(folder: Path, extra: str = "") -> Path:
    path = folder / "gateway.yaml"
    path.write_text(
        "providers:\n"
        "  mock: {type: mock}\n"
        "models:\n"
        "  gpt-4o: {provider: mock}\n"
        "  llama: {provider: mock, upstream_model: meta-llama/Llama-3.1-8B-Instruct}\n"
        "tokens:\n"
        "  cache_dir: tokenizers\n" + extra
    )
    return path


def assert_one_clear_line(result: subprocess.CompletedProcess[str], cache_dir: Path) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"gateway: tokenizer files missing or damaged in {cache_dir}: ")
    assert f"Run `gateway tokenizers fetch --cache-dir {cache_dir}`" in lines[0]


# ---------------------------------------------------------------- the files


def test_names_and_digests_are_tiktokens_own() -> None:
    for spec in ENCODING_FILES.values():
        # tiktoken names a cache entry by the SHA-1 of its address: the shared cache,
        # which tiktoken itself reads in every test, holds the files under these names.
        assert spec.cache_name == hashlib.sha1(spec.url.encode()).hexdigest()
        contents = (SHARED_CACHE / spec.cache_name).read_bytes()
        assert hashlib.sha256(contents).hexdigest() == spec.sha256
    assert (CL100K_BASE.cache_name, O200K_BASE.cache_name) == (
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "fb374d419588a4632f3f557e76b4b70aebbca790",
    )
    assert (CL100K_BASE.file_name, O200K_BASE.file_name) == ("cl100k_base.tiktoken", "o200k_base.tiktoken")


@pytest.mark.parametrize("name", sorted(ENCODING_FILES))
def test_encodings_built_from_the_cache_are_tiktokens(name: str) -> None:
    ours = TokenizerRegistry(TokensConfig(cache_dir=SHARED_CACHE)).tokenizer(name).encoding
    theirs = tiktoken.get_encoding(name)
    assert (ours._pat_str, ours._special_tokens, ours.n_vocab) == (
        theirs._pat_str,
        theirs._special_tokens,
        theirs.n_vocab,
    )
    assert ours.encode(SENTENCE, allowed_special="all") == theirs.encode(SENTENCE, allowed_special="all")


def test_an_empty_cache_is_a_clear_error_and_no_download(tmp_path: Path) -> None:
    registry = TokenizerRegistry(TokensConfig(cache_dir=tmp_path))
    for model in ("gpt-4o", "gpt-4", "claude-sonnet-4-5", "llama-2", "anything"):
        with pytest.raises(TokenizerFilesMissing) as caught:
            registry.profile(model)
        assert caught.value.cache_dir == tmp_path
        assert "gateway tokenizers fetch" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_file_is_refused_not_replaced(tmp_path: Path) -> None:
    damaged = (SHARED_CACHE / O200K_BASE.cache_name).read_bytes().replace(b" 1000\n", b" 1001\n", 1)
    (tmp_path / O200K_BASE.cache_name).write_bytes(damaged)
    with pytest.raises(TokenizerFilesMissing) as caught:
        TokenizerRegistry(TokensConfig(cache_dir=tmp_path)).tokenizer("o200k_base")
    digest = hashlib.sha256(damaged).hexdigest()
    assert caught.value.problems == [
        f"o200k_base ({O200K_BASE.cache_name}) has sha256 {digest}, not OpenAI's {O200K_BASE.sha256}"
    ]
    assert (tmp_path / O200K_BASE.cache_name).read_bytes() == damaged


def test_cache_dir_from_config_env_or_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path)
    assert load_config(config).tokens.cache_dir == tmp_path / "tokenizers"
    bare = tmp_path / "bare.yaml"
    bare.write_text("providers:\n  mock: {type: mock}\nmodels:\n  m: {provider: mock}\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/srv/tiktoken")
    assert load_config(bare).tokens.cache_dir == Path("/srv/tiktoken")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    assert load_config(bare).tokens.cache_dir == tmp_path / "var" / "tokenizers"


# ---------------------------------------------------------------- fetching


def mirror(files: dict[str, bytes]) -> web.Application:
    """A mirror of the official folder: /encodings/<name>.tiktoken."""
    app = web.Application()

    async def serve(request: web.Request) -> web.Response:
        body = files.get(request.match_info["name"])
        return web.Response(body=body) if body is not None else web.Response(status=404)

    app.router.add_get("/encodings/{name}", serve)
    return app


def genuine_files() -> dict[str, bytes]:
    return {spec.file_name: (SHARED_CACHE / spec.cache_name).read_bytes() for spec in ENCODING_FILES.values()}


async def test_fetch_from_a_mirror_checks_every_file(tmp_path: Path) -> None:
    files = genuine_files()
    # A mirror serving a wrong cl100k_base: refused, nothing written for it.
    files["cl100k_base.tiktoken"] = files["cl100k_base.tiktoken"][:-100]
    cache = tmp_path / "cache"
    async with TestServer(mirror(files)) as server:
        outcomes = await fetch_encoding_files(cache, str(server.make_url("/encodings/")))
        wrong = hashlib.sha256(files["cl100k_base.tiktoken"]).hexdigest()
        base = str(server.make_url("/encodings"))
        assert [(o.encoding, o.status, o.detail) for o in outcomes] == [
            (
                "cl100k_base",
                "failed",
                f"{base}/cl100k_base.tiktoken has sha256 {wrong}, not OpenAI's {CL100K_BASE.sha256}: "
                "not written",
            ),
            (
                "o200k_base",
                "fetched",
                f"{base}/o200k_base.tiktoken -> {cache / O200K_BASE.cache_name} (sha256 checked)",
            ),
        ]
        assert sorted(path.name for path in cache.iterdir()) == [O200K_BASE.cache_name]
        # Once the mirror is right, only what is missing is fetched.
        files["cl100k_base.tiktoken"] = genuine_files()["cl100k_base.tiktoken"]
        again = await fetch_encoding_files(cache, base)
        assert [(o.encoding, o.status) for o in again] == [
            ("cl100k_base", "fetched"),
            ("o200k_base", "present"),
        ]
        missing = await fetch_encoding_files(tmp_path / "other", str(server.make_url("/nothing")))
        assert {o.status for o in missing} == {"failed"}
        assert "HTTP 404" in missing[0].detail
    assert sorted(path.name for path in cache.iterdir()) == sorted(
        s.cache_name for s in ENCODING_FILES.values()
    )
    # What was fetched is what the gateway then loads.
    registry = TokenizerRegistry(TokensConfig(cache_dir=cache))
    assert registry.tokenizer("o200k_base").encode(SENTENCE) == tiktoken.get_encoding("o200k_base").encode(
        SENTENCE, disallowed_special=()
    )


async def test_fetch_command_from_a_mirror_then_check_finds_them(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cache = tmp_path / "tokenizers"
    async with TestServer(mirror(genuine_files())) as server:
        base = str(server.make_url("/encodings"))
        env = offline_env(tmp_path / "unused")
        # The mirror is on this machine: no proxy in the way to it.
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "tokenizers",
            "fetch",
            "--config",
            str(config),
            "--from",
            base,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()
    assert lines[:3] == [
        f"tokenizer cache: {cache}",
        f"cl100k_base: fetched: {base}/cl100k_base.tiktoken -> {cache / CL100K_BASE.cache_name} (sha256 checked)",
        f"o200k_base: fetched: {base}/o200k_base.tiktoken -> {cache / O200K_BASE.cache_name} (sha256 checked)",
    ]
    assert lines[3:] == [
        "llama3: Meta's file from llama-models, sha256 checked",
        "llama4: Meta's file from llama-models, sha256 checked",
    ]
    check = gateway("check", "--config", str(config), cache_dir=tmp_path / "unused")
    assert check.returncode == 0, check.stderr


def test_fetch_command_from_a_local_folder(tmp_path: Path) -> None:
    # A copy of a tiktoken cache (files under their cache names) ...
    from_cache = gateway(
        "tokenizers",
        "fetch",
        "--cache-dir",
        str(tmp_path / "a"),
        "--from",
        str(SHARED_CACHE),
        cache_dir=tmp_path,
    )
    assert from_cache.returncode == 0, from_cache.stdout + from_cache.stderr
    assert from_cache.stdout.count(": fetched: ") == 2
    # ... or the files under their own names, as downloaded by hand.
    folder = tmp_path / "downloads"
    folder.mkdir()
    for name, contents in genuine_files().items():
        (folder / name).write_bytes(contents)
    by_name = gateway(
        "tokenizers", "fetch", "--cache-dir", str(tmp_path / "b"), "--from", str(folder), cache_dir=tmp_path
    )
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    assert f"o200k_base: fetched: {folder / 'o200k_base.tiktoken'} -> " in by_name.stdout
    for target in ("a", "b"):
        assert sorted(p.name for p in (tmp_path / target).iterdir()) == sorted(
            s.cache_name for s in ENCODING_FILES.values()
        )
    present = gateway(
        "tokenizers", "fetch", "--cache-dir", str(tmp_path / "b"), "--from", str(folder), cache_dir=tmp_path
    )
    assert present.stdout.count(": present: already in ") == 2
    # A folder without them: exit 1, each failure on its line, nothing written.
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = gateway(
        "tokenizers", "fetch", "--cache-dir", str(tmp_path / "c"), "--from", str(empty), cache_dir=tmp_path
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert (
        f"o200k_base: failed: cannot fetch {empty / 'o200k_base.tiktoken'}: No such file or directory"
        in failed.stdout
    )
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- every command says the fix


def test_serve_without_tokenizer_files_says_how_to_fetch_them(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = gateway(
        "serve", "--config", str(config), "--port", str(closed_port()), cache_dir=tmp_path / "env"
    )
    assert_one_clear_line(result, tmp_path / "tokenizers")
    # With workers, the supervisor says it once, before starting any.
    (tmp_path / "workers").mkdir()
    workers = write_config(tmp_path / "workers", "server:\n  workers: 2\n")
    result = gateway(
        "serve", "--config", str(workers), "--port", str(closed_port()), cache_dir=tmp_path / "env"
    )
    assert_one_clear_line(result, tmp_path / "workers" / "tokenizers")


def test_check_tokens_count_and_doctor_without_tokenizer_files(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cache = tmp_path / "tokenizers"
    assert_one_clear_line(gateway("check", "--config", str(config), cache_dir=cache), cache)
    counted = gateway("tokens", "count", "--config", str(config), stdin=json.dumps(HELLO), cache_dir=cache)
    assert_one_clear_line(counted, cache)
    # Without a gateway.yaml, the cache is $TIKTOKEN_CACHE_DIR.
    bare = gateway(
        "tokens", "count", "--config", "/nonexistent.yaml", stdin=json.dumps(HELLO), cache_dir=cache
    )
    assert_one_clear_line(bare, cache)
    doctor = gateway("doctor", "--json", "--config", str(config), cache_dir=cache)
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr
    check = next(c for c in json.loads(doctor.stdout) if c["name"] == "tokenizers")
    assert check["status"] == "fail"
    assert check["detail"] == (
        f"cl100k_base is missing ({CL100K_BASE.cache_name}); o200k_base is missing ({O200K_BASE.cache_name})"
    )
    assert check["fix"] == (
        f"Run `gateway tokenizers fetch --cache-dir {cache}` (without internet access, add --from MIRROR_URL "
        "or --from DIR holding the files; see docs/token-counting.md)"
    )


def test_doctor_says_why_each_model_is_exact_or_estimated(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    text = config.read_text().replace(
        "models:\n", "models:\n  claude: {provider: mock, upstream_model: claude-3-5-sonnet-latest}\n"
    )
    config.write_text(text)
    (tmp_path / "tokenizers").symlink_to(SHARED_CACHE)
    result = gateway("doctor", "--json", "--config", str(config), cache_dir=tmp_path / "unused")
    check = next(c for c in json.loads(result.stdout) if c["name"] == "tokenizers")
    assert check["status"] == "ok", check
    assert check["facts"]["reasons"] == {
        "claude": "estimate: Claude's tokenizer is not public",
        "gpt-4o": "exact: OpenAI's tokenizer and published counting rule",
        "llama": "exact: Meta's Llama 3 tokenizer (llama-models)",
    }
