"""`/`: the Node `ws` broadcast server's behaviour. Each message goes, same type and bytes, to every
other open client; the sender gets nothing back. With a shared backend (Redis) the frame also goes,
once, to the other processes, whose clients get it the same way."""

from __future__ import annotations

import logging

from wsapp.backends import HistoryBackend
from wsapp.config import Settings
from wsapp.connection import Connection
from wsapp.frames import encode_frame
from wsapp.metrics import Stats
from wsapp.ratelimit import TokenBucket

log = logging.getLogger(__name__)


def rate_limiter(settings: Settings) -> TokenBucket | None:
    """A fresh bucket for one connection, or None when WSAPP_RATE_LIMIT is 0."""
    return TokenBucket(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None


class RelayGroup:
    """The set of clients connected to `/`."""

    def __init__(self, settings: Settings, stats: Stats, backend: HistoryBackend | None = None) -> None:
        self._settings = settings
        self._stats = stats
        self._members: set[Connection] = set()
        # None = this process is alone (memory backend): the hot path below skips sharing entirely.
        self._share = backend.attach_relay(self.deliver_remote) if backend is not None else None

    def __len__(self) -> int:
        return len(self._members)

    def serve(self, conn: Connection) -> None:
        limiter = rate_limiter(self._settings)
        stats = self._stats
        share = self._share

        broadcast = self._broadcast

        def on_message(sender: Connection, opcode: int, payload: bytes) -> None:
            if flooding(limiter, sender, stats):
                return
            frame = encode_frame(opcode, payload)
            broadcast(frame, sender)
            if share is not None:
                share(frame)

        self._members.add(conn)
        try:
            conn.serve(on_message)
        finally:
            self._members.discard(conn)

    def deliver_remote(self, frame: bytes) -> None:
        """A frame a client of another process sent: to every local client."""
        self._broadcast(frame, None)

    def _broadcast(self, frame: bytes, sender: Connection | None) -> None:
        """The same frame to every client but `sender`, counted as deliveries."""
        sent = 0
        for other in self._members:
            if other is not sender and other.send(frame):
                sent += 1
        self._stats.messages_out += sent


def flooding(limiter: TokenBucket | None, conn: Connection, stats: Stats) -> bool:
    """Over its rate on a route with no error channel: the client is flooding, close it 1008."""
    if limiter is None or limiter.allow():
        return False
    stats.rate_limited += 1
    conn.close(1008, "rate limit exceeded")
    return True


def serve_echo(conn: Connection, settings: Settings, stats: Stats) -> None:
    """`/echo`: every message straight back to its sender (conformance runs, health probes)."""
    limiter = rate_limiter(settings)

    def on_message(sender: Connection, opcode: int, payload: bytes) -> None:
        if flooding(limiter, sender, stats):
            return
        if sender.send(encode_frame(opcode, payload)):
            stats.messages_out += 1

    conn.serve(on_message)
