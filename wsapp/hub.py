"""Rooms, members, presence and fan-out. No sockets, no gevent: members are anything with `send`.

A broadcast encodes its JSON and its frame once; every member gets the same `bytes` object.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from wsapp import protocol
from wsapp.backends import HistoryBackend
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


class Hub:
    """Room membership and delivery for one process."""

    def __init__(
        self,
        backend: HistoryBackend,
        frame: Callable[[bytes], bytes],
        stats: Stats,
        max_rooms: int,
        clock: Callable[[], float] = time.time,
        after_remote: Callable[[], None] | None = None,
    ) -> None:
        self._backend = backend
        self._frame = frame
        self._stats = stats
        self._max_rooms = max_rooms
        self._clock = clock
        # Called after each delivery from another process (the broker's subscriber paces there).
        self._after_remote = after_remote
        # room -> {member: echo}
        self._rooms: dict[str, dict[Member, bool]] = {}
        self._member_rooms: dict[Member, set[str]] = {}
        backend.attach(self.deliver_remote)

    @property
    def room_count(self) -> int:
        return len(self._rooms)

    def rooms_of(self, member: Member) -> set[str]:
        return self._member_rooms.get(member, set())

    def members(self, room: str) -> list[str]:
        return [m.name for m in self._rooms.get(room, ())]

    def join(self, member: Member, room: str, since: int | None = None, echo: bool = False) -> JoinResult:
        """Add `member` to `room` (idempotent), tell the others, and collect what it missed."""
        joined = self._member_rooms.setdefault(member, set())
        if room not in joined and len(joined) >= self._max_rooms:
            raise MessageError(protocol.TOO_MANY_ROOMS, f"at most {self._max_rooms} rooms per connection")
        members = self._rooms.setdefault(room, {})
        is_new = member not in members
        members[member] = echo
        joined.add(room)
        presence = None
        if is_new:
            presence = protocol.presence(room, "join", member.name)
            self._fan_out(room, presence, member)
        view = self._backend.join(room, member.id, member.name, presence, since)
        names = view.members if view.members is not None else [m.name for m in members]
        return JoinResult(view.seq, names, view.replay, view.history_gone)

    def leave(self, member: Member, room: str) -> bool:
        """Remove `member` from `room`; False if it was not there."""
        members = self._rooms.get(room)
        if members is None or member not in members:
            return False
        del members[member]
        self._member_rooms[member].discard(room)
        presence = protocol.presence(room, "leave", member.name)
        if members:
            self._fan_out(room, presence, member)
        else:
            del self._rooms[room]
        self._backend.leave(room, member.id, presence)
        if not members:
            self._backend.room_emptied(room)
        return True

    def leave_all(self, member: Member) -> None:
        for room in list(self._member_rooms.get(member, ())):
            self.leave(member, room)
        self._member_rooms.pop(member, None)

    def publish(self, member: Member, room: str, data: Any, msg_id: object = None) -> int:
        """Deliver `data` from `member` to the room; returns the room sequence number assigned."""
        members = self._rooms.get(room)
        if members is None or member not in members:
            raise MessageError(protocol.NOT_IN_ROOM, f"join {room!r} before publishing to it", msg_id)
        return self.post(room, data, member.name, member)

    def post(self, room: str, data: Any, sender: str, origin: Member | None = None) -> int:
        """Number, keep and deliver `data` in `room` under the name `sender`, whether or not anyone
        here is in the room (server-side publishes); `origin` gets it only if it joined with echo."""
        head, tail = protocol.message_parts(room, sender, int(self._clock() * 1000), data)
        seq, payload = self._backend.publish(room, head, tail)
        members = self._rooms.get(room)
        if members:
            frame = self._frame(payload)
            sent = 0
            for other, echo in members.items():
                if (other is not origin or echo) and other.send(frame):
                    sent += 1
            self._stats.messages_out += sent
        return seq

    def deliver_remote(self, room: str, payload: bytes) -> None:
        """A message or presence event from another process: to every local member, framed once."""
        members = self._rooms.get(room)
        if not members:
            return
        self._stats.messages_out += self._fan_out(room, payload)
        if self._after_remote is not None:
            self._after_remote()

    def _fan_out(self, room: str, payload: bytes, skip: Member | None = None) -> int:
        """Frame `payload` once and send it to the room's members but `skip`; how many took it."""
        frame = self._frame(payload)
        sent = 0
        for other in self._rooms.get(room, ()):
            if other is not skip and other.send(frame):
                sent += 1
        return sent
