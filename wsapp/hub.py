"""Rooms, members, presence and fan-out. No sockets, no gevent: members are anything with `send`.

Every message and presence event reaches local members through `deliver`, which the broker calls in
the room's seq order (synchronously for memory, from its subscription for Redis); the hub never
delivers a publish itself, so a room's order is the broker's, whichever process published.
A broadcast encodes its JSON and its frame once; every member gets the same `bytes` object.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from wsapp import protocol
from wsapp.backends import Broker, BrokerUnavailable, Published, Seq
from wsapp.exceptions import MessageError
from wsapp.metrics import Stats


class Member(Protocol):
    """What the hub needs of a connection."""

    id: str
    name: str

    def send(self, frame: bytes) -> bool:
        """Queue a ready-made frame; False if the member is closing and it was dropped."""


@dataclass
class JoinResult:
    seq: int
    members: list[str]
    replay: list[bytes] = field(default_factory=list)
    history_gone: bool = False
    epoch: str = ""


class JoinGate:
    """One member joining one room, between the broker's join and its `joined` going out.

    Room events delivered before the joiner's own presence event happened before the join (its seq
    and replay cover them) and are dropped; later ones wait until `joined` and the replay have been
    sent. So no `message` before `joined` and no seq twice, however late the broker's stream is.
    """

    __slots__ = ("announced", "echo", "held", "marked", "seq")

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.marked = False  # the joiner's own presence (or a later message) has gone past
        self.seq: int | None = None  # the room's seq at the join, once the broker answered
        self.announced = False  # `joined` and the replay are out
        self.held: list[bytes] = []

    def offer(self, seq: int, is_own_presence: bool, frame: bytes | None) -> bool:
        """Take one room event (frame None: not for this member); True once the joiner may go live."""
        if not self.marked:
            if is_own_presence:
                self.marked = True
                return self.announced
            if not (seq and self.seq is not None and seq > self.seq):
                return False  # before the join
            # A message numbered after the join, its presence lost on the way (a broker reconnect).
            self.marked = True
        if frame is not None:
            self.held.append(frame)
        return self.announced


def unavailable(exc: BaseException, msg_id: object = None) -> MessageError:
    """The `unavailable` error for a publish the broker could not number (BrokerUnavailable)."""
    return MessageError(protocol.UNAVAILABLE, f"{exc}; retry later", msg_id)


class Hub:
    """Room membership and delivery for one process."""

    def __init__(
        self,
        backend: Broker,
        frame: Callable[[bytes], bytes],
        stats: Stats,
        max_rooms: int,
        clock: Callable[[], float] = time.time,
        after_remote: Callable[[float, bool], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        must_wait: Callable[[], bool] | None = None,
    ) -> None:
        self._backend = backend
        self._frame = frame
        self._stats = stats
        self._max_rooms = max_rooms
        self._clock = clock
        # Called after each delivery from the broker's subscriber with when it began (monotonic): it
        # paces there, and times the fan-out. An inline broker delivers inside the publisher's own
        # call, and the publisher paces itself.
        self._after_remote = None if backend.inline else after_remote
        # Whether producers must wait now (see Deliver's `early`); None: never.
        self._must_wait = must_wait
        self._monotonic = monotonic
        # room -> {live member: echo}
        self._rooms: dict[str, dict[Member, bool]] = {}
        # room -> {member still joining: its gate}
        self._joining: dict[str, dict[Member, JoinGate]] = {}
        self._member_rooms: dict[Member, set[str]] = {}
        self._by_id: dict[str, Member] = {}
        backend.attach(self.deliver)

    @property
    def inline(self) -> bool:
        """Whether the broker numbers and delivers a publish inside the publisher's call (in-process)."""
        return self._backend.inline

    @property
    def room_count(self) -> int:
        return len(self._rooms.keys() | self._joining.keys())

    def rooms_of(self, member: Member) -> set[str]:
        return self._member_rooms.get(member, set())

    def members(self, room: str) -> list[str]:
        return [m.name for m in self._rooms.get(room, ())] + [m.name for m in self._joining.get(room, ())]

    def join(
        self,
        member: Member,
        room: str,
        since: int | None = None,
        echo: bool = False,
        epoch: str | None = None,
        announce: Callable[[JoinResult], None] | None = None,
    ) -> JoinResult:
        """Add `member` to `room` (idempotent), tell the others, and collect what it missed.

        `announce(result)` sends `joined` and the replay: the room's live traffic reaches the member
        only after it, each seq once."""
        joined = self._member_rooms.setdefault(member, set())
        if room not in joined and len(joined) >= self._max_rooms:
            raise MessageError(protocol.TOO_MANY_ROOMS, f"at most {self._max_rooms} rooms per connection")
        live = self._rooms.get(room)
        if (live is not None and member in live) or member in self._joining.get(room, {}):
            if live is not None and member in live:
                live[member] = echo
            view = self._call_join(room, member, None, since, epoch)
            result = self._result(room, view)
            if announce is not None:
                announce(result)
            return result
        joined.add(room)
        self._by_id[member.id] = member
        gate = JoinGate(echo)
        self._joining.setdefault(room, {})[member] = gate
        presence = protocol.presence(room, "join", member.name)
        try:
            view = self._call_join(room, member, presence, since, epoch)
        except BaseException:
            self._drop_gate(room, member)
            joined.discard(room)
            raise
        gate.seq = view.seq
        if not view.delivered:
            # The broker could not be asked: local members hear of the joiner from here.
            self._fan_out(room, presence, member)
            gate.marked = True
        result = self._result(room, view)
        if announce is not None:
            announce(result)
        gate.announced = True
        if gate.marked and self._joining.get(room, {}).get(member) is gate:
            self._go_live(room, member, gate)
        return result

    def _call_join(
        self, room: str, member: Member, presence: bytes | None, since: int | None, epoch: str | None
    ) -> Any:
        return self._backend.join(room, member.id, member.name, presence, since, epoch)

    def _result(self, room: str, view: Any) -> JoinResult:
        names = view.members if view.members is not None else self.members(room)
        return JoinResult(view.seq, names, view.replay, view.history_gone, view.epoch)

    def _go_live(self, room: str, member: Member, gate: JoinGate) -> None:
        self._drop_gate(room, member)
        self._rooms.setdefault(room, {})[member] = gate.echo
        sent = 0
        for frame in gate.held:
            if member.send(frame):
                sent += 1
        self._stats.messages_out += sent

    def _drop_gate(self, room: str, member: Member) -> None:
        gates = self._joining.get(room)
        if gates is not None:
            gates.pop(member, None)
            if not gates:
                del self._joining[room]

    def leave(self, member: Member, room: str) -> bool:
        """Remove `member` from `room`; False if it was not there."""
        members = self._rooms.get(room)
        if members is not None and member in members:
            del members[member]
            if not members:
                del self._rooms[room]
        elif member in self._joining.get(room, {}):
            self._drop_gate(room, member)
        else:
            return False
        self._member_rooms[member].discard(room)
        presence = protocol.presence(room, "leave", member.name)
        if not self._backend.leave(room, member.id, presence):
            self._fan_out(room, presence, member)
        if room not in self._rooms and room not in self._joining:
            self._backend.room_emptied(room)
        return True

    def leave_all(self, member: Member) -> None:
        for room in list(self._member_rooms.get(member, ())):
            self.leave(member, room)
        self._member_rooms.pop(member, None)
        if self._by_id.get(member.id) is member:
            del self._by_id[member.id]

    def publish(self, member: Member, room: str, data: Any, msg_id: object = None) -> Seq:
        """Deliver `data` from `member` to the room; returns the seq assigned (with its epoch)."""
        self._check_member(member, room, msg_id)
        return self.post(room, data, member.name, member, msg_id)

    def publish_nowait(self, member: Member, room: str, data: Any, done: Published, msg_id: object = None) -> None:
        """`publish` without waiting for the broker: `done(Seq(seq, epoch), None)` once the message
        is numbered, `done(None, BrokerUnavailable)` when it was not (see `unavailable`); in-process, before this
        returns. A member's publishes into a room are numbered in the order it made them.
        MessageError at once for what is refused without asking the broker."""
        self._check_member(member, room, msg_id)
        head, tail = self._message_parts(room, member.name, data)
        try:
            self._backend.publish_nowait(room, head, tail, member.id, done)
        except BrokerUnavailable as exc:
            raise unavailable(exc, msg_id) from None

    def _check_member(self, member: Member, room: str, msg_id: object) -> None:
        if room not in self._member_rooms.get(member, ()):
            raise MessageError(protocol.NOT_IN_ROOM, f"join {room!r} before publishing to it", msg_id)

    def _message_parts(self, room: str, sender: str, data: Any) -> tuple[bytes, bytes]:
        return protocol.message_parts(room, sender, int(self._clock() * 1000), data)

    def post(self, room: str, data: Any, sender: str, origin: Member | None = None, msg_id: object = None) -> Seq:
        """Number, keep and deliver `data` in `room` under the name `sender`, whether or not anyone
        here is in the room (server-side publishes); `origin` gets it only if it joined with echo.
        Returns its seq, with its epoch. MessageError `unavailable` when the broker cannot number it now."""
        head, tail = self._message_parts(room, sender, data)
        try:
            return self._backend.publish(room, head, tail, origin.id if origin is not None else None)
        except BrokerUnavailable as exc:
            raise unavailable(exc, msg_id) from None

    def deliver(self, room: str, seq: int, origin: str | None, payload: bytes, early: bool = False) -> bool:
        """One room event from the broker, in the room's order: to every live member (the origin only
        for its own message with echo on), and to the gates of members still joining. `early`: see
        `backends.Deliver` (refused while producers must wait; never waits)."""
        live = self._rooms.get(room)
        gates = self._joining.get(room)
        if not live and not gates:
            return True
        if early and self._must_wait is not None and self._must_wait():
            return False
        after_remote = self._after_remote
        arrived = self._monotonic() if after_remote is not None else 0.0
        skip = self._by_id.get(origin) if origin is not None else None
        frame = self._frame(payload)
        sent = 0
        if live:
            for other, echo in live.items():
                if (other is not skip or (echo and seq)) and other.send(frame):
                    sent += 1
        if gates:
            ready = []
            for other, gate in gates.items():
                own = other is skip
                for_it = not own or (gate.echo and seq > 0)
                if gate.offer(seq, own and seq == 0, frame if for_it else None):
                    ready.append((other, gate))
            for other, gate in ready:
                self._go_live(room, other, gate)
        if seq:  # messages, not presence, count as messages out
            self._stats.messages_out += sent
        if after_remote is not None:
            after_remote(arrived, not early)
        return True

    def _fan_out(self, room: str, payload: bytes, skip: Member | None = None) -> int:
        """Frame `payload` once and send it to the room's live members but `skip`; how many took it."""
        frame = self._frame(payload)
        sent = 0
        for other in self._rooms.get(room, ()):
            if other is not skip and other.send(frame):
                sent += 1
        return sent
