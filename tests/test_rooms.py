"""`/ws`: the JSON rooms protocol (DESIGN.md section 3) against the real server."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import websocket

from tests.clients import connect, recv_json, recv_type, send_json
from tests.harness import ServerProcess
from tests.rawws import RawClient


def room() -> str:
    return "r-" + uuid.uuid4().hex[:12]


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Callable[..., websocket.WebSocket]]:
    opened: list[websocket.WebSocket] = []

    def open_client(name: str = "", srv: ServerProcess | None = None) -> websocket.WebSocket:
        ws = connect((srv or server).ws(f"/ws?name={name}" if name else "/ws"))
        welcome = recv_json(ws)
        assert welcome["type"] == "welcome"
        ws.welcome = welcome  # type: ignore[attr-defined]
        opened.append(ws)
        return ws

    yield open_client
    for ws in opened:
        ws.close()


def join(ws: websocket.WebSocket, name: str, **extra: object) -> dict:
    send_json(ws, type="join", room=name, **extra)
    return recv_type(ws, "joined")


def assert_still_usable(ws: websocket.WebSocket) -> None:
    send_json(ws, type="ping", id="alive")
    assert recv_json(ws) == {"type": "pong", "id": "alive"}


def test_welcome_carries_name_id_and_limits(client: Callable[..., websocket.WebSocket]) -> None:
    alice = client("alice")
    assert alice.welcome["name"] == "alice"
    assert len(alice.welcome["id"]) >= 8
    assert alice.welcome["limits"]["max_message_bytes"] == 1024 * 1024
    anonymous = client("x" * 40)  # too long: a generated name instead
    assert anonymous.welcome["name"].startswith("guest-")


def test_join_publish_ack_presence_leave(client: Callable[..., websocket.WebSocket]) -> None:
    r = room()
    alice, bob = client("alice"), client("bob")
    first = join(alice, r)
    assert isinstance(first.pop("epoch"), str)
    assert first == {"type": "joined", "room": r, "seq": 0, "members": ["alice"]}
    joined = join(bob, r)
    assert sorted(joined["members"]) == ["alice", "bob"]
    assert recv_json(alice) == {"type": "presence", "room": r, "event": "join", "who": "bob"}

    send_json(bob, type="publish", room=r, data={"text": "hi", "n": [1, 2]}, id="m1")
    # The ack says which numbering its seq belongs to: the room's epoch, as `joined` gave it.
    assert recv_json(bob) == {"type": "ack", "id": "m1", "room": r, "seq": 1, "epoch": joined["epoch"]}
    msg = recv_json(alice)
    assert msg["type"] == "message" and msg["room"] == r and msg["seq"] == 1 and msg["from"] == "bob"
    assert msg["data"] == {"text": "hi", "n": [1, 2]}
    assert isinstance(msg["ts"], int)

    send_json(alice, type="publish", room=r, data="two", id=7)
    assert recv_json(alice) == {"type": "ack", "id": 7, "room": r, "seq": 2, "epoch": joined["epoch"]}
    assert recv_json(bob)["seq"] == 2

    send_json(bob, type="leave", room=r)
    assert recv_json(bob) == {"type": "left", "room": r}
    assert recv_json(alice) == {"type": "presence", "room": r, "event": "leave", "who": "bob"}
    # Bob no longer hears the room; his next frame is the pong, not alice's message.
    send_json(alice, type="publish", room=r, data="after", id="m3")
    assert recv_json(alice)["type"] == "ack"
    assert_still_usable(bob)


def test_sender_does_not_get_its_own_message_unless_echo(client: Callable[..., websocket.WebSocket]) -> None:
    r = room()
    quiet, loud = client("quiet"), client("loud")
    join(quiet, r)
    join(loud, r, echo=True)
    recv_json(quiet)  # presence of loud
    send_json(quiet, type="publish", room=r, data=1)
    assert recv_json(loud)["data"] == 1
    assert_still_usable(quiet)  # nothing of its own arrived before the pong
    send_json(loud, type="publish", room=r, data=2)
    assert recv_json(loud)["data"] == 2
    assert recv_json(quiet)["data"] == 2


def test_messages_never_leak_across_rooms(client: Callable[..., websocket.WebSocket]) -> None:
    r1, r2 = room(), room()
    a, b, c = client("a"), client("b"), client("c")
    join(a, r1)
    join(b, r1)
    join(c, r2)
    recv_json(a)  # presence of b
    send_json(a, type="publish", room=r1, data="for r1")
    assert recv_json(b)["data"] == "for r1"
    assert_still_usable(c)
    send_json(a, type="publish", room=r2, data="not a member", id="x")
    assert recv_json(a)["code"] == "not_in_room"


def test_history_replay_with_since(client: Callable[..., websocket.WebSocket]) -> None:
    r = room()
    writer = client("writer")
    join(writer, r)
    for i in range(5):
        send_json(writer, type="publish", room=r, data=i, id=i)
        assert recv_json(writer)["seq"] == i + 1
    late = client("late")
    joined = join(late, r, since=2)
    assert joined["seq"] == 5
    replay = [recv_json(late) for _ in range(3)]
    assert [(m["seq"], m["data"]) for m in replay] == [(3, 2), (4, 3), (5, 4)]
    assert all(m["type"] == "message" and m["from"] == "writer" for m in replay)
    assert_still_usable(late)
    # since = current seq: nothing to replay.
    fresh = client("fresh")
    join(fresh, r, since=5)
    assert_still_usable(fresh)


def test_history_gone_when_since_is_older_than_what_is_kept(
    make_server: Callable[..., ServerProcess], client: Callable[..., websocket.WebSocket]
) -> None:
    srv = make_server(WSAPP_HISTORY="3")
    r = room()
    writer = client("writer", srv=srv)
    join(writer, r)
    for i in range(6):
        send_json(writer, type="publish", room=r, data=i, id=i)
        recv_json(writer)
    late = client("late", srv=srv)
    join(late, r, since=1)
    gone = recv_json(late)
    assert gone["type"] == "error" and gone["code"] == "history_gone" and gone["room"] == r
    assert [recv_json(late)["seq"] for _ in range(3)] == [4, 5, 6]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_message"),
        ('{"room": "lobby"}', "bad_message"),
        ('{"type": 5}', "bad_message"),
        ('{"type": "publish", "data": 1}', "bad_message"),
        ('{"type": "publish", "room": "lobby"}', "bad_message"),
        ('{"type": "join", "room": "lobby", "since": -1}', "bad_message"),
        ('{"type": "join", "room": "lobby", "echo": "yes"}', "bad_message"),
        ('{"type": "dance", "id": "d1"}', "unknown_type"),
        ('{"type": "join", "room": "has space"}', "bad_room"),
        ('{"type": "join", "room": ""}', "bad_room"),
        ('{"type": "join", "room": "' + "x" * 65 + '"}', "bad_room"),
        ('{"type": "publish", "room": "never-joined", "data": 1, "id": "p1"}', "not_in_room"),
        ('{"type": "leave", "room": "never-joined"}', "not_in_room"),
        ('{"type": "publish", "room": "deep", "data": ' + "[" * 40 + "]" * 40 + "}", "bad_message"),
    ],
)
def test_bad_messages_get_an_error_and_the_connection_stays_usable(
    client: Callable[..., websocket.WebSocket], raw: str, code: str
) -> None:
    ws = client("tester")
    ws.send(raw)
    err = recv_json(ws)
    assert err["type"] == "error" and err["code"] == code, err
    assert err["message"]
    if '"id"' in raw and code != "bad_message":
        assert "id" in err
    assert_still_usable(ws)


def test_rate_limited_then_policy_close(
    make_server: Callable[..., ServerProcess], raw: Callable[..., RawClient]
) -> None:
    srv = make_server(WSAPP_RATE_LIMIT="1", WSAPP_RATE_BURST="3")
    flood = raw(srv.ws("/ws?name=flood"))
    assert flood.status == 101
    codes = []
    for i in range(10):
        flood.send(0x1, f'{{"type": "ping", "id": {i}}}'.encode())
    while True:
        frame = flood.recv_frame()
        if frame.opcode == 0x8:
            break
        codes.append(frame.payload)
    kinds = [c for c in codes if b'"pong"' in c]
    limited = [c for c in codes if b"rate_limited" in c]
    assert len(kinds) == 3, codes  # the burst
    assert limited, codes
    assert frame.close_code == 1008


def test_too_many_rooms(make_server: Callable[..., ServerProcess], client: Callable[..., websocket.WebSocket]) -> None:
    srv = make_server(WSAPP_MAX_ROOMS="2")
    ws = client("joiner", srv=srv)
    join(ws, room())
    join(ws, room())
    send_json(ws, type="join", room=room())
    assert recv_json(ws)["code"] == "too_many_rooms"
    assert_still_usable(ws)


def test_binary_frame_on_rooms_endpoint_is_unsupported_data(
    server: ServerProcess, raw: Callable[..., RawClient]
) -> None:
    ws = raw(server.ws("/ws"))
    assert ws.recv_frame().opcode == 0x1  # welcome
    ws.send(0x2, b"\x00\x01")
    assert ws.recv_until_close().close_code == 1003


def test_disconnect_cleans_up_presence(client: Callable[..., websocket.WebSocket]) -> None:
    r = room()
    stay, go = client("stay"), client("go")
    join(stay, r)
    join(go, r)
    recv_json(stay)
    go.sock.close()  # abrupt
    assert recv_json(stay) == {"type": "presence", "room": r, "event": "leave", "who": "go"}
