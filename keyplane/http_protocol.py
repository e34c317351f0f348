"""uvicorn's HTTP/1.1 protocols, answering a request they cannot parse in keyplane's one error shape.

uvicorn refuses malformed HTTP itself, before any ASGI application runs, with ``400 Invalid HTTP request
received.`` as plain text. These subclasses change that answer. What stays outside keyplane's reach is
listed in docs/security.md (a connection closed without an answer; other ASGI servers' own refusals).

The httptools one (what ``keyplane serve`` runs) also costs less per request, the same bytes on the wire:
a Content-Length answer leaves in one write with its headers, and the keep-alive timeout is one timer per
idle period rather than one per request (docs/performance.md, issue 19).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
import orjson
import uvicorn
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from keyplane.domain.errors import KeyplaneError, invalid_request

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application, ASGIReceiveEvent, ASGISendEvent


def malformed_request_body(reason: str) -> bytes:
    return orjson.dumps(invalid_request(f"Malformed HTTP request: {reason.rstrip('.')}").body())


class ShapedH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = malformed_request_body(msg)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


try:  # httptools is optional: without it uvicorn speaks h11
    import httptools
    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
    from uvicorn.protocols.http.httptools_impl import (
        HEADER_RE,
        HEADER_VALUE_RE,
        STATUS_LINE,
        HttpToolsProtocol,
    )
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

# A request head (request line and headers) must arrive within this long of its first byte, else the
# connection is closed (nginx's client_header_timeout is 60 s; a head is a few KB).
HEAD_TIMEOUT_SECONDS = 10.0
# ... and hold at most this many bytes once its first read is in (a read is at most 256 KB on uvloop): else
# 431 and the connection closed. uvicorn's httptools protocol has no bound (a 20 MB head was taken whole);
# h11 stops at 16 KB, nginx at 4 × 8 KB. keyplane's requests carry a key and a few headers.
MAX_HEAD_BYTES = 64 * 1024
_JOIN_BELOW = 64 * 1024  # a body up to this size is copied after the headers (one buffer); larger: writev


def _nothing() -> None:
    pass

if HttpToolsProtocol is not None:
    class _Cycle:
        """One request and its answer: uvicorn's ``RequestResponseCycle`` (0.54), its ASGI behaviour unchanged,
        for less per request.

        - An answer framed by Content-Length has its status line and headers written together with its first
          body message, one ``transport.write`` (one system call, one TCP segment for a small answer) instead
          of two. Chunked answers (streams) still have their headers written at once. An answer abandoned
          before its body still has its head written before the connection closes (``_abandon``), the bytes
          uvicorn sends.
        - No ``asyncio.Event`` per request: whether a message waits for ``receive()`` is a flag; an Event is
          made only when ``receive()`` has to wait (a body still arriving, a stream's watch for the client
          leaving). A body that arrived in one piece is handed over as it came, not copied.
        - The answer's headers are checked for forbidden bytes over all names and over all values at once
          (uvicorn's two expressions are one character class each, so joining changes nothing), the usual
          ones (alphanumeric names and "-", printable values) without a regular expression at all, instead
          of two searches per header; on a match, header by header, for uvicorn's exact error.
        - Slots, and only the state uvicorn's cycle uses.
        """

        __slots__ = ("body", "chunked_encoding", "disconnected", "event", "expected_content_length", "flow", "head",
                     "keep_alive", "more_body", "on_response", "pending", "protocol", "response_complete",
                     "response_started", "scope", "transport", "waiting_for_100_continue")

        def __init__(self, scope: dict[str, Any], protocol: ShapedHttpToolsProtocol, keep_alive: bool) -> None:
            self.scope = scope
            self.protocol = protocol  # its logger, access logger and default headers
            self.transport = protocol.transport
            self.flow = protocol.flow
            self.keep_alive = keep_alive
            self.waiting_for_100_continue = protocol.expect_100_continue
            self.on_response: Callable[[], None] = protocol.on_response_complete
            self.disconnected = False
            self.body: bytes | bytearray = b""
            self.more_body = True
            self.pending = False  # a message waits for receive() (uvicorn: its message_event is set)
            self.event: asyncio.Event | None = None  # made by a receive() that has to wait
            self.response_started = False
            self.response_complete = False
            self.chunked_encoding: bool | None = None
            self.expected_content_length = 0
            self.head: bytes | None = None  # a Content-Length answer's status line and headers, not yet written

        def wake(self) -> None:
            """uvicorn's ``message_event.set()``."""
            self.pending = True
            if self.event is not None:
                self.event.set()

        def _write_head(self) -> None:
            if self.head is not None:
                self.transport.write(self.head)
                self.head = None

        def _abandon(self) -> None:
            """Close the connection on an answer the app began and will not finish, as uvicorn does, but
            with its head written first (uvicorn wrote it at ``http.response.start``): a client that got
            not one byte takes the closed connection for an idle one the server dropped, and may send the
            request again, a POST too (keyplane's own upstream client does)."""
            if not self.disconnected and not self.transport.is_closing():  # uvloop refuses a write once closed
                self._write_head()
            self.transport.close()

        async def run_asgi(self, app: ASGI3Application) -> None:
            """uvicorn's (0.54), closing through ``_abandon``."""
            logger = self.protocol.logger
            try:
                result = await app(self.scope, self.receive, self.send)  # type: ignore[arg-type,func-returns-value]
            except BaseException as exc:
                logger.error("Exception in ASGI application\n", exc_info=exc)
                if not self.response_started:
                    await self.send_500_response()
                else:
                    self._abandon()
            else:
                if result is not None:
                    logger.error("ASGI callable should return None, but returned '%s'.", result)
                    self._abandon()
                elif not self.response_started and not self.disconnected:
                    logger.error("ASGI callable returned without starting response.")
                    await self.send_500_response()
                elif not self.response_complete and not self.disconnected:
                    logger.error("ASGI callable returned without completing response.")
                    self._abandon()
            finally:
                self.on_response = _nothing

        async def send_500_response(self) -> None:
            await self.send({"type": "http.response.start", "status": 500,
                             "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"),
                                         (b"connection", b"close")]})
            await self.send({"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})

        async def send(self, message: ASGISendEvent) -> None:
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()  # pragma: no cover

            if self.disconnected:
                return

            if not self.response_started:
                if message["type"] != "http.response.start":
                    raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
                self.response_started = True
                self.waiting_for_100_continue = False

                status_code = message["status"]  # type: ignore[typeddict-item]
                headers = [*self.protocol.server_state.default_headers, *message.get("headers", ())]
                if self.protocol.access_log:
                    self.protocol.access_logger.info(
                        '%s - "%s %s HTTP/%s" %d', get_client_addr(self.scope),  # type: ignore[arg-type]
                        self.scope["method"], get_path_with_query_string(self.scope),  # type: ignore[arg-type]
                        self.scope["http_version"], status_code)
                content = [STATUS_LINE[status_code]]
                has_connection_close = False
                for name, value in headers:
                    name = name.lower()
                    if name == b"content-length" and self.chunked_encoding is None:
                        self.expected_content_length = int(value.decode())
                        self.chunked_encoding = False
                    elif name == b"transfer-encoding" and value.lower() == b"chunked":
                        self.expected_content_length = 0
                        self.chunked_encoding = True
                    elif name == b"connection":
                        connection = [token.lower().strip() for token in value.split(b",")]
                        if b"close" in connection:
                            self.keep_alive = False
                            has_connection_close = True
                    content += (name, b": ", value, b"\r\n")
                names, values = b"".join(content[1::4]), b"".join(content[3::4])
                # Letters, digits and "-" in every name, printable characters in every value (what answers carry)
                # pass without a regular expression: neither holds a byte uvicorn's expressions look for.
                if not (names.replace(b"-", b"").isalnum() and values.decode("latin-1").isprintable()) and (
                        HEADER_RE.search(names) or HEADER_VALUE_RE.search(values)):
                    for name, value in headers:  # which one, in uvicorn's order and words
                        if HEADER_RE.search(name):
                            raise RuntimeError("Invalid HTTP header name.")  # pragma: no cover
                        if HEADER_VALUE_RE.search(value):
                            raise RuntimeError("Invalid HTTP header value.")
                if not self.keep_alive and not has_connection_close:
                    content.append(b"connection: close\r\n")
                if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status_code not in (204, 304):
                    self.chunked_encoding = True
                    content.append(b"transfer-encoding: chunked\r\n")
                content.append(b"\r\n")
                if self.chunked_encoding is False:
                    self.head = b"".join(content)  # written with the body
                else:
                    self.transport.write(b"".join(content))

            elif not self.response_complete:
                if message["type"] != "http.response.body":
                    raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")
                body = message.get("body", b"")
                more_body = message.get("more_body", False)
                head = self.head
                if head is not None:
                    self.head = None
                if self.scope["method"] == "HEAD":
                    self.expected_content_length = 0
                    if head is not None:
                        self.transport.write(head)
                elif self.chunked_encoding:
                    content = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
                    if not more_body:
                        content.append(b"0\r\n\r\n")
                    self.transport.write(b"".join(content))
                else:
                    num_bytes = len(body)
                    if num_bytes > self.expected_content_length:
                        if head is not None:
                            self.transport.write(head)  # uvicorn had written it at http.response.start
                        raise RuntimeError("Response content longer than Content-Length")
                    self.expected_content_length -= num_bytes
                    if head is None:
                        self.transport.write(body)
                    elif num_bytes <= _JOIN_BELOW:
                        self.transport.write(head + body)
                    else:
                        self.transport.writelines((head, body))  # one writev, no copy of a large body

                if not more_body:
                    if self.expected_content_length != 0:
                        raise RuntimeError("Response content shorter than Content-Length")
                    self.response_complete = True
                    self.wake()
                    if not self.keep_alive:
                        self.transport.close()
                    self.on_response()

            else:
                raise RuntimeError(f"Unexpected ASGI message '{message['type']}' sent, after response already "
                                   "completed.")

        async def receive(self) -> ASGIReceiveEvent:
            if self.waiting_for_100_continue and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.waiting_for_100_continue = False

            if not self.disconnected and not self.response_complete:
                if self.flow.read_paused:
                    self.flow.resume_reading()
                if not self.pending:
                    event = self.event
                    if event is None:
                        event = self.event = asyncio.Event()
                    await event.wait()
                self.pending = False
                if self.event is not None:
                    self.event.clear()

            if self.disconnected or self.response_complete:
                return {"type": "http.disconnect"}
            body = self.body
            self.body = b""
            return {"type": "http.request", "body": body if type(body) is bytes else bytes(body),
                    "more_body": self.more_body}


    class ShapedOnlyHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with keyplane's error shape for malformed HTTP: what runs on a uvicorn
        other than the one the lean protocol below was written against."""

        def send_400_response(self, msg: str) -> None:
            self.refuse_and_close(400, malformed_request_body(msg))

        def refuse_and_close(self, status: int, body: bytes) -> None:
            """An error in keyplane's shape (``body``, JSON), then the connection closed."""
            content = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend([b"content-type: application/json\r\n",
                            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                            b"connection: close\r\n", b"\r\n", body])
            self.transport.write(b"".join(content))
            self.transport.close()

    class ShapedHttpToolsProtocol(ShapedOnlyHttpToolsProtocol):
        """uvicorn's httptools protocol, with keyplane's error shape for malformed HTTP and cuts in what every
        request costs, none changing what goes on the wire:

        - a lean request cycle (``_Cycle``): a Content-Length answer is written in one write with its headers,
          no ``asyncio.Event`` per request, a body that came in one piece handed over uncopied;
        - the keep-alive timeout is one timer per idle period, not one ``call_later`` and ``cancel`` per
          request: a finished answer notes the time; the timer, when it fires, closes the connection if it
          has been idle ``timeout_keep_alive`` seconds since, else waits for the rest of that time;
        - the scope is built in one go once the head is complete, its ``asgi`` dict one per connection.
        """

        idle_since: float | None = None  # since when no request has begun (opened, or last answer); else None
        head_since: float | None = None  # when the request head now arriving began; None once it is complete
        head_bytes = 0  # bytes read since that head's first read (MAX_HEAD_BYTES)
        cycle: _Cycle  # type: ignore[assignment]

        # -- the keep-alive timeout, one timer per idle period; the request-head timeout ------------------
        # One timer serves both deadlines a connection can be waiting on: idle (no request begun: since the
        # connection opened or its last answer, ``timeout_keep_alive``) and a request head still arriving
        # (since its first byte, HEAD_TIMEOUT_SECONDS). uvicorn has neither a timeout for a connection that
        # never sends a request nor one for a head that never completes (a stray CRLF or a partial head
        # turns its keep-alive timer off): a client could hold connections open forever (slowloris).
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.asgi = {"version": self.asgi_version, "spec_version": "2.3"}
            self._idle_from(self.loop.time())  # a connection that never sends a request is idle from its start

        def _idle_from(self, when: float) -> None:
            self.idle_since = when
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

        def _unset_keepalive_if_required(self) -> None:
            pass  # bytes alone (a stray CRLF) do not end idleness: a request's first byte does (on_message_begin)

        def data_received(self, data: bytes) -> None:
            """uvicorn's, without the keep-alive timer's cancelling (``_unset_keepalive_if_required``), and with
            a bound on a request head's size (``MAX_HEAD_BYTES``): counted per read while a head is arriving,
            not per header: refused when, after a read, the head is still not complete (a read that completes
            it may carry the body after it)."""
            counted = self.head_since is not None  # a head began in an earlier read and is not complete yet
            if counted:
                self.head_bytes += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            # still the same head (a new one starts at 0 bytes), still not complete, past the bound
            if counted and self.head_bytes > MAX_HEAD_BYTES and self.head_since is not None:
                self._refuse_large_head()

        def _refuse_large_head(self) -> None:
            """431 in keyplane's error shape, then close: nothing of the request reaches the app."""
            self.logger.warning("Request head larger than %d bytes: refused.", MAX_HEAD_BYTES)
            self.head_since = None
            self.refuse_and_close(431, orjson.dumps(KeyplaneError(
                431, "headers_too_large",
                f"The request line and headers are limited to {MAX_HEAD_BYTES} bytes").body()))

        def on_message_begin(self) -> None:
            """uvicorn's, but the scope is built once the head is complete (``on_headers_complete``); then the
            request-head timer."""
            self.url = b""
            self.expect_100_continue = False
            self.headers = []
            self.idle_since = None
            self.head_since = now = self.loop.time()
            self.head_bytes = 0
            timer = self.timeout_keep_alive_task
            if timer is None or timer.when() > now + HEAD_TIMEOUT_SECONDS:  # (a keep-alive longer than it)
                if timer is not None:
                    timer.cancel()
                self.timeout_keep_alive_task = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self._idle_check)

        def connection_lost(self, exc: Exception | None) -> None:
            """uvicorn's (0.54), waking the lean cycle; and the timer cancelled."""
            self.connections.discard(self)
            if self.logger.level <= TRACE_LOG_LEVEL:
                prefix = "{}:{} - ".format(*self.client) if self.client else ""
                self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection lost", prefix)
            cycle = self.cycle
            if cycle is not None:
                if not cycle.response_complete:
                    cycle.disconnected = True
                cycle.wake()
            if self.flow is not None:
                self.flow.resume_writing()
            if exc is None:
                self.transport.close()
            self.parser = None  # type: ignore[assignment]
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None

        def on_body(self, body: bytes) -> None:
            """uvicorn's, a first piece kept as it came (no copy), further ones joined in a bytearray."""
            cycle = self.cycle
            if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
                return
            held = cycle.body
            if not held:
                cycle.body = held = body
            else:
                if type(held) is bytes:
                    cycle.body = held = bytearray(held)
                held += body  # type: ignore[operator]
            if len(held) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            cycle.pending = True  # cycle.wake(), inline
            if cycle.event is not None:
                cycle.event.set()

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
                return
            cycle.more_body = False
            cycle.pending = True  # cycle.wake(), inline
            if cycle.event is not None:
                cycle.event.set()

        def on_response_complete(self) -> None:
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self.idle_since = None
            if self.flow.read_paused:
                self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)  # type: ignore[arg-type]
                return
            if self.head_since is None:  # else a pipelined request's head is arriving: its own deadline holds
                self.idle_since = self.loop.time()  # _idle_from, inline
                if self.timeout_keep_alive_task is None:
                    self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

        def _idle_check(self) -> None:
            self.timeout_keep_alive_task = None
            if self.idle_since is not None:
                deadline = self.idle_since + self.timeout_keep_alive
            elif self.head_since is not None:
                deadline = self.head_since + HEAD_TIMEOUT_SECONDS
            else:
                return  # a request is being answered: its answer arms the timer again
            left = deadline - self.loop.time()
            if left > 0:
                self.timeout_keep_alive_task = self.loop.call_later(left, self._idle_check)
            else:
                self.timeout_keep_alive_handler()

        # -- uvicorn's on_headers_complete (0.54), with keyplane's cycle --------------------------------------
        def on_headers_complete(self) -> None:
            """uvicorn's, the scope built here in one dict display (no resize as keys are added), with an
            ``asgi`` dict per connection rather than per request."""
            self.head_since = None
            parser = self.parser
            http_version = parser.get_http_version()
            method = parser.get_method().decode("ascii")
            if parser.should_upgrade() and self._should_upgrade():
                self.scope = {  # what the WebSocket hand-over reads
                    "type": "http", "asgi": self.asgi, "http_version": http_version, "server": self.server,
                    "client": self.client, "scheme": self.scheme, "root_path": self.root_path,
                    "headers": self.headers, "state": self.app_state.copy(), "method": method}
                return
            parsed_url = httptools.parse_url(self.url)
            raw_path = parsed_url.path
            path = raw_path.decode("ascii")
            if "%" in path:
                path = urllib.parse.unquote(path)
            if self.root_path:
                path = self.root_path + path
                raw_path = self.root_path.encode("ascii") + raw_path
            self.scope = scope = {  # type: ignore[typeddict-item]
                "type": "http", "asgi": self.asgi, "http_version": http_version, "server": self.server,
                "client": self.client, "scheme": self.scheme, "root_path": self.root_path, "headers": self.headers,
                "state": self.app_state.copy(), "method": method, "path": path, "raw_path": raw_path,
                "query_string": parsed_url.query or b"",
            }

            if self.limit_concurrency is not None and (
                len(self.connections) >= self.limit_concurrency or len(self.tasks) >= self.limit_concurrency
            ):
                app = service_unavailable
                self.logger.warning("Exceeded concurrency limit.")
            else:
                app = self.app

            existing_cycle = self.cycle
            self.cycle = cycle = _Cycle(scope, self, http_version != "1.0" and parser.should_keep_alive())
            if existing_cycle is None or existing_cycle.response_complete:
                if self.config.reset_contextvars:
                    self._start_asgi_task(cycle, app)  # type: ignore[arg-type]
                else:  # uvicorn's _start_asgi_task, inline
                    task = self.loop.create_task(cycle.run_asgi(app))
                    task.add_done_callback(self.tasks.discard)
                    self.tasks.add(task)
            else:  # pipelined requests wait their turn
                self.flow.pause_reading()
                self.pipeline.appendleft((self.cycle, app))  # type: ignore[arg-type]


# The lean protocol copies uvicorn 0.54's request cycle and the protocol methods that touch it (data_received,
# on_message_begin, on_headers_complete, on_body, on_message_complete, connection_lost): on another uvicorn,
# keyplane keeps its error shape and uvicorn's own request cycle.
LEAN_FOR_UVICORN = (0, 54)


def uvicorn_is_tested() -> bool:
    return tuple(int(part) for part in uvicorn.__version__.split(".")[:2]) == LEAN_FOR_UVICORN


def http_protocol() -> type[asyncio.Protocol]:
    """What uvicorn's ``http="auto"`` would pick (httptools when installed, else h11), shaped; lean on the
    uvicorn it was written against.

    Module-level classes: uvicorn hands them to worker processes by reference."""
    if HttpToolsProtocol is None:
        return ShapedH11Protocol
    return ShapedHttpToolsProtocol if uvicorn_is_tested() else ShapedOnlyHttpToolsProtocol
