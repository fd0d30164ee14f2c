"""Redis backend: several wsapp processes share rooms (DESIGN.md section 5).

Keys (one Redis, not Cluster: the scripts read process keys they are not handed):

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

An incarnation is `<process id>.<n>`: each (re)connection starts a new one and registers every local
member again under it, so entries of members that left while Redis was unreachable die with the old one.

One publish, join or leave is one round trip (a script or a pipeline), on one command connection
behind a lock so local delivery happens in the order Redis numbered the messages. While Redis is
unreachable the backend answers from this process alone: publishes get the next local number after
the last one seen, joins list local members and report `history_gone` for any `since` they cannot
serve; a supervisor greenlet reconnects with capped backoff.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gevent
import redis
from gevent.event import Event
from gevent.lock import Semaphore
from redis.backoff import NoBackoff
from redis.retry import Retry

from wsapp.backends import Deliver, RelayFrames, RoomView

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "wsapp:bus"
PROC_PREFIX = "wsapp:proc:"
HEARTBEAT_SECONDS = 2.0
PROC_TTL = 10  # seconds a crashed process's members keep being listed
MEMBERS_TTL = 60  # a room hash nobody refreshes any more (all its processes gone) is dropped after this
ROOM_TTL = 24 * 3600  # seq and history of a room nobody publishes to
LISTEN_POLL = 0.25  # how long the subscriber waits for a message before looking at its own state
MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
RELAY_ROOM = "/"  # the room field of a relay envelope: no room can be called that
RELAY_MARK = RELAY_ROOM.encode()
RELAY_BATCH = 256  # relay frames per pipeline (still one PUBLISH each)
RELAY_BACKLOG = 10000  # relay frames waiting for Redis; past this new ones reach local clients only

# KEYS: seq, log. ARGV: head, tail, history length, envelope prefix "<incarnation> <room> ", channel, ttl.
_PUBLISH = """
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
_JOIN = """
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
_RAISE_SEQ = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
"""


def _key(room: str, part: str) -> str:
    return f"wsapp:room:{room}:{part}"


class RedisBackend:
    """Rooms shared through one Redis: numbers, history, members and delivery to the other processes."""

    name = "redis"

    def __init__(self, url: str, history: int, timeout: float = 1.0) -> None:
        self._history = history
        self._timeout = timeout
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # Fail fast and let the supervisor reconnect: redis-py's own retries would hold a reader.
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        kwargs = self._client.connection_pool.connection_kwargs
        self._where = f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}".rstrip(":")
        self._publish_script = self._client.register_script(_PUBLISH)
        self._join_script = self._client.register_script(_JOIN)
        self._raise_seq_script = self._client.register_script(_RAISE_SEQ)
        self._process_id = secrets.token_hex(8)
        self._own_prefix = self._process_id.encode() + b"."
        self._generation = 0
        self._incarnation = f"{self._process_id}.0"
        # One command at a time: replies come back in the order Redis numbered them.
        self._lock = Semaphore()
        self._healthy = False
        self._up = False  # what the log last said
        self._down_since = time.monotonic()
        self._backoff = MIN_BACKOFF
        self._closing = Event()
        self._settled = Event()
        self._deliver: Deliver | None = None
        self._supervisor: gevent.Greenlet | None = None
        # Relay frames on their way to Redis, in the order this process's clients sent them.
        self._relay_deliver: RelayFrames | None = None
        self._relay_queue: deque[bytes] = deque()
        self._relay_wake = Event()
        self._relay_publisher: gevent.Greenlet | None = None
        self._relay_overflow = False
        # Local rooms: their members (for re-registering after a reconnect) and the last seq seen.
        self._members: dict[str, dict[str, str]] = {}
        self._seqs: dict[str, int] = {}

    @property
    def healthy(self) -> bool:
        return self._healthy

    # ---- the hub's interface --------------------------------------------------------------------

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._supervisor = gevent.spawn(self._supervise)
        # Start serving with the broker's real state when it answers promptly; never wait long for it.
        self._settled.wait(3 * self._timeout)

    def attach_relay(self, deliver: RelayFrames) -> RelayFrames | None:
        self._relay_deliver = deliver
        self._relay_publisher = gevent.spawn(self._publish_relay_forever)
        return self._share_relay

    def publish(self, room: str, head: bytes, tail: bytes) -> tuple[int, bytes]:
        seq = self._call(
            lambda: self._publish_script(
                keys=[_key(room, "seq"), _key(room, "log")],
                args=[head, tail, self._history, f"{self._incarnation} {room} ", CHANNEL, ROOM_TTL],
            )
        )
        if seq is None:
            seq = self._seqs.get(room, 0) + 1
        self._seen(room, int(seq))
        return int(seq), b"%s%d%s" % (head, int(seq), tail)

    def join(self, room: str, member_id: str, name: str, presence: bytes | None, since: int | None) -> RoomView:
        self._members.setdefault(room, {})[member_id] = name
        result = self._call(
            lambda: self._join_script(
                keys=[_key(room, "seq"), _key(room, "log"), _key(room, "members")],
                args=[
                    f"{self._incarnation}:{member_id}",
                    name,
                    -1 if since is None else since,
                    self._envelope(room, presence) if presence is not None else b"",
                    CHANNEL,
                    PROC_PREFIX,
                    MEMBERS_TTL,
                ],
            )
        )
        if result is None:
            seq = self._seqs.get(room, 0)
            # Without the shared log nothing can be replayed: say so whenever something was missed.
            return RoomView(seq, None, [], since is not None and since != seq)
        seq, names, replay, gone = result
        self._seen(room, int(seq))
        return RoomView(int(seq), [n.decode() for n in names], list(replay), bool(gone))

    def leave(self, room: str, member_id: str, presence: bytes) -> None:
        local = self._members.get(room)
        if local is not None:
            local.pop(member_id, None)
            if not local:
                del self._members[room]

        def withdraw() -> None:
            pipe = self._client.pipeline(transaction=False)
            pipe.hdel(_key(room, "members"), f"{self._incarnation}:{member_id}")
            pipe.publish(CHANNEL, self._envelope(room, presence))
            pipe.execute()

        self._call(withdraw)

    def room_emptied(self, room: str) -> None:
        if room not in self._members:
            self._seqs.pop(room, None)

    def close(self) -> None:
        self._closing.set()
        if self._supervisor is not None:
            self._supervisor.kill(timeout=self._timeout)
        if self._relay_publisher is not None:
            self._relay_publisher.kill(timeout=self._timeout)
        # Members of this process stop being listed now rather than PROC_TTL from now.
        self._call(lambda: self._client.delete(PROC_PREFIX + self._incarnation))
        self._healthy = False
        self._client.close()

    # ---- the relay: one PUBLISH per message, sent from one greenlet -----------------------------

    def _share_relay(self, frame: bytes) -> None:
        """Queue one of this process's relay frames for the others; the sender's reader never waits on Redis."""
        if not self._healthy:
            return  # like rooms: while the broker is away, local clients only
        queue = self._relay_queue
        if len(queue) >= RELAY_BACKLOG:
            if not self._relay_overflow:
                self._relay_overflow = True
                log.warning("broker: relay backlog full (%d frames); other processes miss messages", RELAY_BACKLOG)
            return
        queue.append(frame)
        if len(queue) == 1:
            self._relay_wake.set()

    def _publish_relay_forever(self) -> None:
        queue = self._relay_queue
        while True:
            if not queue:
                self._relay_overflow = False
                self._relay_wake.clear()
                self._relay_wake.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), RELAY_BATCH))]
            prefix = self._envelope(RELAY_ROOM, b"")

            def send(batch: list[bytes] = batch, prefix: bytes = prefix) -> None:
                pipe = self._client.pipeline(transaction=False)
                for frame in batch:
                    pipe.publish(CHANNEL, prefix + frame)
                pipe.execute()

            # Broker down: the batch is dropped (the relay keeps nothing) and _share_relay stops queueing.
            self._call(send)

    # ---- Redis calls ----------------------------------------------------------------------------

    def _envelope(self, room: str, presence: bytes) -> bytes:
        return b"%s %s 0 %s" % (self._incarnation.encode(), room.encode(), presence)

    def _seen(self, room: str, seq: int) -> None:
        if room in self._members and seq > self._seqs.get(room, 0):
            self._seqs[room] = seq

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._lock.acquire(timeout=self._timeout):
            raise redis.TimeoutError("another Redis call is stuck")
        try:
            yield
        finally:
            self._lock.release()

    def _call(self, fn: Callable[[], T]) -> T | None:
        """`fn()` against Redis, or None at once while the broker is down (or when this call finds it down)."""
        if not self._healthy:
            return None
        try:
            with self._locked():
                if not self._healthy:
                    return None
                return fn()
        except (redis.RedisError, OSError) as exc:
            self._lost(exc)
            return None

    def _lost(self, exc: BaseException) -> None:
        self._healthy = False
        if self._up:
            self._up = False
            self._down_since = time.monotonic()
            log.warning(
                "broker lost (redis %s: %s); serving local members only, reconnecting", self._where, exc
            )

    # ---- the supervisor: subscriber, heartbeat, reconnection ------------------------------------

    def _supervise(self) -> None:
        while not self._closing.is_set():
            pubsub = self._client.pubsub()
            try:
                self._subscribe(pubsub)
                with self._locked():
                    # From here joins and leaves wait for this lock instead of skipping Redis, so the
                    # members registered below are exactly this process's members.
                    self._healthy = True
                    self._register_again()
                self._announce_up()
                self._listen(pubsub)
            except Exception as exc:  # whatever breaks, the supervisor must carry on
                if not isinstance(exc, (redis.RedisError, OSError)):
                    log.exception("broker supervisor failed")
                elif not self._up and not self._settled.is_set():
                    log.warning(
                        "broker unreachable (redis %s: %s); serving local members only, retrying", self._where, exc
                    )
                self._lost(exc)
            finally:
                self._settled.set()
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()
            if self._closing.wait(self._backoff):
                break
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _subscribe(self, pubsub: Any) -> None:
        """Subscribe and wait for Redis to confirm it, so nothing published after this is missed."""
        pubsub.subscribe(CHANNEL)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message["type"] == "subscribe":
                return
        raise redis.TimeoutError("no subscribe confirmation")

    def _register_again(self) -> None:
        """Start a new incarnation holding every local member; retire the previous one."""
        previous = self._incarnation
        self._generation += 1
        self._incarnation = f"{self._process_id}.{self._generation}"
        pipe = self._client.pipeline(transaction=False)
        pipe.delete(PROC_PREFIX + previous)
        pipe.set(PROC_PREFIX + self._incarnation, 1, ex=PROC_TTL)
        for room, members in self._members.items():
            pipe.hset(_key(room, "members"), mapping={f"{self._incarnation}:{m}": n for m, n in members.items()})
            pipe.expire(_key(room, "members"), MEMBERS_TTL)
            if self._seqs.get(room):
                self._raise_seq_script(keys=[_key(room, "seq")], args=[self._seqs[room], ROOM_TTL], client=pipe)
        pipe.execute()

    def _announce_up(self) -> None:
        if not self._up:
            if self._settled.is_set():
                log.warning("broker back (redis %s) after %.1fs", self._where, time.monotonic() - self._down_since)
            else:
                log.info("broker connected (redis %s)", self._where)
            self._up = True

    def _listen(self, pubsub: Any) -> None:
        self._settled.set()
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        while self._healthy and not self._closing.is_set():
            message = pubsub.get_message(timeout=LISTEN_POLL)
            if message is not None and message["type"] == "message":
                self._on_bus(message["data"])
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + HEARTBEAT_SECONDS

    def _heartbeat(self) -> None:
        with self._locked():
            pipe = self._client.pipeline(transaction=False)
            pipe.set(PROC_PREFIX + self._incarnation, 1, ex=PROC_TTL, get=True)
            for room in self._members:
                pipe.expire(_key(room, "members"), MEMBERS_TTL)
            alive = pipe.execute()[0]
            if alive is None:
                # Our key expired (this process stalled past PROC_TTL) and others may have dropped our
                # members as dead: register them again.
                log.warning("broker: liveness key had expired; registering local members again")
                self._register_again()
        self._backoff = MIN_BACKOFF

    def _on_bus(self, data: bytes) -> None:
        if data.startswith(self._own_prefix):
            return
        try:
            _, room_b, seq_b, payload = data.split(b" ", 3)
            if room_b == RELAY_MARK:
                self._on_relay(payload)
                return
            room = room_b.decode()
            self._seen(room, int(seq_b))
        except ValueError:
            log.warning("broker: malformed message on %s ignored", CHANNEL)
            return
        if room in self._members and self._deliver is not None:
            try:
                self._deliver(room, payload)
            except Exception:
                log.exception("broker: delivering a message from another process failed")

    def _on_relay(self, frame: bytes) -> None:
        if self._relay_deliver is not None:
            try:
                self._relay_deliver(frame)
            except Exception:
                log.exception("broker: delivering a relay message from another process failed")
