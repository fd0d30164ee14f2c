"""`/`: drop-in for the Node `ws` broadcast server (DESIGN.md section 1)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import websocket

from tests.clients import BINARY, TEXT, connect, get_json, wait_for
from tests.harness import ServerProcess
from tests.rawws import RawClient, client_frame


@pytest.fixture
def trio(relay_server: ServerProcess) -> Iterator[list[websocket.WebSocket]]:
    clients = [connect(relay_server.ws("/")) for _ in range(3)]
    wait_for(lambda: get_json(relay_server.http("/stats"))[1]["relay_clients"] == 3, what="3 relay clients")
    yield clients
    for ws in clients:
        ws.close()
    wait_for(lambda: get_json(relay_server.http("/stats"))[1]["relay_clients"] == 0, what="relay empty")


MESSAGES = [
    (TEXT, b"Hello, WebSocket server!"),
    (TEXT, "héllo wörld ✓ 你好 🎉".encode()),
    (TEXT, b""),
    (BINARY, b""),
    (BINARY, bytes(range(256))),
    (BINARY, os.urandom(64 * 1024)),
    (TEXT, ("x" * 65536).encode()),
]


@pytest.mark.parametrize(("opcode", "payload"), MESSAGES, ids=lambda v: str(v)[:20])
def test_message_reaches_every_other_client_same_type_and_bytes(
    trio: list[websocket.WebSocket], opcode: int, payload: bytes
) -> None:
    a, b, c = trio
    a.send(payload, opcode=opcode)
    assert b.recv_data() == (opcode, payload)
    assert c.recv_data() == (opcode, payload)
    # The sender gets nothing back: the next thing it hears is a marker b sends after receiving.
    b.send("marker from b")
    assert a.recv_data() == (TEXT, b"marker from b")
    assert c.recv_data() == (TEXT, b"marker from b")


def test_order_is_kept_per_sender(trio: list[websocket.WebSocket]) -> None:
    a, b, c = trio
    for i in range(200):
        a.send(f"m{i}")
    for receiver in (b, c):
        assert [receiver.recv() for _ in range(200)] == [f"m{i}" for i in range(200)]


def test_disconnected_client_is_dropped_and_the_rest_keep_working(
    relay_server: ServerProcess, trio: list[websocket.WebSocket]
) -> None:
    a, b, c = trio
    c.close()
    wait_for(lambda: get_json(relay_server.http("/stats"))[1]["relay_clients"] == 2, what="c dropped")
    before = get_json(relay_server.http("/stats"))[1]["messages_out"]
    a.send("after c left")
    assert b.recv() == "after c left"
    b.send("reply")
    assert a.recv() == "reply"
    # Exactly one delivery each: nothing queued for the departed client.
    assert get_json(relay_server.http("/stats"))[1]["messages_out"] == before + 2


def test_abruptly_dropped_tcp_is_cleaned_up(relay_server: ServerProcess, trio: list[websocket.WebSocket]) -> None:
    a, b, c = trio
    c.sock.close()  # no close frame, just gone
    wait_for(lambda: get_json(relay_server.http("/stats"))[1]["relay_clients"] == 2, what="c dropped")
    a.send("still here")
    assert b.recv() == "still here"


def test_client_close_handshake_echoes_code(relay_server: ServerProcess) -> None:
    ws = connect(relay_server.ws("/"))
    ws.send_close(4001, b"bye")
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 4001
    ws.shutdown()


@pytest.mark.parametrize("apart", ["", "frames", "head"], ids=["same-write", "second-segment", "head-in-two"])
def test_frames_right_behind_the_handshake_are_served(relay_server: ServerProcess, apart: str) -> None:
    """A client that sends its first frames right behind the upgrade request loses none of them:
    in the same write they come with the request (the one-look reader of wsapp/upgrade_request.py
    keeps them, or pywsgi's buffer when the head came in pieces, as with `head`); in a second segment
    they may be there or still in the kernel, which the connection reads."""
    listener = connect(relay_server.ws("/"))
    wait_for(lambda: get_json(relay_server.http("/stats"))[1]["relay_clients"] == 1, what="listener")
    eager = RawClient(relay_server.ws("/"), upgrade=False)
    try:
        behind = client_frame(0x1, b"first") + client_frame(0x2, b"second") + client_frame(0x9, b"hb")
        assert eager.handshake({}, then=behind, then_apart=apart == "frames", head_apart=apart == "head") == 101
        assert listener.recv() == "first"
        assert listener.recv() == b"second"
        pong = eager.recv_until_pong()
        assert pong.payload == b"hb"
        eager.send(0x1, b"third")  # and it is read on from there
        assert listener.recv() == "third"
    finally:
        eager.close()
        listener.close()


def test_a_quiet_connection_is_read_again_when_it_speaks(relay_server: ServerProcess) -> None:
    """Idle sockets wait on the event loop without a greenlet; each wake-up reads and relays, over
    and over, from several clients in turn."""
    clients = [connect(relay_server.ws("/")) for _ in range(3)]
    try:
        wait_for(lambda: get_json(relay_server.http("/stats"))[1]["relay_clients"] == 3, what="3 relay clients")
        for round_ in range(5):
            for i, sender in enumerate(clients):
                sender.send(f"{round_}:{i}")
                for other in clients:
                    if other is not sender:
                        assert other.recv() == f"{round_}:{i}"
    finally:
        for c in clients:
            c.close()
