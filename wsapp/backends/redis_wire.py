"""What the Redis broker writes and reads, without I/O: key names, Lua scripts, channels, envelopes,
and the per-room cursor that keeps delivery in seq order with no repeats.

The transport (`backends/redis.py`, inside a server) and the Emitter (any Python process) both build
their Redis calls here, so a message is numbered, stored and announced the same way whoever sends it.

Keys (a room's keys share a hash slot through the `{<room>}` hash tag):

- `wsapp:room:{<room>}:ctr`     hash `seq` (HINCRBY) and `epoch`; NO expiry, so no volatile-* eviction
                                policy can take it. When it is missing (a new room, FLUSHALL, allkeys
                                eviction, failover to an empty replica) the scripts make it again with
                                a new random epoch and drop the log, which belonged to the old life.
- `wsapp:room:{<room>}:log`     stream of the last WSAPP_HISTORY messages, entry id `<seq>-0`, field
                                `m`; expires ROOM_TTL after the room's last publish. A lost log with a
                                kept counter reads as `history_gone`, never as a restart.
- `wsapp:room:{<room>}:members` hash `<incarnation>:<member id>` -> display name; expires MEMBERS_TTL
                                after the last heartbeat of any process with members in the room.
- `wsapp:room:{<room>}:procs`   sorted set: the incarnations with members in the room, scored with the
                                Redis time (ms) until which each counts as alive (PROC_TTL after its
                                last heartbeat of this room). A member entry counts only while its
                                incarnation is alive here; the join script drops dead entries as it lists
                                them. Liveness lives in the room's own slot, so every script touches only
                                the keys it is handed (Redis Cluster).
- channel `wsapp:room:{<room>}` every publish and presence event of the room, as
                                `<incarnation> <room> <seq> <epoch> <origin> <payload>` (seq 0 and epoch
                                `-` for presence; origin = the member id it came from, `-` if none).
                                Processes subscribe only to rooms they have members in. On a Redis
                                Cluster it is a sharded channel (SPUBLISH/SSUBSCRIBE): only the shard that
                                owns the room's slot carries it.
- channel `wsapp:relay`         every relay (`/`) message as `<incarnation> / 0 - - <frame>` (the frame
                                the sender's process built, type and bytes included, never stored);
                                each process drops its own. Sharded on a Cluster too (one shard carries it).

An incarnation is `<process id>.<n>`: each (re)connection of a server to a Redis primary (a Cluster
shard) starts a new one. An Emitter is a process id of its own that never has members.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

RELAY_CHANNEL = "wsapp:relay"
PROC_TTL = 10  # seconds a crashed process's members keep being listed
MEMBERS_TTL = 60  # a room hash nobody refreshes any more (all its processes gone) is dropped after this
ROOM_TTL = 24 * 3600  # history of a room nobody publishes to (its counter and epoch stay)
RELAY_ROOM = "/"  # the room field of a relay envelope: no room can be called that
NO_ORIGIN = "-"

# Redis's own clock in ms (one clock per shard, whatever the wsapp hosts' clocks say); scripts are
# replicated by their effects (Redis 5+), so reading it before writing is allowed.
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# The first seq a reader of a room's log may hand out (`kept_from`), from `keep` (the history length,
# 0 = all the log holds) and `current` (the room's seq): the log is trimmed by whole nodes (MAXLEN ~),
# so it may hold older entries than the history, which readers must not replay.
_KEPT_FROM = """
local kept_from = 1
if keep > 0 then kept_from = math.max(1, current - keep + 1) end
"""

# Make the counter (with a new epoch, dropping the old life's log) when it is missing, or when it was
# written under another `life` of the server: a replica promoted in a failover, or a server restarted
# from a snapshot, may miss the last numbers it gave, and numbering on from there would hand them out
# again in the same epoch. A life is the server's replication id (INFO's master_replid: new at every
# restart and promotion), prefixed on a Cluster with the node id and a dash. One exception keeps the
# epoch: on a Cluster, a counter written by another node that is a healthy master now, read by a node
# that has not been promoted since it started (no master_replid2): the room's slot was resharded here,
# and MIGRATE moved its keys whole. ARGV[LIFE_ARG] is the life the caller's connection reported when it
# was opened ('' = look it up here, '-' = the server will not say: no check); INFO runs only when the
# stored life differs from it (a new room, the first use after a failover), and a caller whose
# connection no longer reaches that life (its server was demoted, and promoted again) is refused
# before anything is written (STALE_LIFE). A counter from before lives were kept adopts the current
# one. Leaves `epoch` set, and `life` the life the counter was checked against.
_COUNTER = """
local found = redis.call('HMGET', KEYS[1], 'epoch', 'life')
local epoch, written = found[1], found[2]
local life = ARGV[LIFE_ARG]
if not epoch or written ~= life then
  local moved = false
  if life ~= '-' then
    local info = redis.pcall('INFO', 'replication')
    local replid, replid2 = '-', ''
    if type(info) == 'string' then
      replid = string.match(info, 'master_replid:(%x+)') or '-'
      replid2 = string.match(info, 'master_replid2:(%x+)') or ''
    end
    local me = redis.pcall('CLUSTER', 'MYID')
    local actual = replid
    if type(me) == 'string' then actual = me .. '-' .. replid end
    if life ~= '' and life ~= actual then return redis.error_reply('STALE_LIFE ' .. actual) end
    life = actual
    local writer = written and string.match(written, '^(%x+)-')
    if writer and writer ~= me and replid2 == string.rep('0', 40) then
      for line in string.gmatch(redis.call('CLUSTER', 'NODES'), '[^\\n]+') do
        local id, flags = string.match(line, '^(%x+) %S+ (%S+)')
        if id == writer then moved = string.find(flags, 'master') ~= nil and string.find(flags, 'fail') == nil end
      end
    end
  end
  if epoch and written and written ~= life and not moved then epoch = false end
  if not epoch then
    epoch = ARGV[NEW_EPOCH]
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'life', life)
  else
    redis.call('HSET', KEYS[1], 'life', life)
  end
end
"""
STALE_LIFE = "STALE_LIFE"  # the error a script answers when the caller's replication id is not the server's
UNKNOWN_LIFE = ""  # a caller that does not know its primary's replication id: the script looks it up
NO_LIFE = "-"  # the server will not tell its replication id (INFO refused): counters are not checked

# KEYS: ctr, log. ARGV: head, tail, history length, envelope prefix "<incarnation> <room> ", channel,
# ttl, origin, new epoch, PUBLISH or SPUBLISH, life. Returns {seq, epoch}. The log is trimmed roughly
# (`MAXLEN ~`: whole nodes, so it may hold one node more than the history: 100 entries or 4 KiB by
# Redis's defaults; exact trimming cost 2 of the script's ~12 µs): whoever reads it (JOIN_SCRIPT,
# CATCH_UP_SCRIPT) takes only the last `history` by seq. Only a life its caller learned
# on the very connection the call runs on may be passed (a server's stream: CommandStream.open): one
# remembered from an earlier call may be the stale life a kept counter was written under, which skips
# the check (the Emitter passes none).
PUBLISH_SCRIPT = _COUNTER.replace("NEW_EPOCH", "8").replace("LIFE_ARG", "10") + """
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local s = string.format('%d', seq)
local payload = ARGV[1] .. s .. ARGV[2]
local keep = tonumber(ARGV[3])
if keep > 0 then
  local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', keep, s .. '-0', 'm', payload)
  if type(added) == 'table' and added.err then
    -- the log is ahead of the counter (written by hand, or an old version): it describes another life
    redis.call('DEL', KEYS[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', keep, s .. '-0', 'm', payload)
  end
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call(ARGV[9], ARGV[5], ARGV[4] .. s .. ' ' .. epoch .. ' ' .. ARGV[7] .. ' ' .. payload)
return {seq, epoch}
"""

# KEYS: ctr, log, members, procs. ARGV: field, name, since (-1 = none), presence envelope ('' = none),
# channel, liveness ttl (ms), members ttl, new epoch, the client's epoch ('' = none), PUBLISH or SPUBLISH,
# life, history length (0 = all the log holds). Returns {seq, live member names, replay, history gone,
# epoch, their fields (in the names' order)}.
JOIN_SCRIPT = _COUNTER.replace("NEW_EPOCH", "8").replace("LIFE_ARG", "11") + _NOW + """
local me = string.match(ARGV[1], '^([^:]*):')
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), me)
redis.call('EXPIRE', KEYS[4], ARGV[7])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[7])
if ARGV[4] ~= '' then redis.call(ARGV[10], ARGV[5], ARGV[4]) end
local current = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local names, fields, alive = {}, {}, {}
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local owner = string.match(all[i], '^([^:]*):')
  local live = alive[owner]
  if live == nil then
    live = redis.call('ZSCORE', KEYS[4], owner) ~= false
    alive[owner] = live
  end
  if live then
    names[#names + 1] = all[i + 1]
    fields[#fields + 1] = all[i]
  else
    redis.call('HDEL', KEYS[3], all[i])
  end
end
local replay, gone = {}, 0
local since = tonumber(ARGV[3])
local keep = tonumber(ARGV[12])
""" + _KEPT_FROM + """
if since >= 0 then
  if ARGV[9] ~= '' and ARGV[9] ~= epoch then
    gone = 1  -- numbers from another life of the room: replaying by them would skip or repeat
  else
    local from = kept_from
    if since <= current then from = math.max(since + 1, kept_from) end
    for _, entry in ipairs(redis.call('XRANGE', KEYS[2], string.format('%d', from), '+')) do
      replay[#replay + 1] = entry[2][2]
    end
    if since > current then
      gone = 1
    elseif since < current then
      local oldest = current + 1
      local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
      if #first > 0 then oldest = math.max(tonumber(string.match(first[1][1], '^%d+')), kept_from) end
      if since + 1 < oldest then gone = 1 end
    end
  end
end
return {current, names, replay, gone, epoch, fields}
"""

# KEYS: members, procs. ARGV: incarnation, liveness ttl (ms), members ttl. Keeps one incarnation alive
# in one room; returns 0 when it had been taken for dead (its members may have been dropped: register
# them again), 1 otherwise.
HEARTBEAT_SCRIPT = _NOW + """
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if deadline and tonumber(deadline) > now then return 1 end
return 0
"""

# KEYS: ctr, log. ARGV: after (the last seq delivered), the epoch it was delivered in, history length.
# Returns {epoch or false, seq, entries after}: after `after` in the same epoch, from the start of the
# log in another (its messages numbered before the caller came back are delivered too, after the notice
# of the new epoch); never more than the last `history` (0 = all the log holds).
CATCH_UP_SCRIPT = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local current = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local out = {}
local keep = tonumber(ARGV[3])
""" + _KEPT_FROM + """
if epoch then
  local from = kept_from
  if epoch == ARGV[2] then from = math.max(tonumber(ARGV[1]) + 1, kept_from) end
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], string.format('%d', from), '+')) do
    out[#out + 1] = entry[2][2]
  end
end
return {epoch, current, out}
"""


# ---- keys and channels --------------------------------------------------------------------------


def room_key(room: str, part: str) -> str:
    """`wsapp:room:{<room>}:<part>`, part being `ctr`, `log`, `members` or `procs` (one hash slot per room)."""
    return f"wsapp:room:{{{room}}}:{part}"


def room_channel(room: str) -> str:
    """The channel of one room's messages and presence."""
    return f"wsapp:room:{{{room}}}"


def channel_room(channel: bytes) -> str | None:
    """The room a channel belongs to; None for the relay channel or anything else."""
    name = channel.decode(errors="replace")
    if name.startswith("wsapp:room:{") and name.endswith("}"):
        return name[len("wsapp:room:{"):-1]
    return None


def publish_command(sharded: bool) -> str:
    """SPUBLISH on a Redis Cluster (the shard owning the channel's slot carries it), else PUBLISH."""
    return "SPUBLISH" if sharded else "PUBLISH"


def member_field(incarnation: str, member_id: str) -> str:
    """A member's field in its room's members hash; the join script reads the owner before the `:`."""
    return f"{incarnation}:{member_id}"


def field_member(field: bytes) -> tuple[bytes, str]:
    """(incarnation, member id) of a members-hash field."""
    incarnation, _, member_id = field.partition(b":")
    return incarnation, member_id.decode()


def replication_life(info: bytes, node_id: bytes | None = None) -> tuple[str, str]:
    """(role, life) from an `INFO replication` reply and, on a Cluster, the node's id (CLUSTER MYID):
    the life the scripts compare each counter's with (see _COUNTER)."""
    fields = dict(line.split(":", 1) for line in info.decode(errors="replace").splitlines() if ":" in line)
    replid = fields.get("master_replid") or NO_LIFE
    return fields.get("role", ""), replid if node_id is None else f"{node_id.decode()}-{replid}"


def new_epoch() -> str:
    """A fresh epoch: random, so a room made again never reuses one."""
    return secrets.token_hex(6)


class EpochProposals:
    """Fresh epochs for a stream of publishes: a random prefix per process and a counter, so each call
    proposes one never proposed before without reading the system's random source per publish (that
    was 7% of a publish's CPU). Only a call that finds the room's counter missing uses its proposal."""

    __slots__ = ("_n", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._n = 0

    def propose(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n:x}"


# ---- script calls -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """The KEYS and ARGV of one script invocation, ready for redis-py's `Script(keys=..., args=...)`."""

    keys: list[str]
    args: list[bytes | str | int]


def publish_call(
    incarnation: str,
    room: str,
    head: bytes,
    tail: bytes,
    history: int,
    origin: str | None = None,
    epoch: str | None = None,
    sharded: bool = False,
    life: str = UNKNOWN_LIFE,
) -> ScriptCall:
    """PUBLISH_SCRIPT for one message `head + seq + tail` of `room`, keeping the last `history`;
    `epoch` is the one to give the room if its counter must be made (a fresh random one if None);
    `life` the primary's replication id as the caller's connection reported it (see _COUNTER)."""
    return ScriptCall(
        keys=[room_key(room, "ctr"), room_key(room, "log")],
        args=[head, tail, history, f"{incarnation} {room} ", room_channel(room), ROOM_TTL, origin or NO_ORIGIN,
              epoch or new_epoch(), publish_command(sharded), life],
    )


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class PublishCommands:
    """`EVALSHA` of PUBLISH_SCRIPT for one message, packed as RESP: the same bytes as packing
    `publish_call`'s keys and args, with what does not change per message (the script, the history
    length, a room's keys and channel) packed once. A publish's hottest path (docs/SCALING.md)."""

    __slots__ = ("_command", "_head", "_history", "_life", "_rooms", "_ttl")
    ROOMS_KEPT = 10000  # rooms whose packed names are kept (forgotten all at once past it)

    def __init__(self, sha: str, history: int, sharded: bool = False) -> None:
        self._command = _bulk(publish_command(sharded).encode())
        self._life = (UNKNOWN_LIFE, self._command + _bulk(UNKNOWN_LIFE.encode()))  # the last two args, packed
        self._head = b"*15\r\n" + _bulk(b"EVALSHA") + _bulk(sha.encode()) + _bulk(b"2")
        self._history = _bulk(b"%d" % history)
        self._ttl = _bulk(b"%d" % ROOM_TTL)
        self._rooms: dict[str, tuple[str, bytes, bytes, bytes]] = {}

    def command(self, incarnation: str, room: str, head: bytes, tail: bytes, origin: str | None, epoch: str,
                life: str = UNKNOWN_LIFE) -> bytes:
        if life != self._life[0]:
            self._life = (life, self._command + _bulk(life.encode()))
        packed = self._rooms.get(room)
        if packed is None or packed[0] != incarnation:
            if len(self._rooms) >= self.ROOMS_KEPT:
                self._rooms.clear()
            packed = self._rooms[room] = (
                incarnation,
                self._head + _bulk(room_key(room, "ctr").encode()) + _bulk(room_key(room, "log").encode()),
                _bulk(f"{incarnation} {room} ".encode()) + _bulk(room_channel(room).encode()) + self._ttl,
                self._history,
            )
        _, keys, middle, history = packed
        sender = (origin or NO_ORIGIN).encode()
        proposed = epoch.encode()
        # One formatting operation (four bulk strings made apart and joined cost twice as much).
        return b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n%s%s$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
            keys, len(head), head, len(tail), tail, history, middle, len(sender), sender, len(proposed), proposed,
            self._life[1])


def join_call(
    incarnation: str,
    room: str,
    member_id: str,
    name: str,
    presence: bytes | None,
    since: int | None,
    epoch: str | None = None,
    sharded: bool = False,
    life: str = UNKNOWN_LIFE,
    history: int = 0,
) -> ScriptCall:
    """JOIN_SCRIPT for one member; `presence` (None on a repeated join) goes out in its envelope;
    `life` as for `publish_call`; the replay is at most the last `history` messages (0: whatever the
    log holds)."""
    return ScriptCall(
        keys=[room_key(room, "ctr"), room_key(room, "log"), room_key(room, "members"), room_key(room, "procs")],
        args=[
            member_field(incarnation, member_id),
            name,
            -1 if since is None else since,
            envelope(incarnation, room, 0, presence, origin=member_id) if presence is not None else b"",
            room_channel(room),
            PROC_TTL * 1000,
            MEMBERS_TTL,
            new_epoch(),
            epoch or "",
            publish_command(sharded),
            life,
            history,
        ],
    )


def heartbeat_call(incarnation: str, room: str) -> ScriptCall:
    """HEARTBEAT_SCRIPT: `incarnation` stays alive in `room` for PROC_TTL more seconds."""
    return ScriptCall(keys=[room_key(room, "members"), room_key(room, "procs")],
                      args=[incarnation, PROC_TTL * 1000, MEMBERS_TTL])


def catch_up_call(room: str, after: int, epoch: str, history: int) -> ScriptCall:
    """CATCH_UP_SCRIPT: the room's epoch, seq and kept messages after `after` of `epoch` (all of them
    if the room is in another epoch now), at most the last `history`."""
    return ScriptCall(keys=[room_key(room, "ctr"), room_key(room, "log")], args=[after, epoch, history])


# ---- envelopes ----------------------------------------------------------------------------------


def envelope(
    incarnation: str, room: str, seq: int, payload: bytes, epoch: str = "-", origin: str | None = None
) -> bytes:
    """`<incarnation> <room> <seq> <epoch> <origin> <payload>`; seq 0 for presence and relay frames."""
    return b"%s %s %d %s %s %s" % (
        incarnation.encode(), room.encode(), seq, epoch.encode(), (origin or NO_ORIGIN).encode(), payload
    )


def relay_prefix(incarnation: str) -> bytes:
    """What goes before each relay frame: the frame itself follows unchanged."""
    return envelope(incarnation, RELAY_ROOM, 0, b"")


class RelayCommands:
    """`PUBLISH wsapp:relay <prefix><frame>` (SPUBLISH on a Cluster) of one relay frame, packed as RESP:
    the same bytes as `pack_command`, with the command, the channel and the incarnation's envelope
    prefix packed once. Every relay frame a process's clients send goes through here."""

    __slots__ = ("_head", "_incarnation", "_prefix")

    def __init__(self, sharded: bool = False) -> None:
        self._head = b"*3\r\n" + _bulk(publish_command(sharded).encode()) + _bulk(RELAY_CHANNEL.encode())
        self._incarnation = ""
        self._prefix = b""

    def command(self, incarnation: str, frame: bytes) -> bytes:
        if incarnation != self._incarnation:
            self._incarnation, self._prefix = incarnation, relay_prefix(incarnation)
        prefix = self._prefix
        return b"%s$%d\r\n%s%s\r\n" % (self._head, len(prefix) + len(frame), prefix, frame)


class Envelope(NamedTuple):
    """One message off the broker. A NamedTuple: the subscriber decodes one per relay frame."""

    incarnation: bytes
    room: str
    seq: int
    epoch: str
    origin: str | None
    payload: bytes

    @property
    def is_relay(self) -> bool:
        return self.room == RELAY_ROOM


def parse_envelope(data: bytes) -> Envelope:
    """Split an envelope; ValueError when it is not one (too few fields, a seq that is no number)."""
    incarnation, room, seq, epoch, origin, payload = data.split(b" ", 5)
    member = origin.decode()
    return Envelope(incarnation, room.decode(), int(seq), epoch.decode(), None if member == NO_ORIGIN else member,
                    payload)


class BusIdentity:
    """One process on the broker: its process id, its current incarnation, and how to spot its own."""

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


# ---- delivery order -----------------------------------------------------------------------------


class Verdict(Enum):
    DELIVER = "deliver"
    REPEAT = "repeat"  # a seq already delivered (a catch-up met the live stream): drop it
    RESTARTED = "restarted"  # another epoch: the room's counter was lost; tell members, then deliver


class Cursors:
    """Per room with local members: the epoch and the last seq delivered. Redis hands one room's
    events over in numbering order; this drops what a catch-up after a reconnection already delivered
    and notices a room that started a new life."""

    __slots__ = ("_rooms",)

    def __init__(self) -> None:
        self._rooms: dict[str, tuple[str, int]] = {}

    def offer(self, room: str, seq: int, epoch: str) -> Verdict:
        """Whether to deliver message `seq` of `epoch` (presence, seq 0, always is)."""
        if not seq:
            return Verdict.DELIVER
        known = self._rooms.get(room)
        self._rooms[room] = (epoch, seq)
        if known is None:
            return Verdict.DELIVER
        if known[0] != epoch:
            return Verdict.RESTARTED
        if seq <= known[1]:
            self._rooms[room] = known
            return Verdict.REPEAT
        return Verdict.DELIVER

    def is_next(self, room: str, seq: int, epoch: str) -> bool:
        """Whether message `seq` of `epoch` is the room's next here: its predecessor delivered, same epoch."""
        return self._rooms.get(room) == (epoch, seq - 1)

    def start(self, room: str, epoch: str, seq: int) -> None:
        """Where a room's delivery starts (its first local join), unless events already set it."""
        self._rooms.setdefault(room, (epoch, seq))

    def position(self, room: str) -> tuple[str, int] | None:
        return self._rooms.get(room)

    def rooms(self) -> list[tuple[str, str, int]]:
        return [(room, epoch, seq) for room, (epoch, seq) in self._rooms.items()]

    def forget(self, room: str) -> None:
        self._rooms.pop(room, None)


def message_seq(payload: bytes) -> int:
    """The seq of a stored `message` payload (built by `protocol.message_parts`: `"seq":` then digits)."""
    start = payload.index(b'"seq":') + 6
    end = start
    while payload[end:end + 1].isdigit():
        end += 1
    return int(payload[start:end])


# ---- presence after a reconnection ---------------------------------------------------------------


class Rosters:
    """Per room with local members: who this process's members have been told is in it (member id ->
    name), from the join's member list and the presence events delivered since.

    Presence events change it idempotently (a join of someone listed, or a leave of someone not
    listed, changes nothing and is not delivered), so after a reconnection the process can re-read
    the room's members, deliver the differences as presence events (`resync`), and then let the
    events of the same period that arrive on the subscription pass without telling anyone twice.
    Member ids are random per connection, unique across processes."""

    __slots__ = ("_rooms",)

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, str]] = {}

    def start(self, room: str, members: dict[str, str]) -> None:
        """The room's first local join: its member list (unless the room is already followed)."""
        self._rooms.setdefault(room, dict(members))

    def names(self, room: str) -> list[str] | None:
        roster = self._rooms.get(room)
        return None if roster is None else list(roster.values())

    def apply(self, room: str, event: str, member_id: str, name: str) -> bool:
        """One presence event; True when it tells something new (deliver it), always for rooms not
        followed."""
        roster = self._rooms.get(room)
        if roster is None:
            return True
        if event == "join":
            if roster.get(member_id) == name:
                return False
            roster[member_id] = name
            return True
        return roster.pop(member_id, None) is not None

    def resync(self, room: str, members: dict[str, str]) -> list[tuple[str, str]]:
        """Replace the room's list with `members` (read from the broker); the (event, name) presence
        events that take a member list from the old to the new one, leaves first."""
        roster = self._rooms.get(room)
        if roster is None:
            return []
        self._rooms[room] = dict(members)
        left = [("leave", name) for member_id, name in roster.items() if members.get(member_id) != name]
        joined = [("join", name) for member_id, name in members.items() if roster.get(member_id) != name]
        return left + joined

    def rooms(self) -> list[str]:
        return list(self._rooms)

    def forget(self, room: str) -> None:
        self._rooms.pop(room, None)
