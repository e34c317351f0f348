"""Instructions per request of ``Upstream.forward`` and its settle, a key without vs with a budget, without the
network: load-independent, unlike the whole app's count (issue 17).

    PYTHONHASHSEED=0 valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/tmp/kpfwd/after.%p .venv/bin/python bench/budget_forward.py
    .venv/bin/python bench/budget_forward.py --sum /tmp/kpfwd/after.

bench/budget_instructions.py counts the whole app with a real upstream, 8 requests at a time; on a loaded
machine the event loop's turns per request vary with when the upstream's answers arrive, and its "added" moved
by ±3k between runs of the same tree (30.3k and 36.1k for one tree, 2026-11-24). Here the same chat request
(bench/gateway.py's ``BODY``, the budgeted key's three windows never reached) runs through the gateway's own
``Upstream.forward`` with the upstream replaced by a function that meters the bench upstream's usage and runs
``before_last_byte`` (where the spend is settled), then the data plane's ``finally`` settle: everything a
budget adds except the response header's bytes on the wire. Each key: 300 calls to warm up, 4,000 counted,
dumped to its own file. The same file runs in an older tree (copy it there) for a before/after.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.getcwd())  # the tree it runs in (an older one for "before")

import orjson

from keyplane.domain.policy import KeySnapshot, Limits
from keyplane.gateway.enforce import Admission
from keyplane.gateway.proxy import Outcome, Upstream
from keyplane.runtime.spend import LocalSpend
from keyplane.services.hot_path import HotPath
from keyplane.services.providers import Route

CALLS = 4000
UNDER_VALGRIND = any("vgpreload" in line for line in Path("/proc/self/maps").read_text().splitlines())
BODY = orjson.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hello"}]})


class Plane(HotPath):
    """Just what ``Upstream`` reads of a ``Keyplane``: settings, routes, the spend backend."""

    def __init__(self, route: Route) -> None:
        self.settings = SimpleNamespace(prompt_bytes_per_token=3.0, output_allowance_tokens=4096,
                                        upstream_max_connections=100)
        self.shared = None
        self.table = {"bench-model": route}
        self.routes = {"o": self.table}  # Keyplane.routes: each organization's table, once loaded

        async def nothing_spent(bucket: str) -> tuple[float, float]:
            return 0.0, 0.0

        self.spend = LocalSpend(nothing_spent)

    async def routes_for(self, org_id: str) -> dict[str, Route]:
        return self.table


def drive(coro: Any) -> None:
    try:
        coro.send(None)
    except StopIteration:
        return
    raise RuntimeError("forward waited: a bucket not seeded?")


def main() -> None:
    route = Route("local", "local", "http://upstream/v1", None, 30.0, 1.0, 2.0)
    plane = Plane(route)
    upstream = Upstream(plane)  # type: ignore[arg-type]

    async def relay(prepared: Any, body: bytes | None, route: Route, admission: Admission, receive: Any, send: Any,
                    outcome: Outcome, reader: Any, stream: bool, before_last_byte: Any) -> None:
        outcome.meter(route, SimpleNamespace(input=12, output=20, cache_write=0, cache_read=0))  # type: ignore[arg-type]
        if before_last_byte is not None:
            await before_last_byte()
        outcome.status = 200

    upstream._relay = relay  # type: ignore[method-assign]
    # The request head, encoded once per route (the same for both keys): no client, no event loop here.
    upstream.prepared = lambda *args: None  # type: ignore[method-assign]
    plain = Limits(requests_per_minute=10_000_000)
    budget = Limits(requests_per_minute=10_000_000, tokens_per_minute=2_000_000_000, cost_per_day_usd=1e9,
                    budget_per_month_usd=1e10)  # bench/gateway.py's budgeted key
    keys = {
        "no_budget": KeySnapshot(id="k0", org_id="o", name="n", status="enabled", scopes=frozenset(),
                                 expires_at=None, allowlists=(), limits=plain, limit_profile=None),
        "budget": KeySnapshot(id="k1", org_id="o", name="b", status="enabled", scopes=frozenset(),
                              expires_at=None, allowlists=(), limits=budget, limit_profile=None,
                              spend_limits=(("k1", budget),)),
    }
    plane.spend.ledger.seed("k1", 0.0, 0.0)
    scope = {"type": "http", "headers": [], "query_string": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def request(key: KeySnapshot) -> None:
        admission = Admission(key, "127.0.0.1", [])
        outcome = Outcome()
        try:
            await upstream.forward(admission, "/v1/chat/completions", BODY, receive, send, outcome, scope)
        finally:
            await upstream.settle(admission, outcome)  # the data plane's finally (each tree as it is)

    for name, key in [*keys.items(), *reversed(keys.items())]:
        for _ in range(300):
            drive(request(key))
        if UNDER_VALGRIND:
            subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
        for _ in range(CALLS):
            drive(request(key))
        if UNDER_VALGRIND:
            for args in (("-i", "off"), ("-d", name)):
                subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)
    asyncio.run(upstream.close())


def report(prefix: str) -> None:
    totals: dict[str, list[int]] = {}
    for path in sorted(Path(prefix).parent.glob(Path(prefix).name + "*")):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: dump (\w+)$", text, re.M)
        total = re.search(r"^totals: (\d+)", text, re.M)
        if trigger and total:
            totals.setdefault(trigger.group(1), []).append(int(total.group(1)) // CALLS)
    for name, values in totals.items():
        print(f"{name:10} {values}")
    if "budget" in totals and "no_budget" in totals:
        print("added per request:", [b - a for a, b in zip(totals["no_budget"], totals["budget"], strict=True)])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--sum":
        report(sys.argv[2])
    else:
        main()
