"""uvicorn's HTTP/1.1 protocols, answering a request they cannot parse in keyplane's one error shape.

uvicorn refuses malformed HTTP itself, before any ASGI application runs, with ``400 Invalid HTTP request
received.`` as plain text. These subclasses change only that answer. What stays outside keyplane's reach is
listed in docs/security.md (a connection closed without an answer; other ASGI servers' own refusals).
"""

from __future__ import annotations

import asyncio

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

from keyplane.domain.errors import invalid_request


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
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

if HttpToolsProtocol is not None:
    class ShapedHttpToolsProtocol(HttpToolsProtocol):
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


def http_protocol() -> type[asyncio.Protocol]:
    """What uvicorn's ``http="auto"`` would pick (httptools when installed, else h11), shaped.

    Module-level classes: uvicorn hands them to worker processes by reference."""
    return ShapedHttpToolsProtocol if HttpToolsProtocol is not None else ShapedH11Protocol
