"""Real ``keyplane serve`` on loopback: X-Forwarded-For from a peer that is not a trusted proxy changes nothing.

uvicorn's own proxy-header handling would believe it from any loopback peer (its default
``forwarded_allow_ips``) and rewrite the client before keyplane's resolver sees it; keyplane turns it
off, so ``KEYPLANE_TRUSTED_PROXIES`` alone decides (empty here: the socket peer is the client).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from keyplane.domain import tokens
from tests.conftest import BACKENDS
from tests.processes import Server

ADMIN = tokens.generate(tokens.SERVICE_ACCOUNT_PREFIX)
# One process on SQLite; several processes (--workers, which needs Redis) in the distributed mode.
CASES = [("sqlite", 1)] + ([("distributed", 2)] if "distributed" in BACKENDS else [])


@pytest.mark.parametrize(("backend", "workers"), CASES)
def test_forwarded_for_from_loopback_bypasses_neither_the_allowlist_nor_the_brake(
        store_env: dict[str, str], tmp_path: Path, workers: int) -> None:
    env = {**store_env, "KEYPLANE_ADMIN_TOKEN": ADMIN, "KEYPLANE_BRAKE_MAX_FAILURES": "5",
           "KEYPLANE_TRUSTED_PROXIES": ""}
    server = Server(env, tmp_path, "--workers", str(workers))
    try:
        server.wait_ready(timeout=90)  # several processes on a loaded machine start slowly
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=server.url, timeout=10) as http:
            made = http.post("/api/v1/keys", json={"name": "office-only", "scopes": ["models:read"],
                                                   "ip_allowlist": ["203.0.113.0/24"]}, headers=admin)
            assert made.status_code == 201, made.text
            secret = made.json()["secret"]
            for forwarded in ("203.0.113.7", "10.0.0.1, 203.0.113.7"):
                resp = http.get("/v1/models", headers={"Authorization": f"Bearer {secret}",
                                                       "X-Forwarded-For": forwarded})
                assert resp.status_code == 403 and resp.json()["error"]["code"] == "ip_not_allowed", resp.text
                assert "127.0.0.1" in resp.json()["error"]["message"]  # the socket peer, not the header

            # Bad keys with a fresh X-Forwarded-For each time: all counted against 127.0.0.1.
            statuses = []
            for i in range(8):
                bad = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
                resp = http.get("/v1/models", headers={"Authorization": f"Bearer {bad}",
                                                       "X-Forwarded-For": f"198.51.100.{i + 1}"})
                statuses.append(resp.status_code)
            assert statuses[:5] == [401] * 5 and 429 in statuses[5:], statuses
            # The brake holds this address on the control plane too, whatever the header says.
            braked = http.get("/api/v1/keys", headers={**admin, "X-Forwarded-For": "192.0.2.1"})
            assert braked.status_code == 429 and braked.json()["error"]["code"] == "rate_limited"
    finally:
        server.stop()
