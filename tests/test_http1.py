"""The provider client (gateway/providers/http1.py) against real sockets and servers.

Framing is fed byte for byte at every split point; pooling, keep-alive, timeouts and
TLS run against real servers that answer exact bytes (a provider's wire is all these
see), since the behaviour under test is what a server's bytes and closes do to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.config import ProviderConfig
from gateway.providers import build_providers
from gateway.providers.http1 import (
    HEAD_LIMIT_BYTES,
    ConnectionDropped,
    ConnectionFailed,
    ConnectionPool,
    MalformedResponse,
    _Connection,
)
from gateway.tokens import TokenizerRegistry

BODY = b'{"id":"chatcmpl-1","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"}}]}'


def content_length(body: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def chunked(pieces: list[bytes], extra: str = "") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n{extra}\r\n"
    chunks = b"".join(b"%x;note=1\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return head.encode() + chunks + b"0\r\nX-Trailer: yes\r\n\r\n"


async def read_fed(pieces: list[bytes], close: bool = False) -> tuple[_Connection, int, bytes]:
    """A connection on a real socket, fed the response in exactly these pieces."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, connection = await loop.create_connection(lambda: _Connection(loop, 5.0), sock=ours)
    try:
        connection.send(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        for piece in pieces:
            connection.data_received(piece)
        if close:
            connection.connection_lost(None)
        await connection.head()
        body = b""
        while piece := await connection.next_piece():
            body += piece
        return connection, connection.status, body
    finally:
        transport.abort()
        theirs.close()


def splits(message: bytes) -> list[list[bytes]]:
    """The message whole, byte by byte, and cut in two at every point."""
    return [[message], [message[i : i + 1] for i in range(len(message))]] + [
        [message[:cut], message[cut:]] for cut in range(1, len(message))
    ]


async def test_a_content_length_body_at_every_split() -> None:
    message = content_length(BODY)
    for pieces in splits(message):
        connection, status, body = await read_fed(pieces)
        assert (status, body) == (200, BODY)
        assert connection.headers["content-type"] == "application/json"
        assert connection.reusable


async def test_a_chunked_body_with_extensions_and_trailers_at_every_split() -> None:
    events = [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
    message = chunked(events)
    for pieces in splits(message):
        connection, status, body = await read_fed(pieces)
        assert (status, body) == (200, b"".join(events))
        assert connection.reusable


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_is_decoded_at_every_split(encoding: str) -> None:
    packed = gzip.compress(BODY) if encoding == "gzip" else zlib.compress(BODY)
    message = chunked([packed[:10], packed[10:]], extra=f"Content-Encoding: {encoding}\r\n")
    for pieces in splits(message):
        _, status, body = await read_fed(pieces)
        assert (status, body) == (200, BODY)


async def test_informational_responses_are_skipped_and_empty_ones_have_no_body() -> None:
    _, status, body = await read_fed([b"HTTP/1.1 100 Continue\r\n\r\n" + content_length(BODY)])
    assert (status, body) == (200, BODY)
    connection, status, body = await read_fed([b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert (status, body, connection.reusable) == (204, b"", True)


async def test_bytes_after_a_complete_response_make_the_connection_unfit_to_reuse() -> None:
    late = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    for pieces in ([content_length(BODY) + late], [content_length(BODY), late]):
        connection, status, body = await read_fed(pieces)
        assert (status, body, connection.reusable) == (200, BODY, False)


async def test_a_body_until_close_ends_with_the_connection() -> None:
    connection, status, body = await read_fed([b"HTTP/1.0 200 OK\r\n\r\n", BODY], close=True)
    assert (status, body, connection.reusable) == (200, BODY, False)


async def test_repeated_headers_are_joined_and_close_is_honoured() -> None:
    message = content_length(BODY, "Connection: close\r\nX-Seen: a\r\nx-seen: b\r\n")
    connection, _, _ = await read_fed([message])
    assert connection.headers["x-seen"] == "a, b"
    assert not connection.reusable


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header is malformed"),
        (b"HTTP/1.1 200 OK\r\n folded: value\r\n\r\n", "header is malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n", "Content-Length is not a number"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx", "'br' is not supported"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "'gzip' is not supported"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "not hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n", "not hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", "not hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n;x\r\n", "not hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "does not end with CRLF"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * HEAD_LIMIT_BYTES, "head is too large"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!",
            "compressed body is corrupt",
        ),
    ],
)
async def test_malformed_responses_are_refused(message: bytes, error: str) -> None:
    with pytest.raises(MalformedResponse, match=error):
        await read_fed([message])


async def test_a_connection_lost_mid_body_is_dropped_not_short() -> None:
    with pytest.raises(ConnectionDropped):
        await read_fed([content_length(BODY)[:-5]], close=True)


# Pools against servers that answer exact bytes.

CLOSE = b""  # a scripted "reply" that closes the connection instead of answering


@dataclass
class ScriptedServer:
    """Answers each request with the next scripted reply, whatever connection it came on."""

    replies: list[bytes | Callable[[asyncio.StreamWriter], None]]
    requests: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # connection, head, body
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    closed_by_client: int = 0
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = await reader.readexactly(length)
                self.requests.append((number, head, body))
                reply = self.replies.pop(0)
                if reply == CLOSE:
                    return
                if callable(reply):
                    reply(writer)
                else:
                    writer.write(reply)
                await writer.drain()
        finally:
            self.open_now -= 1
            writer.close()


@contextlib.asynccontextmanager
async def scripted(
    replies: list[bytes | Callable[[asyncio.StreamWriter], None]], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[ScriptedServer]:
    script = ScriptedServer(replies)
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0, ssl=ssl_context)
    script.port = server.sockets[0].getsockname()[1]
    try:
        yield script
    finally:
        server.close()


def pool_for(url: str, **options: float) -> ConnectionPool:
    settings = {"max_connections": 0, "connect_seconds": 2.0, "idle_seconds": 5.0, **options}
    return ConnectionPool(
        url,
        max_connections=int(settings.pop("max_connections")),
        user_agent="llm-gateway/test",
        **settings,
    )


async def post(pool: ConnectionPool, body: bytes = b'{"q":1}') -> tuple[int, bytes]:
    response = await pool.post("/v1/chat/completions", {"Authorization": "Bearer sk-x"}, body)
    return response.status, await response.read()


async def test_one_kept_alive_connection_carries_calls_one_after_another() -> None:
    async with scripted([content_length(BODY)] * 3) as server:
        pool = pool_for(f"http://127.0.0.1:{server.port}/v1")
        assert [await post(pool, b'{"n":%d}' % n) for n in range(3)] == [(200, BODY)] * 3
        await pool.close()
    assert server.connections == 1
    assert [body for _, _, body in server.requests] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    lines = server.requests[0][1].decode().split("\r\n")
    assert lines[:5] == [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        "User-Agent: llm-gateway/test",
        "Accept-Encoding: gzip, deflate",
        "Content-Length: 7",
    ]
    assert lines[5:] == ["Authorization: Bearer sk-x", "", ""]


async def test_connection_close_and_a_provider_closing_a_kept_connection() -> None:
    """Connection: close is honoured; a kept connection the provider closed as the next
    request went out (nothing came back on it) is replaced, and the request sent again."""
    replies = [
        content_length(BODY, "Connection: close\r\n"),
        content_length(BODY),
        CLOSE,
        content_length(BODY),
    ]
    async with scripted(replies) as server:
        pool = pool_for(f"http://127.0.0.1:{server.port}")
        assert [await post(pool) for _ in range(3)] == [(200, BODY)] * 3
        await pool.close()
    assert [number for number, _, _ in server.requests] == [1, 2, 2, 3]


async def test_bytes_on_an_idle_connection_are_never_taken_for_the_next_answer() -> None:
    timeout = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"

    def answer_then_408(writer: asyncio.StreamWriter) -> None:
        writer.write(content_length(BODY) + timeout)

    def answer_then_408_later(writer: asyncio.StreamWriter) -> None:
        writer.write(content_length(BODY))
        asyncio.get_running_loop().call_later(0.05, writer.write, timeout)

    replies = [answer_then_408, content_length(b"{}"), answer_then_408_later, content_length(b"[]")]
    async with scripted(replies) as server:
        pool = pool_for(f"http://127.0.0.1:{server.port}")
        assert await post(pool) == (200, BODY)
        assert await post(pool) == (200, b"{}")
        assert await post(pool) == (200, BODY)
        await asyncio.sleep(0.2)
        assert await post(pool) == (200, b"[]")
        await pool.close()
    assert [number for number, _, _ in server.requests] == [1, 2, 2, 3]


@pytest.mark.parametrize("closing", [False, True], ids=["kept-alive", "connection-close"])
async def test_max_connections_queues_calls_and_cancelled_waits_free_nothing(closing: bool) -> None:
    """Waiting calls get a connection given back or, when it closes, a slot to open one in."""
    release = asyncio.Event()
    unanswered, most_unanswered = 0, 0

    def later(writer: asyncio.StreamWriter) -> None:
        nonlocal unanswered, most_unanswered
        unanswered += 1
        most_unanswered = max(most_unanswered, unanswered)

        async def answer() -> None:
            nonlocal unanswered
            await release.wait()
            unanswered -= 1
            writer.write(content_length(BODY, "Connection: close\r\n" if closing else ""))

        asyncio.get_running_loop().create_task(answer())

    async with scripted([later] * 12) as server:
        pool = pool_for(f"http://127.0.0.1:{server.port}", max_connections=2)
        calls = [asyncio.ensure_future(post(pool)) for _ in range(8)]
        await asyncio.sleep(0.2)
        # Two calls on the wire, six waiting; two of those give up.
        assert (server.open_now, len(server.requests)) == (2, 2)
        calls[5].cancel()
        calls[6].cancel()
        release.set()
        async with asyncio.timeout(5):  # a slot lost for good would leave calls waiting
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert [result for result in results if not isinstance(result, BaseException)] == [
                (200, BODY)
            ] * 6
            # The slots and connections of the cancelled calls went on to others.
            assert await asyncio.gather(*(post(pool) for _ in range(4))) == [(200, BODY)] * 4
        await pool.close()
    assert most_unanswered == 2
    assert len(server.requests) == 10
    assert server.connections == (10 if closing else 2)


async def test_a_connection_handed_to_a_call_that_gave_up_goes_to_the_next() -> None:
    async with scripted([content_length(BODY)] * 2) as server:
        pool = pool_for(f"http://127.0.0.1:{server.port}", max_connections=1)
        first = await pool.post("/", {}, b"")
        waiting = asyncio.ensure_future(post(pool))
        await asyncio.sleep(0.05)
        # Reading to the end hands the one connection to the waiting call, which is
        # cancelled before it runs: the connection must go on, not be lost with it.
        assert await first.read() == BODY
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        async with asyncio.timeout(2):
            assert await post(pool) == (200, BODY)
        await pool.close()
    assert (server.connections, len(server.requests)) == (1, 2)


async def test_the_read_timeout_is_between_reads_not_over_the_body() -> None:
    """idle_seconds bounds each wait for the next bytes: a body that trickles in with
    shorter gaps reads to its end, however long it takes as a whole; a stall times out."""
    pieces_sent = [b"piece-%d" % n for n in range(6)]

    def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        loop = asyncio.get_running_loop()
        for n, piece in enumerate(pieces_sent):  # a piece every 0.1 s: 0.6 s in all
            loop.call_later(0.1 * (n + 1), writer.write, b"%x\r\n%b\r\n" % (len(piece), piece))
        loop.call_later(0.1 * (len(pieces_sent) + 1), writer.write, b"0\r\n\r\n")

    head_only = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with scripted([trickle, head_only]) as server:
        pool = pool_for(f"http://127.0.0.1:{server.port}", idle_seconds=0.4)
        response = await pool.post("/", {}, b"")
        assert await response.read() == b"".join(pieces_sent)
        response = await pool.post("/", {}, b"")
        pieces = response.pieces()
        assert await anext(pieces) == b"hello"
        with pytest.raises(TimeoutError):
            await anext(pieces)
        response.close()
        await pool.close()


async def test_idle_connections_are_closed_after_the_keepalive() -> None:
    async with scripted([content_length(BODY)]) as server:
        pool = pool_for(f"http://127.0.0.1:{server.port}", keepalive_seconds=0.2)
        assert await post(pool) == (200, BODY)
        assert server.open_now == 1
        await asyncio.sleep(0.5)
        assert (server.open_now, server.closed_by_client) == (0, 1)
        await pool.close()


async def test_connection_refused_and_header_injection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    pool = pool_for(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionFailed, match="ConnectionRefusedError"):
        await post(pool)
    with pytest.raises(ValueError, match="line break"):
        await pool.post("/", {"X-Key": "value\r\nX-Injected: yes"}, b"")
    await pool.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_verifies_the_provider_certificate(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    async with scripted([content_length(BODY)] * 2, server_context) as server:
        untrusting = pool_for(f"https://localhost:{server.port}")
        with pytest.raises(ConnectionFailed, match="SSLCertVerificationError"):
            await post(untrusting)
        await untrusting.close()
        # Trusted the way operators add a CA: OpenSSL's SSL_CERT_FILE.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusting = pool_for(f"https://localhost:{server.port}")
        assert [await post(trusting) for _ in range(2)] == [(200, BODY)] * 2
        await trusting.close()
    assert len(server.requests) == 2


def test_https_providers_share_one_tls_context() -> None:
    """Making a context loads the trust store (about 1 MB and 23 ms here): once for all."""
    configs = {
        "openai": ProviderConfig("openai", "openai", base_url="https://api.example.test/v1"),
        "anthropic": ProviderConfig("anthropic", "anthropic", base_url="https://api.example.test"),
        "local": ProviderConfig("local", "openai", base_url="http://127.0.0.1:8000/v1"),
    }
    providers = build_providers(configs, TokenizerRegistry())
    contexts = [providers[name]._pool._ssl for name in ("openai", "anthropic", "local")]
    assert isinstance(contexts[0], ssl.SSLContext)
    assert contexts[1] is contexts[0]
    assert contexts[2] is None
