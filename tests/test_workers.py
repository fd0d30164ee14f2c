"""Several processes on one machine: gunicorn's arbiter with wsapp.gunicorn.Worker, sharing rooms and the
relay through Redis; started by `python server.py` (WEB_CONCURRENCY) or by the gunicorn command."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

import pytest
import websocket

from tests.clients import connect, get_json, recv_json, recv_type, send_json, wait_for
from tests.harness import ROOT, ServerProcess
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.redis

WORKERS = 2
MAX_CLIENTS = 64
_WORKER_RE = re.compile(r"listening on http://\S+ \(broker: \w+, worker pid (\d+)\)")
GUNICORN = [sys.executable, "-m", "gunicorn", "-k", "wsapp.gunicorn.Worker", "--bind", "127.0.0.1:0",
            "--no-control-socket"]


def worker_pids(srv: ServerProcess) -> set[int]:
    """Every worker that has logged its "listening on" line so far."""
    return {int(pid) for pid in _WORKER_RE.findall(srv.log_text())}


def new_workers(srv: ServerProcess, count: int, besides: Collection[int] = (), timeout: float = 10.0) -> set[int]:
    """Wait until `count` workers other than `besides` are listening; their pids."""

    def listening() -> set[int]:
        pids = worker_pids(srv) - set(besides)
        return pids if len(pids) >= count else set()

    return wait_for(listening, timeout, f"{count} new workers listening")  # type: ignore[no-any-return]




def open_on_every_worker(srv: ServerProcess, path: str, opened: list[websocket.WebSocket],
                         workers: int = WORKERS) -> list[tuple[websocket.WebSocket, int]]:
    """Open clients until each of `workers` workers holds one; each client with its worker's pid.

    The kernel hands a connection to whichever worker accepts first, and /stats answers from one worker at a
    time. Connection counts only grow, so once the last count seen from each worker adds up to the clients
    opened, all are current, and the one worker whose count grew holds the newest client.
    """
    placed: list[tuple[websocket.WebSocket, int]] = []
    latest: dict[int, int] = {}  # worker pid -> its connections, as /stats last said

    def counted() -> bool:
        _, body = get_json(srv.http("/stats"))
        latest[body["pid"]] = body["connections"]
        return sum(latest.values()) == len(placed) + 1

    # Every worker is woken for a new connection and the first to run takes it; on a small machine the
    # scheduler can favour one worker for a long streak while this client runs on the same core (seen
    # once: 32 in a row). The client moves to the next core after each connection, which breaks that.
    cores = sorted(os.sched_getaffinity(0))
    try:
        while len({pid for _, pid in placed}) < workers:
            assert len(placed) < MAX_CLIENTS, f"all connections went to too few workers: {latest}"
            os.sched_setaffinity(0, {cores[len(placed) % len(cores)]})
            before = dict(latest)
            ws = connect(srv.ws(path))
            opened.append(ws)
            wait_for(counted, what=f"{len(placed) + 1} connections over the workers")
            (pid,) = [pid for pid, count in latest.items() if count != before.get(pid, 0)]
            placed.append((ws, pid))
    finally:
        os.sched_setaffinity(0, cores)
    return placed


def close_code(ws: websocket.WebSocket, max_frames: int = 20) -> int:
    """The code of the close frame the server sends next, skipping what comes before it (bounded)."""
    for _ in range(max_frames):
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int(struct.unpack("!H", data[:2])[0])
    raise AssertionError(f"no close frame within {max_frames} frames")


def test_server_py_workers_share_the_relay_and_drain_on_sigterm(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess],
    opened: list[websocket.WebSocket],
) -> None:
    broker = make_redis()  # private: relay messages reach every process on a Redis
    srv = make_server(REDIS_URL=broker.url, WEB_CONCURRENCY=str(WORKERS), WSAPP_RATE_LIMIT="0",
                      WSAPP_DRAIN_SECONDS="5")
    workers = new_workers(srv, WORKERS)  # the harness returns at the first worker's line
    placed = open_on_every_worker(srv, "/", opened)
    assert {pid for _, pid in placed} == workers and srv.proc.pid not in workers  # the arbiter serves nothing
    clients = [ws for ws, _ in placed]
    for i, ws in enumerate(clients):
        ws.send(f"from {i}")
    for i, ws in enumerate(clients):
        got = sorted(ws.recv() for _ in range(len(clients) - 1))
        assert got == sorted(f"from {j}" for j in range(len(clients)) if j != i), f"client {i}"

    srv.terminate()
    assert [close_code(ws) for ws in clients] == [1001] * len(clients)
    assert srv.wait(15) == 0
    log_text = srv.log_text()
    assert len(re.findall(r"draining \d+ connections", log_text)) == WORKERS, log_text
    assert "Shutting down: Master" in log_text, log_text


def test_a_killed_worker_is_replaced_and_serving_within_5s(
    redis_server: RedisServer, make_server: Callable[..., ServerProcess]
) -> None:
    srv = make_server(REDIS_URL=redis_server.url, WEB_CONCURRENCY=str(WORKERS))
    workers = new_workers(srv, WORKERS)
    doomed = min(workers)
    os.kill(doomed, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    (replacement,) = new_workers(srv, 1, besides=workers, timeout=5.0)
    # Serving: the new worker answers HTTP (the kernel spreads the requests over both workers)...
    wait_for(lambda: get_json(srv.http("/stats"))[1]["pid"] == replacement,
             max(0.0, deadline - time.monotonic()), "the new worker answering /stats")
    assert f"Worker (pid:{doomed}) was sent SIGKILL" in srv.log_text()
    # ...and the instance takes WebSocket connections.
    ws = connect(srv.ws("/echo"))
    try:
        ws.send("still here")
        assert ws.recv() == "still here"
    finally:
        ws.close()
    srv.terminate()
    assert srv.wait(15) == 0


HUP_APP = '''
from wsapp.app import create_app

VERSION = {version!r}


def make():
    app = create_app()
    app.add_url_rule("/version", "version", lambda: VERSION)
    return app
'''


def version(srv: ServerProcess) -> tuple[str, int]:
    with urllib.request.urlopen(srv.http("/version"), timeout=5) as resp:
        return resp.read().decode(), get_json(srv.http("/stats"))[1]["pid"]


def test_sighup_brings_new_code_and_old_connections_drain_with_1001(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess],
    opened: list[websocket.WebSocket], tmp_path: Path,
) -> None:
    app_file = tmp_path / "hupapp.py"
    app_file.write_text(HUP_APP.format(version="v1"))
    broker = make_redis()
    # No bytecode cache: the rewritten module may have the same size and mtime second as the old one.
    srv = make_server(REDIS_URL=broker.url, WEB_CONCURRENCY=str(WORKERS), WSAPP_APP="hupapp:make",
                      PYTHONPATH=str(tmp_path), PYTHONDONTWRITEBYTECODE="1", WSAPP_DRAIN_SECONDS="5")
    old = new_workers(srv, WORKERS)
    assert version(srv)[0] == "v1"
    placed = open_on_every_worker(srv, "/", opened)
    a, b = placed[0][0], placed[-1][0]  # on different old workers
    a.send("before the reload")
    assert b.recv() == "before the reload"

    app_file.write_text(HUP_APP.format(version="v2"))
    os.kill(srv.proc.pid, signal.SIGHUP)
    # The old workers drain: their connections end with a close frame, not a cut.
    assert [close_code(ws) for ws in opened] == [1001] * len(opened)
    new = new_workers(srv, WORKERS, besides=old)
    wait_for(lambda: all(f"Worker exiting (pid: {pid})" in srv.log_text() for pid in old),
             10, "the old workers exiting")
    for _ in range(4):  # only the new workers are left, with the new code
        text, pid = version(srv)
        assert text == "v2" and pid in new
    fresh = connect(srv.ws("/echo"))
    opened.append(fresh)
    fresh.send("after the reload")
    assert fresh.recv() == "after the reload"
    assert srv.proc.poll() is None
    srv.terminate()
    assert srv.wait(15) == 0


def test_the_gunicorn_command_delivers_rooms_across_workers_and_drains(
    redis_server: RedisServer, opened: list[websocket.WebSocket]
) -> None:
    srv = ServerProcess({"REDIS_URL": redis_server.url}, cmd=[*GUNICORN, "-w", str(WORKERS), "wsapp.app:create_app()"])
    try:
        new_workers(srv, WORKERS)
        placed = open_on_every_worker(srv, "/ws", opened)
        for ws, _ in placed:
            assert recv_json(ws)["type"] == "welcome"
        (alice, alice_pid), (bob, bob_pid) = placed[0], next(p for p in placed if p[1] != placed[0][1])
        assert alice_pid != bob_pid
        room = "gunicorn-" + uuid.uuid4().hex[:12]
        for ws in (alice, bob):
            send_json(ws, type="join", room=room)
            recv_type(ws, "joined")
        send_json(alice, type="publish", room=room, data={"text": "across workers"}, id="m1")
        msg = recv_type(bob, "message")
        assert (msg["room"], msg["seq"], msg["data"]) == (room, 1, {"text": "across workers"})

        srv.terminate()
        assert close_code(alice) == 1001 and close_code(bob) == 1001
        assert srv.wait(15) == 0
        # The arbiter imports the worker class before gevent patches anything: it must pull in nothing that
        # keeps unpatched names (the workers would warn, and block where they should yield).
        assert "MonkeyPatchWarning" not in srv.log_text(), srv.log_text()
    finally:
        srv.stop()


def test_max_requests_drains_the_worker_and_a_new_one_serves(opened: list[websocket.WebSocket]) -> None:
    srv = ServerProcess(cmd=[*GUNICORN, "-w", "1", "--max-requests", "3", "wsapp.app:create_app()"])
    try:
        (first,) = new_workers(srv, 1)
        ws = connect(srv.ws("/echo"))  # request 1
        opened.append(ws)
        ws.send("held")
        assert ws.recv() == "held"
        assert get_json(srv.http("/stats"))[1]["pid"] == first  # request 2
        assert get_json(srv.http("/healthz"))[0] == 200  # request 3: the worker drains
        assert close_code(ws) == 1001
        (second,) = new_workers(srv, 1, besides={first})
        assert wait_for(lambda: get_json(srv.http("/stats"))[1]["pid"] == second, what="the new worker")
    finally:
        srv.stop()


def test_the_gunicorn_command_refuses_an_app_without_wsapp(tmp_path: Path) -> None:
    (tmp_path / "plainapp.py").write_text("from flask import Flask\n\napp = Flask(__name__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSAPP_")}
    done = subprocess.run([*GUNICORN, "--pythonpath", str(tmp_path), "plainapp:app"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "plainapp:app is not a Flask app with a wsapp.Realtime extension" in done.stderr, done.stderr


@pytest.mark.parametrize("source, message", [
    ("from flask import Flask\n\napp = Flask(__name__)\n", "is not a Flask app with a wsapp.Realtime extension"),
    ("raise RuntimeError('no database')\n", "cannot load the app"),
])
def test_an_app_that_cannot_load_stops_gunicorn_with_json_lines_only(tmp_path: Path, source: str,
                                                                      message: str) -> None:
    # LOG_FORMAT=json promises nothing but JSON on stdout/stderr: gunicorn's own path print()s the error.
    (tmp_path / "badapp.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSAPP_")} | {"LOG_FORMAT": "json"}
    done = subprocess.run([*GUNICORN, "--logger-class", "wsapp.logs.GunicornLogger", "--pythonpath", str(tmp_path),
                           "badapp:app"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    records = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [r for r in records if r["level"] in ("ERROR", "CRITICAL") and message in r["message"]]
    assert errors, records
    if "cannot load" in message:
        assert "RuntimeError: no database" in errors[0]["exc_info"], errors[0]


def test_workers_without_redis_run_one_process_and_say_why(make_server: Callable[..., ServerProcess]) -> None:
    # Heroku sets WEB_CONCURRENCY by itself: without a broker that must not stop the app.
    srv = make_server(WEB_CONCURRENCY="2")
    assert "WEB_CONCURRENCY=2 needs REDIS_URL" in srv.log_text()
    assert "worker" not in srv.log_text().split("listening on", 1)[1].splitlines()[0]
    a, b = connect(srv.ws("/")), connect(srv.ws("/"))
    try:
        wait_for(lambda: get_json(srv.http("/stats"))[1]["relay_clients"] == 2, what="2 relay clients")
        a.send("one process")
        assert b.recv() == "one process"  # both in the same process: nothing split
    finally:
        a.close()
        b.close()
    srv.terminate()
    assert srv.wait(10) == 0


def test_gunicorn_with_tls_serves_the_relay_and_rooms_encrypted(tmp_path: Path) -> None:
    """gunicorn --certfile: every frame goes through TLS, the write-through and queued paths and the
    writer greenlet for a message larger than the socket buffer alike (frames written to the OS socket
    under the TLS layer would break the client's TLS stream)."""
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import selfsigned
    finally:
        sys.path.pop(0)
    cert, key = selfsigned.make_pair(["localhost", "127.0.0.1"], 1)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    srv = ServerProcess(cmd=[*GUNICORN, "-w", "1", "--certfile", str(tmp_path / "tls.crt"),
                             "--keyfile", str(tmp_path / "tls.key"), "wsapp.app:create_app()"])
    sslopt = {"ca_certs": str(tmp_path / "tls.crt")}
    url = f"wss://127.0.0.1:{srv.port}"
    clients: list[websocket.WebSocket] = []
    try:
        assert "listening on https://" in srv.log_text()
        a, b = (websocket.create_connection(url + "/", sslopt=sslopt, timeout=5,
                                            origin=f"http://127.0.0.1:{srv.port}") for _ in range(2))
        clients += [a, b]
        a.send("over tls")
        assert b.recv() == "over tls"
        big = os.urandom(1000_000)  # more than one send takes, under WSAPP_MAX_MESSAGE_BYTES: the writer greenlet
        b.send_binary(big)
        assert a.recv() == big
        c = websocket.create_connection(url + "/ws", sslopt=sslopt, timeout=5, origin=f"http://127.0.0.1:{srv.port}")
        clients.append(c)
        assert recv_type(c, "welcome")["type"] == "welcome"
    finally:
        for ws in clients:
            ws.close()
        srv.stop()
