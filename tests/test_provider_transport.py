"""The provider client on real sockets: proxies, private CAs, client certificates, hostile bodies.

Everything is real but the provider: proxy.py runs as a forward proxy of its own (plain
HTTP in absolute form, https through CONNECT), certificates come from trustme, the fake
provider is an aiohttp server answering OpenAI's bytes, and a provider that misbehaves
is a raw asyncio server writing exact bytes. Each failure is checked for the code and
the detail (one of http.CAUSES) it becomes, and for whether the request may have
reached the provider (Delivery.sent), which decides whether it is charged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ProviderConfig, load_config
from gateway.doctor import Check, diagnose
from gateway.errors import UpstreamError
from gateway.providers import UpstreamReply, UpstreamRequest, build_http_provider
from gateway.providers.http import HttpProvider
from tests.conftest import free_port, refused_port
from tests.fakes.openai_upstream import chat_completion

REQUEST = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
STREAM_REQUEST = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
USAGE = {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17}
# OpenAI answers a chat completion pretty-printed.
ANSWER = json.dumps(
    chat_completion("chatcmpl-transport", 1_764_000_000, "gpt-4o-mini-2024-07-18", "Hello there!", USAGE),
    indent=2,
).encode()
STREAM = (
    b"".join(
        b"data: "
        + json.dumps(
            {
                "id": "chatcmpl-transport",
                "object": "chat.completion.chunk",
                "created": 1_764_000_000,
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            },
            separators=(",", ":"),
        ).encode()
        + b"\n\n"
        for delta, finish in (
            ({"role": "assistant", "content": ""}, None),
            ({"content": "Hello"}, None),
            ({"content": " there!"}, None),
            ({}, "stop"),
        )
    )
    + b"data: [DONE]\n\n"
)
MODELS = json.dumps(
    {
        "object": "list",
        "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}],
    }
).encode()
WRONG_KEY = json.dumps(
    {
        "error": {
            "message": "Incorrect API key provided: sk-wrong. You can find your API key at"
            " https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
).encode()
# What proxy.py adds to a request it forwards in absolute form: the proof it passed there.
VIA = "1.1 proxy.py v2.4.10"
PROXY_USER, PROXY_PASSWORD = "gateway", "pr0xy-s3cret"
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUEST_METHOD")


def chat(stream: bool = False) -> UpstreamRequest:
    """A chat completion request as the caller's bytes, forwarded as they are."""
    raw = STREAM_REQUEST if stream else REQUEST
    return UpstreamRequest("chat/completions", json.loads(raw), stream=stream, raw=raw)


# --- the fake provider ---------------------------------------------------------------


@dataclass
class FakeOpenAI:
    """OpenAI's chat completions (whole or streamed) and model list, as fixed bytes."""

    model_list_status: int = 200
    # Every request as it arrived: method, path, headers, body.
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.path, dict(request.headers), body))
        if not json.loads(body).get("stream"):
            return web.Response(body=ANSWER, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(STREAM)
        await response.write_eof()
        return response

    async def _models(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, dict(request.headers), b""))
        body = MODELS if self.model_list_status == 200 else WRONG_KEY
        return web.Response(body=body, status=self.model_list_status, content_type="application/json")


ServeFake = Callable[..., Awaitable[tuple[FakeOpenAI, str]]]


@pytest.fixture
async def serve_fake() -> AsyncIterator[ServeFake]:
    """Starts a FakeOpenAI on 127.0.0.1 (over TLS with `tls`); gives it and its base URL."""
    servers: list[TestServer] = []

    async def serve(tls: ssl.SSLContext | None = None, **fields: Any) -> tuple[FakeOpenAI, str]:
        fake = FakeOpenAI(**fields)
        server = TestServer(fake.app(), host="127.0.0.1")
        await server.start_server(ssl=tls)
        servers.append(server)
        return fake, f"{'https' if tls else 'http'}://127.0.0.1:{server.port}/v1"

    yield serve
    for server in servers:
        await server.close()


ServeRaw = Callable[[bytes | None], Awaitable[str]]


@pytest.fixture
async def serve_raw() -> AsyncIterator[ServeRaw]:
    """A provider that reads the whole request, writes `answer` as it is (None: nothing), closes."""
    servers: list[asyncio.Server] = []

    async def serve(answer: bytes | None) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            if answer is not None:
                writer.write(answer)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


OpenProvider = Callable[..., HttpProvider]


@pytest.fixture
async def open_provider() -> AsyncIterator[OpenProvider]:
    """build_http_provider for an openai provider at base_url; closed at the end."""
    providers: list[HttpProvider] = []

    def open_(base_url: str, **fields: Any) -> HttpProvider:
        provider = build_http_provider(
            ProviderConfig(name="fake", type="openai", base_url=base_url, **fields)
        )
        providers.append(provider)
        return provider

    yield open_
    for provider in providers:
        await provider.close()


@pytest.fixture(autouse=True)
def no_proxy_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own proxy settings (either case) must not steer these providers."""
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca_file: str
    client_cert_file: str
    client_key_file: str
    # Server sides: the provider's certificate, and the same requiring a client certificate.
    server: ssl.SSLContext
    server_requiring_client_cert: ssl.SSLContext


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("llm-gateway")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(directory / "client.key"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server)
    mutual = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(mutual)
    ca.configure_trust(mutual)
    mutual.verify_mode = ssl.CERT_REQUIRED
    return Certificates(
        str(directory / "ca.pem"),
        str(directory / "client.pem"),
        str(directory / "client.key"),
        server,
        mutual,
    )


# --- the forward proxy -----------------------------------------------------------------


@dataclass
class ForwardProxy:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def logged(self, fragment: str) -> str:
        """The access-log line holding `fragment` (proxy.py writes it once the connection ends)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if fragment in line:
                    return line
            await asyncio.sleep(0.02)
        pytest.fail(f"proxy.py never logged {fragment!r}:\n{self.log.read_text()}")


def forward_proxy(directory: Path, *extra: str) -> Iterator[ForwardProxy]:
    port = free_port()
    log = directory / f"proxy-{port}.log"
    command = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port)]
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*command, "--num-workers", "1", "--num-acceptors", "1", *extra],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"proxy.py did not start:\n{log.read_text()}")
                time.sleep(0.05)
        yield ForwardProxy(process, port, log)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    yield from forward_proxy(tmp_path_factory.mktemp("proxy"))


@pytest.fixture(scope="module")
def authenticating_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    yield from forward_proxy(
        tmp_path_factory.mktemp("proxy"), "--basic-auth", f"{PROXY_USER}:{PROXY_PASSWORD}"
    )


def with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{user}:{password}@")


async def failure(provider: HttpProvider, request: UpstreamRequest | None = None) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await provider.send(request or chat())
    return caught.value


def assert_answered(reply: UpstreamReply) -> None:
    assert (reply.status, reply.content_type, reply.body) == (200, "application/json", ANSWER)


# --- 1. proxies --------------------------------------------------------------------------


async def test_a_proxy_named_in_gateway_yaml_carries_the_request(
    proxy: ForwardProxy, serve_fake: ServeFake, open_provider: OpenProvider
) -> None:
    fake, base_url = await serve_fake()
    provider = open_provider(base_url, proxy=proxy.url)
    assert_answered(await provider.send(chat()))
    [(method, path, headers, body)] = fake.seen
    assert (method, path, body, headers["Via"]) == ("POST", "/v1/chat/completions", REQUEST, VIA)


async def test_http_proxy_from_the_environment_carries_the_request(
    proxy: ForwardProxy, serve_fake: ServeFake, open_provider: OpenProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, base_url = await serve_fake()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{refused_port()}")  # for https:// only
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    provider = open_provider(base_url)
    assert_answered(await provider.send(chat()))
    [(_, _, headers, body)] = fake.seen
    assert (body, headers["Via"]) == (REQUEST, VIA)


async def test_no_proxy_naming_the_host_goes_direct(
    serve_fake: ServeFake, open_provider: OpenProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, base_url = await serve_fake()
    # A proxy nobody listens on: a call that tried it would fail.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{refused_port()}")
    through_dead_proxy = open_provider(base_url)
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.1")
    direct = open_provider(base_url)
    assert_answered(await direct.send(chat()))
    assert "Via" not in fake.seen[0][2]
    # The environment is read once, when the provider is made: the first one still uses it.
    request = chat()
    error = await failure(through_dead_proxy, request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_unreachable", "proxy", False)
    assert len(fake.seen) == 1


async def test_direct_in_gateway_yaml_ignores_the_environment(
    serve_fake: ServeFake, open_provider: OpenProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, base_url = await serve_fake()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{refused_port()}")
    assert_answered(await open_provider(base_url, proxy="direct").send(chat()))
    assert "Via" not in fake.seen[0][2]


async def test_https_through_a_proxy_with_the_right_credentials(
    authenticating_proxy: ForwardProxy,
    certificates: Certificates,
    serve_fake: ServeFake,
    open_provider: OpenProvider,
) -> None:
    fake, base_url = await serve_fake(certificates.server)
    address = with_credentials(authenticating_proxy.url, PROXY_USER, PROXY_PASSWORD)
    provider = open_provider(base_url, proxy=address, ca_file=certificates.ca_file)
    assert_answered(await provider.send(chat()))
    await provider.close()
    await authenticating_proxy.logged(f"CONNECT {base_url.split('/')[2]} ")
    # The credentials went to the proxy, in the CONNECT, and no further.
    assert "Proxy-Authorization" not in fake.seen[0][2]


async def test_http_through_a_proxy_with_the_right_credentials(
    authenticating_proxy: ForwardProxy, serve_fake: ServeFake, open_provider: OpenProvider
) -> None:
    fake, base_url = await serve_fake()
    address = with_credentials(authenticating_proxy.url, PROXY_USER, PROXY_PASSWORD)
    assert_answered(await open_provider(base_url, proxy=address).send(chat()))
    [(_, _, headers, body)] = fake.seen
    assert (body, headers["Via"], "Proxy-Authorization" in headers) == (REQUEST, VIA, False)


@pytest.mark.parametrize(
    "credentials", [None, (PROXY_USER, "wrong-" + PROXY_PASSWORD)], ids=["none", "wrong"]
)
async def test_https_through_a_proxy_refusing_the_credentials(
    credentials: tuple[str, str] | None,
    authenticating_proxy: ForwardProxy,
    certificates: Certificates,
    serve_fake: ServeFake,
    open_provider: OpenProvider,
) -> None:
    """aiohttp raises ClientHttpProxyError (407) for the CONNECT: the provider never had it."""
    fake, base_url = await serve_fake(certificates.server)
    address = (
        authenticating_proxy.url
        if credentials is None
        else with_credentials(authenticating_proxy.url, *credentials)
    )
    request = chat()
    error = await failure(open_provider(base_url, proxy=address, ca_file=certificates.ca_file), request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_unreachable", "proxy", False)
    assert error.message == "Provider 'fake' could not be reached (proxy)."
    cause = error.__cause__
    assert isinstance(cause, aiohttp.ClientHttpProxyError) and cause.status == 407
    assert fake.seen == []


async def test_http_through_a_proxy_without_credentials(
    authenticating_proxy: ForwardProxy, serve_fake: ServeFake, open_provider: OpenProvider
) -> None:
    fake, base_url = await serve_fake()
    try:
        reply = await open_provider(base_url, proxy=authenticating_proxy.url).send(chat())
    except UpstreamError as error:
        assert (error.code, error.detail) == ("upstream_unreachable", "proxy")
    else:
        raise AssertionError(f"the proxy's {reply.status} was taken for the provider's answer")
    assert fake.seen == []


async def test_the_proxy_password_never_reaches_an_error(
    authenticating_proxy: ForwardProxy, certificates: Certificates, open_provider: OpenProvider
) -> None:
    """The right credentials, and a provider the proxy cannot reach: the CONNECT gets 502."""
    base_url = f"https://127.0.0.1:{refused_port()}/v1"
    address = with_credentials(authenticating_proxy.url, PROXY_USER, PROXY_PASSWORD)
    error = await failure(open_provider(base_url, proxy=address, ca_file=certificates.ca_file))
    assert (error.code, error.detail) == ("upstream_unreachable", "proxy")
    encoded = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    for text in (str(error), error.message, str(error.__cause__)):
        assert PROXY_PASSWORD not in text and encoded not in text
    assert str(error.__cause__) == f"502, message='Bad Gateway', url='{authenticating_proxy.url}'"


async def test_a_proxy_nobody_listens_on(open_provider: OpenProvider, serve_fake: ServeFake) -> None:
    _, base_url = await serve_fake()
    request = chat()
    error = await failure(open_provider(base_url, proxy=f"http://127.0.0.1:{refused_port()}"), request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_unreachable", "proxy", False)


# --- 2. TLS --------------------------------------------------------------------------------


async def test_a_private_ca_is_untrusted_without_ca_file(
    certificates: Certificates, serve_fake: ServeFake, open_provider: OpenProvider
) -> None:
    fake, base_url = await serve_fake(certificates.server)
    request = chat()
    error = await failure(open_provider(base_url), request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_unreachable", "tls", False)
    assert fake.seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_private_ca_is_trusted_with_ca_file(
    host: str, certificates: Certificates, serve_fake: ServeFake, open_provider: OpenProvider
) -> None:
    fake, base_url = await serve_fake(certificates.server)
    provider = open_provider(base_url.replace("127.0.0.1", host), ca_file=certificates.ca_file)
    assert_answered(await provider.send(chat()))
    assert fake.seen[0][3] == REQUEST


async def test_https_through_the_proxy_by_connect_streams(
    proxy: ForwardProxy,
    certificates: Certificates,
    serve_fake: ServeFake,
    open_provider: OpenProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, base_url = await serve_fake(certificates.server)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{refused_port()}")  # for http:// only
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    provider = open_provider(base_url, ca_file=certificates.ca_file)
    reply = await provider.send(chat(stream=True))
    assert (reply.status, reply.content_type) == (200, "text/event-stream")
    assert reply.chunks is not None
    assert b"".join([chunk async for chunk in reply.chunks]) == STREAM
    await provider.close()
    line = await proxy.logged(f"CONNECT {base_url.split('/')[2]} ")
    assert " - CONNECT 127.0.0.1:" in line
    # Tunnelled: the provider saw the request itself, untouched by the proxy.
    [(_, _, headers, body)] = fake.seen
    assert (body, "Via" in headers) == (STREAM_REQUEST, False)


async def test_a_client_certificate_required_and_missing(
    certificates: Certificates, serve_fake: ServeFake, open_provider: OpenProvider
) -> None:
    """TLS 1.3: the client's handshake is over before the provider checks its certificate.

    So aiohttp connects and writes the request; the provider then refuses the certificate
    and closes with the request unread, which resets the connection. It looks like a
    connection lost after sending (sent: the gateway cannot tell it was never processed).
    """
    fake, base_url = await serve_fake(certificates.server_requiring_client_cert)
    request = chat()
    error = await failure(open_provider(base_url, ca_file=certificates.ca_file), request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_connection_lost", "reset", True)
    assert fake.seen == []


async def test_a_client_certificate_required_and_given(
    certificates: Certificates, serve_fake: ServeFake, open_provider: OpenProvider
) -> None:
    fake, base_url = await serve_fake(certificates.server_requiring_client_cert)
    provider = open_provider(
        base_url,
        ca_file=certificates.ca_file,
        client_cert_file=certificates.client_cert_file,
        client_key_file=certificates.client_key_file,
    )
    assert_answered(await provider.send(chat()))
    assert fake.seen[0][3] == REQUEST


# --- 3. bodies ---------------------------------------------------------------------------


def gzipped(pieces: Iterator[bytes]) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    return b"".join(compressor.compress(piece) for piece in pieces) + compressor.flush()


def head(*lines: str) -> bytes:
    """A 200's head: Content-Type and these header lines."""
    return "\r\n".join(["HTTP/1.1 200 OK", "Content-Type: application/json", *lines, "", ""]).encode()


GZIPPED_ANSWER = gzipped(iter([ANSWER]))


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """About 50 KB that inflate to 50 MiB of zeros."""
    return gzipped(bytes(1024 * 1024) for _ in range(50))


async def test_a_gzip_bomb_stops_at_max_response_bytes(
    gzip_bomb: bytes, serve_raw: ServeRaw, open_provider: OpenProvider
) -> None:
    assert 40_000 < len(gzip_bomb) < 60_000
    base_url = await serve_raw(
        head("Content-Encoding: gzip", f"Content-Length: {len(gzip_bomb)}") + gzip_bomb
    )
    provider = open_provider(base_url, max_response_bytes=1024 * 1024)
    request = chat()
    tracemalloc.start()
    try:
        error = await failure(provider, request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (error.code, error.detail, request.delivery.sent) == (
        "upstream_response_too_large",
        "too_large",
        True,
    )
    assert error.message == "Provider 'fake' answered more than max_response_bytes (1048576)."
    assert peak < 8 * 1024 * 1024


async def test_a_gzipped_answer_is_decoded(serve_raw: ServeRaw, open_provider: OpenProvider) -> None:
    length = len(GZIPPED_ANSWER)
    base_url = await serve_raw(head("Content-Encoding: gzip", f"Content-Length: {length}") + GZIPPED_ANSWER)
    reply = await open_provider(base_url).send(chat())
    assert (reply.status, reply.body) == (200, ANSWER)


@pytest.mark.parametrize(
    "answer",
    [
        head("Transfer-Encoding: gzip, chunked")
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(GZIPPED_ANSWER), GZIPPED_ANSWER),
        # Refused on the head alone: the body need not be compressed at all.
        head("Content-Encoding: compress", f"Content-Length: {len(ANSWER)}") + ANSWER,
    ],
    ids=["transfer-encoding-gzip", "content-encoding-compress"],
)
async def test_an_encoding_aiohttp_would_pass_through_is_refused(
    answer: bytes, serve_raw: ServeRaw, open_provider: OpenProvider
) -> None:
    request = chat()
    error = await failure(open_provider(await serve_raw(answer)), request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_bad_response", "malformed", True)
    assert error.message == "Provider 'fake' answered in an encoding the gateway cannot decode."


# --- 4. no answer --------------------------------------------------------------------------


async def test_a_refused_connection(open_provider: OpenProvider) -> None:
    request = chat()
    error = await failure(open_provider(f"http://127.0.0.1:{refused_port()}/v1"), request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_unreachable", "refused", False)
    assert error.message == "Provider 'fake' could not be reached (refused)."


async def test_a_host_that_does_not_resolve(open_provider: OpenProvider) -> None:
    request = chat()
    error = await failure(open_provider("http://nonexistent.invalid/v1"), request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_unreachable", "dns", False)


async def test_a_provider_that_reads_and_closes(serve_raw: ServeRaw, open_provider: OpenProvider) -> None:
    request = chat()
    error = await failure(open_provider(await serve_raw(None)), request)
    assert (error.code, error.detail, request.delivery.sent) == ("upstream_connection_lost", "closed", True)


# --- 6. doctor ---------------------------------------------------------------------------


async def doctor_upstream(directory: Path, provider_yaml: str) -> Check:
    """The `upstream fake` check of `gateway doctor` for gateway.yaml with this provider."""
    (directory / "gateway.yaml").write_text(
        textwrap.dedent(
            """\
            providers:
              fake: {%s}
            models:
              gpt-4o-mini: {provider: fake}
            """
        )
        % provider_yaml
    )
    checks = await diagnose(load_config(directory / "gateway.yaml"))
    [check] = [check for check in checks if check.name == "upstream fake"]
    return check


async def test_doctor_through_the_proxy_with_the_private_ca(
    tmp_path: Path,
    proxy: ForwardProxy,
    certificates: Certificates,
    serve_fake: ServeFake,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, base_url = await serve_fake(certificates.server)
    monkeypatch.setenv("TRANSPORT_PROVIDER_KEY", "sk-right")
    (tmp_path / "ca.pem").write_bytes(Path(certificates.ca_file).read_bytes())
    check = await doctor_upstream(
        tmp_path,
        f"type: openai, base_url: '{base_url}', api_key_env: TRANSPORT_PROVIDER_KEY,"
        f" proxy: '{proxy.url}', tls: {{ca_file: ca.pem}}",
    )
    assert (check.status, check.detail, check.fix, check.facts) == (
        "ok",
        f"{base_url} answers (HTTP 200 to a model list request)",
        None,
        {"status": 200},
    )
    [(method, path, headers, _)] = fake.seen
    assert (method, path, headers["Authorization"]) == ("GET", "/v1/models", "Bearer sk-right")
    await proxy.logged(f"CONNECT {base_url.split('/')[2]} ")


async def test_doctor_names_tls_ca_file_for_an_untrusted_certificate(
    tmp_path: Path, proxy: ForwardProxy, certificates: Certificates, serve_fake: ServeFake
) -> None:
    fake, base_url = await serve_fake(certificates.server)
    check = await doctor_upstream(tmp_path, f"type: openai, base_url: '{base_url}', proxy: '{proxy.url}'")
    assert (check.status, check.detail, check.fix) == (
        "fail",
        f"cannot reach {base_url}: tls",
        "the provider's certificate is untrusted: set providers.fake.tls.ca_file or check the host",
    )
    assert fake.seen == []


async def test_doctor_fails_a_refused_key(
    tmp_path: Path, serve_fake: ServeFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, base_url = await serve_fake(model_list_status=401)
    monkeypatch.setenv("TRANSPORT_PROVIDER_KEY", "sk-wrong")
    check = await doctor_upstream(
        tmp_path, f"type: openai, base_url: '{base_url}', api_key_env: TRANSPORT_PROVIDER_KEY"
    )
    assert (check.status, check.detail, check.fix, check.facts) == (
        "fail",
        f"{base_url} answers (HTTP 401 to a model list request)",
        "the provider refused the key in TRANSPORT_PROVIDER_KEY (providers.fake.api_key_env)",
        {"status": 401},
    )
    assert fake.seen[0][2]["Authorization"] == "Bearer sk-wrong"
