"""A key's first budget check, the seed of its spend windows (``UsageService.spent_so_far``): before
(session 6: the sub-key walk, one query per level, then the day-rollup read, in one transaction) and
now (one statement outside a transaction), same store, same run, interleaved.

    python bench/spend_seed.py --events 200000                       # SQLite
    python bench/spend_seed.py --events 200000 --postgres postgresql+asyncpg://postgres@127.0.0.1:5432/test

The store: bench/scale.py's keys and events, bulk-loaded; on PostgreSQL measured as loaded, then again
after what autovacuum would do (``VACUUM ANALYZE``, bench/scale.py's ``vacuum``). Each round seeds
every sub-key's and its parent's windows side by side (what the first request of a sub-key with a
budget does), one way then the other. Prints the median and best wall time per way, the median CPU
time of this process (what the code costs, without the waits for a loaded machine's scheduler), and
the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import bench_settings, bulk_load, make_keys, vacuum
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from keyplane.app import KeyplaneApp
from keyplane.services.keys import MAX_SUBKEY_DEPTH
from keyplane.store.models import VirtualKey

BEFORE_SQL = ("SELECT COALESCE(SUM(cost_usd), 0), COALESCE(SUM(CASE WHEN bucket >= :day THEN cost_usd ELSE 0 END), 0) "
              "FROM usage_rollups_day WHERE bucket >= :month AND key_id IN ({keys})")


def _walk(s: Session, key_id: str) -> list[str]:
    ids, level = [key_id], [key_id]
    for _ in range(MAX_SUBKEY_DEPTH):
        level = list(s.execute(select(VirtualKey.id).where(VirtualKey.parent_id.in_(level))).scalars())
        if not level:
            break
        ids.extend(level)
    return ids


async def before(kp: Any, bucket: str) -> tuple[float, float]:
    """The seed as it was (session 6): the walk (a query per level) and the read in one transaction."""
    now = datetime.now(UTC)
    month_start = int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
    day_start = int(now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())

    def read(s: Session) -> tuple[float, float]:
        ids = sorted(_walk(s, bucket))
        params: dict[str, Any] = {"day": day_start, "month": month_start} | {f"k{i}": k for i, k in enumerate(ids)}
        sql = BEFORE_SQL.format(keys=", ".join(f":k{i}" for i in range(len(ids))))
        month, day = s.execute(text(sql), params).one()
        return float(day), float(month)

    return await kp.db.run_read(read)


async def run(postgres: str | None, n: int, rounds: int) -> None:
    schema = f"kp_bench_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="kp-seed-") as tmp:
        app = KeyplaneApp(await bench_settings(Path(tmp), postgres, schema))
        boot = await app.startup()
        try:
            kp = app.kp
            keys = await make_keys(kp, boot.org_id)
            await bulk_load(kp, n, boot.org_id, keys, random.Random(13), autovacuum=False)
            pairs = [(k["id"], k["parent_id"]) for k in keys[80:]]
            ways = {"before (walk + read, one transaction)": before,
                    "now (one statement, no transaction)": lambda kp, b: kp.usage.spent_so_far(b)}
            for state in ("as loaded", "after VACUUM ANALYZE") if postgres else ("as loaded",):
                if state != "as loaded":
                    await vacuum(kp)
                times: dict[str, list[float]] = {w: [] for w in ways}
                cpu: dict[str, list[float]] = {w: [] for w in ways}
                for r in range(-1, rounds):  # round -1, not counted: the first reads of a fresh load set hint bits
                    for name, way in (ways.items() if r % 2 else reversed(ways.items())):
                        for sub, parent in pairs:
                            t0, c0 = time.perf_counter(), time.process_time()
                            a, _ = await asyncio.gather(way(kp, sub), way(kp, parent))
                            if r >= 0:
                                times[name].append((time.perf_counter() - t0) * 1000)
                                cpu[name].append((time.process_time() - c0) * 1000)  # this process's own work
                            b = await kp.usage.spent_so_far(sub)  # the same sums, in another order maybe
                            assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b, strict=True)), (a, b)
                print(f"store {state}:")
                for name, ts in times.items():
                    print(f"  {name}: median {statistics.median(ts):.2f} ms, best {min(ts):.2f} ms, "
                          f"CPU median {statistics.median(cpu[name]):.2f} ms ({len(ts)} seeds)")
                print(f"  load average {os.getloadavg()}", flush=True)
        finally:
            await app.shutdown()
            if postgres:
                engine = create_async_engine(postgres)
                async with engine.begin() as conn:
                    await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--postgres", default=None)
    args = parser.parse_args()
    asyncio.run(run(args.postgres, args.events, args.rounds))


if __name__ == "__main__":
    main()
