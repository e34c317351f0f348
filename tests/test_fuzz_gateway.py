"""The outside attacker on the proxying routes: ``/mcp/{name}``, ``/v1/messages`` and ``/v1/responses``.

Hypothesis sends arbitrary JSON-RPC (batches, huge and wrongly typed ids, unknown methods, junk params) and
arbitrary MCP headers (Mcp-Session-Id, MCP-Protocol-Version, Mcp-Method, Mcp-Name, Accept, Content-Type), and
arbitrary Messages/Responses bodies, straight to the ASGI app (no HTTP client in between to tidy them), with
real upstreams behind it: the MCP server of tests/mcp_upstream.py and the fake of tests/fake_agent_upstream.py.

Every answer: no 5xx except an upstream's failure relayed deliberately (502/503/504, or the upstream's own
5xx, as ``upstream_*``); every refusal in keyplane's one error shape or, on /mcp, a JSON-RPC error; no secret
(the upstream credential keyplane injects, the provider keys, the caller's own key) in any answer nor in
anything logged. Examples are bounded so that each backend takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyplane.app import KeyplaneApp
from keyplane.logs import JsonFormatter
from tests import mcp_upstream
from tests.conftest import bearer, create_key
from tests.fake_agent_upstream import FakeAgentUpstream, serve_in_thread

ANTHROPIC_SECRET = "sk-ant-FUZZ-upstream-secret-5d1c0b7e9a"
OPENAI_SECRET = "sk-openai-FUZZ-upstream-secret-4e2a8f6c1d"
EXAMPLES = 120
# Tools of the test upstream that finish at once whatever their arguments (slow, gated, count and
# confirm_delete wait on time or on the client, which a one-shot request never answers).
QUICK_TOOLS = ["read_file", "read_dir", "write_file", "echo", "seen_headers"]
METHODS = ["initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read",
           "resources/templates/list", "prompts/list", "prompts/get", "completion/complete", "logging/setLevel",
           "notifications/initialized", "notifications/cancelled", "notifications/progress", "sampling/createMessage"]
UNAVAILABLE = {"limits_unavailable", "store_unavailable", "too_many_sessions"}


@pytest.fixture(scope="module")
def mcp() -> Iterator[mcp_upstream.Upstream]:
    with mcp_upstream.running() as state:
        yield state


@pytest.fixture(scope="module")
def agent_url() -> Iterator[str]:
    with serve_in_thread(FakeAgentUpstream().app) as url:
        yield url


class Captured(logging.Handler):
    """Every record as keyplane would write it (the JSON formatter, its ``fields`` included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
async def fuzz_app(settings_factory: Any) -> AsyncIterator[KeyplaneApp]:
    # No default limit profile and a brake that never trips: every example reaches the deep paths.
    app = KeyplaneApp(settings_factory(default_limit_profile=None, brake_max_failures=1_000_000))
    await app.startup()
    yield app
    await app.shutdown()


async def asgi_call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]],
                    body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request to the ASGI app, its body announced as an HTTP client would; the client stays connected
    until the whole answer has been sent."""
    if body:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"keyplane.test"), *headers], "client": ("127.0.0.1", 41000),
             "server": ("keyplane.test", 80), "state": {}}
    sent = False
    answered = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    status = 0
    answer_headers: dict[bytes, bytes] = {}
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers.update((k.lower(), v) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                answered.set()

    await app(scope, receive, send)
    return status, answer_headers, b"".join(chunks)


def is_keyplane_error(body: Any) -> bool:
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)):
        return False
    error = body["error"]
    return all(isinstance(error.get(f), str) and error[f] for f in ("code", "message", "type"))


def is_anthropic_error(body: Any) -> bool:
    """Anthropic's error body, which /v1/messages* answer in (docs/gateway.md), keyplane's code inside."""
    if not (isinstance(body, dict) and set(body) == {"type", "error"} and body["type"] == "error"
            and isinstance(body["error"], dict)):
        return False
    error = body["error"]
    return all(isinstance(error.get(f), str) and error[f] for f in ("code", "message", "type"))


def is_jsonrpc_error(body: Any) -> bool:
    return (isinstance(body, dict) and body.get("jsonrpc") == "2.0" and "id" in body
            and isinstance(body.get("error"), dict) and isinstance(body["error"].get("code"), int)
            and isinstance(body["error"].get("message"), str))


def check_answer(status: int, headers: dict[bytes, bytes], body: bytes, secrets: list[str], *,
                 jsonrpc_allowed: bool = False, anthropic: bool = False) -> None:
    assert 200 <= status < 600, status
    for secret in secrets:
        assert secret.encode() not in body, f"a secret in a {status} answer"
        assert not any(secret.encode() in v for v in headers.values()), f"a secret in a {status} answer's headers"
    if status < 400:
        return
    content_type = headers.get(b"content-type", b"")
    assert content_type.startswith(b"application/json"), (status, content_type, body[:300])
    parsed = orjson.loads(body)
    if anthropic:
        assert is_anthropic_error(parsed), (status, body[:500])
    else:
        assert is_keyplane_error(parsed) or (jsonrpc_allowed and is_jsonrpc_error(parsed)), (status, body[:500])
    if status >= 500:
        # Only an upstream's failure, relayed on purpose, or a declared unavailability: never a crash.
        code = parsed["error"]["code"] if is_keyplane_error(parsed) or is_anthropic_error(parsed) else None
        relayed = jsonrpc_allowed and is_jsonrpc_error(parsed) and status in (502, 503, 504)
        declared = code is not None and (code.startswith("upstream_") or code in UNAVAILABLE)
        assert relayed or declared, (status, body[:500])


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                        st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=max_leaves)


def jsonrpc_messages() -> st.SearchStrategy[Any]:
    ids = st.one_of(st.integers(-(2**70), 2**70), st.just(2**63), st.text(max_size=30), st.none(),
                    st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), st.just("x" * 5000))
    tool_params = st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(QUICK_TOOLS), st.text(max_size=40), json_values(2))},
        optional={"arguments": st.one_of(st.fixed_dictionaries({}, optional={
            "path": st.text(max_size=30), "text": st.text(max_size=30)}), json_values()),
            "_meta": st.one_of(st.fixed_dictionaries({"progressToken": st.one_of(st.text(max_size=8), st.integers())}),
                               json_values(3))})
    named_params = st.fixed_dictionaries({}, optional={
        "uri": st.one_of(st.sampled_from(["file:///readme", "file:///docs/x", "file:///etc/passwd"]),
                         st.text(max_size=40)),
        "name": st.one_of(st.sampled_from(["review", "readme"]), st.text(max_size=20)),
        "arguments": json_values(3), "protocolVersion": st.sampled_from(["2025-06-18", "2025-11-25", "1999", ""]),
        "capabilities": json_values(3), "clientInfo": json_values(3), "cursor": st.text(max_size=20)})
    method = st.one_of(st.sampled_from(METHODS), st.text(max_size=30), json_values(2))
    # Mostly well-formed requests (so the upstream sees them), then anything at all.
    request = st.fixed_dictionaries(
        {"jsonrpc": st.just("2.0"), "id": st.one_of(st.integers(0, 1000), ids),
         "method": st.sampled_from(METHODS), "params": st.one_of(tool_params, named_params)})
    message = st.fixed_dictionaries(
        {"jsonrpc": st.one_of(st.just("2.0"), st.sampled_from(["1.0", "", 2.0]), st.none())},
        optional={"id": ids, "method": method,
                  "params": st.one_of(tool_params, named_params, json_values()),
                  "result": json_values(3), "error": json_values(3)})
    return st.one_of(request, request, request, message, st.lists(message, max_size=3), json_values())


def mostly(good: str, other: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """``good`` about three times in four, else ``other``."""
    return st.one_of(st.just(good.encode("utf-8")), st.just(good.encode("utf-8")), st.just(good.encode("utf-8")),
                     other)


def to_json(value: Any) -> bytes:
    """The standard library's JSON: it writes integers past 64 bits (orjson refuses), as attackers may."""
    return json.dumps(value).encode()


def near(values: list[str], junk: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A known good value, as is or with bytes spliced in; or junk."""
    good = st.sampled_from([v.encode() for v in values])
    return st.one_of(good, st.builds(lambda k, j, at: k[:at] + j + k[at:], good, st.binary(max_size=4),
                                     st.integers(0, 80)), junk)


def junk_bytes() -> st.SearchStrategy[bytes]:
    latin1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=60).map(lambda t: t.encode("latin-1"))
    return st.one_of(st.binary(max_size=64), latin1, st.text(max_size=30).map(lambda t: t.encode("utf-8")))


def drive(app: KeyplaneApp) -> Callable[..., tuple[int, dict[bytes, bytes], bytes]]:
    """Call the app (on this test's loop) from Hypothesis's worker thread."""
    loop = asyncio.get_running_loop()

    def call(*args: Any) -> tuple[int, dict[bytes, bytes], bytes]:
        return asyncio.run_coroutine_threadsafe(asgi_call(app, *args), loop).result(timeout=60)

    return call


FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


async def test_mcp_gateway_over_arbitrary_json_rpc_and_headers(
        fuzz_app: KeyplaneApp, mcp: mcp_upstream.Upstream, captured: Captured) -> None:
    transport = httpx.ASGITransport(app=fuzz_app, client=("127.0.0.1", 40000))
    assert fuzz_app.bootstrap is not None and fuzz_app.bootstrap.admin_token
    admin = bearer(fuzz_app.bootstrap.admin_token)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test", timeout=30) as client:
        made = await client.post("/api/v1/mcp-servers", headers=admin, json={
            "name": "files", "url": mcp.url, "timeout_seconds": 10, "default_key": False,
            "headers": {"Authorization": f"Bearer {mcp_upstream.UPSTREAM_TOKEN}"},
            "tool_scopes": {"write_file": "files:write"}})
        assert made.status_code == 201, made.text
        _, secret = await create_key(client, admin, scopes=["tools:call", "files:write"],
                                     mcp_servers={"files": ["*"]})
        _, narrow = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["read_*"]})
        opened = await client.post("/mcp/files", headers={**bearer(secret), "Accept": "application/json, "
                                   "text/event-stream", "Content-Type": "application/json"},
                                   json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                                       "protocolVersion": "2025-06-18", "capabilities": {},
                                       "clientInfo": {"name": "fuzz", "version": "1"}}})
        assert opened.status_code == 200, opened.text
        session_id = opened.headers["mcp-session-id"]
    secrets = [mcp_upstream.UPSTREAM_TOKEN, secret, narrow, fuzz_app.bootstrap.admin_token]
    junk = junk_bytes()
    # Mostly what a real client sends, so that most examples get past authentication and the session to
    # the upstream; the rest mangled or junk. A header left out is also a case.
    header_fields = {
        b"authorization": mostly(f"Bearer {secret}", st.one_of(st.just(f"Bearer {narrow}".encode()),
                                                               near([f"Bearer {secret}"], junk))),
        b"mcp-session-id": mostly(session_id, near([session_id.rpartition(".")[0], "x." + session_id,
                                                    session_id + "\u00e9"], junk)),
        b"mcp-protocol-version": mostly("2025-06-18", near(["2025-11-25", "2025-03-26", "2026-07-28"], junk)),
        b"accept": mostly("application/json, text/event-stream",
                          near(["application/json", "text/event-stream", "*/*"], junk)),
        b"content-type": mostly("application/json", near(["application/json; charset=utf-8", "text/plain"], junk)),
    }
    optional_fields = {
        b"mcp-method": near(METHODS, junk),
        b"mcp-name": near([*QUICK_TOOLS, "=?base64?cmVhZF9maWxl?="], junk),
        b"last-event-id": junk,
    }
    headers = st.builds(lambda always, sometimes: [*always.items(), *sometimes.items()],
                        st.fixed_dictionaries(header_fields), st.fixed_dictionaries({}, optional=optional_fields))
    bodies = st.one_of(jsonrpc_messages().map(to_json), jsonrpc_messages().map(to_json),
                       jsonrpc_messages().map(to_json), junk, st.just(b""))
    # GET with a live session opens the session's event stream, which does not end: fuzzed ids only.
    methods = st.sampled_from(["POST"] * 8 + ["DELETE", "GET", "PUT"])
    paths = st.sampled_from(["/mcp/files"] * 6 + ["/mcp/nope", "/mcp/files/", "/mcp/FILES", "/mcp/.."])
    call = drive(fuzz_app)

    @FUZZ_SETTINGS
    @given(method=methods, path=paths, headers=headers, body=bodies)
    def property_holds(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if method == "GET":
            headers = [(k, v) for k, v in headers if k != b"mcp-session-id"] + [(b"mcp-session-id", b"fuzzed")]
        if method == "DELETE" and dict(headers).get(b"mcp-session-id") == session_id.encode():
            return  # ending the one live session would only narrow what the other examples reach
        status, answer_headers, answer = call(method, path, headers, body if method == "POST" else b"")
        check_answer(status, answer_headers, answer, secrets, jsonrpc_allowed=True)
        seen[status] += 1

    seen: Counter[int] = Counter()
    await asyncio.to_thread(property_holds)
    print(f"/mcp/files answers by status: {dict(sorted(seen.items()))}")
    assert seen[200] and seen[400] and seen[401]  # the examples reached the upstream, not only the refusals
    await fuzz_app.kp.flush_usage()  # what the examples recorded is written, whatever their names and ids
    logged = "\n".join(captured.lines)
    assert "Traceback" not in logged, logged[-3000:]
    for text in secrets:
        assert text not in logged


async def test_messages_and_responses_over_arbitrary_bodies(
        fuzz_app: KeyplaneApp, agent_url: str, captured: Captured) -> None:
    transport = httpx.ASGITransport(app=fuzz_app, client=("127.0.0.1", 40000))
    assert fuzz_app.bootstrap is not None and fuzz_app.bootstrap.admin_token
    admin = bearer(fuzz_app.bootstrap.admin_token)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test", timeout=30) as client:
        for provider in (
            {"name": "claude", "kind": "anthropic", "base_url": f"{agent_url}/v1", "api_key": ANTHROPIC_SECRET,
             "timeout_seconds": 10, "models": [{"name": "claude-test", "input_per_mtok": 3.0,
                                                "output_per_mtok": 15.0}, {"name": "claude-overloaded"}]},
            {"name": "oai", "base_url": f"{agent_url}/v1", "api_key": OPENAI_SECRET, "timeout_seconds": 10,
             "models": [{"name": "gpt-resp", "input_per_mtok": 2.0, "output_per_mtok": 8.0}]},
        ):
            assert (await client.post("/api/v1/providers", json=provider, headers=admin)).status_code == 201
        budgeted = await client.post("/api/v1/limit-profiles", headers=admin, json={
            "name": "budgeted", "cost_per_day_usd": 5.0})
        assert budgeted.status_code == 201, budgeted.text
        _, secret = await create_key(client, admin)
        _, limited = await create_key(client, admin, limit_profile="budgeted")
    secrets = [ANTHROPIC_SECRET, OPENAI_SECRET, secret, limited, fuzz_app.bootstrap.admin_token]
    junk = junk_bytes()
    models = st.one_of(st.sampled_from(["claude-test", "claude-overloaded", "gpt-resp", "nope", ""]),
                       json_values(2))
    numbers = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 4096, 2**31, 2**63]),
                        st.floats(allow_nan=False), st.text(max_size=6), st.none(), st.booleans())
    content = st.one_of(st.text(max_size=40), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image", "tool_result", "input_text", ""])},
        optional={"text": st.text(max_size=20)}), max_size=3), json_values(3))
    messages = st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]),
                                                         "content": content}), max_size=3), json_values(3))
    shaped = st.fixed_dictionaries({"model": models}, optional={
        "max_tokens": numbers, "max_output_tokens": numbers, "messages": messages, "input": content,
        "stream": st.one_of(st.booleans(), json_values(1)), "metadata": json_values(3),
        "system": content, "tools": json_values(3), "instructions": content,
        "previous_response_id": st.text(max_size=12), "stream_options": json_values(2)})
    bodies = st.one_of(shaped.map(to_json), json_values().map(to_json), junk, st.just(b""))
    auths = st.one_of(
        st.sampled_from([[(b"x-api-key", secret.encode())], [(b"authorization", f"Bearer {secret}".encode())],
                         [(b"x-api-key", limited.encode())]]),
        st.lists(st.tuples(st.sampled_from([b"x-api-key", b"authorization"]), near([secret], junk)), max_size=2))
    extra = st.fixed_dictionaries({}, optional={
        b"content-type": near(["application/json", "text/plain", "application/x-www-form-urlencoded"], junk),
        b"anthropic-version": near(["2023-06-01"], junk), b"anthropic-beta": junk,
        b"accept": near(["text/event-stream", "application/json"], junk), b"openai-organization": junk})
    paths = st.sampled_from(["/v1/messages", "/v1/responses", "/v1/messages/count_tokens"])
    call = drive(fuzz_app)

    @FUZZ_SETTINGS
    @given(path=paths, auth=auths, extra=extra, body=bodies)
    def property_holds(path: str, auth: list[tuple[bytes, bytes]], extra: dict[bytes, bytes], body: bytes) -> None:
        status, answer_headers, answer = call("POST", path, [*auth, *extra.items()], body)
        check_answer(status, answer_headers, answer, secrets, anthropic=path.startswith("/v1/messages"))
        seen[status] += 1

    seen: Counter[int] = Counter()
    await asyncio.to_thread(property_holds)
    print(f"/v1/messages and /v1/responses answers by status: {dict(sorted(seen.items()))}")
    assert seen[200] and seen[400] and seen[401]
    await fuzz_app.kp.flush_usage()
    logged = "\n".join(captured.lines)
    assert "Traceback" not in logged, logged[-3000:]
    for text in secrets:
        assert text not in logged
