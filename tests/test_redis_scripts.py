"""The publish script's counter rules against a real redis-server (redis_wire's _COUNTER): a room's
counter written under another life of the server (before a failover or a restart) starts a new epoch;
a caller whose view of the server's life is stale is refused before anything is written; a counter
from before lives were kept, or on a server that will not run INFO, numbers on."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.clients import connect, recv_json, recv_type, send_json, wait_for
from tests.harness import ServerProcess
from tests.redis_fixture import RedisServer
from wsapp.backends import redis_wire as wire

pytestmark = pytest.mark.redis


def room() -> str:
    return "s-" + uuid.uuid4().hex[:12]


def publish(client: redis.Redis, r: str, life: str) -> tuple[int, str]:
    """Run the publish script as a server would; (seq, epoch)."""
    call = wire.publish_call("t.1", r, b'{"seq":', b"}", 10, epoch=wire.new_epoch(), life=life)
    reply = client.register_script(wire.PUBLISH_SCRIPT)(keys=call.keys, args=call.args)
    assert len(reply) == 2, reply
    return int(reply[0]), reply[1].decode()


def server_life(client: redis.Redis) -> str:
    """What a server's stream connection reports for a plain Redis: its replication id."""
    return str(client.info("replication")["master_replid"])


def counter(client: redis.Redis, r: str) -> dict[str, Any]:
    return {k.decode(): v.decode() for k, v in client.hgetall(wire.room_key(r, "ctr")).items()}


def test_a_counter_from_another_life_of_the_server_starts_a_new_epoch(redis_server: RedisServer) -> None:
    client = redis_server.client()
    life = server_life(client)
    r = room()
    seq, epoch = publish(client, r, wire.UNKNOWN_LIFE)  # looked up (the Emitter's way)
    assert seq == 1 and counter(client, r)["life"] == life
    # A server's connection knows it: numbering goes on.
    assert publish(client, r, life) == (2, epoch)
    # As a promoted replica sees a counter its old primary wrote: the last numbers may be missing here.
    client.hset(wire.room_key(r, "ctr"), "life", "ab" * 20)
    seq, new_epoch = publish(client, r, life)
    assert (seq, counter(client, r)["life"]) == (1, life) and new_epoch != epoch
    assert client.xlen(wire.room_key(r, "log")) == 1  # the old life's history went with it
    client.close()


def test_a_caller_with_a_stale_life_is_refused_and_nothing_is_written(redis_server: RedisServer) -> None:
    client = redis_server.client()
    life = server_life(client)
    r = room()
    publish(client, r, life)
    before = counter(client, r)
    with pytest.raises(redis.ResponseError, match=f"^{wire.STALE_LIFE} {life}$"):
        publish(client, r, "cd" * 20)  # opened on a server that has been demoted and promoted since
    assert counter(client, r) == before and client.xlen(wire.room_key(r, "log")) == 1
    client.close()


def test_a_counter_without_a_life_is_adopted_and_numbering_goes_on(redis_server: RedisServer) -> None:
    client = redis_server.client()
    life = server_life(client)
    r = room()
    _, epoch = publish(client, r, life)
    client.hdel(wire.room_key(r, "ctr"), "life")  # written by a version before lives were kept
    assert publish(client, r, life) == (2, epoch) and counter(client, r)["life"] == life
    client.close()


def test_a_server_that_refuses_info_numbers_on_unchecked(
    redis_server: RedisServer, make_server: Callable[..., ServerProcess]
) -> None:
    admin = redis_server.client()
    user = "noinfo-" + uuid.uuid4().hex[:6]
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-info"])
    client = redis.Redis(port=redis_server.port, username=user, password="pw", socket_timeout=2)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command("INFO", "replication")  # what a server's connection is told: NO_LIFE
        r = room()
        _, epoch = publish(client, r, wire.NO_LIFE)
        assert publish(client, r, wire.NO_LIFE) == (2, epoch) and counter(client, r)["life"] == wire.NO_LIFE
        # Looked up from inside the script, INFO is refused too: the same unchecked numbering.
        assert publish(client, r, wire.UNKNOWN_LIFE) == (3, epoch)
        # A wsapp server with such a user serves rooms all the same, and says what it cannot check.
        srv = make_server(REDIS_URL=f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0", WSAPP_RATE_LIMIT="0")
        ws = connect(srv.ws("/ws?name=ann"))
        recv_type(ws, "welcome")
        send_json(ws, type="join", room=r)
        assert recv_json(ws)["epoch"] == epoch
        send_json(ws, type="publish", room=r, data="on", id="p")
        assert recv_type(ws, "ack")["seq"] == 4
        ws.close()
        wait_for(lambda: "refuses INFO" in srv.log_text(), what="the warning")
    finally:
        client.close()
        admin.acl_deluser(user)
        admin.close()


def test_the_log_is_trimmed_roughly_but_replays_and_catch_ups_keep_exactly_the_history(
        redis_server: RedisServer) -> None:
    """The publish script trims the log with MAXLEN ~ (whole nodes: cheaper); joins and catch-ups still
    hand out only the last `history` messages, and `since` before them is history_gone, as with an
    exact trim and as the in-process broker does."""
    client = redis_server.client()
    history, total = 10, 250
    r = room()
    publish_script = client.register_script(wire.PUBLISH_SCRIPT)
    join_script = client.register_script(wire.JOIN_SCRIPT)
    catch_up_script = client.register_script(wire.CATCH_UP_SCRIPT)
    epoch = wire.new_epoch()
    for n in range(1, total + 1):
        call = wire.publish_call("t.1", r, b'{"seq":', b',"n":%d}' % n, history, epoch=epoch, life=wire.NO_LIFE)
        publish_script(keys=call.keys, args=call.args)
    assert client.xlen(wire.room_key(r, "log")) > history  # rough: the node holding the last ones stays whole

    def join(since: int | None) -> tuple[list[int], int]:
        call = wire.join_call("t.1", r, "m1", "alice", None, since, epoch, life=wire.NO_LIFE, history=history)
        seq, _, replay, gone, _, _ = join_script(keys=call.keys, args=call.args)
        assert seq == total
        return [wire.message_seq(p) for p in replay], gone

    last = list(range(total - history + 1, total + 1))
    assert join(total - 5) == (last[-5:], 0)
    assert join(total - history) == (last, 0)  # exactly the history: nothing missed
    assert join(total - history - 1) == (last, 1)  # one before it: gone, and the history replayed
    assert join(0) == (last, 1)
    assert join(total) == ([], 0)
    assert join(None) == ([], 0)

    def catch_up(after: int, in_epoch: str) -> list[int]:
        call = wire.catch_up_call(r, after, in_epoch, history)
        found, current, missed = catch_up_script(keys=call.keys, args=call.args)
        assert (found.decode(), current) == (epoch, total)
        return [wire.message_seq(p) for p in missed]

    assert catch_up(total - 3, epoch) == last[-3:]
    assert catch_up(100, epoch) == last  # the caller sees the gap (first > after + 1) and says so
    assert catch_up(7, "another") == last  # a new epoch: from the start of what is kept
    client.close()
