"""Answers keyplane used to leave to others: malformed HTTP (uvicorn) and the MCP SDK's plain-text refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from keyplane import cli
from keyplane.http_protocol import ShapedH11Protocol, http_protocol
from tests.conftest import assert_error
from tests.processes import free_port

ACCEPT = {"Accept": "application/json, text/event-stream"}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _raw(port: int, payload: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("protocol", [http_protocol(), ShapedH11Protocol], ids=lambda p: p.__name__)
async def test_malformed_http_is_answered_in_the_error_shape(protocol: type[asyncio.Protocol]) -> None:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_ok, host="127.0.0.1", port=port, lifespan="off", log_config=None,
                                           http=protocol, access_log=False))
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # uvicorn offers no event for "started"
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
                        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n"):
            status, headers, body = await _raw(port, garbage)
            assert status == 400 and headers["content-type"] == "application/json", (garbage, headers, body)
            err = orjson.loads(body)["error"]
            assert err["code"] == "invalid_request" and err["type"] == "invalid_request_error"
            assert err["message"].startswith("Malformed HTTP request")
        assert (await _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))[0] == 200
    finally:
        server.should_exit = True
        await task


def test_keyplane_serve_runs_uvicorn_with_the_shaped_protocol(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setenv("KEYPLANE_HOME", str(tmp_path))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    cli.serve(host=None, port=None, demo=False, workers=None)
    assert seen["http"] is http_protocol()


async def test_mcp_transport_refusals_are_in_the_error_shape(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    local = {**admin, **ACCEPT, "Host": "127.0.0.1:8000"}
    resp = await client.post("/mcp", json=INITIALIZE, headers={**local, "Host": "evil.example"})
    assert "Host" in assert_error(resp, 421, "host_not_allowed")["message"]
    resp = await client.post("/mcp", json=INITIALIZE, headers={**local, "Origin": "http://evil.example"})
    assert "Origin" in assert_error(resp, 403, "origin_not_allowed")["message"]
    resp = await client.post("/mcp", content=orjson.dumps(INITIALIZE), headers={**local, "Content-Type": "text/plain"})
    assert_error(resp, 400, "invalid_request")
    ok = await client.post("/mcp", json=INITIALIZE, headers=local)
    assert ok.status_code == 200, ok.text  # JSON-RPC answers pass through untouched
