"""Who is connected: the counts behind the connection limits, the heartbeat, and the drain on shutdown."""

from __future__ import annotations

import logging
import time
from collections import Counter

import gevent
from gevent.event import Event

from wsapp.config import Settings
from wsapp.connection import CAUSE_DRAIN, CAUSE_PING_TIMEOUT, CAUSE_TOKEN_EXPIRED, Connection, Outbox
from wsapp.exceptions import Refuse
from wsapp.frames import CloseCode
from wsapp.metrics import Stats

log = logging.getLogger(__name__)


class Registry:
    """All open connections of this process, and one ticker greenlet that watches them.

    One ticker for all connections (rather than a timer greenlet each) keeps 10,000 idle
    connections cheap: it pings the quiet ones, drops the silent ones, and ends slow consumers and
    closing handshakes that overstay.
    """

    def __init__(self, settings: Settings, stats: Stats, outbox: Outbox | None = None) -> None:
        self._settings = settings
        self._stats = stats
        self._outbox = outbox
        self._conns: set[Connection] = set()
        self._per_ip: Counter[str] = Counter()
        self._ticker: gevent.Greenlet | None = None
        self._empty = Event()
        self._empty.set()
        self.draining = False
        self.tick_seconds = max(0.02, min(1.0, settings.ping_interval / 4, settings.slow_consumer_grace / 4 or 1.0))

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._conns))

    def refusal(self, remote_ip: str) -> Refuse | None:
        """The refusal (HTTP status and reason) for a new connection from `remote_ip`, or None."""
        if len(self._conns) >= self._settings.max_connections:
            return Refuse(503, "server is at its connection limit", [("Retry-After", "5")], "connection_limit")
        if self._per_ip[remote_ip] >= self._settings.max_connections_per_ip:
            return Refuse(429, "too many connections from your address", [("Retry-After", "5")], "per_ip_limit")
        return None

    def add(self, conn: Connection) -> None:
        self._conns.add(conn)
        self._per_ip[conn.remote_ip] += 1
        self._stats.connections = len(self._conns)
        self._stats.connections_total += 1
        self._empty.clear()
        if self._ticker is None:
            self._ticker = gevent.spawn(self._tick_forever)

    def remove(self, conn: Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            self._per_ip[conn.remote_ip] -= 1
            if not self._per_ip[conn.remote_ip]:
                del self._per_ip[conn.remote_ip]
            self._stats.connections = len(self._conns)
            self._stats.bytes_out += conn.bytes_out
            if not self._conns:
                self._empty.set()

    def bytes_out(self) -> int:
        """Bytes handed to the kernel so far for the connections still open."""
        return sum(conn.bytes_out for conn in self._conns)

    def _tick_forever(self) -> None:
        while True:
            gevent.sleep(self.tick_seconds)
            try:
                self.tick(time.monotonic())
            except Exception:  # the watchdog must outlive any one connection's trouble
                log.exception("heartbeat tick failed")

    def tick(self, now: float) -> None:
        interval = self._settings.ping_interval
        timeout = self._settings.ping_timeout
        grace = self._settings.slow_consumer_grace
        wall = time.time()
        for conn in list(self._conns):
            if conn.close_deadline is not None:
                if now >= conn.close_deadline:
                    conn.abort()
                continue
            if conn.expires_at is not None and wall >= conn.expires_at:
                log.info("conn %s token expired, closing", conn.id)
                conn.close(CloseCode.POLICY_VIOLATION, "token expired", CAUSE_TOKEN_EXPIRED)
                continue
            if conn.reading_paused:
                conn.last_seen = now  # its handler is behind, not the peer: unread is not silent
            if now - conn.last_seen >= timeout:
                self._stats.ping_timeouts += 1
                log.info("conn %s silent for %.1fs, dropping", conn.id, now - conn.last_seen)
                conn.terminate(CloseCode.GOING_AWAY, "ping timeout", CAUSE_PING_TIMEOUT)
            elif conn.over_capacity_since is not None and now - conn.over_capacity_since >= grace:
                conn.kick_slow_consumer()
            elif now - conn.last_seen >= interval and now - conn.last_ping >= interval:
                conn.ping()
        outbox = self._outbox
        if outbox is not None and outbox.over_budget_since is not None and now - outbox.over_budget_since >= grace:
            self._shed(outbox)

    def _shed(self, outbox: Outbox) -> None:
        """The process has been over WSAPP_MAX_QUEUED_BYTES past the grace: close the largest backlogs
        (1013) until it is back under half, so producers move again and memory stays bounded."""
        log.warning("%d bytes queued in the process for %.1fs: closing the slowest clients",
                    outbox.queued, self._settings.slow_consumer_grace)
        for conn in sorted(self._conns, key=lambda c: c.unsent_bytes, reverse=True):
            if outbox.over_budget_since is None or conn.unsent_bytes == 0:
                break
            conn.kick_slow_consumer()

    def drain(self, deadline: float) -> None:
        """Close every connection with 1001 after what is queued for it, and wait until they end."""
        self.draining = True
        for conn in list(self._conns):
            conn.close(CloseCode.GOING_AWAY, "going away", CAUSE_DRAIN)
        self._empty.wait(max(0.0, deadline - time.monotonic()))
        for conn in list(self._conns):
            conn.abort()
