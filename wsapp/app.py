"""The application factory: builds the collaborators from Settings and hands them to the routes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Flask
from prometheus_client.registry import CollectorRegistry

from wsapp.backends import HistoryBackend
from wsapp.backends.memory import MemoryBackend
from wsapp.config import Settings
from wsapp.connection import Outbox
from wsapp.frames import OP_TEXT, encode_frame
from wsapp.hub import Hub
from wsapp.metrics import Stats, prometheus_registry
from wsapp.registry import Registry
from wsapp.relay import RelayGroup

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


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


def _text_frame(payload: bytes) -> bytes:
    return encode_frame(OP_TEXT, payload)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app and its services; `settings` defaults to `Settings.from_env()`."""
    settings = settings or Settings.from_env()
    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    stats = Stats()
    backend: HistoryBackend
    if settings.redis_url:
        from wsapp.backends.redis import RedisBackend

        backend = RedisBackend(settings.redis_url, settings.history)
    else:
        backend = MemoryBackend(settings.history)
    hub = Hub(backend, _text_frame, stats, settings.max_rooms)
    relay = RelayGroup(settings, stats, backend)
    registry = Registry(settings, stats)

    def gauges() -> dict[str, float]:
        return {"rooms": hub.room_count, "relay_clients": len(relay), "broker_healthy": float(backend.healthy)}

    app.extensions["wsapp"] = Services(
        settings=settings,
        stats=stats,
        backend=backend,
        hub=hub,
        relay=relay,
        registry=registry,
        outbox=Outbox(),
        metrics=prometheus_registry(stats, gauges),
    )
    from wsapp.routes import bp

    app.register_blueprint(bp)
    return app


def services_of(app: Flask) -> Services:
    return app.extensions["wsapp"]  # type: ignore[no-any-return]
