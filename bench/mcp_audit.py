"""What auditing every MCP tools/call costs the call: the same read-only tool with recording off and on.

    python bench/mcp_audit.py                     # 12 blocks of 100 calls each way, alternating, ~1 minute
    python bench/mcp_audit.py --calls 200 --rounds 20

One keyplane process (SQLite, in a temporary home) serves /mcp over real HTTP on loopback; one client
calls ``keyplane_list_limit_profiles`` in a session, one call at a time. Blocks of calls alternate "off"
(recording replaced by a no-op: the behaviour before every call was audited) and "on" (the call
queued for the audit log, appended in batches by the background task), so both see the same
machine load. Reported: median and p95 latency per call, and the ratio on/off. Results are also
written to ``bench/results/mcp_audit.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyplane.app import KeyplaneApp  # noqa: E402
from keyplane.config import Settings  # noqa: E402
from keyplane.domain import tokens  # noqa: E402

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "keyplane_list_limit_profiles", "arguments": {}}}


async def one_call(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> float:
    start = time.perf_counter()
    resp = await http.post(url, json=CALL, headers=headers)
    elapsed = time.perf_counter() - start
    assert resp.status_code == 200 and "standard" in resp.text, resp.text
    return elapsed


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1000, 3),
            "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 3),
            "calls": len(ordered)}


async def main(calls: int, rounds: int) -> dict[str, Any]:
    admin = tokens.generate(tokens.SERVICE_ACCOUNT_PREFIX)
    with tempfile.TemporaryDirectory() as home:
        app = KeyplaneApp(Settings(home=Path(home), admin_token=admin, access_log=False))
        await app.startup()
        config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None, access_log=False)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        for _ in range(1000):  # uvicorn offers no event for "started"
            if server.started:
                break
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/mcp"
        recorder = app.kp.tool_calls
        real_record = recorder.record
        results: dict[str, list[float]] = {"off": [], "on": []}
        try:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {admin}", **ACCEPT}) as http:
                init = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "bench", "version": "1"}}})
                session = {"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
                await http.post(url, headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
                for _ in range(50):  # warm up
                    await one_call(http, url, session)
                # Alternate in blocks: long enough that an "on" block's batched appends (every 0.2 s) land in
                # it, short enough that load from elsewhere on the machine hits both sides alike.
                for i in range(rounds * 2):
                    mode = "off" if i % 2 == 0 else "on"
                    recorder.record = real_record if mode == "on" else (lambda *a, **k: None)  # type: ignore[method-assign]
                    if mode == "off":
                        await recorder.flush()  # the previous block's queue is not this block's cost
                    for _ in range(calls):
                        results[mode].append(await one_call(http, url, session))
            recorder.record = real_record  # type: ignore[method-assign]
            await recorder.flush()
            written = recorder.written
        finally:
            server.should_exit = True
            await task
            await app.shutdown()
    off, on = summary(results["off"]), summary(results["on"])
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "off": off, "on": on, "audit_entries_written": written,
        "ratio_median_on_over_off": round(on["median_ms"] / off["median_ms"], 3),
        "ratio_p95_on_over_off": round(on["p95_ms"] / off["p95_ms"], 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per block")
    parser.add_argument("--rounds", type=int, default=12, help="blocks each way, alternating")
    args = parser.parse_args()
    result = asyncio.run(main(args.calls, args.rounds))
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "mcp_audit.json").write_text(json.dumps(result, indent=2) + "\n")
