"""Tampering by whoever can write the database, caught by the keyed chain and the signed checkpoints.

Each attack here passed the plain SHA-256 chain: the attacker recomputes every hash (rewrite), adds a
row with a hash of its own (forgery) or deletes the newest rows and rolls the head back (truncation).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.app import KeyplaneApp
from keyplane.domain import audit_chain, audit_checkpoint
from keyplane.services.container import Keyplane
from keyplane.services.principal import cli as cli_principal
from keyplane.services.schemas import ServiceAccountCreate
from keyplane.store import migrate
from keyplane.store.checkpoints import PUBLIC_KEY_FILE, CheckpointDirectory
from keyplane.store.db import Database
from tests import processes
from tests.conftest import create_key, downgrader

# -- what an attacker with the database (and no master key) can do ------------------------------------


async def _rows(db: Database, org: str, from_seq: int = 1) -> list[dict[str, Any]]:
    async with db.read() as s:
        result = await s.execute(text(
            "SELECT seq, time, principal, action, target, details, prev_hash, hash, hash_version FROM audit_events "
            "WHERE org_id = :org AND seq >= :seq ORDER BY seq"), {"org": org, "seq": from_seq})
        return [dict(r._mapping) for r in result]


async def _set_head(s: Any, org: str, seq: int, digest: str) -> None:
    await s.execute(text("UPDATE organizations SET audit_seq = :seq, audit_head = :h WHERE id = :org"),
                    {"seq": seq, "h": digest, "org": org})


async def rewrite(db: Database, org: str, seq: int, details: dict[str, Any], *, version: int | None = None) -> None:
    """Edit entry ``seq`` and recompute every hash from there on with the published SHA-256 rule."""
    rows = await _rows(db, org)
    prev = rows[seq - 2]["hash"] if seq > 1 else audit_chain.GENESIS_HASH
    async with db.write() as s:
        for row in rows[seq - 1:]:
            body = details if row["seq"] == seq else json.loads(row["details"])
            digest = audit_chain.chain_hash(prev, audit_chain.entry_payload(
                row["seq"], row["time"], row["principal"], row["action"], row["target"], body))
            await s.execute(text("UPDATE audit_events SET details = :d, prev_hash = :p, hash = :h, hash_version = :v "
                                 "WHERE org_id = :org AND seq = :seq"),
                            {"d": audit_chain.canonical_json(body), "p": prev, "h": digest, "org": org,
                             "seq": row["seq"], "v": version or row["hash_version"]})
            prev = digest
        await _set_head(s, org, rows[-1]["seq"], prev)


async def forge(db: Database, org: str, *, version: int = audit_chain.KEYED_HMAC) -> int:
    """Append a row of the attacker's own after the head, and move the head to it."""
    last = (await _rows(db, org))[-1]
    seq, details = last["seq"] + 1, {"name": "backdoor", "scopes": ["admin"]}
    fields = (seq, last["time"], "sa_admin", "service_account.create", "sa_forged")
    digest = audit_chain.chain_hash(last["hash"], audit_chain.entry_payload(*fields, details))
    async with db.write() as s:
        await s.execute(text(
            "INSERT INTO audit_events (org_id, seq, time, principal, action, target, details, prev_hash, hash, "
            "hash_version) VALUES (:org, :seq, :time, :principal, :action, :target, :details, :prev, :hash, :v)"),
            {"org": org, "seq": seq, "time": fields[1], "principal": fields[2], "action": fields[3],
             "target": fields[4], "details": audit_chain.canonical_json(details), "prev": last["hash"],
             "hash": digest, "v": version})
        await _set_head(s, org, seq, digest)
    return seq


async def insert_at(db: Database, org: str, seq: int) -> None:
    """Slip a row of the attacker's own in at ``seq``: later rows move up one, every hash is recomputed."""
    rows = await _rows(db, org, seq)
    async with db.write() as s:
        for row in reversed(rows):  # newest first: (org_id, seq) stays unique at every step
            await s.execute(text("UPDATE audit_events SET seq = seq + 1 WHERE org_id = :org AND seq = :seq"),
                            {"org": org, "seq": row["seq"]})
        await s.execute(text(
            "INSERT INTO audit_events (org_id, seq, time, principal, action, target, details, prev_hash, hash, "
            "hash_version) VALUES (:org, :seq, :time, 'sa_admin', 'service_account.create', 'sa_forged', '{}', "
            "'', '', 2)"), {"org": org, "seq": seq, "time": rows[0]["time"]})
    await rewrite(db, org, seq, {"name": "backdoor"})


async def truncate(db: Database, org: str, keep: int) -> None:
    """Delete every entry after ``keep`` and roll the stored head back to it."""
    kept = (await _rows(db, org, keep))[0]
    async with db.write() as s:
        await s.execute(text("DELETE FROM audit_events WHERE org_id = :org AND seq > :keep"),
                        {"org": org, "keep": keep})
        await _set_head(s, org, keep, kept["hash"])


# -- helpers -----------------------------------------------------------------------------------------


async def _verify(client: httpx.AsyncClient, admin: dict[str, str], full: bool = False) -> dict[str, Any]:
    resp = await client.get("/api/v1/audit/verify", params={"full": str(full).lower()}, headers=admin)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _keys(client: httpx.AsyncClient, admin: dict[str, str], n: int) -> None:
    for i in range(n):
        await create_key(client, admin, name=f"k{i}")


def _org(app: KeyplaneApp) -> str:
    assert app.bootstrap is not None
    return app.bootstrap.org_id


# -- the three attacks ---------------------------------------------------------------------------------


async def test_rewrite_with_recomputed_plain_hashes_is_named(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    org, db = _org(app), app.kp.db
    await _keys(client, admin, 4)  # entries 3..6
    await app.kp.checkpointer.run_once()  # signs entry 6
    await _keys(client, admin, 2)  # entries 7, 8
    assert (await _verify(client, admin))["ok"]

    # After the newest checkpoint: the keyed hash is what gives it away.
    await rewrite(db, org, 7, {"name": "innocent"})
    for full in (False, True):
        verdict = await _verify(client, admin, full)
        assert verdict["ok"] is False and verdict["problem"] == "unkeyed", verdict
        assert verdict["first_broken_seq"] == 7 and verdict["verified_up_to"] == 6

    # Before it: the incremental run finds the checkpointed entry replaced; the full run the first rewrite.
    await rewrite(db, org, 3, {"name": "innocent"})
    verdict = await _verify(client, admin)
    assert verdict["problem"] == "checkpoint_mismatch" and verdict["first_broken_seq"] == 6, verdict
    verdict = await _verify(client, admin, full=True)
    assert verdict["problem"] == "unkeyed" and verdict["first_broken_seq"] == 3, verdict


async def test_forged_row_is_named(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    org, db = _org(app), app.kp.db
    await _keys(client, admin, 2)
    await app.kp.checkpointer.run_once()
    seq = await forge(db, org)
    verdict = await _verify(client, admin)
    assert verdict["ok"] is False and verdict["problem"] == "unkeyed" and verdict["first_broken_seq"] == seq

    # Claiming the legacy rule for it does not help: legacy entries end where the migration found the chain.
    async with db.write() as s:
        await s.execute(text("DELETE FROM audit_events WHERE org_id = :org AND seq = :seq"), {"org": org, "seq": seq})
    seq = await forge(db, org, version=audit_chain.LEGACY_SHA256)
    for full in (False, True):
        verdict = await _verify(client, admin, full)
        assert verdict["problem"] == "downgraded" and verdict["first_broken_seq"] == seq, verdict

    # Nor does the checkpointer sign a forged head.
    assert await app.kp.checkpointer.run_once() == []
    assert not CheckpointDirectory(app.kp.settings.checkpoint_dir).has(org, seq)

    # A row slipped in before the checkpointed head moves what the checkpoint signed.
    async with db.write() as s:
        await s.execute(text("DELETE FROM audit_events WHERE org_id = :org AND seq = :seq"), {"org": org, "seq": seq})
    await insert_at(db, org, 3)
    verdict = await _verify(client, admin)
    assert verdict["problem"] == "checkpoint_mismatch" and verdict["first_broken_seq"] == seq - 1, verdict
    verdict = await _verify(client, admin, full=True)
    assert verdict["problem"] == "unkeyed" and verdict["first_broken_seq"] == 3, verdict


async def test_truncated_tail_with_the_head_rolled_back_is_named(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    org, db = _org(app), app.kp.db
    await _keys(client, admin, 4)  # entries 3..6
    await app.kp.checkpointer.run_once()
    await truncate(db, org, keep=4)
    for full in (False, True):
        verdict = await _verify(client, admin, full)
        assert verdict["ok"] is False and verdict["problem"] == "truncated", verdict
        assert verdict["first_broken_seq"] == 5 and "entry 6 existed" in verdict["reason"]


async def test_checkpoint_not_signed_by_this_keyplane_is_refused(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    org = _org(app)
    await app.kp.checkpointer.run_once()
    directory = CheckpointDirectory(app.kp.settings.checkpoint_dir)
    seq = directory.seqs(org)[-1]
    # An attacker who can write the directory signs a statement of its own with a key of its own.
    forged = audit_checkpoint.sign(audit_checkpoint.Checkpoint(org, seq + 1, "f" * 64, "2026-01-01T00:00:00Z", 0),
                                   Ed25519PrivateKey.generate())
    directory.write(forged)
    verdict = await _verify(client, admin)
    assert verdict["ok"] is False and verdict["problem"] == "bad_checkpoint" and verdict["first_broken_seq"] == seq + 1
    # An edited genuine checkpoint does not verify either.
    directory.file_for(org, seq + 1).unlink()
    genuine = directory.read(org, seq)
    directory.file_for(org, seq).write_text(json.dumps({**genuine, "hash": "0" * 64}))
    verdict = await _verify(client, admin, full=True)
    assert verdict["problem"] == "bad_checkpoint" and verdict["first_broken_seq"] == seq


# -- streaming, incremental runs, checkpoints ----------------------------------------------------------


async def test_incremental_from_the_newest_checkpoint_and_full_in_small_pages(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    await _keys(client, admin, 6)  # entries 3..8
    await app.kp.checkpointer.run_once()
    await _keys(client, admin, 3)  # entries 9..11
    verdict = await _verify(client, admin)
    assert verdict["ok"] and verdict["from_seq"] == 8 and verdict["checked"] == 3 and verdict["entries"] == 11
    assert verdict["checkpoints"] == 1

    app.kp.chain_verifier.page_size = 2  # six pages, each its own read
    verdict = await _verify(client, admin, full=True)
    assert verdict["ok"] and verdict["from_seq"] == 0 and verdict["checked"] == 11
    async with app.kp.db.write() as s:
        await s.execute(text("UPDATE audit_events SET target = 'elsewhere' WHERE org_id = :org AND seq = 10"),
                        {"org": _org(app)})
    verdict = await _verify(client, admin, full=True)
    assert verdict["problem"] == "edited" and verdict["first_broken_seq"] == 10 and verdict["verified_up_to"] == 9


async def test_checkpoints_are_written_once_per_new_head_by_one_of_several_processes(
    settings_factory: Any,
) -> None:
    received: list[dict[str, Any]] = []

    async def take(request: Request) -> Response:
        received.append(await request.json())
        return Response(status_code=204)

    async with processes.serve(Starlette(routes=[Route("/hook", take, methods=["POST"])])) as url:
        settings = settings_factory(audit_checkpoint_webhook_url=f"{url}/hook")
        first = KeyplaneApp(settings)
        await first.startup()
        second = Keyplane(settings)  # another process on the same store and directory
        try:
            org = _org(first)
            await first.kp.checkpointer.run_once()
            directory = CheckpointDirectory(settings.checkpoint_dir)
            head = directory.seqs(org)[-1]
            assert await first.kp.checkpointer.run_once() == []  # the same head is not written again
            assert await second.checkpointer.run_once() == []  # nor by the other process

            principal = cli_principal(org)
            await first.kp.service_accounts.create(principal, ServiceAccountCreate(name="a", scopes=["audit:read"]))
            wrote = await asyncio.gather(first.kp.checkpointer.run_once(), second.checkpointer.run_once())
            assert sorted(len(w) for w in wrote) == [0, 1]  # exactly one process wrote the new head
            assert directory.seqs(org) == [*directory.seqs(org)[:-1], head + 1]
            assert [f.name for f in directory.file_for(org, head).parent.iterdir() if f.name.startswith(".")] == []

            # Each new checkpoint went to the webhook too, signed by the key published beside the files.
            public = audit_checkpoint.public_key_from_text((settings.checkpoint_dir / PUBLIC_KEY_FILE).read_text())
            assert [audit_checkpoint.open_signed(d, public).seq for d in received][-1] == head + 1

            # Shutting down writes the head as the process leaves it.
            await first.kp.service_accounts.create(principal, ServiceAccountCreate(name="b", scopes=["audit:read"]))
        finally:
            await second.close()
            await first.shutdown()
        assert directory.seqs(org)[-1] == head + 2


# -- stores from before the keyed chain -----------------------------------------------------------------


@pytest.mark.fresh_store
async def test_a_legacy_chain_keeps_verifying_after_migration_and_is_pinned(settings_factory: Any) -> None:
    settings = settings_factory()
    settings.home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url, settings.database_schema)
    try:
        await migrate.upgrade(db)

        async with db.write_engine.connect() as conn:
            await conn.run_sync(downgrader(db, "0003"))
            await conn.commit()
        # A store as the plain SHA-256 chain left it: five entries of the default organization.
        prev = audit_chain.GENESIS_HASH
        async with db.write() as s:
            await s.execute(text("INSERT INTO organizations (id, name, created_at, audit_seq, audit_head) "
                                 "VALUES ('org_old', 'default', CURRENT_TIMESTAMP, 0, :g)"), {"g": prev})
            for seq in range(1, 6):
                fields = (seq, f"2026-01-0{seq}T00:00:00.000000Z", "cli:ops", "virtual_key.create", f"key_{seq}")
                details = {"name": f"k{seq}", "note": "ünïcödé"}
                digest = audit_chain.chain_hash(prev, audit_chain.entry_payload(*fields, details))
                await s.execute(text(
                    "INSERT INTO audit_events (org_id, seq, time, principal, action, target, details, prev_hash, hash)"
                    " VALUES ('org_old', :seq, :time, :p, :a, :t, :d, :prev, :h)"),
                    {"seq": seq, "time": fields[1], "p": fields[2], "a": fields[3], "t": fields[4],
                     "d": audit_chain.canonical_json(details), "prev": prev, "h": digest})
                prev = digest
            await _set_head(s, "org_old", 5, prev)
    finally:
        await db.dispose()

    app = KeyplaneApp(settings)
    await app.startup()  # migrates to the head and checkpoints every head right away
    try:
        kp = app.kp
        await kp.checkpointer.run_once()
        pinned = CheckpointDirectory(settings.checkpoint_dir).read("org_old", 5)
        assert pinned["legacy_seq"] == 5 and pinned["hash"] == prev
        assert [r["hash_version"] for r in await _rows(kp.db, "org_old")] == [1] * 5

        await kp.service_accounts.create(cli_principal("org_old"), ServiceAccountCreate(name="a", scopes=["admin"]))
        rows = await _rows(kp.db, "org_old")
        assert [r["hash_version"] for r in rows] == [1] * 5 + [2]
        for full in (False, True):
            verdict = await kp.audit.verify_org("org_old", full=full)
            assert verdict.ok and verdict.entries == 6, verdict

        # Turning keyed entries into "legacy" ones needs the boundary moved: the checkpoints pinned it.
        async with kp.db.write() as s:
            await s.execute(text("UPDATE organizations SET audit_legacy_seq = 6 WHERE id = 'org_old'"))
        await rewrite(kp.db, "org_old", 6, {"name": "quiet"}, version=audit_chain.LEGACY_SHA256)
        verdict = await kp.audit.verify_org("org_old", full=True)
        assert verdict.problem == "legacy_moved", verdict
        async with kp.db.write() as s:
            await s.execute(text("UPDATE organizations SET audit_legacy_seq = 5 WHERE id = 'org_old'"))
        assert (await kp.audit.verify_org("org_old")).problem == "downgraded"

        # Rewriting the legacy prefix (its rule is public) replaces what the migration checkpoint signed.
        await rewrite(kp.db, "org_old", 2, {"name": "quiet"})
        assert (await kp.audit.verify_org("org_old")).problem == "checkpoint_mismatch"
        verdict = await kp.audit.verify_org("org_old", full=True)
        assert verdict.problem == "checkpoint_mismatch" and verdict.first_broken_seq == 5, verdict
    finally:
        await app.shutdown()


# -- the CLI, with checkpoints kept off the database host ------------------------------------------------


async def test_cli_verify_with_an_off_host_copy_of_the_checkpoints(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], tmp_path: Path, backend: str
) -> None:
    if backend == "distributed":
        pytest.skip("the CLI's verification has no Redis part: the postgresql run covers it")
    settings = app.kp.settings
    env = {"KEYPLANE_HOME": str(settings.home)}
    if settings.database_url:
        env.update(KEYPLANE_DATABASE_URL=settings.database_url, KEYPLANE_DATABASE_SCHEMA=settings.database_schema or "",
                   KEYPLANE_MASTER_KEY=settings.master_key or "")
    await _keys(client, admin, 3)
    await app.kp.checkpointer.run_once()
    off_host = tmp_path / "off-host"
    shutil.copytree(settings.checkpoint_dir, off_host)

    ok = processes.cli(env, "audit", "verify", "--checkpoints", str(off_host))
    assert "audit chain OK" in ok.stdout and "1 signed checkpoint(s) agree" in ok.stdout
    if settings.database_url:  # the keyed chain cannot be checked (or written) without the master key
        keyless = processes.cli({**env, "KEYPLANE_MASTER_KEY": ""}, "audit", "verify", check=False)
        # refused as a bad setting, before anything is read: one line with the fix, exit code 2
        assert keyless.returncode == 2 and "KEYPLANE_MASTER_KEY" in keyless.stderr
        assert "Traceback" not in keyless.stderr

    # The attacker truncates the chain and removes the checkpoints on the host too.
    await truncate(app.kp.db, _org(app), keep=3)
    shutil.rmtree(settings.checkpoint_dir)
    blind = processes.cli(env, "audit", "verify")  # nothing left on the host to tell
    assert "no signed checkpoints found" in blind.stderr
    broken = processes.cli(env, "audit", "verify", "--full", "--checkpoints", str(off_host), check=False)
    assert broken.returncode == 1 and "BROKEN at entry 4 [truncated]" in broken.stderr, broken.stderr
