"""What an operator sees (issue 14): JSON logs with one line per HTTP request and per WebSocket close,
Prometheus metrics (histograms, labels, process figures, one instance across gunicorn workers), and
/livez and /readyz while the server drains or is full."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import connect, get_json, recv_type, wait_for
from tests.harness import ServerProcess
from tests.rawws import RawClient
from tests.redis_fixture import RedisServer
from tests.test_workers import new_workers, open_on_every_worker

SECRET = "ops-test-secret-that-is-long-enough-for-hs256"
BODY = "BODY-7f3a-never-logged"
QUERY_SECRET = "QUERY-SECRET-9b1c"
SUBPROTOCOL_SECRET = "SUBPROTO-SECRET-44e2"


def json_lines(srv: ServerProcess) -> list[dict[str, Any]]:
    """Every line the server wrote to stdout or stderr, each parsed as one JSON object."""
    out = []
    for line in srv.stdout + srv.log:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        out.append(record)
    return out


def events(srv: ServerProcess, kind: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in srv.log if f'"event":"{kind}"' in line]


def test_json_logs_one_line_per_request_and_per_close_and_no_secrets() -> None:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    srv = ServerProcess({"LOG_FORMAT": "json", "WSAPP_JWT_SECRET": SECRET, "WSAPP_TRUSTED_PROXY_HOPS": "1",
                         "WSAPP_DRAIN_SECONDS": "5"}, capture_stdout=True)
    try:
        # HTTP: the client address behind one trusted proxy, the path without its query string.
        req = urllib.request.Request(srv.http(f"/livez?token={QUERY_SECRET}"),
                                     headers={"X-Forwarded-For": "198.51.100.9, 203.0.113.7"})
        assert urllib.request.urlopen(req, timeout=5).status == 200
        # Refused upgrades: no token, and a bad one in the subprotocol.
        with pytest.raises(websocket.WebSocketBadStatusException):
            connect(srv.ws("/ws"))
        with pytest.raises(websocket.WebSocketBadStatusException):
            connect(srv.ws("/ws"), subprotocols=["wsapp", f"bearer.{SUBPROTOCOL_SECRET}"])
        # A client that closes with its own code after two messages.
        ws = connect(srv.ws(f"/ws?token={token}"), subprotocols=["wsapp"], header=["X-Forwarded-For: 203.0.113.7"])
        recv_type(ws, "welcome")
        join = json.dumps({"type": "join", "room": "ops"})
        publish = json.dumps({"type": "publish", "room": "ops", "data": {"text": BODY}, "id": 1})
        ws.send(join)
        recv_type(ws, "joined")
        ws.send(publish)
        recv_type(ws, "ack")
        ws.close(status=4001)
        # The server closes one: binary on /ws is 1003.
        bad = connect(srv.ws(f"/ws?token={token}"), subprotocols=["wsapp"])
        bad.send_binary(b"\x00\x01")
        # A request gevent's WSGI server itself refuses (its error line goes through the logs too).
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"NOT-HTTP\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        # And the drain closes the last one.
        relay = connect(srv.ws("/"))
        wait_for(lambda: len(events(srv, "ws_close")) == 2 and len(events(srv, "ws_open")) == 3,
                 what="two closes, three opens")
        srv.terminate()
        assert srv.wait(15) == 0
        relay.close()
        bad.close()
    finally:
        srv.stop()

    records = json_lines(srv)  # every line is JSON, stdout included
    assert srv.stdout == []
    text = "".join(srv.stdout + srv.log)
    for secret in (token, QUERY_SECRET, SUBPROTOCOL_SECRET, BODY):
        assert secret not in text, secret

    http = [r for r in records if r.get("event") == "http"]
    livez = next(r for r in http if r["path"] == "/livez")
    assert livez["method"] == "GET" and livez["status"] == 200 and livez["client"] == "203.0.113.7"
    assert livez["logger"] == "wsapp.access" and livez["level"] == "INFO" and livez["duration_ms"] >= 0
    refused = [r for r in http if r["path"] == "/ws"]
    assert [(r["status"], r["refused"]) for r in refused] == [(401, "token"), (401, "token")]
    assert all(r["client"] == "127.0.0.1" for r in refused)  # no X-Forwarded-For: the peer itself

    closes = {r["path"] + ":" + str(r["code"]): r for r in records if r.get("event") == "ws_close"}
    assert sorted(closes) == ["/:1001", "/ws:1003", "/ws:4001"], closes
    client_close = closes["/ws:4001"]
    assert client_close["closed_by"] == "client" and client_close["reason"] == "client"
    assert client_close["identity"] == "alice" and client_close["client"] == "203.0.113.7"
    assert client_close["messages_in"] == 2 and client_close["bytes_in"] == len(join) + len(publish)
    assert client_close["messages_out"] == 3  # welcome, joined, ack (the close frame is not a message)
    assert client_close["bytes_out"] > 0 and client_close["duration_s"] >= 0
    assert re.fullmatch(r"[0-9a-f]{12}", client_close["conn"])
    server_close = closes["/ws:1003"]
    assert (server_close["closed_by"], server_close["reason"], server_close["messages_in"]) == (
        "server", "protocol_error", 1)
    drained = closes["/:1001"]
    assert (drained["closed_by"], drained["reason"], drained["identity"]) == ("server", "drain", None)


def scrape(srv: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics, by sample name then by its labels."""
    with urllib.request.urlopen(srv.http("/metrics"), timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: dict[str, dict[Any, float]], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_histograms_move_with_traffic_with_labels_and_process_figures(
    make_server: Callable[..., ServerProcess],
) -> None:
    srv = make_server(WSAPP_RATE_LIMIT="0")
    before = scrape(srv)
    a, b = connect(srv.ws("/")), connect(srv.ws("/"))
    wait_for(lambda: get_json(srv.http("/stats"))[1]["relay_clients"] == 2, what="two relay clients")
    sizes = [10, 100, 1000, 5000, 20000]
    for size in sizes:
        a.send("x" * size)
        assert len(b.recv()) == size
    a.close()
    b.close()
    rooms = connect(srv.ws("/ws"), subprotocols=["wsapp"])
    rooms.send("not json")
    assert recv_type(rooms, "error")["code"] == "bad_json"
    rooms.close()
    with pytest.raises(websocket.WebSocketBadStatusException):
        connect(srv.ws("/"), origin="https://evil.example")
    wait_for(lambda: get_json(srv.http("/stats"))[1]["connections"] == 0, what="every client gone")
    after = wait_for(lambda: (s := scrape(srv)) and value(s, "wsapp_loop_lag_seconds_count") > 0 and s,
                     what="the loop-lag timer")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("wsapp_fanout_seconds_count") >= len(sizes)
    assert delta("wsapp_fanout_seconds_sum") > 0
    assert delta("wsapp_fanout_seconds_bucket", le="+Inf") == delta("wsapp_fanout_seconds_count")
    assert delta("wsapp_message_size_bytes_count") == len(sizes) + 1
    assert delta("wsapp_message_size_bytes_sum") == sum(sizes) + len("not json")
    assert delta("wsapp_message_size_bytes_bucket", le="1024.0") == 4  # 10, 100, 1000 and "not json"
    assert delta("wsapp_connection_duration_seconds_count") == 3
    assert delta("wsapp_closes_total", code="1000", by="client", reason="client") == 3
    assert delta("wsapp_refusals_total", status="403", reason="origin") == 1
    assert delta("wsapp_ws_errors_total", code="bad_json") == 1
    assert delta("wsapp_messages_in_total") == len(sizes) + 1
    assert delta("wsapp_bytes_out_total") > sum(sizes)
    assert delta("wsapp_http_requests_total") >= 3
    assert value(after, "wsapp_workers") == 1 and value(after, "wsapp_connections") == 0
    assert value(after, "process_resident_memory_bytes") > 10 * 2**20
    assert value(after, "process_open_fds") >= 3 and value(after, "process_max_fds") > 0
    assert value(after, "process_cpu_seconds_total") > 0
    # Existing names kept.
    for name in ("wsapp_connections_total", "wsapp_refused_total", "wsapp_slow_consumer_kicks_total",
                 "wsapp_rooms", "wsapp_relay_clients", "wsapp_broker_healthy", "wsapp_uptime_seconds"):
        assert name in after, name


def test_readyz_says_full_and_draining_while_livez_stays_ok(
    make_server: Callable[..., ServerProcess], raw: Callable[..., RawClient]
) -> None:
    srv = make_server(WSAPP_MAX_CONNECTIONS="1", WSAPP_DRAIN_SECONDS="10")
    assert get_json(srv.http("/readyz")) == (200, {"status": "ok", "connections": 0})
    # A client that never answers the close frame keeps the drain going.
    client = raw(srv.ws("/"))
    wait_for(lambda: get_json(srv.http("/readyz"))[0] == 503, what="/readyz at the limit")
    assert get_json(srv.http("/readyz")) == (503, {"status": "full", "connections": 1})
    assert get_json(srv.http("/livez")) == (200, {"status": "ok"})
    kept = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)  # a load balancer's kept-alive probe
    try:
        kept.request("GET", "/livez")
        assert kept.getresponse().read()
        srv.terminate()
        wait_for(lambda: "draining 1 connections" in srv.log_text(), what="the drain")
        kept.request("GET", "/readyz")
        resp = kept.getresponse()
        assert (resp.status, json.loads(resp.read())) == (503, {"status": "draining"})
        kept.request("GET", "/livez")
        resp = kept.getresponse()
        assert (resp.status, json.loads(resp.read())) == (200, {"status": "ok"})
    finally:
        kept.close()
    client.close()
    assert srv.wait(10) == 0


@pytest.mark.redis
def test_one_scrape_shows_the_whole_instance_across_two_workers(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess],
    opened: list[websocket.WebSocket],
) -> None:
    broker = make_redis()
    srv = make_server(REDIS_URL=broker.url, WEB_CONCURRENCY="2", WSAPP_RATE_LIMIT="0", LOG_FORMAT="json")
    workers = new_workers(srv, 2)
    share_dir = Path(re.search(r'workers share their figures in ([^\s"]+)', srv.log_text()).group(1))  # type: ignore[union-attr]
    placed = open_on_every_worker(srv, "/", opened)
    total = len(placed)
    for ws, _pid in placed:
        ws.send("hello")
    for ws, _pid in placed:
        for _ in range(total - 1):
            ws.recv()

    def instance_ok(samples: dict[str, Any], connections: int, messages: int) -> bool:
        return (value(samples, "wsapp_workers") == 2 and value(samples, "wsapp_connections") == connections
                and value(samples, "wsapp_messages_in_total") == messages)

    # Each scrape is answered by one worker; each one shows both, the other's as of its last snapshot
    # (written about once a second): once both have written theirs after the traffic, every scrape agrees.
    settled = time.time()

    def snapshots_after(t: float, pids: set[int]) -> bool:
        files = [share_dir / f"{pid}.json" for pid in pids]
        return all(f.exists() and json.loads(f.read_bytes())["time"] > t for f in files)

    wait_for(lambda: snapshots_after(settled, workers), timeout=5, what="both workers' snapshots after the traffic")
    for _ in range(6):
        samples = scrape(srv)
        assert instance_ok(samples, total, total), {k: samples[k] for k in ("wsapp_workers", "wsapp_connections")}
        assert value(samples, "process_resident_memory_bytes") > 2 * 10 * 2**20  # two workers' memory
    per_worker = {}
    for _ in range(20):
        _, body = get_json(srv.http("/stats"))
        per_worker[body["pid"]] = body["connections"]
        assert body["instance"]["connections"] == total and body["instance"]["workers"] == 2
        assert body["instance"]["messages_in"] == total and body["connections"] < total
    assert set(per_worker) <= workers
    assert {f.stem for f in share_dir.glob("*.json")} == {str(pid) for pid in workers}  # one file per worker

    # A killed worker's counters stay in the instance's figures; its connections do not.
    doomed = placed[0][1]
    survivors = sum(1 for _, pid in placed if pid != doomed)
    os.kill(doomed, signal.SIGKILL)
    (replacement,) = new_workers(srv, 1, besides=workers)
    settled = time.time()
    wait_for(lambda: snapshots_after(settled, workers - {doomed} | {replacement}), timeout=5,
             what="both workers' snapshots after the kill")
    for _ in range(4):
        samples = scrape(srv)
        assert instance_ok(samples, survivors, total), {k: samples[k] for k in ("wsapp_workers", "wsapp_connections")}
    assert not (share_dir / f"{doomed}.json").exists()

    srv.terminate()
    assert srv.wait(15) == 0
    assert not share_dir.exists()  # the arbiter made it and removed it
    records = json_lines(srv)  # gunicorn's own lines too, arbiter and workers
    assert any(r["logger"] == "gunicorn.error" and "Booting worker" in r["message"] for r in records)
