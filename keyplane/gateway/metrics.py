"""Prometheus metrics for the hot path, in a registry of this app's own."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
        buffer = self.kp.usage_buffer
        yield CounterMetricFamily("keyplane_usage_events_written", "Usage events written to the store",
                                  value=buffer.written)
        yield CounterMetricFamily("keyplane_usage_events_dropped", "Usage events dropped: buffer full",
                                  value=buffer.dropped)
        yield GaugeMetricFamily("keyplane_usage_buffer_events", "Usage events waiting to be written",
                                value=len(buffer))
        deliveries = CounterMetricFamily("keyplane_alert_deliveries", "Alert webhooks by outcome",
                                         labels=["outcome"])
        deliveries.add_metric(["delivered"], self.kp.alerts.delivered)
        deliveries.add_metric(["failed"], self.kp.alerts.failed)
        yield deliveries


class Metrics:
    def __init__(self, kp: Keyplane) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "keyplane_requests", "Data-plane and verify requests answered", ["route", "status", "code"],
            registry=self.registry,
        )
        self.auth_seconds = Histogram(
            "keyplane_auth_seconds", "Time to authenticate and enforce a request",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
            registry=self.registry,
        )
        self.registry.register(_CacheCollector(kp))
        self._children: dict[tuple[str, int, str], object] = {}

    def count(self, route: str, status: int, code: str) -> None:
        key = (route, status, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(route, str(status), code)
        child.inc()  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
