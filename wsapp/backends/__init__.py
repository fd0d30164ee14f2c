"""The broker: where room sequence numbers, history and other processes' members live, and how room
traffic reaches this process's members (in-process for memory, through Redis when shared)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, Self


class Deliver(Protocol):
    """Called with (room, seq, origin, payload) for every message (seq > 0) and presence event (seq 0)
    of a room with local members, in the room's seq order; `origin` is the id of the local member it
    came from (skipped unless it asked for echoes), None when it came from elsewhere.

    `early=True`: a broker delivering one of this process's publishes from its answer, before the
    copy its subscriber will get (which it then drops). The subscriber waits after each delivery
    while a local recipient is congested or the process is over its byte budget; the answer's reader
    must not, so early deliveries are refused (False, nothing delivered) while producers must wait,
    and the event comes through the subscriber in its turn. Otherwise True."""

    def __call__(self, room: str, seq: int, origin: str | None, payload: bytes, early: bool = False) -> bool: ...


# Called with a ready-made frame one of another process's relay (`/`) clients sent; also the type of
# the function that shares one of this process's relay frames with the others.
RelayFrames = Callable[[bytes], None]


class Seq(int):
    """Where a published message stands in its room, as brokers number it and every publish returns it
    (`rt.publish`, `ws.publish`, `Emitter.publish`): the message's seq, an int as it always was, with
    `.epoch`, the numbering life that seq belongs to (as in `joined` and `ack`): after a room's history
    is lost its numbers restart at 1 in a new epoch (see RoomView), so compare epochs before seqs."""

    epoch: str

    def __new__(cls, seq: int, epoch: str) -> Self:
        numbered = super().__new__(cls, seq)
        numbered.epoch = epoch
        return numbered

    @property
    def seq(self) -> int:
        return int(self)

    def __getnewargs__(self) -> tuple[int, str]:  # type: ignore[override]  # pickles with its epoch
        return int(self), self.epoch

    def __repr__(self) -> str:
        return f"Seq({int(self)}, epoch={self.epoch!r})"

    __str__ = int.__repr__  # str(), f-strings and templates show the number, as for any int


# Told how a publish that nobody waits for ended: (Seq, None) once numbered, (None, BrokerUnavailable)
# when it could not be (it did not run, or its outcome is unknown). Must not block.
Published = Callable[[Seq | None, BaseException | None], None]


class BrokerUnavailable(Exception):
    """A publish could not be numbered (the broker is unreachable, stalled or refused it); when the
    call timed out its outcome is unknown: it may still have been delivered."""


@dataclass
class RoomView:
    """What a joiner learns from the broker: the room's seq and epoch, its members, what it missed."""

    seq: int
    # Every process's members; None = the broker knows only this process's (the hub lists them).
    members: list[str] | None = None
    replay: list[bytes] = field(default_factory=list)
    history_gone: bool = False
    epoch: str = ""
    # True: the joiner's presence and everything after it come through `deliver` (the joiner's own
    # presence marking where the join happened in the room's order). False: the broker could not be
    # asked; the hub tells local members itself.
    delivered: bool = True


class Broker(Protocol):
    """Per-room sequence numbers and epochs, the last N messages, and delivery of every room event.

    All of a room's messages and presence reach local members through the `deliver` given to
    `attach`, in seq order; the hub only keeps membership and fans out what it is handed.
    """

    name: str
    # True: `deliver` runs inside publish/join/leave (in-process); False: from a subscriber of its own.
    inline: bool

    def attach(self, deliver: Deliver) -> None:
        """Start delivering room events to `deliver` (background work starts here, not before)."""

    def attach_relay(self, deliver: RelayFrames) -> RelayFrames | None:
        """Carry other processes' relay frames to `deliver`; return the function that shares this
        process's, or None when there are no other processes (the relay then stays local)."""

    def publish(self, room: str, head: bytes, tail: bytes, origin: str | None) -> Seq:
        """Number `head + seq + tail`, keep it and deliver it; returns its seq and epoch.
        BrokerUnavailable when it cannot be numbered now."""

    def publish_nowait(self, room: str, head: bytes, tail: bytes, origin: str | None, done: Published) -> None:
        """`publish` without waiting for the number: `done(Seq, None)` once numbered (in-process:
        before this returns), `done(None, BrokerUnavailable)` when it was not; BrokerUnavailable
        raised at once when the broker is known to be away. A caller's publishes into one room
        are numbered in the order it made them, and `done` is called in that order."""

    def join(
        self, room: str, member_id: str, name: str, presence: bytes | None, since: int | None, epoch: str | None
    ) -> RoomView:
        """Register a member; deliver `presence` (None on a repeated join); collect history after
        `since` when `epoch` (if given) is the room's."""

    def leave(self, room: str, member_id: str, presence: bytes) -> bool:
        """Forget a member and deliver its `presence` leave event; False when the hub must tell local
        members itself (the broker could not be asked)."""

    def room_emptied(self, room: str) -> None:
        """The last local member left `room`; the broker may forget it later to bound memory."""

    def close(self) -> None:
        """Stop background work and withdraw this process's members from shared state."""

    @property
    def healthy(self) -> bool:
        """False while a shared broker is unreachable."""

    @property
    def counters(self) -> dict[str, int]:
        """Monotonic counts of broker events for /stats and /metrics (name -> count)."""


# The name this interface had while it was only about history; kept for existing imports.
HistoryBackend = Broker
