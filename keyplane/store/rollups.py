"""Usage rollups: usage aggregated as it is written, per minute, hour and day.

One table per grain (``usage_rollups_minute``, ``_hour``, ``_day``: each grain's rows stay together
on disk, and each has its own retention), one row per (organization, bucket start, key, parent key,
provider, model, cost center, environment, endpoint, MCP server, tool, status class, refusal code)
with requests, errors (refused + failed, as ``keyplane.domain.outcomes`` tells them apart), tokens
(prompt-cache writes and reads too), cost and a latency sketch (``keyplane.domain.latency_sketch``: fixed
log-scale bucket counts that merge by addition). A batch of usage events becomes a few upserts in the
same transaction as the events themselves, so a summary, a budget seed or an alert reads O(buckets in its
window), never O(events).

The refusal code is the event's code for a refused request and ``""`` for any other, so a row is all
refusals or none (recommendations count demand without refusals, and refusals by code).

Missing dimensions (an anonymous refusal has no organization or key) are stored as ``""`` so that
the primary key (the dimensions), and with it the upsert, works the same on SQLite and PostgreSQL.

Window decomposition: ``[start, end)`` on minute boundaries is covered by the coarsest rows that fit,
minutes at the ragged edges, then hours, then whole days::

    start         hour           day                      day          hour        end
      |--minutes--|----hours-----|---------days-----------|---hours----|--minutes--|

A window that runs up to now (``open_ended``) reads the current day's (or hour's) row whole: nothing
is stored after now, so only its start is ragged.

Organization rollups (``usage_rollups_org_minute``, ``_org_hour``, ``_org_day``): the same measures per
minute, hour and day without the key dimensions (key, parent key) and without the refusal code, written
in the same transaction from the same batch. A summary that neither filters nor groups by key (the usage
page's default, ``keyplane usage``, an organization's alert) reads only them: one row per (provider,
model, cost center, environment, endpoint, MCP server, tool, status class) instead of one per key as
well, for the ragged-edge minutes too (their keyed rows grow with the keys active in each minute).

Write path: a flush's events are summed per row in Python (``aggregate``) before one upsert per row,
and minute rows older than the minute rollups' retention are not written at all (retention would
delete them at its next pass; nothing reads minutes that far back, see ``UsageService.window``).

Backfill (migrations, bulk loads): ``backfill_page`` folds stored events into the rollups with the same
``aggregate`` and ``upsert``, a page at a time; ``org_backfill_sql`` sums the keyed rows of a grain into
its organization table in the store.
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import operator
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from keyplane.domain import latency_sketch, usage_row
from keyplane.domain.outcomes import REFUSED_STATUSES, outcome
from keyplane.store.db import executemany_values

MINUTE, HOUR, DAY = 60, 3600, 86400
GRAINS: dict[str, int] = {"m": MINUTE, "h": HOUR, "d": DAY}
TABLES = {"m": "usage_rollups_minute", "h": "usage_rollups_hour", "d": "usage_rollups_day"}
DIMENSIONS = ("org_id", "key_id", "parent_id", "provider", "model", "cost_center", "environment", "endpoint",
              "mcp_server", "tool", "status_class", "refusal_code")
MEASURES = ("requests", "errors", "refused", "failed", "input_tokens", "output_tokens", "cache_write_tokens",
            "cache_read_tokens", "cost_usd", "latency_ms_sum")
UNIQUE = ("org_id", "bucket", *DIMENSIONS[1:])
_ALL = ("bucket", *DIMENSIONS, *MEASURES, *latency_sketch.COLUMNS)
_SUMMED = (*MEASURES, *latency_sketch.COLUMNS)

# Per organization, minute, hour and day: no key dimensions, no refusal code (what a summary that does
# not filter or group by key needs). Tags "om", "oh" and "od" in ``aggregate``'s rows.
ORG_TABLES = {"m": "usage_rollups_org_minute", "h": "usage_rollups_org_hour", "d": "usage_rollups_org_day"}
ORG_DIMENSIONS = ("org_id", "provider", "model", "cost_center", "environment", "endpoint", "mcp_server", "tool",
                  "status_class")
ORG_UNIQUE = ("org_id", "bucket", *ORG_DIMENSIONS[1:])
_ORG_ALL = ("bucket", *ORG_DIMENSIONS, *MEASURES, *latency_sketch.COLUMNS)
# What the organization rows can answer: groups they keep (and time groups).
ORG_GROUPS = frozenset({"provider", "model", "cost_center", "environment", "endpoint", "mcp_server", "tool",
                        "status_class", "hour", "day", "minute"})
# Every table a batch is upserted into, by the tag ``aggregate`` puts first in each row.
_TARGETS = {**{g: (t, _ALL, UNIQUE) for g, t in TABLES.items()},
            **{f"o{g}": (t, _ORG_ALL, ORG_UNIQUE) for g, t in ORG_TABLES.items()}}
# Where an organization's dimensions sit in a keyed row's key (grain, bucket, *DIMENSIONS).
_ORG_PICK = tuple(2 + DIMENSIONS.index(d) for d in ORG_DIMENSIONS)


def tables_of(grain: str) -> list[str]:
    """Every rollup table of a grain (retention prunes them together)."""
    return [TABLES[grain], ORG_TABLES[grain]]


def _placeholders(n: int, paramstyle: str) -> str:
    if paramstyle == "qmark":
        return ", ".join("?" for _ in range(n))
    return ", ".join(f"${i + 1}" for i in range(n))  # asyncpg: numeric_dollar


# The driver's own executemany with positional tuples: the write path's cost is per rollup row, and
# SQLAlchemy's per-row parameter handling was three quarters of it. Built once per table (joining ~70
# columns' names was a tenth of a small batch's write).
@functools.cache
def _upsert_sql(tag: str, paramstyle: str, rows: int = 1) -> str:
    table, columns, unique = _TARGETS[tag]
    values = ", ".join(f"({_placeholders(len(columns), paramstyle)})" for _ in range(rows))
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values} "
            f"ON CONFLICT ({', '.join(unique)}) DO UPDATE SET "
            + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in _SUMMED))


def status_class(status: int) -> str:
    return f"{max(1, min(5, status // 100))}xx"


_SUMMED_AT = (usage_row.INPUT_TOKENS, usage_row.OUTPUT_TOKENS, usage_row.CACHE_WRITE_TOKENS,
              usage_row.CACHE_READ_TOKENS, usage_row.COST_USD)


def _sums(rows: list[usage_row.Row]) -> list[Any]:
    """[count, input, output, cache write, cache read tokens, cost, latency sum, {latency bucket: count}] of
    some events: each a missing value counting as 0, summed left to right (as ``+=`` would, so floats come
    out the same on any Python: ``sum`` compensates on 3.12+), bucketed as ``latency_sketch.bucket_of``."""
    columns = list(zip(*rows, strict=True))
    out: list[Any] = [len(rows)]
    out += [functools.reduce(operator.add, filter(None, columns[i]), 0) for i in _SUMMED_AT]
    latencies = columns[usage_row.LATENCY_MS]
    latency = functools.reduce(operator.add, filter(None, latencies), 0.0)
    if latency == latency and None not in latencies:  # no NaN, no None: the edges bucket it (in C)
        out += [latency, collections.Counter(map(bisect.bisect_right, itertools.repeat(_EDGES), latencies))]
    else:
        out += [latency, collections.Counter(latency_sketch.bucket_of(x or 0.0) for x in latencies)]
    return out


def aggregate(events: Iterable[dict[str, Any]], minute_floor: int | None = None) -> list[tuple[Any, ...]]:
    """``aggregate_rows`` for events given as dicts (the ``usage_events`` columns as keys)."""
    return aggregate_rows([usage_row.row_of(e) for e in events], minute_floor)


def aggregate_rows(rows: Iterable[usage_row.Row], minute_floor: int | None = None) -> list[tuple[Any, ...]]:
    """Rows to upsert for a batch of usage events (``keyplane.domain.usage_row`` rows), as tuples of the
    table's tag (``m``, ``h``, ``d``, ``om``, ``oh``, ``od``) then its columns, sorted by their unique key
    so that concurrent writers lock rows in the same order (no deadlocks on PostgreSQL). Minute rows whose
    bucket starts before ``minute_floor`` (the minute rollups' retention cut) are left out.

    Two steps, so that the work per event is small: events are first grouped per (minute, dimensions as
    the event has them), one slice and one dict lookup each, and summed per group by C loops (``_sums``);
    then each of those few groups is normalised and added into its minute, hour, day and organization rows."""
    floor = -1 if minute_floor is None else minute_floor
    ends = usage_row.DIMENSIONS_END
    t_at = usage_row.TIME
    grouped: dict[tuple[Any, ...], list[usage_row.Row]] = {}
    for r in rows:
        k = (r[t_at] // 60_000_000, r[:ends])
        g = grouped.get(k)
        if g is None:
            grouped[k] = [r]
        else:
            g.append(r)
    per_minute: dict[int, dict[tuple[Any, ...], list[Any]]] = {}
    for (minute, dims), g in grouped.items():
        per_minute.setdefault(minute * MINUTE, {})[dims] = _sums(g)
    acc: dict[tuple[Any, ...], list[Any]] = {}
    for minute, groups in per_minute.items():
        for (org, key, parent, provider, model, cost_center, environment, endpoint, mcp_server, tool, status,
             code), (n, tin, tout, cw, cr, cost, latency, hist) in groups.items():
            status = int(status)
            kind = outcome(status)
            refused, failed = int(kind == "refused"), int(kind == "failed")
            dims = (org or "", key or "", parent or "", provider or "", model or "", cost_center or "",
                    environment or "", endpoint or "", mcp_server or "", tool or "", status_class(status),
                    str(code or status) if refused else "")
            measures = (n, n * (refused | failed), n * refused, n * failed, int(tin), int(tout), int(cw), int(cr),
                        float(cost), float(latency))
            grains = (("h", minute // HOUR * HOUR, *dims), ("d", minute // DAY * DAY, *dims))
            if minute >= floor:
                grains = (("m", minute, *dims), *grains)
            for k in grains:
                row = acc.get(k)
                if row is None:
                    acc[k] = [*measures, dict(hist)]
                    continue
                for i in range(10):
                    row[i] += measures[i]
                into = row[10]
                for b, c in hist.items():
                    into[b] = into.get(b, 0) + c
    # The organization rows: the keyed rows summed without their key dimensions (fewer rows than
    # events, so cheaper than a second pass over the events).
    pick = operator.itemgetter(*_ORG_PICK)
    for k, row in list(acc.items()):
        ok = ("o" + k[0], k[1], *pick(k))
        into = acc.get(ok)
        if into is None:
            acc[ok] = [*row[:10], dict(row[10])]
            continue
        for i in range(10):
            into[i] += row[i]
        hist = into[10]
        for b, n in row[10].items():
            hist[b] = hist.get(b, 0) + n
    out = []
    zeros = [0] * latency_sketch.BUCKETS
    for k in sorted(acc):
        *measures, hist = acc[k]
        lat = zeros.copy()
        for b, n in hist.items():
            lat[b] = n
        out.append((*k, *measures, *lat))
    return out


def _per_table(rows: Sequence[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    """``aggregate``'s rows by table tag, without the tag, in their order (one pass)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        mine = out.get(row[0])
        if mine is None:
            mine = out[row[0]] = []
        mine.append(row[1:])
    return out


def upsert(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Add ``aggregate``'s rows into their tables (inserted, or summed into the existing row)."""
    per_table = _per_table(rows)
    for tag in _TARGETS:  # always this order: concurrent writers take the tables' locks alike
        if tag in per_table:
            conn.exec_driver_sql(_upsert_sql(tag, conn.dialect.paramstyle), per_table[tag])


def upsert_sqlite(cursor: Any, rows: Sequence[tuple[Any, ...]]) -> None:
    """``upsert`` on a SQLite DBAPI cursor (the usage writer's raw connection: no SQLAlchemy per statement),
    eight rows per statement: SQLite's work per upsert statement (its statement journal, halt, reset) was a
    fifth of a rollup row's cost."""
    per_table = _per_table(rows)
    for tag in _TARGETS:
        if tag in per_table:
            executemany_values(cursor, functools.partial(_upsert_sql, tag, "qmark"), per_table[tag], 8)


# What ``aggregate`` reads of a stored event.
_EVENT_COLUMNS = ("pk", "org_id", "key_id", "parent_id", "provider", "model", "endpoint", "status", "code",
                  "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens", "cost_usd", "latency_ms",
                  "cost_center", "environment", "mcp_server", "tool", "time")


def backfill_page(conn: Connection, after: int, page: int = 20_000, minute_floor: int | None = None,
                  tags: Collection[str] | None = None) -> int | None:
    """Fold the next ``page`` stored events with ``pk > after`` (in pk order) into the rollups (only the
    tables tagged ``tags``, default all), exactly as the write path folds a batch; returns the last pk
    read, or None when there was none. Memory stays bounded by the page; each page can be its own
    transaction."""
    args = _placeholders(2, conn.dialect.paramstyle).split(", ")
    rows = conn.exec_driver_sql(
        f"SELECT {', '.join(_EVENT_COLUMNS)} FROM usage_events WHERE pk > {args[0]} ORDER BY pk LIMIT {args[1]}",
        (after, page)).fetchall()
    if not rows:
        return None
    batch = []
    for r in rows:
        event = dict(zip(_EVENT_COLUMNS, r, strict=True))
        at = event["time"]
        if isinstance(at, str):  # SQLite: naive UTC text
            event["time"] = datetime.fromisoformat(at).replace(tzinfo=UTC)
        batch.append(event)
    out = aggregate(batch, minute_floor)
    upsert(conn, out if tags is None else [row for row in out if row[0] in tags])
    return int(rows[-1][0])


def _latency_edges() -> list[float]:
    """The smallest float that ``latency_sketch.bucket_of`` puts in bucket i, for i = 1 … BUCKETS - 1
    (bisection over the floats themselves), so that SQL comparisons bucket exactly as Python does."""
    edges = []
    for i in range(1, latency_sketch.BUCKETS):
        lo, hi = 0.0, 2.0 ** 40  # bucket_of(lo) < i <= bucket_of(hi)
        while True:
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if latency_sketch.bucket_of(mid) >= i:
                hi = mid
            else:
                lo = mid
        edges.append(hi)
    return edges


_EDGES = _latency_edges()


def backfill_sql(dialect: str, tag: str, minute_floor: int | None = None) -> tuple[str, dict[str, Any]]:
    """One set-based statement that folds the stored events with ``:after < pk <= :upto`` into the table
    tagged ``tag`` (``m`` … ``od``), the same rows ``aggregate`` and ``upsert`` make of them (sums added
    into existing rows), computed in the store: what a bulk load of millions of events can afford
    (``bench/scale.py``; tests/test_usage_rollups.py checks it against the write path). Returns the SQL and
    its parameters but ``after`` and ``upto``."""
    table, columns, unique = _TARGETS[tag]
    width = GRAINS[tag[-1]]
    if dialect == "sqlite":
        # Naive UTC text; whole seconds without the fraction (strftime would round it to milliseconds).
        seconds = "CAST(strftime('%s', substr(time, 1, 19)) AS INTEGER)"
        nan = ""
    else:
        seconds = "CAST(FLOOR(EXTRACT(EPOCH FROM time)) AS BIGINT)"
        nan = "WHEN latency_ms = CAST('NaN' AS DOUBLE PRECISION) THEN 0 "  # bucket_of: NaN is bucket 0
    params: dict[str, Any] = {f"edge{i + 1}": edge for i, edge in enumerate(_EDGES)}
    lat_bucket = ("CASE " + nan + " ".join(f"WHEN latency_ms >= :edge{i} THEN {i}" for i in range(len(_EDGES), 0, -1))
                  + " ELSE 0 END")
    refused = "status IN (" + ", ".join(str(s) for s in REFUSED_STATUSES) + ")"
    dims = {
        "org_id": "COALESCE(org_id, '')", "key_id": "COALESCE(key_id, '')", "parent_id": "COALESCE(parent_id, '')",
        "provider": "COALESCE(provider, '')", "model": "COALESCE(model, '')",
        "cost_center": "COALESCE(cost_center, '')", "environment": "COALESCE(environment, '')",
        "endpoint": "COALESCE(endpoint, '')", "mcp_server": "COALESCE(mcp_server, '')", "tool": "COALESCE(tool, '')",
        "status_class": "CASE WHEN status < 200 THEN '1xx' WHEN status < 300 THEN '2xx' WHEN status < 400 THEN '3xx' "
                        "WHEN status < 500 THEN '4xx' ELSE '5xx' END",
        "refusal_code": f"CASE WHEN {refused} THEN COALESCE(NULLIF(code, ''), CAST(status AS VARCHAR(40))) ELSE '' END",
    }
    keep = [d for d in columns[1:] if d in dims]
    event = [f"({seconds} / {width}) * {width} AS bucket", *(f"{dims[d]} AS {d}" for d in keep),
             "CASE WHEN status >= 400 THEN 1 ELSE 0 END AS errors",
             f"CASE WHEN {refused} THEN 1 ELSE 0 END AS refused",
             f"CASE WHEN status >= 400 AND NOT {refused} THEN 1 ELSE 0 END AS failed",
             *(f"COALESCE({c}, 0) AS {c}" for c in ("input_tokens", "output_tokens", "cache_write_tokens",
                                                     "cache_read_tokens", "cost_usd")),
             "COALESCE(latency_ms, 0) AS latency_ms", f"{lat_bucket} AS lat"]
    sums = ["COUNT(*)", *(f"SUM({c})" for c in ("errors", "refused", "failed", "input_tokens", "output_tokens",
                                                "cache_write_tokens", "cache_read_tokens", "cost_usd", "latency_ms")),
            *(f"SUM(CASE WHEN lat = {i} THEN 1 ELSE 0 END)" for i in range(latency_sketch.BUCKETS))]
    where = "1 = 1"  # (SQLite: an upsert's SELECT needs a WHERE)
    if tag == "m" or tag == "om":
        if minute_floor is not None:
            where = "bucket >= :floor"
            params["floor"] = minute_floor
    group = ", ".join(("bucket", *keep))
    # Materialized: the latency bucket is computed once per event, not once per sketch column.
    sql = (f"WITH e AS MATERIALIZED (SELECT {', '.join(event)} FROM usage_events WHERE pk > :after AND pk <= :upto) "
           f"INSERT INTO {table} ({', '.join(columns)}) SELECT {group}, {', '.join(sums)} FROM e WHERE {where} "
           f"GROUP BY {group} ON CONFLICT ({', '.join(unique)}) DO UPDATE SET "
           + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in _SUMMED))
    return sql, params


def backfill_range(conn: Connection, after: int, upto: int, minute_floor: int | None = None,
                   tags: Collection[str] | None = None) -> None:
    """The stored events with ``after < pk <= upto`` into every rollup table (or those tagged ``tags``),
    one ``backfill_sql`` statement per table."""
    for tag in _TARGETS:
        if tags is None or tag in tags:
            sql, params = backfill_sql(conn.dialect.name, tag, minute_floor)
            conn.execute(text(sql), {**params, "after": after, "upto": upto})


def org_backfill_sql(grain: str) -> str:
    """One statement that fills a grain's organization table from its keyed rows (an empty table: a
    migration's backfill, or a bulk load's)."""
    dims = ", ".join(ORG_UNIQUE)
    return (f"INSERT INTO {ORG_TABLES[grain]} ({dims}, {', '.join(_SUMMED)}) "
            f"SELECT {dims}, {', '.join(f'SUM({c})' for c in _SUMMED)} FROM {TABLES[grain]} GROUP BY {dims}")


def floor_to(t: int, width: int) -> int:
    return t // width * width


def ceil_to(t: int, width: int) -> int:
    return -(-t // width) * width


def cover(start: int, end: int, max_grain: str = "d") -> list[tuple[str, int, int]]:
    """``(grain, from, to)`` ranges of bucket starts that cover ``[start, end)`` exactly (both on minute
    boundaries) with the fewest rows: the coarsest grain up to ``max_grain`` that fits."""
    if start >= end:
        return []
    out: list[tuple[str, int, int]] = []
    a_h, b_h = ceil_to(start, HOUR), floor_to(end, HOUR)
    if a_h >= b_h:
        return [("m", start, end)]
    if max_grain == "m":
        return [("m", start, end)]
    out += [("m", start, a_h), ("m", b_h, end)]
    a_d, b_d = ceil_to(a_h, DAY), floor_to(b_h, DAY)
    if max_grain == "h" or a_d >= b_d:
        out.append(("h", a_h, b_h))
    else:
        out += [("h", a_h, a_d), ("h", b_d, b_h), ("d", a_d, b_d)]
    return [r for r in out if r[1] < r[2]]


@dataclass
class Totals:
    requests: int = 0
    errors: int = 0
    refused: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: float = 0.0
    latency: list[int] | None = None

    @property
    def served(self) -> int:
        return self.requests - self.refused - self.failed

    def add(self, row: Sequence[Any]) -> None:
        """``row``: the ``_SUMMED_COLUMNS`` (the counts, tokens, cost, then the latency bucket counts)."""
        self.requests += int(row[0] or 0)
        self.errors += int(row[1] or 0)
        self.refused += int(row[2] or 0)
        self.failed += int(row[3] or 0)
        self.input_tokens += int(row[4] or 0)
        self.output_tokens += int(row[5] or 0)
        self.cache_write_tokens += int(row[6] or 0)
        self.cache_read_tokens += int(row[7] or 0)
        self.cost_usd += float(row[8] or 0.0)
        lat = [int(v or 0) for v in row[9:]]
        self.latency = lat if self.latency is None else [a + b for a, b in zip(self.latency, lat, strict=True)]


_GROUP_COLUMNS = {"provider": "provider", "model": "model", "cost_center": "cost_center",
                  "environment": "environment", "key": "key_id", "endpoint": "endpoint",
                  "mcp_server": "mcp_server", "tool": "tool", "status_class": "status_class",
                  "refusal_code": "refusal_code", "hour": "bucket", "day": "bucket", "minute": "bucket"}
_SUMMED_COLUMNS = ("requests", "errors", "refused", "failed", "input_tokens", "output_tokens", "cache_write_tokens",
                   "cache_read_tokens", "cost_usd", *latency_sketch.COLUMNS)
_SUM_AS_SQL = ", ".join(f"SUM({c}) AS {c}" for c in _SUMMED_COLUMNS)
_SUM_SQL = ", ".join(f"SUM({c})" for c in _SUMMED_COLUMNS)


def _key_filter(key_ids: Collection[str] | None, params: dict[str, Any]) -> str:
    if key_ids is None:
        return ""
    names = []
    for i, key_id in enumerate(sorted(key_ids)):
        params[f"k{i}"] = key_id
        names.append(f":k{i}")
    return f" AND key_id IN ({', '.join(names) or 'NULL'})"


def grouped(conn: Connection, org_id: str, start: int, end: int, group_by: str,
            key_ids: Collection[str] | None = None, max_grain: str = "d", open_ended: bool = False) -> dict[
                Any, Totals]:
    """Totals per group over ``[start, end)`` (minute boundaries, unix seconds) for one organization,
    optionally only the keys in ``key_ids`` (a caller wanting a key's sub-keys passes them too).
    Time groups (``minute``, ``hour``, ``day``) come back keyed by the group's start in unix seconds.

    ``open_ended``: the window runs up to now, and nothing is stored after now, so the last (current)
    hour's and day's rows stand in for their minutes and hours: only the start edge is ragged."""
    column = _GROUP_COLUMNS[group_by]
    width = {"minute": MINUTE, "hour": HOUR, "day": DAY}.get(group_by)
    if width is not None:
        max_grain = min(max_grain, {MINUTE: "m", HOUR: "h", DAY: "d"}[width], key="mhd".index)
    if open_ended:
        end = ceil_to(end, GRAINS[max_grain])
    # One statement (one round trip): each segment summed per group, then the segments' sums added.
    params: dict[str, Any] = {"org": org_id}
    keys = _key_filter(key_ids, params)
    whole_org = key_ids is None and group_by in ORG_GROUPS
    parts = []
    for i, (grain, lo, hi) in enumerate(cover(start, end, max_grain)):
        params[f"lo{i}"], params[f"hi{i}"] = lo, hi
        table = ORG_TABLES[grain] if whole_org else TABLES[grain]
        parts.append(f"SELECT {column} AS g, {_SUM_AS_SQL} FROM {table} WHERE org_id = :org "
                     f"AND bucket >= :lo{i} AND bucket < :hi{i}{keys} GROUP BY {column}")
    out: dict[Any, Totals] = {}
    if not parts:
        return out
    sql = f"SELECT g, {_SUM_SQL} FROM ({' UNION ALL '.join(parts)}) AS r GROUP BY g"
    for row in conn.execute(text(sql), params):
        group = row[0] if width is None else floor_to(int(row[0]), width)
        out.setdefault(group, Totals()).add(row[1:])
    return out


def per_bucket(conn: Connection, key_ids: Collection[str], start: int, end: int,
               grain: str = "m") -> list[tuple[int, int, int, int, float]]:
    """(bucket, requests, failed, tokens, cost) per ``grain`` bucket of some keys' demand (refused requests
    left out): recommendations."""
    params: dict[str, Any] = {"lo": start, "hi": end}
    where = _key_filter(key_ids, params)
    sql = (f"SELECT bucket, SUM(requests), SUM(failed), SUM(input_tokens + output_tokens), SUM(cost_usd) "
           f"FROM {TABLES[grain]} WHERE bucket >= :lo AND bucket < :hi{where} AND refusal_code = '' "
           f"GROUP BY bucket ORDER BY bucket")
    return [(int(b), int(r), int(f), int(t or 0), float(c or 0.0))
            for b, r, f, t, c in conn.execute(text(sql), params)]


def refusals(conn: Connection, key_ids: Collection[str], start: int, end: int, grain: str = "m") -> dict[str, int]:
    """Refused requests of some keys per refusal code over ``grain`` buckets in ``[start, end)``."""
    params: dict[str, Any] = {"lo": start, "hi": end}
    where = _key_filter(key_ids, params)
    sql = (f"SELECT refusal_code, SUM(requests) FROM {TABLES[grain]} WHERE bucket >= :lo AND bucket < :hi{where} "
           f"AND refusal_code <> '' GROUP BY refusal_code")
    return {str(code): int(n) for code, n in conn.execute(text(sql), params)}


SPEND_SQL = (
    # The key and its sub-keys down to ``depth`` levels (``virtual_keys.parent_id`` index, one probe per
    # key found), then each one's day rows since the month's start (``ix_usage_rollups_day_key`` covers
    # key, bucket and cost: an index-only range read per key). One statement: one round trip.
    "WITH RECURSIVE tree(id, depth) AS ("
    "SELECT CAST(:key AS VARCHAR(40)), 0 "
    "UNION ALL SELECT v.id, tree.depth + 1 FROM virtual_keys v JOIN tree ON v.parent_id = tree.id "
    "WHERE tree.depth < :depth) "
    "SELECT COALESCE(SUM(d.cost_usd), 0), COALESCE(SUM(CASE WHEN d.bucket >= :day THEN d.cost_usd ELSE 0 END), 0) "
    f"FROM tree JOIN {TABLES['d']} d ON d.key_id = tree.id WHERE d.bucket >= :month")


def spend(conn: Connection, key_id: str, depth: int, day_start: int, month_start: int) -> tuple[float, float]:
    """USD spent since ``day_start`` and since ``month_start`` by a key's traffic: the key and its
    sub-keys down to ``depth`` levels (``keyplane.services.traffic.key_ids``' walk, deleted sub-keys
    included), in one statement: an index lookup per key, at most 31 day rows per key and dimension
    combination, whatever the history."""
    month, day = conn.execute(text(SPEND_SQL), {"key": key_id, "depth": depth, "day": day_start,
                                                "month": month_start}).one()
    return float(day), float(month)


COUNT_SQL = ("SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(errors), 0) FROM {table} "
             "WHERE org_id = :org AND bucket >= :lo AND bucket < :hi")


def counts(conn: Connection, org_id: str, start: int, end: int, key_ids: Collection[str] | None = None,
           mcp_server: str | None = None) -> tuple[int, int]:
    """Requests and errors over ``[start, end)`` (minute boundaries) in an organization, optionally only
    some keys' (a key's traffic) and one MCP server's: alerts."""
    total = errors = 0
    for grain, lo, hi in cover(start, end):
        params: dict[str, Any] = {"org": org_id, "lo": lo, "hi": hi}
        clause = _key_filter(key_ids, params)
        if mcp_server is not None:
            params["srv"] = mcp_server
            clause += " AND mcp_server = :srv"
        table = ORG_TABLES[grain] if key_ids is None else TABLES[grain]
        r, e = conn.execute(text(COUNT_SQL.format(table=table) + clause), params).one()
        total += int(r)
        errors += int(e)
    return total, errors


def prune(conn: Connection, table: str, before: int, batch: int) -> int:
    """Delete rows of a rollup table (``tables_of(grain)``) older than ``before``, the oldest bucket first
    and at most about ``batch`` rows (whole buckets: at least one) per call, through the bucket index;
    returns how many."""
    oldest = conn.execute(text(f"SELECT MIN(bucket) FROM {table}")).scalar()
    if oldest is None or oldest >= before:
        return 0
    # Buckets are evenly spaced: stop after the bucket that brings the count to ``batch``.
    upto = conn.execute(text(
        f"SELECT bucket FROM {table} WHERE bucket >= :oldest AND bucket < :before ORDER BY bucket "
        f"LIMIT 1 OFFSET :n"), {"oldest": oldest, "before": before, "n": batch - 1}).scalar()
    limit = before if upto is None else min(before, upto + 1)
    result = conn.execute(text(f"DELETE FROM {table} WHERE bucket >= :oldest AND bucket < :limit"),
                          {"oldest": oldest, "limit": limit})
    return int(result.rowcount or 0)
