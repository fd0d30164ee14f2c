"""`/ws`: one client's session of the JSON rooms protocol, between its connection and the hub."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from wsapp import protocol
from wsapp.connection import CAUSE_PROTOCOL_ERROR, CAUSE_RATE_LIMIT
from wsapp.exceptions import MessageError
from wsapp.frames import OP_TEXT, CloseCode
from wsapp.policy import JOIN, PUBLISH, Policy
from wsapp.ratelimit import TokenBucket

HISTORY_GONE_TEXT = (
    "not every message after 'since' can be replayed (not kept any more, or the room restarted: "
    "see its epoch); replaying what is kept of this epoch"
)

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
    return "guest-" + secrets.token_hex(2)


class RoomsSession:
    """Parses each message of one connection and carries it out against the hub, asking the policy.

    One per `/ws` client for its whole life, idle or not: slots, and the rate limiter made on the
    first message (a token bucket starts full, so that is no different from making it at once)."""

    __slots__ = ("_identity", "_limiter", "_policy", "_services", "conn")

    def __init__(self, conn: Connection, services: Services, policy: Policy, identity: Any = None) -> None:
        self.conn = conn
        self._identity = identity
        self._services = services
        self._policy = policy
        self._limiter: TokenBucket | None = None

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
        self.conn.send_text(message)

    def on_message(self, opcode: int, payload: bytes) -> None:
        conn = self.conn
        if opcode != OP_TEXT:
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
        self._services.stats.ws_errors[(code,)] += 1
        self._reply(protocol.error(code, message, msg_id, **fields))

    def _dispatch(self, cmd: protocol.Command) -> None:
        hub = self._services.hub
        conn = self.conn
        policy = self._policy
        if isinstance(cmd, protocol.Publish):
            if cmd.room not in hub.rooms_of(conn):
                raise MessageError(protocol.NOT_IN_ROOM, f"join {cmd.room!r} before publishing to it", cmd.id)
            policy.check(self._identity, PUBLISH, cmd.room, cmd.id)
            data = policy.filter(self._identity, cmd.room, cmd.data, cmd.id)
            seq = hub.post(cmd.room, data, conn.name, conn, cmd.id)  # hub.publish would check membership again
            if cmd.id is not None:
                self._reply(protocol.ack(cmd.id, cmd.room, seq))
        elif isinstance(cmd, protocol.Join):
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
