"""Instructions per call of each piece of a budgeted request's path, counted by callgrind (issue 17).

    PYTHONHASHSEED=0 valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/tmp/kppieces/after.%p .venv/bin/python bench/budget_pieces.py
    .venv/bin/python bench/budget_pieces.py --sum /tmp/kppieces/after.

Each piece runs 200 times to warm up, then 2,000 times with the instrumentation on, dumped to its own file.
Every figure includes the loop and the lambda (the ``empty`` piece). Without valgrind: nothing is counted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from keyplane.domain.policy import KeySnapshot, Limits
from keyplane.gateway import budget
from keyplane.gateway.wire import APIS
from keyplane.runtime.spend import Grant, LocalSpend, windows
from keyplane.services.providers import Route

CALLS = 2000
UNDER_VALGRIND = any("vgpreload" in line for line in Path("/proc/self/maps").read_text().splitlines())


def piece(name: str, fn: Callable[[], Any]) -> None:
    for _ in range(200):
        fn()
    if UNDER_VALGRIND:
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
    for _ in range(CALLS):
        fn()
    if UNDER_VALGRIND:
        for args in (("-i", "off"), ("-d", name)):
            subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


def drive(coro: Any) -> None:
    try:
        coro.send(None)
    except StopIteration:
        pass


def main() -> None:
    limits = Limits(requests_per_minute=10_000_000, tokens_per_minute=2_000_000_000, cost_per_day_usd=1e9,
                    budget_per_month_usd=1e10)  # bench/gateway.py's budgeted key
    key = KeySnapshot(id="k1", org_id="o", name="n", status="enabled", scopes=frozenset(), expires_at=None,
                      allowlists=(), limits=limits, limit_profile=None, spend_limits=(("k1", limits),))
    route = Route("p", "p", "http://upstream", None, 30.0, 1.0, 2.0)
    api = APIS["/v1/chat/completions"]

    async def nothing_spent(bucket: str) -> tuple[float, float]:
        return 0.0, 0.0

    spend = LocalSpend(nothing_spent)
    spend.ledger.seed("k1", 0.0, 0.0)
    body = orjson.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hello"}]})
    request = orjson.loads(body)
    ask = budget.ask_for(api, request, len(body), route, key, 3.0, 4096)

    def reserve_settle() -> None:
        drive(spend.settle(spend.reserve_now(key.spend_limits, ask), key.spend_buckets, 10, 0.0))  # type: ignore[arg-type]

    chain = spend.ledger.chain(key.spend_limits, key.spend_buckets)
    assert chain is not None

    def whole_settle() -> None:  # the plan's way (budget.Plan): reserve_whole, settled through the chain
        grant = spend.ledger.reserve_whole(chain, ask.prompt_tokens, ask.prompt_usd, ask.output_tokens,
                                           ask.output_usd_per_token)
        assert grant is not None
        spend.ledger.settle(grant, (), 10, 0.0)

    clamped = {**request, "max_tokens": 4000}
    piece("empty", lambda: None)
    piece("ask_for", lambda: budget.ask_for(api, request, len(body), route, key, 3.0, 4096))
    piece("reserve", lambda: spend.reserve_now(key.spend_limits, ask))
    piece("reserve_settle", reserve_settle)
    piece("reserve_whole_settle", whole_settle)
    piece("add", lambda: drive(spend.add(key.spend_buckets, 10, 0.0)))
    piece("dict_copy", lambda: dict(request))
    piece("apply_allowance_with_dict_copy",
          lambda: budget.apply_allowance(api, dict(request), 4000, ask.named, ask.choices))
    piece("dumps", lambda: orjson.dumps(clamped))
    piece("grant", lambda: Grant(5, ("k1",), 10, 0.1, 100))
    piece("windows", lambda: windows(time.time()))


def report(prefix: str) -> None:
    for path in sorted(Path(prefix).parent.glob(Path(prefix).name + "*")):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: dump (\w+)$", text, re.M)
        total = re.search(r"^totals: (\d+)", text, re.M)
        if trigger and total:
            print(f"{trigger.group(1):32} {int(total.group(1)) // CALLS:>8,}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--sum":
        report(sys.argv[2])
    else:
        main()
