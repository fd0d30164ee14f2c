"""Process figures: plain integers and bucket lists on the hot path, read only when someone asks.

`Stats` is what the connection, hub and handler code update (an attribute add, a dict add, a bisect:
no locks, no labels resolved per message). `Stats.export()` turns it into a JSON-able snapshot; with
several workers each one's snapshot is shared through files (`wsapp.metrics_share`) and `merge` adds
them up, so one scrape of `/metrics` or one look at `/stats` shows the whole instance. The
Prometheus exposition is built from a (merged) snapshot by `SnapshotCollector`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

Snapshot = dict[str, Any]


class Histogram:
    """Cumulative-on-export bucket counts: `observe` is one bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """`n` observations of `value` (a bucket's upper bound is inclusive, as Prometheus's `le`)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def export(self) -> list[Any]:
        return [list(self.bounds), list(self.counts), self.sum]


# name -> (help, bucket upper bounds); every histogram is `wsapp_<name>`.
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "fanout_seconds": (
        "From the read that brought a message to the end of the write-out that handed its frame to the kernel "
        "for the last local recipient (broker deliveries: from the subscriber's read)",
        (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    ),
    "message_size_bytes": (
        "Size of the data messages received from clients (after permessage-deflate)",
        (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216),
    ),
    "connection_duration_seconds": (
        "How long WebSocket connections lasted, counted when they end",
        (0.1, 1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400),
    ),
    "loop_lag_seconds": (
        "How late the event loop ran a periodic timer (time greenlets wait for the CPU)",
        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    ),
}

# Counters kept as plain attributes of Stats, with their help text; each is `wsapp_<name>_total`
# (`wsapp_connections_total` and the broker's counters are named as before issue 14).
COUNTERS = {
    "connections_total": "WebSocket connections accepted",
    "refused": "Upgrade requests refused before the 101 (split by status in wsapp_refusals_total)",
    "messages_in": "Data messages received from clients",
    "messages_out": "Messages queued to clients (one per recipient)",
    "bytes_in": "Payload bytes received from clients",
    "bytes_out": "Bytes handed to the kernel for clients (frames, their 101s), closed connections so far",
    "drops": "Messages not delivered because the recipient was closing",
    "slow_consumer_kicks": "Clients closed with 1013 because they did not read",
    "paced": "Times a producer stopped reading until its recipients drained (backpressure)",
    "protocol_errors": "Connections failed for breaking RFC 6455 or a limit",
    "rate_limited": "Messages refused by the per-connection rate limit",
    "ping_timeouts": "Peers dropped for silence past WSAPP_PING_TIMEOUT",
    "internal_errors": "Connections ended by an unexpected server error",
    "api_publishes": "Messages published through POST /api/publish",
    "http_requests": "HTTP requests answered (upgrades not included)",
}

# Counters with labels: name -> (help, label names); each is `wsapp_<name>_total`.
LABELLED = {
    "closes": ("WebSocket connections ended, by close code, who closed first and why",
               ("code", "by", "reason")),
    "refusals": ("Upgrade requests refused before the 101, by HTTP status and reason", ("status", "reason")),
    "ws_errors": ("`error` messages sent on the rooms protocol (/ws), by error code", ("code",)),
}

# How the gauges of several workers combine into the instance's figure (default: sum).
_GAUGE_MERGE: dict[str, Callable[[Iterable[float]], float]] = {
    "broker_healthy": min,
    "uptime_seconds": max,
}
_PROCESS_MERGE: dict[str, Callable[[Iterable[float]], float]] = {
    "process_start_time_seconds": min,
    "process_max_fds": min,
}


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
        self.bytes_out = 0
        self.drops = 0
        self.slow_consumer_kicks = 0
        self.paced = 0
        self.protocol_errors = 0
        self.rate_limited = 0
        self.ping_timeouts = 0
        self.internal_errors = 0
        self.api_publishes = 0
        self.http_requests = 0
        self.closes: Counter[tuple[str, ...]] = Counter()
        self.refusals: Counter[tuple[str, ...]] = Counter()
        self.ws_errors: Counter[tuple[str, ...]] = Counter()
        self.fanout_seconds = Histogram(HISTOGRAMS["fanout_seconds"][1])
        self.message_size_bytes = Histogram(HISTOGRAMS["message_size_bytes"][1])
        self.connection_duration_seconds = Histogram(HISTOGRAMS["connection_duration_seconds"][1])
        self.loop_lag_seconds = Histogram(HISTOGRAMS["loop_lag_seconds"][1])

    def snapshot(self, **gauges: Any) -> dict[str, Any]:
        """The flat figures of /stats: every counter, the open connections and uptime, and `gauges`."""
        out: dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        out["connections"] = self.connections
        out["uptime_seconds"] = round(time.time() - self.started, 3)
        out.update(gauges)
        return out

    def export(self, gauges: dict[str, float], counters: dict[str, int], live_bytes_out: int = 0) -> Snapshot:
        """Everything, JSON-able, for `merge` and `SnapshotCollector`: counters (the broker's in `counters`),
        labelled counters, histograms, gauges and this process's own figures (memory, CPU, fds)."""
        plain = {name: getattr(self, name) for name in COUNTERS}
        plain["bytes_out"] += live_bytes_out  # open connections' bytes so far
        plain.update(counters)
        return {
            "time": time.time(),
            "counters": plain,
            "labelled": {name: [[*labels, n] for labels, n in getattr(self, name).items()] for name in LABELLED},
            "histograms": {name: getattr(self, name).export() for name in HISTOGRAMS},
            "gauges": {"connections": self.connections, "uptime_seconds": time.time() - self.started, **gauges},
            "process": process_figures(),
        }


_process = ProcessCollector(registry=None)


def process_figures() -> dict[str, float]:
    """This process's memory, CPU seconds, open fds and start time, as prometheus-client reads them."""
    return {sample.name: sample.value for family in _process.collect() for sample in family.samples}


def merge(snapshots: list[Snapshot], live: int) -> Snapshot:
    """The instance: counters and histograms added up; gauges and process figures of the `live` first
    snapshots (the others are workers that have exited, kept for their counters)."""
    out: Snapshot = {"counters": Counter(), "labelled": {}, "histograms": {}, "gauges": {}, "process": {},
                     "workers": live}
    labelled: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name in LABELLED}
    gauges: dict[str, list[float]] = {}
    process: dict[str, list[float]] = {}
    for i, snap in enumerate(snapshots):
        out["counters"].update(snap["counters"])
        for name, rows in snap["labelled"].items():
            for row in rows:
                labelled.setdefault(name, Counter())[tuple(row[:-1])] += row[-1]
        for name, (bounds, counts, total) in snap["histograms"].items():
            mine = out["histograms"].get(name)
            if mine is None or mine[0] != bounds:  # bounds differ only across versions: the newest wins
                out["histograms"][name] = [bounds, list(counts), total]
            else:
                mine[1] = [a + b for a, b in zip(mine[1], counts, strict=True)]
                mine[2] += total
        if i < live:
            for name, value in snap["gauges"].items():
                gauges.setdefault(name, []).append(value)
            for name, value in snap["process"].items():
                process.setdefault(name, []).append(value)
    out["counters"] = dict(out["counters"])
    out["labelled"] = {name: [[*labels, n] for labels, n in rows.items()] for name, rows in labelled.items()}
    out["gauges"] = {name: _GAUGE_MERGE.get(name, sum)(values) for name, values in gauges.items()}
    out["process"] = {name: _PROCESS_MERGE.get(name, sum)(values) for name, values in process.items()}
    return out


class SnapshotCollector(Collector):
    """Prometheus families from a snapshot (one worker's or the instance's), read at each scrape."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        for name, value in snap["counters"].items():
            yield CounterMetricFamily(f"wsapp_{name}", COUNTERS.get(name, name.replace("_", " ")), value=value)
        for name, (doc, labels) in LABELLED.items():
            family = CounterMetricFamily(f"wsapp_{name}", doc, labels=labels)
            for row in snap["labelled"].get(name, []):
                family.add_metric([str(v) for v in row[:-1]], row[-1])
            yield family
        for name, (doc, _bounds) in HISTOGRAMS.items():
            if name not in snap["histograms"]:
                continue
            bounds, counts, total = snap["histograms"][name]
            cumulative, running = [], 0
            for bound, count in zip([*bounds, float("inf")], counts, strict=True):
                running += count
                cumulative.append((_le(bound), running))
            yield HistogramMetricFamily(f"wsapp_{name}", doc, buckets=cumulative, sum_value=total)
        yield GaugeMetricFamily("wsapp_workers", "Worker processes of this instance whose figures are included",
                                value=snap.get("workers", 1))
        for name, value in snap["gauges"].items():
            doc = "Open WebSocket connections" if name == "connections" else name.replace("_", " ")
            yield GaugeMetricFamily(f"wsapp_{name}", doc, value=value)
        for name, value in snap["process"].items():
            if name == "process_cpu_seconds_total":
                yield CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent in seconds",
                                          value=value)
            else:
                yield GaugeMetricFamily(name, name.removeprefix("process_").replace("_", " "), value=value)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def prometheus_registry(source: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry of its own per app, so tests can build several apps in one process; `source` gives
    the snapshot to expose at each scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source))
    return registry
