"""WEB_CONCURRENCY: one `server.py` forks workers that share a listening socket, rooms and the relay through Redis."""

from __future__ import annotations

import os
import re
import signal
import struct
from collections.abc import Callable

import pytest

from tests.clients import connect, get_json, wait_for
from tests.harness import ServerProcess
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.redis

WORKERS = 2
MAX_CLIENTS = 32


def test_workers_share_the_relay_and_stop_together(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess]
) -> None:
    broker = make_redis()  # private: relay messages reach every process on a Redis
    srv = make_server(REDIS_URL=broker.url, WEB_CONCURRENCY=str(WORKERS), WSAPP_RATE_LIMIT="0",
                      WSAPP_DRAIN_SECONDS="5")
    # The harness returns at the first worker's "listening on" line; the others follow.
    wait_for(lambda: srv.log_text().count("listening on") == WORKERS, what="every worker listening")
    clients = []
    latest: dict[int, int] = {}  # worker pid -> its relay clients, as last reported by /stats

    def counted() -> bool:
        _, body = get_json(srv.http("/stats"))
        latest[body["pid"]] = body["relay_clients"]
        return len(latest) == WORKERS and sum(latest.values()) == len(clients)

    try:
        # The kernel hands each connection to whichever worker accepts first: open clients until /stats
        # shows every worker holding some (counts only grow, so the sum is right only when all are fresh).
        while len(clients) < 4 or min(latest.values(), default=0) == 0:
            assert len(clients) < MAX_CLIENTS, f"all connections went to one worker: {latest}"
            clients.append(connect(srv.ws("/")))
            wait_for(counted, what=f"{len(clients)} relay clients over {WORKERS} workers")
        assert set(latest) != {srv.proc.pid}  # the parent serves nothing itself
        for i, ws in enumerate(clients):
            ws.send(f"from {i}")
        for i, ws in enumerate(clients):
            got = sorted(ws.recv() for _ in range(len(clients) - 1))
            assert got == sorted(f"from {j}" for j in range(len(clients)) if j != i), f"client {i}"

        srv.terminate()
        for ws in clients:
            opcode, data = ws.recv_data()
            assert (opcode, struct.unpack("!H", data[:2])[0]) == (0x8, 1001)
        assert srv.wait(10) == 0
        log_text = srv.log_text()
        assert log_text.count("draining") == WORKERS and "all workers stopped" in log_text, log_text
    finally:
        for ws in clients:
            ws.close()
            ws.shutdown()  # close() returns early on a connection the server already closed


def test_a_dead_worker_is_logged_and_the_others_serve_on(
    redis_server: RedisServer, make_server: Callable[..., ServerProcess]
) -> None:
    srv = make_server(REDIS_URL=redis_server.url, WEB_CONCURRENCY=str(WORKERS))
    wait_for(lambda: srv.log_text().count("listening on") == WORKERS, what="every worker listening")
    match = re.search(r"started \d+ workers on port \d+: pids ([\d ]+)", srv.log_text())
    assert match, srv.log_text()
    doomed, *others = map(int, match.group(1).split())
    os.kill(doomed, signal.SIGKILL)
    wait_for(lambda: "died" in srv.log_text(), what="the parent noticing")
    assert f"worker 1 (pid {doomed}) died (signal SIGKILL); {WORKERS - 1} still running" in srv.log_text()
    # The accept queue is shared: nothing waits for the dead worker.
    assert {get_json(srv.http("/stats"))[1]["pid"] for _ in range(5)} <= set(others)
    srv.terminate()
    assert srv.wait(10) == 1  # the survivors drained, but the group reports the death


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
