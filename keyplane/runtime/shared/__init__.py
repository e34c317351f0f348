"""Distributed mode: what must hold across processes lives in Redis.

- GCRA request limits: one Lua script decides every bucket of a request (a sub-key and its parents)
  atomically, on Redis's clock, so N processes admit exactly what one would.
- Spend counters: tokens per minute, cost per UTC day and month, seeded once from the store, and the
  reservations held against them: one script reserves over every window of a key and its ancestors
  (all or nothing), one settles. A reservation expires after ``KEYPLANE_SPEND_RESERVATION_SECONDS``
  (the next reservation in the same key family drops expired ones), so a process that dies holding
  some does not hold that budget forever. One family's names share a hash slot (runtime/spend_keys.py).
- The failed-authentication brake: failures are counted in Redis; a block is broadcast, so the
  check on the hot path stays in memory.
- The signature replay window: ``SET NX`` on the signature.
- Change notices: every cache invalidation is published on one channel; every process drops its
  copy. The audit-log poll (and the cache TTL) remain the backstop for a lost message.

When Redis is unreachable, authentication carries on from cache and store, and limits follow
``KEYPLANE_REDIS_FAIL_MODE``: ``open`` (default) falls back to each process's own in-memory limits,
``closed`` refuses limited requests with 503. Every transition is logged loudly and counted.

Modules (one idea each):

    state.py          SharedState: the connection pool, its health, the fallback bookkeeping
    rate_limiter.py   GCRA_SCRIPT and SharedRateLimiter (batched request limits)
    spend.py          ADD_IF_SEEDED, RESERVE_SCRIPT, SETTLE_SCRIPT and SharedSpend (spend windows, reservations)
    replay.py         SharedReplayWindow
    change_bus.py     ChangeBus (the invalidation channel)
    brake.py          SharedBrake
"""

from keyplane.runtime.shared.brake import SharedBrake
from keyplane.runtime.shared.change_bus import ChangeBus
from keyplane.runtime.shared.rate_limiter import GCRA_SCRIPT, SharedRateLimiter
from keyplane.runtime.shared.replay import SharedReplayWindow
from keyplane.runtime.shared.spend import ADD_IF_SEEDED, RESERVE_SCRIPT, SETTLE_SCRIPT, SharedSpend
from keyplane.runtime.shared.state import SharedState

__all__ = ["ADD_IF_SEEDED", "GCRA_SCRIPT", "RESERVE_SCRIPT", "SETTLE_SCRIPT", "ChangeBus", "SharedBrake",
           "SharedRateLimiter", "SharedReplayWindow", "SharedSpend", "SharedState"]
