"""No gateway key in any log stream, whoever writes the line (issue 20, item 1).

aiohttp answers a malformed request line or header with a 400 whose text echoes the
offending line, and its `aiohttp.server` logger puts the same text, key included, into
the traceback of an ERROR "Error handling request" line. Every record now goes through
the redaction step of the handler `setup_logging` installs; these tests send a real key
in every malformed shape to a real `gateway serve` and search all it wrote.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.auth import generate_key
from gateway.logs import _KNOWN_FIELDS, JsonLinesHandler, TextHandler, log_request, setup_logging
from gateway.redact import MARKER, _looks_random, redact
from tests.conftest import PROVIDER_KEY, free_port
from tests.processes import wait_healthy


def hardest_key() -> str:
    """A key as `gateway keys create` makes them (gw- and 43 random characters), with a
    - or _ every 10: no run of 16 letters and digits in it looks random to redact(),
    only its gw- prefix gives it away (so one in 25 real keys)."""
    body = list(generate_key().removeprefix("gw-"))
    for position in (10, 21, 32):
        body[position] = "-_"[position % 2]
    return "gw-" + "".join(body)


KEY = hardest_key()
K = KEY.encode()
HEAD = b"Host: gateway\r\nConnection: close\r\n"


def leaked_forms(key: str) -> list[str]:
    """The key, its hex and base64 forms, and every 16 characters of it."""
    forms = [key, key.encode().hex(), base64.b64encode(key.encode()).decode()]
    forms.append(base64.b64encode(f"alice:{key}".encode()).decode())
    return forms + [key[i : i + 16] for i in range(len(key) - 15)]


@pytest.mark.parametrize(
    "quoted",
    [
        f"b'HostConnection{KEY}AAAAAAAAAAAAAAAAAAAAAAAAA...'",  # llhttp's names, run together
        f"{KEY.upper()} /v1/models HTTP/1.1",  # a method, as aiohttp's Python parser writes it
        f"b'HostConnectionX-{KEY}AAAAAAAAAAAAAAAAAAAAAAAAA...'",
        f"b'x-api-key: {KEY}\\x00'",
        f"b' {KEY}'",  # obs-fold: the continuation line alone
        f"/v1/models?api_key={KEY}\x00",
        f"b'Cookie: session={KEY}\\x0b'",
    ],
    # Named, not shown: the key is random, and test ids must be the same in every process.
    ids=["llhttp-names", "method", "prefixed-name", "header", "obs-fold", "query", "cookie"],
)
def test_redact_finds_the_key_in_what_aiohttp_quotes(quoted: str) -> None:
    assert not _looks_random(KEY.removeprefix("gw-"))  # only the prefix gives it away
    redacted = redact(quoted)
    assert MARKER in redacted and all(form.upper() not in redacted.upper() for form in leaked_forms(KEY))


# --- the handlers, in process -----------------------------------------------------------


@pytest.fixture
def isolated_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging changes the root logger and Python's hooks: all put back after."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    yield
    logging.captureWarnings(False)


def written_by(handler: logging.StreamHandler) -> io.StringIO:  # type: ignore[type-arg]
    stream = io.StringIO()
    handler.setStream(stream)
    return stream


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "text"])
def test_a_library_record_is_redacted_in_message_arguments_exception_stack_and_fields(
    isolated_logging: None, json_lines: bool
) -> None:
    setup_logging("debug", json_lines)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, JsonLinesHandler if json_lines else TextHandler)
    written = written_by(handler)
    server = logging.getLogger("aiohttp.server")
    try:
        raise ValueError(f"Invalid header value char:\n\n  b'Authorization: Bearer {KEY}\\x00'\n")
    except ValueError:
        server.exception("Error handling request from %s", "127.0.0.1")
    server.warning(
        "header %s: %r", "x-api-key", KEY, extra={"fields": {"header": KEY, "nested": [{"k": KEY}]}}
    )
    server.info("stack follows", stack_info=True, extra={"fields": {"status": 400}})
    logging.getLogger("asyncpg").error("a format the arguments do not fit: %s %s", KEY)
    text = written.getvalue()
    for form in leaked_forms(KEY):
        assert form not in text
    assert text.count("Error handling request from 127.0.0.1") == 1
    assert "Invalid header value char" in text and "Authorization: Bearer [redacted]" in text
    assert "header x-api-key: '[redacted]'" in text
    assert "stack follows" in text and "test_log_redaction.py" in text  # the stack, kept
    assert "the arguments do not fit" in text
    if json_lines:
        lines = [json.loads(line) for line in text.splitlines()]
        assert [line["logger"] for line in lines] == ["aiohttp.server"] * 3 + ["asyncpg"]
        assert "ValueError: Invalid header value char" in lines[0]["exception"]
        assert (lines[1]["header"], lines[1]["nested"]) == (MARKER, [{"k": MARKER}])
        assert lines[2]["status"] == 400 and "stack" in lines[2]


def test_the_direct_request_line_redacts_what_the_caller_chose(isolated_logging: None) -> None:
    setup_logging("info", True)
    (handler,) = logging.getLogger().handlers
    written = written_by(handler)
    fields = {
        "request_id": "req_0123456789abcdef0123456789abcdef",  # ours: kept as it is
        "method": KEY,
        "route": "unmatched",
        "status": 401,
        "client_request_id": f"trace Bearer {KEY}",
        "prompt": json.dumps({"messages": [{"role": "user", "content": f"my key is {KEY}"}]}),
    }
    log_request(fields)
    log_request({**fields, "added_later": KEY})  # a field neither list names: redacted too
    first, second = (json.loads(line) for line in written.getvalue().splitlines())
    assert first["request_id"] == fields["request_id"] and first["method"] == MARKER
    assert first["client_request_id"] == f"trace Bearer {MARKER}"
    assert f"my key is {MARKER}" in str(first["prompt"])
    assert second["added_later"] == MARKER
    assert fields["method"] == KEY  # the caller's dict is left alone
    for form in leaked_forms(KEY):
        assert form not in written.getvalue()


def test_warnings_and_uncaught_exceptions_go_through_the_same_handler(isolated_logging: None) -> None:
    setup_logging("info", False)
    (handler,) = logging.getLogger().handlers
    written = written_by(handler)

    class Finalized:
        def __del__(self) -> None:
            raise RuntimeError(f"closing with {KEY}")

    def fails() -> None:
        raise ValueError(f"Bearer {KEY}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings put the original showwarning back
        warnings.warn(f"api_key={KEY}", UserWarning, stacklevel=1)
    thread = threading.Thread(target=fails, name="worker-1")
    thread.start()
    thread.join()
    Finalized()  # dropped at once: __del__ raises, Python reports it as unraisable
    sys.excepthook(ValueError, ValueError(f"x-api-key: {KEY}"), None)
    text = written.getvalue()
    for form in leaked_forms(KEY):
        assert form not in text
    assert f"py.warnings: {__file__}" in text and "api_key=[redacted]" in text
    assert "gateway.uncaught: uncaught exception in thread worker-1" in text and f"Bearer {MARKER}" in text
    assert "Exception ignored in: <function" in text and f"closing with {MARKER}" in text
    assert "CRITICAL gateway.uncaught: uncaught exception" in text and f"x-api-key: {MARKER}" in text


# --- a real gateway, raw sockets --------------------------------------------------------

# Each sent alone on its own connection. aiohttp's C parser (llhttp) and its Python one
# word their errors differently and disagree on one (a key as the method).
MALFORMED = {
    "nul after the key": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer " + K + b"\x00\r\n\r\n",
    "vertical tab": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer " + K + b"\x0b\r\n\r\n",
    "delete": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer " + K + b"\x7f\r\n\r\n",
    "bare carriage return": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer " + K + b"\rX: 1\r\n\r\n",
    "obs-fold": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer\r\n " + K + b"\r\n\r\n",
    "key in a bad header name": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Bearer " + K + b": 1\r\n\r\n",
    "key in a bad path": b"GET /v1/" + K + b"\x7f HTTP/1.1\r\n" + HEAD + b"\r\n",
    "key as the method": K + b" /v1/models HTTP/1.1\r\n" + HEAD + b"\r\n",
    "x-api-key with a nul": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"x-api-key: " + K + b"\x00\r\n\r\n",
    # Past aiohttp's 8,190 bytes a line (its 400 quotes the line's first 100 bytes), and
    # past server.max_header_bytes (the gateway's own 431, before aiohttp parses).
    "oversized header": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer " + K + b"A" * 10_000 + b"\r\n\r\n",
    "oversized header name": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"X-" + K + b"A" * 10_000 + b": 1\r\n\r\n",
    "beyond max_header_bytes": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer " + K + b"A" * 100_000 + b"\r\n\r\n",
    "cookie with a nul": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Cookie: session=" + K + b"\x00\r\n\r\n",
    "basic with a nul": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Basic "
    + base64.b64encode(b"alice:" + K) + b"\x00\r\n\r\n",
    "bad query": b"GET /v1/models?api_key=" + K + b"\x00 HTTP/1.1\r\n" + HEAD + b"\r\n",
}  # fmt: skip
# Well-formed requests with the key where the gateway does not look for it.
WELL_FORMED = {
    "key as a header name": b"GET /v1/models HTTP/1.1\r\n" + HEAD + K + b": 1\r\n\r\n",
    "key in the path": b"GET /v1/" + K + b" HTTP/1.1\r\n" + HEAD + b"\r\n",
    "duplicated authorization": b"GET /v1/models HTTP/1.1\r\n" + HEAD
    + b"Authorization: Bearer " + K + b"\r\nAuthorization: Bearer " + K + b"\r\n\r\n",
    "cookie": b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Cookie: api_key=" + K + b"\r\n\r\n",
    "query": b"GET /v1/models?api_key=" + K + b" HTTP/1.1\r\n" + HEAD + b"\r\n",
}  # fmt: skip
RESET = b"(connection reset)"
TRUNCATED = b"GET /v1/models HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer " + K


async def exchange(port: int, request: bytes, *, end: bool = False) -> bytes:
    """Sends `request` on a new connection (then ends its side if `end`) and reads until
    the gateway closes it. Without `end`: a half-closed connection is a client gone."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        if end:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout=5)
    except ConnectionResetError:  # an oversized request, refused before all was read
        return RESET
    finally:
        writer.close()


async def provider_that_echoes(request: web.Request) -> web.Response:
    """A provider error answer quoting what it got: our provider key and the prompt."""
    body = await request.text()
    return web.json_response(
        {"error": {"message": f"cannot use {request.headers.get('Authorization')} for {body}"}}, status=400
    )


@pytest.fixture
async def echoing_provider() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", provider_that_echoes)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("/v1"))
    await server.close()


@dataclass
class Captured:
    stdout: str
    stderr: str
    answers: dict[str, bytes]


async def run_gateway(
    directory: Path, redis_url: str, database_url: str, provider_url: str, *, json_lines: bool, c_parser: bool
) -> Captured:
    (directory / "policies").mkdir()
    (directory / "policies" / "test.yaml").write_text("policies: []\n")
    (directory / "gateway.yaml").write_text(
        textwrap.dedent(
            f"""\
            server: {{log_level: debug, log_json: {str(json_lines).lower()}, log_prompts: true}}
            backends:
              redis: {{url: "{redis_url}", key_prefix: "redaction:{uuid.uuid4().hex[:8]}:"}}
              postgres: {{dsn: "{database_url}"}}
            providers:
              echo: {{type: openai, base_url: "{provider_url}", api_key_env: FAKE_PROVIDER_KEY}}
            models:
              gpt-4o-mini: {{provider: echo}}
            keys:
              - {{id: alice-key, sha256: {hashlib.sha256(K).hexdigest()}, user: alice}}
            """
        )
    )
    environment = {**os.environ, "FAKE_PROVIDER_KEY": PROVIDER_KEY}
    if not c_parser:
        environment["AIOHTTP_NO_EXTENSIONS"] = "1"
    port = free_port()
    with (directory / "stdout").open("wb") as stdout, (directory / "stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml", "--port", str(port)],
            cwd=directory,
            env=environment,
            stdout=stdout,
            stderr=stderr,
        )
    answers: dict[str, bytes] = {}
    try:
        await wait_healthy(port, process)
        for name, request in {**MALFORMED, **WELL_FORMED}.items():
            answers[name] = await exchange(port, request)
        answers["truncated inside a header"] = await exchange(port, TRUNCATED, end=True)
        chat = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"key {KEY}"}]})
        answers["provider error"] = await exchange(
            port,
            b"POST /v1/chat/completions HTTP/1.1\r\n" + HEAD + b"Authorization: Bearer " + K + b"\r\n"
            b"X-Request-Id: trace-" + K + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(chat)).encode() + b"\r\n\r\n" + chat.encode(),
        )  # fmt: skip
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    read = lambda name: (directory / name).read_bytes().decode("utf-8", errors="replace")  # noqa: E731
    return Captured(read("stdout"), read("stderr"), answers)


@pytest.mark.parametrize(
    ("json_lines", "c_parser"),
    [(True, True), (True, False), (False, True)],
    ids=["json-llhttp", "json-python-parser", "text-llhttp"],
)
async def test_no_key_in_any_stream_of_a_real_gateway(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    echoing_provider: str,
    json_lines: bool,
    c_parser: bool,
) -> None:
    captured = await run_gateway(
        tmp_path, redis_url, database_url, echoing_provider, json_lines=json_lines, c_parser=c_parser
    )
    everything = captured.stdout + captured.stderr
    for form in [*leaked_forms(KEY), PROVIDER_KEY]:
        assert form not in everything, f"{form!r} is in the gateway's output"
    # aiohttp's Python parser writes a method in capitals: a key as the method, too.
    for form in [KEY, KEY[3:19], KEY[-16:]]:
        assert form.upper() not in everything.upper(), f"{form!r} is in the gateway's output, in other case"

    status = {name: answer.split(b"\r\n", 1)[0] for name, answer in captured.answers.items()}
    refused = [name for name in MALFORMED if b" 400 " in status[name]]
    # A key as the method: llhttp refuses it, the Python parser takes it (and the router 401s).
    expected = set(MALFORMED) - ({"key as the method"} if not c_parser else set())
    # Past both limits: aiohttp's 400 or the gateway's 431, whichever reads the line first,
    # or a reset if the refusal came while the rest was still arriving.
    if b" 400 " not in status["beyond max_header_bytes"]:
        expected.remove("beyond max_header_bytes")
        assert status["beyond max_header_bytes"] in (b"HTTP/1.1 431 Request Header Fields Too Large", RESET)
    assert set(refused) == expected, {name: status[name] for name in MALFORMED}
    assert status["truncated inside a header"] == b""
    assert status["provider error"] == b"HTTP/1.1 400 Bad Request"  # the provider's refusal, passed on
    # aiohttp logged each refusal (at ERROR, a method it does not know at DEBUG), redacted.
    assert everything.count("Error handling request from 127.0.0.1") == len(refused)
    assert everything.count("Bearer [redacted]") >= 6
    assert "provider echo answered HTTP 400" in everything
    # A request line for each request that reached the gateway's handlers.
    answered = len(WELL_FORMED) + 1 + (0 if c_parser else 1)
    if json_lines:
        lines = [json.loads(line) for line in captured.stderr.splitlines() if line.startswith("{")]
        requests = [line for line in lines if line["logger"] == "gateway.request"]
        assert len(requests) == answered
        # Fields the request line's redaction does not know cost it a scan each: name them there.
        unknown = set().union(*requests) - _KNOWN_FIELDS - {"time", "level", "logger", "message"}
        assert not unknown, f"gateway/logs.py: add {unknown} to _OWN_FIELDS or _CALLER_FIELDS"
        (chat,) = [line for line in requests if line["route"] == "/v1/chat/completions"]
        assert chat["client_request_id"] == f"trace-{MARKER}" and "[redacted]" in chat["prompt"]
        assert (chat["key_id"], chat["error_code"]) == ("alice-key", "upstream_rejected")
        # The Python parser's key as a method reaches the request line, redacted.
        assert any(line["method"] == MARKER for line in requests) is not c_parser
    else:
        assert captured.stderr.count("INFO gateway.request: request") == answered
