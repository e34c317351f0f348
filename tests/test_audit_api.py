"""Every control-plane change lands on the chain; tampering is found and named."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text, update

from keyplane.app import KeyplaneApp
from keyplane.store.models import AuditEvent
from tests.conftest import assert_error, bearer, create_key, create_sa


async def _events(client: httpx.AsyncClient, admin: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    resp = await client.get("/api/v1/audit", params={"limit": 200, **params}, headers=admin)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


async def test_every_change_is_recorded_with_who_and_what(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    sa, token = await create_sa(client, admin, ["virtual_keys:create", "virtual_keys:revoke", "chats:create"],
                                name="agent")
    key, secret = await create_key(client, bearer(token), name="k", scopes=["chats:create"])
    kid = key["id"]
    await client.patch(f"/api/v1/keys/{kid}", json={"name": "k2"}, headers=admin)
    await client.post(f"/api/v1/keys/{kid}/disable", headers=bearer(token))
    await client.post(f"/api/v1/keys/{kid}/enable", headers=bearer(token))
    rotated = await client.post(f"/api/v1/keys/{kid}/rotate", json={"grace_seconds": 60}, headers=bearer(token))
    sub = await client.post(f"/api/v1/keys/{kid}/subkeys", json={"name": "s"}, headers=bearer(token))
    await client.delete(f"/api/v1/keys/{kid}", headers=bearer(token))
    await client.delete(f"/api/v1/service-accounts/{sa['id']}", headers=admin)

    events = await _events(client, admin)
    actions = [e["action"] for e in reversed(events)]
    assert actions == [
        "organization.create", "service_account.create", "service_account.create", "virtual_key.create",
        "virtual_key.update", "virtual_key.disable", "virtual_key.enable", "virtual_key.rotate",
        "virtual_key.create", "virtual_key.delete", "service_account.revoke",
    ]
    assert [e["seq"] for e in reversed(events)] == list(range(1, 12))
    by_agent = await _events(client, admin, principal=sa["id"])
    assert len(by_agent) == 6 and all(e["principal"] == sa["id"] for e in by_agent)
    on_key = await _events(client, admin, target=kid)
    assert {e["action"] for e in on_key} == {"virtual_key.create", "virtual_key.update", "virtual_key.disable",
                                             "virtual_key.enable", "virtual_key.rotate", "virtual_key.delete"}
    assert [e["action"] for e in await _events(client, admin, action="virtual_key.disable")] == ["virtual_key.disable"]
    assert len(await _events(client, admin, since="1h")) == 11
    assert await _events(client, admin, since="2999-01-01T00:00:00Z") == []
    # No secret in any event.
    text_of_all = str(events)
    for secret_value in (token, secret, rotated.json()["secret"], sub.json()["secret"]):
        assert secret_value not in text_of_all

    verdict = (await client.get("/api/v1/audit/verify", headers=admin)).json()
    assert verdict["ok"] is True and verdict["entries"] == verdict["verified_up_to"] == 11
    assert verdict["first_broken_seq"] is None and verdict["reason"] is None


async def test_pagination(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for i in range(5):
        await create_key(client, admin, name=f"k{i}")
    page = (await client.get("/api/v1/audit", params={"limit": 4}, headers=admin)).json()
    assert [e["seq"] for e in page["data"]] == [7, 6, 5, 4]
    rest = (await client.get("/api/v1/audit", params={"limit": 4, "cursor": page["next_cursor"]},
                             headers=admin)).json()
    assert [e["seq"] for e in rest["data"]] == [3, 2, 1] and rest["next_cursor"] is None


async def _tamper(app: KeyplaneApp, sql: str) -> None:
    async with app.kp.db.write() as s:
        await s.execute(text(sql))


async def _verdict(client: httpx.AsyncClient, admin: dict[str, str]) -> dict[str, Any]:
    return (await client.get("/api/v1/audit/verify", headers=admin)).json()


async def test_edit_is_detected(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for i in range(4):
        await create_key(client, admin, name=f"k{i}")
    await _tamper(app, "UPDATE audit_events SET details = '{\"name\":\"innocent\"}' WHERE seq = 4")
    verdict = await _verdict(client, admin)
    assert verdict["ok"] is False and verdict["first_broken_seq"] == 4 and verdict["verified_up_to"] == 3


async def test_deletion_is_detected(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for i in range(4):
        await create_key(client, admin, name=f"k{i}")
    await _tamper(app, "DELETE FROM audit_events WHERE seq = 3")
    verdict = await _verdict(client, admin)
    assert verdict["ok"] is False and verdict["first_broken_seq"] == 3


async def test_tail_deletion_is_detected(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for i in range(3):
        await create_key(client, admin, name=f"k{i}")
    await _tamper(app, "DELETE FROM audit_events WHERE seq = 5")
    verdict = await _verdict(client, admin)
    assert verdict["ok"] is False and verdict["first_broken_seq"] == 5


async def test_reorder_is_detected(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for i in range(4):
        await create_key(client, admin, name=f"k{i}")
    await _tamper(app, "UPDATE audit_events SET seq = -1 WHERE seq = 3")
    await _tamper(app, "UPDATE audit_events SET seq = 3 WHERE seq = 4")
    await _tamper(app, "UPDATE audit_events SET seq = 4 WHERE seq = -1")
    verdict = await _verdict(client, admin)
    assert verdict["ok"] is False and verdict["first_broken_seq"] == 3


async def test_parallel_writers_never_fork_the_chain(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    async def mint(i: int) -> int:
        resp = await client.post("/api/v1/keys", json={"name": f"p{i}"}, headers=admin)
        return resp.status_code

    statuses = await asyncio.gather(*(mint(i) for i in range(40)))
    assert statuses == [201] * 40
    verdict = await _verdict(client, admin)
    assert verdict["ok"] and verdict["entries"] == 42
    full = (await client.get("/api/v1/audit/verify", params={"full": "true"}, headers=admin)).json()
    assert full["ok"] and full["checked"] == 42 and full["from_seq"] == 0
    async with app.kp.db.read() as s:
        seqs = [r[0] for r in (await s.execute(text("SELECT seq FROM audit_events ORDER BY seq"))).all()]
    assert seqs == list(range(1, 43))


async def test_activity_counts_changes_per_day_and_top_actions_of_one_organization(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    for i in range(3):
        await create_key(client, admin, name=f"k{i}")
    acme = await app.kp.organizations.create("acme")
    await create_key(client, bearer(acme.admin_token or ""), name="theirs")  # not counted for us
    total = (await client.get("/api/v1/audit/verify", headers=admin)).json()["entries"]
    # An old event, dated 20 days ago, falls outside a 14-day window but inside a 30-day one.
    async with app.kp.db.write() as s:
        await s.execute(update(AuditEvent).where(AuditEvent.org_id == app.bootstrap.org_id, AuditEvent.seq == 1)
                        .values(time=(datetime.now(UTC) - timedelta(days=20)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")))

    resp = await client.get("/api/v1/audit/activity", headers=admin)
    assert resp.status_code == 200
    body = resp.json()
    assert len(body["days"]) == 14 and body["days"][-1]["date"] == datetime.now(UTC).date().isoformat()
    assert sum(d["events"] for d in body["days"]) == total - 1  # all but the old one
    assert body["top_actions"][0] == {"action": "virtual_key.create", "events": 3}
    month = (await client.get("/api/v1/audit/activity", params={"days": 30}, headers=admin)).json()
    assert sum(d["events"] for d in month["days"]) == total

    assert_error(await client.get("/api/v1/audit/activity", params={"days": 0}, headers=admin), 422,
                 "invalid_request")
    _, reader = await create_sa(client, admin, ["usage:read"])
    resp = await client.get("/api/v1/audit/activity", headers=bearer(reader))
    assert assert_error(resp, 403, "insufficient_scope")["scope"] == "audit:read"
