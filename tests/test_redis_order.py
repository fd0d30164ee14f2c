"""Issue 11's faults, reproduced against a real redis-server with two wsapp processes: a room's
messages reach every subscriber in seq order, once; no seq is given twice; counters never restart
silently; a process receives only the traffic of rooms it has members in."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websocket

from tests.clients import connect, get_json, recv_json, recv_type, send_json, wait_for
from tests.harness import ServerProcess
from tests.redis_fixture import RedisServer, error_replies
from tests.test_publish_api import AUTH, KEY, post
from wsapp import Emitter

pytestmark = pytest.mark.redis

HISTORY = 2000
PAUSE_SECONDS = 3.0
ENV = {"WSAPP_HISTORY": str(HISTORY), "WSAPP_RATE_LIMIT": "0"}


def room() -> str:
    return "o-" + uuid.uuid4().hex[:12]


def member(srv: ServerProcess, name: str) -> websocket.WebSocket:
    ws = connect(srv.ws(f"/ws?name={name}"))
    assert recv_json(ws)["type"] == "welcome"
    return ws


def broker_in(srv: ServerProcess) -> int:
    return int(get_json(srv.http("/stats"))[1]["broker_messages_in"])


class Publisher(threading.Thread):
    """A closed-loop publisher: one message at a time, waiting for its ack; `unavailable` is retried
    (with a short back-off so a down broker is not hammered). Records every seq it was acked."""

    def __init__(self, srv: ServerProcess, r: str, name: str) -> None:
        super().__init__(daemon=True)
        self.ws = member(srv, name)
        send_json(self.ws, type="join", room=r)
        recv_type(self.ws, "joined")
        self.room = r
        self.name = name
        self.acked: list[int] = []
        self.acks: list[tuple[int, int]] = []  # (n of the message's data [name, n], its seq)
        self.refused = 0
        self.refusals: list[str] = []  # what each `unavailable` said
        self.acked_before_refusal = 0  # acks before the first `unavailable`
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                send_json(self.ws, type="publish", room=self.room, data=[self.name, n], id=n)
                while True:
                    reply = recv_json(self.ws)
                    if reply.get("id") == n:
                        break
                if reply["type"] == "ack":
                    self.acked.append(reply["seq"])
                    self.acks.append((n, reply["seq"]))
                else:
                    assert reply["code"] == "unavailable", reply
                    if not self.refused:
                        self.acked_before_refusal = len(self.acks)
                    self.refused += 1
                    self.refusals.append(reply["message"])
                    self.stop.wait(0.05)  # back-off before retrying, not synchronisation
                n += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> list[int]:
        self.stop.set()
        self.join(15)
        assert not self.is_alive() and self.error is None, self.error
        self.ws.close()
        return self.acked


class Listener(threading.Thread):
    """Reads every frame of one member and keeps the `message` seqs (and anything else) in order;
    `messages` has each message's (epoch, seq, data), the epoch being the joined one until an `error`
    `history_gone` names another."""

    def __init__(self, srv: ServerProcess, r: str, name: str, **join: Any) -> None:
        super().__init__(daemon=True)
        self.ws = member(srv, name)
        self.ws.settimeout(30)
        send_json(self.ws, type="join", room=r, **join)
        self.first = recv_json(self.ws)  # nothing may come before `joined`
        self.epoch: str | None = self.first.get("epoch")
        self.seqs: list[int] = []
        self.messages: list[tuple[str | None, int, Any]] = []
        self.other: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.closing = False

    def run(self) -> None:
        try:
            while True:
                msg = recv_json(self.ws)
                if msg["type"] == "message":
                    self.seqs.append(msg["seq"])
                    self.messages.append((self.epoch, msg["seq"], msg["data"]))
                elif msg["type"] != "presence":
                    self.other.append(msg)
                    if msg.get("code") == "history_gone":
                        self.epoch = msg["epoch"]
        except (websocket.WebSocketConnectionClosedException, OSError):
            pass
        except BaseException as exc:
            if not self.closing:  # our own close ends the read with a close frame
                self.error = exc

    def close(self) -> None:
        self.closing = True
        self.ws.close()
        self.join(5)

def traffic(
    srv_a: ServerProcess, srv_b: ServerProcess, room: str, names: tuple[str, str] = ("la", "lb"),
) -> tuple[list[Listener], list[Publisher]]:
    """A subscriber (named `names`) and a publisher on each process, all in `room`, running."""
    listeners = [Listener(srv_a, room, names[0]), Listener(srv_b, room, names[1])]
    for listener in listeners:
        listener.start()
    publishers = [Publisher(srv_a, room, "pa"), Publisher(srv_b, room, "pb")]
    for publisher in publishers:
        publisher.start()
    return listeners, publishers



def assert_in_order_once(seqs: list[int]) -> None:
    repeated = len(seqs) - len(set(seqs))
    backwards = sum(1 for x, y in itertools.pairwise(seqs) if y <= x)
    assert (repeated, backwards) == (0, 0), f"{repeated} repeated, {backwards} out of order"


@pytest.fixture
def two(make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess]) -> Iterator[
    tuple[RedisServer, ServerProcess, ServerProcess]
]:
    broker = make_redis()
    yield broker, make_server(REDIS_URL=broker.url, **ENV), make_server(REDIS_URL=broker.url, **ENV)


def test_a_process_receives_only_the_rooms_it_has_members_in(
    two: tuple[RedisServer, ServerProcess, ServerProcess],
) -> None:
    _, a, b = two
    r = room()
    talker, hearer = member(a, "talker"), member(a, "hearer")
    for ws in (talker, hearer):
        send_json(ws, type="join", room=r)
        recv_type(ws, "joined")
    before = broker_in(b)
    for i in range(50):
        send_json(talker, type="publish", room=r, data=i)
    assert [recv_type(hearer, "message")["seq"] for _ in range(50)] == list(range(1, 51))
    assert broker_in(b) == before  # b has nobody in the room: none of its traffic reached b
    # Once b has a member, the room's traffic reaches it (the counter can move).
    remote = member(b, "remote")
    send_json(remote, type="join", room=r)
    recv_type(remote, "joined")
    send_json(talker, type="publish", room=r, data="now")
    assert recv_type(remote, "message")["seq"] == 51
    assert broker_in(b) > before
    with urllib.request.urlopen(b.http("/metrics"), timeout=5) as resp:
        assert "wsapp_broker_messages_in_total" in resp.read().decode()
    # And after its last member leaves, b stops receiving the room again.
    send_json(remote, type="leave", room=r)
    recv_type(remote, "left")
    wait_for(lambda: (n := broker_in(b)) == broker_in(b) and n, what="b's count to settle")
    settled = broker_in(b)
    for i in range(20):
        send_json(talker, type="publish", room=r, data=i)
    assert [recv_type(hearer, "message")["seq"] for _ in range(21)][-1] == 71
    assert broker_in(b) == settled
    for ws in (talker, hearer, remote):
        ws.close()


def test_publishers_on_two_processes_and_joins_under_traffic_keep_order_without_duplicates(
    two: tuple[RedisServer, ServerProcess, ServerProcess],
) -> None:
    _, a, b = two
    r = room()
    watchers, publishers = traffic(a, b, r, ("wa", "wb"))
    try:
        for attempt in range(30):
            srv = (a, b)[attempt % 2]
            # With `since` (half the tries) the replay and the live stream meet; without, only live.
            since = None
            if attempt % 4 < 2:
                wait_for(lambda: publishers[0].acked, what="traffic")
                since = max(publishers[0].acked[-1] - 3, 0)
            joiner = member(srv, f"j{attempt}")
            send_json(joiner, type="join", room=r, **({} if since is None else {"since": since}))
            first = recv_json(joiner)
            assert first["type"] == "joined", first
            seqs: list[int] = []
            start = first["seq"] if since is None else since
            while len(seqs) < 8:
                msg = recv_json(joiner)
                if msg["type"] == "message":
                    seqs.append(msg["seq"])
                else:
                    assert msg["type"] == "presence", msg
            # Every seq after the start, once, in order: nothing skipped, nothing twice.
            assert seqs == list(range(start + 1, start + 9)), (attempt, since, first["seq"], seqs)
            joiner.close()
    finally:
        acked = [p.finish() for p in publishers]
    everything = sorted(acked[0] + acked[1])
    assert len(set(everything)) == len(everything)  # no seq acked twice
    last = everything[-1]
    for w in watchers:
        wait_for(lambda w=w: w.seqs and w.seqs[-1] >= last, what="watchers to see the last message")
        w.close()
        assert w.first["type"] == "joined" and w.error is None
        assert_in_order_once(w.seqs)
        assert w.seqs == list(range(1, last + 1))  # both publishers' messages, in seq order, never backwards


def test_redis_paused_under_traffic_gives_no_seq_twice_and_loses_no_acked_message(
    two: tuple[RedisServer, ServerProcess, ServerProcess],
) -> None:
    broker, a, b = two
    assert broker.proc is not None
    r = room()
    listeners, publishers = traffic(a, b, r)
    wait_for(lambda: all(len(p.acked) >= 20 for p in publishers), what="traffic before the pause")
    os.kill(broker.proc.pid, signal.SIGSTOP)
    paused = time.monotonic()
    try:
        # Both processes notice (a publish or a heartbeat times out) and refuse instead of numbering.
        wait_for(lambda: all(p.refused for p in publishers), timeout=6, what="publishes refused while paused")
        paused_at = [len(p.acked) for p in publishers]
        wait_for(lambda: get_json(a.http("/healthz"))[0] == 503, timeout=6, what="a degraded")
        # The fault lasts ~3 s, as an operator's pause would (a duration, not a synchronisation).
        time.sleep(max(0.0, PAUSE_SECONDS - (time.monotonic() - paused)))
        assert [len(p.acked) for p in publishers] == paused_at  # nothing numbered without Redis
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    wait_for(lambda: all(len(p.acked) >= n + 20 for p, n in zip(publishers, paused_at, strict=True)),
             timeout=15, what="traffic after the pause")
    acked = [p.finish() for p in publishers]
    everything = acked[0] + acked[1]
    assert len(set(everything)) == len(everything)  # no seq given to two messages
    for mine in acked:
        assert mine == sorted(mine)
    for w in listeners:
        wait_for(lambda w=w: set(everything) <= set(w.seqs), timeout=10, what="every acked message delivered")
        w.close()
        assert w.error is None
        assert_in_order_once(w.seqs)  # once each, in seq order (a timed-out publish may appear: it ran)


def test_small_maxmemory_with_volatile_lru_never_restarts_a_counter(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess]
) -> None:
    broker = make_redis()
    admin = broker.client()
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + 3 * 1024 * 1024)
    admin.config_set("maxmemory-policy", "volatile-lru")
    srv = make_server(REDIS_URL=broker.url, **ENV)
    rooms = [room() for _ in range(8)]
    watcher = Listener(srv, rooms[0], "w")
    watcher.start()
    blob = "x" * 8000
    per_room: dict[str, list[int]] = {r: [] for r in rooms}
    with Emitter(broker.url, history=HISTORY) as emitter:
        for i in range(150):  # 8 rooms x 150 x 8 KB: far more than maxmemory, so logs are evicted
            for r in rooms:
                per_room[r].append(emitter.publish(r, {"i": i, "blob": blob}))
    assert int(admin.info("stats")["evicted_keys"]) > 0  # the pressure was real
    for seqs in per_room.values():
        assert seqs == list(range(1, 151))  # never restarted at 1: counters carry no TTL
    wait_for(lambda: len(watcher.seqs) >= 150, what="the watcher's messages")
    watcher.close()
    assert watcher.seqs == list(range(1, 151))
    admin.close()


def test_flushall_changes_the_epoch_and_an_old_since_gets_history_gone(
    two: tuple[RedisServer, ServerProcess, ServerProcess],
) -> None:
    broker, a, b = two
    r = room()
    writer, reader = member(a, "writer"), member(b, "reader")
    send_json(writer, type="join", room=r)
    old_epoch = recv_type(writer, "joined")["epoch"]
    send_json(reader, type="join", room=r)
    assert recv_type(reader, "joined")["epoch"] == old_epoch
    for i in range(3):
        send_json(writer, type="publish", room=r, data=i, id=i)
        ack = recv_type(writer, "ack")
        assert (ack["seq"], ack["epoch"]) == (i + 1, old_epoch)
    admin = broker.client()
    admin.flushall()
    send_json(writer, type="publish", room=r, data="after", id="f")
    ack = recv_type(writer, "ack")
    # A new life of the room: the ack itself says so (its seq 1 is of a new epoch), whatever the
    # writer has read of the room by then.
    assert ack["seq"] == 1 and ack["epoch"] != old_epoch
    # The live member on the other process is told the numbering restarted, with the new epoch.
    notice = recv_type(reader, "error")
    assert (notice["code"], notice["room"]) == ("history_gone", r)
    new_epoch = notice["epoch"]
    assert ack["epoch"] == new_epoch
    assert new_epoch != old_epoch
    assert (m := recv_type(reader, "message"))["seq"] == 1 and m["data"] == "after"
    # A client that remembers the old epoch and seq 3 rejoins: history_gone, no replay of the new life.
    back = member(b, "back")
    send_json(back, type="join", room=r, since=3, epoch=old_epoch)
    joined = recv_json(back)
    assert (joined["type"], joined["seq"], joined["epoch"]) == ("joined", 1, new_epoch)
    gone = recv_json(back)
    assert (gone["type"], gone["code"], gone["epoch"]) == ("error", "history_gone", new_epoch)
    send_json(back, type="ping", id="end")
    assert recv_json(back) == {"type": "pong", "id": "end"}  # nothing replayed
    # With the current epoch the same kind of rejoin replays normally.
    again = member(a, "again")
    send_json(again, type="join", room=r, since=0, epoch=new_epoch)
    assert recv_json(again)["type"] == "joined"
    assert recv_json(again)["data"] == "after"
    for ws in (writer, reader, back, again):
        ws.close()
    admin.close()


def test_messages_numbered_in_a_new_life_before_a_process_is_back_reach_its_members(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess]
) -> None:
    """Redis comes back empty (or a replica takes over) and a room is numbered anew before a process
    has subscribed again: once back, the process delivers the new life from its start (after telling
    its members the epoch changed), not just from the next message on."""
    broker = make_redis()
    srv = make_server(REDIS_URL=broker.url, **ENV)
    r = room()
    listener = Listener(srv, r, "l")
    listener.start()
    old_epoch = listener.epoch
    with Emitter(broker.url, history=HISTORY) as emitter:
        assert emitter.publish(r, "old") == 1
    wait_for(lambda: listener.messages, what="the first message")
    broker.stop()
    wait_for(lambda: get_json(srv.http("/healthz"))[0] == 503, what="degraded")
    os.kill(srv.proc.pid, signal.SIGSTOP)  # so the room's new life is numbered before it subscribes again
    try:
        broker.start()
        with Emitter(broker.url, history=HISTORY) as emitter:
            assert [emitter.publish(r, ["new", i]) for i in range(3)] == [1, 2, 3]
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    wait_for(lambda: len(listener.messages) == 4, timeout=10, what="the new life's messages")
    listener.close()
    new_epoch = listener.epoch
    assert new_epoch != old_epoch and listener.error is None
    assert listener.messages == [(old_epoch, 1, "old"), *((new_epoch, i + 1, ["new", i]) for i in range(3))]
    assert [(m["code"], m["epoch"]) for m in listener.other] == [("history_gone", new_epoch)]


def test_publish_api_answers_503_unavailable_while_redis_is_away(
    make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess]
) -> None:
    broker = make_redis()
    srv = make_server(REDIS_URL=broker.url, WSAPP_API_KEY=KEY, **ENV)
    r = room()
    assert post(srv, {"room": r, "data": 1})[0] == 200
    broker.stop()
    wait_for(lambda: get_json(srv.http("/healthz"))[0] == 503, what="degraded")
    status, headers, body = post(srv, {"room": r, "data": 2}, AUTH)
    assert (status, body["error"], headers.get("Retry-After")) == (503, "unavailable", "1")


def test_publishes_sent_without_waiting_keep_their_order_when_the_script_cache_is_lost(
    two: tuple[RedisServer, ServerProcess, ServerProcess],
) -> None:
    """A client may send publishes without waiting for each ack (its reader does not wait for Redis
    either: several are in flight). They are numbered in the order sent and acked in that order, also
    when SCRIPT FLUSH makes those in flight fail NOSCRIPT (they did not run): the stream holds the
    rest back, loads the script once and sends them again in their order, so no later one overtakes."""
    broker, a, b = two
    admin = broker.client()

    r = room()
    hearer = Listener(b, r, "hearer")
    hearer.start()
    talker = member(a, "talker")
    send_json(talker, type="join", room=r)
    recv_type(talker, "joined")
    replies: list[dict[str, Any]] = []
    sent = 0
    for _ in range(5):
        admin.script_flush()  # the next script calls fail NOSCRIPT: the first one and those in flight behind it
        burst = []
        for _ in range(40):  # in one write: the server reads them at once and has several in flight
            message = json.dumps({"type": "publish", "room": r, "data": sent, "id": sent})
            burst.append(websocket.ABNF.create_frame(message, websocket.ABNF.OPCODE_TEXT).format())
            sent += 1
        talker.sock.sendall(b"".join(burst))
        send_json(talker, type="ping", id=sent)
        while True:
            reply = recv_json(talker)
            if reply["type"] != "presence":
                replies.append(reply)
            if reply["type"] == "pong":
                break
    # The retry path really ran: a flush makes a whole batch of calls in flight fail, every time.
    assert error_replies(admin, "NOSCRIPT") >= 5 * 2
    expected = [[("ack", n) for n in range(burst * 40, burst * 40 + 40)] + [("pong", burst * 40 + 40)]
                for burst in range(5)]
    assert [(m["type"], m["id"]) for m in replies] == [reply for burst in expected for reply in burst]
    acked = [m["seq"] for m in replies if m["type"] == "ack"]
    assert acked == list(range(1, sent + 1))  # numbered in the order sent
    wait_for(lambda: len(hearer.seqs) >= sent, what="every message delivered")
    hearer.close()
    assert hearer.error is None and hearer.seqs == list(range(1, sent + 1))
    talker.close()
    admin.close()


def test_script_cache_lost_under_traffic_on_many_rooms_runs_each_publish_once(
    two: tuple[RedisServer, ServerProcess, ServerProcess],
) -> None:
    """Publishes of many rooms share one stream of script calls; SCRIPT FLUSH while they are in flight
    makes some fail NOSCRIPT (they did not run). Each is sent again once the script is loaded: every
    publish acked, each room numbered 1, 2, 3... (a call run twice would skip a number), none refused."""
    broker, a, b = two
    admin = broker.client()
    rooms = [room() for _ in range(6)]
    listeners = [Listener(b, r, f"l{i}") for i, r in enumerate(rooms)]
    for w in listeners:
        w.start()
    publishers = [Publisher(a, r, f"p{i}") for i, r in enumerate(rooms)]
    for p in publishers:
        p.start()
    for flush in range(5):
        wait_for(lambda flush=flush: all(len(p.acked) >= 20 * (flush + 1) for p in publishers), timeout=10,
                 what="traffic between flushes")
        admin.script_flush()
    acked = [p.finish() for p in publishers]
    for p, mine in zip(publishers, acked, strict=True):
        assert p.refused == 0
        assert mine == list(range(1, len(mine) + 1))
    for w, mine in zip(listeners, acked, strict=True):
        wait_for(lambda w=w, mine=mine: len(w.seqs) >= len(mine), what="every message delivered")
        w.close()
        assert w.error is None and w.seqs == mine
    admin.close()
