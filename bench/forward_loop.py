"""The gateway's forwarding in process: ``Upstream.forward`` (route, request head, upstream client, usage
read, relay) N times against a running fake upstream, without a server in front: for instruction counts.

    .venv/bin/uvicorn bench.fake_upstream:app --port 38123 --loop uvloop --http httptools &
    for n in 200 1200; do UP_PORT=38123 CONC=1 PYTHONMALLOC=malloc valgrind --tool=callgrind \\
        --callgrind-out-file=/tmp/fl.$n .venv/bin/python bench/forward_loop.py . $n 2>&1 | grep Collected; done

Instructions per forwarded request = (Ir(1200) − Ir(200)) / 1000 (start-up cancels out). ``CONC`` requests
at once (default 1: with more, how many answers one loop iteration picks up varies run to run, ±10%).
argv: the keyplane source tree, the number of requests, ``chat`` (default) or ``stream``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import types
from typing import Any

tree, count = sys.argv[1], int(sys.argv[2])
kind = sys.argv[3] if len(sys.argv) > 3 else "chat"
sys.path.insert(0, os.path.abspath(tree))

import uvloop  # noqa: E402

from keyplane.gateway.enforce import Admission  # noqa: E402
from keyplane.gateway.proxy import Outcome, Upstream  # noqa: E402
from keyplane.services.providers import Route  # noqa: E402

ROUTE = Route(provider_id="p", provider="local", base_url=f"http://127.0.0.1:{os.environ['UP_PORT']}/v1",
              api_key="sk-bench-upstream", timeout=30.0, input_per_mtok=1, output_per_mtok=2)
TABLE = {"bench-model": ROUTE}
BODY = (b'{"model":"bench-model","messages":[{"role":"user","content":"hello"}]'
        + (b',"stream":true}' if kind == "stream" else b"}"))
SCOPE = {"type": "http", "headers": [(b"authorization", b"Bearer x")], "query_string": b""}
KEY = types.SimpleNamespace(org_id="org", id="k", allowed_models=(), spend_limits=())


class Store:
    """What forward asks of Keyplane, loaded: one organization's routes, no spend limits."""

    def __init__(self) -> None:
        self.settings = types.SimpleNamespace(upstream_max_connections=200, prompt_bytes_per_token=4)
        self.shared = None
        self.routes = {"org": TABLE}

    async def routes_for(self, org_id: str) -> dict[str, Route]:
        return TABLE

    async def settle_spend(self, key: Any, grant: Any, tokens: int, cost: float) -> None:
        return None


async def receive() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


def _collect(sent: list[dict[str, Any]]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return send


async def main() -> None:
    upstream = Upstream(Store())  # type: ignore[arg-type]
    left = [count]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            sent: list[dict[str, Any]] = []
            send = _collect(sent)

            admission = Admission(KEY, "127.0.0.1", [(b"x-ratelimit-limit", b"10")])  # type: ignore[arg-type]
            outcome = Outcome()
            await upstream.forward(admission, "/v1/chat/completions", BODY, receive, send, outcome, SCOPE)
            await upstream.settle(admission, outcome)
            assert outcome.status == 200 and outcome.output_tokens == 20, (outcome, sent)

    await asyncio.gather(*[worker() for _ in range(int(os.environ.get("CONC", "1")))])
    await upstream.close()


uvloop.run(main())
