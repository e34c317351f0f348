"""Prometheus metrics for the hot path, in a registry of this app's own."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from keyplane.services.container import Keyplane

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _CacheCollector(Collector):
    """Reads the caches', usage buffer's and alerts' own counters at scrape time: nothing extra per request."""

    def __init__(self, kp: Keyplane) -> None:
        self.kp = kp

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hits = CounterMetricFamily("keyplane_key_cache_hits", "Credential lookups answered from cache",
                                   labels=["cache"])
        misses = CounterMetricFamily("keyplane_key_cache_misses", "Credential lookups that went to the store",
                                     labels=["cache"])
        size = GaugeMetricFamily("keyplane_key_cache_entries", "Entries held", labels=["cache"])
        for name, cache in (("virtual_keys", self.kp.key_cache), ("service_accounts", self.kp.sa_cache)):
            hits.add_metric([name], cache.hits)
            misses.add_metric([name], cache.misses)
            size.add_metric([name], len(cache.positive))
        yield hits
        yield misses
        yield size
        yield CounterMetricFamily("keyplane_stale_credentials_served",
                                  "Cached credentials served past their TTL because the store was unreachable",
                                  value=self.kp.key_cache.stale_served + self.kp.sa_cache.stale_served)
        shared = self.kp.shared
        if shared is not None:
            yield GaugeMetricFamily("keyplane_redis_up", "1 while Redis answers, 0 while it does not",
                                    value=1 if shared.up else 0)
            yield CounterMetricFamily("keyplane_redis_errors", "Redis operations that failed", value=shared.errors)
            yield CounterMetricFamily("keyplane_redis_fallbacks",
                                      "Decisions taken in-process because Redis was unreachable (fail_open)",
                                      value=shared.fallbacks)
        if self.kp.bus is not None:
            yield CounterMetricFamily("keyplane_change_notices_received",
                                      "Cache invalidations received from other processes", value=self.kp.bus.received)
        buffer = self.kp.usage_buffer
        yield CounterMetricFamily("keyplane_usage_events_written", "Usage events written to the store",
                                  value=buffer.written)
        yield CounterMetricFamily("keyplane_usage_events_dropped", "Usage events dropped: buffer full",
                                  value=buffer.dropped)
        yield CounterMetricFamily("keyplane_usage_events_sanitised",
                                  "Usage events stored with NUL, surrogates or out-of-range numbers replaced",
                                  value=buffer.sanitised)
        yield CounterMetricFamily("keyplane_usage_events_quarantined",
                                  "Usage events the store refused even sanitised: dropped, the rest written",
                                  value=buffer.quarantined)
        yield GaugeMetricFamily("keyplane_usage_buffer_events", "Usage events waiting to be written",
                                value=len(buffer))
        deliveries = CounterMetricFamily("keyplane_alert_deliveries", "Alert webhooks by outcome",
                                         labels=["outcome"])
        deliveries.add_metric(["delivered"], self.kp.alerts.delivered)
        deliveries.add_metric(["failed"], self.kp.alerts.failed)
        yield deliveries


class _ToolCallSource(Protocol):
    def tool_calls(self) -> dict[tuple[str, str], int]: ...


class _McpCollector(Collector):
    def __init__(self, source: _ToolCallSource) -> None:
        self.source = source

    def collect(self) -> Iterator[CounterMetricFamily]:
        calls = CounterMetricFamily("keyplane_mcp_tool_calls", "MCP tool calls by tool and outcome",
                                    labels=["tool", "outcome"])
        for (tool, outcome), n in sorted(self.source.tool_calls().items()):
            calls.add_metric([tool, outcome], n)
        yield calls


class _Requests(Collector):
    """``keyplane_requests_total{route,status,code}`` and the ``keyplane_auth_seconds`` histogram, counted in
    plain dicts and lists: every request is counted on the event loop's thread, so prometheus_client's
    locked values (~1 µs a counter, ~3 µs a histogram observation) buy nothing here."""

    BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int, str], int] = {}
        self.created: dict[tuple[str, int, str], float] = {}
        self.auth_buckets = [0] * (len(self.BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.auth_sum = 0.0

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily("keyplane_requests", "Data-plane and verify requests answered",
                                       labels=["route", "status", "code"])
        for (route, status, code), n in list(self.counts.items()):
            requests.add_metric([route, str(status), code], n, created=self.created.get((route, status, code)))
        yield requests
        cumulative, buckets = 0, []
        for bound, n in zip((*(repr(b) for b in self.BUCKETS), "+Inf"), self.auth_buckets, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("keyplane_auth_seconds", "Time to authenticate and enforce a request",
                                    buckets=buckets, sum_value=self.auth_sum)


class Metrics:
    def __init__(self, kp: Keyplane) -> None:
        self.registry = CollectorRegistry()
        self._requests = _Requests()
        self.registry.register(self._requests)
        self.registry.register(_CacheCollector(kp))

    def watch_mcp(self, endpoint: _ToolCallSource) -> None:
        self.registry.register(_McpCollector(endpoint))

    def count(self, route: str, status: int, code: str) -> None:
        counts = self._requests.counts
        key = (route, status, code)
        n = counts.get(key)
        if n is None:
            self._requests.created[key] = time.time()
            counts[key] = 1
        else:
            counts[key] = n + 1

    def observe_auth(self, seconds: float) -> None:
        """Time to authenticate and enforce one request (``keyplane_auth_seconds``)."""
        requests = self._requests
        requests.auth_buckets[bisect_left(requests.BUCKETS, seconds)] += 1
        requests.auth_sum += seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)
