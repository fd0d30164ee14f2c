"""One WebSocket connection: the only code that reads from or writes to an upgraded socket.

Reading happens in the connection's own greenlet (the WSGI request greenlet). Writing goes through
the connection's bounded backlog: `send()` appends a ready-made frame and marks the connection
dirty; once per event-loop turn the process-wide `Outbox` hands each dirty connection's whole
backlog to the kernel in one non-blocking `send`. Only when the kernel buffer is full does a
connection get a writer greenlet of its own, which finishes the job with a blocking `sendall`.
So a broadcast to N clients costs N list appends plus one syscall per client per loop turn,
frames queued in the same turn are coalesced, and an idle connection costs no writer greenlet.
When the process is idle, a lone message skips the backlog and is written through (see Outbox).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event

from wsapp.config import Settings
from wsapp.exceptions import FrameError
from wsapp.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameEvent, FrameParser, encode_close, encode_frame
from wsapp.metrics import Stats

log = logging.getLogger(__name__)

READ_CHUNK = 65536
# How long a closing handshake may take before the socket is simply shut.
CLOSE_TIMEOUT = 3.0

# Called with (opcode, payload) for each data message: OP_TEXT (validated UTF-8 bytes) or OP_BINARY.
MessageHandler = Callable[[int, bytes], None]


# A message that arrives after this long without any fan-out is written through at once.
IDLE_GAP = 0.002


class Outbox:
    """Coalesces writes: every connection marked during one loop turn is flushed once, right after.

    When the process is idle (no fan-out for IDLE_GAP) a lone incoming message is instead written
    through: each recipient's frame goes to its socket as the fan-out loop reaches it, the way
    Node's `ws` does, which saves the first recipients the wait for the whole loop. Under load,
    coalescing wins (several frames per send), so write-through switches itself off.
    """

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._scheduled = False
        self.write_through = False
        self.last_busy = 0.0

    def mark(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._flush)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for conn in dirty:
            try:
                conn.flush_nowait()
            except Exception:  # one connection's failure must not leave the others unflushed
                log.exception("conn %s failed to flush", conn.id)
                conn.abort()
        self.last_busy = time.monotonic()


class Connection:
    """An upgraded socket: frame parsing, control frames, the send backlog and the close handshake."""

    def __init__(
        self,
        sock: Any,
        leftover: bytes,
        remote_ip: str,
        path: str,
        settings: Settings,
        stats: Stats,
        outbox: Outbox,
    ) -> None:
        self.id = secrets.token_hex(6)
        self.name = ""
        self.remote_ip = remote_ip
        self.path = path
        self._sock = sock
        self._raw = sock._sock  # the non-blocking OS socket under gevent's wrapper
        self._leftover = leftover  # bytes the client sent right behind its handshake
        self._settings = settings
        self._stats = stats
        self._outbox = outbox
        self._parser = FrameParser(settings.max_message_bytes, settings.max_fragments)
        # A list, not a deque: an empty deque costs ~600 bytes per idle connection, a list 56.
        self._backlog: list[bytes | memoryview] = []
        self._backlog_bytes = 0
        self._max_frames = settings.send_queue
        # One message of the largest allowed size (twice: echo plus a relay) must never by itself make
        # a client look slow, whatever WSAPP_SEND_QUEUE_BYTES says.
        self._max_bytes = max(settings.send_queue_bytes, 2 * settings.max_message_bytes + 4096)
        self._dirty = False
        self._writer: gevent.Greenlet | None = None
        self._flushed = Event()
        self._flushed.set()
        self.closing = False
        self._peer_closed = False
        self._dead = False
        now = time.monotonic()
        self.last_seen = now
        self.last_ping = now
        self.over_capacity_since: float | None = None
        self.close_deadline: float | None = None
        # Wall-clock expiry of the token the client connected with; the heartbeat closes it then.
        self.expires_at: float | None = None
        # Set while reading may go on; cleared (pause_reading) to stop reading the socket.
        self._may_read: Event | None = None

    # ---- sending -------------------------------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Queue a ready-made server frame; False (and counted as a drop) if the connection is closing."""
        if self.closing:
            self._stats.drops += 1
            return False
        rest: bytes | memoryview = frame
        if self._outbox.write_through and not self._backlog and self._writer is None:
            sent = self._send_nowait(frame)
            if sent < 0:
                return False
            if sent == len(frame):
                return True
            rest = memoryview(frame)[sent:]  # the rest goes the usual way
        self._enqueue(rest)
        if self._backlog_bytes > self._max_bytes or len(self._backlog) > self._max_frames:
            self._over_capacity()
        return True

    def _enqueue(self, frame: bytes | memoryview) -> None:
        self._backlog.append(frame)
        self._backlog_bytes += len(frame)
        if not self._dirty:
            self._dirty = True
            self._outbox.mark(self)

    def _send_nowait(self, data: bytes | memoryview) -> int:
        """One non-blocking send: bytes taken by the kernel, or -1 if the socket failed (now aborted)."""
        try:
            return self._raw.send(data)  # type: ignore[no-any-return]
        except BlockingIOError:
            return 0
        except OSError:
            self.abort()
            return -1

    def send_text(self, payload: bytes) -> bool:
        return self.send(encode_frame(OP_TEXT, payload))

    def _send_control(self, frame: bytes) -> None:
        """Pings, pongs and close frames: queued even while closing, never counted against the caps."""
        if not self._dead:
            self._enqueue(frame)

    def ping(self) -> None:
        self.last_ping = time.monotonic()
        self._send_control(encode_frame(OP_PING, b""))

    def flush_nowait(self) -> None:
        """Hand the backlog to the kernel without blocking; start the writer greenlet for any rest."""
        self._dirty = False
        if self._writer is not None or self._dead or not self._backlog:
            return
        backlog = self._backlog
        data = backlog[0] if len(backlog) == 1 else b"".join(backlog)
        backlog.clear()
        self._backlog_bytes = 0
        sent = self._send_nowait(data)
        if sent < 0:
            return
        if sent < len(data):
            rest = memoryview(data)[sent:]
            backlog.insert(0, rest)
            self._backlog_bytes += len(rest)
            self._flushed.clear()
            self._writer = gevent.spawn(self._write_loop)
        elif self.over_capacity_since is not None:
            self.over_capacity_since = None

    def _write_loop(self) -> None:
        try:
            backlog = self._backlog
            while backlog and not self._dead:
                data = backlog[0] if len(backlog) == 1 else b"".join(backlog)
                backlog.clear()
                self._backlog_bytes = 0
                self._sock.sendall(data)
                if self.over_capacity_since is not None and self._backlog_bytes <= self._max_bytes:
                    self.over_capacity_since = None
        except OSError:
            self.abort()
        except Exception:
            self._stats.internal_errors += 1
            log.exception("conn %s writer failed", self.id)
            self.abort()
        finally:
            self._writer = None
            self._flushed.set()

    def _over_capacity(self) -> None:
        """The client is not reading fast enough: give it a grace period, then close it with 1013."""
        now = time.monotonic()
        if self.over_capacity_since is None:
            self.over_capacity_since = now
        hard_limit = self._backlog_bytes > 2 * self._max_bytes or len(self._backlog) > 2 * self._max_frames
        if hard_limit or now - self.over_capacity_since >= self._settings.slow_consumer_grace:
            self.kick_slow_consumer()

    def kick_slow_consumer(self) -> None:
        if self.closing:
            return
        self._stats.slow_consumer_kicks += 1
        log.warning("conn %s slow consumer: %d bytes queued, closing 1013", self.id, self._backlog_bytes)
        # What it did not read in time is dropped with it; nobody else waits for it.
        self._stats.drops += len(self._backlog)
        self._backlog.clear()
        self._backlog_bytes = 0
        self.close(1013, "slow consumer")

    # ---- closing -------------------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake: queue a close frame after everything already queued."""
        if self.closing:
            return
        self.closing = True
        self.close_deadline = time.monotonic() + CLOSE_TIMEOUT
        self._send_control(encode_close(code, reason))

    def terminate(self, code: int, reason: str) -> None:
        """Close without waiting for the peer: try to get the close frame out, then shut the socket."""
        self.close(code, reason)
        self.flush_nowait()
        self.abort()

    def abort(self) -> None:
        """Shut the socket now; the reader sees EOF and cleans up."""
        if self._dead:
            return
        self._dead = True
        self.closing = True
        self._backlog.clear()
        self._backlog_bytes = 0
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)

    def _flush_and_shut(self, timeout: float) -> None:
        """Write what is queued (close frame included), then shut the socket."""
        if not self._dead:
            self.flush_nowait()
            self._flushed.wait(timeout)
        self.abort()

    # ---- reading -------------------------------------------------------------------------------

    @property
    def reading_paused(self) -> bool:
        return self._may_read is not None and not self._may_read.is_set()

    def pause_reading(self) -> None:
        """Read nothing more from the socket until resume_reading(): the peer's sends back up in TCP."""
        if self._may_read is None:
            self._may_read = Event()
        self._may_read.clear()

    def resume_reading(self) -> None:
        if self._may_read is not None:
            self._may_read.set()

    def serve(self, on_message: MessageHandler) -> None:
        """Read until the connection ends; data messages go to `on_message`. Never raises."""
        try:
            self._read_loop(on_message)
        except FrameError as exc:
            self._stats.protocol_errors += 1
            log.info("conn %s protocol error %d: %s", self.id, exc.close_code, exc.reason)
            if not self.closing:
                self.close(exc.close_code, exc.reason)
        except OSError as exc:
            log.debug("conn %s socket error: %s", self.id, exc)
        except gevent.GreenletExit:
            raise
        except Exception:
            self._stats.internal_errors += 1
            log.exception("conn %s internal error", self.id)
            if not self.closing:
                self.close(1011, "internal error")
        finally:
            self._flush_and_shut(CLOSE_TIMEOUT)

    def _read_loop(self, on_message: MessageHandler) -> None:
        recv = self._sock.recv
        parser = self._parser
        feed = parser.feed
        outbox = self._outbox
        data, self._leftover = self._leftover, b""
        while True:
            if not data:
                may_read = self._may_read
                if may_read is not None and not may_read.is_set():
                    may_read.wait()
                    self.last_seen = time.monotonic()  # we were not reading; the peer was not silent
                data = recv(READ_CHUNK)
                if not data:
                    return
            now = self.last_seen = time.monotonic()
            events = feed(data)
            if len(events) == 1 and now - outbox.last_busy > IDLE_GAP:
                outbox.write_through = True
                outbox.last_busy = now
            try:
                self._dispatch(events, on_message)
            finally:
                outbox.write_through = False
            if parser.failed is not None:
                raise parser.failed
            if self._peer_closed:
                return
            data = b""

    def _dispatch(self, events: list[FrameEvent], on_message: MessageHandler) -> None:
        stats = self._stats
        for opcode, payload in events:
            if opcode < OP_CLOSE:
                if self.closing:
                    continue  # after our close frame, data is read and discarded (RFC 6455 1.4)
                stats.messages_in += 1
                stats.bytes_in += len(payload)
                on_message(opcode, payload)
            elif opcode == OP_PING:
                self._send_control(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                if not self.closing:
                    code, _reason = payload
                    self.closing = True
                    self._send_control(encode_close(code))
                self._peer_closed = True
                return
            # OP_PONG: liveness only, already recorded in last_seen.
