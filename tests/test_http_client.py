"""The gateway's upstream client (gateway/http_client.py) against raw local servers: what aiohttp did for free.

Keep-alive reuse, chunked and gzip answers, streaming as it arrives, a stale pooled connection retried once,
timeouts, the connection limit, cancellation reaching the upstream, TLS verified against a test CA (trustme),
and through the gateway: an untrusted upstream certificate is a 502 in keyplane's error shape.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trustme

from keyplane.gateway.http_client import ConnectError, ConnectionLost, HttpClient
from tests.conftest import assert_error, bearer, create_key

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
JSON = b'{"ok":true}'


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """(head, body) of one request (Content-Length or chunked), or None at the connection's end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += chunk[:-2]
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def answer(body: bytes = JSON, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode() \
        + b"\r\n" + extra + b"\r\n" + body


@asynccontextmanager
async def server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}"
    finally:
        srv.close()


class Counting:
    """A keep-alive server that answers every request and counts connections and requests."""

    def __init__(self, reply: Callable[[bytes, bytes], bytes] = lambda head, body: answer()) -> None:
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.reply = reply

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while (request := await read_request(reader)) is not None:
            self.requests.append(request)
            writer.write(self.reply(*request))
            await writer.drain()
        writer.close()


async def test_connections_are_kept_alive_and_the_request_is_well_formed() -> None:
    counting = Counting()
    client = HttpClient()
    async with server(counting) as url:
        for _ in range(3):
            resp = await client.request("POST", f"{url}/v1/chat?x=1", {"authorization": "Bearer sk"}, b'{"a":1}')
            assert resp.status == 200 and resp.headers["content-type"] == "application/json"
            assert await resp.read() == JSON
    await client.close()
    assert counting.connections == 1 and len(counting.requests) == 3
    head, body = counting.requests[0]
    assert head.startswith(b"POST /v1/chat?x=1 HTTP/1.1\r\n") and b"\r\nauthorization: Bearer sk\r\n" in head
    assert b"\r\nhost: 127.0.0.1:" in head and b"\r\ncontent-length: 7\r\n" in head and body == b'{"a":1}'


async def test_chunked_and_gzip_answers_are_decoded() -> None:
    def chunked(head: bytes, body: bytes) -> bytes:
        if b"gzip" in head:
            packed = gzip.compress(b"hello gzip")
            return answer(packed, b"content-encoding: gzip\r\n")
        return (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n1\r\n \r\n7\r\nchunked\r\n0\r\n\r\n")

    counting = Counting(chunked)
    client = HttpClient()
    async with server(counting) as url:
        assert await (await client.request("GET", f"{url}/c")).read() == b"hello chunked"
        assert await (await client.request("GET", f"{url}/c", {"x-want": "gzip"})).read() == b"hello gzip"
    await client.close()
    assert counting.connections == 1  # both answers ended cleanly: the connection was reused


async def test_a_streamed_answer_arrives_chunk_by_chunk_and_a_streamed_body_goes_out_chunked() -> None:
    release = asyncio.Event()
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        assert request is not None
        seen.append(request[1])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"8\r\ndata: 1\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"8\r\ndata: 2\n\r\n0\r\n\r\n")
        await writer.drain()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"stream":'
        yield b"true}"

    client = HttpClient()
    async with server(handler) as url:
        resp = await client.request("POST", url, {}, body(), read_timeout=10)
        chunks = resp.chunks()
        assert await anext(chunks) == b"data: 1\n"  # before the upstream sent the rest
        release.set()
        assert [c async for c in chunks] == [b"data: 2\n"]
    await client.close()
    assert seen == [b'{"stream":true}']


async def test_a_stale_pooled_connection_is_retried_once_on_a_new_one() -> None:
    """The server closes a kept-alive connection as the next request arrives (its idle timeout racing it):
    no byte of an answer came back, so the request goes again on a fresh connection."""
    connections: list[int] = []
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        first = len(connections) == 1
        while (request := await read_request(reader)) is not None:
            received.append(request[1])
            if first and len(received) == 2:
                writer.transport.abort()  # the stale connection: closed without an answer
                return
            writer.write(answer())
            await writer.drain()

    client = HttpClient()
    async with server(handler) as url:
        assert await (await client.request("POST", url, {}, b"one")).read() == JSON
        assert await (await client.request("POST", url, {}, b"two")).read() == JSON
    await client.close()
    assert len(connections) == 2 and received == [b"one", b"two", b"two"]


async def test_a_new_connection_that_breaks_is_not_retried() -> None:
    attempts: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(1)
        await read_request(reader)
        writer.transport.abort()

    client = HttpClient()
    async with server(handler) as url:
        with pytest.raises(ConnectionLost):
            await client.request("POST", url, {}, b"x")
    await client.close()
    assert attempts == [1]


async def test_timeouts_per_phase_and_no_retry_after_a_timeout() -> None:
    attempts: list[int] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(1)
        await read_request(reader)
        await asyncio.sleep(30)

    client = HttpClient()
    async with server(silent) as url:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await client.request("POST", url, {}, b"x", read_timeout=0.2)
        assert loop.time() - started < 5
    await client.close()
    assert attempts == [1]


async def test_the_connection_limit_queues_requests() -> None:
    counting = Counting()
    client = HttpClient(max_connections=1)
    async with server(counting) as url:
        async def one() -> bytes:
            return await (await client.request("GET", url)).read()

        assert await asyncio.gather(*(one() for _ in range(5))) == [JSON] * 5
    await client.close()
    assert counting.connections == 1


async def test_cancelling_a_read_closes_the_upstream_connection() -> None:
    upstream_saw_close = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        if await reader.read(1) == b"":  # the client's side closed
            upstream_saw_close.set()

    client = HttpClient()
    async with server(endless) as url:
        resp = await client.request("GET", url)
        chunks = resp.chunks()
        assert await anext(chunks) == b"first"
        task = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(upstream_saw_close.wait(), 10)
    await client.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


async def test_tls_is_verified_against_the_trusted_authorities(ca: trustme.CA) -> None:
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    counting = Counting()
    async with server(counting, tls_server_context(ca, "localhost")) as url:
        client = HttpClient(ssl_context=trusting)
        assert await (await client.request("GET", f"{url}/x")).read() == JSON
        assert await (await client.request("GET", f"{url}/x")).read() == JSON
        await client.close()
        assert counting.connections == 1
        system_only = HttpClient()  # the system's authorities do not know the test CA
        with pytest.raises(ConnectError, match="certificate"):
            await system_only.request("GET", f"{url}/x", connect_timeout=10)
        await system_only.close()
    async with server(Counting(), tls_server_context(ca, "other.example")) as url:
        client = HttpClient(ssl_context=trusting)
        with pytest.raises(ConnectError, match="certificate"):  # a trusted CA, the wrong host name
            await client.request("GET", f"{url}/x", connect_timeout=10)
        await client.close()


async def test_the_gateway_refuses_an_untrusted_upstream_certificate_with_a_502(
    client: httpx.AsyncClient, admin: dict[str, str], ca: trustme.CA
) -> None:
    chat = b'{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    async with server(Counting(lambda head, body: answer(chat)), tls_server_context(ca, "localhost")) as url:
        body = {"name": "tls", "base_url": f"{url}/v1", "api_key": "sk-tls-upstream-secret",
                "models": [{"name": "tls-model"}]}
        assert (await client.post("/api/v1/providers", json=body, headers=admin)).status_code == 201
        _, secret = await create_key(client, admin)
        request = {"model": "tls-model", "messages": []}
        resp = await client.post("/v1/chat/completions", json=request, headers=bearer(secret))
        error = assert_error(resp, 502, "upstream_error")
        assert "certificate" in error["message"] and "sk-tls-upstream-secret" not in resp.text


async def test_the_gateway_reaches_an_https_upstream_signed_by_a_ca_named_in_ssl_cert_file(
    client: httpx.AsyncClient, admin: dict[str, str], ca: trustme.CA, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # read when the gateway's client makes its TLS context
    chat = b'{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    counting = Counting(lambda head, body: answer(chat))
    async with server(counting, tls_server_context(ca, "localhost")) as url:
        body = {"name": "tls", "base_url": f"{url}/v1", "api_key": "sk-tls-upstream-secret",
                "models": [{"name": "tls-model"}]}
        assert (await client.post("/api/v1/providers", json=body, headers=admin)).status_code == 201
        _, secret = await create_key(client, admin)
        for _ in range(2):
            resp = await client.post("/v1/chat/completions", json={"model": "tls-model", "messages": []},
                                     headers=bearer(secret))
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
    assert counting.connections == 1 and b"\r\nauthorization: Bearer sk-tls-upstream-secret\r\n" in \
        counting.requests[0][0]


async def test_a_read_timeout_holds_per_wait_on_a_reused_connection() -> None:
    """The read timeout is one timer per connection (not one per wait): a timer armed for an earlier wait
    never cuts a later one short, and a shorter timeout than the one it was armed for still fires on time."""
    delays = [0.0, 0.6, 30.0]  # the answer to each request comes after this long (the last: never)
    connections: list[int] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while await read_request(reader) is not None:
            await asyncio.sleep(delays.pop(0))
            writer.write(answer())
            await writer.drain()

    client = HttpClient()
    async with server(slow) as url:
        loop = asyncio.get_running_loop()
        first = await client.request("POST", url, {}, b"x", read_timeout=1.0)
        await first.read()  # the connection's timer stays armed a second after this wait began
        await asyncio.sleep(0.5)
        second = await client.request("POST", url, {}, b"x", read_timeout=1.0)  # answered 0.6 s later
        assert await second.read() == JSON
        started = loop.time()
        with pytest.raises(TimeoutError):
            await client.request("POST", url, {}, b"x", read_timeout=0.2)  # the same connection, silent
        assert loop.time() - started < 0.9
    await client.close()
    assert connections == [1]  # all three on one kept-alive connection


async def test_a_prepared_request_is_encoded_once_and_framed_per_body() -> None:
    """HttpClient.prepare: the gateway keeps one per route; each send adds only its body's framing."""
    counting = Counting()
    client = HttpClient()

    async def streamed() -> AsyncIterator[bytes]:
        yield b"stream"

    async with server(counting) as url:
        prepared = client.prepare("POST", f"{url}/v1/chat", {"authorization": "Bearer sk", "Content-Length": "99"})
        for body in (b"one", b"", None, streamed(), b"three"):
            assert await (await client.send(prepared, body)).read() == JSON
    await client.close()
    assert counting.connections == 1
    heads = [head for head, _ in counting.requests]
    framing = [head[len(prepared.head):] for head in heads]
    assert all(head.startswith(prepared.head) for head in heads)
    assert prepared.head.startswith(b"POST /v1/chat HTTP/1.1\r\nhost: 127.0.0.1:")
    # the caller's Content-Length is dropped: framing is the client's (not "99 not in head": the port may hold 99)
    assert b"\r\nauthorization: Bearer sk\r\n" in prepared.head and b"content-length" not in prepared.head.lower()
    assert framing == [b"content-length: 3\r\n\r\n", b"content-length: 0\r\n\r\n", b"content-length: 0\r\n\r\n",
                       b"transfer-encoding: chunked\r\n\r\n", b"content-length: 5\r\n\r\n"]
    assert [body for _, body in counting.requests] == [b"one", b"", b"", b"stream", b"three"]


async def test_the_answers_content_type_and_headers() -> None:
    """content_type is read with the framing; every header is there too, repeated ones joined."""
    def reply(head: bytes, body: bytes) -> bytes:
        if b"/none" in head:
            return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nok"
        packed = gzip.compress(b"event: x\n\n")
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: GZip\r\n"
                b"Content-Length: " + str(len(packed)).encode() + b"\r\n\r\n" + packed)

    client = HttpClient()
    async with server(Counting(reply)) as url:
        plain = await client.request("GET", f"{url}/none")
        assert plain.content_type is None and await plain.read() == b"ok"
        assert plain.headers == {"content-length": "2", "x-a": "1, 2"}
        events = await client.request("GET", f"{url}/events")
        assert events.content_type == "text/event-stream" and await events.read() == b"event: x\n\n"
        assert events.headers["content-encoding"] == "GZip"
    await client.close()
