"""The Redis broker's wire format without Redis: keys, script calls, envelopes, echo suppression, cursors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wsapp.backends import redis_wire as wire
from wsapp.protocol import message_parts


def test_publish_call_names_the_rooms_keys_and_the_envelope_prefix() -> None:
    head, tail = message_parts("lobby", "server", 7, {"a": 1})
    call = wire.publish_call("p1.3", "lobby", head, tail, 50, "m7")
    assert call.keys == ["wsapp:room:{lobby}:ctr", "wsapp:room:{lobby}:log"]
    new_epoch = call.args[7]
    assert isinstance(new_epoch, str) and len(new_epoch) == 12
    assert call.args == [head, tail, 50, "p1.3 lobby ", "wsapp:room:{lobby}", wire.ROOM_TTL, "m7", new_epoch,
                         "PUBLISH", wire.UNKNOWN_LIFE]
    # A server passes the replication id its connection reported; the script looks it up without one.
    assert wire.publish_call("p1.3", "lobby", head, tail, 50, life="9f" * 20).args[9] == "9f" * 20
    # On a Redis Cluster the script announces on the room's sharded channel (same name, same slot).
    assert wire.publish_call("p1.3", "lobby", head, tail, 50, "m7", sharded=True).args[8] == "SPUBLISH"
    # What the script publishes (prefix + seq + " " + epoch + " " + origin + " " + payload) is an
    # envelope the subscriber reads back.
    payload = head + b"12" + tail
    published = call.args[3].encode() + b"12 e1 m7 " + payload  # type: ignore[union-attr]
    assert published == wire.envelope("p1.3", "lobby", 12, payload, epoch="e1", origin="m7")
    assert wire.parse_envelope(published) == wire.Envelope(b"p1.3", "lobby", 12, "e1", "m7", payload)
    assert wire.message_seq(payload) == 12
    # Server-side publishes have no origin; every call proposes a fresh epoch for a missing counter.
    other = wire.publish_call("p1.3", "lobby", head, tail, 50)
    assert other.args[6] == "-" and other.args[7] != new_epoch


def test_join_call_with_and_without_presence_since_and_epoch() -> None:
    call = wire.join_call("p1.0", "r", "m9", "alice", b'{"type":"presence"}', 4, "e1")
    # Every key the script touches is handed to it, all in the room's slot (Redis Cluster).
    assert call.keys == ["wsapp:room:{r}:ctr", "wsapp:room:{r}:log", "wsapp:room:{r}:members", "wsapp:room:{r}:procs"]
    assert call.args[:7] == [
        "p1.0:m9", "alice", 4, b'p1.0 r 0 - m9 {"type":"presence"}', "wsapp:room:{r}", wire.PROC_TTL * 1000, 60
    ]
    assert call.args[8:] == ["e1", "PUBLISH", wire.UNKNOWN_LIFE, 0]
    assert wire.join_call("p1.0", "r", "m9", "alice", None, None, history=50).args[11] == 50
    assert wire.join_call("p1.0", "r", "m9", "alice", None, None, life="9f" * 20).args[10] == "9f" * 20
    assert wire.join_call("p1.0", "r", "m9", "alice", None, None, sharded=True).args[9] == "SPUBLISH"
    again = wire.join_call("p1.0", "r", "m9", "alice", None, None)
    assert again.args[2:4] == [-1, b""]  # no since, no presence on a repeated join
    assert again.args[8] == ""  # no epoch from the client


def test_channels_and_process_keys() -> None:
    assert wire.channel_room(wire.room_channel("a:b.c-d_e").encode()) == "a:b.c-d_e"
    assert wire.channel_room(wire.RELAY_CHANNEL.encode()) is None
    assert wire.catch_up_call("r", 41, "e1", 100) == wire.ScriptCall(
        ["wsapp:room:{r}:ctr", "wsapp:room:{r}:log"], [41, "e1", 100])
    assert wire.heartbeat_call("abc.2", "r") == wire.ScriptCall(
        ["wsapp:room:{r}:members", "wsapp:room:{r}:procs"], ["abc.2", wire.PROC_TTL * 1000, wire.MEMBERS_TTL])
    assert wire.member_field("abc.2", "m1") == "abc.2:m1"


def test_envelope_payload_keeps_spaces_and_any_bytes() -> None:
    payload = b'{"data":"a b  c"} \x00\xff'
    message = wire.parse_envelope(wire.envelope("x.1", "r:1", 0, payload))
    assert (message.room, message.seq, message.origin, message.payload, message.is_relay) == (
        "r:1", 0, None, payload, False
    )


def test_relay_envelope_carries_the_frame_unchanged() -> None:
    frame = b"\x82\x03a b"
    message = wire.parse_envelope(wire.relay_prefix("x.1") + frame)
    assert message.is_relay
    assert message.payload == frame


@pytest.mark.parametrize(
    "data", [b"", b"x.1 r", b"x.1 r 5", b"x.1 r 5 e", b"x.1 r 5 e o", b"x.1 r five e o payload", b"x.1 \xff 1 e o p"]
)
def test_malformed_envelopes_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        wire.parse_envelope(data)


def test_echo_suppression_covers_every_incarnation_and_no_other_process() -> None:
    me = wire.BusIdentity("abc")
    first = wire.envelope(me.incarnation, "r", 1, b"x")
    assert me.next_incarnation() == "abc.1"
    assert me.is_echo(first)  # an old incarnation's message still is this process's own
    assert me.is_echo(wire.envelope(me.incarnation, "r", 2, b"x"))
    # A process whose id merely starts with ours is someone else.
    assert not me.is_echo(wire.envelope("abcd.0", "r", 3, b"x"))
    assert not me.is_echo(wire.envelope(wire.BusIdentity().incarnation, "r", 3, b"x"))


def test_fresh_identities_differ() -> None:
    assert len({wire.BusIdentity().process_id for _ in range(50)}) == 50


def test_cursors_drop_repeats_and_notice_a_new_life() -> None:
    cursors = wire.Cursors()
    cursors.start("r", "e1", 5)
    assert cursors.offer("r", 0, "-") is wire.Verdict.DELIVER  # presence is never held back
    assert cursors.offer("r", 5, "e1") is wire.Verdict.REPEAT  # covered by the join
    assert cursors.offer("r", 6, "e1") is wire.Verdict.DELIVER
    assert cursors.offer("r", 6, "e1") is wire.Verdict.REPEAT  # a catch-up met the live stream
    assert cursors.position("r") == ("e1", 6)
    cursors.start("r", "e1", 3)  # a later join does not move a running cursor back
    assert cursors.position("r") == ("e1", 6)
    assert cursors.offer("r", 1, "e2") is wire.Verdict.RESTARTED  # the counter was lost in Redis
    assert cursors.offer("r", 2, "e2") is wire.Verdict.DELIVER
    cursors.forget("r")
    assert cursors.position("r") is None
    assert cursors.offer("r", 9, "e2") is wire.Verdict.DELIVER  # nothing known: take the stream as it is


def test_imports_neither_gevent_nor_redis() -> None:
    code = "import sys, wsapp.backends.redis_wire; print(sorted(m for m in ('gevent', 'redis') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "[]"



def test_pack_command_sends_what_redis_py_would() -> None:
    from redis._parsers.encoders import Encoder
    from redis.connection import PythonRespSerializer

    from wsapp.backends.redis_stream import pack_command

    serializer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    for args in [("PING",), (b"EVALSHA", "abc", 2, "k1", "k{é}", b"\x00\r\n", 0, -5, b"x" * 70000, "")]:
        assert pack_command(args) == b"".join(serializer.pack(*args))


def test_epoch_proposals_never_repeat_within_or_across_processes() -> None:
    first, second = wire.EpochProposals(), wire.EpochProposals()
    proposed = [first.propose() for _ in range(1000)] + [second.propose() for _ in range(1000)]
    assert len(set(proposed)) == len(proposed)
    call = wire.publish_call("p1.3", "lobby", b"h", b"t", 50, None, proposed[0])
    assert call.args[7] == proposed[0]


def test_rosters_deliver_only_news_and_resync_to_the_broker_list() -> None:
    rosters = wire.Rosters()
    assert rosters.apply("r", "join", "m1", "ann")  # a room not followed: everything is delivered
    rosters.start("r", {"m1": "ann", "m2": "bob"})
    rosters.start("r", {"m9": "other"})  # already followed: the first list stays
    assert not rosters.apply("r", "join", "m1", "ann")  # listed already (the join's own list had it)
    assert rosters.apply("r", "join", "m3", "ann")  # same name, another member
    assert rosters.apply("r", "leave", "m2", "bob")
    assert not rosters.apply("r", "leave", "m2", "bob")  # twice: nothing new
    assert sorted(rosters.names("r") or []) == ["ann", "ann"]
    # The broker's list after a reconnection: m3 left and cid joined meanwhile; leaves come first.
    assert rosters.resync("r", {"m1": "ann", "m4": "cid"}) == [("leave", "ann"), ("join", "cid")]
    # The same period's events, arriving afterwards on the subscription, tell nothing twice.
    assert not rosters.apply("r", "leave", "m3", "ann")
    assert not rosters.apply("r", "join", "m4", "cid")
    assert rosters.resync("unfollowed", {"m1": "ann"}) == []
    rosters.forget("r")
    assert rosters.names("r") is None and rosters.rooms() == []
    assert wire.field_member(b"p1.3:m7") == (b"p1.3", "m7")


def test_publish_commands_pack_what_publish_call_would() -> None:
    from wsapp.backends.redis_stream import pack_command

    commands = wire.PublishCommands("ab" * 20, 50)
    head, tail = message_parts("lobby", "server", 7, {"a": "é"})
    cases = (("p1.3", "m7", ""), ("p1.3", None, ""), ("p1.4", "m7", "9f" * 20), ("p1.4", "m7", "-"))
    for incarnation, origin, life in cases:  # a new incarnation, a new connection's life, too
        call = wire.publish_call(incarnation, "lobby", head, tail, 50, origin, "e1", life=life)
        expected = pack_command((b"EVALSHA", "ab" * 20, 2, *call.keys, *call.args))
        assert commands.command(incarnation, "lobby", head, tail, origin, "e1", life) == expected
    sharded = wire.PublishCommands("ab" * 20, 50, sharded=True)  # a Cluster: SPUBLISH from the script
    call = wire.publish_call("p1.3", "lobby", head, tail, 50, "m7", "e1", sharded=True)
    expected = pack_command((b"EVALSHA", "ab" * 20, 2, *call.keys, *call.args))
    assert sharded.command("p1.3", "lobby", head, tail, "m7", "e1") == expected


def test_relay_commands_pack_what_pack_command_would() -> None:
    from wsapp.backends.redis_stream import pack_command

    commands = wire.RelayCommands()
    for incarnation, frame in (("p1.3", b"hello"), ("p1.3", b""), ("p1.4", bytes(range(256)) * 3)):
        expected = pack_command((b"PUBLISH", wire.RELAY_CHANNEL, wire.relay_prefix(incarnation) + frame))
        assert commands.command(incarnation, frame) == expected
    sharded = wire.RelayCommands(sharded=True)
    expected = pack_command((b"SPUBLISH", wire.RELAY_CHANNEL, wire.relay_prefix("p1.3") + b"x"))
    assert sharded.command("p1.3", b"x") == expected


def test_replication_life_is_the_replication_id_and_on_a_cluster_the_node_id_too() -> None:
    info = (b"# Replication\r\nrole:master\r\nconnected_slaves:1\r\nmaster_failover_state:no-failover\r\n"
            b"master_replid:" + b"9f" * 20 + b"\r\nmaster_replid2:" + b"0" * 40 + b"\r\n")
    assert wire.replication_life(info) == ("master", "9f" * 20)
    assert wire.replication_life(info, b"ab" * 20) == ("master", "ab" * 20 + "-" + "9f" * 20)
    assert wire.replication_life(b"# Replication\r\nrole:slave\r\n") == ("slave", wire.NO_LIFE)


def test_a_cursor_says_which_message_is_a_rooms_next() -> None:
    cursors = wire.Cursors()
    assert not cursors.is_next("r", 1, "e1")  # a room without a cursor: its first event goes by the subscription
    cursors.start("r", "e1", 4)
    assert cursors.is_next("r", 5, "e1")
    assert not cursors.is_next("r", 6, "e1")  # 5 is still on its way
    assert not cursors.is_next("r", 5, "e2")  # another epoch: the subscription tells members it restarted
    assert not cursors.is_next("r", 4, "e1")
    assert cursors.offer("r", 5, "e1") is wire.Verdict.DELIVER
    assert cursors.offer("r", 5, "e1") is wire.Verdict.REPEAT  # the subscription's copy of an early delivery
    assert cursors.is_next("r", 6, "e1")
