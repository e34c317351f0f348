"""The usage write path and a 30-day summary, before and after the organization rollups, in one run.

    python bench/rollup_paths.py --events 300000

Write: the same batches (``bench/scale.py``'s events, spread over 31 days, 20,000 a batch) go into two
SQLite stores, alternately: "before" writes every minute row, no organization rollups, and keeps the
keyed rollups' ``(parent_id, bucket)`` indexes (what migration 0010 had); "after" is the current write
path (``UsageService.minute_floor``, organization rows, no parent index). Events plus rollups per batch,
in one transaction, as ``UsageService.insert`` does on SQLite.

Read: on the "after" store, a 30-day summary (``group_by=model``, no key filter) from the organization
rollups and from the keyed ones, alternately, with identical totals and latency sketches asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import events, make_keys  # noqa: E402

from keyplane.app import KeyplaneApp  # noqa: E402
from keyplane.config import Settings  # noqa: E402
from keyplane.services import usage as usage_service  # noqa: E402
from keyplane.store import rollups  # noqa: E402


async def _store(home: Path, parent_index: bool) -> tuple[KeyplaneApp, str]:
    app = KeyplaneApp(Settings(home=home, access_log=False, alert_interval_seconds=3600,
                               retention_interval_seconds=3600))
    boot = await app.startup()
    if parent_index:
        def create(s: Any) -> None:
            for table in rollups.TABLES.values():
                s.connection().exec_driver_sql(f"CREATE INDEX ix_{table}_parent ON {table} (parent_id, bucket)")
        await app.kp.db.run_write(create)
    return app, boot.org_id


async def main(n: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kp-paths-") as tmp:
        before, org_id = await _store(Path(tmp) / "before", True)
        after, _ = await _store(Path(tmp) / "after", False)
        try:
            keys = await make_keys(before.kp, org_id)  # the events name them; the other store needs no rows
            seconds = {"before": 0.0, "after": 0.0}
            rows = {"before": 0, "after": 0}
            floor = after.kp.usage.minute_floor()
            order = [("before", before), ("after", after)]
            for batch in events(n, org_id, keys, time.time() - 60, random.Random(13)):
                order.reverse()
                for name, app in order:
                    def write(cursor: Any, name: str = name, batch: list[dict[str, Any]] = batch) -> None:
                        r = rollups.aggregate(batch, floor if name == "after" else None)
                        if name == "before":
                            r = [row for row in r if row[0] in rollups.TABLES]
                        rows[name] += len(r)
                        usage_service._sqlite_insert_events(cursor, usage_service.as_rows(batch))
                        rollups.upsert_sqlite(cursor, r)

                    t0 = time.perf_counter()
                    await app.kp.db.run_dbapi_write(write)
                    seconds[name] += time.perf_counter() - t0
            print(f"write, {n:,} events (load average {os.getloadavg()[0]:.1f}):")
            for name, s in seconds.items():
                print(f"  {name}: {s / n * 1e6:.1f} us/event ({n / s:,.0f} events/s), "
                      f"{rows[name] / n:.3f} rollup rows upserted per event")
            print(f"  before/after: {seconds['before'] / seconds['after']:.2f}x")

            start, end = after.kp.usage.window("30d")
            org_groups = rollups.ORG_GROUPS
            times: dict[str, list[float]] = {"keyed": [], "organization": []}
            totals: dict[str, Any] = {}

            def read(s: Any, name: str) -> Any:
                rollups.ORG_GROUPS = org_groups if name == "organization" else frozenset()
                try:
                    t0 = time.perf_counter()
                    got = rollups.grouped(s.connection(), org_id, start, end, "model", None, open_ended=True)
                    times[name].append((time.perf_counter() - t0) * 1000)
                finally:
                    rollups.ORG_GROUPS = org_groups
                return {g: (t.requests, t.errors, t.input_tokens, t.output_tokens, t.latency) for g, t in got.items()}

            for i in range(runs):
                for name in ("keyed", "organization") if i % 2 else ("organization", "keyed"):
                    totals[name] = await after.kp.db.run_read(lambda s, name=name: read(s, name))
            assert totals["keyed"] == totals["organization"], "the two reads disagree"

            def count(s: Any) -> dict[str, int]:
                return {t: s.connection().exec_driver_sql(f"SELECT count(*) FROM {t}").scalar()
                        for t in (rollups.TABLES["d"], rollups.ORG_TABLES["d"])}

            print(f"30-day summary, group_by=model, {runs} runs each (load average {os.getloadavg()[0]:.1f}); "
                  f"day rows: {await after.kp.db.run_read(count)}")
            for name, ms in times.items():
                print(f"  {name}: median {statistics.median(ms):.1f} ms, best {min(ms):.1f} ms")
            print(f"  keyed/organization (medians): "
                  f"{statistics.median(times['keyed']) / statistics.median(times['organization']):.2f}x")
        finally:
            await before.shutdown()
            await after.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.runs))
