"""Rooms and the relay on a real 3-master Redis Cluster, two wsapp processes on it (DESIGN.md section 5):
sharded pub/sub, per-room routing, presence, numbering and history across processes, a shard lost."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websocket

from tests.clients import TEXT, connect, get_json, recv_json, recv_type, send_json, wait_for
from tests.harness import ServerProcess
from tests.redis_fixture import command_calls
from tests.redis_topologies import RedisClusterProcs
from wsapp.emitter import Emitter

pytestmark = pytest.mark.redis

Client = Callable[[ServerProcess, str], websocket.WebSocket]


def rooms_on(cluster: RedisClusterProcs, port: int, count: int = 1) -> list[str]:
    """Fresh room names whose slot (the `{room}` hash tag of its keys and channel) the node on `port` owns."""
    found: list[str] = []
    while len(found) < count:
        name = "c-" + uuid.uuid4().hex[:10]
        if cluster.port_of_key(f"wsapp:room:{{{name}}}") == port:
            found.append(name)
    return found


@pytest.fixture
def client(rooms_clients: Client) -> Client:
    return rooms_clients


@pytest.fixture(scope="module")
def pair(redis_cluster: RedisClusterProcs) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Servers A and B on the shared Cluster: A told by WSAPP_REDIS_CLUSTER, B finding out from INFO."""
    env = {"REDIS_URL": redis_cluster.url, "WSAPP_HISTORY": "5", "WSAPP_RATE_LIMIT": "0"}
    a = ServerProcess({**env, "WSAPP_REDIS_CLUSTER": "1"})
    try:
        b = ServerProcess({**env, "REDIS_URL": f"redis://127.0.0.1:{redis_cluster.nodes[2].port}"})
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def join(ws: websocket.WebSocket, name: str, **extra: object) -> dict[str, Any]:
    send_json(ws, type="join", room=name, **extra)
    return recv_type(ws, "joined")


def stats(srv: ServerProcess) -> dict[str, Any]:
    return get_json(srv.http("/stats"))[1]


def publish(ws: websocket.WebSocket, room: str, data: object, id: str) -> dict[str, Any]:
    """Publish and return the answer to it: its `ack`, or the `error` refusing it (frames before it are
    dropped: call it when nothing else is expected)."""
    send_json(ws, type="publish", room=room, data=data, id=id)
    answer = recv_json(ws)
    while answer.get("id") != id:
        answer = recv_json(ws)
    return answer


def test_rooms_on_every_shard_share_presence_numbering_and_history_across_processes(
    pair: tuple[ServerProcess, ServerProcess], redis_cluster: RedisClusterProcs, client: Client
) -> None:
    a, b = pair
    assert "using Redis Cluster" in b.log_text()  # B's REDIS_URL has no WSAPP_REDIS_CLUSTER: detected
    for node in redis_cluster.nodes:  # one room on each shard
        (name,) = rooms_on(redis_cluster, node.port)
        alice, bob = client(a, "alice"), client(b, "bob")
        assert join(alice, name)["members"] == ["alice"]
        joined = join(bob, name)
        assert sorted(joined["members"]) == ["alice", "bob"] and joined["seq"] == 0
        assert recv_type(alice, "presence") == {"type": "presence", "room": name, "event": "join", "who": "bob"}
        # The room's channel is a sharded one, on the shard owning the room's slot, one SSUBSCRIBE per process.
        channel = f"wsapp:room:{{{name}}}"
        assert node.client().execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 2
        assert publish(alice, name, "one", "p1")["seq"] == 1
        got = recv_type(bob, "message")
        assert (got["seq"], got["data"], got["from"]) == (1, "one", "alice")
        assert publish(bob, name, "two", "p2")["seq"] == 2  # numbered by the shard, whichever process asks
        got = recv_type(alice, "message")
        assert (got["seq"], got["data"], got["from"]) == (2, "two", "bob")
        # History lives in the room's slot: a joiner on the other process gets both from it.
        late = client(a, "late")
        joined = join(late, name, since=0, epoch=joined["epoch"])
        assert joined["seq"] == 2 and sorted(joined["members"]) == ["alice", "bob", "late"]
        replayed = [recv_type(late, "message") for _ in range(2)]
        assert [(m["seq"], m["data"]) for m in replayed] == [(1, "one"), (2, "two")]
        assert recv_type(alice, "presence")["who"] == "late"
        bob.close()
        assert recv_type(alice, "presence") == {"type": "presence", "room": name, "event": "leave", "who": "bob"}


def assert_relay_crosses(a: ServerProcess, b: ServerProcess, text: str) -> None:
    """A text message sent to `/` on `a` reaches a `/` client on `b`, as sent."""
    sender, remote = connect(a.ws("/")), connect(b.ws("/"))
    try:
        for srv in (a, b):
            wait_for(lambda srv=srv: stats(srv)["relay_clients"] >= 1, what="relay clients")
        sender.send(text)
        assert remote.recv_data() == (TEXT, text.encode())
    finally:
        sender.close()
        remote.close()


def test_relay_crosses_processes_on_a_cluster(pair: tuple[ServerProcess, ServerProcess]) -> None:
    assert_relay_crosses(*pair, "over the sharded relay channel")


def test_a_process_without_members_in_a_room_receives_none_of_its_traffic(
    pair: tuple[ServerProcess, ServerProcess], redis_cluster: RedisClusterProcs, client: Client
) -> None:
    a, b = pair
    (name,) = rooms_on(redis_cluster, redis_cluster.nodes[1].port)
    alice, anna = client(a, "alice"), client(a, "anna")
    join(alice, name)
    join(anna, name)
    recv_type(alice, "presence")
    before_a, before_b = stats(a)["broker_messages_in"], stats(b)["broker_messages_in"]
    for i in range(20):
        assert publish(alice, name, i, f"q{i}")["seq"] == i + 1
    assert [recv_type(anna, "message")["data"] for _ in range(20)] == list(range(20))
    assert stats(a)["broker_messages_in"] - before_a == 20
    assert stats(b)["broker_messages_in"] == before_b  # B subscribed to nothing of this room
    channel = f"wsapp:room:{{{name}}}"
    assert redis_cluster.nodes[1].client().execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1


def test_a_shard_lost_and_back_fails_only_its_rooms_which_then_recover_with_a_new_epoch(
    make_redis_cluster: Callable[..., RedisClusterProcs], make_server: Callable[..., ServerProcess], client: Client
) -> None:
    cluster = make_redis_cluster(full_coverage=False)  # the other shards keep serving meanwhile
    env = {"REDIS_URL": cluster.url, "WSAPP_REDIS_CLUSTER": "1", "WSAPP_RATE_LIMIT": "0"}
    a, b = make_server(**env), make_server(**env)
    (doomed,) = rooms_on(cluster, cluster.nodes[1].port)
    (kept,) = rooms_on(cluster, cluster.nodes[2].port)
    a1, b1 = client(a, "a1"), client(b, "b1")
    epochs = {}
    for name in (doomed, kept):
        join(a1, name)
        epochs[name] = join(b1, name)["epoch"]
        recv_type(a1, "presence")
        assert publish(a1, name, "before", f"{name}-1")["seq"] == 1
        assert recv_type(b1, "message")["data"] == "before"

    cluster.stop_node(1, kill=True)
    for srv in (a, b):
        wait_for(lambda srv=srv: get_json(srv.http("/healthz"))[0] == 503, timeout=5, what="healthz degraded")
    # The lost shard's rooms refuse publishes (no number is made up locally); the others go on.
    refused = publish(a1, doomed, "during", "d-2")
    assert (refused["type"], refused["code"]) == ("error", "unavailable")
    for i in range(3):
        assert publish(b1, kept, f"kept {i}", f"k{i}")["seq"] == i + 2
        assert recv_type(a1, "message")["data"] == f"kept {i}"

    cluster.start_node(1)  # same slots, no data
    for srv in (a, b):
        wait_for(lambda srv=srv: get_json(srv.http("/healthz"))[0] == 200, timeout=10, what="healthz back")
    after = publish(a1, doomed, "after", "d-3")
    assert (after["type"], after["seq"]) == ("ack", 1)  # the shard's data was lost: numbering restarts...
    restarted = recv_type(b1, "error")  # ...in a new epoch, which members are told of before its messages
    assert (restarted["code"], restarted["room"]) == ("history_gone", doomed)
    assert restarted["epoch"] != epochs[doomed]
    got = recv_type(b1, "message")
    assert (got["seq"], got["data"]) == (1, "after")
    # Members were registered again on the restarted shard: a joiner sees everyone.
    assert sorted(join(client(b, "late"), doomed)["members"]) == ["a1", "b1", "late"]
    assert publish(a1, kept, "still", "k9")["seq"] == 5


def test_emitter_publishes_into_a_room_on_a_cluster(
    pair: tuple[ServerProcess, ServerProcess], redis_cluster: RedisClusterProcs, client: Client
) -> None:
    _, b = pair
    (name,) = rooms_on(redis_cluster, redis_cluster.nodes[0].port)
    member = client(b, "member")
    join(member, name)
    owner = redis_cluster.nodes[0].client()

    with Emitter(f"redis://127.0.0.1:{redis_cluster.nodes[1].port}", history=5) as emitter:  # any node will do
        assert emitter.publish(name, {"n": 1}, sender="cron") == 1
        before = command_calls(owner, "info")
        # Each publish runs on the room's shard, which looks its own life up (the Emitter passes none).
        assert [emitter.publish(name, {"n": n}, sender="cron") for n in (2, 3)] == [2, 3]
        assert command_calls(owner, "info") - before == 2 + 1  # one per publish, and the reading above
    for n in (1, 2, 3):
        got = recv_type(member, "message")
        assert (got["seq"], got["data"], got["from"]) == (n, {"n": n}, "cron")
    owner.close()


def test_a_room_whose_slot_moves_to_another_shard_follows_it_keeping_its_numbering(
    make_redis_cluster: Callable[..., RedisClusterProcs], make_server: Callable[..., ServerProcess], client: Client
) -> None:
    cluster = make_redis_cluster()
    env = {"REDIS_URL": cluster.url, "WSAPP_REDIS_CLUSTER": "1", "WSAPP_RATE_LIMIT": "0"}
    a, b = make_server(**env), make_server(**env)
    (name,) = rooms_on(cluster, cluster.nodes[1].port)
    channel = f"wsapp:room:{{{name}}}"
    alice, bob = client(a, "alice"), client(b, "bob")
    join(alice, name)
    epoch = join(bob, name)["epoch"]
    recv_type(alice, "presence")
    assert publish(alice, name, "before", "m1")["seq"] == 1
    assert recv_type(bob, "message")["data"] == "before"

    slot = int(cluster.nodes[0].client().execute_command("CLUSTER", "KEYSLOT", channel))
    cluster.move_slot(slot, source=1, target=0)  # its keys go with it: same counter, same epoch

    def acked() -> dict[str, Any] | None:
        answer = publish(alice, name, "after", "m2")  # `unavailable` while the room moves
        return answer if answer["type"] == "ack" else None

    assert wait_for(acked, timeout=10, what="a publish acked after the move")["seq"] == 2
    got = recv_json(bob)  # next, with no history_gone before it: the room kept its life
    assert (got["type"], got["seq"], got["data"]) == ("message", 2, "after")
    wait_for(lambda: cluster.nodes[0].client().execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 2,
             what="both processes subscribed on the new shard")
    assert join(client(b, "late"), name, since=0, epoch=epoch)["seq"] == 2
    assert all("rooms move to their new shards" in srv.log_text() for srv in (a, b))
