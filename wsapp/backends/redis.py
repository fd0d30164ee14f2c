"""Redis backend: several wsapp processes share rooms (DESIGN.md section 5).

Key names, scripts and the bus envelope are in `redis_wire.py` (no I/O there; the Emitter uses it too).

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
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gevent
import redis
from gevent.event import Event
from gevent.lock import Semaphore
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from wsapp.backends import Deliver, RelayFrames, RoomView
from wsapp.backends import redis_wire as wire

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_SECONDS = 2.0
LISTEN_POLL = 0.25  # how long the subscriber waits for a message before looking at its own state
MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
RELAY_BATCH = 256  # relay frames per pipeline (still one PUBLISH each)
RELAY_BACKLOG = 10000  # relay frames waiting for Redis; past this the sender waits (pacing) until half have gone


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
        self._publish_script = self._client.register_script(wire.PUBLISH_SCRIPT)
        self._join_script = self._client.register_script(wire.JOIN_SCRIPT)
        self._raise_seq_script = self._client.register_script(wire.RAISE_SEQ_SCRIPT)
        self._bus = wire.BusIdentity()
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
        self._relay_drained = Event()
        # What /stats and /metrics show of the broker (see `counters`).
        self._reconnects = 0
        self._relay_waits = 0
        # Local rooms: their members (for re-registering after a reconnect) and the last seq seen.
        self._members: dict[str, dict[str, str]] = {}
        self._seqs: dict[str, int] = {}

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def counters(self) -> dict[str, int]:
        """`broker_reconnects`: times the subscription was lost and made again (Redis restarted, or cut
        off a subscriber that fell behind past its client-output-buffer-limit); `broker_relay_waits`:
        times a relay sender waited for Redis to take its backlog."""
        return {"broker_reconnects": self._reconnects, "broker_relay_waits": self._relay_waits}

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
        # The incarnation is read under the lock: a reconnection may have started a new one meanwhile.
        seq = self._call(
            lambda: self._run(
                self._publish_script, wire.publish_call(self._bus.incarnation, room, head, tail, self._history)
            )
        )
        if seq is None:
            seq = self._seqs.get(room, 0) + 1
        self._seen(room, int(seq))
        return int(seq), b"%s%d%s" % (head, int(seq), tail)

    def join(self, room: str, member_id: str, name: str, presence: bytes | None, since: int | None) -> RoomView:
        self._members.setdefault(room, {})[member_id] = name
        result = self._call(
            lambda: self._run(
                self._join_script, wire.join_call(self._bus.incarnation, room, member_id, name, presence, since)
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
            incarnation = self._bus.incarnation
            pipe = self._client.pipeline(transaction=False)
            pipe.hdel(wire.room_key(room, "members"), wire.member_field(incarnation, member_id))
            pipe.publish(wire.CHANNEL, wire.envelope(incarnation, room, 0, presence))
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
        self._call(lambda: self._client.delete(wire.proc_key(self._bus.incarnation)))
        self._healthy = False
        self._client.close()

    # ---- the relay: one PUBLISH per message, sent from one greenlet -----------------------------

    def _share_relay(self, frame: bytes) -> None:
        """Queue one of this process's relay frames for the others. The sender's reader does not wait
        on Redis round trips, only when Redis falls RELAY_BACKLOG frames behind: then it waits (pacing
        its client, as for a slow local reader) until half of them have gone."""
        if not self._healthy:
            return  # like rooms: while the broker is away, local clients only
        queue = self._relay_queue
        if len(queue) >= RELAY_BACKLOG:
            self._relay_waits += 1
            while len(queue) >= RELAY_BACKLOG // 2 and self._healthy:
                self._relay_drained.clear()
                self._relay_drained.wait(self._timeout)
            if not self._healthy:
                return
        queue.append(frame)
        if len(queue) == 1:
            self._relay_wake.set()

    def _publish_relay_forever(self) -> None:
        queue = self._relay_queue
        while True:
            if len(queue) < RELAY_BACKLOG // 2:
                self._relay_drained.set()
            if not queue:
                self._relay_wake.clear()
                self._relay_wake.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), RELAY_BATCH))]
            prefix = wire.relay_prefix(self._bus.incarnation)

            def send(batch: list[bytes] = batch, prefix: bytes = prefix) -> None:
                pipe = self._client.pipeline(transaction=False)
                for frame in batch:
                    pipe.publish(wire.CHANNEL, prefix + frame)
                pipe.execute()

            # Broker down: the batch is dropped (the relay keeps nothing) and _share_relay stops queueing.
            if self._call(send) is None and not self._healthy:
                queue.clear()
                self._relay_drained.set()

    # ---- Redis calls ----------------------------------------------------------------------------

    @staticmethod
    def _run(script: Script, call: wire.ScriptCall, client: Any = None) -> Any:
        return script(keys=call.keys, args=call.args, client=client)

    def _seen(self, room: str, seq: int) -> None:
        if room in self._members and seq > self._seqs.get(room, 0):
            self._seqs[room] = seq

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock.linkcount():
            # Others are waiting: let them go first. gevent's Semaphore is not fair, and a client
            # publishing back to back would otherwise take it again at once, starve the heartbeat past
            # its timeout and have the broker declared lost in the middle of a healthy burst.
            gevent.sleep(0)
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
        pubsub.subscribe(wire.CHANNEL)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message["type"] == "subscribe":
                return
        raise redis.TimeoutError("no subscribe confirmation")

    def _register_again(self) -> None:
        """Start a new incarnation holding every local member; retire the previous one."""
        previous = self._bus.incarnation
        incarnation = self._bus.next_incarnation()
        pipe = self._client.pipeline(transaction=False)
        pipe.delete(wire.proc_key(previous))
        pipe.set(wire.proc_key(incarnation), 1, ex=wire.PROC_TTL)
        for room, members in self._members.items():
            key = wire.room_key(room, "members")
            pipe.hset(key, mapping={wire.member_field(incarnation, m): n for m, n in members.items()})
            pipe.expire(key, wire.MEMBERS_TTL)
            if self._seqs.get(room):
                self._run(self._raise_seq_script, wire.raise_seq_call(room, self._seqs[room]), pipe)
        pipe.execute()

    def _announce_up(self) -> None:
        if not self._up:
            if self._settled.is_set():
                self._reconnects += 1
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
            pipe.set(wire.proc_key(self._bus.incarnation), 1, ex=wire.PROC_TTL, get=True)
            for room in self._members:
                pipe.expire(wire.room_key(room, "members"), wire.MEMBERS_TTL)
            alive = pipe.execute()[0]
            if alive is None:
                # Our key expired (this process stalled past PROC_TTL) and others may have dropped our
                # members as dead: register them again.
                log.warning("broker: liveness key had expired; registering local members again")
                self._register_again()
        self._backoff = MIN_BACKOFF

    def _on_bus(self, data: bytes) -> None:
        if self._bus.is_echo(data):
            return
        try:
            message = wire.parse_envelope(data)
        except ValueError:
            log.warning("broker: malformed message on %s ignored", wire.CHANNEL)
            return
        if message.is_relay:
            self._on_relay(message.payload)
            return
        room = message.room
        self._seen(room, message.seq)
        if room in self._members and self._deliver is not None:
            try:
                self._deliver(room, message.payload)
            except Exception:
                log.exception("broker: delivering a message from another process failed")

    def _on_relay(self, frame: bytes) -> None:
        if self._relay_deliver is not None:
            try:
                self._relay_deliver(frame)
            except Exception:
                log.exception("broker: delivering a relay message from another process failed")
