"""stdio MCP servers keyplane runs, served over Streamable HTTP at /mcp/{name}: the ``McpUpstream`` for them.

    StdioUpstream.open(route, method, headers, body)
      POST initialize (no session)  start a process (allow-list, per-server cap: 503 + Retry-After),
                                    answer once it has answered initialize (start timeout: 504; exit: 502)
      POST request                  write it to the process's stdin; answer JSON if the first message back is
                                    the response, else an event stream of what the server sends meanwhile
                                    (progress, sampling, elicitation) ending with the response
      POST notification / answer    write it; 202
      GET                           the session's event stream of server-to-client messages
      DELETE                        stop the process
      POST, 2026-07-28 (no session) answered by a pool process keyplane started and initialized itself
                                    (``stdio_stateless``): any keyplane process serves it, no affinity needed

One process per client session (stdio servers keep per-connection state), keyed by the session id this
module issues (the gateway then binds it to the key); the id starts with this keyplane process's tag, so a
request reaching another worker is told so (421) rather than "not found". A session's process is stopped at
once when its server is disabled, deleted, or its command, env or cwd change (``routes_changed``, called on
every invalidation of MCP routes: in this process, from other processes' notices, and from the audit feed).

A process runs in its own process group, with only the server's ``env`` over a minimal environment (never
keyplane's own, which holds its master key); it is stopped (group SIGTERM, then SIGKILL) on DELETE, after
``mcp_stdio_idle_seconds`` without a request, when it crashes and when keyplane stops. If keyplane is killed,
the watchman (``stdio_reaper``) kills the groups. stderr goes to keyplane's log line by line, and stdout to
the client, with the server's env values masked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from keyplane.config import Settings
from keyplane.domain.errors import KeyplaneError
from keyplane.gateway import stdio_stateless
from keyplane.gateway.mcp_upstream import McpUpstream, UpstreamAnswer, mask, probe
from keyplane.services.mcp_servers import McpRoute, command_allowed

log = logging.getLogger("keyplane.mcp.stdio")

MAX_MESSAGE = 16 * 1024 * 1024  # one line of stdout: one JSON-RPC message
BACKLOG = 256  # server-to-client messages kept for a GET stream not yet open
STDERR_TAIL = 20
STOP_GRACE = 2.0
READERS_GRACE = 3.0  # for a dead process's readers to record its exit code and stderr (see _read_stdout)
# Set by the gateway for stdio servers only (a client's own headers never carry it through): the key asking.
OWNER_HEADER = "keyplane-key-id"
ENDED_REMEMBERED = 4096  # why recent sessions ended, for the 404 their next request gets
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "USER", "LOGNAME", "TZ")
_JSON = {"content-type": "application/json"}
_SSE = {"content-type": "text/event-stream", "cache-control": "no-cache"}
_ENDED = object()  # put on a session's queues when its process is gone


def _event(message: bytes) -> bytes:
    return b"event: message\ndata: " + message + b"\n\n"


class _Fixed:
    """A whole answer known at once (JSON, an error, or an empty 200/202)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.body:
            yield self.body

    async def read(self, limit: int) -> bytes:
        return self.body[:limit]

    def close(self) -> None:
        pass


def _rpc_error(status: int, ident: Any, message: str, code: int = -32000, data: Any = None) -> _Fixed:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return _Fixed(status, dict(_JSON), orjson.dumps({"jsonrpc": "2.0", "id": ident, "error": error}))


@dataclass(slots=True, eq=False)
class _Pending:
    queue: asyncio.Queue[Any]
    progress_token: Any = None
    stateless: bool = False  # a pool process's request: its id and progress token are keyplane's
    method: str = ""
    client_id: Any = None
    client_token: Any = None

    def outward(self, raw: bytes) -> bytes:
        if not self.stateless:
            return raw
        return stdio_stateless.outward(raw, self.method, self.client_id, self.client_token)

    def client_ident(self, key: bytes) -> Any:
        return self.client_id if self.stateless else orjson.loads(key)


def outdated(running: McpRoute, current: McpRoute | None) -> str | None:
    """Why a process started for ``running`` must stop now that the server is ``current`` (None: it may go on)."""
    if current is None or current.server_id != running.server_id:
        return "the server was deleted"
    if not current.enabled:
        return "the server was disabled"
    if (current.command, current.env, current.cwd) != (running.command, running.env, running.cwd):
        return "the server's command, env or cwd changed"
    return None


@dataclass(slots=True, eq=False)
class StdioSession:
    id: str
    route: McpRoute
    process: asyncio.subprocess.Process
    last_used: float = field(default_factory=time.monotonic)
    pending: dict[bytes, _Pending] = field(default_factory=dict)
    listener: asyncio.Queue[Any] | None = None
    backlog: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=BACKLOG))
    stderr_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL))
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    ended: str | None = None  # why the process is gone
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pooled: bool = False  # keyplane's own, serving one key's stateless requests; never a client's session
    owner: str = ""  # the key a pooled process serves (processes keep state: never shared between keys)
    initialized: dict[str, Any] = field(default_factory=dict)  # its answer to initialize (pooled only)

    def exit_reason(self) -> str:
        tail = " | ".join(self.stderr_tail)[-500:]
        return (self.ended or "stopped") + (f"; stderr: {tail}" if tail else "")

    async def send(self, message: bytes) -> None:
        stdin = self.process.stdin
        if self.ended is not None or stdin is None:
            raise KeyplaneError(502, "upstream_error", f"MCP server '{self.route.name}' is not running: "
                                                       f"{self.exit_reason()}")
        async with self.write_lock:
            try:
                stdin.write(message + b"\n")
                await stdin.drain()
            except (ConnectionError, BrokenPipeError, RuntimeError):
                # The process is gone or going (e.g. it exited at once, before reading anything): let the
                # readers see it out, so the client hears why (exit code, stderr), as a request sent a
                # moment earlier would have.
                await asyncio.wait(self.tasks, timeout=READERS_GRACE)
                raise KeyplaneError(502, "upstream_error", f"MCP server '{self.route.name}' closed its input: "
                                                           f"{self.exit_reason()}") from None

    def deliver(self, raw: bytes, message: dict[str, Any]) -> None:
        """Route one message from the process to whoever waits for it."""
        if "method" not in message and "id" in message:
            waiting = self.pending.get(orjson.dumps(message["id"]))
            if waiting is not None:
                waiting.queue.put_nowait(raw)
                # A call that outlasted the idle timeout ends now: the session idles from here, not from its start.
                self.last_used = time.monotonic()
            return
        if message.get("method") == "notifications/progress":
            token = (message.get("params") or {}).get("progressToken")
            for waiting in self.pending.values():
                if token is not None and waiting.progress_token == token:
                    waiting.queue.put_nowait(raw)
                    return
        if self.pooled:  # no client to ask anything or to send a notification to
            if "id" in message:
                _send_quietly(self, stdio_stateless.no_back_channel(message["id"]))
            return
        if self.listener is not None:
            self.listener.put_nowait(raw)
        elif self.pending and "id" in message:
            # A request (sampling, elicitation, roots) with no GET stream open: it belongs to a call in flight.
            next(reversed(self.pending.values())).queue.put_nowait(raw)
        else:
            self.backlog.append(raw)  # notifications wait for the session's GET stream


class _Stream:
    """The answer to one request as an event stream: what came before the response, then the response."""

    def __init__(self, session: StdioSession, key: bytes, waiting: _Pending, first: bytes) -> None:
        self.status = 200
        self.headers = dict(_SSE)
        self.session = session
        self.key = key
        self.waiting = waiting
        self.first = first
        self.answered = False

    async def chunks(self) -> AsyncIterator[bytes]:
        waiting = self.waiting
        item: Any = self.first
        while True:
            if item is _ENDED:
                yield _event(orjson.dumps({"jsonrpc": "2.0", "id": waiting.client_ident(self.key), "error": {
                    "code": -32603, "message": f"MCP server '{self.session.route.name}' exited before answering: "
                                               f"{self.session.exit_reason()}"}}))
                self.answered = True
                return
            yield _event(waiting.outward(item))
            if _is_response_to(item, self.key):
                self.answered = True
                return
            item = await waiting.queue.get()

    async def read(self, limit: int) -> bytes:
        raise KeyplaneError(502, "upstream_error", "an event stream is relayed, not read whole")

    def close(self) -> None:
        self.session.pending.pop(self.key, None)
        if not self.answered and self.session.ended is None:
            _cancel_quietly(self.session, self.key)


class _Listen:
    """A session's GET stream: server-to-client messages not tied to a request, until the session ends."""

    def __init__(self, session: StdioSession) -> None:
        self.status = 200
        self.headers = dict(_SSE)
        self.session = session
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        if session.listener is not None:
            session.listener.put_nowait(_ENDED)  # one GET stream per session: the newer one wins
        session.listener = self.queue
        while session.backlog:
            self.queue.put_nowait(session.backlog.popleft())

    async def chunks(self) -> AsyncIterator[bytes]:
        yield b": keyplane stdio session stream\n\n"
        while True:
            item = await self.queue.get()
            if item is _ENDED:
                return
            yield _event(item)

    async def read(self, limit: int) -> bytes:
        raise KeyplaneError(502, "upstream_error", "an event stream is relayed, not read whole")

    def close(self) -> None:
        if self.session.listener is self.queue:
            self.session.listener = None


def _is_response_to(raw: bytes, key: bytes) -> bool:
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(message, dict) and "method" not in message and orjson.dumps(message.get("id")) == key


def _progress_token(message: dict[str, Any]) -> Any:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get("progressToken") if isinstance(meta, dict) else None


def _send_quietly(session: StdioSession, message: bytes) -> None:
    task = asyncio.ensure_future(session.send(message))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _cancel_quietly(session: StdioSession, key: bytes) -> None:
    """The client left before its answer: tell the server, as an MCP client would."""
    _send_quietly(session, orjson.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                         "params": {"requestId": orjson.loads(key), "reason": "client disconnected"}}))


def child_environment(route: McpRoute) -> dict[str, str]:
    """A minimal environment (never keyplane's own: it holds the master key) with the server's env over it."""
    env = {name: os.environ[name] for name in _BASE_ENV if name in os.environ}
    env.update(route.env)
    return env


class _Watchman:
    """The ``stdio_reaper`` process: kills the process groups keyplane leaves behind if keyplane dies."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def _tell(self, line: str) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, "-m", "keyplane.gateway.stdio_reaper"],
                                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self.process = None

    def watch(self, group: int) -> None:
        self._tell(f"+{group}")

    def forget(self, group: int) -> None:
        if self.process is not None:
            self._tell(f"-{group}")

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
            self.process = None


@dataclass(slots=True)
class ServerStats:
    started: int = 0
    crashed: int = 0
    last_error: str | None = None


class StdioUpstream:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions: dict[str, StdioSession] = {}
        self.starting: collections.Counter[str] = collections.Counter()  # per server id, before registration
        self.stats: dict[str, ServerStats] = collections.defaultdict(ServerStats)
        self.watchman = _Watchman()
        # Every session id starts with it: a request for a session of another worker (or of this one before a
        # restart) is told where the trouble is.
        self.tag = secrets.token_hex(4)
        self.ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # session id -> why it ended
        # The current route of a server (``Keyplane.mcp_route_for``): set by the app, for ``routes_changed``.
        self.lookup: Callable[[str, str], Awaitable[McpRoute | None]] | None = None
        self._pool_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._ids = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._recheck = False

    def live(self, server_id: str) -> int:
        return self.starting[server_id] + sum(1 for s in self.sessions.values() if s.route.server_id == server_id)

    def health(self, route: McpRoute) -> dict[str, Any]:
        stats = self.stats[route.server_id]
        pooled = sum(1 for s in self.sessions.values() if s.pooled and s.route.server_id == route.server_id)
        return {"live_sessions": self.live(route.server_id), "max_sessions": self.settings.mcp_stdio_max_sessions,
                "stateless_processes": pooled, "processes_started": stats.started,
                "processes_crashed": stats.crashed, "last_error": stats.last_error}

    async def open(self, route: McpRoute, method: str, headers: dict[str, str], body: bytes) -> UpstreamAnswer:
        session_id = headers.get("mcp-session-id")
        session = self.sessions.get(session_id) if session_id else None
        if session is not None and (session.pooled or session.route.server_id != route.server_id):
            session = None
        if session_id and session is None:
            return self._gone(session_id)
        if session is not None:
            why = outdated(session.route, route)
            if why is not None:  # the change notice has not arrived yet: the request finds it first
                await self.stop(session, why)
                return self._gone(session.id)
            session.last_used = time.monotonic()
        if method == "DELETE":
            if session is None:
                return _rpc_error(400, None, "DELETE needs an Mcp-Session-Id")
            await self.stop(session, "ended by the client")
            return _Fixed(200, {})
        if method == "GET":
            if session is None:
                return _Fixed(405, {"allow": "POST, DELETE"})
            return _Listen(session)
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _rpc_error(400, None, "Parse error", -32700)
        if not isinstance(message, dict):
            return _rpc_error(400, None, "One JSON-RPC message per request")
        if session is None:
            if message.get("method") == "initialize" and "id" in message:
                return await self._start(route, body, message["id"])
            if stdio_stateless.is_stateless(headers, message):
                return await self._stateless(route, headers, message)
            return _rpc_error(400, message.get("id"), "No session: send initialize first, or use the stateless "
                                                      "2026-07-28 protocol (MCP-Protocol-Version: 2026-07-28)")
        if "id" not in message or "method" not in message:  # a notification, or the client's answer to a request
            await session.send(body)
            return _Fixed(202, {})
        key = orjson.dumps(message["id"])
        return await self._exchange(session, body, key, _Pending(asyncio.Queue(), _progress_token(message)))

    def _gone(self, session_id: str) -> UpstreamAnswer:
        """The answer for a session this process does not have, saying why when it knows."""
        reason = self.ended.get(session_id)
        if reason is not None:
            return _rpc_error(404, None, f"Session ended ({reason}): initialize a new one")
        if session_id.partition(".")[0] != self.tag:
            if self.settings.workers > 1:
                raise KeyplaneError(421, "session_elsewhere", "This MCP session's process runs in another keyplane "
                                    "worker (or in one that restarted since): stdio sessions need a load balancer "
                                    "routing on Mcp-Session-Id, or the stateless 2026-07-28 protocol, which any "
                                    "worker serves (see docs/mcp-gateway.md)")
            return _rpc_error(404, None, "Session not found: it was opened by another keyplane process, or before "
                                         "keyplane restarted; initialize a new one")
        return _rpc_error(404, None, "Session not found (it ended or idled out): initialize a new one")

    async def _exchange(self, session: StdioSession, body: bytes, key: bytes, waiting: _Pending) -> UpstreamAnswer:
        """Write one request, return its answer: JSON if the response comes first, else an event stream."""
        session.pending[key] = waiting
        try:
            await session.send(body)
            async with asyncio.timeout(session.route.timeout):
                first = await waiting.queue.get()
        except TimeoutError:
            session.pending.pop(key, None)
            _cancel_quietly(session, key)
            raise KeyplaneError(504, "upstream_timeout", f"MCP server '{session.route.name}' did not answer within "
                                                         f"{session.route.timeout:g} s") from None
        except BaseException:
            session.pending.pop(key, None)
            if session.ended is None:
                _cancel_quietly(session, key)
            raise
        if first is _ENDED:
            session.pending.pop(key, None)
            raise KeyplaneError(502, "upstream_error", f"MCP server '{session.route.name}' exited during the call: "
                                                       f"{session.exit_reason()}")
        if _is_response_to(first, key):
            session.pending.pop(key, None)
            return _Fixed(200, dict(_JSON), waiting.outward(first))
        return _Stream(session, key, waiting, first)

    async def _stateless(self, route: McpRoute, headers: dict[str, str], message: dict[str, Any]) -> UpstreamAnswer:
        """A 2026-07-28 request, answered by one of keyplane's own processes for this server."""
        try:
            stdio_stateless.check(headers, message)
        except stdio_stateless.Refusal as refusal:
            return _rpc_error(refusal.status, message.get("id"), refusal.message, refusal.code, refusal.data)
        if "id" not in message or "method" not in message:
            return _Fixed(202, {})  # no notification acts on a request that stands alone; nothing asked, no answer
        member = await self._pool_member(route, headers.get(OWNER_HEADER, ""))
        member.last_used = time.monotonic()
        if message["method"] == "server/discover":
            return _Fixed(200, dict(_JSON), stdio_stateless.discover(message["id"], member.initialized))
        internal = f"kp-{next(self._ids)}"
        body, client_token = stdio_stateless.inward(message, internal)
        waiting = _Pending(asyncio.Queue(), internal if client_token is not None else None, stateless=True,
                           method=message["method"], client_id=message["id"], client_token=client_token)
        return await self._exchange(member, body, orjson.dumps(internal), waiting)

    async def _pool_member(self, route: McpRoute, owner: str) -> StdioSession:
        """The least busy of the key's pool processes for this server; a new one while all are busy and there is
        room (an idle pool process of another key makes room when the server is at its cap)."""
        server_id = route.server_id
        stale = [(s, why) for s in self.sessions.values() if s.pooled and s.route.server_id == server_id
                 and (why := outdated(s.route, route)) is not None]
        for member, why in stale:  # the change notice has not arrived yet: the request finds it first
            await self.stop(member, why)

        def least_busy() -> tuple[StdioSession | None, bool]:
            members = [s for s in self.sessions.values()
                       if s.pooled and s.route.server_id == server_id and s.owner == owner]
            best = min(members, key=lambda s: len(s.pending), default=None)
            room = len(members) < self.settings.mcp_stdio_pool_size and \
                self.live(server_id) < self.settings.mcp_stdio_max_sessions
            return best, best is None or (bool(best.pending) and room)

        best, grow = least_busy()
        if not grow and best is not None:
            return best
        async with self._pool_locks[server_id]:  # one start at a time per server: no pool grows past its size
            best, grow = least_busy()
            if not grow and best is not None:
                return best
            if best is None and self.live(server_id) >= self.settings.mcp_stdio_max_sessions:
                idle = [s for s in self.sessions.values()
                        if s.pooled and s.route.server_id == server_id and not s.pending]
                if idle:
                    await self.stop(min(idle, key=lambda s: s.last_used), "made room for another key's requests")
            try:
                return await self._start_pooled(route, owner)
            except KeyplaneError:
                if best is not None:
                    return best  # busy, but there
                raise

    async def _start_pooled(self, route: McpRoute, owner: str) -> StdioSession:
        ident = f"kp-{next(self._ids)}"
        session, answer = await self._spawn(route, stdio_stateless.initialize_request(ident), ident, owner=owner)
        reply = orjson.loads(answer)
        if not isinstance(reply.get("result"), dict):
            await self.stop(session, "refused initialize")
            raise KeyplaneError(502, "upstream_error", f"MCP server '{route.name}' refused initialize: "
                                                       f"{mask(str(reply.get('error'))[:300], route)}")
        session.initialized = reply["result"]
        await session.send(stdio_stateless.INITIALIZED)
        return session

    async def _start(self, route: McpRoute, body: bytes, ident: Any) -> _Fixed:
        session, answer = await self._spawn(route, body, ident)
        return _Fixed(200, {**_JSON, "mcp-session-id": session.id}, answer)

    async def _spawn(self, route: McpRoute, body: bytes, ident: Any, owner: str | None = None) \
            -> tuple[StdioSession, bytes]:
        """Start a process, write ``body`` (an initialize) to it and return it once it has answered; with an
        ``owner``, a pool process serving that key's stateless requests."""
        if route.transport != "stdio" or not command_allowed(route.command, self.settings.mcp_stdio_allowed):
            raise KeyplaneError(503, "command_not_allowed", f"MCP server '{route.name}' runs a command this host no "
                                                            "longer allows (KEYPLANE_MCP_STDIO_COMMANDS)")
        cap = self.settings.mcp_stdio_max_sessions
        if self.live(route.server_id) >= cap:
            retry = max(1, min(60, round(self.settings.mcp_stdio_idle_seconds / 4)))
            raise KeyplaneError(503, "too_many_sessions", f"MCP server '{route.name}' already runs {cap} sessions, "
                                "its limit; end one (DELETE) or retry later", headers={"Retry-After": str(retry)})
        stats = self.stats[route.server_id]
        # A slot is held from here: by ``starting`` until the session is registered, then by ``sessions``
        # (never both at once, or two concurrent initializes would each see the other twice).
        self.starting[route.server_id] += 1
        counted_as_starting = True
        session: StdioSession | None = None
        try:
            try:
                process = await asyncio.create_subprocess_exec(
                    *route.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=child_environment(route), cwd=route.cwd,
                    start_new_session=True, limit=MAX_MESSAGE)
            except OSError as exc:
                stats.last_error = f"could not start: {type(exc).__name__}: {exc.strerror or exc}"
                raise KeyplaneError(502, "upstream_error", f"MCP server '{route.name}' {stats.last_error}") from None
            self.watchman.watch(process.pid)
            stats.started += 1
            session = StdioSession(f"{self.tag}.{secrets.token_urlsafe(24)}", route, process,
                                   pooled=owner is not None, owner=owner or "")
            session.tasks = [asyncio.ensure_future(self._read_stdout(session)),
                             asyncio.ensure_future(self._read_stderr(session))]
            self.sessions[session.id] = session
            self.starting[route.server_id] -= 1
            counted_as_starting = False
            log.info("mcp stdio server '%s' started, pid %d%s", route.name, process.pid,
                     " (stateless pool)" if owner is not None else "")
            key = orjson.dumps(ident)
            waiting = _Pending(asyncio.Queue())
            session.pending[key] = waiting
            await session.send(body)
            deadline = time.monotonic() + self.settings.mcp_stdio_start_seconds
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        item = await waiting.queue.get()
                except TimeoutError:
                    stats.last_error = f"did not answer initialize within {self.settings.mcp_stdio_start_seconds:g} s"
                    raise KeyplaneError(504, "upstream_timeout", f"MCP server '{route.name}' {stats.last_error}") \
                        from None
                if item is _ENDED:
                    stats.last_error = f"exited while starting: {session.exit_reason()}"
                    raise KeyplaneError(502, "upstream_error", f"MCP server '{route.name}' {stats.last_error}")
                if _is_response_to(item, key):
                    break
            session.pending.pop(key, None)
            session.last_used = time.monotonic()  # idle from its first answer, not from its spawn
        except BaseException:
            if session is not None:
                await self.stop(session, "failed to start")
            raise
        finally:
            if counted_as_starting:
                self.starting[route.server_id] -= 1
        self._ensure_sweeper()
        return session, item

    def routes_changed(self) -> None:
        """Some MCP server may have changed (an invalidation of the route table): stop, in the background,
        every process whose server is now disabled, deleted or runs another command, env or cwd."""
        if not self.sessions or self.lookup is None:
            return
        self._recheck = True
        if self._checker is None or self._checker.done():
            try:
                self._checker = asyncio.get_running_loop().create_task(self._recheck_routes())
            except RuntimeError:  # no event loop (a CLI command): no process runs here either
                return

    async def _recheck_routes(self) -> None:
        assert self.lookup is not None
        while self._recheck:
            self._recheck = False
            for org_id, name in {(s.route.org_id, s.route.name) for s in self.sessions.values()}:
                try:
                    current = await self.lookup(org_id, name)
                except Exception as exc:  # the store is unreachable: the request-time check still applies
                    log.warning("mcp stdio: could not re-read server '%s' after a change: %s", name,
                                type(exc).__name__)
                    continue
                stale = [(s, why) for s in list(self.sessions.values())
                         if s.route.org_id == org_id and s.route.name == name
                         and (why := outdated(s.route, current)) is not None]
                await asyncio.gather(*(self.stop(s, why) for s, why in stale), return_exceptions=True)

    async def _read_stdout(self, session: StdioSession) -> None:
        stdout = session.process.stdout
        assert stdout is not None
        reason = "exited"
        secrets_ = [secret.encode() for secret in session.route.secrets()]
        try:
            while True:
                line = await stdout.readline()
                if not line:
                    break
                line = line.strip()
                if not line:
                    continue
                for secret in secrets_:  # a server may echo its own env (server-everything's get-env does)
                    if secret in line:
                        line = line.replace(secret, b"\xe2\x80\xa6")
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.warning("mcp stdio server '%s' wrote a non-JSON line to stdout: %s", session.route.name,
                                mask(line[:200].decode("utf-8", "replace"), session.route))
                    continue
                if isinstance(message, dict):
                    session.deliver(line, message)
        except (ValueError, asyncio.LimitOverrunError):
            reason = f"wrote a message larger than {MAX_MESSAGE} bytes"
        if session.ended is None:
            code = await _wait_briefly(session.process)
            session.ended = f"{reason} (exit code {code})" if reason == "exited" else reason
            self.stats[session.route.server_id].crashed += 1
            self.stats[session.route.server_id].last_error = session.ended
            log.warning("mcp stdio server '%s' (pid %d) %s", session.route.name, session.process.pid, session.ended)
            await self.stop(session, session.ended)

    async def _read_stderr(self, session: StdioSession) -> None:
        stderr = session.process.stderr
        assert stderr is not None
        with contextlib.suppress(ValueError, asyncio.LimitOverrunError):
            while True:
                line = await stderr.readline()
                if not line:
                    return
                text = mask(line.decode("utf-8", "replace").rstrip()[:2000], session.route)
                if text:
                    session.stderr_tail.append(text[:200])
                    log.info("mcp stdio '%s' [%d] stderr: %s", session.route.name, session.process.pid, text)

    async def stop(self, session: StdioSession, reason: str) -> None:
        """End a session: its waiters answered, its process group terminated, then killed, and reaped."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            if not session.pooled:
                self.ended[session.id] = reason
                if len(self.ended) > ENDED_REMEMBERED:
                    self.ended.popitem(last=False)
        if session.ended is None:
            session.ended = reason
        for waiting in list(session.pending.values()):
            waiting.queue.put_nowait(_ENDED)
        if session.listener is not None:
            session.listener.put_nowait(_ENDED)
        process = session.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            if await _wait_briefly(process, STOP_GRACE) is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        # The server's own children (npx starts the real server) may outlive it: the group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self.watchman.forget(process.pid)
        for task in session.tasks:
            if task is not asyncio.current_task() and not task.done():
                task.cancel()
        log.info("mcp stdio server '%s' (pid %d) stopped: %s", session.route.name, process.pid, reason)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        idle = self.settings.mcp_stdio_idle_seconds
        while self.sessions:
            await asyncio.sleep(min(idle / 4, 5.0))
            cutoff = time.monotonic() - idle
            for session in list(self.sessions.values()):
                if session.last_used < cutoff and not session.pending:
                    await self.stop(session, f"idle for {idle:g} s")

    async def close(self) -> None:
        for task in (self._sweeper, self._checker):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(self.stop(s, "keyplane is stopping") for s in list(self.sessions.values())),
                             return_exceptions=True)
        self.watchman.close()


async def _wait_briefly(process: asyncio.subprocess.Process, seconds: float = 1.0) -> int | None:
    try:
        async with asyncio.timeout(seconds):
            return await process.wait()
    except TimeoutError:
        return None


class RoutedUpstream:
    """The gateway's one upstream: HTTP servers to ``HttpUpstream``, stdio servers to ``StdioUpstream``."""

    def __init__(self, http: McpUpstream, stdio: StdioUpstream) -> None:
        self.http = http
        self.stdio = stdio

    async def open(self, route: McpRoute, method: str, headers: dict[str, str], body: bytes) -> UpstreamAnswer:
        if route.transport == "stdio":
            return await self.stdio.open(route, method, headers, body)
        return await self.http.open(route, method, headers, body)

    async def probe(self, route: McpRoute) -> dict[str, Any]:
        """``mcp_upstream.probe``; for a stdio server (a process of its own) also its processes' state."""
        if route.transport != "stdio":
            return await probe(self, route)
        process = self.stdio.health(route)
        if process["live_sessions"] >= process["max_sessions"]:  # a probe would take a client's slot
            return {"reachable": True, "error": None, "tools": [], "process": process,
                    "note": "every session slot is in use, so no probe process was started"}
        report = await probe(self, route)
        report["process"] = self.stdio.health(route)
        return report

    async def close(self) -> None:
        await self.stdio.close()
        await self.http.close()
