"""`/ws`: one client's session of the JSON rooms protocol, between its connection and the hub."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gevent.event import Event

from wsapp import protocol
from wsapp.backends import BrokerUnavailable, Seq
from wsapp.connection import CAUSE_PROTOCOL_ERROR, CAUSE_RATE_LIMIT
from wsapp.exceptions import MessageError
from wsapp.frames import OP_TEXT, CloseCode
from wsapp.hub import unavailable
from wsapp.ids import random_hex
from wsapp.policy import JOIN, PUBLISH, Policy
from wsapp.ratelimit import TokenBucket

HISTORY_GONE_TEXT = (
    "not every message after 'since' can be replayed (not kept any more, or the room restarted: "
    "see its epoch); replaying what is kept of this epoch"
)

# A client's publishes the broker has not answered yet, at most: past this its reader waits for
# the oldest (TCP then holds the client back). One in flight was the old way: the reader waited
# for each publish's round trip, two greenlet switches per message (docs/SCALING.md).
MAX_PUBLISHES_IN_FLIGHT = 8

if TYPE_CHECKING:
    from wsapp.connection import Connection
    from wsapp.hub import JoinResult
    from wsapp.services import Services


def display_name(requested: str | None) -> str:
    """The `?name=` if it is 1-32 printable characters, else a generated `guest-xxxx`."""
    if requested:
        name = requested.strip()
        if 1 <= len(name) <= protocol.MAX_SENDER_CHARS and name.isprintable():
            return name
    return "guest-" + random_hex(2)


class _InFlight:
    """One publish of the client's that the broker has not answered yet, and the reply it gets."""

    __slots__ = ("answered", "msg_id", "reply", "room", "session")

    def __init__(self, session: RoomsSession, room: str, msg_id: object) -> None:
        self.session = session
        self.room = room
        self.msg_id = msg_id
        self.answered = False
        self.reply: bytes | None = None  # the `ack` or `error` frame's JSON; None: nothing to say

    def __call__(self, numbered: Seq | None, failure: BaseException | None) -> None:
        """The broker's answer (hub.publish_nowait's `done`): from the broker's reader, or inline."""
        if numbered is None:
            self.session._count_error(protocol.UNAVAILABLE)
            error = unavailable(failure or BrokerUnavailable("the broker did not number it"), self.msg_id)
            self.reply = protocol.error(error.code, error.message, self.msg_id)
        elif self.msg_id is not None:
            self.reply = protocol.ack(self.msg_id, self.room, numbered.seq, numbered.epoch)
        self.answered = True
        self.session._answered()


class RoomsSession:
    """Parses each message of one connection and carries it out against the hub, asking the policy.

    One per `/ws` client for its whole life, idle or not: slots, and the rate limiter made on the
    first message (a token bucket starts full, so that is no different from making it at once).

    Publishes do not hold up the client's reader: it goes on to its next message (or parks) while
    the broker numbers them, up to MAX_PUBLISHES_IN_FLIGHT. Replies still go out in the order of the
    client's messages: each publish's `ack` or `error` once it and every earlier one are answered,
    and a reply to anything else only after every publish before it has been answered."""

    __slots__ = ("_identity", "_in_flight", "_limiter", "_policy", "_services", "_settled", "conn")

    def __init__(self, conn: Connection, services: Services, policy: Policy, identity: Any = None) -> None:
        self.conn = conn
        self._identity = identity
        self._services = services
        self._policy = policy
        self._limiter: TokenBucket | None = None
        # Publishes not answered yet (and answered ones behind an unanswered one), oldest first; made
        # on the first publish. `_settled` is set whenever some are released (made when first waited on).
        self._in_flight: list[_InFlight] | None = None
        self._settled: Event | None = None

    def welcome(self) -> None:
        """The first frame of the session: who the client is and the limits it is under."""
        conn = self.conn
        s = self._services.settings
        self._reply(
            protocol.welcome(
                conn.id,
                conn.name,
                {
                    "max_message_bytes": s.max_message_bytes,
                    "rate_limit": s.rate_limit,
                    "rate_burst": s.rate_burst,
                    "max_rooms": s.max_rooms,
                    "history": s.history,
                    "ping_interval": s.ping_interval,
                },
            )
        )

    def _reply(self, message: bytes) -> None:
        if self._in_flight:
            self._wait_in_flight(0)  # the replies to earlier publishes go first
        self.conn.send_text(message)

    def _wait_in_flight(self, most: int) -> None:
        """Wait (the client's reader) until at most `most` of its publishes are unanswered. No timeout
        of its own: the broker answers each (its socket reads time out, and a lost connection fails
        what was in flight)."""
        in_flight = self._in_flight
        while in_flight and len(in_flight) > most:
            settled = self._settled
            if settled is None:
                settled = self._settled = Event()
            settled.clear()
            settled.wait()

    def _answered(self) -> None:
        """Send the replies of the oldest publishes that have their answer, in order."""
        in_flight = self._in_flight
        assert in_flight is not None
        released = 0
        for entry in in_flight:
            if not entry.answered:
                break
            released += 1
            if entry.reply is not None:
                self.conn.send_text(entry.reply)
        if released:
            del in_flight[:released]
            if self._settled is not None:
                self._settled.set()

    def on_message(self, opcode: int, payload: bytes) -> None:
        conn = self.conn
        if opcode != OP_TEXT:
            if self._in_flight:
                self._wait_in_flight(0)
            conn.close(CloseCode.UNSUPPORTED_DATA, "/ws takes JSON text messages only", CAUSE_PROTOCOL_ERROR)
            return
        limiter = self._limiter
        if limiter is None:
            settings = self._services.settings
            if settings.rate_limit > 0:
                limiter = self._limiter = TokenBucket(settings.rate_limit, settings.rate_burst)
        if limiter is not None and not limiter.allow():
            self._services.stats.rate_limited += 1
            if limiter.strikes > limiter.burst:
                if self._in_flight:
                    self._wait_in_flight(0)
                conn.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded", CAUSE_RATE_LIMIT)
            else:
                self._error(protocol.RATE_LIMITED, "slow down: message not processed")
            return
        try:
            self._dispatch(protocol.parse(payload, self._services.settings.max_json_depth))
        except MessageError as exc:
            self._error(exc.code, exc.message, exc.msg_id)

    def _error(self, code: str, message: str, msg_id: object = None, **fields: object) -> None:
        """An `error` to this client, counted by code (wsapp_ws_errors_total)."""
        self._count_error(code)
        self._reply(protocol.error(code, message, msg_id, **fields))

    def _count_error(self, code: str) -> None:
        self._services.stats.ws_errors[(code,)] += 1

    def _dispatch(self, cmd: protocol.Command) -> None:
        hub = self._services.hub
        conn = self.conn
        policy = self._policy
        if isinstance(cmd, protocol.Publish):
            if cmd.room not in hub.rooms_of(conn):
                raise MessageError(protocol.NOT_IN_ROOM, f"join {cmd.room!r} before publishing to it", cmd.id)
            policy.check(self._identity, PUBLISH, cmd.room, cmd.id)
            data = policy.filter(self._identity, cmd.room, cmd.data, cmd.id)
            if hub.inline:
                # An in-process broker numbers and delivers before it returns: nothing is ever in
                # flight, so no entry to keep (1 µs per publish). Membership was checked above.
                numbered = hub.post(cmd.room, data, conn.name, conn, cmd.id)
                if cmd.id is not None:
                    self._reply(protocol.ack(cmd.id, cmd.room, numbered.seq, numbered.epoch))
                return
            in_flight = self._in_flight
            if in_flight is None:
                in_flight = self._in_flight = []
            entry = _InFlight(self, cmd.room, cmd.id)
            in_flight.append(entry)
            try:
                hub.publish_nowait(conn, cmd.room, data, entry, cmd.id)
            except BaseException:
                if not entry.answered:
                    in_flight.remove(entry)
                raise
            if len(in_flight) > MAX_PUBLISHES_IN_FLIGHT:
                self._wait_in_flight(MAX_PUBLISHES_IN_FLIGHT)
            return
        if self._in_flight:
            self._wait_in_flight(0)  # join, leave, ping: carried out after the publishes before them
        if isinstance(cmd, protocol.Join):
            policy.check(self._identity, JOIN, cmd.room)
            room = cmd.room

            def announce(result: JoinResult) -> None:
                # Before any live message of the room: the hub holds those until this has run.
                self._reply(protocol.joined(room, result.seq, result.members, result.epoch))
                if result.history_gone:
                    self._error(protocol.HISTORY_GONE, HISTORY_GONE_TEXT, room=room, epoch=result.epoch)
                for payload in result.replay:
                    conn.send_text(payload)

            hub.join(conn, room, cmd.since, cmd.echo, cmd.epoch, announce)
        elif isinstance(cmd, protocol.Leave):
            if not hub.leave(conn, cmd.room):
                raise MessageError(protocol.NOT_IN_ROOM, f"not in room {cmd.room!r}")
            self._reply(protocol.left(cmd.room))
        else:
            self._reply(protocol.pong(cmd.id))
