"""`ws`: what a route handler gets for one connection (`@rt.route`), and what the built-in routes use.

Two ways to read, never mixed on one connection:
- pull: `for message in ws` / `ws.receive(timeout)`. A reader greenlet of the connection's own parses
  frames, answers pings and fills a small inbox; while the inbox is full it stops reading the socket,
  so TCP pushes back on a client that sends faster than the handler consumes.
- push: `ws.serve(on_message)`, called with (opcode, payload) for each message in this greenlet. No
  extra greenlet and no inbox. (The built-in relay, echo and rooms routes go one step further: they
  are callback routes that hold no greenlet at all while quiet; see `Connection.serve_parked`.)
Sends go through the connection's bounded backlog either way (slow consumers are closed 1013).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from wsapp import protocol
from wsapp.backends import Seq
from wsapp.connection import CAUSE_INTERNAL_ERROR, CAUSE_REJECTED, CLOSE_TIMEOUT, Connection
from wsapp.exceptions import ConnectionClosed, MessageError, Reject
from wsapp.frames import OP_BINARY, OP_TEXT, CloseCode, encode_frame
from wsapp.policy import JOIN, PUBLISH, Policy
from wsapp.ratelimit import TokenBucket

if TYPE_CHECKING:
    from wsapp.hub import JoinResult
    from wsapp.services import Services

log = logging.getLogger(__name__)

TEXT = OP_TEXT
BINARY = OP_BINARY
# Messages the pull inbox holds before the reader stops reading the socket (bytes: see _Pull.cap).
INBOX_MESSAGES = 64


class JoinedRoom(Seq):
    """What `ws.join` returns: the room's seq at the join (an int, so `seq = ws.join(room)` works as
    before), with the room's `epoch` (give it back with `since` on a later join), whether
    `history_gone` was sent instead of a replay, and the room's `members` (display names)."""

    history_gone: bool
    members: list[str]

    def __new__(cls, seq: int, epoch: str, history_gone: bool = False, members: list[str] | None = None) -> JoinedRoom:
        joined = super().__new__(cls, seq, epoch)
        joined.history_gone = history_gone
        joined.members = list(members or ())
        return joined

    def __repr__(self) -> str:
        return f"JoinedRoom(seq={int(self)}, epoch={self.epoch!r}, history_gone={self.history_gone})"


class WebSocket:
    """One upgraded connection as a route handler sees it: send, receive, rooms, who it is."""

    # Small on purpose: an idle connection holds one of these. The pull side (reader greenlet, inbox)
    # and the rate limiter are made on first use, so push-style routes never pay for them.
    __slots__ = ("_conn", "_limiter", "_policy", "_pull", "_served", "_services", "identity", "subprotocol")

    def __init__(
        self, conn: Connection, services: Services, policy: Policy, identity: Any = None, subprotocol: str | None = None
    ) -> None:
        self._conn = conn
        self._services = services
        self._policy = policy
        #: What the app's `authenticate` hook returned (None: anonymous).
        self.identity = identity
        #: The negotiated Sec-WebSocket-Protocol, or None.
        self.subprotocol = subprotocol
        self._pull: _Pull | None = None
        self._served = False
        self._limiter: TokenBucket | None = None

    # ---- who ------------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The connection id used in logs and `welcome`."""
        return self._conn.id

    @property
    def name(self) -> str:
        """The display name: `?name=`, else the identity, else a generated `guest-xxxx`."""
        return self._conn.name

    @property
    def remote_addr(self) -> str:
        """The client's address (behind WSAPP_TRUSTED_PROXY_HOPS proxies: from X-Forwarded-For)."""
        return self._conn.remote_ip

    @property
    def services(self) -> Services:
        """The app's wsapp services (hub, relay, stats, settings) this connection is served by."""
        return self._services

    @property
    def connection(self) -> Connection:
        """The low-level connection (what the hub and relay send ready-made frames to)."""
        return self._conn

    @property
    def closed(self) -> bool:
        """True once a close has started, from either side."""
        return self._conn.closing

    # ---- sending --------------------------------------------------------------------------------

    def send(self, message: str | bytes) -> bool:
        """Queue a text (str) or binary (bytes) message; False if the connection is closing (dropped)."""
        if isinstance(message, str):
            frame = encode_frame(OP_TEXT, message.encode("utf-8"))
        else:
            frame = encode_frame(OP_BINARY, bytes(message))
        if self._conn.send(frame):
            self._services.stats.messages_out += 1
            self._services.outbox.pace_if_needed()  # a handler sending faster than its client reads waits
            return True
        return False

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake after everything already queued."""
        self._conn.close(code, reason)

    # ---- receiving (pull) -----------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """The next message (str for text, bytes for binary); None after `timeout` seconds without one.

        Raises ConnectionClosed once the connection has ended and every message it brought was read."""
        if self._served:
            raise RuntimeError("this connection is read with serve(); receive() cannot be mixed with it")
        pull = self._pull
        if pull is None:
            pull = self._pull = _Pull(max(self._services.settings.max_message_bytes, 1 << 20))
            self._start_limiter()
            pull.reader = gevent.spawn(self._read, pull)
        inbox = pull.inbox
        deadline = None if timeout is None else gevent.get_hub().loop.now() + timeout
        while not inbox:
            if pull.ended:
                raise ConnectionClosed("the connection is closed")
            pull.ready.clear()
            if inbox or pull.ended:
                continue
            left = None if deadline is None else deadline - gevent.get_hub().loop.now()
            if (left is not None and left <= 0) or not pull.ready.wait(left):
                return None
        opcode, payload = inbox.popleft()
        pull.bytes -= len(payload)
        if self._conn.reading_paused and pull.has_room():
            self._conn.resume_reading()
        return payload.decode("utf-8") if opcode == OP_TEXT else payload

    def __iter__(self) -> Iterator[str | bytes]:
        """Every message until the peer closes (or the connection fails); then the loop just ends."""
        while True:
            try:
                message = self.receive()
            except ConnectionClosed:
                return
            if message is not None:
                yield message

    def _read(self, pull: _Pull) -> None:
        def on_message(opcode: int, payload: bytes) -> None:
            pull.inbox.append((opcode, payload))
            pull.bytes += len(payload)
            pull.ready.set()
            if not pull.has_room():
                # Read no further until the handler catches up: the client's sends back up in TCP.
                self._conn.pause_reading()

        try:
            self._conn.serve(on_message, self._limiter)
        finally:
            pull.ended = True
            pull.ready.set()

    def _start_limiter(self) -> None:
        settings = self._services.settings
        if settings.rate_limit > 0:
            self._limiter = TokenBucket(settings.rate_limit, settings.rate_burst)

    # ---- receiving (push) -----------------------------------------------------------------------

    def serve(self, on_message: Callable[[int, bytes], None], rate_limited: bool = True) -> None:
        """Read until the connection ends, calling `on_message(opcode, payload)` (TEXT or BINARY; text
        payloads are validated UTF-8 bytes) in this greenlet. With `rate_limited`, a client over
        WSAPP_RATE_LIMIT is closed 1008 before its message reaches `on_message`."""
        if self._pull is not None:
            raise RuntimeError("this connection is read with receive(); serve() cannot be mixed with it")
        self._served = True
        if rate_limited:
            self._start_limiter()
        self._conn.serve(on_message, self._limiter)

    # ---- rooms ----------------------------------------------------------------------------------

    def join(
        self, room: str, since: int | None = None, echo: bool = False, *, epoch: str | None = None
    ) -> JoinedRoom:
        """Get `room`'s messages and presence (rooms-protocol frames) from now on; returns its seq
        (a `JoinedRoom`: an int that also carries the room's `epoch`).

        With `since`, first the messages after it from history; with `epoch` too (what an earlier
        join returned), only if the room is still in that epoch: otherwise, or when not every message
        after `since` is kept, an `error` `history_gone` frame (with the room's epoch) instead of a
        replay, as on /ws. Goes through `authorize` (Reject `forbidden`); a bad name is Reject `bad_room`."""
        self._policy.check(self.identity, JOIN, _valid_room(room), None)

        def announce(result: JoinResult) -> None:  # before the room's live messages (the hub holds them)
            if result.history_gone:
                self._conn.send_text(protocol.error(protocol.HISTORY_GONE, "not every message after 'since' is kept",
                                                    room=room, epoch=result.epoch))
            for payload in result.replay:
                self._conn.send_text(payload)

        result = self._services.hub.join(self._conn, room, since, echo, epoch, announce)
        return JoinedRoom(result.seq, result.epoch, result.history_gone, result.members)

    def leave(self, room: str) -> bool:
        """Stop getting `room`'s messages; False if this connection was not in it."""
        return self._services.hub.leave(self._conn, room)

    @property
    def rooms(self) -> set[str]:
        """The rooms this connection is in."""
        return set(self._services.hub.rooms_of(self._conn))

    def publish(self, room: str, data: Any) -> Seq:
        """Publish `data` to `room` as this connection (through `authorize` and `on_publish`); its seq
        (an int with `.epoch`)."""
        self._policy.check(self.identity, PUBLISH, _valid_room(room))
        data = self._policy.filter(self.identity, room, data)
        seq = self._services.hub.post(room, data, self._conn.name, self._conn)
        self._services.outbox.pace_if_needed()
        return seq

    # ---- life -----------------------------------------------------------------------------------

    def run(self, handler: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        """Run a route handler to its end, then close (1000), leave every room and finish the handshake."""
        conn = self._conn
        try:
            # A call with **kwargs recurses in C (CPython 3.11 inlines only plain calls), and every
            # idle connection keeps that C stack: measured ~1 KiB each, so plain when there are none.
            if kwargs:
                handler(self, **kwargs)
            else:
                handler(self)
        except Reject as exc:
            log.info("conn %s rejected by its handler: %s %s", conn.id, exc.code, exc.message)
            conn.close(CloseCode.POLICY_VIOLATION, exc.message[:100], CAUSE_REJECTED)
        except ConnectionClosed:
            pass
        except Exception:
            self._services.stats.internal_errors += 1
            log.exception("conn %s handler failed", conn.id)
            conn.close(CloseCode.INTERNAL_ERROR, "internal error", CAUSE_INTERNAL_ERROR)
        finally:
            self._finish()

    def _finish(self) -> None:
        conn = self._conn
        self._services.hub.leave_all(conn)
        conn.close(CloseCode.NORMAL)  # no-op if a close has started
        reader = self._pull.reader if self._pull is not None else None
        if reader is not None:
            conn.resume_reading()  # the reader must see the peer's close
            reader.join(CLOSE_TIMEOUT + 1)
            if not reader.dead:
                reader.kill(block=False)
        elif not self._served:
            conn.serve(_discard)  # the handler never read: wait here for the peer's close reply


class _Pull:
    """The pull side of one connection: its reader greenlet and the inbox that reader fills."""

    __slots__ = ("bytes", "cap", "ended", "inbox", "reader", "ready")

    def __init__(self, cap: int) -> None:
        self.inbox: deque[tuple[int, bytes]] = deque()
        self.bytes = 0
        self.cap = cap  # bytes the inbox holds before the reader pauses (or INBOX_MESSAGES messages)
        self.ready = Event()
        self.ended = False
        self.reader: gevent.Greenlet | None = None

    def has_room(self) -> bool:
        return len(self.inbox) < INBOX_MESSAGES and self.bytes <= self.cap


def _discard(opcode: int, payload: bytes) -> None:
    """Messages that arrive after the handler returned (before the peer's close) go nowhere."""


def _valid_room(room: str) -> str:
    try:
        return protocol.check_room(room)
    except MessageError as exc:
        raise Reject(exc.code, exc.message) from None
