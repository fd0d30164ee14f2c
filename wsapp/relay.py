"""`/`: the Node `ws` broadcast server's behaviour. Each message goes, same type and bytes, to every
other open client; the sender gets nothing back. With a shared backend (Redis) the frame also goes,
once, to the other processes, whose clients get it the same way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from wsapp.backends import HistoryBackend
from wsapp.config import Settings
from wsapp.connection import Connection, MessageHandler
from wsapp.frames import encode_frame
from wsapp.metrics import Stats

log = logging.getLogger(__name__)


class RelayGroup:
    """The set of clients connected to `/`."""

    def __init__(
        self, settings: Settings, stats: Stats, backend: HistoryBackend | None = None,
        after_remote: Callable[[float], None] | None = None,
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._after_remote = after_remote
        # Insertion-ordered (a dict, not a set): the fan-out goes out in connection order, as Node's
        # `ws` iterates its clients.
        self._members: dict[Connection, None] = {}
        # None = this process is alone (memory backend): the hot path below skips sharing entirely.
        self._share = backend.attach_relay(self.deliver_remote) if backend is not None else None

    def __len__(self) -> int:
        return len(self._members)

    def attach(self, conn: Connection) -> tuple[MessageHandler, Callable[[Connection], None]]:
        """Add a client: what to call with each of its messages, and at its end."""
        share = self._share
        broadcast = self._broadcast

        def on_message(opcode: int, payload: bytes) -> None:
            frame = encode_frame(opcode, payload)
            broadcast(frame, conn)
            if share is not None:
                share(frame)

        self._members[conn] = None
        return on_message, self._discard

    def _discard(self, conn: Connection) -> None:
        self._members.pop(conn, None)

    def deliver_remote(self, frame: bytes) -> None:
        """A frame a client of another process sent: to every local client."""
        arrived = time.monotonic()
        self._broadcast(frame, None)
        if self._after_remote is not None:
            self._after_remote(arrived)

    def _broadcast(self, frame: bytes, sender: Connection | None) -> None:
        """The same frame to every client but `sender`, counted as deliveries."""
        sent = 0
        for other in self._members:
            if other is not sender and other.send(frame):
                sent += 1
        self._stats.messages_out += sent


def echo_handler(conn: Connection, stats: Stats) -> MessageHandler:
    """`/echo`: every message straight back to its sender (conformance runs, health probes)."""

    def on_message(opcode: int, payload: bytes) -> None:
        if conn.send(encode_frame(opcode, payload)):
            stats.messages_out += 1

    return on_message
