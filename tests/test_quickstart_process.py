"""The quickstart path through real ``keyplane serve`` and ``keyplane`` CLI processes."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from keyplane.domain import tokens
from tests.conftest import BACKENDS
from tests.processes import Server, cli

# Slow multi-process tests run on SQLite and, when available, the distributed mode (PostgreSQL + Redis),
# which covers PostgreSQL as well.
PROCESS_BACKENDS = [b for b in BACKENDS if b != "postgresql"] if "distributed" in BACKENDS else BACKENDS

# The quickstart starts from nothing: each first `keyplane serve` here migrates an empty store itself.
pytestmark = pytest.mark.fresh_store

TOKEN_RE = re.compile(r"mcp_sa_[0-9A-Za-z]{32}")


def _admin_token(server: Server) -> str:
    found = TOKEN_RE.findall(server.output)
    assert len(found) == 1, server.output
    return found[0]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_first_start_prints_the_token_once_and_later_starts_reuse_the_store(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    server = Server(store_env, tmp_path)
    try:
        server.wait_ready()
        token = _admin_token(server)
        assert server.url in server.output and "shown once" in server.output
        headers = {"Authorization": f"Bearer {token}"}
        created = httpx.post(f"{server.url}/api/v1/keys", json={"name": "qs"}, headers=headers).json()
        secret = created["secret"]
        ok = httpx.post(f"{server.url}/api/v1/keys/verify", json={"key": secret}, headers=headers).json()
        assert ok["valid"] is True
        assert httpx.get(f"{server.url}/docs").status_code == 200
        assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    finally:
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a graceful shutdown
    assert "Application shutdown complete" in server.logs
    assert (tmp_path / "home" / "keyplane.db").exists()
    assert token not in server.logs and secret not in server.logs  # logs never carry a secret

    again = Server(store_env, tmp_path)
    try:
        again.wait_ready()
        assert TOKEN_RE.findall(again.output) == []  # not printed, not regenerated
        assert "printed on first start" in again.output
        keys = httpx.get(f"{again.url}/api/v1/keys", headers=headers).json()["data"]
        assert [k["name"] for k in keys] == ["qs"]
    finally:
        again.stop()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_admin_token_from_the_environment(store_env: dict[str, str], tmp_path: Path) -> None:
    wanted = cli(store_env, "token", "generate").stdout.strip()
    assert tokens.is_well_formed(wanted, tokens.SERVICE_ACCOUNT_PREFIX)

    refused = cli({**store_env, "KEYPLANE_ADMIN_TOKEN": "mcp_sa_not-a-token"}, "serve", check=False, cwd=tmp_path)
    assert refused.returncode != 0 and "KEYPLANE_ADMIN_TOKEN" in refused.stderr

    server = Server({**store_env, "KEYPLANE_ADMIN_TOKEN": wanted}, tmp_path)
    try:
        server.wait_ready()
        assert wanted not in server.output and "KEYPLANE_ADMIN_TOKEN" in server.output
        who = httpx.get(f"{server.url}/api/v1/whoami", headers={"Authorization": f"Bearer {wanted}"})
        assert who.status_code == 200 and who.json()["name"] == "admin"
    finally:
        server.stop()


@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_cli_manages_keys_and_a_running_server_notices(
    backend: str, store_env: dict[str, str], tmp_path: Path
) -> None:
    server = Server(store_env, tmp_path)
    try:
        server.wait_ready()
        headers = {"Authorization": f"Bearer {_admin_token(server)}"}
        made = json.loads(cli(store_env, "keys", "create", "from-cli", "--scope", "chats:create",
                              "--cost-center", "cc9", "--meta", "team=ml", "--json").stdout)
        secret, key_id = made["secret"], made["key"]["id"]

        def check() -> str:
            resp = httpx.post(f"{server.url}/api/v1/keys/verify", json={"key": secret}, headers=headers)
            return str(resp.json()["code"])

        assert check() == "VALID"
        listing = cli(store_env, "keys", "list").stdout
        assert "from-cli" in listing and "cc9" in listing and secret not in listing

        cli(store_env, "keys", "disable", key_id)
        deadline = time.monotonic() + 5
        while check() != "DISABLED":  # the server's change poll picks up another process's change
            assert time.monotonic() < deadline, "server never saw the CLI's disable"
            time.sleep(0.05)
        cli(store_env, "keys", "enable", key_id)

        rotated = json.loads(cli(store_env, "keys", "rotate", key_id, "--json").stdout)
        assert rotated["secret"] != secret
        refused = cli(store_env, "keys", "delete", key_id, check=False)
        assert refused.returncode != 0 and "key_recently_used" in refused.stderr
        cli(store_env, "keys", "delete", key_id, "--force")

        sa = json.loads(cli(store_env, "sa", "create", "bot", "--scope", "audit:read", "--json").stdout)
        assert sa["token"].startswith("mcp_sa_")
        assert "bot" in cli(store_env, "sa", "list").stdout
        assert "standard" in cli(store_env, "limit-profiles", "list").stdout
        bad = cli(store_env, "keys", "create", "x", "--scope", "nope", check=False)
        assert bad.returncode == 1 and "invalid_request" in bad.stderr and "Traceback" not in bad.stderr

        audit = json.loads(cli(store_env, "audit", "list", "--json").stdout)["data"]
        assert audit[0]["action"] == "service_account.create" and audit[0]["principal"].startswith("cli:")
        assert "audit chain OK" in cli(store_env, "audit", "verify").stdout

        org = json.loads(cli(store_env, "orgs", "create", "acme", "--json").stdout)
        acme = {"Authorization": f"Bearer {org['token']}"}
        assert httpx.get(f"{server.url}/api/v1/keys", headers=acme).json()["data"] == []
        assert "acme" in cli(store_env, "orgs", "list").stdout
        assert cli(store_env, "orgs", "create", "acme", check=False).returncode == 1
    finally:
        server.stop()


@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_concurrent_processes_never_fork_the_chain(backend: str, store_env: dict[str, str], tmp_path: Path) -> None:
    server = Server(store_env, tmp_path)
    try:
        server.wait_ready()
        headers = {"Authorization": f"Bearer {_admin_token(server)}"}

        def via_cli(i: int) -> None:
            cli(store_env, "keys", "create", f"cli-{i}")

        def via_http(i: int) -> None:
            resp = httpx.post(f"{server.url}/api/v1/keys", json={"name": f"http-{i}"}, headers=headers, timeout=30)
            assert resp.status_code == 201, resp.text

        with ThreadPoolExecutor(max_workers=8) as pool:
            jobs = [pool.submit(via_cli, i) for i in range(4)] + [pool.submit(via_http, i) for i in range(24)]
            for job in jobs:
                job.result()
        verdict = httpx.get(f"{server.url}/api/v1/audit/verify", headers=headers).json()
        assert verdict["ok"] and verdict["entries"] == 2 + 28
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_cli_audit_verify_names_a_tampered_entry(store_env: dict[str, str], tmp_path: Path) -> None:
    cli(store_env, "migrate")
    server = Server(store_env, tmp_path)  # first start creates the org
    server.wait_ready()
    server.stop()
    for i in range(3):
        cli(store_env, "keys", "create", f"k{i}")
    verified = cli(store_env, "audit", "verify").stdout
    entries = re.search(r"(\d+) entries verified", verified)
    assert entries is not None
    # The trail as a picture in the terminal: today's bar is the longest, the key creations lead.
    activity = cli(store_env, "audit", "activity", "--days", "3").stdout.splitlines()
    assert activity[2].split()[0] == datetime.now(UTC).date().isoformat()
    assert activity[2].split()[1] == entries.group(1) and activity[2].endswith("█" * 40)
    assert "most frequent actions:" in activity and any(
        line.split() == ["3", "virtual_key.create"] for line in activity)
    db = sqlite3.connect(tmp_path / "home" / "keyplane.db")
    db.execute("UPDATE audit_events SET principal = 'someone-else' WHERE seq = 4")
    db.commit()
    db.close()
    result = cli(store_env, "audit", "verify", check=False)
    assert result.returncode == 1 and "entry 4" in result.stderr


@pytest.mark.parametrize("backend", ["sqlite"])
def test_demo_chat_completion_through_a_virtual_key_and_the_usage_table(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    server = Server(store_env, tmp_path, "--demo")
    try:
        server.wait_ready()
        assert "echo-1" in server.output
        admin = {"Authorization": f"Bearer {_admin_token(server)}"}
        made = httpx.post(f"{server.url}/api/v1/keys", json={"name": "demo-app"}, headers=admin).json()
        key, key_id = made["secret"], made["key"]["id"]
        headers = {"Authorization": f"Bearer {key}"}
        models = httpx.get(f"{server.url}/v1/models", headers=headers).json()["data"]
        assert "echo-1" in {m["id"] for m in models}
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "hello there keyplane"}]}
        resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "echo: hello there keyplane"
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                          headers=headers) as stream:
            text = "".join(stream.iter_text())
        assert "echo:" in text and text.rstrip().endswith("[DONE]")

        os_env = {**store_env, "UPSTREAM_KEY": "sk-cli-provider-secret-1234"}
        cli(os_env, "providers", "add", "other", "--base-url", "http://127.0.0.1:9/v1", "--model", "m-1=1/2",
            "--api-key-env", "UPSTREAM_KEY")
        listing = cli(store_env, "providers", "list").stdout
        assert "other" in listing and "demo" in listing and "sk-cli-provider-secret-1234" not in listing
        time.sleep(1.5)  # usage leaves the server in batches, at least every second
        table = cli(store_env, "usage", "--since", "1h").stdout
        row = next(line for line in table.splitlines() if line.startswith("echo-1"))
        assert row.split()[1] == "2"  # two requests, both metered
        events = json.loads(cli(store_env, "usage", "events", "--json").stdout)["data"]
        assert {e["model"] for e in events} == {"echo-1", None}  # the /v1/models call has no model
        advice = cli(store_env, "keys", "recommend", key_id).stdout
        # 3: models + 2 chats
        assert "3 requests let through over" in advice and "suggested: requests_per_minute=" in advice
    finally:
        server.stop()
