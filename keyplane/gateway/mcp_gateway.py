"""The MCP gateway at ``/mcp/{name}``: keyplane keys in front of someone else's MCP server. Raw ASGI.

A request's path through it:

    read body ─ parse JSON-RPC ─ Enforcer.admit (the SAME code as /v1/*: brake, key, disabled, expiry,
    IP allowlist, signature, rate limit) ─ the key names the server? ─ the method's scope (one table,
    scopes.MCP_METHOD_SCOPES) and, for tools/call, the tool's pattern ─ forward (upstream headers in, the
    client's key out) ─ relay the answer as it comes, list answers filtered to what the key may use ─ usage.

Upstream session ids are handed to clients bound to the key (``<upstream id>.<mac>``): another key cannot
ride a session it did not open, in any process (the mac is keyed from the master key).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from keyplane.domain import mcp_access, scopes
from keyplane.domain.errors import BEARER_CHALLENGE, KeyplaneError, insufficient_scope, invalid_request, not_found
from keyplane.domain.policy import KeySnapshot
from keyplane.domain.usage_row import now_us
from keyplane.gateway import mcp_cors, mcp_tasks
from keyplane.gateway.asgi import (
    BodyTooLarge,
    ClientLeft,
    Receive,
    Scope,
    Send,
    client_gone,
    read_body,
    relay_until_client_leaves,
    send_error,
)
from keyplane.gateway.enforce import Admission, Enforcer, Refused
from keyplane.gateway.mcp_stdio import OWNER_HEADER as STDIO_OWNER_HEADER
from keyplane.gateway.mcp_upstream import McpUpstream, UpstreamAnswer, mask
from keyplane.gateway.metrics import Metrics
from keyplane.gateway.proxy import CLIENT_CLOSED
from keyplane.services.container import Keyplane
from keyplane.services.mcp_servers import McpRoute
from keyplane.store import master_key

PREFIX = "/mcp/"
ROUTE_LABEL = "/mcp/{name}"
MAX_JSON_ANSWER = 16 * 1024 * 1024
WATCH_AFTER = 0.02  # seconds an exchange runs before a watcher looks out for the client leaving
# Request headers carried upstream (the client's credentials and signature never are).
_FORWARDED = frozenset({b"content-type", b"accept", b"mcp-protocol-version", b"last-event-id", b"mcp-method",
                        b"mcp-name"})
_PARAM_HEADER = b"mcp-param-"
# Answer headers carried back to the client (the session id is rewritten, see _SessionBinding).
_RETURNED = ("content-type", "mcp-protocol-version", "cache-control")
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a header (RFC 9110: no controls but tab)
_LIST_MARKERS = (b'"tools"', b'"resources"', b'"resourceTemplates"', b'"prompts"', b'"tasks"')
# Requests whose JSON answer is a list to filter (an event stream is looked at event by event).
_LIST_METHODS = frozenset({"tools/list", "resources/list", "resources/templates/list", "prompts/list",
                           "tasks/list", "server/discover"})


@dataclass(slots=True)
class McpOutcome:
    status: int = 0
    code: str = "ok"
    server: str | None = None
    method: str | None = None
    tool: str | None = None


class _SessionBinding:
    """``Mcp-Session-Id`` as the client sees it: the upstream's id plus a MAC over (key, server, id)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = hashlib.sha256(b"keyplane mcp session binding v1" + secret).digest()

    def _mac(self, key_id: str, server: str, upstream_id: str) -> str:
        digest = hmac.new(self.secret, f"{key_id}\n{server}\n{upstream_id}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode()

    def wrap(self, key_id: str, server: str, upstream_id: str) -> str:
        return f"{upstream_id}.{self._mac(key_id, server, upstream_id)}"

    def unwrap(self, key_id: str, server: str, client_id: str) -> str | None:
        upstream_id, dot, mac = client_id.rpartition(".")
        # As bytes: compare_digest refuses str with non-ASCII characters, and the header is the client's.
        expected = self._mac(key_id, server, upstream_id).encode()
        if not dot or not hmac.compare_digest(mac.encode("utf-8", "surrogatepass"), expected):
            return None
        return upstream_id


def _refusal(status: int, code: str, message: str, scope: str, **extra: Any) -> KeyplaneError:
    challenge = f'{BEARER_CHALLENGE}, error="insufficient_scope"' + (f', scope="{scope}"' if scope else "")
    return KeyplaneError(status, code, message, headers={"WWW-Authenticate": challenge}, extra=extra)


def authorize(key: KeySnapshot, server: str, route: McpRoute, message: Any,
              tasks: mcp_tasks.TaskRegistry | None = None) -> tuple[str | None, str | None]:
    """Refuse what the key may not do with this JSON-RPC message; return its (method, tool) for the usage event."""
    if not isinstance(message, dict):
        raise invalid_request("The body is one JSON-RPC message (batches are not accepted)")
    method = message.get("method")
    if method is None:
        if "result" in message or "error" in message:
            return None, None  # the client's answer to a server request (sampling, elicitation, roots)
        raise invalid_request("Not a JSON-RPC message: no 'method'")
    if not isinstance(method, str):
        raise invalid_request("'method' is a string")
    if "id" not in message:
        if method.startswith("notifications/"):
            return method, None
        raise invalid_request(f"'{method}' is not a notification: give it an id")
    try:
        needed = mcp_access.requirement(method, message.get("params"), route.tool_scopes)
    except mcp_access.UnknownMethod:
        raise KeyplaneError(403, "method_not_allowed",
                            f"The MCP method '{method[:100]}' is not allowed through keyplane") from None
    if needed.scope and needed.scope not in key.scopes:
        error = insufficient_scope(needed.scope)
        error.extra.update(server=server, method=method, **({"tool": needed.tool} if needed.tool else {}))
        raise error
    if needed.tool is not None and not mcp_access.may_call(key.mcp_grants, server, needed.tool):
        raise _refusal(403, "tool_not_allowed", f"This key may not call the tool '{needed.tool[:128]}' of MCP "
                       f"server '{server}'", needed.scope, server=server, tool=needed.tool[:128])
    if needed.task is not None and tasks is not None:
        _authorize_task(key, server, route, method, needed.task, tasks)
    return method, needed.tool


def _authorize_task(key: KeySnapshot, server: str, route: McpRoute, method: str, task_id: str,
                    tasks: mcp_tasks.TaskRegistry) -> None:
    """A task known here is the creating key's only, and only while that key may still call its tool."""
    origin = tasks.origin(server, task_id)
    if origin is None:
        return  # made through another process (or before a restart): server access decides
    if origin.key_id != key.id:
        raise KeyplaneError(404, "not_found", "No such task for this key", extra={"server": server})
    scope = route.tool_scopes.get(origin.tool, scopes.DEFAULT_TOOL_SCOPE)
    if scope not in key.scopes:
        error = insufficient_scope(scope)
        error.extra.update(server=server, method=method, tool=origin.tool)
        raise error
    if not mcp_access.may_call(key.mcp_grants, server, origin.tool):
        raise _refusal(403, "tool_not_allowed", f"This key may no longer call the tool '{origin.tool}' of MCP "
                       f"server '{server}' its task came from", scope, server=server, tool=origin.tool)


@dataclass(slots=True)
class _RequestHeaders:
    """What the gateway reads from the request's headers, read in one pass."""

    forwarded: dict[str, str]  # carried upstream as they are
    session: str | None = None  # Mcp-Session-Id as the client holds it (bound to its key)
    origin: bytes | None = None
    method: str | None = None  # the 2026-07-28 routing headers
    name: str | None = None


def _masked(data: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """An upstream that echoes its own credential (a header keyplane injects) does not hand it to the client:
    masked in place with an ellipsis, as in its error text and a stdio server's output."""
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, "\u2026".encode())
    return data


def _read_headers(scope: Scope) -> _RequestHeaders:
    read = _RequestHeaders({})
    for raw_name, value in scope["headers"]:
        if raw_name in _FORWARDED or raw_name.startswith(_PARAM_HEADER):
            text = value.decode("latin-1")
            read.forwarded[raw_name.decode("latin-1")] = text
            if raw_name == b"mcp-method":
                read.method = text
            elif raw_name == b"mcp-name":
                read.name = text
        elif raw_name == b"mcp-session-id":
            read.session = value.decode("latin-1")
        elif raw_name == b"origin":
            read.origin = value
    return read


def _check_routing_headers(read: _RequestHeaders, message: dict[str, Any]) -> None:
    """The 2026-07-28 routing headers must say what the body says: keyplane decides on the body."""
    method_header, name_header = read.method, read.name
    if method_header is None and name_header is None:
        return
    method = message.get("method")
    if method_header is not None and method_header != method:
        raise invalid_request("The Mcp-Method header does not match the body's method")
    if name_header is not None:
        field = mcp_access.NAME_FIELDS.get(method) if isinstance(method, str) else None
        params = message.get("params")
        value = params.get(field) if field and isinstance(params, dict) else None
        if value is not None and name_header != value and not name_header.startswith("=?base64?"):
            raise invalid_request("The Mcp-Name header does not match the body")


class McpGateway:
    def __init__(self, kp: Keyplane, enforcer: Enforcer, metrics: Metrics, upstream: McpUpstream) -> None:
        self.kp = kp
        self.enforcer = enforcer
        self.metrics = metrics
        self.upstream = upstream
        self.max_body = kp.settings.max_body_bytes
        self.log_requests = kp.settings.access_log
        self._binding: _SessionBinding | None = None
        self.origins = mcp_cors.AllowedOrigins(kp.settings)
        self.tasks = mcp_tasks.TaskRegistry()

    def binding(self) -> _SessionBinding:
        if self._binding is None:
            settings = self.kp.settings
            self._binding = _SessionBinding(master_key.load_or_create(settings.master_key,
                                                                      settings.home / "master.key"))
        return self._binding

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        name = scope["path"][len(PREFIX):].rstrip("/")
        outcome = McpOutcome(server=name if mcp_access.SERVER_NAME.match(name) else None)
        key: KeySnapshot | None = None
        ip = ""
        http_method = scope["method"]
        read = _read_headers(scope)
        origin = read.origin
        origin_allowed = origin is not None and self.origins.allows(origin.decode("latin-1"))
        if origin is not None and origin_allowed:
            send = mcp_cors.with_cors(send, origin)
        try:
            if outcome.server is None:
                raise Refused(not_found("MCP server", name[:64]))
            if http_method == "OPTIONS":
                refusal = await mcp_cors.preflight(send, origin_allowed)
                if refusal is not None:
                    raise Refused(refusal)
                outcome.status, outcome.code = 204, "preflight"
                self._finish(outcome, None, "", started)
                return
            if http_method not in ("POST", "GET", "DELETE"):
                raise Refused(KeyplaneError(405, "method_not_allowed", f"{http_method} is not allowed on /mcp/{name}",
                                            headers={"Allow": "GET, POST, DELETE, OPTIONS"}))
            try:
                body = await read_body(receive, self.max_body, scope) if http_method == "POST" else b""
            except BodyTooLarge:
                raise Refused(KeyplaneError(413, "payload_too_large",
                                            f"Request bodies are limited to {self.max_body} bytes")) from None
            admission = await self.enforcer.admit(scope, "", body)
        except Refused as refused:
            self.metrics.observe_auth(time.perf_counter() - started)
            await send_error(send, refused.error, refused.headers)
            outcome.status, outcome.code = refused.error.status, refused.error.code
            self._finish(outcome, refused.key, refused.ip or self.enforcer.addresses.of(scope), started)
            return
        self.metrics.observe_auth(time.perf_counter() - started)
        key, ip = admission.key, admission.client_ip
        try:
            route = await self._route(key, name)
            message: Any = None
            if http_method == "POST":
                try:
                    message = orjson.loads(body)
                except orjson.JSONDecodeError:
                    raise invalid_request("The request body is not valid JSON") from None
                outcome.method, outcome.tool = _describe(message)  # recorded for refusals too
                authorize(key, name, route, message, self.tasks)
                _check_routing_headers(read, message)
            await self._forward(admission, route, read, receive, send, http_method, body, outcome, message)
        except KeyplaneError as error:
            await send_error(send, error, admission.headers)
            outcome.status, outcome.code = error.status, error.code
        self._finish(outcome, key, ip, started)

    async def _route(self, key: KeySnapshot, name: str) -> McpRoute:
        if not mcp_access.may_use(key.mcp_grants, name):
            raise _refusal(403, "server_not_allowed", f"This key may not use the MCP server '{name}'", "",
                           server=name)
        slot = (key.org_id, name)
        routes = self.kp.mcp_routes  # the container's cache, read in place (no coroutine) when it holds it
        route = routes[slot] if slot in routes else await self.kp.mcp_route_for(key.org_id, name)
        if route is None:
            raise not_found("MCP server", name)
        if not route.enabled:
            raise KeyplaneError(503, "server_disabled", f"The MCP server '{name}' is disabled",
                                headers={"Retry-After": "60"})
        return route

    def _upstream_headers(self, read: _RequestHeaders, key: KeySnapshot, name: str) -> dict[str, str]:
        for header, value in read.forwarded.items():
            if _CONTROL.search(header) or _CONTROL.search(value):
                # Never sent on (the upstream client would refuse it with a 500): the client's mistake.
                raise invalid_request(f"The {header[:64]!r} header holds control characters")
        if read.session is None:
            return read.forwarded
        upstream_id = self.binding().unwrap(key.id, name, read.session)
        if upstream_id is None:
            # Not a session this key opened on this server: the same answer as an expired session,
            # so the client starts afresh (and learns nothing about other keys' sessions).
            raise KeyplaneError(404, "session_not_found", "No such MCP session for this key; initialize a new one")
        return {**read.forwarded, "mcp-session-id": upstream_id}

    async def _forward(self, admission: Admission, route: McpRoute, read: _RequestHeaders, receive: Receive,
                       send: Send, http_method: str, body: bytes, outcome: McpOutcome, message: Any) -> None:
        key = admission.key
        headers = self._upstream_headers(read, key, route.name)
        if route.transport == "stdio":
            # A stateless request is served by this key's own processes.
            headers = {**headers, STDIO_OWNER_HEADER: key.id}
        creates_task = outcome.tool is not None and mcp_tasks.is_task_augmented(message)

        async def exchange() -> tuple[UpstreamAnswer, bytes | None]:
            """The upstream's answer; a JSON (or error) body read whole, an event stream left to relay."""
            answer = await self.upstream.open(route, http_method, headers, body)
            if answer.headers.get("content-type", "").startswith("text/event-stream") and answer.status < 400:
                return answer, None
            try:
                return answer, await answer.read(MAX_JSON_ANSWER)
            except BaseException:
                answer.close()
                raise

        # One task races the whole exchange against the client leaving (which cancels it, upstream included).
        exchanged = await self._race(receive, exchange())
        if exchanged is None:
            outcome.status, outcome.code = CLIENT_CLOSED, "client_disconnected"
            return
        answer, raw = exchanged
        try:
            status = answer.status
            if status in (401, 403, 407):
                raise KeyplaneError(502, "upstream_error", f"MCP server '{route.name}' refused keyplane's "
                                                           f"credentials for it (HTTP {status})")
            if status >= 500:
                text = (raw or b"")[:500].decode("utf-8", "replace").strip()
                raise KeyplaneError(502, "upstream_error",
                                    f"MCP server '{route.name}' answered {status}: {mask(text, route) or 'no message'}")
            response_headers = self._answer_headers(answer, key, route.name) + admission.headers
            secrets = route.secret_bytes()
            outcome.status = status
            task_tool = outcome.tool if creates_task and status < 400 else None
            if raw is None:
                await send({"type": "http.response.start", "status": status, "headers": response_headers})
                ended = await self._relay_events(answer, key, route, receive, send, secrets, task_tool)
                if ended == "client_disconnected":
                    outcome.status = CLIENT_CLOSED
                if ended != "ok":
                    outcome.code = ended
            elif status >= 400 and not answer.headers.get("content-type", "").startswith("application/json"):
                # A refusal in plain text (the SDK's transport checks answer so): its status, in the one shape.
                text = (raw or b"")[:300].decode("utf-8", "replace").strip()
                outcome.status = status
                await send_error(send, KeyplaneError(status, "upstream_refused", f"MCP server '{route.name}' "
                                                     f"answered {status}: {mask(text, route) or 'no message'}"),
                                 admission.headers)
            else:
                if task_tool is not None:
                    self.tasks.remember_answer(route.name, key.id, task_tool, raw)
                if outcome.method in _LIST_METHODS and raw and \
                        answer.headers.get("content-type", "").startswith("application/json"):
                    raw = self._filtered(raw, key, route)
                raw = _masked(raw, secrets)
                await send({"type": "http.response.start", "status": status,
                            "headers": [*response_headers, (b"content-length", str(len(raw)).encode())]})
                await send({"type": "http.response.body", "body": raw})
            if status >= 400:
                outcome.code = "upstream_refused"
        finally:
            answer.close()

    def _answer_headers(self, answer: UpstreamAnswer, key: KeySnapshot, server: str) -> list[tuple[bytes, bytes]]:
        out = [(name.encode(), answer.headers[name].encode("latin-1")) for name in _RETURNED if name in answer.headers]
        session = answer.headers.get("mcp-session-id")
        if session:
            out.append((b"mcp-session-id", self.binding().wrap(key.id, server, session).encode("latin-1")))
        return out

    def _filtered(self, raw: bytes, key: KeySnapshot, route: McpRoute) -> bytes:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        if not isinstance(message, dict) or "result" not in message or "method" in message:
            return raw
        result = message["result"]
        changed = mcp_access.filter_result(result, key.mcp_grants, key.scopes, route.name, route.tool_scopes)
        if isinstance(result, dict) and isinstance(result.get("tasks"), list):
            listed = result["tasks"]
            result["tasks"] = [t for t in listed if self.tasks.visible(route.name, key.id, t)]
            changed = changed or len(result["tasks"]) != len(listed)
        return orjson.dumps(message) if changed else raw

    def _filtered_event(self, event: bytes, key: KeySnapshot, route: McpRoute) -> bytes:
        """One SSE event, its data line rewritten when it is a list answer with entries the key may not use."""
        if not any(m in event for m in _LIST_MARKERS):
            return event
        if b'"result"' not in event:
            return event
        lines = event.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.startswith(b"data:"):
                body = line[5:].strip()
                rewritten = self._filtered(body, key, route)
                if rewritten is not body:
                    ending = line[len(line.rstrip(b"\r\n")):]
                    lines[i] = b"data: " + rewritten + ending
        return b"".join(lines)

    async def _relay_events(self, answer: UpstreamAnswer, key: KeySnapshot, route: McpRoute, receive: Receive,
                            send: Send, secrets: tuple[bytes, ...], task_tool: str | None = None) -> str:
        """Event by event as they arrive (never the whole stream): how it ended, "ok", "client_disconnected"
        (the client left before its answer) or "upstream_error" (the stream broke or an event was too large)."""

        answered = False

        async def pump() -> None:
            nonlocal answered
            pending = b""
            async for chunk in answer.chunks():
                pending += chunk
                out = []
                while True:
                    end = _EVENT_END.search(pending)
                    if end is None:
                        break
                    event = pending[:end.end()]
                    if task_tool is not None:
                        self.tasks.remember_answer(route.name, key.id, task_tool, event)
                    out.append(_masked(self._filtered_event(event, key, route), secrets))
                    answered = answered or _is_response(event)
                    pending = pending[end.end():]
                if len(pending) > MAX_JSON_ANSWER:
                    raise ValueError("an event larger than the limit")
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            if pending:  # a last event without its blank line: filtered like any other
                await send({"type": "http.response.body",
                            "body": _masked(self._filtered_event(pending, key, route), secrets), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await relay_until_client_leaves(pump(), receive)
        except ClientLeft:
            pass
        except Exception:  # headers are gone already: end the stream
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return "upstream_error"
        else:
            return "ok"
        # A client that leaves once it has its answer (as SDK clients do) did not cancel anything.
        return "ok" if answered else "client_disconnected"

    async def _race(self, receive: Receive, work: Any) -> Any:
        """``work``'s result, or None (``work`` cancelled, the upstream connection with it) if the client
        disconnects first. ``work`` runs in this task; one watcher task cancels it (cheaper than racing two),
        started only once the exchange outlasts WATCH_AFTER: most answers come sooner, and a timer costs a
        fraction of a task that must start, wait and be cancelled (a client that left is noticed that late)."""
        this = asyncio.current_task()
        assert this is not None
        left = False
        watcher: asyncio.Future[None] | None = None

        async def watch() -> None:
            nonlocal left
            await client_gone(receive)
            left = True
            this.cancel()

        def start_watching() -> None:
            nonlocal watcher
            watcher = asyncio.ensure_future(watch())

        timer = asyncio.get_running_loop().call_later(WATCH_AFTER, start_watching)
        try:
            return await work
        except asyncio.CancelledError:
            if left:
                this.uncancel()
                return None
            raise
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    def _finish(self, outcome: McpOutcome, key: KeySnapshot | None, ip: str, started: float) -> None:
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self.metrics.count(ROUTE_LABEL, outcome.status, outcome.code)
        key_id = key.id if key else None
        if key is not None:
            # As on /v1/*: a request no key vouches for (preflights included) is counted, never stored.
            self.kp.usage_buffer.add((  # a row in usage_row.FIELDS order
                key.org_id, key_id, key.parent_id, None, None, key.cost_center, key.environment,
                f"/mcp/{outcome.server}", outcome.server, (outcome.tool or "")[:128] or None, outcome.status,
                outcome.code, (outcome.method or "")[:64] or None, 0, 0, 0, 0, 0.0, latency_ms, ip or None, now_us()))
        if self.log_requests:
            self.kp.access_log.record({"route": ROUTE_LABEL, "server": outcome.server, "method": outcome.method,
                                       "tool": outcome.tool, "status": outcome.status, "code": outcome.code,
                                       "key_id": key_id, "client_ip": ip, "ms": latency_ms})


def _describe(message: Any) -> tuple[str | None, str | None]:
    """(method, tool) of a JSON-RPC message, whatever is decided about it."""
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return None, None
    params = message.get("params")
    tool = params.get("name") if message["method"] == "tools/call" and isinstance(params, dict) else None
    return message["method"], tool if isinstance(tool, str) else None


def _is_response(event: bytes) -> bool:
    """Does this SSE event carry a JSON-RPC response (a result or an error for a request)?"""
    if b'"result"' not in event and b'"error"' not in event:
        return False
    for line in event.splitlines():
        if line.startswith(b"data:"):
            try:
                message = orjson.loads(line[5:].strip())
            except orjson.JSONDecodeError:
                return False
            return isinstance(message, dict) and "id" in message and "method" not in message
    return False

