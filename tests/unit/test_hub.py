from __future__ import annotations

import json
import pickle
import subprocess
import sys

import orjson
import pytest

from wsapp.backends import Seq
from wsapp.backends.memory import MemoryBackend
from wsapp.exceptions import MessageError
from wsapp.hub import Hub
from wsapp.metrics import Stats
from wsapp.websocket import JoinedRoom


class FakeMember:
    """A member that records frames (the hub's only contract with connections is `send`)."""

    def __init__(self, name: str, accept: bool = True) -> None:
        self.id = name
        self.name = name
        self.frames: list[bytes] = []
        self.accept = accept

    def send(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return self.accept

    def messages(self) -> list[dict]:
        return [json.loads(f) for f in self.frames]


def make_hub(history: int = 10, max_rooms: int = 4) -> tuple[Hub, Stats]:
    stats = Stats()
    return Hub(MemoryBackend(history), lambda payload: payload, stats, max_rooms, clock=lambda: 12.5), stats


def test_publish_encodes_once_and_shares_the_bytes() -> None:
    hub, stats = make_hub()
    a, b, c = FakeMember("a"), FakeMember("b"), FakeMember("c")
    for m in (a, b, c):
        hub.join(m, "r")
    a.frames.clear(), b.frames.clear(), c.frames.clear()
    assert hub.publish(a, "r", {"x": 1}) == 1
    assert a.frames == []
    assert b.frames[0] is c.frames[0]  # the very same bytes object
    assert b.messages() == [{"type": "message", "room": "r", "seq": 1, "from": "a", "ts": 12500, "data": {"x": 1}}]
    assert stats.messages_out == 2


def test_presence_and_members() -> None:
    hub, _ = make_hub()
    a, b = FakeMember("a"), FakeMember("b")
    assert hub.join(a, "r").members == ["a"]
    assert hub.join(b, "r").members == ["a", "b"]
    assert a.messages() == [{"type": "presence", "room": "r", "event": "join", "who": "b"}]
    hub.join(b, "r")  # joining twice is idempotent: no second presence
    assert len(a.frames) == 1
    assert hub.leave(b, "r")
    assert a.messages()[-1] == {"type": "presence", "room": "r", "event": "leave", "who": "b"}
    assert not hub.leave(b, "r")
    hub.leave_all(a)
    assert hub.room_count == 0


def test_echo_flag_and_not_in_room() -> None:
    hub, _ = make_hub()
    a = FakeMember("a")
    hub.join(a, "r", echo=True)
    hub.publish(a, "r", "me")
    assert a.messages()[-1]["data"] == "me"
    with pytest.raises(MessageError) as info:
        hub.publish(a, "other", 1, msg_id="q")
    assert info.value.code == "not_in_room" and info.value.msg_id == "q"


def test_history_since_and_gone() -> None:
    hub, _ = make_hub(history=3)
    a = FakeMember("a")
    hub.join(a, "r")
    for i in range(5):
        hub.publish(a, "r", i)
    late = FakeMember("late")
    result = hub.join(late, "r", since=3)
    assert result.seq == 5 and not result.history_gone
    assert [json.loads(p)["seq"] for p in result.replay] == [4, 5]
    result = hub.join(FakeMember("later"), "r", since=0)
    assert result.history_gone and [json.loads(p)["seq"] for p in result.replay] == [3, 4, 5]
    assert not hub.join(FakeMember("x"), "r", since=2).history_gone


def test_room_limit_per_member() -> None:
    hub, _ = make_hub(max_rooms=2)
    a = FakeMember("a")
    hub.join(a, "r1")
    hub.join(a, "r2")
    hub.join(a, "r2")  # already in: allowed
    with pytest.raises(MessageError) as info:
        hub.join(a, "r3")
    assert info.value.code == "too_many_rooms"


def test_closing_members_are_not_counted_as_deliveries() -> None:
    hub, stats = make_hub()
    a, gone = FakeMember("a"), FakeMember("gone", accept=False)
    hub.join(a, "r")
    hub.join(gone, "r")
    hub.publish(a, "r", 1)
    assert stats.messages_out == 0


def test_idle_room_history_is_bounded() -> None:
    backend = MemoryBackend(history=5, max_idle_rooms=2)
    for room in ("r1", "r2", "r3"):
        backend.append(room, backend.next_seq(room), b"m")
        backend.room_emptied(room)
    assert backend.current_seq("r1") == 0  # forgotten, oldest idle room
    assert backend.current_seq("r3") == 1
    # A client that saw r1 up to 1 learns its history is gone.
    assert backend.since("r1", 1) == ([], True)


def test_sans_io_modules_import_neither_gevent_nor_flask() -> None:
    code = (
        "import sys\n"
        "import wsapp.frames, wsapp.protocol, wsapp.hub, wsapp.backends.memory, wsapp.ratelimit\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'flask', 'werkzeug'))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


class LateBroker(MemoryBackend):
    """A broker whose stream lags behind its replies (as Redis's subscription can): the test hands
    the hub each room event itself, in the room's order, whenever it likes."""

    inline = False

    def __init__(self) -> None:
        super().__init__(history=10)
        self.stream: list[tuple[str, int, str | None, bytes]] = []

    def attach(self, deliver: object) -> None:
        self._deliver = lambda *event: self.stream.append(event)


def test_a_join_under_traffic_gets_joined_first_then_each_later_seq_once() -> None:
    broker = LateBroker()
    hub = Hub(broker, lambda payload: payload, Stats(), 4)
    old, talker = FakeMember("old"), FakeMember("talker")
    hub.join(old, "r")
    hub.join(talker, "r")
    for event in broker.stream:
        hub.deliver(*event)
    broker.stream.clear()
    hub.publish(talker, "r", "before")  # numbered 1, not yet delivered when the joiner arrives
    joiner = FakeMember("new")
    frames: list[bytes] = []

    def announce(result: object) -> None:
        # The stream catches up while the joiner's `joined` is being sent: nothing may overtake it.
        hub.deliver(*broker.stream[0])  # seq 1: before the join, covered by its replay
        hub.deliver(*broker.stream[1])  # the joiner's own presence: the join's place in the order
        hub.publish(talker, "r", "after")
        hub.deliver(*broker.stream[2])  # seq 2: after the join, held
        frames.append(b"joined")
        frames.extend(joiner.frames)

    result = hub.join(joiner, "r", since=0, announce=announce)
    assert (result.seq, [json.loads(p)["seq"] for p in result.replay]) == (1, [1])
    assert frames == [b"joined"]  # nothing reached the joiner before its `joined`
    assert [(m["type"], m.get("seq")) for m in joiner.messages()] == [("message", 2)]
    # The old member got everything once, in order; the talker none of its own (no echo).
    assert [(m["type"], m.get("seq")) for m in old.messages()] == [
        ("presence", None), ("message", 1), ("presence", None), ("message", 2)
    ]
    assert talker.messages() == [{"type": "presence", "room": "r", "event": "join", "who": "new"}]
    hub.publish(talker, "r", "live")
    hub.deliver(*broker.stream[3])
    assert [m["seq"] for m in joiner.messages()] == [2, 3]


def test_a_joiner_whose_presence_is_lost_goes_live_on_the_first_later_message() -> None:
    broker = LateBroker()
    hub = Hub(broker, lambda payload: payload, Stats(), 4)
    talker, joiner = FakeMember("talker"), FakeMember("new")
    hub.join(talker, "r")
    hub.deliver(*broker.stream[0])
    result = hub.join(joiner, "r")
    assert result.epoch == broker.join("r", "x", "x", None, None, None).epoch
    hub.publish(talker, "r", 1)
    hub.deliver(*broker.stream[-1])  # the joiner's presence never came (a reconnect lost it)
    assert [m["seq"] for m in joiner.messages()] == [1]


def test_epochs_gate_replay_in_memory() -> None:
    hub, _ = make_hub()
    a = FakeMember("a")
    epoch = hub.join(a, "r").epoch
    hub.publish(a, "r", 1)
    assert len(hub.join(FakeMember("b"), "r", since=0, epoch=epoch).replay) == 1
    other = hub.join(FakeMember("c"), "r", since=0, epoch="another-life")
    assert other.history_gone and other.replay == []
    assert MemoryBackend(10).join("r", "x", "x", None, None, None).epoch != epoch  # a restart is a new epoch


def test_a_posted_seq_is_an_int_that_carries_its_epoch() -> None:
    """`rt.publish`, `ws.publish` and the Emitter return a `Seq`: code that took the seq for an int
    keeps working (arithmetic, comparisons, str, JSON, pickle), and `.epoch` says which numbering it is."""
    hub, _ = make_hub()
    epoch = hub.join(FakeMember("a"), "r").epoch
    seq = hub.post("r", {"n": 1}, "server")
    assert isinstance(seq, Seq) and isinstance(seq, int)
    assert (seq, seq.seq, seq + 1, seq.epoch) == (1, 1, 2, epoch)
    assert (str(seq), f"{seq}", f"{seq:03d}", repr(seq)) == ("1", "1", "001", f"Seq(1, epoch={epoch!r})")
    assert json.dumps({"seq": seq}) == '{"seq": 1}' and orjson.dumps(seq) == b"1"
    again = pickle.loads(pickle.dumps(seq))
    assert (again, again.epoch) == (1, epoch)
    assert hub.post("r", 2, "server") == 2 and hub.post("other", 3, "server").epoch != epoch
    # A member's publish too; and JoinedRoom (ws.join) prints as the number it is.
    member = FakeMember("b")
    hub.join(member, "r")
    assert hub.publish(member, "r", 4).epoch == epoch
    assert str(JoinedRoom(3, epoch)) == "3"


def test_an_early_delivery_is_refused_while_producers_must_wait_and_never_waits_itself() -> None:
    """A broker delivering its own publish from the publish's answer (`early`) is not its subscriber:
    while a recipient is congested (or the process over budget) the hub refuses, so the event comes
    through the subscriber, which waits; when it accepts, it times the fan-out but does not pace."""
    broker = LateBroker()
    after: list[bool] = []
    busy = [False]
    hub = Hub(broker, lambda payload: payload, Stats(), 4, after_remote=lambda arrived, pace: after.append(pace),
              must_wait=lambda: busy[0])
    member = FakeMember("m")
    hub.join(member, "r")
    for event in broker.stream:  # the member's own presence: it goes live
        hub.deliver(*event)
    member.frames.clear(), after.clear()

    busy[0] = True
    assert hub.deliver("r", 1, "someone-else", b"one", early=True) is False
    assert (member.frames, after) == ([], [])  # nothing delivered, nothing timed, nobody waited
    assert hub.deliver("r", 1, "someone-else", b"one") is True  # the subscriber's turn: it paces
    assert (member.frames, after) == ([b"one"], [True])
    busy[0] = False
    assert hub.deliver("r", 2, "someone-else", b"two", early=True) is True
    assert (member.frames, after) == ([b"one", b"two"], [True, False])
    assert hub.deliver("empty-room", 1, None, b"x", early=True) is True  # no local members: nothing to refuse
