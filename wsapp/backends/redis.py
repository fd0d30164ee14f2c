"""Redis broker: several wsapp processes share rooms (DESIGN.md section 5).

Key names, scripts, envelopes and the delivery cursor are in `redis_wire.py` (no I/O there; the
Emitter uses it too); this module is the transport: connections, subscriptions, supervision.

Every room event reaches local members from the room's channel, in the order Redis numbered it,
own publishes included: the publisher's ack comes from the script's reply, its members' copies from
the subscription, so all processes deliver a room in the same order. A process subscribes to a room's
channel when its first local member joins (before the join script runs, so nothing after the join is
missed) and unsubscribes when the last one leaves; the relay `/` has a channel of its own.

Publishes are pipelined by one greenlet (all that queued during a round trip go in the next), so
many are in flight at once without a lock; joins, leaves and the heartbeat share one lock so a
re-registration after a reconnect lists exactly this process's members. While Redis is unreachable
or stalled a publish is refused (`BrokerUnavailable`, never a locally invented number); joins list
local members and report `history_gone` for any `since` they cannot serve; a
supervisor greenlet reconnects with capped backoff, then catches each room up from its log.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gevent
import orjson
import redis
from gevent.event import Event
from gevent.lock import Semaphore
from redis.commands.core import Script

from wsapp import protocol
from wsapp.backends import BrokerUnavailable, Deliver, RelayFrames, RoomView
from wsapp.backends import redis_stream as stream
from wsapp.backends import redis_wire as wire
from wsapp.backends.redis_connect import make_client, where
from wsapp.backends.redis_stream import pack_command
from wsapp.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_SECONDS = 2.0
LISTEN_POLL = 0.25  # how long the subscriber waits for a message before looking at its own state
MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
RELAY_BATCH = 256  # relay frames per pipeline (still one PUBLISH each)
RELAY_BACKLOG = 10000  # relay frames waiting for Redis; past this the sender waits (pacing) until half have gone
RESTARTED_TEXT = "the room's numbering restarted (its counter was lost in the broker): new epoch"
GAP_TEXT = "some messages were missed while the broker was away and are no longer kept"


class SharedLock:
    """Many holders at once (`shared`: joins, leaves) or one alone (`exclusive`: re-registration, the
    heartbeat). A waiting exclusive holder stops new shared ones, so a stream of joins cannot starve
    the heartbeat; every wait is bounded (redis.TimeoutError: treated as a stuck broker)."""

    def __init__(self) -> None:
        self._gate = Semaphore()  # held by an exclusive holder for its whole turn
        self._shared = 0
        self._idle = Event()  # no shared holder
        self._idle.set()

    @contextlib.contextmanager
    def shared(self, timeout: float) -> Iterator[None]:
        if not self._gate.acquire(timeout=timeout):
            raise redis.TimeoutError("another Redis call is stuck")
        self._gate.release()
        self._shared += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._shared -= 1
            if not self._shared:
                self._idle.set()

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        if not self._gate.acquire(timeout=timeout):
            raise redis.TimeoutError("another Redis call is stuck")
        try:
            if not self._idle.wait(max(0.0, deadline - time.monotonic())):
                raise redis.TimeoutError("another Redis call is stuck")
            yield
        finally:
            self._gate.release()


class RedisBackend:
    """Rooms shared through one Redis: numbers, epochs, history, members and every room's delivery."""

    name = "redis"
    inline = False

    def __init__(self, settings: Settings, timeout: float = 1.0) -> None:
        self._history = settings.history
        self._timeout = timeout
        # One server or the Sentinel-watched primary, TLS as configured (redis_connect): fail-fast
        # timeouts and no redis-py retries, which would hold a reader, and a retried script could
        # number a message twice.
        self._client = make_client(settings, timeout)
        self._where = where(settings)
        self._publish_script = self._client.register_script(wire.PUBLISH_SCRIPT)
        self._join_script = self._client.register_script(wire.JOIN_SCRIPT)
        self._catch_up_script = self._client.register_script(wire.CATCH_UP_SCRIPT)
        self._bus = wire.BusIdentity()
        # Joins and leaves (shared) against heartbeats and re-registration (exclusive): members in Redis
        # are exactly the local ones, and joins of many members run at once.
        self._members_lock = SharedLock()
        self._healthy = False
        self._up = False  # what the log last said
        self._down_since = time.monotonic()
        self._backoff = MIN_BACKOFF
        self._closing = Event()
        self._settled = Event()
        self._deliver: Deliver | None = None
        self._supervisor: gevent.Greenlet | None = None
        # The live subscription: rooms subscribed (set once Redis confirmed) and confirmations awaited.
        self._pubsub: Any = None
        self._subscribed: dict[str, Event] = {}
        self._confirming: dict[bytes, deque[Event]] = {}
        self._cursors = wire.Cursors()
        # Who each local room's members have been told is in it: presence made consistent after a reconnect.
        self._rosters = wire.Rosters()
        # Local members whose join script ran and whose own presence event has not come back yet:
        # that event marks the join's place in the room's stream (JoinGate) and is always delivered.
        self._marking: set[str] = set()
        # Room publishes: written to one connection as they come, replies read as they arrive.
        # One server or the Sentinel-watched primary (a Cluster needs a stream per shard: not built yet).
        pool = self._client.connection_pool  # type: ignore[union-attr]
        self._stream = stream.CommandStream(pool.get_connection, pool.release, self._lost, lambda: self._healthy,
                                            self._retry_script)
        self._epochs = wire.EpochProposals()
        self._publish_commands = wire.PublishCommands(self._publish_script.sha, self._history)
        # Relay frames on their way to Redis, in the order this process's clients sent them.
        self._relay_deliver: RelayFrames | None = None
        self._relay_queue: deque[bytes] = deque()
        self._relay_wake = Event()
        self._relay_publisher: gevent.Greenlet | None = None
        self._relay_drained = Event()
        # What /stats and /metrics show of the broker (see `counters`).
        self._reconnects = 0
        self._relay_waits = 0
        self._messages_in = 0
        # Local rooms and their members (for re-registering after a reconnect).
        self._members: dict[str, dict[str, str]] = {}

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def counters(self) -> dict[str, int]:
        """`broker_reconnects`: times the subscription was lost and made again (Redis restarted, or cut
        off a subscriber that fell behind past its client-output-buffer-limit); `broker_relay_waits`:
        times a relay sender waited for Redis to take its backlog; `broker_messages_in`: messages this
        process received from the broker (its rooms' and the relay's)."""
        return {
            "broker_reconnects": self._reconnects,
            "broker_relay_waits": self._relay_waits,
            "broker_messages_in": self._messages_in,
        }

    # ---- the hub's interface --------------------------------------------------------------------

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._supervisor = gevent.spawn(self._supervise)
        self._stream.start()
        # Start serving with the broker's real state when it answers promptly; never wait long for it.
        self._settled.wait(3 * self._timeout)

    def attach_relay(self, deliver: RelayFrames) -> RelayFrames | None:
        self._relay_deliver = deliver
        self._relay_publisher = gevent.spawn(self._publish_relay_forever)
        return self._share_relay

    def publish(self, room: str, head: bytes, tail: bytes, origin: str | None) -> int:
        if not self._healthy:
            raise BrokerUnavailable("the broker is unreachable")
        command = self._publish_commands.command(self._bus.incarnation, room, head, tail, origin,
                                                  self._epochs.propose())
        reply = self._stream_call(command)
        if isinstance(reply, Exception):  # refused (out of memory, a read-only replica): it did not run
            raise BrokerUnavailable(f"the broker refused the message ({reply})")
        return int(reply[0])

    @staticmethod
    def _script_command(script: Script, call: wire.ScriptCall) -> bytes:
        return pack_command((b"EVALSHA", script.sha, len(call.keys), *call.keys, *call.args))

    def _stream_call(self, *commands: bytes) -> Any:
        """Send commands on the stream (publishes, joins, leaves: many in flight on one connection,
        however many callers); the last one's reply (an error reply as an exception value)."""
        results = [self._stream.submit(command) for command in commands]
        # No timeout of our own (a gevent Timeout per publish cost 5% of its CPU): the stream answers
        # every command, its socket reads and writes time out, and closing it fails what is left.
        return [result.get() for result in results][-1]

    def join(
        self, room: str, member_id: str, name: str, presence: bytes | None, since: int | None, epoch: str | None
    ) -> RoomView:
        self._members.setdefault(room, {})[member_id] = name
        if self._healthy:
            try:
                self._subscribe(room)
                if presence is not None:
                    self._marking.add(member_id)
                with self._members_lock.shared(self._timeout):
                    call = wire.join_call(self._bus.incarnation, room, member_id, name, presence, since, epoch)
                    reply = self._stream_call(self._script_command(self._join_script, call))
                if isinstance(reply, Exception):
                    raise reply
                seq, names, replay, gone, room_epoch, fields = reply
                room_epoch = room_epoch.decode()
                self._cursors.start(room, room_epoch, int(seq))
                listed = {wire.field_member(f)[1]: n.decode() for f, n in zip(fields, names, strict=True)}
                self._rosters.start(room, listed)
                return RoomView(int(seq), [n.decode() for n in names], list(replay), bool(gone), room_epoch)
            except (redis.RedisError, OSError, BrokerUnavailable) as exc:
                self._marking.discard(member_id)
                self._lost(exc)
        # Without the broker: what this process last saw, nothing replayed, and said so if anything is missed.
        # The member list is what this process's members were told (its roster), joiner included.
        known_epoch, seq = self._cursors.position(room) or ("", 0)
        gone = since is not None and (since != seq or (epoch is not None and epoch != known_epoch))
        self._rosters.start(room, self._members[room])
        self._rosters.apply(room, "join", member_id, name)
        return RoomView(seq, self._rosters.names(room), [], gone, known_epoch, delivered=False)

    def leave(self, room: str, member_id: str, presence: bytes) -> bool:
        self._marking.discard(member_id)
        if not self._healthy:
            self._rosters.apply(room, "leave", member_id, "")  # the hub tells local members itself
        local = self._members.get(room)
        if local is not None:
            local.pop(member_id, None)
            if not local:
                del self._members[room]
                self._unsubscribe(room)
        if not self._healthy:
            return False
        try:
            with self._members_lock.shared(self._timeout):
                incarnation = self._bus.incarnation
                reply = self._stream_call(
                    pack_command((b"HDEL", wire.room_key(room, "members"), wire.member_field(incarnation, member_id))),
                    pack_command((b"PUBLISH", wire.room_channel(room),
                                  wire.envelope(incarnation, room, 0, presence, origin=member_id))))
            if isinstance(reply, Exception):
                raise reply
            return True
        except (redis.RedisError, OSError, BrokerUnavailable) as exc:
            self._lost(exc)
            return False

    def room_emptied(self, room: str) -> None:
        """Nothing kept per room once it has no local members (the cursor went with the subscription)."""

    def close(self) -> None:
        self._closing.set()
        if self._supervisor is not None:
            self._supervisor.kill(timeout=self._timeout)
        if self._relay_publisher is not None:
            self._relay_publisher.kill(timeout=self._timeout)
        self._stream.close(self._timeout)
        # Members of this process stop being listed now rather than PROC_TTL from now.
        self._call(lambda: self._client.delete(wire.proc_key(self._bus.incarnation)))
        self._healthy = False
        self._client.close()

    # ---- per-room subscriptions -----------------------------------------------------------------

    def _subscribe(self, room: str) -> None:
        """Make sure the room's channel is subscribed, waiting for Redis to confirm it (so the join
        script, which runs after, can miss nothing)."""
        confirmed = self._subscribed.get(room)
        if confirmed is None:
            if self._pubsub is None:
                raise redis.ConnectionError("not subscribed to the broker")
            confirmed = self._subscribed[room] = Event()
            channel = wire.room_channel(room)
            self._confirming.setdefault(channel.encode(), deque()).append(confirmed)
            self._pubsub.subscribe(channel)
        if not confirmed.wait(self._timeout):
            raise redis.TimeoutError("no subscribe confirmation")

    def _unsubscribe(self, room: str) -> None:
        self._cursors.forget(room)
        self._rosters.forget(room)
        if self._subscribed.pop(room, None) is not None and self._pubsub is not None and self._healthy:
            try:
                self._pubsub.unsubscribe(wire.room_channel(room))
            except (redis.RedisError, OSError) as exc:
                self._lost(exc)

    def _on_confirmation(self, message: dict[str, Any]) -> None:
        waiting = self._confirming.get(message["channel"])
        if waiting:
            waiting.popleft().set()
            if not waiting:
                del self._confirming[message["channel"]]

    # ---- room publishes: a stream of EVALSHAs on one connection (redis_stream) -----------------

    def _retry_script(self, error: Exception) -> bool:
        """NOSCRIPT: Redis lost its script cache (a restart, SCRIPT FLUSH) and the call did not run.
        Load the scripts; the stream sends the call again."""
        if not isinstance(error, redis.exceptions.NoScriptError):
            return False
        for script in (wire.PUBLISH_SCRIPT, wire.JOIN_SCRIPT):
            self._client.script_load(script)
        return True

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
                    pipe.publish(wire.RELAY_CHANNEL, prefix + frame)
                pipe.execute()

            # Broker down: the batch is dropped (the relay keeps nothing) and _share_relay stops queueing.
            if self._call(send) is None and not self._healthy:
                queue.clear()
                self._relay_drained.set()

    # ---- Redis calls ----------------------------------------------------------------------------

    @staticmethod
    def _run(script: Script, call: wire.ScriptCall, client: Any = None) -> Any:
        return script(keys=call.keys, args=call.args, client=client)

    def _call(self, fn: Callable[[], T]) -> T | None:
        """`fn()` against Redis, or None at once while the broker is down (or when this call finds it down)."""
        if not self._healthy:
            return None
        try:
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
                early = self._subscribe_all(pubsub)
                self._stream.reset()
                with self._members_lock.exclusive(self._timeout):
                    # From here joins and leaves wait for this lock instead of skipping Redis, so the
                    # members registered below are exactly this process's members.
                    self._healthy = True
                    self._register_again()
                self._catch_up()
                self._resync_presence()
                for data in early:
                    self._on_message(data)
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
                self._pubsub = None
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()
            if self._closing.wait(self._backoff):
                break
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _subscribe_all(self, pubsub: Any) -> list[bytes]:
        """Subscribe to the relay and every local room, and wait for Redis to confirm all of them.
        Returns the room messages that came meanwhile (delivered after the catch-up)."""
        rooms = list(self._members)
        self._subscribed = {room: Event() for room in rooms}
        self._confirming = {}
        channels = [wire.RELAY_CHANNEL, *(wire.room_channel(room) for room in rooms)]
        pubsub.subscribe(*channels)
        self._pubsub = pubsub
        early: list[bytes] = []
        pending = len(channels)
        deadline = time.monotonic() + self._timeout * (1 + len(channels) // 1000)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("no subscribe confirmation")
            message = pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "subscribe":
                room = wire.channel_room(message["channel"])
                if room is not None and room in self._subscribed:
                    self._subscribed[room].set()
                pending -= 1
            elif message["type"] == "message":
                early.append(message["data"])
        return early

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
            # Announce them again: a process that re-read the room's members before this registration
            # learns of them here (processes that already list them deliver nothing: see Rosters).
            channel = wire.room_channel(room)
            for member_id, name in members.items():
                pipe.publish(channel, wire.envelope(incarnation, room, 0, protocol.presence(room, "join", name),
                                                    origin=member_id))
        pipe.execute()

    def _catch_up(self) -> None:
        """After a reconnection: deliver what each room's members missed meanwhile, from its log."""
        for room, epoch, last in self._cursors.rooms():
            current_epoch, current, missed = self._run(self._catch_up_script, wire.catch_up_call(room, last))
            if current_epoch is None or current_epoch.decode() != epoch:
                continue  # a new life: the room's next message tells its members (RESTARTED)
            if current > last and (not missed or int(wire.message_seq(missed[0])) > last + 1):
                self._notify(room, protocol.error(protocol.HISTORY_GONE, GAP_TEXT, room=room, epoch=epoch))
            for payload in missed:
                self._on_room_event(room, wire.message_seq(payload), epoch, None, payload)

    def _resync_presence(self) -> None:
        """After a reconnection: re-read each local room's live members and deliver the differences
        from what local members were told as presence events (joins and leaves missed while the
        subscription was down, members of processes that died meanwhile)."""
        rooms = self._rosters.rooms()
        if not rooms:
            return
        pipe = self._client.pipeline(transaction=False)
        for room in rooms:
            pipe.hgetall(wire.room_key(room, "members"))
        hashes: list[dict[bytes, bytes]] = pipe.execute()
        owners = sorted({wire.field_member(field)[0] for fields in hashes for field in fields})
        pipe = self._client.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(wire.proc_key(owner.decode()))
        alive = {owner for owner, exists in zip(owners, pipe.execute(), strict=True) if exists}
        for room, fields in zip(rooms, hashes, strict=True):
            members = {}
            for field, name in fields.items():
                owner, member_id = wire.field_member(field)
                if owner in alive:
                    members[member_id] = name.decode()
            for event, who in self._rosters.resync(room, members):
                self._notify(room, protocol.presence(room, event, who))

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
        # Messages are read off the subscription's connection directly: PubSub.get_message's layers
        # cost 3.5 us a message against 1.2; everything else (subscribe and unsubscribe confirmations)
        # still goes through PubSub.handle_message, which keeps its own bookkeeping right.
        conn = pubsub.connection
        while self._healthy and not self._closing.is_set():
            if conn.can_read(timeout=LISTEN_POLL):
                response = conn.read_response()
                if response[0] == b"message":
                    self._on_message(response[2])
                else:
                    message = pubsub.handle_message(response)
                    if message is not None and message["type"] == "subscribe":
                        self._on_confirmation(message)
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + HEARTBEAT_SECONDS

    def _heartbeat(self) -> None:
        with self._members_lock.exclusive(self._timeout):
            pipe = self._client.pipeline(transaction=False)
            pipe.set(wire.proc_key(self._bus.incarnation), 1, ex=wire.PROC_TTL, get=True)
            for room in self._members:
                pipe.expire(wire.room_key(room, "members"), wire.MEMBERS_TTL)
            alive = pipe.execute()[0]
            if alive is None:
                # Our key expired (this process stalled past PROC_TTL, or Redis lost it) and others may
                # have dropped our members as dead: register them again.
                log.warning("broker: liveness key had expired; registering local members again")
                self._register_again()
        self._backoff = MIN_BACKOFF

    def _on_message(self, data: bytes) -> None:
        self._messages_in += 1
        try:
            message = wire.parse_envelope(data)
        except ValueError:
            log.warning("broker: malformed message ignored")
            return
        own = self._bus.is_echo(data)
        if message.is_relay:
            if not own:
                self._on_relay(message.payload)
            return
        if not message.seq and message.origin is not None and message.room in self._members:
            try:
                event = orjson.loads(message.payload)
                news = self._rosters.apply(message.room, event["event"], message.origin, event["who"])
            except (ValueError, KeyError, TypeError):
                news = True  # not a presence event this version knows: deliver it as before
            if own and message.origin in self._marking:
                self._marking.discard(message.origin)
                news = True
            if not news:
                return
        self._on_room_event(message.room, message.seq, message.epoch, message.origin if own else None, message.payload)

    def _on_room_event(self, room: str, seq: int, epoch: str, origin: str | None, payload: bytes) -> None:
        if room not in self._members:
            return  # in flight when the last local member left
        verdict = self._cursors.offer(room, seq, epoch)
        if verdict is wire.Verdict.REPEAT:
            return
        if verdict is wire.Verdict.RESTARTED:
            self._notify(room, protocol.error(protocol.HISTORY_GONE, RESTARTED_TEXT, room=room, epoch=epoch))
        self._notify(room, payload, seq, origin)

    def _notify(self, room: str, payload: bytes, seq: int = 0, origin: str | None = None) -> None:
        if self._deliver is not None:
            try:
                self._deliver(room, seq, origin, payload)
            except Exception:
                log.exception("broker: delivering a room event failed")

    def _on_relay(self, frame: bytes) -> None:
        if self._relay_deliver is not None:
            try:
                self._relay_deliver(frame)
            except Exception:
                log.exception("broker: delivering a relay message from another process failed")
