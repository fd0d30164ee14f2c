"""The collaborators one app's connections share: settings, counters, broker, hub, relay, registry.

Built once per app by `build_services` (the `Realtime` extension does it in `init_app`) and kept in
`app.extensions["wsapp"]`; the upgrade handler, the routes and `rt.publish` all find them there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client.registry import CollectorRegistry

from wsapp.backends import HistoryBackend
from wsapp.backends.memory import MemoryBackend
from wsapp.config import Settings
from wsapp.connection import Outbox
from wsapp.frames import OP_TEXT, encode_frame
from wsapp.hub import Hub
from wsapp.metrics import Snapshot, Stats, prometheus_registry
from wsapp.metrics_share import WorkerShare
from wsapp.monitor import Monitor
from wsapp.registry import Registry
from wsapp.relay import RelayGroup

EXTENSION_KEY = "wsapp"


@dataclass
class Services:
    """Everything a request or connection needs; one per app, found at app.extensions['wsapp']."""

    settings: Settings
    stats: Stats
    backend: HistoryBackend
    hub: Hub
    relay: RelayGroup
    registry: Registry
    outbox: Outbox
    metrics: CollectorRegistry
    # The loop-lag timer, and the worker's and the instance's figures (/stats, /metrics).
    monitor: Monitor
    # The extension that owns these services (wsapp.extension.Realtime): its routes and hooks.
    realtime: Any = None


def _text_frame(payload: bytes) -> bytes:
    return encode_frame(OP_TEXT, payload)


def build_services(settings: Settings) -> Services:
    """Build the broker (Redis when REDIS_URL is set, else in-process), hub, relay and registry."""
    stats = Stats()
    backend: HistoryBackend
    if settings.redis_url:
        from wsapp.backends.redis import RedisBackend

        backend = RedisBackend(settings)
    else:
        backend = MemoryBackend(settings.history)
    # The process budget must leave room for a couple of the largest messages in flight.
    outbox = Outbox(max(settings.max_queued_bytes, 4 * settings.max_message_bytes), settings.slow_consumer_grace,
                    stats)
    registry = Registry(settings, stats, outbox)
    # After each delivery from another process, the broker's subscriber waits like any producer.
    hub = Hub(backend, _text_frame, stats, settings.max_rooms, after_remote=outbox.after_remote,
              must_wait=outbox.must_wait)
    relay = RelayGroup(settings, stats, backend, after_remote=outbox.after_remote)

    def gauges() -> dict[str, float]:
        return {"rooms": hub.room_count, "relay_clients": len(relay), "broker_healthy": float(backend.healthy)}

    def export() -> Snapshot:
        return stats.export(gauges(), backend.counters, registry.bytes_out())

    monitor = Monitor(stats, export, WorkerShare(settings.metrics_dir) if settings.metrics_dir else None)

    return Services(
        settings=settings,
        stats=stats,
        backend=backend,
        hub=hub,
        relay=relay,
        registry=registry,
        outbox=outbox,
        metrics=prometheus_registry(monitor.instance),
        monitor=monitor,
    )


def services_of(app: Any) -> Services:
    """The services of a Flask app that has a `Realtime` extension (KeyError if it has none)."""
    return app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]
