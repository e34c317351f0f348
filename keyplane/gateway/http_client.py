"""The gateway's upstream HTTP/1.1 client: asyncio protocols + httptools, keep-alive pools, TLS verified.

    HttpClient.request(method, url, headers, body, connect_timeout, read_timeout) -> Response
    HttpClient.prepare(method, url, headers) -> Prepared     the request line and headers, encoded once
    HttpClient.send(prepared, body, connect_timeout, read_timeout) -> Response
    Response: status, content_type, headers (lower-case names), read(limit), chunks(), release(), close()

Why not aiohttp (which this replaces) or another client: measured in bench/upstream_clients.py and
docs/performance.md. aiohttp spent ~40% of a proxied request's CPU building requests, in its connector,
writer, parser and timers; this client does only what the gateway needs:

- one keep-alive pool per upstream (scheme, host, port), at most ``max_connections`` in use each, the most
  recently used connection first; an idle connection older than ``idle_seconds`` is closed instead of
  reused (a server closes idle connections too: uvicorn after 5 s), one the server closed is never taken;
- TLS with certificate and host-name verification (``ssl.create_default_context()``: the system's CAs,
  ``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured; or a context passed in);
- timeouts per phase: connecting (pool wait included), then each wait for data (the headers, every chunk),
  never a whole (possibly long) stream;
- a request that met a stale pooled connection (the connection was reused, the peer closed or reset it and
  not one byte of an answer came back) is sent again once on a new connection: the server closed an idle
  connection, it did not process the request. A timeout is never retried; nor is a streamed request body;
- answers with Content-Length, chunked or read to the connection's end; gzip/deflate decoded when a server
  sends them unasked; bodies relayed as they arrive with back-pressure (reading pauses past 1 MiB buffered);
  request bodies as bytes, or an async iterator sent chunked with back-pressure;
- cancellation: a request or a read cancelled (the client left) closes the connection, so the upstream sees it.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import httptools

_HIGH_WATER = 1024 * 1024  # bytes of answer buffered before the connection stops reading
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# the lengths of content-length, transfer-encoding, content-encoding, content-type: other names are skipped
_SIZES_READ = frozenset({14, 17, 16, 12})


class HttpClientError(Exception):
    """The upstream could not be reached or broke the exchange (never a timeout: that is TimeoutError)."""


class ConnectError(HttpClientError):
    pass


class ConnectionLost(HttpClientError):
    pass


class ProtocolError(HttpClientError):
    pass


class BodyTooLarge(HttpClientError):
    pass


class InvalidHeader(HttpClientError):
    pass


def _timed_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection, one exchange at a time; also the httptools parser's callback target."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.response: Response | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        # The read timeout: one timer per connection, re-armed only when it fires early (see Response._wait).
        self.deadline = 0.0  # loop time by which the answer's current wait must have been woken; 0: no wait
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # when it fires

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or self.parser is None:  # bytes nobody asked for: this connection is unusable
            self.close()
            return
        response.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response.fail(ProtocolError(f"invalid HTTP answer: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop_timer()
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionLost("the connection closed while sending"))
        response = self.response
        if response is not None and not response.complete:
            if response.status and not response.framed:
                response.on_message_complete()  # a body delimited by the connection's end
            else:
                response.fail(ConnectionLost("the upstream closed the connection" if exc is None
                                             else f"the connection broke: {type(exc).__name__}"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the read timeout --------------------------------------------------------------------------------
    def _check_deadline(self) -> None:
        self.timer = None
        if not self.deadline:
            return  # nobody waits: the next wait arms the timer again
        left = self.deadline - self.loop.time()
        if left > 0:  # the wait it was armed for ended and a later one began: wait for that one's deadline
            self._arm()
            return
        response = self.response
        waiter = response._waiter if response is not None else None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def _arm(self) -> None:
        self.timer_at = self.deadline
        self.timer = self.loop.call_at(self.deadline, self._check_deadline)

    def _drop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- the pool's side ---------------------------------------------------------------------------------
    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._drop_timer()
            if self.transport is not None:
                self.transport.close()

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None
        if self.closed:
            raise ConnectionLost("the connection closed while sending")


class Response:
    """One answer: status and headers as soon as they are in, the body as it arrives."""

    __slots__ = ("_decoder", "_header_map", "_timeout", "_waiter", "buffered", "chunks_in", "complete", "conn",
                 "content_type", "error", "framed", "got_bytes", "keep_alive", "raw_headers", "released", "status")

    def __init__(self, conn: _Connection, read_timeout: float | None) -> None:
        self.conn = conn
        self.status = 0
        self.content_type: str | None = None  # the answer's Content-Type, without building ``headers``
        self._header_map: dict[str, str] | None = None
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.chunks_in: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.framed = True  # Content-Length or chunked (not read to the connection's end)
        self.error: BaseException | None = None
        self.got_bytes = False
        self.keep_alive = False
        self.released = False
        self._timeout = read_timeout
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: Any = None

    # -- httptools callbacks (through the connection) ----------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    @property
    def headers(self) -> dict[str, str]:
        """Every header by lower-case name (repeated ones joined by ", "); built when first asked for:
        the gateway's relay needs only what :meth:`on_headers_complete` reads."""
        headers = self._header_map
        if headers is None:
            headers = self._header_map = {}
            for name, value in self.raw_headers:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return headers

    def on_headers_complete(self) -> None:
        parser = self.conn.parser
        assert parser is not None
        self.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        framed = False
        encoding = b""
        content_type: bytes | None = None
        for name, value in self.raw_headers:  # only the headers this client acts on (framing, encoding)
            if len(name) in _SIZES_READ:
                name = name.lower()
                if name == b"content-length":
                    framed = True
                elif name == b"transfer-encoding":
                    framed = framed or b"chunked" in value
                elif name == b"content-encoding":
                    encoding = encoding + b", " + value if encoding else value
                elif name == b"content-type":
                    content_type = value if content_type is None else content_type + b", " + value
        if content_type is not None:
            self.content_type = content_type.decode("latin-1")
        if not framed:
            self.framed = self.status < 200 or self.status in (204, 304)
        if encoding:
            wbits = _ENCODINGS.get(encoding.decode("latin-1").strip().lower())
            if wbits is not None:
                self._decoder = zlib.decompressobj(wbits)
        if 100 <= self.status < 200:  # an interim answer (100 Continue): wait for the real one
            self.status, self.raw_headers, self._header_map, self._decoder = 0, [], None, None
            self.content_type, self.framed = None, True
            return
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error:
                self.fail(ProtocolError("the answer's compressed body is corrupt"))
                self.conn.close()
                return
        self.chunks_in.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and self.conn.transport is not None:
            self.conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an interim answer
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self.chunks_in.append(rest)
                self.buffered += len(rest)
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = error
            self._wake()

    # -- waiting ----------------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wait(self) -> asyncio.Future[None]:
        """A future the parser completes when it has news, or set to TimeoutError after ``read_timeout``:
        awaited by the caller, then :meth:`_waited` (a plain function and a future, not a coroutine per wait).
        Not a ``call_later`` and a ``cancel`` per wait (two per request, ~2 µs): the connection's one timer,
        armed at the first wait's deadline, finds a later deadline when it fires early and waits again."""
        conn = self.conn
        loop = conn.loop
        waiter = self._waiter = loop.create_future()
        if self._timeout:
            conn.deadline = loop.time() + self._timeout
            if conn.timer is None:
                conn._arm()
            elif conn.timer_at > conn.deadline:  # a shorter timeout than the wait it was armed for
                conn.timer.cancel()
                conn._arm()
        return waiter

    def _waited(self) -> None:
        self._waiter = None
        self.conn.deadline = 0.0

    def _take(self) -> list[bytes]:
        chunks, self.chunks_in, self.buffered = self.chunks_in, [], 0
        transport = self.conn.transport
        if transport is not None and not self.complete and not self.conn.closed:
            transport.resume_reading()  # a no-op unless paused
        return chunks

    # -- the caller's side ------------------------------------------------------------------------------
    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (refused past ``limit`` bytes); the connection goes back to the pool."""
        try:
            parts: list[bytes] = []
            size = 0
            while True:
                if self.chunks_in:
                    taken = self._take()
                    parts.extend(taken)
                    size += sum(len(c) for c in taken) if len(taken) > 1 else len(taken[0])
                    if limit is not None and size > limit:
                        raise BodyTooLarge(f"the answer is larger than {limit} bytes")
                if self.complete:
                    break
                if self.error is not None:
                    raise self.error
                try:
                    await self._wait()
                finally:
                    self._waited()
        except BaseException:
            self.close()
            raise
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (no empty chunks); the connection goes back to the pool at its end."""
        try:
            while True:
                if self.chunks_in:
                    for chunk in self._take():
                        if chunk:
                            yield chunk
                    continue
                if self.complete:
                    break
                if self.error is not None:
                    raise self.error
                try:
                    await self._wait()
                finally:
                    self._waited()
        except BaseException:
            self.close()
            raise
        self.release()

    def release(self) -> None:
        """Done with the answer: a complete one leaves its connection to the pool, anything else closes it."""
        if self.released:
            return
        self.released = True
        conn = self.conn
        reusable = self.complete and self.keep_alive and self.error is None and not conn.closed
        conn.response, conn.parser = None, None
        if not reusable:
            conn.close()
        conn.pool.put_back(conn, reusable)

    def close(self) -> None:
        """Drop the connection (mid-answer: the upstream sees the cancellation)."""
        if not self.released:
            self.conn.close()
            self.release()


class _Pool:
    """The connections to one (scheme, host, port)."""

    def __init__(self, client: HttpClient, scheme: str, host: str, port: int) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.tls = scheme == "https"
        self.host_header = host if port == (443 if self.tls else 80) else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            self.host_header = f"[{host}]" if port == (443 if self.tls else 80) else f"[{host}]:{port}"
        self.idle: list[_Connection] = []
        self.in_use = 0
        self.waiters: list[asyncio.Future[None]] = []

    def take(self) -> _Connection | None:
        """An idle connection and a slot without waiting (no coroutine: the usual case); None if there is
        none to reuse or no slot free (then :meth:`acquire`)."""
        if self.in_use >= self.client.max_connections or not self.idle:
            return None
        conn = self._reuse()
        if conn is not None:
            self.in_use += 1
        return conn

    def _reuse(self) -> _Connection | None:
        """The most recently used idle connection still fit to send on (the others found on the way are
        closed), marked reused; None if there is none."""
        idle = self.idle
        limit = time.monotonic() - self.client.idle_seconds
        while idle:
            conn = idle.pop()
            if conn.closed or conn.idle_since < limit or conn.transport is None or conn.transport.is_closing():
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    async def acquire(self, connect_timeout: float | None, fresh: bool) -> _Connection:
        if self.in_use >= self.client.max_connections:
            await self._wait_turn(connect_timeout)
        self.in_use += 1
        try:
            if not fresh:
                conn = self._reuse()
                if conn is not None:
                    return conn
            return await self._connect(connect_timeout)
        except BaseException:
            self._free_slot()
            raise

    async def _wait_turn(self, connect_timeout: float | None) -> None:
        while self.in_use >= self.client.max_connections:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            handle = self.loop.call_later(connect_timeout, _timed_out, waiter) if connect_timeout else None
            try:
                await waiter
            except BaseException:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_next()  # handed a turn it will not take: pass it on
                raise
            finally:
                if handle is not None:
                    handle.cancel()

    async def _connect(self, connect_timeout: float | None) -> _Connection:
        ssl_context = self.client.ssl_context() if self.tls else None
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=ssl_context,
                    server_hostname=self.host if self.tls else None)
        except TimeoutError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(f"the upstream's TLS certificate was refused: {exc.verify_message}") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"could not connect: {type(exc).__name__}") from None
        return conn

    def put_back(self, conn: _Connection, reusable: bool) -> None:
        if reusable:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
            if len(self.idle) > self.client.max_connections:
                self.idle.pop(0).close()
        self._free_slot()

    def _free_slot(self) -> None:
        self.in_use -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class Prepared:
    """A request's pool and its head up to the framing headers, encoded (:meth:`HttpClient.prepare`)."""

    __slots__ = ("head", "pool", "sends_length")

    def __init__(self, pool: _Pool, head: bytes, sends_length: bool) -> None:
        self.pool = pool
        self.head = head
        self.sends_length = sends_length  # POST, PUT, PATCH: "content-length: 0" without a body


def _check(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise InvalidHeader("a header name or value holds a line break")
    return text


class HttpClient:
    """Pooled HTTP/1.1 to every upstream; create it (or its first request) on the event loop that uses it."""

    def __init__(self, max_connections: int = 200, ssl_context: ssl.SSLContext | None = None,
                 idle_seconds: float = 4.0, user_agent: str = "keyplane") -> None:
        self.max_connections = max_connections
        self.idle_seconds = idle_seconds
        self.user_agent = user_agent
        self._ssl_context = ssl_context
        self._pools: dict[str, _Pool] = {}

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # verifies the certificate and the host name
        return self._ssl_context

    def _pool(self, url: str) -> tuple[_Pool, str]:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise ConnectError("not an http(s) URL")  # the URL is not echoed: it may hold a credential
        slash = rest.find("/")
        authority, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
        query = authority.find("?")
        if query >= 0:
            authority, target = authority[:query], "/" + authority[query:]
        key = scheme + "://" + authority
        pool = self._pools.get(key)
        if pool is None:
            if "@" in authority:
                raise ConnectError("credentials in an upstream URL are not supported: use headers")
            host, port = authority, 443 if scheme == "https" else 80
            try:
                if authority.startswith("["):
                    end = authority.find("]")
                    host = authority[1:end]
                    if authority[end + 1:end + 2] == ":":
                        port = int(authority[end + 2:])
                elif ":" in authority:
                    host, _, raw_port = authority.rpartition(":")
                    port = int(raw_port)
            except ValueError:
                raise ConnectError("the URL's port is not a number") from None
            if not host:
                raise ConnectError("no host in the URL")
            pool = self._pools[key] = _Pool(self, scheme, host, port)
        return pool, target

    def prepare(self, method: str, url: str, headers: dict[str, str] | None = None) -> Prepared:
        """The request line and headers, checked and encoded once: :meth:`send` adds only the framing.
        A prepared request belongs to this client and is void once the client is closed."""
        pool, target = self._pool(url)
        lines = [f"{method} {target} HTTP/1.1\r\nhost: {pool.host_header}\r\n"]
        has_agent = False
        for name, value in (headers or {}).items():
            lower = name.lower()
            if lower in _OWN_HEADERS:
                continue  # framing is this client's: never a caller's (or an upstream configuration's)
            lines.append(f"{_check(name)}: {_check(value)}\r\n")
            has_agent = has_agent or lower == "user-agent"
        if not has_agent:
            lines.append(f"user-agent: {self.user_agent}\r\n")
        return Prepared(pool, "".join(lines).encode("latin-1"), method in ("POST", "PUT", "PATCH"))

    async def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                      body: bytes | AsyncIterable[bytes] | None = None, *, connect_timeout: float | None = None,
                      read_timeout: float | None = None) -> Response:
        """Send a request; return once the answer's status and headers are in (see :meth:`send`)."""
        return await self.send(self.prepare(method, url, headers), body, connect_timeout=connect_timeout,
                               read_timeout=read_timeout)

    async def send(self, prepared: Prepared, body: bytes | AsyncIterable[bytes] | None = None, *,
                   connect_timeout: float | None = None, read_timeout: float | None = None) -> Response:
        """Send a prepared request with this body; return once the answer's status and headers are in.

        Raises TimeoutError (connecting, or waiting ``read_timeout`` for the answer) or HttpClientError.
        """
        pool, head = prepared.pool, prepared.head
        streamed = body is not None and type(body) is not bytes and not isinstance(body, bytearray | memoryview)
        if streamed:
            head += b"transfer-encoding: chunked\r\n\r\n"
        elif body:
            head += b"content-length: %d\r\n\r\n" % len(body)  # type: ignore[arg-type]
        elif prepared.sends_length:
            head += b"content-length: 0\r\n\r\n"
        else:
            head += b"\r\n"
        retried = False
        while True:
            conn = None if retried else pool.take()
            if conn is None:
                conn = await pool.acquire(connect_timeout, fresh=retried)
            response = Response(conn, read_timeout)
            conn.response = response
            conn.parser = httptools.HttpResponseParser(response)
            try:
                transport = conn.transport
                assert transport is not None
                if streamed:
                    transport.write(head)
                    await self._send_chunked(conn, body)  # type: ignore[arg-type]
                elif body:
                    transport.writelines((head, body))  # type: ignore[arg-type]
                else:
                    transport.write(head)
                while not response.status:
                    if response.error is not None:
                        raise response.error
                    try:
                        await response._wait()
                    finally:
                        response._waited()
                return response
            except ConnectionLost:
                stale = conn.reused and not response.got_bytes and not streamed and not retried
                response.close()
                if stale:
                    retried = True
                    continue
                raise
            except BaseException:
                response.close()  # cancelled or timed out mid-exchange: the upstream sees the connection close
                raise

    @staticmethod
    async def _send_chunked(conn: _Connection, body: AsyncIterable[bytes]) -> None:
        transport = conn.transport
        assert transport is not None
        async for chunk in body:
            if chunk:
                transport.writelines((f"{len(chunk):x}\r\n".encode(), chunk, b"\r\n"))
                await conn.drain()
        transport.write(b"0\r\n\r\n")

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
