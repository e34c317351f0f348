"""Cold keys in bulk: every lookup a different, uncached key, 64 at a time, in one process.

    python bench/cold_keys.py                      # SQLite, 100,000 keys
    python bench/cold_keys.py --postgres postgresql+asyncpg://postgres@127.0.0.1:5432/test

Two ways to answer the same misses, in one run, on the same store, alternating rounds:
(a) one store round trip per miss (``credentials.load_key``: what a miss did before batching);
(b) the batched path the server uses (``Keyplane.lookup_key`` -> ``MissBatcher``: concurrent misses
share one query, up to 4 in flight).
64 concurrent workers each take the next key never looked up before; reported: lookups/s and the
p50/p99 of one lookup. No HTTP in the way (``bench/hotpath.py`` measures the server with wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from keyplane.config import Settings  # noqa: E402
from keyplane.domain import tokens  # noqa: E402
from keyplane.services import credentials  # noqa: E402
from keyplane.services.container import Keyplane  # noqa: E402
from keyplane.services.principal import system  # noqa: E402
from keyplane.services.schemas import LimitProfileCreate  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from hotpath import bulk_keys  # noqa: E402

MASTER_KEY = "a2V5cGxhbmUtdGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGU="


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def run(kp: Keyplane, keys: list[str], lookup: Any, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    it = iter(keys)

    async def worker() -> None:
        for token in it:
            t0 = time.perf_counter()
            found = await lookup(token)
            latencies.append((time.perf_counter() - t0) * 1000)
            assert found is not None

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"lookups_per_s": round(len(latencies) / elapsed), "p50_ms": round(pct(latencies, 50), 2),
            "p99_ms": round(pct(latencies, 99), 2)}


async def main_async(args: argparse.Namespace) -> None:
    schema = f"kp_bench_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="kp-cold-") as tmp:
        overrides: dict[str, Any] = {"home": Path(tmp)}
        if args.postgres:
            engine = create_async_engine(args.postgres)
            async with engine.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            await engine.dispose()
            overrides.update(database_url=args.postgres, database_schema=schema, master_key=MASTER_KEY)
        kp = Keyplane(Settings(**overrides))
        try:
            await kp.migrate()
            boot = await kp.bootstrap()
            await kp.limit_profiles.create(system(boot.org_id), LimitProfileCreate(name="bench",
                                                                                    requests_per_minute=1000))
            many = await bulk_keys(kp, boot.org_id, args.keys)
            per_round = len(many) // (2 * args.rounds)
            results: dict[str, list[dict[str, float]]] = {"one query per miss": [], "batched": []}
            for r in range(args.rounds):
                chunk = many[2 * r * per_round: (2 * r + 2) * per_round]
                one, two = chunk[:per_round], chunk[per_round:]

                async def single(token: str) -> Any:
                    return await credentials.load_key(kp.db, tokens.hash_token(token))

                results["one query per miss"].append(await run(kp, one, single, args.concurrency))
                kp.key_cache.clear()
                results["batched"].append(await run(kp, two, kp.lookup_key, args.concurrency))
            print(f"{args.keys:,} keys, {args.concurrency} concurrent, {args.rounds} rounds "
                  f"({'PostgreSQL' if args.postgres else 'SQLite'}), medians:")
            print("| path | lookups/s | p50 ms | p99 ms |\n| --- | ---: | ---: | ---: |")
            for name, rows in results.items():
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                print(f"| {name} | {med['lookups_per_s']:,.0f} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} |")
        finally:
            await kp.db.dispose()
            if args.postgres:
                engine = create_async_engine(args.postgres)
                async with engine.begin() as conn:
                    await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", default=None)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
