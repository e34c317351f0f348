"""The stateless 2026-07-28 MCP protocol in front of stdio servers that speak only the session protocol.

A 2026-07-28 request stands alone: no ``initialize``, no ``Mcp-Session-Id``; it carries its protocol version,
client info and capabilities in ``params._meta`` (and the version in ``MCP-Protocol-Version``). The stdio
servers people run (the reference servers, anything on the TypeScript SDK 1.x) speak only the handshake
protocol, and keep state per connection. So keyplane serves such requests from a small pool of processes
it started and initialized itself (``StdioUpstream``), per server and per key (a server may keep state
between calls, which must never pass from one key to another), and translates:

    client (2026-07-28)                          pool process (handshake protocol, initialized by keyplane)
    id 7, _meta {protocolVersion, clientInfo,  ─► id "kp-41", _meta without the envelope, progressToken "kp-41"
      clientCapabilities, progressToken "p"}
    id 7, result {..., resultType "complete"} ◄─ id "kp-41", result {...}
    progress for "p"                          ◄─ progress for "kp-41"

Ids and progress tokens are rewritten because a key's clients share a process and their ids collide. The pool
processes declare no client capabilities, so a server does not ask the client anything (the 2026-07-28
protocol has no back-channel); a request it sends anyway is answered with an error. ``server/discover`` is
answered by keyplane from the pool process's ``initialize`` answer. Methods that set per-connection state
(subscriptions, the log level) would leak between requests sharing a process: they are refused, with a
pointer to the session protocol, which serves them.
"""

from __future__ import annotations

from typing import Any

import orjson

MODERN_VERSIONS = ("2026-07-28",)
HANDSHAKE_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
POOL_PROTOCOL_VERSION = "2025-06-18"  # what keyplane asks its pool processes for (the reference servers speak it)
VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
ENVELOPE_KEYS = (VERSION_KEY, "io.modelcontextprotocol/clientInfo", "io.modelcontextprotocol/clientCapabilities",
                 "io.modelcontextprotocol/logLevel")
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
# State a shared process would keep for every client at once.
PER_CONNECTION_METHODS = frozenset({"logging/setLevel", "resources/subscribe", "resources/unsubscribe",
                                    "subscriptions/listen"})
# Results a 2026-07-28 client may cache: they carry ttlMs and cacheScope ("private": keyplane filters list
# answers per key, so no shared cache may serve one key's list to another).
CACHEABLE_METHODS = frozenset({"prompts/list", "resources/list", "resources/read", "resources/templates/list",
                               "tools/list"})
INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
HEADER_MISMATCH = -32020
UNSUPPORTED_PROTOCOL_VERSION = -32022


class Refusal(Exception):
    """A stateless request keyplane answers itself with a JSON-RPC error."""

    def __init__(self, status: int, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.data = status, code, message, data


def _meta(message: dict[str, Any]) -> dict[str, Any] | None:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta if isinstance(meta, dict) else None


def is_stateless(headers: dict[str, str], message: dict[str, Any]) -> bool:
    """A 2026-07-28 (or later) request: its version header is not a handshake version, or, without the
    header, its body carries the per-request envelope."""
    version = headers.get("mcp-protocol-version")
    if version is not None:
        return version not in HANDSHAKE_VERSIONS
    meta = _meta(message)
    return meta is not None and VERSION_KEY in meta


def check(headers: dict[str, str], message: dict[str, Any]) -> None:
    """The envelope a stateless request must carry (the SDK's ladder, minus what the gateway checks already)."""
    meta = _meta(message)
    version = meta.get(VERSION_KEY) if meta is not None else None
    if version is None:
        raise Refusal(400, INVALID_PARAMS, f"params._meta must carry '{VERSION_KEY}' (a 2026-07-28 request stands "
                                           "alone), or initialize a session first")
    header = headers.get("mcp-protocol-version")
    if header is not None and header != version:
        raise Refusal(400, HEADER_MISMATCH, "MCP-Protocol-Version header does not match the request envelope's "
                                            "protocol version")
    if version not in MODERN_VERSIONS:
        raise Refusal(400, UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version",
                      {"supported": [*MODERN_VERSIONS, *sorted(HANDSHAKE_VERSIONS)], "requested": version})
    method = message.get("method")
    if method in PER_CONNECTION_METHODS:
        raise Refusal(400, METHOD_NOT_FOUND, f"'{method}' keeps state per connection, which a stdio server served "
                                             "statelessly does not have: initialize a session to use it")


def inward(message: dict[str, Any], internal_id: str) -> tuple[bytes, Any]:
    """The request as a pool process gets it (its id and progress token ours, the envelope gone), and the
    client's progress token."""
    out = dict(message)
    out["id"] = internal_id
    client_token = None
    params = out.get("params")
    if isinstance(params, dict):
        params = dict(params)
        meta = params.get("_meta")
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if k not in ENVELOPE_KEYS}
            if "progressToken" in meta:
                client_token = meta["progressToken"]
                meta["progressToken"] = internal_id
            if meta:
                params["_meta"] = meta
            else:
                del params["_meta"]
        out["params"] = params
    return orjson.dumps(out), client_token


def outward(raw: bytes, method: str, client_id: Any, client_token: Any) -> bytes:
    """A pool process's message as the client sees it: the client's id and progress token back, and the
    ``resultType`` (and for lists and reads the cache directives) a 2026-07-28 result carries."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if not isinstance(message, dict):
        return raw
    if "method" not in message:
        message["id"] = client_id
        result = message.get("result")
        if isinstance(result, dict):
            result.setdefault("resultType", "complete")
            if method in CACHEABLE_METHODS:
                result.setdefault("ttlMs", 0)
                result.setdefault("cacheScope", "private")
    elif message.get("method") == "notifications/progress":
        params = message.get("params")
        if isinstance(params, dict):
            params["progressToken"] = client_token
    return orjson.dumps(message)


def discover(ident: Any, initialized: dict[str, Any]) -> bytes:
    """keyplane's answer to ``server/discover``, from what the pool process answered to ``initialize``."""
    capabilities = dict(initialized.get("capabilities") or {})
    capabilities.pop("logging", None)  # refused here (PER_CONNECTION_METHODS): not advertised either
    if isinstance(capabilities.get("resources"), dict):
        capabilities["resources"] = {k: v for k, v in capabilities["resources"].items() if k != "subscribe"}
    result: dict[str, Any] = {"supportedVersions": list(MODERN_VERSIONS), "capabilities": capabilities,
                              "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
    if isinstance(initialized.get("instructions"), str):
        result["instructions"] = initialized["instructions"]
    if isinstance(initialized.get("serverInfo"), dict):
        result["_meta"] = {SERVER_INFO_KEY: initialized["serverInfo"]}
    return orjson.dumps({"jsonrpc": "2.0", "id": ident, "result": result})


def initialize_request(ident: str) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": ident, "method": "initialize", "params": {
        "protocolVersion": POOL_PROTOCOL_VERSION, "capabilities": {},
        "clientInfo": {"name": "keyplane-stateless-pool", "version": "1"}}})


INITIALIZED = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})


def no_back_channel(request_id: Any) -> bytes:
    """The answer to a pool process that asks its client something: there is no client to ask."""
    return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "error": {
        "code": METHOD_NOT_FOUND, "message": "keyplane serves this process to stateless clients: nothing to ask"}})
