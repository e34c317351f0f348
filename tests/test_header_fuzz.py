"""Property: whatever bytes arrive in the data plane's headers, the answer is never a 5xx.

Arbitrary bytes (hypothesis) in Authorization, X-API-Key, X-MCP-Signature, X-MCP-Timestamp,
X-Forwarded-For and friends, sent straight to the ASGI app (no HTTP client in between to tidy
them), against /v1/models and /api/v1/keys/verify: every answer is a success or a 4xx in the one
error shape.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyplane.app import KeyplaneApp
from keyplane.domain import signing
from tests.conftest import create_key

HEADER_NAMES = [b"authorization", b"x-api-key", b"x-mcp-signature", b"x-mcp-timestamp", b"x-forwarded-for",
                b"forwarded", b"x-real-ip", b"content-length", b"content-type", b"transfer-encoding"]


async def asgi_call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]],
                    body: bytes = b"") -> tuple[int, bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"keyplane.test"), *headers], "client": ("127.0.0.1", 41000),
             "server": ("keyplane.test", 80), "state": {}}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    status = 0
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def assert_answer(status: int, body: bytes) -> None:
    assert 200 <= status < 500, (status, body)
    if status >= 400:
        error = orjson.loads(body)["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["type"]


async def test_data_plane_headers_over_arbitrary_bytes_never_answer_5xx(settings_factory: Any) -> None:
    # The trusted proxy makes X-Forwarded-For parsed (from this test's 127.0.0.1); a high brake keeps
    # the deeper checks reachable for every example.
    app = KeyplaneApp(settings_factory(trusted_proxies="127.0.0.0/8", brake_max_failures=1_000_000))
    await app.startup()
    try:
        assert app.bootstrap is not None and app.bootstrap.admin_token
        admin_token = app.bootstrap.admin_token
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as client:
            admin = {"Authorization": f"Bearer {admin_token}"}
            _, plain = await create_key(client, admin, limit_profile="professional")
            _, signed_key = await create_key(client, admin, require_signature=True, limit_profile="professional",
                                             ip_allowlist=["127.0.0.0/8", "2001:db8::/32"])
        stamp = str(int(time.time()))
        good_signature = signing.sign(signed_key, stamp, b"")
        bearers = [f"Bearer {plain}", f"Bearer {signed_key}", f"Bearer {admin_token}", signed_key]
        latin1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=80).map(lambda t: t.encode("latin-1"))
        junk = st.one_of(st.binary(max_size=96), latin1, st.text(max_size=40).map(lambda t: t.encode("utf-8")))

        def near(known: list[str]) -> st.SearchStrategy[bytes]:
            """A known good value, as is or with bytes spliced in, cut off or appended."""
            good = st.sampled_from([k.encode() for k in known])
            return st.one_of(good, st.builds(lambda k, j, at: k[:at] + j + k[at:], good, st.binary(max_size=4),
                                             st.integers(0, 80)))

        digits = st.text(alphabet="0123456789\u00b2\u00b3\u00b9\u0660\u0661", min_size=1, max_size=12)
        fields = {
            b"authorization": st.one_of(near(bearers), junk),
            b"x-api-key": st.one_of(near([plain, signed_key]), junk),
            b"x-mcp-timestamp": st.one_of(near([stamp]), digits.map(lambda t: t.encode("utf-8")),
                                          digits.map(lambda t: t.encode("latin-1", "replace")), junk),
            b"x-mcp-signature": st.one_of(near([good_signature, good_signature.upper(), f" {good_signature} "]),
                                          junk),
            b"x-forwarded-for": st.one_of(near(["127.0.0.1", "::ffff:127.0.0.1", "2001:db8::1", "10.0.0.1, 127.0.0.1"]),
                                          junk),
        }
        headers = st.builds(
            lambda chosen, extra: [*chosen.items(), *extra],
            st.fixed_dictionaries({}, optional=fields),
            st.lists(st.tuples(st.sampled_from(HEADER_NAMES), junk), max_size=3),
        )
        verify_body = orjson.dumps({"key": plain, "scopes": ["models:read"]})

        loop = asyncio.get_running_loop()

        def call(*args: Any) -> tuple[int, bytes]:
            return asyncio.run_coroutine_threadsafe(asgi_call(app, *args), loop).result(timeout=30)

        # Hypothesis drives a synchronous property from a worker thread; the app stays on this loop.
        @settings(max_examples=250, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(headers=headers)
        def property_holds(headers: list[tuple[bytes, bytes]]) -> None:
            assert_answer(*call("GET", "/v1/models", headers))
            assert_answer(*call("POST", "/api/v1/keys/verify", headers, verify_body))

        await asyncio.to_thread(property_holds)
    finally:
        await app.shutdown()
