"""The Emitter: publishing from another Python process into rooms served by wsapp processes sharing Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import websocket

from tests.clients import connect, recv_json, recv_type, send_json, wait_for
from tests.harness import ROOT, ServerProcess, server_pair
from tests.redis_fixture import RedisServer, command_calls, error_replies
from tests.redis_topologies import RedisProc, free_port, plain_args
from wsapp import Emitter
from wsapp.backends import redis_wire as wire

pytestmark = pytest.mark.redis

HISTORY = 10

# Runs in a fresh interpreter: no gevent, no monkey patching, nothing of the test process.
EMITTER_SCRIPT = """
import json, sys
from wsapp import Emitter
with Emitter(sys.argv[1], history=int(sys.argv[3])) as emitter:
    seqs = [emitter.publish(sys.argv[2], {"n": n}, sender="cron") for n in range(2)]
print(json.dumps({"seqs": seqs, "gevent": "gevent" in sys.modules}))
"""


def room() -> str:
    return "e-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with server_pair({"REDIS_URL": redis_server.url, "WSAPP_HISTORY": str(HISTORY), "WSAPP_RATE_LIMIT": "0"}) as both:
        yield both


def member(srv: ServerProcess, name: str, r: str, **join: object) -> websocket.WebSocket:
    ws = connect(srv.ws(f"/ws?name={name}"))
    assert recv_json(ws)["type"] == "welcome"
    send_json(ws, type="join", room=r, **join)
    recv_type(ws, "joined")
    return ws


def messages(ws: websocket.WebSocket, count: int) -> list[tuple[dict[str, Any], str]]:
    """The next `count` `message`s (decoded and as sent), skipping presence."""
    out = []
    while len(out) < count:
        raw = ws.recv()
        msg = json.loads(raw)
        if msg["type"] == "message":
            out.append((msg, raw))
        else:
            assert msg["type"] == "presence", msg
    return out


def assert_no_more_messages(ws: websocket.WebSocket) -> None:
    """Nothing but presence was queued before a ping's pong: no duplicate or stray `message`."""
    send_json(ws, type="ping", id="end")
    while (msg := recv_json(ws))["type"] != "pong":
        assert msg["type"] == "presence", msg


def test_emitter_in_another_process_is_numbered_delivered_and_kept_like_server_publishes(
    pair: tuple[ServerProcess, ServerProcess], redis_server: RedisServer
) -> None:
    a, b = pair
    r = room()
    alice, bob = member(a, "alice", r, echo=True), member(b, "bob", r, echo=True)
    try:
        send_json(alice, type="publish", room=r, data="from alice")
        assert [m["seq"] for m, _ in messages(bob, 1)] == [1]

        before_ms = int(time.time() * 1000)
        done = subprocess.run(
            [sys.executable, "-c", EMITTER_SCRIPT, redis_server.url, r, str(HISTORY)],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result == {"seqs": [2, 3], "gevent": False}

        got_bob = messages(bob, 2)
        assert [(m["seq"], m["from"], m["data"]) for m, _ in got_bob] == [(2, "cron", {"n": 0}), (3, "cron", {"n": 1})]
        assert all(before_ms <= m["ts"] <= int(time.time() * 1000) for m, _ in got_bob)
        send_json(bob, type="publish", room=r, data="from bob")
        assert [m["seq"] for m, _ in messages(bob, 1)] == [4]

        # Alice, on the other process, sees all four once, in order, the Emitter's among the servers'.
        got_alice = messages(alice, 4)
        assert [(m["seq"], m["from"]) for m, _ in got_alice] == [(1, "alice"), (2, "cron"), (3, "cron"), (4, "bob")]

        # A late joiner replays them from the shared history, byte for byte what the members got.
        carol = member(b, "carol", r, since=0)
        try:
            replay = messages(carol, 4)
            assert [raw for _, raw in replay] == [raw for _, raw in got_alice]
        finally:
            carol.close()
        for ws in (alice, bob):
            assert_no_more_messages(ws)
    finally:
        alice.close()
        bob.close()


def test_emitter_alone_keeps_history_for_a_later_join(
    pair: tuple[ServerProcess, ServerProcess], redis_server: RedisServer
) -> None:
    a, _ = pair
    r = room()
    with Emitter(redis_server.url, history=HISTORY) as emitter:
        assert [emitter.publish(r, n) for n in range(3)] == [1, 2, 3]
    late = member(a, "late", r, since=1)
    try:
        assert [(m["seq"], m["data"], m["from"]) for m, _ in messages(late, 2)] == [(2, 1, "server"), (3, 2, "server")]
    finally:
        late.close()


def test_emitter_validates_before_publishing(redis_server: RedisServer) -> None:
    r = room()
    with Emitter(redis_server.url) as emitter:
        for bad_room in ("", "a b", "x" * 65, "/", None):
            with pytest.raises(ValueError, match="room"):
                emitter.publish(bad_room, 1)  # type: ignore[arg-type]
        for bad_sender in ("", "x" * 33, "tab\there"):
            with pytest.raises(ValueError, match="sender"):
                emitter.publish(r, 1, sender=bad_sender)
        with pytest.raises(TypeError, match="JSON"):
            emitter.publish(r, {"when": object()})
        with pytest.raises(TypeError, match="JSON"):
            emitter.publish(r, 2**70)
        assert emitter.publish(r, "first valid") == 1  # nothing above took a number
    for history in (-1, 1.5):
        with pytest.raises(ValueError, match="history"):
            Emitter(redis_server.url, history=history)  # type: ignore[arg-type]


def test_emitter_trims_history_and_survives_redis_closing_its_connection(redis_server: RedisServer) -> None:
    r = room()
    admin = redis_server.client()
    emitter = Emitter(redis_server.url, history=2)
    try:
        assert [emitter.publish(r, n) for n in range(3)] == [1, 2, 3]
        # The log is trimmed roughly (MAXLEN ~); what a joining member is replayed is the last 2 exactly.
        assert [entry_id for entry_id, _ in admin.xrange(f"wsapp:room:{{{r}}}:log")][-2:] == [b"2-0", b"3-0"]
        call = wire.join_call("t.1", r, "m1", "alice", None, 0, history=2)  # life looked up, as the Emitter's
        _, _, replay, gone, _, _ = admin.register_script(wire.JOIN_SCRIPT)(keys=call.keys, args=call.args)
        assert ([wire.message_seq(p) for p in replay], gone) == ([2, 3], 1)

        # Redis drops idle clients (its `timeout` setting, a proxy, a failover): the next publish
        # reconnects instead of failing, and is published once.
        ours = [c for c in admin.client_list() if c["name"] == "wsapp-emitter"]
        assert len(ours) == 1
        admin.client_kill_filter(_id=ours[0]["id"])
        assert emitter.publish(r, 3) == 4
        assert admin.hget(f"wsapp:room:{{{r}}}:ctr", "seq") == b"4"
    finally:
        emitter.close()
    wait_for(lambda: not [c for c in admin.client_list() if c["name"] == "wsapp-emitter"], what="emitter closed")
    admin.close()


def test_emitter_reports_an_unreachable_redis(make_redis: Any) -> None:
    broker: RedisServer = make_redis()
    url = broker.url
    broker.stop()
    with Emitter(url, timeout=1.0) as emitter, pytest.raises(redis.ConnectionError):
        emitter.publish(room(), 1)


def test_emitter_follows_a_restart(make_redis: Any) -> None:
    """The publish script checks each room's counter against the primary's life (replication id); the
    Emitter, with no connection of its own to identify, lets the script look it up on every publish
    (redis_wire._COUNTER: a life passed back from an earlier publish may be stale, see the test below).
    After a restart (a new life, the data gone) the room starts a new life at seq 1, numbered once."""
    broker: RedisServer = make_redis()
    admin = broker.client()
    r = room()
    with Emitter(broker.url) as emitter:
        before = command_calls(admin, "info")
        seqs = [emitter.publish(r, n) for n in range(10)]
        assert seqs == list(range(1, 11))
        assert command_calls(admin, "info") - before == 10 + 1  # one per publish, and the reading
        # Each seq names its epoch, the room's numbering life in Redis.
        first_life = admin.hget(f"wsapp:room:{{{r}}}:ctr", "epoch").decode()
        assert {seq.epoch for seq in seqs} == {first_life}
        admin.close()
        broker.stop()
        broker.start()
        admin = broker.client()
        after = emitter.publish(r, "after")
        assert after == 1
        assert error_replies(admin, "STALE_LIFE") == 0  # no life passed, none refused
        assert admin.hget(f"wsapp:room:{{{r}}}:ctr", "seq") == b"1"
        # Numbering restarted, and the seq says so: a caller can tell this 1 from the old life's 1.
        assert after.epoch == admin.hget(f"wsapp:room:{{{r}}}:ctr", "epoch").decode() != first_life
        assert emitter.publish(r, "next") == 2
    admin.close()


def test_emitter_gives_no_seq_twice_after_a_restart_from_a_snapshot(tmp_path: Any) -> None:
    """A primary restarted from a snapshot (or a replica promoted) keeps the counters written under its
    old life but not the last numbers it gave: the publish script starts a new epoch for such a counter
    when it sees the server's life changed. An Emitter passing the life it learned before the restart
    (the counter's own) skips that check and hands out a seq a second time, in the same epoch."""
    port = free_port()
    broker = RedisProc(plain_args(port, "--dir", str(tmp_path)), port)
    admin = broker.client()
    r = room()
    ctr = f"wsapp:room:{{{r}}}:ctr"
    try:
        with Emitter(f"redis://127.0.0.1:{port}/0") as emitter:
            assert [emitter.publish(r, n) for n in range(3)] == [1, 2, 3]
            admin.save()  # the snapshot holds seq 3
            assert [emitter.publish(r, n) for n in range(3, 5)] == [4, 5]
            epoch = admin.hget(ctr, "epoch")
            admin.close()
            broker.stop(kill=True)  # a crash: seqs 4 and 5 were given, the snapshot does not know them
            broker.start()
            admin = broker.client()
            assert admin.hget(ctr, "seq") == b"3" and admin.hget(ctr, "epoch") == epoch  # loaded from the snapshot
            seq = emitter.publish(r, "after")
            assert admin.hget(ctr, "epoch") != epoch and seq == 1  # a new life of the room, not seq 4 again
            assert seq.epoch == admin.hget(ctr, "epoch").decode()  # and the seq says which life
            assert emitter.publish(r, "next") == 2
    finally:
        admin.close()
        broker.stop()
