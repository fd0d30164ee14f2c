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
        members = self._members
        stats = self._stats
        share = self._share

        def on_message(sender: Connection, opcode: int, payload: bytes) -> None:
            if limiter is not None and not limiter.allow():
                # No error channel on the relay: a client over its rate is flooding.
                stats.rate_limited += 1
                sender.close(1008, "rate limit exceeded")
                return
            frame = encode_frame(opcode, payload)
            sent = 0
            for other in members:
                if other is not sender and other.send(frame):
                    sent += 1
            stats.messages_out += sent
            if share is not None:
                share(frame)

        members.add(conn)
        try:
            conn.serve(on_message)
        finally:
            members.discard(conn)

    def deliver_remote(self, frame: bytes) -> None:
        """A frame a client of another process sent: to every local client."""
        sent = 0
        for other in self._members:
            if other.send(frame):
                sent += 1
        self._stats.messages_out += sent


def serve_echo(conn: Connection, settings: Settings, stats: Stats) -> None:
    """`/echo`: every message straight back to its sender (conformance runs, health probes)."""
    limiter = rate_limiter(settings)

    def on_message(sender: Connection, opcode: int, payload: bytes) -> None:
        if limiter is not None and not limiter.allow():
            stats.rate_limited += 1
            sender.close(1008, "rate limit exceeded")
            return
        if sender.send(encode_frame(opcode, payload)):
            stats.messages_out += 1

    conn.serve(on_message)
