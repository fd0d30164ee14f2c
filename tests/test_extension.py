"""wsapp as a Flask extension, through its public API only: a user's app (tests/apps/ext_app.py) with
its own HTTP and WebSocket routes and hooks, served by `python server.py` with WSAPP_APP."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import websocket

from tests.clients import connect, get_json, recv_json, recv_type, send_json, wait_for
from tests.harness import ServerProcess
from tests.rawws import RawClient

RawFactory = Callable[..., RawClient]


@pytest.fixture(scope="module")
def app_server() -> Iterator[ServerProcess]:
    proc = ServerProcess({"WSAPP_APP": "tests.apps.ext_app:app", "WSAPP_RATE_LIMIT": "0"})
    yield proc
    proc.stop()


def as_user(url: str, user: str, **kw: object) -> websocket.WebSocket:
    return connect(url, cookie=f"user={user}", **kw)  # type: ignore[arg-type]


def joined(ws: websocket.WebSocket, room: str, **join: object) -> int:
    """Skip `welcome`, join `room` on /ws; the room's seq from `joined`."""
    recv_type(ws, "welcome")
    send_json(ws, type="join", room=room, **join)
    return recv_type(ws, "joined")["seq"]  # type: ignore[no-any-return]


def post_json(url: str, body: object) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, resp.read()


def test_own_http_route_and_rooms_protocol_on_one_port(app_server: ServerProcess) -> None:
    with urllib.request.urlopen(app_server.http("/hello"), timeout=5) as resp:
        assert resp.read() == b"hi"
    ws = as_user(app_server.ws("/ws"), "alice")
    try:
        welcome = recv_json(ws)
        assert welcome["type"] == "welcome" and welcome["name"] == "alice"  # the identity names the member
    finally:
        ws.close()


def test_own_websocket_route_with_a_room(app_server: ServerProcess) -> None:
    ws = as_user(app_server.ws("/shout"), "alice")
    member = as_user(app_server.ws("/ws"), "bob")
    try:
        ws.send("hello")
        assert ws.recv() == "HELLO"
        ws.send_binary(b"abc")
        assert ws.recv() == b"cba"  # binary stays binary
        joined(member, "shouts")
        send_json(member, type="publish", room="shouts", data={"text": "to the shouters"})
        # /shout joined "shouts": the room's presence and messages reach it as rooms-protocol frames.
        assert json.loads(ws.recv()) == {"type": "presence", "room": "shouts", "event": "join", "who": "bob"}
        got = json.loads(ws.recv())
        assert got["type"] == "message" and got["data"] == {"text": "to the shouters", "checked_by": "ext_app"}
        assert got["from"] == "bob"
    finally:
        ws.close()
        member.close()


def test_ws_join_with_since_and_epoch_through_the_public_api(app_server: ServerProcess) -> None:
    """ws.join(room, since, epoch=...) resumes like /ws's join: a replay after `since` in the same
    epoch, `history_gone` (carrying the room's epoch) for another epoch; it returns the seq and epoch."""
    room = "user:carol"
    publisher = as_user(app_server.ws("/ws"), "carol")
    clients = [publisher]

    def resume(line: str) -> tuple[list[dict[str, object]], dict[str, object]]:
        """Frames before the handler's answer (which it sends once ws.join has returned), and the answer."""
        ws = as_user(app_server.ws("/resume"), "carol")
        clients.append(ws)
        ws.send(line)
        frames: list[dict[str, object]] = []
        while True:
            frame = json.loads(ws.recv())
            if frame.get("api") == "joined":
                return frames, frame
            frames.append(frame)

    try:
        base = joined(publisher, room)
        for n in range(5):
            send_json(publisher, type="publish", room=room, data={"text": str(n)}, id=n)
            ack = recv_type(publisher, "ack")
            assert ack["seq"] == base + n + 1
        # The epoch from a plain join through the API, then a resume in it: the messages after since.
        frames, answer = resume(room)
        assert frames == [] and answer["int"] == answer["seq"] == base + 5 and answer["history_gone"] is False
        assert answer["members"] == ["carol", "carol"]
        epoch = answer["epoch"]
        assert isinstance(epoch, str) and epoch
        frames, answer = resume(f"{room} {base + 2} {epoch}")
        assert [f["seq"] for f in frames] == [base + 3, base + 4, base + 5]
        assert all(f["type"] == "message" and f["room"] == room for f in frames)
        assert (answer["seq"], answer["epoch"], answer["history_gone"]) == (base + 5, epoch, False)
        # Another epoch (the room's history belonged to another life): history_gone, nothing replayed.
        frames, answer = resume(f"{room} {base + 2} 0123abcd")
        assert frames == [{"type": "error", "code": "history_gone", "room": room, "epoch": epoch,
                           "message": "not every message after 'since' is kept"}]
        assert (answer["epoch"], answer["history_gone"]) == (epoch, True)
        # `since` alone keeps the by-number resume of older callers.
        frames, answer = resume(f"{room} {base + 4}")
        assert [f["seq"] for f in frames] == [base + 5] and answer["history_gone"] is False
        # And the joined connection is live: the next message reaches it once, after the answer.
        live = clients[-1]
        send_json(publisher, type="publish", room=room, data={"text": "live"})
        got = json.loads(live.recv())
        assert got["type"] == "message" and got["seq"] == base + 6
    finally:
        for ws in clients:
            ws.close()


def test_authenticate_refuses_before_the_101(app_server: ServerProcess, raw: RawFactory) -> None:
    missing = raw(app_server.ws("/shout"))
    assert missing.status == 401 and missing.response_body == b"log in first\n"
    assert raw(app_server.ws("/ws")).status == 401  # the rooms protocol asks the same hook
    assert raw(app_server.ws("/shout"), {"Cookie": "user=banned"}).status == 403
    assert raw(app_server.ws("/shout"), {"Cookie": "user=alice"}).status == 101
    # A route that opts out of authentication is reached anonymously.
    for query, via in (("", "-"), ("?via=q", "q")):
        anon = connect(app_server.ws("/open" + query))
        try:
            assert anon.recv() == f"anonymous None {via}"
        finally:
            anon.close()
    assert raw(app_server.ws("/nowhere"), {"Cookie": "user=alice"}).status == 404


def test_url_arguments_subprotocols_identity_and_receive_timeout(app_server: ServerProcess) -> None:
    ws = as_user(app_server.ws("/about/t1?name=Al"), "alice", subprotocols=["v1", "v2", "bearer.abc"])
    try:
        # The route's preference wins among what the client offered; a token entry is never chosen.
        assert ws.getsubprotocol() == "v2"
        assert ws.recv() == "t1 v2 alice 127.0.0.1 alice"  # ?name= cannot rename an authenticated client
        assert ws.recv() == "timeout"
        ws.send("after")
        assert ws.recv() == "after"
    finally:
        ws.close()
    plain = as_user(app_server.ws("/about/t2"), "carol")
    try:
        assert plain.getsubprotocol() is None
        assert plain.recv() == "t2 None carol 127.0.0.1 carol"
    finally:
        plain.close()


def test_a_slow_handler_loses_nothing(app_server: ServerProcess) -> None:
    ws = as_user(app_server.ws("/count"), "alice", timeout=20)
    try:
        n = 3000
        for i in range(n):
            ws.send(str(i))
        ws.send("end")
        assert ws.recv() == str(n)
    finally:
        ws.close()


def test_authorize_answers_forbidden(app_server: ServerProcess) -> None:
    ws = as_user(app_server.ws("/ws"), "alice")
    try:
        recv_type(ws, "welcome")
        send_json(ws, type="join", room="user:bob")
        err = recv_json(ws)
        assert err["type"] == "error" and err["code"] == "forbidden"
        send_json(ws, type="join", room="announcements")
        recv_type(ws, "joined")
        send_json(ws, type="publish", room="announcements", data={"text": "hi"}, id="p1")
        err = recv_json(ws)
        assert (err["type"], err["code"], err["id"]) == ("error", "forbidden", "p1")
        send_json(ws, type="join", room="user:alice")
        assert recv_json(ws)["type"] == "joined"
    finally:
        ws.close()


def test_on_publish_rejects_and_transforms(app_server: ServerProcess) -> None:
    a, b = as_user(app_server.ws("/ws"), "alice"), as_user(app_server.ws("/ws"), "bob")
    try:
        for ws in (a, b):
            joined(ws, "lobby")
        send_json(a, type="publish", room="lobby", data="not an object", id=1)
        assert recv_type(a, "error") == {"type": "error", "code": "bad_message", "message": "data must be an object",
                                         "id": 1}
        send_json(a, type="publish", room="lobby", data={"text": "spam"}, id=2)
        assert recv_type(a, "error")["code"] == "spam"
        send_json(a, type="publish", room="lobby", data={"text": "fine"}, id=3)
        ack = recv_type(a, "ack")
        got = recv_type(b, "message")
        assert got["data"] == {"text": "fine", "checked_by": "ext_app"} and got["seq"] == ack["seq"]
    finally:
        a.close()
        b.close()


def test_ws_publish_goes_through_the_hooks(app_server: ServerProcess) -> None:
    member = as_user(app_server.ws("/ws"), "bob")
    speaker = as_user(app_server.ws("/speak"), "dave")
    try:
        seq = joined(member, "lobby")
        speaker.send("lobby hello")
        assert speaker.recv() == str(seq + 1)
        got = recv_type(member, "message")
        assert (got["from"], got["data"]) == ("dave", {"text": "hello", "checked_by": "ext_app"})
        speaker.send("user:bob sneaky")
        assert speaker.recv() == "error forbidden"
        speaker.send("lobby spam")
        assert speaker.recv() == "error spam"
    finally:
        member.close()
        speaker.close()


def test_publish_from_a_view_and_from_a_greenlet(app_server: ServerProcess) -> None:
    rooms_member = as_user(app_server.ws("/ws"), "erin")
    try:
        recv_type(rooms_member, "welcome")
        send_json(rooms_member, type="join", room="user:erin")
        answer = recv_type(rooms_member, "joined")
        seq, epoch = answer["seq"], answer["epoch"]
        status, body = post_json(app_server.http("/notify/erin"), {"text": "you have mail"})
        # rt.publish's seq serialises as a plain int, and carries the epoch the member was told.
        assert status == 200 and json.loads(body) == {"seq": seq + 1, "epoch": epoch}
        got = recv_type(rooms_member, "message")
        assert (got["seq"], got["from"], got["data"]) == (seq + 1, "server", {"text": "you have mail"})
        assert post_json(app_server.http("/later/user:erin"), {"n": 2})[0] == 202
        got = recv_type(rooms_member, "message")
        assert (got["seq"], got["from"], got["data"]) == (seq + 2, "job", {"n": 2})
        # Kept in history: a later join with `since` replays both.
        again = as_user(app_server.ws("/ws"), "erin")
        try:
            assert joined(again, "user:erin", since=seq) == seq + 2
            assert [recv_json(again)["seq"] for _ in range(2)] == [seq + 1, seq + 2]
        finally:
            again.close()
    finally:
        rooms_member.close()


def test_handler_errors_close_with_their_codes_and_others_carry_on(app_server: ServerProcess,
                                                                   raw: RawFactory) -> None:
    rejected = raw(app_server.ws("/fail"), {"Cookie": "user=alice"})
    rejected.send(0x1, b"reject")
    close = rejected.recv_until_close()
    assert (close.close_code, close.close_reason) == (1008, "rejected by the handler")
    crashed = raw(app_server.ws("/fail"), {"Cookie": "user=alice"})
    crashed.send(0x1, b"crash")
    assert crashed.recv_until_close().close_code == 1011
    ws = as_user(app_server.ws("/shout"), "alice")
    try:
        ws.send("still")
        assert ws.recv() == "STILL"
    finally:
        ws.close()
    assert "conn" in app_server.log_text() and "RuntimeError: boom" in app_server.log_text()


def test_own_routes_keep_the_frame_limits_heartbeat_and_drain(make_server: Callable[..., ServerProcess],
                                                               raw: RawFactory) -> None:
    srv = make_server(WSAPP_APP="tests.apps.ext_app:app", WSAPP_MAX_MESSAGE_BYTES="1000",
                      WSAPP_PING_INTERVAL="0.2", WSAPP_PING_TIMEOUT="0.6", WSAPP_MAX_CONNECTIONS_PER_IP="3")
    cookie = {"Cookie": "user=alice"}
    big = raw(srv.ws("/shout"), cookie)
    big.send(0x1, b"x" * 1001)
    assert big.recv_until_close().close_code == 1009
    silent = raw(srv.ws("/shout"), cookie)
    assert silent.recv_frame().opcode == 0x9  # pinged while the handler waits in `for message in ws`
    close = silent.recv_until_close()
    assert (close.close_code, close.close_reason) == (1001, "ping timeout")
    live = [as_user(srv.ws("/shout"), "alice") for _ in range(3)]
    try:
        assert raw(srv.ws("/shout"), cookie).status == 429  # the per-IP limit holds for own routes
        srv.terminate()
        for ws in live:
            opcode, data = ws.recv_data(control_frame=True)
            while opcode != 0x8:  # pings and the others' presence may come first
                opcode, data = ws.recv_data(control_frame=True)
            assert (opcode, int.from_bytes(data[:2], "big")) == (0x8, 1001)
        assert srv.wait(10) == 0
    finally:
        for ws in live:
            ws.shutdown()


def test_rooms_path_can_be_turned_off_and_endpoints_mounted_one_by_one(make_server: Callable[..., ServerProcess],
                                                                      raw: RawFactory) -> None:
    srv = make_server(WSAPP_APP="tests.apps.mounts_app:create")
    assert raw(srv.ws("/ws")).status == 404  # rooms_path=None
    probe = raw(srv.ws("/live"))
    assert probe.status == 101
    probe.close()
    a, b = connect(srv.ws("/live")), connect(srv.ws("/live"))
    try:
        wait_for(lambda: get_json(srv.http("/ops/stats"))[1]["relay_clients"] == 2, what="2 relay clients")
        a.send("relayed")
        assert b.recv() == "relayed"
    finally:
        a.close()
        b.close()
    status, body = get_json(srv.http("/ops/healthz"))
    assert status == 200 and body["status"] == "ok"
