"""What the Redis broker writes and reads, without I/O: key names, Lua scripts, the bus channel, envelopes.

The transport (`backends/redis.py`, inside a server) and the Emitter (any Python process) both build
their Redis calls here, so a message is numbered, stored and announced the same way whoever sends it.

Keys (one Redis, not Cluster: the join script reads process keys it is not handed):

- `wsapp:room:<room>:seq`      INCR counter; with `:log` it expires ROOM_TTL after the room's last publish.
- `wsapp:room:<room>:log`      stream of the last WSAPP_HISTORY messages, entry id `<seq>-0`, field `m`.
- `wsapp:room:<room>:members`  hash `<incarnation>:<member id>` -> display name; expires MEMBERS_TTL
                               after the last heartbeat of any process with members in the room.
- `wsapp:proc:<incarnation>`   liveness of one process incarnation, expires PROC_TTL after its last
                               heartbeat. A member entry counts only while its incarnation's key lives;
                               the join script drops dead entries as it lists them.
- channel `wsapp:bus`          every publish and presence event, as `<incarnation> <room> <seq> <payload>`
                               (seq 0 for presence), and every relay (`/`) message as
                               `<incarnation> / 0 <frame>` (`/` is no valid room name; the frame is the
                               one the sender's process built, type and bytes included, never stored).
                               Each process drops envelopes from its own process id.

An incarnation is `<process id>.<n>`: each (re)connection of a server starts a new one. An Emitter is
a process id of its own that never has members, so every server delivers what it publishes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import NamedTuple

CHANNEL = "wsapp:bus"
PROC_PREFIX = "wsapp:proc:"
PROC_TTL = 10  # seconds a crashed process's members keep being listed
MEMBERS_TTL = 60  # a room hash nobody refreshes any more (all its processes gone) is dropped after this
ROOM_TTL = 24 * 3600  # seq and history of a room nobody publishes to
RELAY_ROOM = "/"  # the room field of a relay envelope: no room can be called that

# KEYS: seq, log. ARGV: head, tail, history length, envelope prefix "<incarnation> <room> ", channel, ttl.
PUBLISH_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
local s = string.format('%d', seq)
local payload = ARGV[1] .. s .. ARGV[2]
local keep = tonumber(ARGV[3])
if keep > 0 then
  local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', keep, s .. '-0', 'm', payload)
  if type(added) == 'table' and added.err then
    -- the log is ahead of the counter (the counter was lost): the old log describes another life
    redis.call('DEL', KEYS[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', keep, s .. '-0', 'm', payload)
  end
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[5], ARGV[4] .. s .. ' ' .. payload)
return seq
"""

# KEYS: seq, log, members. ARGV: field, name, since (-1 = none), presence envelope ('' = none),
# channel, process key prefix, members ttl. Returns {seq, live member names, replay, history gone}.
JOIN_SCRIPT = """
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[7])
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[4]) end
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local names, alive = {}, {[string.match(ARGV[1], '^([^:]*):')] = true}  -- the caller is alive
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local owner = string.match(all[i], '^([^:]*):')
  local live = alive[owner]
  if live == nil then
    live = redis.call('EXISTS', ARGV[6] .. owner) == 1
    alive[owner] = live
  end
  if live then names[#names + 1] = all[i + 1] else redis.call('HDEL', KEYS[3], all[i]) end
end
local replay, gone = {}, 0
local since = tonumber(ARGV[3])
if since >= 0 then
  local from = '-'
  if since <= current then from = string.format('%d', since + 1) end
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], from, '+')) do replay[#replay + 1] = entry[2][2] end
  if since > current then
    gone = 1
  elseif since < current then
    local oldest = current + 1
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #first > 0 then oldest = tonumber(string.match(first[1][1], '^%d+')) end
    if since + 1 < oldest then gone = 1 end
  end
end
return {current, names, replay, gone}
"""

# KEYS: seq. ARGV: floor, ttl. Numbers handed out locally while Redis was away are never handed out again.
RAISE_SEQ_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
"""


# ---- keys ---------------------------------------------------------------------------------------


def room_key(room: str, part: str) -> str:
    """`wsapp:room:<room>:<part>`, part being `seq`, `log` or `members`."""
    return f"wsapp:room:{room}:{part}"


def proc_key(incarnation: str) -> str:
    """The liveness key of one process incarnation."""
    return PROC_PREFIX + incarnation


def member_field(incarnation: str, member_id: str) -> str:
    """A member's field in its room's members hash; the join script reads the owner before the `:`."""
    return f"{incarnation}:{member_id}"


# ---- script calls -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """The KEYS and ARGV of one script invocation, ready for redis-py's `Script(keys=..., args=...)`."""

    keys: list[str]
    args: list[bytes | str | int]


def publish_call(incarnation: str, room: str, head: bytes, tail: bytes, history: int) -> ScriptCall:
    """PUBLISH_SCRIPT for one message `head + seq + tail` of `room`, keeping the last `history`."""
    return ScriptCall(
        keys=[room_key(room, "seq"), room_key(room, "log")],
        args=[head, tail, history, f"{incarnation} {room} ", CHANNEL, ROOM_TTL],
    )


def join_call(
    incarnation: str, room: str, member_id: str, name: str, presence: bytes | None, since: int | None
) -> ScriptCall:
    """JOIN_SCRIPT for one member; `presence` (None on a repeated join) goes out in its envelope."""
    return ScriptCall(
        keys=[room_key(room, "seq"), room_key(room, "log"), room_key(room, "members")],
        args=[
            member_field(incarnation, member_id),
            name,
            -1 if since is None else since,
            envelope(incarnation, room, 0, presence) if presence is not None else b"",
            CHANNEL,
            PROC_PREFIX,
            MEMBERS_TTL,
        ],
    )


def raise_seq_call(room: str, floor: int) -> ScriptCall:
    """RAISE_SEQ_SCRIPT: lift `room`'s counter to at least `floor`."""
    return ScriptCall(keys=[room_key(room, "seq")], args=[floor, ROOM_TTL])


# ---- envelopes on the bus -----------------------------------------------------------------------


def envelope(incarnation: str, room: str, seq: int, payload: bytes) -> bytes:
    """`<incarnation> <room> <seq> <payload>`; seq 0 for presence and relay frames."""
    return b"%s %s %d %s" % (incarnation.encode(), room.encode(), seq, payload)


def relay_prefix(incarnation: str) -> bytes:
    """What goes before each relay frame: the frame itself follows unchanged."""
    return envelope(incarnation, RELAY_ROOM, 0, b"")


class Envelope(NamedTuple):
    """One message off the bus. A NamedTuple: the subscriber decodes one per relay frame."""

    incarnation: bytes
    room: str
    seq: int
    payload: bytes

    @property
    def is_relay(self) -> bool:
        return self.room == RELAY_ROOM


def parse_envelope(data: bytes) -> Envelope:
    """Split an envelope; ValueError when it is not one (too few fields, a seq that is no number)."""
    incarnation, room, seq, payload = data.split(b" ", 3)
    return Envelope(incarnation, room.decode(), int(seq), payload)


class BusIdentity:
    """One process on the bus: its process id, its current incarnation, and how to spot its own echoes."""

    __slots__ = ("_own_prefix", "generation", "incarnation", "process_id")

    def __init__(self, process_id: str | None = None) -> None:
        self.process_id = process_id or secrets.token_hex(8)
        self.generation = 0
        self.incarnation = f"{self.process_id}.0"
        # Every incarnation of this process, old ones included, starts with this.
        self._own_prefix = self.process_id.encode() + b"."

    def next_incarnation(self) -> str:
        """Start a new incarnation (a reconnection); returns it."""
        self.generation += 1
        self.incarnation = f"{self.process_id}.{self.generation}"
        return self.incarnation

    def is_echo(self, data: bytes) -> bool:
        """True for an envelope this process published itself (in any incarnation)."""
        return data.startswith(self._own_prefix)
