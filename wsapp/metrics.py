"""Process counters: plain integers on the hot path, exported as JSON (/stats) and Prometheus (/metrics)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class Stats:
    """Counters updated by the connection and hub code; reading them costs nothing per message."""

    def __init__(self) -> None:
        self.started = time.time()
        self.connections = 0
        self.connections_total = 0
        self.refused = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.drops = 0
        self.slow_consumer_kicks = 0
        self.paced = 0
        self.protocol_errors = 0
        self.rate_limited = 0
        self.ping_timeouts = 0
        self.internal_errors = 0
        self.api_publishes = 0

    def snapshot(self, **gauges: Any) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "started"}
        out["uptime_seconds"] = round(time.time() - self.started, 3)
        out.update(gauges)
        return out


_COUNTERS = {
    "connections_total": "WebSocket connections accepted",
    "refused": "Upgrade requests refused before the 101",
    "messages_in": "Data messages received from clients",
    "messages_out": "Messages queued to clients (one per recipient)",
    "bytes_in": "Payload bytes received from clients",
    "drops": "Messages not delivered because the recipient was closing",
    "slow_consumer_kicks": "Clients closed with 1013 because they did not read",
    "paced": "Times a producer stopped reading until its recipients drained (backpressure)",
    "protocol_errors": "Connections failed for breaking RFC 6455 or a limit",
    "rate_limited": "Messages refused by the per-connection rate limit",
    "ping_timeouts": "Peers dropped for silence past WSAPP_PING_TIMEOUT",
    "internal_errors": "Connections ended by an unexpected server error",
    "api_publishes": "Messages published through POST /api/publish",
}


class _StatsCollector(Collector):
    def __init__(
        self, stats: Stats, gauges: Callable[[], dict[str, float]], counters: Callable[[], dict[str, int]] | None
    ) -> None:
        self._stats = stats
        self._gauges = gauges
        self._counters = counters

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"wsapp_{name}", doc, value=getattr(self._stats, name))
        yield GaugeMetricFamily("wsapp_connections", "Open WebSocket connections", value=self._stats.connections)
        yield GaugeMetricFamily("wsapp_uptime_seconds", "Seconds since start", value=time.time() - self._stats.started)
        for name, value in self._gauges().items():
            yield GaugeMetricFamily(f"wsapp_{name}", name.replace("_", " "), value=value)
        for name, count in (self._counters() if self._counters else {}).items():
            yield CounterMetricFamily(f"wsapp_{name}", name.replace("_", " "), value=count)


def prometheus_registry(
    stats: Stats, gauges: Callable[[], dict[str, float]], counters: Callable[[], dict[str, int]] | None = None
) -> CollectorRegistry:
    """A registry of its own per app, so tests can build several apps in one process. `gauges` and
    `counters` are read at each scrape (the broker's, say)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, gauges, counters))
    return registry
