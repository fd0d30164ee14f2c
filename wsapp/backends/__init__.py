"""Where room sequence numbers, history and remote members live: in this process (memory) or shared (Redis)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# Called with (room, payload) for each message or presence event another process published.
Deliver = Callable[[str, bytes], None]
# Called with a ready-made frame one of another process's relay (`/`) clients sent; also the type of
# the function that shares one of this process's relay frames with the others.
RelayFrames = Callable[[bytes], None]


@dataclass
class RoomView:
    """What a joiner learns from the backend: the room's seq, its members, and what it missed."""

    seq: int
    # Every process's members; None = the backend knows only this process's (the hub lists them).
    members: list[str] | None = None
    replay: list[bytes] = field(default_factory=list)
    history_gone: bool = False


class HistoryBackend(Protocol):
    """Per-room sequence numbers, the last N messages and (when shared) the other processes.

    The hub does all local delivery itself; a backend only assigns numbers, keeps history, and, when
    several processes share rooms, carries publishes and presence to the others.
    """

    name: str

    def attach(self, deliver: Deliver) -> None:
        """Start carrying other processes' messages and presence to `deliver`."""

    def attach_relay(self, deliver: RelayFrames) -> RelayFrames | None:
        """Carry other processes' relay frames to `deliver`; return the function that shares this
        process's, or None when there are no other processes (the relay then stays local)."""

    def publish(self, room: str, head: bytes, tail: bytes) -> tuple[int, bytes]:
        """Assign the next seq of `room`; keep and share `head + seq + tail`. Returns (seq, payload)."""

    def join(self, room: str, member_id: str, name: str, presence: bytes | None, since: int | None) -> RoomView:
        """Register a member; share `presence` (None on a repeated join); collect history after `since`."""

    def leave(self, room: str, member_id: str, presence: bytes) -> None:
        """Forget a member and share its `presence` leave event."""

    def room_emptied(self, room: str) -> None:
        """The last local member left `room`; the backend may forget it later to bound memory."""

    def close(self) -> None:
        """Stop background work and withdraw this process's members from shared state."""

    @property
    def healthy(self) -> bool:
        """False while a shared broker is unreachable."""

    @property
    def counters(self) -> dict[str, int]:
        """Monotonic counts of broker events for /stats and /metrics (name -> count)."""
