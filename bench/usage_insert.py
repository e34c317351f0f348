"""The usage writer alone: batches of gateway-like rows through ``UsageService.insert``, cost per row.

    python bench/usage_insert.py --rows 2000 --batches 20                      # SQLite, CPU µs per row
    python bench/usage_insert.py --rows 2000 --batches 20 --callgrind          # + instructions per row
    python bench/usage_insert.py --store postgresql --postgres postgresql+asyncpg://postgres@127.0.0.1:5432/test

Each batch is what one flush of the gateway's buffer holds after a second of traffic: rows as
``keyplane/gateway/dataplane.py`` records them (``usage_row.FIELDS`` order, time in integer µs), over 20
keys, two models, a few refusals and failures, all within one second. ``--tree`` measures another source
tree (an archived main) with this script. CPU is the process's (the writer's worker thread included);
``--callgrind`` re-runs the script under valgrind with instrumentation on only around the measured
batches (``callgrind_control -i on``), so the count is the client's instructions, all threads, no kernel
(on PostgreSQL the server's work is not in it). Warm-up batches go first (statement caches, pages).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def rows_for(second: int, n: int, org_id: str, rng: random.Random, n_keys: int = 20) -> list[tuple[Any, ...]]:
    keys = [(f"key_{i:02d}" + "x" * 20, None if i % 4 else f"key_{i + 1:02d}" + "x" * 20) for i in range(n_keys)]
    out = []
    for i in range(n):
        key, parent = keys[i % n_keys]
        roll = rng.random()
        status, code = ((200, "ok") if roll < 0.97 else (429, "rate_limited") if roll < 0.99
                        else (502, "upstream_error"))
        tin, tout = (rng.randint(50, 4000), rng.randint(0, 1000)) if status == 200 else (0, 0)
        model = "gpt-4o-mini" if i % 3 or n_keys == 1 else "gpt-4o"
        team = f"team-{i % n_keys % 4}"  # a key's cost center
        out.append((org_id, key, parent, "openai", model, team, "prod", "/v1/chat/completions", None, None, status,
                    code, None, tin, tout, 0, 0, (tin * 0.15 + tout * 0.6) / 1e6,
                    round(rng.lognormvariate(3.0, 0.5), 3), "10.0.0.1",
                    second * 1_000_000 + i * 1_000_000 // n + rng.randint(0, 99)))
    return out


async def run(args: argparse.Namespace) -> None:
    from keyplane.config import Settings
    from keyplane.services.container import Keyplane

    with tempfile.TemporaryDirectory(prefix="kp-usage-insert-") as tmp:
        overrides: dict[str, Any] = {"home": Path(tmp), "access_log": False}
        schema = f"kp_bench_{secrets.token_hex(4)}"
        if args.store == "postgresql":
            from sqlalchemy import text
            from sqlalchemy.ext.asyncio import create_async_engine
            engine = create_async_engine(args.postgres)
            async with engine.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            await engine.dispose()
            overrides.update(database_url=args.postgres, database_schema=schema,
                             master_key=base64.b64encode(bytes(32)).decode())
        kp = Keyplane(Settings(**overrides))
        await kp.migrate()
        try:
            rng = random.Random(7)
            start = int(time.time()) - args.batches - args.warmup - 5
            batches = [rows_for(start + i, args.rows, "org_bench", rng, args.keys)
                       for i in range(args.warmup + args.batches)]
            for batch in batches[:args.warmup]:
                await kp.usage.insert(batch)
            if args.callgrind_child:
                subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True,  # noqa: ASYNC221
                               capture_output=True)
            cpu, wall = time.process_time(), time.perf_counter()
            for batch in batches[args.warmup:]:
                await kp.usage.insert(batch)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if args.callgrind_child:
                subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True,  # noqa: ASYNC221
                               capture_output=True)
            n = args.rows * args.batches
            print(f"{args.store} rows/batch {args.rows} keys {args.keys} batches {args.batches}: "
                  f"CPU {cpu / n * 1e6:.1f} µs/row, wall {wall / n * 1e6:.1f} µs/row")
        finally:
            await kp.db.dispose()
            if args.store == "postgresql":
                from sqlalchemy import text
                from sqlalchemy.ext.asyncio import create_async_engine
                engine = create_async_engine(args.postgres)
                async with engine.begin() as conn:
                    await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--postgres", default=os.environ.get("KEYPLANE_TEST_POSTGRES_URL"))
    parser.add_argument("--rows", type=int, default=2000, help="rows per batch")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--keys", type=int, default=20,
                        help="distinct keys (1: one key, one model, as bench/gateway.py sends)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "callgrind.out"
            argv = [a for a in sys.argv[1:] if a != "--callgrind"]
            subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
                            sys.executable, __file__, *argv, "--callgrind-child"], check=True,
                           env={**os.environ, "PYTHONMALLOC": "malloc"}, stderr=subprocess.DEVNULL)
            total = 0
            for name in glob.glob(f"{out}.*"):
                for line in Path(name).read_text().splitlines():
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
            print(f"{args.store}: {total} instructions, {total // (args.rows * args.batches)} per row")
        return
    sys.path.insert(0, str(args.tree.resolve()))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
