"""An independent client: the official TypeScript MCP SDK (npm, on the machine's Node) against a running server."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest

from keyplane.app import KeyplaneApp
from keyplane.domain import scopes as scope_rules
from tests.conftest import create_sa, verify
from tests.processes import serve

CLIENT_DIR = Path(__file__).parent / "mcp_ts_client"
NODE = shutil.which("node")


def test_the_typescript_client_is_installed() -> None:
    """`make test` installs it (npm ci); CI must not silently skip the independent client."""
    assert NODE, "node is required for the TypeScript MCP client test"
    assert (CLIENT_DIR / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir(), \
        "run `npm ci --prefix tests/mcp_ts_client` (make test does)"


@pytest.mark.skipif(not NODE or not (CLIENT_DIR / "node_modules").is_dir(), reason="TypeScript client not installed")
async def test_typescript_sdk_client_lists_and_calls_tools(app: KeyplaneApp, client: httpx.AsyncClient,
                                                           admin: dict[str, str]) -> None:
    _, agent = await create_sa(client, admin, sorted(scope_rules.AGENT_DEFAULT_SCOPES))
    async with serve(app) as base:
        proc = await asyncio.create_subprocess_exec(
            NODE or "node", str(CLIENT_DIR / "client.mjs"), base + "/mcp", agent,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, stderr.decode()
    seen = json.loads(stdout)
    assert seen["protocolVersion"] in ("2025-06-18", "2025-11-25")
    assert seen["sessionId"]
    tools = {t["name"]: t for t in seen["tools"]}
    # The agent's scopes cover these and not the audit trail.
    assert set(tools) == {name for name, scope in scope_rules.MCP_TOOL_SCOPES.items()
                          if scope in scope_rules.AGENT_DEFAULT_SCOPES}
    assert tools["keyplane_list_virtual_keys"]["readOnly"] is True
    assert tools["keyplane_revoke_virtual_key"]["destructive"] is True
    created = seen["created"]["structured"]
    assert seen["created"]["isError"] is False and created["secret"].startswith("mcp_sk_")
    assert [k["id"] for k in seen["listed"]["data"]] == [created["key"]["id"]]
    assert seen["missing"]["isError"] is True and "not_found" in seen["missing"]["text"]
    assert seen["revoked"]["status"] == "disabled"
    assert (await verify(client, admin, created["secret"]))["code"] == "DISABLED"
    assert "401" in seen["badToken"] or "invalid" in seen["badToken"].lower()
