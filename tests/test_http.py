"""Plain HTTP routes, start-up configuration errors, and what a refused upgrade looks like."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Callable

import pytest

from tests.clients import connect, get_json, wait_for
from tests.harness import ROOT, ServerProcess
from tests.rawws import RawClient


def test_healthz(server: ServerProcess) -> None:
    status, body = get_json(server.http("/healthz"))
    assert status == 200
    assert body["status"] == "ok" and body["broker"] == "memory" and body["broker_healthy"] is True


def test_stats_count_connections_and_messages(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server()
    assert get_json(srv.http("/stats"))[1]["connections"] == 0
    a, b = connect(srv.ws("/")), connect(srv.ws("/"))
    try:
        wait_for(lambda: get_json(srv.http("/stats"))[1]["connections"] == 2, what="2 connections")
        a.send("one")
        assert b.recv() == "one"
        stats = get_json(srv.http("/stats"))[1]
        assert stats["messages_in"] == 1 and stats["messages_out"] == 1
        assert stats["connections_total"] == 2 and stats["relay_clients"] == 2
        assert stats["uptime_seconds"] > 0
        with urllib.request.urlopen(srv.http("/metrics"), timeout=5) as resp:
            text = resp.read().decode()
        assert "wsapp_messages_in_total 1.0" in text
        assert "wsapp_connections 2.0" in text
    finally:
        a.close()
        b.close()


def test_page_is_served_at_root(server: ServerProcess) -> None:
    with urllib.request.urlopen(server.http("/"), timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        page = resp.read().decode()
    assert "<script" in page and "/static/app.js" in page
    with urllib.request.urlopen(server.http("/static/app.js"), timeout=5) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "abc"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"WSAPP_MAX_MESSAGE_BYTES": "lots"}, "WSAPP_MAX_MESSAGE_BYTES"),
        ({"WSAPP_PING_INTERVAL": "-1"}, "WSAPP_PING_INTERVAL"),
        ({"WSAPP_ALLOWED_ORIGINS": "example.com"}, "WSAPP_ALLOWED_ORIGINS"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
    ],
)
def test_bad_setting_stops_startup_naming_the_variable(env: dict[str, str], variable: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py")], env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_websocket_path_is_refused_before_the_upgrade(
    server: ServerProcess, raw: Callable[..., RawClient]
) -> None:
    client = raw(server.ws("/nowhere"))
    assert client.status == 404
    assert b"no WebSocket endpoint" in client.response_body


def test_plain_get_on_websocket_only_path_is_not_found(server: ServerProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.http("/ws"), timeout=5)
    assert err.value.code in (400, 404)
    err.value.close()


def test_livez_and_readyz(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server(WSAPP_MAX_CONNECTIONS="1")
    assert get_json(srv.http("/livez")) == (200, {"status": "ok"})
    assert get_json(srv.http("/readyz")) == (200, {"status": "ok", "connections": 0})
    ws = connect(srv.ws("/echo"))
    try:
        wait_for(lambda: get_json(srv.http("/readyz"))[0] == 503, what="readyz to say full")
        assert get_json(srv.http("/readyz"))[1] == {"status": "full", "connections": 1}
        assert get_json(srv.http("/livez"))[0] == 200  # full is not dead
    finally:
        ws.close()
    wait_for(lambda: get_json(srv.http("/readyz"))[0] == 200, what="readyz to recover")
