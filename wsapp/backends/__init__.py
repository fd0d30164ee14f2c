"""Where room sequence numbers and history live: in this process (memory) or shared (Redis)."""

from __future__ import annotations

from typing import Protocol


class HistoryBackend(Protocol):
    """Per-room sequence numbers and the last N messages, as the hub needs them."""

    name: str

    def next_seq(self, room: str) -> int:
        """Assign the next sequence number of `room` (1, 2, ...)."""

    def current_seq(self, room: str) -> int:
        """The last sequence number assigned in `room` (0 before the first message)."""

    def append(self, room: str, seq: int, payload: bytes) -> None:
        """Keep the encoded message `payload` with sequence number `seq`."""

    def since(self, room: str, seq: int) -> tuple[list[bytes], bool]:
        """Messages after `seq`, oldest first, and whether some of them were already evicted."""

    def room_emptied(self, room: str) -> None:
        """The last local member left `room`; the backend may forget it later to bound memory."""

    @property
    def healthy(self) -> bool:
        """False while a shared broker is unreachable."""
