"""The usage buffer is bounded, says what it drops, and keeps what the store could not take."""

from __future__ import annotations

import pytest

from keyplane.app import KeyplaneApp
from keyplane.domain import usage_row
from keyplane.runtime.usage_buffer import UsageBuffer


def test_a_full_buffer_counts_and_logs_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    buffer = UsageBuffer(max_events=3)
    for i in range(5):
        buffer.add({"input_tokens": i})
    assert len(buffer) == 3 and buffer.dropped == 2
    assert [e[usage_row.INPUT_TOKENS] for e in buffer.take()] == [0, 1, 2]
    assert "2 events dropped" in caplog.text


def test_a_refused_batch_goes_back_in_front() -> None:
    buffer = UsageBuffer(max_events=4)
    buffer.add({"input_tokens": 1})
    batch = buffer.take()
    buffer.add({"input_tokens": 2})
    buffer.restore(batch)
    assert [e[usage_row.INPUT_TOKENS] for e in buffer.take()] == [1, 2] and buffer.dropped == 0


async def test_events_survive_a_store_outage(app: KeyplaneApp) -> None:
    from datetime import UTC, datetime

    calls = {"n": 0}
    real = app.kp.usage.insert

    async def flaky(batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("store down")
        await real(batch)

    app.kp.usage.insert = flaky  # type: ignore[method-assign]
    app.kp.usage_buffer.add({"org_id": None, "key_id": None, "parent_id": None, "provider": None, "model": None,
                             "endpoint": "/v1/models", "status": 401, "code": "missing_bearer", "input_tokens": 0,
                             "output_tokens": 0, "cost_usd": 0.0, "latency_ms": 1.0, "client_ip": "1.2.3.4",
                             "cost_center": None, "environment": None, "time": datetime.now(UTC)})
    await app.kp.flush_usage()
    assert len(app.kp.usage_buffer) == 1  # kept, not lost
    await app.kp.flush_usage()
    assert len(app.kp.usage_buffer) == 0 and app.kp.usage_buffer.written == 1


async def test_a_store_restarting_keeps_the_batch_instead_of_quarantining_it() -> None:
    """PostgreSQL restarting answers 57P01/57P03 (operator intervention) through a plain DBAPIError: that is
    the store's state, not a poison record, so the whole batch is kept for the next flush, never split."""
    from sqlalchemy.exc import DBAPIError

    class AdminShutdown(Exception):
        sqlstate = "57P01"

    calls: list[int] = []

    async def restarting(batch: list[usage_row.Row]) -> None:
        calls.append(len(batch))
        raise DBAPIError("INSERT …", None, AdminShutdown("terminating connection due to administrator command"))

    buffer = UsageBuffer()
    for i in range(4):
        buffer.add({"input_tokens": i})
    assert await buffer.flush(restarting) == 0
    assert calls == [4]  # one attempt, not halved down to single records
    assert buffer.quarantined == 0 and [e[usage_row.INPUT_TOKENS] for e in buffer.take()] == [0, 1, 2, 3]
