"""One WebSocket connection: the only code that reads from or writes to an upgraded socket.

Flow control (issue 10): a recipient whose unsent backlog passes its cap (WSAPP_SEND_QUEUE frames or
WSAPP_SEND_QUEUE_BYTES) is *congested*; the reader that produced the traffic (a client's
connection, the broker's subscriber, a view calling `rt.publish`) then stops reading and waits
until every recipient it congested has drained below half its cap, or has been closed 1013 for
staying over the cap for WSAPP_SLOW_CONSUMER_GRACE. So a burst slows its sender (TCP pushes back on
it) and never costs a healthy reader a message. The process's queued bytes are capped the same way
(WSAPP_MAX_QUEUED_BYTES); see `Outbox`.

Reading happens in the connection's own greenlet (the WSGI request greenlet). Writing goes through
the connection's bounded backlog: `send()` appends a ready-made frame and marks the connection
dirty; once per event-loop turn the process-wide `Outbox` hands each dirty connection's whole
backlog to the kernel in one non-blocking `send`. Only when the kernel buffer is full does a
connection get a writer greenlet of its own, which finishes the job with a blocking `sendall`.
So a broadcast to N clients costs N list appends plus one syscall per client per loop turn,
frames queued in the same turn are coalesced, and an idle connection costs no writer greenlet.
A lone message (one in flight at a time) skips the backlog and is written through (see Outbox).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import gevent
import gevent.socket as gsocket
from gevent.event import Event
from greenlet import greenlet

from wsapp.config import Settings
from wsapp.deflate import DeflateParams, deflate_frame
from wsapp.exceptions import FrameError
from wsapp.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    CloseCode,
    FrameEvent,
    FrameParser,
    encode_close,
    encode_frame,
)
from wsapp.ids import random_hex
from wsapp.metrics import Stats
from wsapp.ratelimit import TokenBucket

log = logging.getLogger(__name__)

READ_CHUNK = 65536
PARK_AFTER = 2  # consecutive empty retries after a short read before a connection parks without asking
PROBE_EVERY = 8  # while it does, one short read in this many asks again
SMALL_FANOUT = 2048  # bytes a read queued for others, below which an empty retry is not worth its syscall
# How long a closing handshake may take before the socket is simply shut.
CLOSE_TIMEOUT = 3.0

# Called with (opcode, payload) for each data message: OP_TEXT (validated UTF-8 bytes) or OP_BINARY.
MessageHandler = Callable[[int, bytes], None]


# After this long without traffic, a lone message from another reader than the last is written through.
IDLE_GAP = 0.002


class Closed:
    """Who closed a connection first and why, for its log line and wsapp_closes_total."""

    SERVER = "server"
    CLIENT = "client"
    NONE = "none"  # the socket ended without a close frame from either side (code 1006)


# Why the server closed (the `reason` of the close log line and label of wsapp_closes_total).
CAUSE_NORMAL = "normal"
CAUSE_DRAIN = "drain"
CAUSE_PING_TIMEOUT = "ping_timeout"
CAUSE_SLOW_CONSUMER = "slow_consumer"
CAUSE_RATE_LIMIT = "rate_limit"
CAUSE_PROTOCOL_ERROR = "protocol_error"
CAUSE_TOKEN_EXPIRED = "token_expired"
CAUSE_REJECTED = "rejected"
CAUSE_INTERNAL_ERROR = "internal_error"
CAUSE_CLIENT = "client"  # the client's close frame came first
CAUSE_LOST = "connection_lost"  # EOF or a socket error, no close frame


class State(Enum):
    """Where a connection is in its life (RFC 6455 7): the close handshake has two directions."""

    OPEN = "open"
    LOCAL_CLOSING = "local closing"  # we sent a close frame and wait for the peer's
    REMOTE_CLOSING = "remote closing"  # the peer sent one first; ours is queued as the answer
    CLOSED = "closed"  # the socket is shut


# Module constants: the hot paths compare against these rather than look up State's attributes.
_OPEN = State.OPEN
_CLOSED = State.CLOSED


class Outbox:
    """Coalesces writes, and is where producers learn they must wait for their recipients.

    Every connection marked during one loop turn is flushed once, right after. A lone message is
    instead written through: each recipient's frame goes to its socket as the fan-out loop reaches
    it, the way Node's `ws` does, which saves the first recipients the wait for the whole loop (and
    costs no more syscalls: one message per turn is one send per recipient either way). A message is
    lone when it is the only one its read brought, the first of its loop turn, the last turn that
    carried traffic carried one message too, and that one came from the same reader or IDLE_GAP ago.
    So one message in flight at a time goes out as it is fanned out, while several per turn (many
    senders, a burst) keep coalescing into one send per recipient per turn.

    `queued` counts the unsent bytes of every connection (a frame queued to N recipients counts N
    times, so the real memory is at most this). Past `max_queued` producers wait as they do for a
    congested recipient: the process never holds more than `max_queued` plus one message per
    producer, and the heartbeat closes the largest backlogs (1013) if that lasts past the grace.
    """

    def __init__(self, max_queued: int = 1 << 62, grace: float = 2.0, stats: Stats | None = None) -> None:
        self._dirty: list[Connection] = []
        self._grace = grace
        self._stats = stats or Stats()
        self._scheduled = False
        self.write_through = False
        # Messages read so far this loop turn; those of the last turn that had any, and when it ended.
        self._turn_messages = 0
        self._last_turn_messages = 0
        self._last_turn_end = 0.0
        self._last_reader: object = None
        # The loop's run_callback and the end-of-turn callback, looked up once (on the first read,
        # in the serving thread): both run on every turn's way to its first send, where a fresh
        # `gevent.get_hub().loop.run_callback` cost 5.7 µs cold against 2.6 (PERFORMANCE.md).
        self._run_callback: Callable[[Callable[[], None]], Any] | None = None
        self._end_turn_callback = self._end_turn
        # Connections that went over their cap since the last producer looked (duplicates allowed).
        self.congested: list[Connection] = []
        self.queued = 0
        self.max_queued = max_queued
        self.over_budget_since: float | None = None
        self._budget_freed = Event()
        # Compressed variants of the frames queued this loop turn, keyed by (id(frame), window bits):
        # a broadcast is compressed once, whoever it goes to. Each entry holds its frame, so the id
        # stays that frame's until the cache is cleared at the end of the turn.
        self._deflated: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        # wsapp_fanout_seconds: (arrival time, messages) of the reads whose frames wait for the next
        # flush, and whether a written-through send went out since a reader last looked.
        self.arrivals: list[tuple[float, int]] = []
        self.wrote = False

    def deflated(self, frame: bytes, params: DeflateParams) -> bytes:
        """`frame` as sent to a connection with `params`: compressed once per loop turn."""
        key = (id(frame), params.server_max_window_bits)
        hit = self._deflated.get(key)
        if hit is not None:
            return hit[1]
        out = deflate_frame(frame, params)
        if not self._deflated:
            gevent.get_hub().loop.run_callback(self._deflated.clear)
        self._deflated[key] = (frame, out)
        return out

    def mark(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._flush)

    @property
    def flush_pending(self) -> bool:
        return self._scheduled

    def read(self, reader: object, messages: int, now: float) -> bool:
        """`reader` got `messages` frames in one read: True if it should write them through (lone)."""
        if not messages:
            return False
        first = self._turn_messages == 0
        self._turn_messages += messages
        same_reader = reader is self._last_reader
        self._last_reader = reader
        if not first:
            return False
        run_callback = self._run_callback
        if run_callback is None:
            run_callback = self._run_callback = gevent.get_hub().loop.run_callback
        run_callback(self._end_turn_callback)
        if messages != 1:
            return False
        # One producer, one message per turn: nothing to coalesce. Several producers (their reads
        # alternate) or a turn of several messages: the next ones will likely share a turn, so queue.
        return self._last_turn_messages <= 1 and (same_reader or now - self._last_turn_end > IDLE_GAP)

    def _end_turn(self) -> None:
        self._last_turn_messages, self._turn_messages = self._turn_messages, 0
        self._last_turn_end = time.monotonic()

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for conn in dirty:
            try:
                conn.flush_nowait()
            except Exception:  # one connection's failure must not leave the others unflushed
                log.exception("conn %s failed to flush", conn.id)
                conn.abort()
        end = time.monotonic()
        arrivals = self.arrivals
        if arrivals:
            observe = self._stats.fanout_seconds.observe
            for arrived, messages in arrivals:
                observe(end - arrived, messages)
            arrivals.clear()

    def after_remote(self, arrived: float, pace: bool = True) -> None:
        """After each delivery from the broker, which began at `arrived` (monotonic): time its fan-out
        with the flush that will send it, and (`pace`: the broker's subscriber) wait if a recipient is
        over its cap."""
        if self._scheduled:
            self.arrivals.append((arrived, 1))
        if pace:
            self.pace_if_needed()

    def must_wait(self) -> bool:
        """Whether a producer would wait now (a recipient over its cap, or the process over its budget)."""
        return bool(self.congested) or self.queued > self.max_queued

    def released(self, nbytes: int) -> None:
        """`nbytes` of some backlog went to the kernel or were dropped."""
        self.queued -= nbytes
        if self.over_budget_since is not None and self.queued <= self.max_queued // 2:
            self.over_budget_since = None
            self._budget_freed.set()

    def pace_if_needed(self) -> None:
        """For any producer (a reader, the broker's subscriber, a view publishing): wait if what it just
        queued put a recipient or the process over its cap."""
        if self.must_wait():
            self.pace()

    def pace(self) -> None:
        """Wait (this greenlet) until the recipients congested so far have drained below half their cap
        or been closed, and the process is back under half its byte budget; at most the slow-consumer
        grace plus a second, by which time the heartbeat has closed whoever held things up."""
        self._stats.paced += 1
        self.write_through = False
        deadline = time.monotonic() + self._grace + 1.0
        congested, self.congested = self.congested, []
        seen: set[Connection] = set()
        for conn in congested:
            if conn in seen:
                continue
            seen.add(conn)
            while conn.congested:
                left = deadline - time.monotonic()
                if left <= 0 or not conn.wait_drained(left):
                    break
        if self.queued > self.max_queued:
            if self.over_budget_since is None:
                self.over_budget_since = time.monotonic()
                self._budget_freed.clear()
            self._budget_freed.wait(max(0.0, deadline - time.monotonic()))


# Reader greenlets with nothing to do, blocked in the hub until a parked socket has bytes. A fresh
# greenlet costs ~9 µs (CPython maps a new 16 KiB frame stack for it, and unmaps it at its end), a
# spare one a switch (0.7 µs). As many as are reading at once, and at most this many spare.
MAX_SPARE_READERS = 64
_spare_readers: list[greenlet] = []


def _reader(conn: Connection) -> None:
    hub = gevent.get_hub()
    while True:
        conn._resume()
        del conn  # a spare reader keeps no connection alive
        if len(_spare_readers) >= MAX_SPARE_READERS:
            return
        _spare_readers.append(greenlet.getcurrent())
        conn = hub.switch()


class _TlsWrites:
    """What `Connection` asks of `_raw`, for a TLS socket: `send` that never waits (the SSL object's
    write on the non-blocking socket; BlockingIOError when the kernel buffer is full, as a plain
    socket's) and `shutdown`. Reads stay with gevent's SSL socket (TLS sockets are never parked)."""

    __slots__ = ("_tls",)

    def __init__(self, tls: Any) -> None:
        self._tls = tls

    def send(self, data: bytes | memoryview) -> int:
        sslobj = self._tls._sslobj
        if sslobj is None:
            raise OSError(errno.EBADF, "TLS socket closed")
        try:
            return int(sslobj.write(data))
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError(errno.EAGAIN, "TLS write would block") from None

    def shutdown(self, how: int) -> None:
        self._tls._sock.shutdown(how)


class Connection:
    """An upgraded socket: frame parsing, control frames, the send backlog and the close handshake.

    `head` is written before any frame: the upgrade handler's 101, which then leaves in the same send
    as the route's first frames (rooms' `welcome`) when the handler calls `flush_nowait`."""

    # An idle server holds one of these per client: slots (CPython 3.11 keeps attribute values inline only
    # up to 30 names, which the traffic counters passed: +0.1 µs per delivery), nothing made before needed.
    __slots__ = (
        "_backlog", "_backlog_bytes", "_dirty", "_drained", "_empty_retries", "_inflight", "_leftover", "_limiter",
        "_max_bytes", "_max_frames", "_may_read", "_on_end", "_on_message", "_outbox", "_parser", "_rate_limited",
        "_raw", "_settings", "_sock", "_stats", "_writer", "bytes_in", "bytes_out", "close_cause", "close_code",
        "close_deadline", "closed_by", "control_out", "deflate", "expires_at", "frames_out", "id", "last_ping",
        "last_seen", "messages_in", "name", "opened", "over_capacity_since", "path", "remote_ip", "state",
    )

    def __init__(
        self,
        sock: Any,
        leftover: bytes,
        remote_ip: str,
        path: str,
        settings: Settings,
        stats: Stats,
        outbox: Outbox,
        deflate: DeflateParams | None = None,
        head: bytes = b"",
    ) -> None:
        self.id = random_hex(6)
        self.name = ""
        self.remote_ip = remote_ip
        self.path = path
        self.state = State.OPEN
        self._sock = sock
        # The non-blocking OS socket under gevent's wrapper; for TLS (gunicorn --certfile), its SSL
        # object: writing to the OS socket would put frames on the wire unencrypted.
        self._raw: Any = sock._sock if type(sock) is gsocket.socket else _TlsWrites(sock)
        self._leftover = leftover  # bytes the client sent right behind its handshake
        self._empty_retries = 0  # see _read_loop: how the last recvs after a short read went
        self._settings = settings
        self._stats = stats
        self._outbox = outbox
        # permessage-deflate as negotiated in the handshake (None: frames go out as given).
        self.deflate = deflate
        self._parser = FrameParser(settings.max_message_bytes, settings.max_fragments, deflate is not None)
        # A list, not a deque: an empty deque costs ~600 bytes per idle connection, a list 56.
        # `head` (the handshake's 101) goes first, so whatever writes the backlog writes it first.
        self._backlog: list[bytes | memoryview] = [head] if head else []
        # Unsent bytes: queued in _backlog, plus what the writer greenlet has taken but not yet sent.
        self._backlog_bytes = len(head)
        outbox.queued += len(head)
        self._inflight = 0
        self._max_frames = settings.send_queue
        # One message of the largest allowed size (twice: echo plus a relay) must never by itself make
        # a client look slow, whatever WSAPP_SEND_QUEUE_BYTES says.
        self._max_bytes = max(settings.send_queue_bytes, 2 * settings.max_message_bytes + 4096)
        # With a `head`, the upgrade handler flushes it (flush_nowait) once the route has queued its
        # first frames, so the 101 and those frames leave in one send; the Outbox does not.
        self._dirty = bool(head)
        # Made only while the kernel buffer is full; the close waits for it to finish (join).
        self._writer: gevent.Greenlet | None = None
        now = time.monotonic()
        self.opened = now
        # For its close line: data messages and payload bytes read, frames and bytes handed to the
        # kernel (counted per flush, not per frame queued; the 101 included), and the items among
        # those that are not messages (control frames, the 101).
        self.messages_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.control_out = 1 if head else 0
        self.bytes_out = 0
        # Set by whichever side closes first (see `close` and the reader): code, Closed.*, cause.
        self.close_code: int | None = None
        self.closed_by: str | None = None
        self.close_cause = ""
        self.last_seen = now
        self.last_ping = now
        # Since when the backlog has been over its cap (None: under half of it again). A producer
        # waits while it is set; the heartbeat closes the connection 1013 when it lasts past the grace.
        self.over_capacity_since: float | None = None
        self._drained: Event | None = None  # made when a producer first waits on this connection
        self.close_deadline: float | None = None
        # Wall-clock expiry of the token the client connected with; the heartbeat closes it then.
        self.expires_at: float | None = None
        # Set while reading may go on; cleared (pause_reading) to stop reading the socket.
        self._may_read: Event | None = None
        # serve_parked(): what to do with each message and at the end; the rate limit, made when the
        # first message comes (a token bucket starts full, so that is no different from making it now).
        self._on_message: MessageHandler | None = None
        self._on_end: Callable[[Connection], None] | None = None
        self._rate_limited = False
        self._limiter: TokenBucket | None = None

    @property
    def closing(self) -> bool:
        """A close has started (either side) or the socket is shut: nothing new is sent."""
        return self.state is not State.OPEN

    @property
    def unsent_bytes(self) -> int:
        return self._backlog_bytes + self._inflight

    @property
    def congested(self) -> bool:
        """Over its cap and not yet back under half of it, and still open: producers wait for it."""
        return self.over_capacity_since is not None and self.state is State.OPEN

    # ---- sending -------------------------------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Queue a ready-made server frame; False (and counted as a drop) if the connection is closing."""
        if self.state is not _OPEN:
            self._stats.drops += 1
            return False
        if self.deflate is not None:
            frame = self._outbox.deflated(frame, self.deflate)
        rest: bytes | memoryview = frame
        if self._outbox.write_through and not self._backlog and self._writer is None:
            # A lone message's path (see Outbox), written out: one non-blocking send.
            try:
                sent = self._raw.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort()
                return False
            self.bytes_out += sent
            if sent == len(frame):
                self.frames_out += 1
                self._outbox.wrote = True
                return True
            rest = memoryview(frame)[sent:]  # the rest goes the usual way (and is counted as a frame there)
        self._enqueue(rest)
        if self._backlog_bytes + self._inflight > self._max_bytes or len(self._backlog) > self._max_frames:
            self._over_capacity()
        return True

    def _enqueue(self, frame: bytes | memoryview) -> None:
        self._backlog.append(frame)
        n = len(frame)
        self._backlog_bytes += n
        outbox = self._outbox
        outbox.queued += n
        if not self._dirty:
            self._dirty = True
            outbox.mark(self)

    def send_text(self, payload: bytes) -> bool:
        return self.send(encode_frame(OP_TEXT, payload))

    def _send_control(self, frame: bytes) -> None:
        """Pings, pongs and close frames: queued even while closing, never counted against the caps."""
        if self.state is not State.CLOSED:
            self.control_out += 1
            self._enqueue(frame)

    def ping(self) -> None:
        self.last_ping = time.monotonic()
        self._send_control(encode_frame(OP_PING, b""))

    def _take_backlog(self) -> bytes | memoryview:
        """Everything queued, as one buffer the caller now owns (and accounts for as in flight)."""
        backlog = self._backlog
        n = len(backlog)
        data = backlog[0] if n == 1 else b"".join(backlog)
        self.frames_out += n
        backlog.clear()
        self._inflight += self._backlog_bytes
        self._backlog_bytes = 0
        return data

    def _sent(self, nbytes: int) -> None:
        """The kernel took `nbytes` of what was in flight."""
        self.bytes_out += nbytes
        self._inflight -= nbytes
        self._outbox.released(nbytes)
        if (
            self.over_capacity_since is not None
            and self._backlog_bytes + self._inflight <= self._max_bytes // 2
            and len(self._backlog) <= self._max_frames // 2
        ):
            self._no_longer_congested()

    def _no_longer_congested(self) -> None:
        self.over_capacity_since = None
        if self._drained is not None:
            self._drained.set()

    def wait_drained(self, timeout: float) -> bool:
        """Wait until this connection is no longer congested (drained, or closed); False on timeout."""
        if not self.congested:
            return True
        if self._drained is None:
            self._drained = Event()
        self._drained.clear()
        self._drained.wait(timeout)
        return not self.congested

    def flush_nowait(self) -> None:
        """Hand the backlog to the kernel without blocking; start the writer greenlet for any rest."""
        self._dirty = False
        backlog = self._backlog
        if self._writer is not None or self.state is _CLOSED or not backlog:
            return
        # The hot path of every delivery, written out: take the backlog, one send, account for it.
        n = len(backlog)
        data = backlog[0] if n == 1 else b"".join(backlog)
        self.frames_out += n
        backlog.clear()
        queued = self._backlog_bytes
        self._backlog_bytes = 0
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._outbox.released(queued)
            self.abort()
            return
        self._inflight += queued
        if sent == queued and self.over_capacity_since is None:
            self._inflight -= sent
            self.bytes_out += sent
            self._outbox.released(sent)
            return
        self._sent(sent)
        if sent < len(data):
            rest = memoryview(data)[sent:]
            self._writer = gevent.spawn(self._write_loop, rest)

    def _write_loop(self, data: memoryview | bytes) -> None:
        """Finish writing when the kernel buffer was full: a blocking sendall per batch. What a batch
        holds counts as unsent until it is all written (measured: per-chunk sends in Python cost
        10-20% more CPU on large messages, for accounting no producer needs finer)."""
        try:
            while self.state is not State.CLOSED:
                self._sock.sendall(data)
                self._sent(len(data))
                if not self._backlog:
                    break
                data = self._take_backlog()
        except OSError:
            self.abort()
        except Exception:
            self._stats.internal_errors += 1
            log.exception("conn %s writer failed", self.id)
            self.abort()
        finally:
            self._writer = None

    def _over_capacity(self) -> None:
        """The client is not reading fast enough: pace the producer, close it 1013 if it lasts."""
        now = time.monotonic()
        if self.over_capacity_since is None:
            self.over_capacity_since = now
        # Pacing keeps a backlog within one message per producer of the cap; twice the cap means
        # pacing is not holding (many producers at once) and the memory bound is at stake.
        unsent = self._backlog_bytes + self._inflight
        hard_limit = unsent > 2 * self._max_bytes or len(self._backlog) > 2 * self._max_frames
        if hard_limit or now - self.over_capacity_since >= self._settings.slow_consumer_grace:
            self.kick_slow_consumer()
        else:
            self._outbox.congested.append(self)

    def kick_slow_consumer(self) -> None:
        if self.closing:
            return
        self._stats.slow_consumer_kicks += 1
        over = time.monotonic() - self.over_capacity_since if self.over_capacity_since is not None else 0.0
        log.warning("conn %s slow consumer: %d bytes queued, over its cap for %.2fs, closing %d", self.id,
                    self.unsent_bytes, over, CloseCode.TRY_AGAIN_LATER)
        # What it did not read in time is dropped with it; nobody else waits for it.
        self._stats.drops += len(self._backlog)
        self._drop_backlog()
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer", CAUSE_SLOW_CONSUMER)

    def _drop_backlog(self) -> None:
        self._outbox.released(self._backlog_bytes)
        self._backlog.clear()
        self._backlog_bytes = 0
        if self.over_capacity_since is not None:
            self._no_longer_congested()

    # ---- closing -------------------------------------------------------------------------------

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", cause: str = CAUSE_NORMAL) -> None:
        """Start the closing handshake: queue a close frame after everything already queued. `cause`
        names why for the close log line and metrics (never sent; `reason` is)."""
        if self.state is not State.OPEN:
            return
        self.close_code, self.closed_by, self.close_cause = code, Closed.SERVER, cause
        self.state = State.LOCAL_CLOSING
        self.close_deadline = time.monotonic() + CLOSE_TIMEOUT
        self._send_control(encode_close(code, reason))
        if self._drained is not None:
            self._drained.set()  # producers waiting on it stop waiting: it takes nothing more

    def terminate(self, code: int, reason: str, cause: str = CAUSE_NORMAL) -> None:
        """Close without waiting for the peer: try to get the close frame out, then shut the socket."""
        self.close(code, reason, cause)
        self.flush_nowait()
        self.abort()

    def abort(self) -> None:
        """Shut the socket now; the reader sees EOF and cleans up."""
        if self.state is State.CLOSED:
            return
        if self.closed_by is None:
            self.close_code, self.closed_by, self.close_cause = CloseCode.ABNORMAL, Closed.NONE, CAUSE_LOST
        self.state = State.CLOSED
        self._drop_backlog()
        self._outbox.released(self._inflight)
        self._inflight = 0
        if self._drained is not None:
            self._drained.set()
        if self._may_read is not None:
            self._may_read.set()
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)

    def _flush_and_shut(self, timeout: float) -> None:
        """Write what is queued (close frame included), then shut the socket."""
        if self.state is not State.CLOSED:
            self.flush_nowait()
            writer = self._writer
            if writer is not None:
                writer.join(timeout)
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

    def serve(self, on_message: MessageHandler, limiter: TokenBucket | None = None) -> None:
        """Read until the connection ends; data messages go to `on_message`. Never raises. With a
        `limiter`, a client over its rate is closed 1008 before its message reaches `on_message` (checked
        here rather than in a wrapper around `on_message`: one closure less per idle connection)."""
        self._serve(on_message, limiter, False)

    def serve_parked(
        self, on_message: MessageHandler, on_end: Callable[[Connection], None], rate_limited: bool, park: bool = True
    ) -> None:
        """`serve()` without a greenlet of its own while the socket is quiet: returns at once, reads
        in a short-lived greenlet whenever the socket has something, and calls `on_end(self)` (in
        that greenlet) once the connection has ended. With `rate_limited`, WSAPP_RATE_LIMIT applies
        as in `serve()`. `park=False` serves to the end in this greenlet instead (a socket gevent's
        loop cannot watch for us, TLS say)."""
        self._on_message = on_message
        self._on_end = on_end
        self._rate_limited = rate_limited
        if park and not self._leftover:
            self._park()
        else:
            self._resume(park)

    def _park(self) -> None:
        # The socket's own read watcher, level-triggered: bytes already waiting wake it at once.
        self._sock._read_event.start(self._wake)

    def _wake(self) -> None:
        """In the event loop: the parked socket has bytes (or EOF). Read them in a spare reader
        greenlet, entered straight from here the way gevent wakes a greenlet blocked in recv."""
        self._sock._read_event.stop()
        if _spare_readers:
            _spare_readers.pop().switch(self)
        else:
            greenlet(_reader, parent=gevent.get_hub()).switch(self)

    def _resume(self, park: bool = True) -> None:
        """Read and carry out what the socket holds, then park again, or end the connection."""
        on_message = self._on_message
        if on_message is None:  # ended already
            return
        if self._rate_limited and self._limiter is None and self._settings.rate_limit > 0:
            self._limiter = TokenBucket(self._settings.rate_limit, self._settings.rate_burst)
        if self._serve(on_message, self._limiter, park):
            self._park()
            return
        on_end = self._on_end
        self._on_message = self._on_end = None
        if on_end is not None:
            try:
                on_end(self)
            except Exception:
                self._stats.internal_errors += 1
                log.exception("conn %s failed to end", self.id)

    def _serve(self, on_message: MessageHandler, limiter: TokenBucket | None, park: bool) -> bool:
        """Read and dispatch until the connection ends (False) or, with `park`, until the socket has
        nothing more for now (True). Never raises (but lets GreenletExit through)."""
        parked = False
        try:
            parked = self._read_loop(on_message, limiter, park)
        except FrameError as exc:
            self._stats.protocol_errors += 1
            log.info("conn %s protocol error %d: %s", self.id, exc.close_code, exc.reason)
            self.close(exc.close_code, exc.reason, CAUSE_PROTOCOL_ERROR)
        except OSError as exc:
            log.debug("conn %s socket error: %s", self.id, exc)
        except gevent.GreenletExit:
            raise
        except Exception:
            self._stats.internal_errors += 1
            log.exception("conn %s internal error", self.id)
            self.close(CloseCode.INTERNAL_ERROR, "internal error", CAUSE_INTERNAL_ERROR)
        finally:
            if not parked:
                self._flush_and_shut(CLOSE_TIMEOUT)
        return parked

    def close_socket(self) -> None:
        """Free the file descriptor (after the end: abort() only shuts the socket down)."""
        self.abort()
        sock = self._sock
        if type(sock) is gsocket.socket and sock._io_refs > 0:
            sock._io_refs -= 1  # the handler's hold (WsappHandler._take_socket)
        sock.close()

    def _read_loop(self, on_message: MessageHandler, limiter: TokenBucket | None, park: bool) -> bool:
        recv = self._raw.recv if park else self._sock.recv
        parser = self._parser
        feed = parser.feed
        outbox = self._outbox
        data, self._leftover = self._leftover, b""
        retry = False  # the next recv follows a short read in this wake-up
        while True:
            if not data:
                may_read = self._may_read
                if may_read is not None and not may_read.is_set():
                    may_read.wait()
                    self.last_seen = time.monotonic()  # we were not reading; the peer was not silent
                try:
                    data = recv(READ_CHUNK)
                except BlockingIOError:  # parking: nothing more for now (gevent's recv waits instead)
                    if retry and self._empty_retries < PARK_AFTER:
                        self._empty_retries += 1
                    return True
                if not data:
                    return False
                if retry:
                    self._empty_retries = 0
            now = self.last_seen = time.monotonic()
            events = feed(data)
            lone = outbox.write_through = outbox.read(self, len(events), now)
            queued = outbox.queued
            messages = self.messages_in
            try:
                peer_closed = self._dispatch(events, on_message, limiter)
            finally:
                outbox.write_through = False
            messages = self.messages_in - messages
            if messages:
                # wsapp_fanout_seconds, per read rather than per recipient: what these messages queued
                # is timed when the Outbox's flush ends; written through, it is all out already.
                if outbox.queued > queued:
                    outbox.arrivals.append((now, messages))
                elif outbox.wrote:
                    outbox.wrote = False
                    self._stats.fanout_seconds.observe(time.monotonic() - now, messages)
            if parser.failed is not None:
                raise parser.failed
            if peer_closed:
                return False
            if park and len(data) < READ_CHUNK:
                if lone:
                    # A lone message's sender waits for its fan-out (one in flight, see Outbox): nothing
                    # more is coming, so park instead of a recv that would fail with EAGAIN (a syscall
                    # and an exception per message).
                    return True
                # Otherwise ask again: the next message often comes in during the fan-out (at window 4),
                # and this recv takes it without another wake-up and in the same turn, so both messages'
                # frames leave in one send per recipient. Unless this read's fan-out was small (a message
                # to a room of two, or published through Redis), where there is little to coalesce, and
                # the last retries of this connection came back empty (thousands of publishers at window
                # 1: an EAGAIN, a syscall and an exception, per message); then park, and ask once every
                # PROBE_EVERY such reads to learn when that ends.
                empty = self._empty_retries
                if empty >= PARK_AFTER and outbox.queued - queued < SMALL_FANOUT:
                    if empty < PARK_AFTER + PROBE_EVERY:
                        self._empty_retries = empty + 1
                        return True
                    self._empty_retries = PARK_AFTER - 1  # probe: one more empty retry parks again
                retry = True
            else:
                retry = False
            if len(data) == READ_CHUNK and outbox.flush_pending:
                # More input is probably waiting and recv would not yield: let the writes go out first.
                gevent.sleep(0)
            data = b""

    def _count_in(self, size: int) -> None:
        stats = self._stats
        stats.messages_in += 1
        stats.bytes_in += size
        self.messages_in += 1
        self.bytes_in += size
        stats.message_size_bytes.observe(size)

    def _dispatch(self, events: list[FrameEvent], on_message: MessageHandler, limiter: TokenBucket | None) -> bool:
        """Carry out one read's frames; True once the peer's close frame has come."""
        stats = self._stats
        outbox = self._outbox
        for opcode, payload in events:
            if opcode < OP_CLOSE:
                if self.state is not State.OPEN:
                    continue  # after our close frame, data is read and discarded (RFC 6455 1.4)
                if limiter is not None and not limiter.allow():
                    # Over its rate on a route with no error channel: the client is flooding.
                    self._count_in(len(payload))
                    stats.rate_limited += 1
                    self.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded", CAUSE_RATE_LIMIT)
                    continue
                try:
                    on_message(opcode, payload)
                finally:
                    # Counted after the message is handled: at window 1 the code between `recv` and
                    # the first send runs cold (PERFORMANCE.md), so only what that send needs runs first.
                    self._count_in(len(payload))
                if outbox.congested or outbox.queued > outbox.max_queued:
                    # This message put a recipient (or the process) over its cap: read no further
                    # until it drains or is closed, so the sender's burst backs up in TCP.
                    outbox.pace()
            elif opcode == OP_PING:
                self._send_control(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                if self.state is State.OPEN:
                    code, _reason = payload
                    self.close_code = CloseCode.NO_STATUS if code is None else code
                    self.closed_by, self.close_cause = Closed.CLIENT, CAUSE_CLIENT
                    self.state = State.REMOTE_CLOSING
                    self._send_control(encode_close(code))
                return True
            # OP_PONG: liveness only, already recorded in last_seen.
        return False
