"""HTTP and WebSocket routes. `/` has two rules: the relay (websocket=True) and the page."""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wsapp.app import STATIC_DIR
from wsapp.connection import Connection
from wsapp.relay import serve_echo
from wsapp.rooms import RoomsSession, display_name
from wsapp.services import services_of

bp = Blueprint("wsapp", __name__)


def _connection() -> Connection:
    return request.environ["wsapp.connection"]  # type: ignore[no-any-return]


@bp.route("/", websocket=True)
def relay_socket() -> Response:
    services_of(current_app).relay.serve(_connection())
    return Response(status=101)


@bp.route("/ws", websocket=True)
def rooms_socket() -> Response:
    services = services_of(current_app)
    conn = _connection()
    identity = request.environ.get("wsapp.identity")
    conn.name = display_name(request.args.get("name") or (identity.sub if identity else None))
    if identity is not None:
        conn.expires_at = identity.expires
    RoomsSession(conn, services.hub, services.settings, services.stats, identity).run()
    return Response(status=101)


@bp.route("/echo", websocket=True)
def echo_socket() -> Response:
    services = services_of(current_app)
    serve_echo(_connection(), services.settings, services.stats)
    return Response(status=101)


# The page loads only its own files and talks only to its own host; message text is never HTML.
PAGE_CSP = "default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"


@bp.get("/")
def page() -> Response:
    response = send_from_directory(STATIC_DIR, "index.html")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


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


@bp.get("/stats")
def stats() -> Response:
    services = services_of(current_app)
    return jsonify(
        services.stats.snapshot(
            rooms=services.hub.room_count,
            relay_clients=len(services.relay),
            broker_healthy=services.backend.healthy,
            # Figures are per process: with WEB_CONCURRENCY workers, this says which one answered.
            pid=os.getpid(),
        )
    )


@bp.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(services_of(current_app).metrics), content_type=CONTENT_TYPE_LATEST)
