"""`audit verify` at scale: full and incremental (from a signed checkpoint) over a million audit entries.

    python bench/audit_scale.py                       # 1M entries, SQLite in a temporary home
    python bench/audit_scale.py --entries 200000      # smaller
    python bench/audit_scale.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

What it does, all with keyplane's own code:
1. starts a store (migrations, bootstrap), then bulk-inserts ``entries - tail`` keyed audit entries
   continuing the default organization's chain (the append rule of ``keyplane.domain.audit_chain``,
   under the chain key derived from the store's master key), in batches;
2. lets the ``Checkpointer`` verify that chain from its first entry and sign its head, exactly as a
   server does after migration;
3. appends ``tail`` more entries (the changes since the newest checkpoint);
4. times, each in a fresh process so its peak memory is its own: ``audit verify --full`` and
   ``audit verify`` (incremental, from the checkpoint), and, as the baseline, the pre-0004 way of
   verifying (every entry loaded into one list, then checked) with ``--baseline``. While each
   verification runs, a ticker measures the event loop's worst stall.

Figures depend on the machine: say how loaded it was next to any you report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text, update

from keyplane.config import Settings
from keyplane.domain import audit_chain
from keyplane.services.container import Keyplane
from keyplane.store.models import AuditEvent, Organization

BATCH = 20_000
TEST_MASTER_KEY = "YmVuY2gtYXVkaXQtc2NhbGUtbWFzdGVyLWtleS0zMmI="


def settings_for(args: argparse.Namespace) -> Settings:
    extra: dict[str, Any] = {}
    if args.database_url:
        extra = {"database_url": args.database_url, "database_schema": args.schema}
    return Settings(home=Path(args.home), master_key=TEST_MASTER_KEY, **extra)


async def append_entries(kp: Keyplane, org_id: str, count: int) -> None:
    """Continue the organization's chain by ``count`` keyed entries, inserted in bulk."""
    key = kp.audit_chain_key()
    async with kp.db.read() as s:
        seq, prev = (await s.execute(select(Organization.audit_seq, Organization.audit_head)
                                     .where(Organization.id == org_id))).one()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    done = 0
    while done < count:
        rows = []
        for _ in range(min(BATCH, count - done)):
            seq += 1
            when = (start + timedelta(seconds=seq)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            details = {"name": f"key-{seq}", "scopes": ["chats:create"], "limit_profile": "standard"}
            payload = audit_chain.entry_payload(seq, when, "sa_bench", "virtual_key.create", f"key_{seq}", details)
            digest = audit_chain.keyed_chain_hash(key, org_id, prev, payload)
            rows.append({"org_id": org_id, "seq": seq, "time": when, "principal": "sa_bench",
                         "action": "virtual_key.create", "target": f"key_{seq}",
                         "details": audit_chain.canonical_json(details), "prev_hash": prev, "hash": digest,
                         "hash_version": audit_chain.KEYED_HMAC})
            prev = digest
        done += len(rows)

        def write(session: Any, rows: list[dict[str, Any]] = rows, seq: int = seq, prev: str = prev) -> None:
            session.execute(insert(AuditEvent), rows)
            session.execute(update(Organization).where(Organization.id == org_id)
                            .values(audit_seq=seq, audit_head=prev))

        await kp.db.run_write(write)


async def load(args: argparse.Namespace) -> None:
    kp = Keyplane(settings_for(args))
    await kp.migrate()
    boot = await kp.bootstrap()
    t0 = time.perf_counter()
    await append_entries(kp, boot.org_id, args.entries - args.tail)
    t1 = time.perf_counter()
    written = await kp.checkpointer.run_once()
    t2 = time.perf_counter()
    await append_entries(kp, boot.org_id, args.tail)
    await kp.close()
    print(json.dumps({"load_s": round(t1 - t0, 1), "first_checkpoint_s": round(t2 - t1, 2),
                      "checkpointed_seq": written[0]["seq"] if written else None}))


async def old_verify(kp: Keyplane, org_id: str) -> audit_chain.ChainVerdict:
    """The pre-0004 verifier, as the baseline: every entry as an ORM object in one list, then checked."""
    async with kp.db.read() as s:
        org = (await s.execute(select(Organization).where(Organization.id == org_id))).scalar_one()
        result = await s.stream_scalars(select(AuditEvent).where(AuditEvent.org_id == org_id).order_by(AuditEvent.seq))
        entries = [audit_chain.ChainEntry(e.seq, e.time, e.principal, e.action, e.target, json.loads(e.details),
                                          e.prev_hash, e.hash, e.hash_version) async for e in result]
    return audit_chain.verify(entries, head_seq=org.audit_seq, head_hash=org.audit_head, org_id=org_id,
                              key=kp.audit_chain_key(), legacy_seq=0)


async def measure(args: argparse.Namespace) -> None:
    kp = Keyplane(settings_for(args))
    org_id = (await kp.organizations.by_name("default") or {})["id"]
    worst = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - t - 0.005)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(1.0)  # the baseline: the worst stall of an idle loop on this (shared) machine
    idle, worst = worst, 0.0
    t0 = time.perf_counter()
    if args.mode == "baseline":
        verdict = await old_verify(kp, org_id)
    else:
        verdict = await kp.audit.verify_org(org_id, full=args.mode == "full")
    elapsed = time.perf_counter() - t0
    stop.set()
    await tick
    await kp.close()
    print(json.dumps({"ok": verdict.ok, "checked": verdict.checked or verdict.entries, "entries": verdict.entries,
                      "seconds": round(elapsed, 3), "worst_loop_stall_ms": round(worst * 1000, 1),
                      "idle_loop_stall_ms": round(idle * 1000, 1)}))


def run_child(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--home", args.home, "--entries", str(args.entries),
           "--tail", str(args.tail)]
    if args.database_url:
        cmd += ["--database-url", args.database_url, "--schema", args.schema]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else ""
    if status != 0:
        raise SystemExit(f"{mode} failed")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # kilobytes on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--tail", type=int, default=1_000, help="entries after the newest checkpoint")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--home", default=None)
    parser.add_argument("--baseline", action="store_true", help="also time the pre-0004 whole-chain load")
    parser.add_argument("--child", choices=["load", "full", "incremental", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        asyncio.run(load(args) if args.child == "load" else measure(args))
        return
    with tempfile.TemporaryDirectory(prefix="keyplane-audit-bench-") as home:
        args.home = home
        if args.database_url and not args.schema:
            args.schema = f"kp_bench_{secrets.token_hex(4)}"
        try:
            print(f"loading {args.entries:,} audit entries ({args.tail:,} after the checkpoint) ...", flush=True)
            print("load:", json.dumps(run_child(args, "load")), flush=True)
            modes = ["incremental", "full"] + (["baseline"] if args.baseline else [])
            results = {mode: run_child(args, mode) for mode in modes}
            for mode, result in results.items():
                print(f"{mode:>12}: {json.dumps(result)}", flush=True)
            if args.baseline:
                print(f"full vs baseline: {results['baseline']['seconds'] / results['full']['seconds']:.1f}x faster, "
                      f"{results['baseline']['peak_rss_mb'] / results['full']['peak_rss_mb']:.1f}x less memory")
            print(f"incremental vs full: {results['full']['seconds'] / results['incremental']['seconds']:.0f}x faster")
        finally:
            if args.database_url:
                asyncio.run(_drop_schema(args.database_url, args.schema))


async def _drop_schema(url: str, schema: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


if __name__ == "__main__":
    main()
