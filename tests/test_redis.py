"""Scale-out (DESIGN.md section 5): two real wsapp processes share rooms through a real redis-server."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websocket

from tests.clients import BINARY, TEXT, connect, get_json, recv_json, recv_type, send_json, wait_for
from tests.harness import ServerProcess, server_pair
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.redis

HISTORY = 3
Client = Callable[[ServerProcess, str], websocket.WebSocket]


def room() -> str:
    return "x-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Servers A and B on one Redis, shared by the tests that leave Redis alone."""
    env = {"REDIS_URL": redis_server.url, "WSAPP_HISTORY": str(HISTORY), "WSAPP_RATE_LIMIT": "0"}
    with server_pair(env) as both:
        yield both


@pytest.fixture
def client(rooms_clients: Client) -> Client:
    return rooms_clients


def join(ws: websocket.WebSocket, name: str, **extra: object) -> dict[str, Any]:
    send_json(ws, type="join", room=name, **extra)
    return recv_type(ws, "joined")


def assert_nothing_pending(ws: websocket.WebSocket) -> None:
    """A ping's pong is the next frame: nothing else was queued for this client before it."""
    send_json(ws, type="ping", id="quiet")
    assert recv_json(ws) == {"type": "pong", "id": "quiet"}


def health(srv: ServerProcess) -> tuple[int, dict[str, Any]]:
    return get_json(srv.http("/healthz"))


def test_publish_presence_and_members_cross_processes(
    pair: tuple[ServerProcess, ServerProcess], client: Client
) -> None:
    a, b = pair
    for srv in pair:
        status, body = health(srv)
        assert (status, body["status"], body["broker"], body["broker_healthy"]) == (200, "ok", "redis", True)
    r = room()
    alice, bob = client(a, "alice"), client(b, "bob")
    first = join(alice, r)
    epoch = first.pop("epoch")
    assert isinstance(epoch, str)
    assert first == {"type": "joined", "room": r, "seq": 0, "members": ["alice"]}
    assert sorted(join(bob, r)["members"]) == ["alice", "bob"]
    assert recv_json(alice) == {"type": "presence", "room": r, "event": "join", "who": "bob"}

    send_json(alice, type="publish", room=r, data={"text": "hi"}, id="m1")
    assert recv_json(alice) == {"type": "ack", "id": "m1", "room": r, "seq": 1, "epoch": epoch}
    msg = recv_json(bob)
    assert (msg["type"], msg["seq"], msg["from"], msg["data"]) == ("message", 1, "alice", {"text": "hi"})
    send_json(bob, type="publish", room=r, data="back", id="m2")
    assert recv_json(bob)["seq"] == 2
    assert recv_json(alice)["data"] == "back"

    carol = client(a, "carol")
    assert sorted(join(carol, r)["members"]) == ["alice", "bob", "carol"]
    for ws in (alice, bob):
        assert recv_json(ws) == {"type": "presence", "room": r, "event": "join", "who": "carol"}
    bob.sock.close()  # abrupt: the leave still reaches the other process
    for ws in (alice, carol):
        assert recv_json(ws) == {"type": "presence", "room": r, "event": "leave", "who": "bob"}
    dave = client(b, "dave")
    assert sorted(join(dave, r)["members"]) == ["alice", "carol", "dave"]


def test_history_replay_through_the_other_process(
    pair: tuple[ServerProcess, ServerProcess], client: Client
) -> None:
    a, b = pair
    r = room()
    writer = client(a, "writer")
    join(writer, r)
    for i in range(5):
        send_json(writer, type="publish", room=r, data=i, id=i)
        assert recv_json(writer)["seq"] == i + 1
    late = client(b, "late")
    assert join(late, r, since=3)["seq"] == 5
    assert [(m["seq"], m["data"], m["from"]) for m in (recv_json(late), recv_json(late))] == [
        (4, 3, "writer"),
        (5, 4, "writer"),
    ]
    assert_nothing_pending(late)
    # Only the last HISTORY messages are kept: an older `since` is told so, then gets what is kept.
    older = client(b, "older")
    join(older, r, since=1)
    gone = recv_json(older)
    assert (gone["type"], gone["code"], gone["room"]) == ("error", "history_gone", r)
    assert [recv_json(older)["seq"] for _ in range(HISTORY)] == [3, 4, 5]
    current = client(b, "current")
    join(current, r, since=5)
    assert_nothing_pending(current)


def test_sequence_numbers_stay_monotonic_when_both_publish_and_echoes_arrive_once(
    pair: tuple[ServerProcess, ServerProcess], client: Client
) -> None:
    a, b = pair
    r = room()
    count = 40
    total = 2 * count + 1
    alice, bob = client(a, "alice"), client(b, "bob")
    listeners = [client(a, "la"), client(b, "lb")]
    loud = client(a, "loud")  # asks for its own messages
    for ws in (alice, bob, *listeners):
        join(ws, r)
    join(loud, r, echo=True)
    # Both publish at once, without waiting for acks; `loud` adds one of its own.
    for i in range(count):
        send_json(alice, type="publish", room=r, data=["alice", i], id=i)
        send_json(bob, type="publish", room=r, data=["bob", i], id=i)
    send_json(loud, type="publish", room=r, data=["loud", 0], id=0)

    def drain(ws: websocket.WebSocket, messages: int, acks: int) -> tuple[list[dict], list[int]]:
        got: list[dict] = []
        acked: list[int] = []
        while len(got) < messages or len(acked) < acks:
            msg = recv_json(ws)
            if msg["type"] == "message":
                got.append(msg)
            elif msg["type"] == "ack":
                acked.append(msg["seq"])
        assert_nothing_pending(ws)  # nothing more, in particular no second copy of anything
        return got, acked

    a_got, a_acks = drain(alice, count + 1, count)
    b_got, b_acks = drain(bob, count + 1, count)
    loud_got, loud_acks = drain(loud, total, 1)
    for acks in (a_acks, b_acks):
        assert acks == sorted(acks) and len(set(acks)) == count
    assert sorted(a_acks + b_acks + loud_acks) == list(range(1, total + 1))
    assert {m["data"][0] for m in a_got} == {"bob", "loud"}
    assert {m["data"][0] for m in b_got} == {"alice", "loud"}
    for got in (*(drain(ws, total, 0)[0] for ws in listeners), loud_got):
        assert sorted(m["seq"] for m in got) == list(range(1, total + 1))
        for sender in ("alice", "bob"):
            # One sender's messages arrive in the order it sent them, with rising numbers.
            mine = [m for m in got if m["data"][0] == sender]
            assert [m["data"][1] for m in mine] == list(range(count))
            assert [m["seq"] for m in mine] == sorted(m["seq"] for m in mine)
    # `loud` got its own message once, from its own process, though Redis sent it back too.
    assert [m["data"] for m in loud_got].count(["loud", 0]) == 1


def test_broker_loss_keeps_local_rooms_and_recovers(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess], client: Client
) -> None:
    broker = make_redis()
    env = {"REDIS_URL": broker.url, "WSAPP_RATE_LIMIT": "0"}
    a, b = make_server(**env), make_server(**env)
    r = room()
    a1, a2, b1 = client(a, "a1"), client(a, "a2"), client(b, "b1")
    for ws in (a1, a2, b1):
        join(ws, r)
    # Presence from the other process may come after local events: collect it before going on.
    assert sorted(recv_json(a1)["who"] for _ in range(2)) == ["a2", "b1"]
    assert recv_json(a2)["who"] == "b1"
    send_json(a1, type="publish", room=r, data="before", id="p1")
    assert recv_json(a1)["seq"] == 1
    assert recv_json(b1)["data"] == "before"
    assert recv_json(a2)["data"] == "before"

    broker.stop()
    for srv in (a, b):
        _, body = wait_for(lambda srv=srv: (h := health(srv))[0] == 503 and h, what="healthz 503")
        assert body["status"] == "degraded" and body["broker_healthy"] is False
    # A room publish cannot be numbered without the broker: refused at once, never numbered locally
    # (two processes would hand out the same numbers), with a code the client can retry on.
    started = time.monotonic()
    send_json(a1, type="publish", room=r, data="during", id="p2")
    refused = recv_json(a1)
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "unavailable", "p2")
    assert time.monotonic() - started < 0.5
    for ws in (a2, b1):
        assert_nothing_pending(ws)
    # History cannot be served without the broker, and the joiner is told so; local presence still works.
    late = client(a, "late")
    assert join(late, r, since=0)["seq"] == 1
    assert recv_json(late)["code"] == "history_gone"
    assert recv_type(a1, "presence")["who"] == "late"

    broker.start()
    for srv in (a, b):
        _, body = wait_for(lambda srv=srv: (h := health(srv))[0] == 200 and h, timeout=10, what="healthz 200")
        assert body["status"] == "ok" and body["broker_healthy"] is True
    send_json(b1, type="publish", room=r, data="after", id="p3")
    after_seq = recv_type(b1, "ack")["seq"]
    assert after_seq == 1  # the restarted Redis is empty: a new epoch, numbered from 1 again
    for ws in (a1, a2, late):
        # Members who knew the old numbering are told it restarted, then get the message.
        restarted = recv_type(ws, "error")
        assert (restarted["code"], restarted["room"]) == ("history_gone", r)
        msg = recv_type(ws, "message")
        assert (msg["data"], msg["seq"]) == ("after", after_seq)
    # Every process registered its members again in the restarted (empty) Redis.
    newcomer = client(b, "newcomer")
    assert sorted(join(newcomer, r)["members"]) == ["a1", "a2", "b1", "late", "newcomer"]
    # One log line per state change, not one per message. The line follows the state change and
    # the harness reads the log on a thread of its own: wait for it before counting.
    for srv in (a, b):
        wait_for(lambda srv=srv: "broker back" in srv.log_text(), what="'broker back' logged")
        log_text = srv.log_text()
        assert log_text.count("broker lost") == 1, log_text
        assert log_text.count("broker back") == 1, log_text


class Roster:
    """A client's view of a room's members as the protocol lets it keep one: `joined`'s list, then
    each `presence` join and leave (a multiset: two members may share a name)."""

    def __init__(self, ws: websocket.WebSocket, joined: dict[str, Any]) -> None:
        self.ws = ws
        self.names = Counter(joined["members"])

    def until(self, want: list[str], timeout: float = 10.0) -> None:
        """Read frames (presence changes the view; other frames pass) until the view is `want`."""
        self.ws.settimeout(timeout)
        seen: list[tuple[str, str]] = []
        while self.names != Counter(want):
            try:
                msg = recv_json(self.ws)
            except websocket.WebSocketTimeoutException:
                raise AssertionError(f"view {sorted(self.names.elements())}, want {want}, after {seen}") from None
            if msg["type"] == "presence":
                seen.append((msg["event"], msg["who"]))
                self.names[msg["who"]] += 1 if msg["event"] == "join" else -1
                assert self.names[msg["who"]] >= 0, f"a leave of someone not listed: {seen}"
                self.names += Counter()  # drop zero counts
        assert_nothing_pending(self.ws)  # and no presence event after it


def test_presence_made_consistent_after_a_broker_outage(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess], client: Client
) -> None:
    """Joins and leaves on one process while Redis is away never reach the other as events; after
    the reconnection each process re-reads the room's members and sends the differences as presence,
    so every client's view (joined + presence) ends as the room's real members."""
    broker = make_redis()
    env = {"REDIS_URL": broker.url, "WSAPP_RATE_LIMIT": "0"}
    a, b = make_server(**env), make_server(**env)
    r = room()
    alice, carol = client(a, "alice"), client(b, "carol")
    views = {"alice": Roster(alice, join(alice, r))}
    join(carol, r)
    views["alice"].until(["alice", "carol"])
    broker.stop()
    for srv in (a, b):
        wait_for(lambda srv=srv: health(srv)[0] == 503, what="healthz 503")
    bob, dave = client(b, "bob"), client(a, "dave")
    views["bob"] = Roster(bob, join(bob, r))
    assert views["bob"].names == Counter(["alice", "carol", "bob"])  # what b knew, not only its own
    views["dave"] = Roster(dave, join(dave, r))
    send_json(carol, type="leave", room=r)
    recv_type(carol, "left")
    broker.start()
    for srv in (a, b):
        wait_for(lambda srv=srv: health(srv)[0] == 200, timeout=10, what="healthz 200")
    everyone = ["alice", "bob", "dave"]
    for view in views.values():
        view.until(everyone)
    # A newcomer on either process is told the same list.
    for srv, name in ((a, "e1"), (b, "e2")):
        newcomer = client(srv, name)
        everyone.append(name)
        assert Counter(join(newcomer, r)["members"]) == Counter(everyone)


def test_hung_broker_costs_at_most_one_timeout(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess], client: Client
) -> None:
    broker = make_redis()
    assert broker.proc is not None
    srv = make_server(REDIS_URL=broker.url)
    r = room()
    a1, a2 = client(srv, "a1"), client(srv, "a2")
    join(a1, r)
    join(a2, r)
    assert recv_json(a1)["who"] == "a2"
    os.kill(broker.proc.pid, signal.SIGSTOP)  # alive but silent: only timeouts can tell
    try:
        started = time.monotonic()
        send_json(a1, type="publish", room=r, data="stuck?", id="s1")
        # Its outcome is unknown (Redis may run the script when it wakes): unavailable, not a number.
        assert recv_json(a1)["code"] == "unavailable"
        assert time.monotonic() - started < 2.5
        wait_for(lambda: health(srv)[0] == 503, timeout=5, what="healthz 503")
        started = time.monotonic()
        send_json(a1, type="publish", room=r, data="fast", id="s2")
        assert recv_json(a1)["code"] == "unavailable"
        assert time.monotonic() - started < 0.5  # degraded: Redis is no longer asked
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    wait_for(lambda: health(srv)[0] == 200, timeout=10, what="healthz back to 200")
    # The stalled publish may or may not have run when Redis woke up; either way members get what was
    # numbered once, in order, and the refused one never.
    send_json(a1, type="publish", room=r, data="after", id="s3")
    after = recv_type(a1, "ack")["seq"]
    expected = [("stuck?", 1), ("after", 2)] if after == 2 else [("after", 1)]
    assert [(m["data"], m["seq"]) for m in (recv_type(a2, "message") for _ in expected)] == expected
    assert_nothing_pending(a2)


def test_members_die_with_their_process(
    pair: tuple[ServerProcess, ServerProcess],
    redis_server: RedisServer,
    make_server: Callable[..., ServerProcess],
    client: Client,
) -> None:
    a, b = pair
    doomed = make_server(REDIS_URL=redis_server.url)
    r = room()
    alice, bob = client(a, "alice"), client(doomed, "bob")
    join(alice, r)
    join(bob, r)
    members_key, procs_key = f"wsapp:room:{{{r}}}:members", f"wsapp:room:{{{r}}}:procs"
    redis = redis_server.client()
    owners = {field.decode().split(":")[0]: name.decode() for field, name in redis.hgetall(members_key).items()}
    by_name = {name: owner for owner, name in owners.items()}

    def alive_for(incarnation: str) -> float:
        """Seconds the room still counts `incarnation` as alive (Redis's clock)."""
        seconds, micros = redis.time()
        score = redis.zscore(procs_key, incarnation)
        return -1.0 if score is None else (score - (seconds * 1000 + micros // 1000)) / 1000

    assert 0 < alive_for(by_name["bob"]) <= 10  # liveness is kept in the room's own slot
    doomed.proc.kill()  # no goodbye: its members linger until its liveness in the room lapses
    doomed.wait(5)
    assert sorted(join(client(a, "early"), r)["members"]) == ["alice", "bob", "early"]
    redis.zadd(procs_key, {by_name["bob"]: 0})  # what the clock does a few seconds later
    assert sorted(join(client(a, "later"), r)["members"]) == ["alice", "early", "later"]
    assert by_name["bob"] not in {f.decode().split(":")[0] for f in redis.hkeys(members_key)}
    assert redis.zscore(procs_key, by_name["bob"]) is None
    # A live process taken for dead (say it stalled) and whose members another join dropped notices on
    # its next heartbeat and registers them again.
    lapsed = by_name["alice"]
    redis.zadd(procs_key, {lapsed: 0})
    assert sorted(join(client(b, "dropper"), r)["members"]) == ["dropper"]  # a's members taken for dead
    wait_for(lambda: alive_for(lapsed) > 0 and len(redis.hkeys(members_key)) == 4, timeout=5,
             what="a's members registered again")
    assert sorted(join(client(b, "after"), r)["members"]) == ["after", "alice", "dropper", "early", "later"]
    redis.close()


def test_relay_crosses_processes_with_type_and_bytes(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    sender, local, remote = connect(a.ws("/")), connect(a.ws("/")), connect(b.ws("/"))
    try:
        for srv, count in ((a, 2), (b, 1)):
            wait_for(lambda srv=srv, count=count: get_json(srv.http("/stats"))[1]["relay_clients"] == count,
                     what=f"{count} relay clients")
        messages = [
            (TEXT, "héllo ✓".encode()),
            (BINARY, bytes(range(256)) + b" \x00 / 0 "),  # bytes that look like an envelope's separators
            (BINARY, b""),
            (BINARY, os.urandom(70000)),  # a 64-bit length in the frame header
        ]
        for opcode, payload in messages:
            sender.send(payload, opcode=opcode)
        for ws in (local, remote):
            assert [ws.recv_data() for _ in messages] == messages
        # The sender hears nothing of its own: its process dropped the copy Redis sent back, which would
        # have arrived before this marker (one Redis channel keeps publish order).
        remote.send("marker from b")
        assert sender.recv_data() == (TEXT, b"marker from b")
        assert local.recv_data() == (TEXT, b"marker from b")
    finally:
        for ws in (sender, local, remote):
            ws.close()


def test_relay_goes_on_across_a_broker_restart(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess]
) -> None:
    """The relay's frames travel on the command stream, which Redis's restart cuts: while Redis is
    away a process relays to its own clients only and keeps nothing for later, and once Redis is
    back frames cross again on the new connection, each delivered once (the sender hears nothing of
    its own, its neighbour nothing twice)."""
    broker = make_redis()
    env = {"REDIS_URL": broker.url, "WSAPP_RATE_LIMIT": "0"}
    a, b = make_server(**env), make_server(**env)
    sender, local, remote = connect(a.ws("/")), connect(a.ws("/")), connect(b.ws("/"))
    try:
        for srv, count in ((a, 2), (b, 1)):
            wait_for(lambda srv=srv, count=count: get_json(srv.http("/stats"))[1]["relay_clients"] == count,
                     what=f"{count} relay clients")
        sender.send("before")
        for ws in (local, remote):
            assert ws.recv_data() == (TEXT, b"before")

        broker.stop()
        for srv in (a, b):
            wait_for(lambda srv=srv: health(srv)[0] == 503, what="healthz 503")
        sender.send("during")  # a's own clients only
        assert local.recv_data() == (TEXT, b"during")

        broker.start()
        for srv in (a, b):
            wait_for(lambda srv=srv: health(srv)[0] == 200, timeout=10, what="healthz 200")
        sender.send("after")
        assert local.recv_data() == (TEXT, b"after")
        assert remote.recv_data() == (TEXT, b"after")  # not "during": the relay keeps nothing
        remote.send("marker from b")  # behind a's "after" on the one relay channel
        assert sender.recv_data() == (TEXT, b"marker from b")
        assert local.recv_data() == (TEXT, b"marker from b")
    finally:
        for ws in (sender, local, remote):
            ws.close()
