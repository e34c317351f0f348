"""The gateway's usage rows say what the dict events said: same stored time, same fields, same sanitising."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from keyplane.domain import usage_row
from keyplane.domain.storable import INT32_MAX, storable_int, storable_text
from keyplane.runtime.usage_buffer import UsageBuffer, storable_row
from keyplane.store import rollups
from keyplane.store.models import UsageEvent

EVENT = {"org_id": "org_x", "key_id": "vk_x", "parent_id": None, "provider": "p", "model": "m",
         "endpoint": "/v1/chat/completions", "status": 200, "code": "ok", "input_tokens": 3, "output_tokens": 4,
         "cost_usd": 0.25, "latency_ms": 12.5, "client_ip": "127.0.0.1", "cost_center": "cc",
         "environment": None, "time": datetime(2026, 11, 24, 1, 2, 3, 456789, tzinfo=UTC)}


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)))
def test_the_stored_time_is_what_sqlalchemy_stores(at: datetime) -> None:
    aware = at.replace(tzinfo=UTC)
    us = usage_row.us_of(aware)
    assert usage_row.us_of(at) == us  # a naive time is UTC
    assert usage_row.StoredTime()(us) == aware.replace(tzinfo=None).isoformat(" ", "microseconds")
    assert usage_row.datetime_of(us) == aware


def test_a_dict_event_and_its_row_say_the_same() -> None:
    row = usage_row.row_of(EVENT)
    assert len(row) == len(usage_row.FIELDS)
    back = usage_row.as_dict(row)
    assert back == {**EVENT, "cache_write_tokens": 0, "cache_read_tokens": 0, "mcp_server": None,
                    "mcp_method": None, "tool": None}
    assert rollups.aggregate([EVENT]) == rollups.aggregate_rows([row])


@given(model=st.text(max_size=260), tokens=st.integers(-(2**40), 2**40), cost_center=st.none() | st.text(max_size=120))
def test_a_row_is_sanitised_field_by_field(model: str, tokens: int, cost_center: str | None) -> None:
    event = {**EVENT, "model": model, "input_tokens": tokens, "cost_center": cost_center}
    row = usage_row.row_of(event)
    clean = storable_row(row)
    limits = {c.name: getattr(c.type, "length", None) for c in UsageEvent.__table__.columns}
    expected = {**usage_row.as_dict(row), "model": storable_text(model, limits["model"]),
                "input_tokens": storable_int(tokens),
                "cost_center": None if cost_center is None else storable_text(cost_center, limits["cost_center"])}
    assert usage_row.as_dict(clean) == expected
    if model.isascii() and (cost_center or "").isascii() and "\x00" not in model + (cost_center or "") \
            and clean == row:
        assert clean is row  # nothing to change (every request): no copy


def test_the_buffer_holds_rows_whatever_it_is_given() -> None:
    """One sanitiser: a dict event (tests, backfills) becomes a row as it goes in, and is sanitised as one."""
    buffer = UsageBuffer()
    buffer.add(EVENT)
    buffer.add({**EVENT, "model": "m" * 500, "input_tokens": 2**40})
    plain, long = buffer.take()
    assert plain == usage_row.row_of(EVENT)
    assert long[usage_row.MODEL] == storable_text("m" * 500, 200) and long[usage_row.INPUT_TOKENS] == INT32_MAX
    assert buffer.sanitised == 1


def test_events_of_one_minute_group_into_the_same_rollup_rows() -> None:
    start = EVENT["time"]
    events = [{**EVENT, "time": start + timedelta(seconds=s), "status": status, "code": code}
              for s, status, code in ((0, 200, "ok"), (1, 429, "rate_limited"), (2, 200, "ok"), (70, 200, "ok"))]
    rows = rollups.aggregate(events)
    minute = {r[1]: r for r in rows if r[0] == "m" and r[12] == "2xx"}
    assert sorted(r[14] for r in minute.values()) == [1, 2]  # requests per minute: two, then one
    (hour,) = [r for r in rows if r[0] == "h" and r[12] == "2xx"]
    assert hour[14] == 3 and hour[18] == 9 and hour[22] == 0.75  # requests, input tokens, cost
