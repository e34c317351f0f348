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
from typing import TYPE_CHECKING

import h11
import orjson
import uvicorn
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from keyplane.domain.errors import invalid_request

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application, ASGISendEvent


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
    from uvicorn.protocols.http.httptools_impl import (
        HEADER_RE,
        HEADER_VALUE_RE,
        STATUS_LINE,
        HttpToolsProtocol,
        RequestResponseCycle,
    )
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

# A request head (request line and headers) must arrive within this long of its first byte, else the
# connection is closed (nginx's client_header_timeout is 60 s; a head is a few KB).
HEAD_TIMEOUT_SECONDS = 10.0
_JOIN_BELOW = 64 * 1024  # a body up to this size is copied after the headers (one buffer); larger: writev

if HttpToolsProtocol is not None:
    class _Cycle(RequestResponseCycle):
        """uvicorn's request/response cycle but for one thing: an answer framed by Content-Length has its
        status line and headers written together with its first body message, one ``transport.write`` (one
        system call, one TCP segment for a small answer) instead of two. Chunked answers (streams) still have
        their headers written at once. Everything else (the checks, errors, HEAD, flow control) is uvicorn's
        ``send`` as of 0.54; an answer abandoned before its body still has its head written before the
        connection closes (``_abandon``), the bytes uvicorn sends."""

        head: bytes | None = None  # a Content-Length answer's status line and headers, not yet written

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
            try:
                result = await app(self.scope, self.receive, self.send)  # type: ignore[func-returns-value]
            except BaseException as exc:
                self.logger.error("Exception in ASGI application\n", exc_info=exc)
                if not self.response_started:
                    await self.send_500_response()
                else:
                    self._abandon()
            else:
                if result is not None:
                    self.logger.error("ASGI callable should return None, but returned '%s'.", result)
                    self._abandon()
                elif not self.response_started and not self.disconnected:
                    self.logger.error("ASGI callable returned without starting response.")
                    await self.send_500_response()
                elif not self.response_complete and not self.disconnected:
                    self.logger.error("ASGI callable returned without completing response.")
                    self._abandon()
            finally:
                self.on_response = lambda: None

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

                status_code = message["status"]
                headers = self.default_headers + list(message.get("headers", []))
                if self.access_log:
                    self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(self.scope),
                                            self.scope["method"], get_path_with_query_string(self.scope),
                                            self.scope["http_version"], status_code)
                content = [STATUS_LINE[status_code]]
                has_connection_close = False
                for name, value in headers:
                    if HEADER_RE.search(name):
                        raise RuntimeError("Invalid HTTP header name.")  # pragma: no cover
                    if HEADER_VALUE_RE.search(value):
                        raise RuntimeError("Invalid HTTP header value.")
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
                    content.extend([name, b": ", value, b"\r\n"])
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
                    self.message_event.set()
                    if not self.keep_alive:
                        self.transport.close()
                    self.on_response()

            else:
                raise RuntimeError(f"Unexpected ASGI message '{message['type']}' sent, after response already "
                                   "completed.")

    class ShapedOnlyHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with keyplane's error shape for malformed HTTP: what runs on a uvicorn
        other than the one the lean protocol below was written against."""

        def send_400_response(self, msg: str) -> None:
            body = malformed_request_body(msg)
            content = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend([b"content-type: application/json\r\n",
                            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                            b"connection: close\r\n", b"\r\n", body])
            self.transport.write(b"".join(content))
            self.transport.close()

    class ShapedHttpToolsProtocol(ShapedOnlyHttpToolsProtocol):
        """uvicorn's httptools protocol, with keyplane's error shape for malformed HTTP and two cuts in what
        every request costs, neither changing what goes on the wire:

        - a Content-Length answer is written in one write with its headers (``_Cycle``);
        - the keep-alive timeout is one timer per idle period, not one ``call_later`` and ``cancel`` per
          request: a finished answer notes the time; the timer, when it fires, closes the connection if it
          has been idle ``timeout_keep_alive`` seconds since, else waits for the rest of that time.
        """

        idle_since: float | None = None  # since when no request has begun (opened, or last answer); else None
        head_since: float | None = None  # when the request head now arriving began; None once it is complete

        # -- the keep-alive timeout, one timer per idle period; the request-head timeout ------------------
        # One timer serves both deadlines a connection can be waiting on: idle (no request begun: since the
        # connection opened or its last answer, ``timeout_keep_alive``) and a request head still arriving
        # (since its first byte, HEAD_TIMEOUT_SECONDS). uvicorn has neither a timeout for a connection that
        # never sends a request nor one for a head that never completes (a stray CRLF or a partial head
        # turns its keep-alive timer off): a client could hold connections open forever (slowloris).
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_from(self.loop.time())  # a connection that never sends a request is idle from its start

        def _idle_from(self, when: float) -> None:
            self.idle_since = when
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

        def _unset_keepalive_if_required(self) -> None:
            pass  # bytes alone (a stray CRLF) do not end idleness: a request's first byte does (on_message_begin)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.idle_since = None
            self.head_since = now = self.loop.time()
            timer = self.timeout_keep_alive_task
            if timer is None or timer.when() > now + HEAD_TIMEOUT_SECONDS:  # (a keep-alive longer than it)
                if timer is not None:
                    timer.cancel()
                self.timeout_keep_alive_task = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self._idle_check)

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None

        def on_response_complete(self) -> None:
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self.idle_since = None
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
                return
            if self.head_since is None:  # else a pipelined request's head is arriving: its own deadline holds
                self._idle_from(self.loop.time())

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
            self.head_since = None
            http_version = self.parser.get_http_version()
            method = self.parser.get_method()
            self.scope["method"] = method.decode("ascii")
            if http_version != "1.1":
                self.scope["http_version"] = http_version
            if self.parser.should_upgrade() and self._should_upgrade():
                return
            parsed_url = httptools.parse_url(self.url)
            raw_path = parsed_url.path
            path = raw_path.decode("ascii")
            if "%" in path:
                path = urllib.parse.unquote(path)
            self.scope["path"] = self.root_path + path
            self.scope["raw_path"] = self.root_path.encode("ascii") + raw_path
            self.scope["query_string"] = parsed_url.query or b""

            if self.limit_concurrency is not None and (
                len(self.connections) >= self.limit_concurrency or len(self.tasks) >= self.limit_concurrency
            ):
                app = service_unavailable
                self.logger.warning("Exceeded concurrency limit.")
            else:
                app = self.app

            existing_cycle = self.cycle
            self.cycle = _Cycle(
                scope=self.scope, transport=self.transport, flow=self.flow, logger=self.logger,
                access_logger=self.access_logger, access_log=self.access_log,
                default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
                expect_100_continue=self.expect_100_continue,
                keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
                on_response=self.on_response_complete,
            )
            if existing_cycle is None or existing_cycle.response_complete:
                self._start_asgi_task(self.cycle, app)
            else:  # pipelined requests wait their turn
                self.flow.pause_reading()
                self.pipeline.appendleft((self.cycle, app))


# The lean protocol copies three methods of uvicorn 0.54 (RequestResponseCycle.send and run_asgi,
# on_headers_complete): on another uvicorn, keyplane keeps its error shape and uvicorn's own request cycle.
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
