"""Every connection's file descriptor is freed when the connection ends, however it ends: closed by
the client or the server, dropped without a close frame, refused at the handshake, on the built-in
callback routes (whose sockets outlive their request greenlet) and on a user's handler routes.
Counted in the server's /proc/<pid>/fd (Linux)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import websocket

from tests.clients import connect, recv_type, send_json, wait_for
from tests.harness import ServerProcess
from tests.rawws import RawClient

ROUNDS = 8


def open_fds(proc: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{proc.proc.pid}/fd"))


def freed_after(proc: ServerProcess, ways: list[Callable[[], None]]) -> None:
    """ROUNDS times each way to end a connection: the server ends with the descriptors it had."""
    before = open_fds(proc)
    for _ in range(ROUNDS):
        for way in ways:
            way()
    # Closing is asynchronous for the server (it reads the EOF or the close frame's echo later).
    try:
        wait_for(lambda: open_fds(proc) <= before, what="descriptors back to where they were")
    except AssertionError:
        pytest.fail(f"{open_fds(proc) - before} descriptors left open after {ROUNDS * len(ways)} connections")


@pytest.fixture(scope="module")
def app_server() -> Iterator[ServerProcess]:
    proc = ServerProcess({"WSAPP_APP": "tests.apps.ext_app:app", "WSAPP_RATE_LIMIT": "0"})
    yield proc
    proc.stop()


pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/<pid>/fd")


def test_built_in_routes_free_every_socket(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server(WSAPP_RATE_LIMIT="0")

    def relay_closed_by_client() -> None:
        ws = connect(srv.ws("/"))
        ws.close()

    def relay_dropped() -> None:
        ws = connect(srv.ws("/"))
        ws.sock.close()  # no close frame: the server reads EOF

    def rooms_closed_by_client() -> None:
        ws = connect(srv.ws("/ws"))
        recv_type(ws, "welcome")
        send_json(ws, type="join", room="lobby")
        recv_type(ws, "joined")
        ws.close()

    def closed_by_server() -> None:
        client = RawClient(srv.ws("/"))
        client.send(0x3, b"")  # a reserved opcode: the server closes with 1002
        assert client.recv_until_close().close_code == 1002
        client.close()

    def refused() -> None:
        client = RawClient(srv.ws("/ws"), upgrade=False)
        assert client.handshake({"Origin": "http://evil.example"}) == 403
        client.close()

    freed_after(srv, [relay_closed_by_client, relay_dropped, rooms_closed_by_client, closed_by_server, refused])


def test_handler_routes_free_every_socket(app_server: ServerProcess) -> None:
    def closed_by_client() -> None:
        ws = connect(app_server.ws("/shout"), cookie="user=ann")
        ws.send("hi")
        assert ws.recv() == "HI"
        ws.close()

    def handler_returns() -> None:
        ws = connect(app_server.ws("/open"))
        assert ws.recv().startswith("anonymous")
        opcode, data = ws.recv_data(control_frame=True)  # the server closes once the handler returns
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1000
        ws.shutdown()

    def handler_raises() -> None:
        ws = connect(app_server.ws("/fail"), cookie="user=ann")
        ws.send("x")
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1011
        ws.shutdown()

    def refused() -> None:
        client = RawClient(app_server.ws("/shout"), upgrade=False)
        assert client.handshake({}) == 401
        client.close()

    freed_after(app_server, [closed_by_client, handler_returns, handler_raises, refused])
