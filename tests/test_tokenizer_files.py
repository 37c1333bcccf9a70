"""Tokenizer files: read only from the cache, fetched only by `gateway tokenizers fetch`.

Nothing here reaches the network: the mirror is an aiohttp server in the test serving the
genuine files copied from the shared tiktoken cache, and every gateway process started
here has its HTTP(S) proxy set to a closed local port, so that a download attempt by
mistake would fail on this machine instead of leaving it.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import regex
import tiktoken
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext import openai_public

from gateway.config import TokensConfig, load_config
from gateway.tokens import TokenizerFilesMissing, TokenizerRegistry
from gateway.tokens.fetch import encodings_to_fetch, fetch_encoding_files
from gateway.tokens.files import (
    CL100K_BASE,
    ENCODING_FILES,
    GPT2,
    O200K_BASE,
    P50K_BASE,
    R50K_BASE,
    R50K_PATTERN,
    EncodingFile,
    require_cached,
)
from gateway.tokens.in_use import encodings_in_use
from gateway.tokens.runs import BOUNDARY
from tests.conftest import free_port, refused_port

SHARED_CACHE = Path(os.environ["TIKTOKEN_CACHE_DIR"])
# The encodings whose file the shared cache holds (o200k_harmony reads o200k_base's): the
# only ones tiktoken itself may be asked for here, since it would download any other.
IN_SHARED_CACHE = sorted(
    name for name, spec in ENCODING_FILES.items() if (SHARED_CACHE / spec.cache_name).exists()
)
SENTENCE = "Hello, world! 日本語 🙂 <|endoftext|> 12345"
HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello, world!"}]}


def offline_env(cache_dir: Path) -> dict[str, str]:
    """The environment of a gateway process that can reach nothing beyond this machine."""
    nowhere = f"http://127.0.0.1:{refused_port()}"
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
    assert IN_SHARED_CACHE == ["cl100k_base", "o200k_base", "o200k_harmony"]
    for name in IN_SHARED_CACHE:
        spec = ENCODING_FILES[name]
        # tiktoken names a cache entry by the SHA-1 of its address: the shared cache,
        # which tiktoken itself reads in every test, holds the files under these names.
        assert spec.cache_name == hashlib.sha1(spec.url.encode()).hexdigest()
        contents = (SHARED_CACHE / spec.cache_name).read_bytes()
        assert hashlib.sha256(contents).hexdigest() == spec.sha256
    assert {name: (spec.file_name, spec.cache_name) for name, spec in ENCODING_FILES.items()} == {
        "gpt2": ("r50k_base.tiktoken", "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"),
        "r50k_base": ("r50k_base.tiktoken", "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"),
        "p50k_base": ("p50k_base.tiktoken", "ec7223a39ce59f226a68acc30dc1af2788490e15"),
        "p50k_edit": ("p50k_base.tiktoken", "ec7223a39ce59f226a68acc30dc1af2788490e15"),
        "cl100k_base": ("cl100k_base.tiktoken", "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"),
        "o200k_base": ("o200k_base.tiktoken", "fb374d419588a4632f3f557e76b4b70aebbca790"),
        "o200k_harmony": ("o200k_base.tiktoken", "fb374d419588a4632f3f557e76b4b70aebbca790"),
    }
    assert list(ENCODING_FILES) == list(openai_public.ENCODING_CONSTRUCTORS)


def tiktokens_definition(name: str) -> dict[str, Any]:
    """tiktoken's own definition of an encoding, read from the source of its constructor in
    tiktoken_ext/openai_public.py without calling it (a call downloads the file): the
    strings it names (addresses, digests) and the values it returns other than the ranks."""
    module = ast.parse(inspect.getsource(openai_public))
    function = next(node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == name)
    assigned = {
        target.id: node.value
        for node in function.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    returned = next(node.value for node in function.body if isinstance(node, ast.Return))
    assert isinstance(returned, ast.Dict)
    definition: dict[str, Any] = {
        "strings": {
            node.value
            for node in ast.walk(function)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
    }
    for key, value in zip(returned.keys, returned.values, strict=True):
        assert isinstance(key, ast.Constant)
        if key.value == "mergeable_ranks":
            continue
        if isinstance(value, ast.Name) and value.id in assigned:
            value = assigned[value.id]
        # Only literals, the module's constants and "|".join: nothing that could load a file.
        calls = [node for node in ast.walk(value) if isinstance(node, ast.Call)]
        assert all(
            isinstance(call.func, ast.Attribute)
            and call.func.attr == "join"
            and isinstance(call.func.value, ast.Constant)
            for call in calls
        ), key.value
        definition[key.value] = eval(
            compile(ast.Expression(value), "<tiktoken>", "eval"), vars(openai_public)
        )
    return definition


@pytest.mark.parametrize("name", ["r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base"])
def test_each_encoding_is_defined_as_tiktoken_defines_it(name: str) -> None:
    spec, theirs = ENCODING_FILES[name], tiktokens_definition(name)
    assert {spec.url, spec.sha256} <= theirs["strings"]
    assert (spec.name, spec.pattern, spec.special_tokens) == (
        theirs["name"],
        theirs["pat_str"],
        theirs["special_tokens"],
    )


def test_gpt2_is_read_from_r50k_bases_file() -> None:
    # tiktoken's gpt2 reads GPT-2's two data-gym files; its maintainers found the ranks
    # equal to r50k_base's (openai/tiktoken#187). Everything else is the same too.
    theirs, r50k = tiktokens_definition("gpt2"), tiktokens_definition("r50k_base")
    assert (theirs["pat_str"], theirs["special_tokens"], theirs["explicit_n_vocab"]) == (
        r50k["pat_str"],
        r50k["special_tokens"],
        r50k["explicit_n_vocab"],
    )
    assert (GPT2.url, GPT2.sha256, GPT2.pattern, GPT2.special_tokens) == (
        R50K_BASE.url,
        R50K_BASE.sha256,
        theirs["pat_str"],
        theirs["special_tokens"],
    )


@pytest.mark.parametrize("name", IN_SHARED_CACHE)
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
    """The official files the shared cache holds, under their names on a mirror."""
    return {
        spec.file_name: (SHARED_CACHE / spec.cache_name).read_bytes()
        for spec in map(ENCODING_FILES.get, IN_SHARED_CACHE)
        if spec is not None
    }


DEFAULT_CACHE_NAMES = sorted((CL100K_BASE.cache_name, O200K_BASE.cache_name))


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
    assert sorted(path.name for path in cache.iterdir()) == DEFAULT_CACHE_NAMES
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
    # A copy of a tiktoken cache (files under their cache names) ... (run where there is
    # no gateway.yaml, whose models would add their encodings)
    from_cache = gateway(
        "tokenizers",
        "fetch",
        "--cache-dir",
        str(tmp_path / "a"),
        "--from",
        str(SHARED_CACHE),
        cache_dir=tmp_path,
        cwd=tmp_path,
    )
    assert from_cache.returncode == 0, from_cache.stdout + from_cache.stderr
    assert from_cache.stdout.count(": fetched: ") == 2
    # ... or the files under their own names, as downloaded by hand.
    folder = tmp_path / "downloads"
    folder.mkdir()
    for name, contents in genuine_files().items():
        (folder / name).write_bytes(contents)
    by_name = gateway(
        "tokenizers",
        "fetch",
        "--cache-dir",
        str(tmp_path / "b"),
        "--from",
        str(folder),
        cache_dir=tmp_path,
        cwd=tmp_path,
    )
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    assert f"o200k_base: fetched: {folder / 'o200k_base.tiktoken'} -> " in by_name.stdout
    for target in ("a", "b"):
        assert sorted(p.name for p in (tmp_path / target).iterdir()) == DEFAULT_CACHE_NAMES
    present = gateway(
        "tokenizers",
        "fetch",
        "--cache-dir",
        str(tmp_path / "b"),
        "--from",
        str(folder),
        cache_dir=tmp_path,
        cwd=tmp_path,
    )
    assert present.stdout.count(": present: already in ") == 2
    # A folder without them: exit 1, each failure on its line, nothing written.
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = gateway(
        "tokenizers",
        "fetch",
        "--cache-dir",
        str(tmp_path / "c"),
        "--from",
        str(empty),
        cache_dir=tmp_path,
        cwd=tmp_path,
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
    result = gateway("serve", "--config", str(config), "--port", str(free_port()), cache_dir=tmp_path / "env")
    assert_one_clear_line(result, tmp_path / "tokenizers")
    # With workers, the supervisor says it once, before starting any.
    (tmp_path / "workers").mkdir()
    workers = write_config(tmp_path / "workers", "server:\n  workers: 2\n")
    result = gateway(
        "serve", "--config", str(workers), "--port", str(free_port()), cache_dir=tmp_path / "env"
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
    # Only the file its models use (gpt-4o, and the fallback for Llama without its extra).
    assert check["detail"] == f"o200k_base is missing ({O200K_BASE.cache_name})"
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


# ---------------------------------------------------------------- every encoding tiktoken knows

P50K_CONFIG_MODEL = "  davinci: {provider: mock, upstream_model: text-davinci-003, tokenizer: p50k_base}\n"


def synthetic_p50k_base() -> tuple[EncodingFile, bytes]:
    """A stand-in for p50k_base's file, which no test may download and the shared cache
    lacks: the 256 bytes and the merges of "hello", under p50k_base's name and address
    with a digest of its own."""
    tokens = [bytes([byte]) for byte in range(256)] + [b"he", b"ll", b"hell", b"hello"]
    contents = b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens))
    spec = EncodingFile(
        name="p50k_base",
        url=P50K_BASE.url,
        sha256=hashlib.sha256(contents).hexdigest(),
        pattern=R50K_PATTERN,
        special_tokens={"<|endoftext|>": 260},
    )
    return spec, contents


def test_only_the_encodings_a_configuration_uses_are_asked_for(tmp_path: Path) -> None:
    # gpt-4o's, and the fallback's (which Llama would use without its extra).
    assert encodings_in_use(load_config(write_config(tmp_path))) == ("o200k_base",)
    everything = tmp_path / "everything.yaml"
    everything.write_text(
        "providers:\n"
        "  mock: {type: mock}\n"
        "models:\n"
        "  gpt-4o: {provider: mock}\n"
        + P50K_CONFIG_MODEL
        + "  code: {provider: mock, upstream_model: code-cushman-001}\n"
        # The mock counts its replies to gpt-4 by the name alone: with cl100k_base.
        "  gpt-4: {provider: mock, tokenizer: p50k_edit}\n"
        "  oss:\n"
        "    tokenizer: o200k_harmony\n"
        "    deployments: [{provider: mock, upstream_model: gpt-oss-20b}]\n"
        "tokens:\n"
        "  fallback: gpt2\n"
        "  rules: [{models: code-*, tokenizer: r50k_base}]\n"
    )
    assert encodings_in_use(load_config(everything)) == (
        "gpt2",
        "r50k_base",
        "p50k_base",
        "p50k_edit",
        "cl100k_base",
        "o200k_base",
        "o200k_harmony",
    )


def test_check_and_serve_ask_only_for_the_files_the_models_use(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cache = tmp_path / "tokenizers"
    cache.mkdir()
    (cache / O200K_BASE.cache_name).symlink_to(SHARED_CACHE / O200K_BASE.cache_name)
    # Neither cl100k_base nor p50k_base: no model uses them.
    ok = gateway("check", "--config", str(config), cache_dir=tmp_path / "unused")
    assert ok.returncode == 0, ok.stderr
    config.write_text(config.read_text().replace("models:\n", "models:\n" + P50K_CONFIG_MODEL))
    expected = (
        f"gateway: tokenizer files missing or damaged in {cache}: p50k_base is missing "
        f"({P50K_BASE.cache_name}). Run `gateway tokenizers fetch --cache-dir {cache} --encoding p50k_base` "
        "(without internet access, add --from MIRROR_URL or --from DIR holding the files; see "
        "docs/token-counting.md)\n"
    )
    check = gateway("check", "--config", str(config), cache_dir=tmp_path / "unused")
    assert (check.returncode, check.stderr) == (1, expected)
    serve = gateway(
        "serve", "--config", str(config), "--port", str(free_port()), cache_dir=tmp_path / "unused"
    )
    assert (serve.returncode, serve.stderr) == (1, expected)


async def test_a_gateway_on_p50k_base_starts_with_that_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.doctor import Check, _tokenizers

    spec, contents = synthetic_p50k_base()
    monkeypatch.setitem(ENCODING_FILES, "p50k_base", spec)
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "providers:\n  mock: {type: mock}\nmodels:\n"
        + P50K_CONFIG_MODEL
        + "tokens:\n  cache_dir: tokenizers\n  fallback: p50k_base\n"
    )
    config = load_config(path)
    cache = tmp_path / "tokenizers"
    assert encodings_in_use(config) == ("p50k_base",)
    with pytest.raises(TokenizerFilesMissing) as caught:
        require_cached(cache, encodings_in_use(config))
    assert (caught.value.problems, caught.value.named_encodings) == (
        [f"p50k_base is missing ({P50K_BASE.cache_name})"],
        ("p50k_base",),
    )
    cache.mkdir()
    (cache / spec.cache_name).write_bytes(contents)
    # What serve and check ask before starting, then what start-up loads.
    require_cached(cache, encodings_in_use(config))
    profile = TokenizerRegistry(config.tokens).profile("text-davinci-003", "p50k_base")
    assert (profile.tokenizer.name, profile.exact, profile.reason) == (
        "p50k_base",
        False,
        "no built-in rule knows 'text-davinci-003'",
    )
    # "hello" and " " + "hello": the ranks above, merged as tiktoken merges them.
    assert profile.tokenizer.encode("hello hello") == [259, 32, 259]
    doctor = Check("tokenizers")
    await _tokenizers(doctor, config)
    assert (doctor.status, doctor.facts["models"]) == ("ok", {"davinci": "p50k_base (estimate)"})


async def test_fetch_gets_the_encodings_named_and_refuses_files_not_tiktokens(tmp_path: Path) -> None:
    fake = synthetic_p50k_base()[1]
    digest = hashlib.sha256(fake).hexdigest()
    files = genuine_files() | {"p50k_base.tiktoken": fake, "r50k_base.tiktoken": fake}
    cache = tmp_path / "cache"
    wanted = encodings_to_fetch(["p50k_edit", "gpt2"], ["p50k_base", "o200k_harmony"])
    assert wanted == ("gpt2", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base", "o200k_harmony")
    async with TestServer(mirror(files)) as server:
        base = str(server.make_url("/encodings"))
        outcomes = await fetch_encoding_files(cache, base, wanted)
    # One line per file, fetched once for every encoding that reads it.
    assert [(o.encoding, o.status, o.detail) for o in outcomes] == [
        (
            "gpt2",
            "failed",
            f"{base}/r50k_base.tiktoken has sha256 {digest}, not OpenAI's {R50K_BASE.sha256}: not written",
        ),
        (
            "p50k_base, p50k_edit",
            "failed",
            f"{base}/p50k_base.tiktoken has sha256 {digest}, not OpenAI's {P50K_BASE.sha256}: not written",
        ),
        (
            "cl100k_base",
            "fetched",
            f"{base}/cl100k_base.tiktoken -> {cache / CL100K_BASE.cache_name} (sha256 checked)",
        ),
        (
            "o200k_base, o200k_harmony",
            "fetched",
            f"{base}/o200k_base.tiktoken -> {cache / O200K_BASE.cache_name} (sha256 checked)",
        ),
    ]
    assert sorted(path.name for path in cache.iterdir()) == DEFAULT_CACHE_NAMES


async def test_fetch_command_adds_the_configs_encodings_and_those_named(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("models:\n", "models:\n" + P50K_CONFIG_MODEL))
    cache = tmp_path / "tokenizers"
    fake = synthetic_p50k_base()[1]
    digest = hashlib.sha256(fake).hexdigest()
    files = genuine_files() | {"p50k_base.tiktoken": fake}
    env = offline_env(tmp_path / "unused")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"

    async def fetch(*args: str) -> tuple[int | None, str, str]:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "tokenizers", "fetch", "--config", str(config), *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
        return process.returncode, stdout.decode(), stderr.decode()

    async with TestServer(mirror(files)) as server:
        base = str(server.make_url("/encodings"))
        status, stdout, stderr = await fetch("--from", base, "--encoding", "o200k_harmony")
        unknown = await fetch("--from", base, "--encoding", "p50k")
    assert status == 1 and "Traceback" not in stderr
    assert stdout.splitlines()[:4] == [
        f"tokenizer cache: {cache}",
        f"p50k_base: failed: {base}/p50k_base.tiktoken has sha256 {digest}, not OpenAI's {P50K_BASE.sha256}: "
        "not written",
        f"cl100k_base: fetched: {base}/cl100k_base.tiktoken -> {cache / CL100K_BASE.cache_name} (sha256 checked)",
        f"o200k_base, o200k_harmony: fetched: {base}/o200k_base.tiktoken -> {cache / O200K_BASE.cache_name} "
        "(sha256 checked)",
    ]
    assert unknown[0] == 2
    assert "argument --encoding: invalid choice: 'p50k' (choose from " in unknown[2]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [*"aZé日ア한", *" \t\n\r\xa0\u3000", *"'\u2019/!.,:-_()\"#", *"09²½", "'s", "\r\n", "🙂"]
        ),
        min_size=1,
        max_size=40,
    ).map("".join)
)
def test_run_boundaries_end_a_piece_of_r50k_bases_expression(text: str) -> None:
    # runs.py cuts a long run where every built-in expression ends a piece; gpt2, r50k_base,
    # p50k_base and p50k_edit share this one (o200k_harmony has o200k_base's).
    piece_ends = {match.end() for match in regex.finditer(R50K_PATTERN, text)}
    assert {match.end() for match in BOUNDARY.finditer(text)} <= piece_ends
