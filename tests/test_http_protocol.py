"""keyplane's httptools protocol (keyplane/http_protocol.py, what ``keyplane serve`` runs): the same bytes on
the wire as uvicorn's, for less per request. A Content-Length answer leaves in one write with its headers
(a stream's headers still leave at once); the keep-alive timeout is one timer per idle period, and an
idle connection is still closed once that timeout has passed since its last answer, never before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from keyplane.http_protocol import ShapedHttpToolsProtocol

REQUEST = b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhi"


class Transport(asyncio.Transport):
    """Records what the protocol writes, as separate writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.wrote = asyncio.Event()
        self.closing = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.wrote.set()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True
        self.closing.set()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class CountingLoop:
    """The running loop, counting the timers asked of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers = 0

    def call_later(self, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_later(*args, **kwargs)

    def call_at(self, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_at(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def connect(app: Any, **config: Any) -> tuple[ShapedHttpToolsProtocol, Transport, CountingLoop]:
    loop = CountingLoop(asyncio.get_running_loop())
    settings = uvicorn.Config(app, http=ShapedHttpToolsProtocol, lifespan="off", log_config=None,
                              access_log=False, **config)
    protocol = ShapedHttpToolsProtocol(config=settings, server_state=ServerState(), app_state={},
                                       _loop=loop)  # type: ignore[arg-type]
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport, loop


async def exchange(protocol: ShapedHttpToolsProtocol, transport: Transport, request: bytes = REQUEST) -> bytes:
    """Send one request, return what was written for it once its answer is complete."""
    start = len(transport.writes)
    done = protocol.server_state.total_requests + 1
    protocol.data_received(request)
    async with asyncio.timeout(5):
        while protocol.server_state.total_requests < done:
            transport.wrote.clear()
            await transport.wrote.wait()
    return b"".join(transport.writes[start:])


async def plain(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def test_a_content_length_answer_leaves_in_one_write_with_its_headers() -> None:
    protocol, transport, _ = connect(plain)
    written = await exchange(protocol, transport)
    assert len(transport.writes) == 1  # uvicorn's own protocol writes the headers, then the body
    assert written.startswith(b"HTTP/1.1 200 OK\r\n") and written.endswith(b'\r\n\r\n{"ok":true}')
    assert b"content-length: 11\r\n" in written
    # HEAD: the same headers, no body, still one write
    head = await exchange(protocol, transport, REQUEST.replace(b"POST", b"HEAD"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"content-length: 11\r\n\r\n")
    assert len(transport.writes) == 2


async def test_a_streamed_answer_has_its_headers_written_before_its_first_chunk() -> None:
    go_on = asyncio.Event()

    async def streaming(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await go_on.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": False})

    protocol, transport, _ = connect(streaming)
    protocol.data_received(REQUEST)
    async with asyncio.timeout(5):
        await transport.wrote.wait()
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in \
        transport.writes[0]
    go_on.set()
    async with asyncio.timeout(5):
        while protocol.server_state.total_requests < 1:
            transport.wrote.clear()
            await transport.wrote.wait()
    assert b"".join(transport.writes[1:]) == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"


async def test_the_keep_alive_timeout_is_one_timer_per_idle_period_not_one_per_request() -> None:
    protocol, transport, loop = connect(plain)
    for _ in range(50):
        await exchange(protocol, transport)
    assert loop.timers == 1  # uvicorn's protocol: 50 (a call_later per answer, cancelled by the next request)
    assert not transport.closed


async def test_an_idle_connection_closes_once_the_keep_alive_timeout_has_passed_since_its_last_answer() -> None:
    protocol, transport, _ = connect(plain, timeout_keep_alive=1)
    loop = asyncio.get_running_loop()
    await exchange(protocol, transport)
    await asyncio.sleep(0.6)  # the request that follows comes 0.6 s later, within the first timer's second
    await exchange(protocol, transport)
    last_answer = loop.time()
    async with asyncio.timeout(5):
        await transport.closing.wait()
    idle = loop.time() - last_answer
    assert 0.95 <= idle < 2.0, idle  # a second idle after the last answer, not after the first
    protocol.connection_lost(None)
    assert protocol.timeout_keep_alive_task is None


async def test_an_app_failing_after_starting_a_content_length_answer_still_sends_its_head_then_closes() -> None:
    """uvicorn writes the status line and headers at ``http.response.start``; keyplane holds them for the
    body. When no body comes (the app raises, returns, or sends more than its Content-Length), they must
    still leave before the connection closes: a client that got not one byte on a reused connection takes
    it for one the server closed while idle, and may send the request again (keyplane's own upstream client
    does, POSTs included): an answer the app began must not look like a request never processed."""

    async def raises(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
        raise RuntimeError("the upstream failed")

    async def returns(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})

    async def too_long(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    for app in (raises, returns, too_long):
        protocol, transport, _ = connect(app)
        protocol.data_received(REQUEST)
        async with asyncio.timeout(5):
            await transport.closing.wait()
        written = b"".join(transport.writes)
        assert written.startswith(b"HTTP/1.1 200 OK\r\n") and written.endswith(b"\r\n\r\n"), (app.__name__, written)
        assert protocol.server_state.total_requests == 0  # the answer never completed


async def test_a_post_whose_app_fails_after_starting_its_answer_is_not_sent_twice_by_the_gateway_client() -> None:
    from keyplane.gateway.http_client import ConnectionLost, HttpClient
    from tests.processes import serve

    posts = 0

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal posts
        if scope["method"] == "POST":
            await receive()
            posts += 1  # the upstream did the work (and charged for it), then failed mid-answer
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
            raise RuntimeError("failed after starting the answer")
        await plain(scope, receive, send)

    client = HttpClient()
    async with serve(upstream) as url:
        first = await client.request("GET", f"{url}/warm", read_timeout=5)  # the POST reuses this connection
        assert await first.read() == b'{"ok":true}'
        with pytest.raises(ConnectionLost):  # the answer was cut: the request fails, once
            answer = await client.request("POST", f"{url}/v1/chat/completions", body=b"{}", read_timeout=5)
            await answer.read()
    await client.close()
    assert posts == 1


def test_on_another_uvicorn_keyplane_keeps_its_error_shape_and_uvicorns_own_request_cycle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean protocol copies uvicorn 0.54's request cycle: a different uvicorn gets its own cycle (so an
    upgrade cannot break the data plane through a copied method), still answering malformed HTTP in JSON."""
    from keyplane import http_protocol as module

    assert module.http_protocol() is ShapedHttpToolsProtocol  # the installed uvicorn is the one it was written for
    monkeypatch.setattr(uvicorn, "__version__", "0.99.0")
    chosen = module.http_protocol()
    assert chosen is module.ShapedOnlyHttpToolsProtocol
    assert "send" not in vars(chosen) and "on_headers_complete" not in vars(chosen)
    assert chosen.send_400_response is ShapedHttpToolsProtocol.send_400_response


# -- the lean request cycle: uvicorn's ASGI behaviour, for less per request ---------------------------------

async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the whole request body, read message by message."""
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request" and isinstance(message["body"], bytes)
        body += message["body"]
        if not message["more_body"]:
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def test_a_request_whose_body_came_with_its_head_is_answered_without_an_asyncio_event(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn makes an ``asyncio.Event`` per request for ``receive()`` to wait on; a body that has arrived
    with its head needs no waiting (the common data-plane request)."""
    made = 0

    class Counted(asyncio.Event):
        def __init__(self) -> None:
            nonlocal made
            made += 1
            super().__init__()

    protocol, transport, _ = connect(echo)
    monkeypatch.setattr(asyncio, "Event", Counted)
    for _ in range(3):
        assert (await exchange(protocol, transport)).endswith(b"\r\n\r\nhi")
    assert made == 0


async def test_a_body_in_pieces_and_a_chunked_body_reach_the_app_whole() -> None:
    protocol, transport, _ = connect(echo)
    protocol.data_received(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nhel")
    for piece in (b"lo", b"wor", b"ld"):  # the app waits for each
        await asyncio.sleep(0.01)
        protocol.data_received(piece)
    async with asyncio.timeout(5):
        while protocol.server_state.total_requests < 1:
            transport.wrote.clear()
            await transport.wrote.wait()
    assert b"".join(transport.writes).endswith(b"content-length: 10\r\n\r\nhelloworld")
    chunks = b"".join(b"1\r\n%c\r\n" % (97 + i % 26) for i in range(3000))  # many pieces in one read
    chunked = b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    answer = await exchange(protocol, transport, chunked)
    assert answer.endswith(b"\r\n\r\n" + bytes(97 + i % 26 for i in range(3000)))


async def test_expect_100_continue_is_answered_when_the_app_reads_the_body() -> None:
    protocol, transport, _ = connect(echo)
    protocol.data_received(b"POST /x HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
    async with asyncio.timeout(5):
        await transport.wrote.wait()
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    answer = await exchange(protocol, transport, b"hi")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhi")


async def test_pipelined_requests_are_answered_in_order() -> None:
    protocol, transport, _ = connect(echo)
    second = REQUEST.replace(b"\r\n\r\nhi", b"\r\n\r\nho")
    protocol.data_received(REQUEST + second)
    async with asyncio.timeout(5):
        while protocol.server_state.total_requests < 2:
            transport.wrote.clear()
            await transport.wrote.wait()
    written = b"".join(transport.writes)
    assert written.count(b"HTTP/1.1 200 OK") == 2 and written.index(b"hi") < written.index(b"ho")


async def test_a_client_leaving_mid_answer_is_seen_by_a_waiting_receive() -> None:
    """What gateway/asgi.py relay_until_client_leaves waits on: after the body, ``receive()`` returns
    ``http.disconnect`` once the connection is lost."""
    seen: list[str] = []
    returned = asyncio.Event()

    async def streaming(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        seen.append((await receive())["type"])
        returned.set()

    protocol, transport, _ = connect(streaming)
    protocol.data_received(REQUEST)
    async with asyncio.timeout(5):
        await transport.wrote.wait()
    await asyncio.sleep(0.01)
    assert seen == []  # still waiting
    protocol.connection_lost(None)
    async with asyncio.timeout(5):
        await returned.wait()
    assert seen == ["http.disconnect"]


async def test_an_answer_header_with_a_forbidden_byte_is_refused_in_uvicorns_words() -> None:
    errors: list[str] = []

    async def bad(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"2"), (b"x-fine", b"1"), (b"x-bad", b"a\r\nx-evil: 1")]})
        except RuntimeError as exc:
            errors.append(str(exc))
            raise

    protocol, transport, _ = connect(bad)
    protocol.data_received(REQUEST)
    async with asyncio.timeout(5):
        await transport.closing.wait()
    assert errors == ["Invalid HTTP header value."]
    assert b"x-evil" not in b"".join(transport.writes)


async def test_answer_headers_uvicorn_accepts_still_pass_off_the_fast_path() -> None:
    """A tab, a byte above 0x7f or a name with "_" is not what the check without a regular expression
    passes: the expressions decide, as in uvicorn."""
    headers = [(b"content-length", b"2"), (b"x_under", b"a\tb"), (b"x-latin", b"caf\xe9 \x85")]

    async def odd(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol, transport, _ = connect(odd)
    answer = await exchange(protocol, transport)
    assert b"x_under: a\tb\r\nx-latin: caf\xe9 \x85\r\n" in answer and answer.endswith(b"\r\n\r\nok")


# -- slowloris: connections that never finish asking are closed (uvicorn 0.54 keeps them open forever) --------

async def test_a_connection_that_never_sends_a_request_is_closed_after_the_keep_alive_timeout() -> None:
    _protocol, transport, _ = connect(plain, timeout_keep_alive=1)
    loop = asyncio.get_running_loop()
    opened = loop.time()
    async with asyncio.timeout(5):
        await transport.closing.wait()
    assert 0.95 <= loop.time() - opened < 2.0


async def test_a_stray_line_break_after_an_answer_does_not_keep_the_connection_open() -> None:
    protocol, transport, _ = connect(plain, timeout_keep_alive=1)
    await exchange(protocol, transport)
    protocol.data_received(b"\r\n")  # not a request: uvicorn's protocol turned its keep-alive timer off here
    async with asyncio.timeout(5):
        await transport.closing.wait()


async def test_a_request_head_that_never_completes_is_closed_after_the_head_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from keyplane import http_protocol as module

    monkeypatch.setattr(module, "HEAD_TIMEOUT_SECONDS", 0.5)
    protocol, transport, _ = connect(plain, timeout_keep_alive=30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    protocol.data_received(b"POST /x HTTP/1.1\r\nhost: a\r\n")  # and the rest never comes, one byte at a time
    for _ in range(3):
        await asyncio.sleep(0.1)
        protocol.data_received(b"x")
    async with asyncio.timeout(5):
        await transport.closing.wait()
    assert 0.45 <= loop.time() - started < 1.5  # the head's deadline, not the 30 s keep-alive
    assert transport.writes == []


async def test_a_slow_head_that_completes_in_time_is_answered_and_a_long_answer_is_not_cut(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from keyplane import http_protocol as module

    monkeypatch.setattr(module, "HEAD_TIMEOUT_SECONDS", 1.0)

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(1.3)  # longer than both timeouts: a request being answered has no deadline here
        await plain(scope, receive, send)

    protocol, transport, _ = connect(slow, timeout_keep_alive=1)
    for part in (REQUEST[:10], REQUEST[10:30], REQUEST[30:]):
        protocol.data_received(part)
        await asyncio.sleep(0.2)
    async with asyncio.timeout(5):
        while protocol.server_state.total_requests < 1:
            transport.wrote.clear()
            await transport.wrote.wait()
    assert b"".join(transport.writes).endswith(b'{"ok":true}') and not transport.closed


# -- a request head has a size bound (uvicorn's httptools protocol takes any size: 20 MB was taken whole) -----

async def test_a_request_head_past_the_bound_is_refused_with_431_in_keyplanes_shape_and_the_app_never_runs() -> None:
    import orjson

    from keyplane.http_protocol import MAX_HEAD_BYTES

    called = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        called.append(scope["path"])
        await plain(scope, receive, send)

    protocol, transport, _ = connect(app)
    protocol.data_received(b"GET /x HTTP/1.1\r\nhost: a\r\n")
    piece = b"x-filler: " + b"a" * 8_000 + b"\r\n"
    for _ in range(MAX_HEAD_BYTES // len(piece) + 2):  # one read at a time, as a slow client sends them
        if transport.closed:
            break
        protocol.data_received(piece)
    assert transport.closed and called == []
    answer = b"".join(transport.writes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head
    error = orjson.loads(body)["error"]
    assert error["code"] == "headers_too_large" and str(MAX_HEAD_BYTES) in error["message"]


async def test_a_head_within_the_bound_completed_by_a_read_that_carries_a_large_body_is_answered() -> None:
    protocol, transport, _ = connect(echo)
    body = b"b" * 300_000
    protocol.data_received(b"POST /x HTTP/1.1\r\nhost: a\r\n")
    protocol.data_received(b"x-filler: " + b"a" * 40_000 + b"\r\n")
    start = len(transport.writes)
    done = protocol.server_state.total_requests + 1
    protocol.data_received(b"content-length: %d\r\n\r\n" % len(body) + body)  # past the bound, head complete
    async with asyncio.timeout(5):
        while protocol.server_state.total_requests < done:
            transport.wrote.clear()
            await transport.wrote.wait()
    answer = b"".join(transport.writes[start:])
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(body) and not transport.closed
