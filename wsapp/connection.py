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
import logging
import secrets
import socket
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import gevent
from gevent.event import Event

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
from wsapp.metrics import Stats
from wsapp.ratelimit import TokenBucket

log = logging.getLogger(__name__)

READ_CHUNK = 65536
# How long a closing handshake may take before the socket is simply shut.
CLOSE_TIMEOUT = 3.0

# Called with (opcode, payload) for each data message: OP_TEXT (validated UTF-8 bytes) or OP_BINARY.
MessageHandler = Callable[[int, bytes], None]


# After this long without traffic, a lone message from another reader than the last is written through.
IDLE_GAP = 0.002


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
        gevent.get_hub().loop.run_callback(self._end_turn)
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

    def released(self, nbytes: int) -> None:
        """`nbytes` of some backlog went to the kernel or were dropped."""
        self.queued -= nbytes
        if self.over_budget_since is not None and self.queued <= self.max_queued // 2:
            self.over_budget_since = None
            self._budget_freed.set()

    def pace_if_needed(self) -> None:
        """For any producer (a reader, the broker's subscriber, a view publishing): wait if what it just
        queued put a recipient or the process over its cap."""
        if self.congested or self.queued > self.max_queued:
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
        deflate: DeflateParams | None = None,
    ) -> None:
        self.id = secrets.token_hex(6)
        self.name = ""
        self.remote_ip = remote_ip
        self.path = path
        self.state = State.OPEN
        self._sock = sock
        self._raw = sock._sock  # the non-blocking OS socket under gevent's wrapper
        self._leftover = leftover  # bytes the client sent right behind its handshake
        self._settings = settings
        self._stats = stats
        self._outbox = outbox
        # permessage-deflate as negotiated in the handshake (None: frames go out as given).
        self.deflate = deflate
        self._parser = FrameParser(settings.max_message_bytes, settings.max_fragments, deflate is not None)
        # A list, not a deque: an empty deque costs ~600 bytes per idle connection, a list 56.
        self._backlog: list[bytes | memoryview] = []
        # Unsent bytes: queued in _backlog, plus what the writer greenlet has taken but not yet sent.
        self._backlog_bytes = 0
        self._inflight = 0
        self._max_frames = settings.send_queue
        # One message of the largest allowed size (twice: echo plus a relay) must never by itself make
        # a client look slow, whatever WSAPP_SEND_QUEUE_BYTES says.
        self._max_bytes = max(settings.send_queue_bytes, 2 * settings.max_message_bytes + 4096)
        self._dirty = False
        self._writer: gevent.Greenlet | None = None
        self._flushed = Event()
        self._flushed.set()
        now = time.monotonic()
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
            if sent == len(frame):
                return True
            rest = memoryview(frame)[sent:]  # the rest goes the usual way
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
            self._enqueue(frame)

    def ping(self) -> None:
        self.last_ping = time.monotonic()
        self._send_control(encode_frame(OP_PING, b""))

    def _take_backlog(self) -> bytes | memoryview:
        """Everything queued, as one buffer the caller now owns (and accounts for as in flight)."""
        backlog = self._backlog
        data = backlog[0] if len(backlog) == 1 else b"".join(backlog)
        backlog.clear()
        self._inflight += self._backlog_bytes
        self._backlog_bytes = 0
        return data

    def _sent(self, nbytes: int) -> None:
        """The kernel took `nbytes` of what was in flight."""
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
        data = backlog[0] if len(backlog) == 1 else b"".join(backlog)
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
            self._outbox.released(sent)
            return
        self._sent(sent)
        if sent < len(data):
            rest = memoryview(data)[sent:]
            self._flushed.clear()
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
            self._flushed.set()

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
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer")

    def _drop_backlog(self) -> None:
        self._outbox.released(self._backlog_bytes)
        self._backlog.clear()
        self._backlog_bytes = 0
        if self.over_capacity_since is not None:
            self._no_longer_congested()

    # ---- closing -------------------------------------------------------------------------------

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake: queue a close frame after everything already queued."""
        if self.state is not State.OPEN:
            return
        self.state = State.LOCAL_CLOSING
        self.close_deadline = time.monotonic() + CLOSE_TIMEOUT
        self._send_control(encode_close(code, reason))
        if self._drained is not None:
            self._drained.set()  # producers waiting on it stop waiting: it takes nothing more

    def terminate(self, code: int, reason: str) -> None:
        """Close without waiting for the peer: try to get the close frame out, then shut the socket."""
        self.close(code, reason)
        self.flush_nowait()
        self.abort()

    def abort(self) -> None:
        """Shut the socket now; the reader sees EOF and cleans up."""
        if self.state is State.CLOSED:
            return
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

    def serve(self, on_message: MessageHandler, limiter: TokenBucket | None = None) -> None:
        """Read until the connection ends; data messages go to `on_message`. Never raises. With a
        `limiter`, a client over its rate is closed 1008 before its message reaches `on_message` (checked
        here rather than in a wrapper around `on_message`: one closure less per idle connection)."""
        try:
            self._read_loop(on_message, limiter)
        except FrameError as exc:
            self._stats.protocol_errors += 1
            log.info("conn %s protocol error %d: %s", self.id, exc.close_code, exc.reason)
            self.close(exc.close_code, exc.reason)
        except OSError as exc:
            log.debug("conn %s socket error: %s", self.id, exc)
        except gevent.GreenletExit:
            raise
        except Exception:
            self._stats.internal_errors += 1
            log.exception("conn %s internal error", self.id)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._flush_and_shut(CLOSE_TIMEOUT)

    def _read_loop(self, on_message: MessageHandler, limiter: TokenBucket | None) -> None:
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
            outbox.write_through = outbox.read(self, len(events), now)
            try:
                peer_closed = self._dispatch(events, on_message, limiter)
            finally:
                outbox.write_through = False
            if parser.failed is not None:
                raise parser.failed
            if peer_closed:
                return
            if len(data) == READ_CHUNK and outbox.flush_pending:
                # More input is probably waiting and recv would not yield: let the writes go out first.
                gevent.sleep(0)
            data = b""

    def _dispatch(self, events: list[FrameEvent], on_message: MessageHandler, limiter: TokenBucket | None) -> bool:
        """Carry out one read's frames; True once the peer's close frame has come."""
        stats = self._stats
        outbox = self._outbox
        for opcode, payload in events:
            if opcode < OP_CLOSE:
                if self.state is not State.OPEN:
                    continue  # after our close frame, data is read and discarded (RFC 6455 1.4)
                stats.messages_in += 1
                stats.bytes_in += len(payload)
                if limiter is not None and not limiter.allow():
                    # Over its rate on a route with no error channel: the client is flooding.
                    stats.rate_limited += 1
                    self.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                    continue
                on_message(opcode, payload)
                if outbox.congested or outbox.queued > outbox.max_queued:
                    # This message put a recipient (or the process) over its cap: read no further
                    # until it drains or is closed, so the sender's burst backs up in TCP.
                    outbox.pace()
            elif opcode == OP_PING:
                self._send_control(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                if self.state is State.OPEN:
                    code, _reason = payload
                    self.state = State.REMOTE_CLOSING
                    self._send_control(encode_close(code))
                return True
            # OP_PONG: liveness only, already recorded in last_seen.
        return False
