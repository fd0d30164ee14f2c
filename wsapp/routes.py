"""The built-in HTTP endpoints as blueprints: the chat page, and health, stats and metrics.

`Realtime.mount_page()` and `Realtime.mount_ops()` register them on any app; the bundled server
(`wsapp.app.create_app`) mounts both.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wsapp.services import services_of


def _static_dir() -> Path:
    """The browser client: inside the package when installed from a wheel, else the repository's `static/`."""
    here = Path(__file__).resolve().parent
    packaged = here / "static"
    return packaged if packaged.is_dir() else here.parent / "static"


STATIC_DIR = _static_dir()

# The page loads only its own files and talks only to its own host; message text is never HTML.
PAGE_CSP = "default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"


@cache
def _page_html(static_url: str) -> bytes:
    """index.html with its asset links pointing at `static_url` (the file itself says `/static/`)."""
    html = (STATIC_DIR / "index.html").read_bytes()
    return html.replace(b'"/static/', b'"' + static_url.rstrip("/").encode() + b"/")


def page_blueprint(path: str = "/", static_url: str = "/static") -> Blueprint:
    """The browser chat client at `path`, its files under `static_url`."""
    bp = Blueprint("wsapp_page", __name__)

    @bp.get(path, endpoint="page")
    def page() -> Response:
        response = Response(_page_html(static_url), content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @bp.get(static_url.rstrip("/") + "/<path:filename>", endpoint="static")
    def static(filename: str) -> Response:
        return send_from_directory(STATIC_DIR, filename)

    return bp


def ops_blueprint() -> Blueprint:
    """`/healthz` (broker state), `/livez`, `/readyz`, `/stats`, `/metrics`."""
    bp = Blueprint("wsapp_ops", __name__)

    @bp.get("/healthz")
    def healthz() -> tuple[Response, int]:
        services = services_of(current_app)
        healthy = services.backend.healthy
        body = {
            "status": "ok" if healthy else "degraded",
            "broker": services.backend.name,
            "broker_healthy": healthy,
            "connections": services.stats.connections,
        }
        return jsonify(body), 200 if healthy else 503

    @bp.get("/livez")
    def livez() -> Response:
        """The process serves HTTP (what a supervisor restarts on)."""
        return jsonify({"status": "ok"})

    @bp.get("/readyz")
    def readyz() -> tuple[Response, int]:
        """Takes new connections: not draining and under WSAPP_MAX_CONNECTIONS (what a load balancer routes on)."""
        services = services_of(current_app)
        registry = services.registry
        if registry.draining:
            return jsonify({"status": "draining"}), 503
        if len(registry) >= services.settings.max_connections:
            return jsonify({"status": "full", "connections": len(registry)}), 503
        return jsonify({"status": "ok", "connections": len(registry)}), 200

    @bp.get("/stats")
    def stats() -> Response:
        """This worker's figures at the top level (as before there were workers), the whole instance's
        under `instance` (the same as the worker's when it is alone)."""
        services = services_of(current_app)
        body = services.stats.snapshot(
            rooms=services.hub.room_count,
            relay_clients=len(services.relay),
            broker_healthy=services.backend.healthy,
            **services.backend.counters,
            # With several workers, this says which one answered.
            pid=os.getpid(),
        )
        body["bytes_out"] += services.registry.bytes_out()
        instance = services.monitor.instance()
        body["instance"] = {
            **instance["counters"],
            **instance["gauges"],
            "broker_healthy": bool(instance["gauges"].get("broker_healthy", 1.0)),
            "workers": instance["workers"],
        }
        return jsonify(body)

    @bp.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(services_of(current_app).metrics), content_type=CONTENT_TYPE_LATEST)

    return bp
