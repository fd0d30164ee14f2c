"""Redis broker: several wsapp processes share rooms (DESIGN.md section 5).

Key names, scripts, envelopes and the delivery cursor are in `redis_wire.py` (no I/O there; the
Emitter uses it too); this module is the transport: connections, subscriptions, supervision.

Every room event reaches local members from the room's channel, in the order Redis numbered it,
own publishes included: the publisher's ack comes from the script's reply, its members' copies from
the subscription, so all processes deliver a room in the same order. A process subscribes to a room's
channel when its first local member joins (before the join script runs, so nothing after the join is
missed) and unsubscribes when the last one leaves; the relay `/` has a channel of its own.

The work is split by **shard**: one Redis primary and everything this process does on it (its
subscription connection, its pipelined publishes, the registration of the members of the rooms whose
slot it owns, its health, its reconnection). One server or a Sentinel-watched primary is one shard
holding every room; a Redis Cluster has one per master, each room living on the shard that owns its
hash slot (sharded pub/sub: SPUBLISH from the scripts, SSUBSCRIBE on that shard). A shard that goes
away makes only its own rooms `unavailable`; the others keep working.

Publishes, joins and leaves go as a stream of commands on one connection per shard (redis_stream:
a writer greenlet and a reply reader), so many are in flight at once without a lock; joins and leaves
hold a shard's members lock shared, the heartbeat and re-registration exclusive, so a re-registration
after a reconnect lists exactly this process's members. While a shard
is unreachable or stalled a publish into one of its rooms is refused (`BrokerUnavailable`, never a
locally invented number); joins list local members and report `history_gone` for any `since` they
cannot serve; the shard's supervisor greenlet reconnects with capped backoff, then catches each of its
rooms up from its log.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import gevent
import orjson
import redis
from gevent.event import Event
from gevent.lock import Semaphore
from redis.commands.core import Script

from wsapp import protocol
from wsapp.backends import BrokerUnavailable, Deliver, Published, RelayFrames, RoomView, Seq
from wsapp.backends import redis_stream as stream
from wsapp.backends import redis_wire as wire
from wsapp.backends.redis_connect import detect_cluster, make_client, node_client, where
from wsapp.backends.redis_stream import pack_command
from wsapp.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_SECONDS = 2.0
LISTEN_POLL = 0.25  # how long the subscriber waits for a message before looking at its own state
MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
# While a Cluster shard is down, how often the slot map is read again: a promoted replica is taken up
# this long after the Cluster names it, not after the failed shard's next reconnection attempt (up to
# MAX_BACKOFF later). One CLUSTER SLOTS per process each time, only while degraded.
TOPOLOGY_POLL = 0.5
SETTLE_PAUSE = 0.05  # between sends of calls a settling Cluster refused (CLUSTERDOWN), within the stream's retry window
PUBLISH_BATCH = 512  # rooms per pipeline when registering or keeping members alive
# Bytes of this process's relay frames sent to Redis whose copy has not come back on its own subscription
# yet; past this a relay sender waits until half have. Redis buffers those copies for this process's
# subscriber, and cuts a subscriber off past its client-output-buffer-limit for pub/sub (32 MB, or 8 MB
# for 60 s, by default; some deployments set far less): a flood on one process must not cost that
# process its own subscription. 64 KiB stays under even tight limits (the tests set 256 KiB).
RELAY_ECHO_WINDOW = 64 * 1024
RESTARTED_TEXT = "the room's numbering restarted (its counter was lost in the broker): new epoch"
GAP_TEXT = "some messages were missed while the broker was away and are no longer kept"
SUBSCRIBED = frozenset({"subscribe", "ssubscribe"})
MESSAGES = frozenset({"message", "smessage"})
MESSAGE_KINDS = frozenset({b"message", b"smessage"})  # the same, as the subscription's replies name them


def _briefly_refused(error: BaseException) -> bool:
    """CLUSTERDOWN or TRYAGAIN: a Cluster node did not run the call because the Cluster is settling
    (a failover, a node briefly taken for failed, keys moving); asked again shortly, it may."""
    return isinstance(error, (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError))


def _another_primary(reply: Exception) -> bool:
    """An error reply saying the connection no longer leads to the primary it was opened on (demoted
    to a replica, or demoted and promoted again since)."""
    return isinstance(reply, redis.exceptions.ReadOnlyError) or str(reply).startswith(wire.STALE_LIFE)


def _cluster_settling(exc: BaseException) -> bool:
    """A Cluster refusing for a while (a shard just back, a failover, slots moving), not a real refusal."""
    return _briefly_refused(exc) or any(
        word in str(exc) for word in ("CLUSTERDOWN", "cluster is down", "TRYAGAIN", "MOVED", "ASK ")
    )


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
    """Rooms shared through Redis (one server, a Sentinel primary, or a Cluster's shards): numbers,
    epochs, history, members and every room's delivery."""

    name = "redis"
    inline = False

    def __init__(self, settings: Settings, timeout: float = 1.0) -> None:
        self._settings = settings
        self._history = settings.history
        self._timeout = timeout
        self._where = where(settings)
        self._bus = wire.BusIdentity()
        self._closing = Event()
        self._deliver: Deliver | None = None
        # Single server or Sentinel: one shard, made in attach(). Cluster: one per master, made once the
        # Cluster's slot map is known (the topology greenlet), by node name.
        self._cluster: Any = None
        self._shards: dict[str, Shard] = {}
        self._topology: gevent.Greenlet | None = None
        self._topology_wake = Event()
        self._mapped = Event()  # the shards exist (at once on one server; after CLUSTER SLOTS on a Cluster)
        self._cursors = wire.Cursors()
        # Who each local room's members have been told is in it: presence made consistent after a reconnect.
        self.rosters = wire.Rosters()
        # Local members whose join script ran and whose own presence event has not come back yet:
        # that event marks the join's place in the room's stream (JoinGate) and is always delivered.
        self._marking: set[str] = set()
        self.epochs = wire.EpochProposals()
        # Local rooms and their members (for re-registering after a reconnect).
        self._members: dict[str, dict[str, str]] = {}
        # Relay frames go to Redis on the relay shard's command stream, in the order this process's
        # clients sent them; the bytes whose copy has not come back yet pace the senders (RELAY_ECHO_WINDOW),
        # counted for the relay shard's incarnation they were sent under.
        self._relay_deliver: RelayFrames | None = None
        self._relay_lag = 0
        self._relay_lag_incarnation = ""
        self._relay_lag_of = b""  # that incarnation's relay envelope prefix
        self._relay_drained = Event()
        # What /stats and /metrics show of the broker (see `counters`).
        self.reconnects = 0
        self._relay_waits = 0
        self._messages_in = 0

    @property
    def sharded(self) -> bool:
        """True on a Redis Cluster (sharded pub/sub, one shard per master)."""
        return self._settings.redis_cluster

    @property
    def healthy(self) -> bool:
        """Every shard answers (on a Cluster, a shard down makes the process `degraded`)."""
        shards = list(self._shards.values())
        return bool(shards) and all(shard.healthy for shard in shards)

    @property
    def counters(self) -> dict[str, int]:
        """`broker_reconnects`: times a subscription was lost and made again (Redis restarted, a shard
        came back, or Redis cut off a subscriber that fell behind past its client-output-buffer-limit);
        `broker_relay_waits`: times a relay sender waited for its process's earlier relay frames to come
        back from Redis (RELAY_ECHO_WINDOW);
        `broker_messages_in`: messages this process received from the broker (its rooms' and the relay's)."""
        return {
            "broker_reconnects": self.reconnects,
            "broker_relay_waits": self._relay_waits,
            "broker_messages_in": self._messages_in,
        }

    # ---- the hub's interface --------------------------------------------------------------------

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver
        if self._settings.redis_url and not self.sharded:
            self._settings = detect_cluster(self._settings, self._timeout)
        if self.sharded:
            self._topology = gevent.spawn(self._map_cluster)
            self._mapped.wait(3 * self._timeout)
        else:
            shard = Shard(self, "primary", make_client(self._settings, self._timeout))
            self._shards[shard.name] = shard
            self._mapped.set()
            shard.start()
        # Start serving with the broker's real state when it answers promptly; never wait long for it.
        deadline = time.monotonic() + 3 * self._timeout
        for shard in list(self._shards.values()):
            shard.settled.wait(max(0.0, deadline - time.monotonic()))

    def attach_relay(self, deliver: RelayFrames) -> RelayFrames | None:
        self._relay_deliver = deliver
        return self._share_relay

    def publish(self, room: str, head: bytes, tail: bytes, origin: str | None) -> Seq:
        return self._healthy_shard(room).publish(room, head, tail, origin)

    def publish_nowait(self, room: str, head: bytes, tail: bytes, origin: str | None, done: Published) -> None:
        self._healthy_shard(room).publish_nowait(room, head, tail, origin, done)

    def _healthy_shard(self, room: str) -> Shard:
        shard = self.shard_of(room)
        if shard is None or not shard.healthy:
            raise BrokerUnavailable("the broker is unreachable")
        return shard

    def join(
        self, room: str, member_id: str, name: str, presence: bytes | None, since: int | None, epoch: str | None
    ) -> RoomView:
        self._members.setdefault(room, {})[member_id] = name
        shard = self.shard_of(room)
        if shard is not None and shard.healthy:
            try:
                shard.subscribe(room)
                if presence is not None:
                    self._marking.add(member_id)
                with shard.members_lock.shared(self._timeout):
                    call = wire.join_call(shard.incarnation, room, member_id, name, presence, since, epoch,
                                          self.sharded, shard.life, self._history)
                    reply = shard.stream_call(shard.script_command(shard.join_script, call))
                if isinstance(reply, Exception):
                    raise reply
                seq, names, replay, gone, room_epoch, fields = reply
                room_epoch = room_epoch.decode()
                self._cursors.start(room, room_epoch, int(seq))
                listed = {wire.field_member(f)[1]: n.decode() for f, n in zip(fields, names, strict=True)}
                self.rosters.start(room, listed)
                return RoomView(int(seq), [n.decode() for n in names], list(replay), bool(gone), room_epoch)
            except (redis.RedisError, OSError, BrokerUnavailable) as exc:
                self._marking.discard(member_id)
                shard.lost(exc)
        # Without the broker: what this process last saw, nothing replayed, and said so if anything is missed.
        # The member list is what this process's members were told (its roster), joiner included.
        known_epoch, seq = self._cursors.position(room) or ("", 0)
        gone = since is not None and (since != seq or (epoch is not None and epoch != known_epoch))
        self.rosters.start(room, self._members[room])
        self.rosters.apply(room, "join", member_id, name)
        return RoomView(seq, self.rosters.names(room), [], gone, known_epoch, delivered=False)

    def leave(self, room: str, member_id: str, presence: bytes) -> bool:
        self._marking.discard(member_id)
        shard = self.shard_of(room)
        if shard is None or not shard.healthy:
            self.rosters.apply(room, "leave", member_id, "")  # the hub tells local members itself
        local = self._members.get(room)
        emptied = False
        if local is not None:
            local.pop(member_id, None)
            if not local:
                emptied = True
                del self._members[room]
                self._cursors.forget(room)
                self.rosters.forget(room)
        if shard is None:
            return False
        if emptied:
            shard.unsubscribe(room)
        if not shard.healthy:
            return False
        try:
            with shard.members_lock.shared(self._timeout):
                incarnation = shard.incarnation
                commands = [pack_command((b"HDEL", wire.room_key(room, "members"),
                                          wire.member_field(incarnation, member_id)))]
                if emptied:  # this process no longer needs to count as alive in the room
                    commands.append(pack_command((b"ZREM", wire.room_key(room, "procs"), incarnation)))
                commands.append(pack_command((wire.publish_command(self.sharded), wire.room_channel(room),
                                              wire.envelope(incarnation, room, 0, presence, origin=member_id))))
                reply = shard.stream_call(*commands)
            if isinstance(reply, Exception):
                raise reply
            return True
        except (redis.RedisError, OSError, BrokerUnavailable) as exc:
            shard.lost(exc)
            return False

    def room_emptied(self, room: str) -> None:
        """Nothing kept per room once it has no local members (the cursor went with the subscription)."""

    def close(self) -> None:
        self._closing.set()
        if self._topology is not None:
            self._topology.kill(timeout=self._timeout)
        for shard in list(self._shards.values()):
            shard.close()
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close()

    # ---- rooms and shards -----------------------------------------------------------------------

    def shard_of(self, room: str) -> Shard | None:
        """The shard that owns `room`'s slot; None while a Cluster's slot map is unknown."""
        if not self.sharded:  # one shard: no channel name to make (every publish asks)
            return self._shards.get("primary")
        return self._shard_of_channel(wire.room_channel(room))

    def _shard_of_channel(self, channel: str) -> Shard | None:
        if not self.sharded:
            return self._shards.get("primary")
        if self._cluster is None:
            return None
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(self._cluster.keyslot(channel))
        except redis.RedisError:  # SlotNotCoveredError: a slot no master serves (being resharded)
            return None
        return self._shards.get(node.name)

    def relay_shard(self) -> Shard | None:
        return self._shard_of_channel(wire.RELAY_CHANNEL)

    def rooms_of(self, shard: Shard) -> list[str]:
        """The local rooms whose slot `shard` owns."""
        if not self.sharded:
            return list(self._members)
        return [room for room in list(self._members) if self.shard_of(room) is shard]

    def members_of(self, room: str) -> dict[str, str]:
        return self._members.get(room, {})

    def topology_changed(self) -> None:
        """A shard could not be reached: ask the Cluster for its slot map again (a replica may have been
        promoted, slots moved); rooms that changed owner are taken up by their new shard."""
        self._topology_wake.set()

    def _map_cluster(self) -> None:
        """Build the Cluster client (retrying until a node answers), make a shard per master, and make
        them again whenever the slot map's masters change (looked at when a shard fails, and every
        TOPOLOGY_POLL while one is down)."""
        backoff = MIN_BACKOFF
        while not self._closing.is_set():
            try:
                if self._cluster is None:
                    self._cluster = make_client(self._settings, self._timeout)
                else:
                    self._cluster.nodes_manager.initialize()
                self._adopt_masters()
                backoff = MIN_BACKOFF
                self._mapped.set()
            except Exception as exc:  # redis-py raises RedisClusterException (not a RedisError) too
                if not self._mapped.is_set():
                    log.warning("broker unreachable (redis %s: %s); serving local members only, retrying",
                                self._where, exc)
                    self._mapped.set()  # nothing to wait for: serve degraded at once
                if self._closing.wait(backoff):
                    return
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self._topology_wake.clear()
            self._topology_wake.wait(None if self.healthy else TOPOLOGY_POLL)
            if self._closing.wait(MIN_BACKOFF):  # several shards may report at once
                return

    def _adopt_masters(self) -> None:
        """Shards for the slot map's masters; rooms whose slot changed owner are subscribed again on
        their new shard (the shards they left and joined start over: subscribe, register, catch up).
        A shard made here subscribes to its rooms as it starts, and the others' rooms stay as they
        were: a failover interrupts only the rooms of the shard that failed over."""
        masters = {node.name: node for node in self._cluster.get_primaries()}
        gone = [shard for name, shard in self._shards.items() if name not in masters]
        started = set()
        for name, node in masters.items():
            if name not in self._shards:
                shard = Shard(self, name, node_client(self._cluster, node))
                self._shards[name] = shard
                started.add(shard)
                shard.start()
        moved = {(shard, self.shard_of(room)) for shard in self._shards.values()
                 for room in shard.subscribed_rooms() if room in self._members and self.shard_of(room) is not shard}
        for shard in gone:  # no longer a master (a replica took over): its rooms belong to another shard
            del self._shards[shard.name]
        if gone or moved:
            log.warning("broker: the Cluster's slot map changed (%s); rooms move to their new shards",
                        ", ".join([f"{shard.name} is no longer a master" for shard in gone]
                                  + [f"rooms moved from {a.name}" for a, _ in moved if a not in gone]))
            restart = {s for pair in moved for s in pair if s is not None}
            relay = self.relay_shard()
            if relay is not None and not relay.relay_subscribed:  # the relay's slot came here too
                restart.add(relay)
            for shard in restart - started - set(gone):
                shard.restart()
        for shard in gone:
            shard.close()

    # ---- deliveries -----------------------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        self._messages_in += 1
        try:
            _, room, seq, epoch, origin, payload = wire.parse_envelope(data)  # unpacked: once per message
        except ValueError:
            log.warning("broker: malformed message ignored")
            return
        own = self._bus.is_echo(data)
        if room == wire.RELAY_ROOM:
            if not own:
                self._on_relay(payload)
            elif data.startswith(self._relay_lag_of):
                self._relay_came_back(len(payload))
            return
        if not seq and origin is not None and room in self._members:
            try:
                event = orjson.loads(payload)
                news = self.rosters.apply(room, event["event"], origin, event["who"])
            except (ValueError, KeyError, TypeError):
                news = True  # not a presence event this version knows: deliver it as before
            if own and origin in self._marking:
                self._marking.discard(origin)
                news = True
            if not news:
                return
        self.on_room_event(room, seq, epoch, origin if own else None, payload)

    def on_room_event(self, room: str, seq: int, epoch: str, origin: str | None, payload: bytes) -> None:
        if room not in self._members:
            return  # in flight when the last local member left
        verdict = self._cursors.offer(room, seq, epoch)
        if verdict is wire.Verdict.REPEAT:
            return
        if verdict is wire.Verdict.RESTARTED:
            self.notify(room, protocol.error(protocol.HISTORY_GONE, RESTARTED_TEXT, room=room, epoch=epoch))
        self.notify(room, payload, seq, origin)

    def deliver_own(self, room: str, numbered: Seq, origin: str | None, head: bytes, tail: bytes) -> None:
        """One of this process's publishes came back numbered (the stream's reply): deliver it to the
        local members now if it is the room's next message here, rather than when its copy comes in on
        the subscription (then a REPEAT). Redis writes a publish's reply before the subscription's copy,
        and wsapp often woke for the reply alone: the copy then waited a whole event-loop turn (the
        flush of everything else queued), ~0.3-1 ms at 10 senders into a room of 100. Not while a local
        join waits for its own presence event (that must reach the room's local members first), nor
        while producers must wait (the hub refuses: see Deliver's `early`)."""
        deliver = self._deliver
        if deliver is None or self._marking or room not in self._members:
            return
        seq, epoch = numbered.seq, numbered.epoch
        if not self._cursors.is_next(room, seq, epoch):
            return  # an earlier message (another process's) is still on its way: the subscription keeps the order
        try:
            if not deliver(room, seq, origin, b"%s%d%s" % (head, seq, tail), early=True):
                return
        except Exception:
            log.exception("broker: delivering a room event failed")
        self._cursors.offer(room, seq, epoch)

    def notify(self, room: str, payload: bytes, seq: int = 0, origin: str | None = None) -> None:
        if self._deliver is not None:
            try:
                self._deliver(room, seq, origin, payload)
            except Exception:
                log.exception("broker: delivering a room event failed")

    def cursor_rooms(self, shard: Shard) -> list[tuple[str, str, int]]:
        """(room, epoch, last seq delivered) of the local rooms `shard` owns."""
        return [entry for entry in self._cursors.rooms() if self.shard_of(entry[0]) is shard]

    def forget_cursor(self, room: str) -> None:
        self._cursors.forget(room)

    def _on_relay(self, frame: bytes) -> None:
        if self._relay_deliver is not None:
            try:
                self._relay_deliver(frame)
            except Exception:
                log.exception("broker: delivering a relay message from another process failed")

    # ---- the relay: one PUBLISH per message, on the relay shard's command stream ----------------

    def _share_relay(self, frame: bytes) -> None:
        """Send one of this process's relay frames to the others. The sender's reader does not wait on
        Redis round trips, only while RELAY_ECHO_WINDOW bytes of this process's frames have not come
        back on its own subscription: then it waits (pacing its client, as for a slow local reader)
        until half have, or a timeout passes with none coming back (lost with a subscription: counted
        as back)."""
        shard = self.relay_shard()
        if shard is None or not shard.healthy:
            return  # like rooms: while the broker is away, local clients only
        if self._relay_lag >= RELAY_ECHO_WINDOW:
            self._relay_waits += 1
            while self._relay_lag >= RELAY_ECHO_WINDOW // 2 and shard.healthy:
                self._relay_drained.clear()
                if not self._relay_drained.wait(self._timeout):
                    self._relay_lag = 0
            if not shard.healthy:
                return
        if shard.incarnation != self._relay_lag_incarnation:  # a new subscription: earlier copies will not come
            self._relay_lag, self._relay_lag_incarnation = 0, shard.incarnation
            self._relay_lag_of = wire.relay_prefix(shard.incarnation)
        size = len(frame)
        try:
            shard.share_relay(frame, partial(self._relay_answered, shard, size))
        except BrokerUnavailable:  # the stream was closed (a shard dropped): the frame stays here, as above
            return
        self._relay_lag += size

    def _relay_came_back(self, size: int) -> None:
        lag = self._relay_lag = max(0, self._relay_lag - size)
        if lag < RELAY_ECHO_WINDOW // 2 and not self._relay_drained.is_set():
            self._relay_drained.set()

    def _relay_answered(self, shard: Shard, size: int, reply: Any, failure: BaseException | None) -> None:
        """A relay PUBLISH's reply (the stream's reader), or its failure (the broker went away: the
        frame is dropped, the relay keeps nothing; the shard already knows). A frame that was not
        published will not come back; a refusal is handled as a room publish's is."""
        if failure is not None:
            self._relay_came_back(size)
        elif isinstance(reply, Exception):
            self._relay_came_back(size)
            shard.refused(reply)
            log.debug("broker: a relay frame was refused (%s)", reply)


class Shard:
    """One Redis primary and this process's work on it: the subscription to its rooms' channels (and
    the relay's, if its slot is here), their members' registration and heartbeat, their publishes,
    health and reconnection. A shard's failure makes only its own rooms unavailable."""

    def __init__(self, backend: RedisBackend, name: str, client: Any) -> None:
        self.backend = backend
        self.name = name
        # Fail-fast timeouts and no redis-py retries (redis_connect): a retry would hold a reader, and a
        # retried script could number a message twice.
        self.client = client
        self._timeout = backend._timeout
        self._sharded = backend.sharded
        self.publish_script: Script = client.register_script(wire.PUBLISH_SCRIPT)
        self.join_script: Script = client.register_script(wire.JOIN_SCRIPT)
        self._catch_up_script: Script = client.register_script(wire.CATCH_UP_SCRIPT)
        self._heartbeat_script: Script = client.register_script(wire.HEARTBEAT_SCRIPT)
        self.incarnation = backend._bus.next_incarnation()
        # The primary's life (replication id, and node id on a Cluster) as the stream's connection
        # reported it when opened: the scripts make a room's counter again (a new epoch) when it was
        # written under another life (redis_wire's _COUNTER: a replica promoted by a failover may miss
        # the last numbers its primary gave).
        self.life = wire.UNKNOWN_LIFE
        # Joins and leaves (shared) against heartbeats and re-registration (exclusive): members in Redis
        # are exactly the local ones, and joins of many members run at once.
        self.members_lock = SharedLock()
        self.healthy = False
        self._up = False  # what the log last said
        self._said_no_life = False  # the warning that INFO is refused, once per shard
        self._down_since = time.monotonic()
        self._backoff = MIN_BACKOFF
        self._closing = Event()
        self.settled = Event()
        self._supervisor: gevent.Greenlet | None = None
        # The live subscription: rooms subscribed (set once Redis confirmed) and confirmations awaited.
        self._pubsub: Any = None
        self._subscribed: dict[str, Event] = {}
        self.relay_subscribed = False  # the relay's channel is in the subscription (its slot is here)
        self._confirming: dict[bytes, deque[Event]] = {}
        # SUNSUBSCRIBEs sent and not yet confirmed, by channel: any other `sunsubscribe` is Redis
        # dropping a subscription because the slot moved to another shard.
        self._unsubscribing: dict[bytes, int] = {}
        # Room publishes, joins and leaves: written to one connection as they come, replies read as they arrive.
        pool = client.connection_pool
        self._stream = stream.CommandStream(pool.get_connection, pool.release, self.lost, lambda: self.healthy,
                                            self._runs_later, self._before_again, self._identify)
        self._scripts_lost = False  # a NOSCRIPT reply came: load the scripts before sending again
        self._settling = False  # a CLUSTERDOWN/TRYAGAIN reply came: pause before sending again
        self._beat_window = stream.RetryWindow()  # how long the heartbeat rides out a settling Cluster
        self._publish_commands = wire.PublishCommands(self.publish_script.sha, backend._history, self._sharded)
        self._relay_commands = wire.RelayCommands(self._sharded)

    @property
    def where(self) -> str:
        return self.backend._where if not self._sharded else f"{self.backend._where}, shard {self.name}"

    def start(self) -> None:
        self._supervisor = gevent.spawn(self._supervise)
        self._stream.start()

    def subscribed_rooms(self) -> list[str]:
        return list(self._subscribed)

    def restart(self) -> None:
        """Drop the subscription so the supervisor makes it again (rooms may have changed owner)."""
        if self.healthy:
            self.lost(redis.ConnectionError("the Cluster's slot map changed"))

    def close(self) -> None:
        self._closing.set()
        if self._supervisor is not None:
            self._supervisor.kill(timeout=self._timeout)
        self._stream.close(self._timeout)

        def withdraw() -> None:
            # Members of this process stop being listed now rather than PROC_TTL from now.
            pipe = self.client.pipeline(transaction=False)
            for room in self.backend.rooms_of(self):
                pipe.zrem(wire.room_key(room, "procs"), self.incarnation)
                fields = [wire.member_field(self.incarnation, m) for m in self.backend.members_of(room)]
                if fields:
                    pipe.hdel(wire.room_key(room, "members"), *fields)
            pipe.execute()

        self.call(withdraw)
        self.healthy = False
        with contextlib.suppress(Exception):
            self.client.close()

    # ---- per-room subscriptions -----------------------------------------------------------------

    def subscribe(self, room: str) -> None:
        """Make sure the room's channel is subscribed, waiting for Redis to confirm it (so the join
        script, which runs after, can miss nothing)."""
        confirmed = self._subscribed.get(room)
        if confirmed is None:
            if self._pubsub is None:
                raise redis.ConnectionError("not subscribed to the broker")
            confirmed = self._subscribed[room] = Event()
            channel = wire.room_channel(room)
            self._confirming.setdefault(channel.encode(), deque()).append(confirmed)
            self._send_subscribe(self._pubsub, [channel])
        if not confirmed.wait(self._timeout):
            raise redis.TimeoutError("no subscribe confirmation")

    def unsubscribe(self, room: str) -> None:
        if self._subscribed.pop(room, None) is not None and self._pubsub is not None and self.healthy:
            try:
                if self._sharded:
                    channel = wire.room_channel(room)
                    self._unsubscribing[channel.encode()] = self._unsubscribing.get(channel.encode(), 0) + 1
                    self._pubsub.sunsubscribe(channel)
                else:
                    self._pubsub.unsubscribe(wire.room_channel(room))
            except (redis.RedisError, OSError) as exc:
                self.lost(exc)

    def _send_subscribe(self, pubsub: Any, channels: list[str]) -> None:
        if self._sharded:
            # One SSUBSCRIBE per channel: channels of different slots cannot share one (CROSSSLOT).
            for channel in channels:
                pubsub.ssubscribe(channel)
        else:
            pubsub.subscribe(*channels)

    def _on_sunsubscribe(self, channel: bytes) -> None:
        pending = self._unsubscribing.get(channel, 0)
        if pending > 1:
            self._unsubscribing[channel] = pending - 1
        elif pending:
            del self._unsubscribing[channel]
        else:  # not ours: Redis dropped the subscription because the room's slot moved to another shard
            raise redis.ConnectionError("a room's slot moved to another shard")

    def _on_confirmation(self, message: dict[str, Any]) -> None:
        waiting = self._confirming.get(message["channel"])
        if waiting:
            waiting.popleft().set()
            if not waiting:
                del self._confirming[message["channel"]]

    # ---- room publishes, joins and leaves: a stream of commands on one connection (redis_stream) --

    def share_relay(self, frame: bytes, answered: stream.Answered) -> None:
        """PUBLISH one relay frame on the stream (no caller waits: `answered` is told)."""
        self._stream.submit(self._relay_commands.command(self.incarnation, frame), answered)

    def publish(self, room: str, head: bytes, tail: bytes, origin: str | None) -> Seq:
        numbered = self._numbered(self.stream_call(self._publish_command(room, head, tail, origin)))
        self.backend.deliver_own(room, numbered, origin, head, tail)
        return numbered

    def publish_nowait(self, room: str, head: bytes, tail: bytes, origin: str | None, done: Published) -> None:
        """`publish` whose caller does not wait: `done` is told from the stream's reader."""

        def answered(reply: Any, failure: BaseException | None) -> None:
            if failure is None:
                try:
                    numbered = self._numbered(reply)
                except BrokerUnavailable as exc:
                    failure = exc
                else:
                    self.backend.deliver_own(room, numbered, origin, head, tail)
                    done(numbered, None)
                    return
            done(None, failure)

        self._stream.submit(self._publish_command(room, head, tail, origin), answered)

    def _publish_command(self, room: str, head: bytes, tail: bytes, origin: str | None) -> bytes:
        return self._publish_commands.command(self.incarnation, room, head, tail, origin,
                                              self.backend.epochs.propose(), self.life)

    def _numbered(self, reply: Any) -> Seq:
        """The seq and epoch a publish script's reply gives; BrokerUnavailable for an error reply."""
        if isinstance(reply, Exception):
            self.refused(reply)
            raise BrokerUnavailable(f"the broker refused the message ({reply})")
        return Seq(int(reply[0]), reply[1].decode())

    def refused(self, reply: Exception) -> None:
        """A publish Redis refused (out of memory, a read-only replica, MOVED): it did not run. A moved
        slot remaps the Cluster; a server that is no longer the primary makes this shard start over on
        a connection that knows where it leads."""
        if isinstance(reply, (redis.exceptions.MovedError, redis.exceptions.AskError)):
            self.backend.topology_changed()
        elif _another_primary(reply):
            self.lost(reply)

    @staticmethod
    def script_command(script: Script, call: wire.ScriptCall) -> bytes:
        return pack_command((b"EVALSHA", script.sha, len(call.keys), *call.keys, *call.args))

    def stream_call(self, *commands: bytes) -> Any:
        """Send commands on the stream (publishes, joins, leaves: many in flight on one connection,
        however many callers); the last one's reply (an error reply as an exception value)."""
        if len(commands) == 1:
            return self._stream.submit(commands[0]).get()
        results = [self._stream.submit(command) for command in commands]
        # No timeout of our own (a gevent Timeout per publish cost 5% of its CPU): the stream answers
        # every command, its socket reads and writes time out, and closing it fails what is left.
        return [result.get() for result in results][-1]

    def _identify(self, conn: Any) -> str:
        """The life of the primary a new stream connection reached (its replication id, and on a Cluster
        its node id: INFO replication, CLUSTER MYID), which the scripts check each room's counter
        against; refused if the server is not a primary (any more); NO_LIFE when the server will not
        run INFO (then counters are not checked)."""
        node_id = None
        try:
            if self._sharded:
                conn.send_command("CLUSTER", "MYID", check_health=False)
                node_id = conn.read_response()
            conn.send_command("INFO", "replication", check_health=False)
            info = conn.read_response()
        except redis.ResponseError as exc:  # INFO renamed away or not granted to this user
            if not self._said_no_life:
                self._said_no_life = True
                log.warning("broker: redis %s refuses INFO (%s): a failover that lost the last messages of a "
                            "room cannot be detected, and their seqs may be given again", self.where, exc)
            return wire.NO_LIFE
        role, life = wire.replication_life(info, node_id)
        if role != "master":
            raise redis.ConnectionError(f"{self.where} is not a primary (role {role})")
        return life

    def _runs_later(self, error: Exception) -> bool:
        """Whether an error reply on the stream says the call did not run but can soon (the stream then
        calls `_before_again` and sends it again, in order, for a bounded time)."""
        if isinstance(error, redis.exceptions.NoScriptError):
            self._scripts_lost = True
            return True
        if self._sharded and _briefly_refused(error):
            self._settling = True
            return True
        return False

    def _before_again(self) -> None:
        """After NOSCRIPT replies (Redis lost its script cache: a restart, a failover, SCRIPT FLUSH):
        load the stream's scripts. After a Cluster's CLUSTERDOWN/TRYAGAIN: give it a moment (a node
        that saw another briefly as failed, or a failover, settles in well under the stream's retry
        window; a shard that stays down is refused after it)."""
        if self._scripts_lost:
            self._scripts_lost = False
            for script in (wire.PUBLISH_SCRIPT, wire.JOIN_SCRIPT):
                self.client.script_load(script)
        if self._settling:
            self._settling = False
            gevent.sleep(SETTLE_PAUSE)

    # ---- Redis calls ----------------------------------------------------------------------------

    @staticmethod
    def run(script: Script, call: wire.ScriptCall, client: Any = None) -> Any:
        return script(keys=call.keys, args=call.args, client=client)

    def call(self, fn: Callable[[], T]) -> T | None:
        """`fn()` against Redis, or None at once while the shard is down (or when this call finds it down)."""
        if not self.healthy:
            return None
        try:
            return fn()
        except (redis.RedisError, OSError) as exc:
            self.lost(exc)
            return None

    def lost(self, exc: BaseException) -> None:
        self.healthy = False
        if self._up:
            self._up = False
            self._down_since = time.monotonic()
            log.warning("broker lost (redis %s: %s); serving local members only, reconnecting", self.where, exc)

    # ---- the supervisor: subscriber, heartbeat, reconnection ------------------------------------

    def _supervise(self) -> None:
        while not self._closing.is_set():
            pubsub = self.client.pubsub()
            try:
                early = self._subscribe_all(pubsub)
                self.life = self._stream.open()
                with self.members_lock.exclusive(self._timeout):
                    # From here joins and leaves wait for this lock instead of skipping Redis, so the
                    # members registered below are exactly this process's members.
                    self.healthy = True
                    self._register_again()
                self._catch_up()
                self._resync_presence()
                for data in early:
                    self.backend.on_message(data)
                self._announce_up()
                self._listen(pubsub)
            except Exception as exc:  # whatever breaks, the supervisor must carry on
                if not isinstance(exc, (redis.RedisError, OSError)):
                    log.exception("broker supervisor failed")
                elif isinstance(exc, redis.ResponseError) and not (self._sharded and _cluster_settling(exc)):
                    # not an outage: say what Redis refused, every time
                    hint = "" if self._sharded or "MOVED" not in str(exc) else (
                        ": REDIS_URL is a Redis Cluster node (it did not answer at start-up to be recognised); "
                        "set WSAPP_REDIS_CLUSTER=1 and restart")
                    log.error("broker: redis %s refused a command (%s)%s; retrying", self.where, exc, hint)
                elif not self._up and not self.settled.is_set():
                    log.warning(
                        "broker unreachable (redis %s: %s); serving local members only, retrying", self.where, exc
                    )
                self.lost(exc)
            finally:
                self.settled.set()
                self._pubsub = None
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()
            if self._sharded:
                self.backend.topology_changed()
            if self._closing.wait(self._backoff):
                break
            # Behind Sentinel the next attempt is what finds the promoted replica (the pool asks the
            # Sentinels for the primary on connect): try every TOPOLOGY_POLL at most, as a Cluster
            # rereads its slot map, not every MAX_BACKOFF.
            cap = TOPOLOGY_POLL if self.backend._settings.redis_sentinel_master is not None else MAX_BACKOFF
            self._backoff = min(self._backoff * 2, cap)

    def _subscribe_all(self, pubsub: Any) -> list[bytes]:
        """Subscribe to every local room of this shard (and the relay if it lives here), and wait for
        Redis to confirm all of them. Returns the room messages that came meanwhile (delivered after
        the catch-up)."""
        rooms = self.backend.rooms_of(self)
        self._subscribed = {room: Event() for room in rooms}
        self._confirming = {}
        self._unsubscribing = {}
        channels = [wire.room_channel(room) for room in rooms]
        self.relay_subscribed = self.backend.relay_shard() is self
        if self.relay_subscribed:
            channels.insert(0, wire.RELAY_CHANNEL)
        if not channels:
            self.client.ping()  # nothing to subscribe to yet: a shard that does not answer shows now
            channels_left = 0
        else:
            self._send_subscribe(pubsub, channels)
            channels_left = len(channels)
        self._pubsub = pubsub
        early: list[bytes] = []
        deadline = time.monotonic() + self._timeout * (1 + len(channels) // 1000)
        while channels_left:
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("no subscribe confirmation")
            message = pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] in SUBSCRIBED:
                room = wire.channel_room(message["channel"])
                if room is not None and room in self._subscribed:
                    self._subscribed[room].set()
                channels_left -= 1
            elif message["type"] in MESSAGES:
                early.append(message["data"])
        return early

    def _register_again(self) -> None:
        """Start a new incarnation holding every local member of this shard's rooms; retire the previous one."""
        previous = self.incarnation
        incarnation = self.incarnation = self.backend._bus.next_incarnation()
        rooms = self.backend.rooms_of(self)
        for start in range(0, len(rooms), PUBLISH_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for room in rooms[start:start + PUBLISH_BATCH]:
                pipe.zrem(wire.room_key(room, "procs"), previous)
                self._register_room(pipe, room, incarnation)
            pipe.execute()

    def _register_room(self, pipe: Any, room: str, incarnation: str) -> None:
        members = self.backend.members_of(room)
        if members:
            pipe.hset(wire.room_key(room, "members"),
                      mapping={wire.member_field(incarnation, m): n for m, n in members.items()})
        self.run(self._heartbeat_script, wire.heartbeat_call(incarnation, room), client=pipe)
        # Announce them again: a process that re-read the room's members before this registration
        # learns of them here (processes that already list them deliver nothing: see Rosters).
        channel = wire.room_channel(room)
        command = wire.publish_command(self._sharded)
        for member_id, name in members.items():
            pipe.execute_command(command, channel, wire.envelope(
                incarnation, room, 0, protocol.presence(room, "join", name), origin=member_id))

    def _catch_up(self) -> None:
        """After a reconnection: deliver what each room's members missed meanwhile, from its log."""
        for room, epoch, last in self.backend.cursor_rooms(self):
            call = wire.catch_up_call(room, last, epoch, self.backend._history)
            found, current, missed = self.run(self._catch_up_script, call)
            if found is None:
                continue  # no counter: the room's next life starts with its next message (RESTARTED)
            current_epoch = found.decode()
            if current_epoch == epoch and current > last and (
                    not missed or int(wire.message_seq(missed[0])) > last + 1):
                self.backend.notify(room, protocol.error(protocol.HISTORY_GONE, GAP_TEXT, room=room, epoch=epoch))
            # In a new life (a failover, a flush) the first of its messages tells members (RESTARTED)
            # before it is delivered; without any yet, the next live one will.
            for payload in missed:
                self.backend.on_room_event(room, wire.message_seq(payload), current_epoch, None, payload)

    def _resync_presence(self) -> None:
        """After a reconnection: re-read each of this shard's local rooms' live members (those of
        incarnations alive in the room's procs set) and deliver the differences from what local members
        were told as presence events (joins and leaves missed while the subscription was down, members
        of processes that died meanwhile)."""
        rooms = [room for room in self.backend.rosters.rooms() if self.backend.shard_of(room) is self]
        for start in range(0, len(rooms), PUBLISH_BATCH):
            chunk = rooms[start:start + PUBLISH_BATCH]
            pipe = self.client.pipeline(transaction=False)
            for room in chunk:
                pipe.execute_command("TIME")
                pipe.hgetall(wire.room_key(room, "members"))
                pipe.zrange(wire.room_key(room, "procs"), 0, -1, withscores=True)
            replies = pipe.execute()
            for n, room in enumerate(chunk):
                clock, fields, procs = replies[3 * n:3 * n + 3]
                now = int(clock[0]) * 1000 + int(clock[1]) // 1000
                alive = {owner for owner, deadline in procs if deadline > now}
                members = {}
                for field, name in fields.items():
                    owner, member_id = wire.field_member(field)
                    if owner in alive:
                        members[member_id] = name.decode()
                for event, who in self.backend.rosters.resync(room, members):
                    self.backend.notify(room, protocol.presence(room, event, who))

    def _announce_up(self) -> None:
        if not self._up:
            if self.settled.is_set():
                self.backend.reconnects += 1
                log.warning("broker back (redis %s) after %.1fs", self.where, time.monotonic() - self._down_since)
            else:
                log.info("broker connected (redis %s)", self.where)
            self._up = True

    def _listen(self, pubsub: Any) -> None:
        self.settled.set()
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        self._beat_window.ok()  # a new subscription gets a whole retry window
        # Messages are read off the subscription's connection directly (stream.ReplyReader: as many as
        # a socket read brought, each straight from hiredis): PubSub.get_message's layers cost 3.5 us
        # a message against 1.2, and the connection's can_read and read_response more than 1 again.
        # Everything else (subscribe and unsubscribe confirmations) still goes through
        # PubSub.handle_message, which keeps its own bookkeeping right.
        replies: stream.ReplyReader | None = None
        response: Any
        on_message = self.backend.on_message
        while self.healthy and not self._closing.is_set():
            conn = pubsub.connection
            if conn is None:  # nothing subscribed yet (a shard without local rooms): PubSub waits
                message = pubsub.get_message(timeout=LISTEN_POLL)
                if message is not None and message["type"] in SUBSCRIBED:
                    self._on_confirmation(message)
                response = stream.NOTHING
            else:
                if replies is None:
                    replies = stream.ReplyReader(conn)
                response = replies.read(LISTEN_POLL)
            if response is not stream.NOTHING:
                if isinstance(response, redis.ResponseError):
                    raise response  # Redis refused a (un)subscription: the supervisor says so, starts over
                if response[0] in MESSAGE_KINDS:
                    on_message(response[2])
                else:
                    message = pubsub.handle_message(response)
                    if message is not None:
                        kind = message["type"]
                        if kind in SUBSCRIBED:
                            self._on_confirmation(message)
                        elif kind == "sunsubscribe":
                            self._on_sunsubscribe(message["channel"])
            if time.monotonic() >= next_beat:
                next_beat = self._beat()

    def _beat(self) -> float:
        """Run the heartbeat; when the next is due. A Cluster refusing it as it settles (CLUSTERDOWN,
        TRYAGAIN: a failover elsewhere, a node briefly taking another for failed) is not this shard
        failing: beat again shortly, as the stream sends its calls again, and take the shard for lost
        only if that lasts past the stream's retry window (so the rooms here are not dropped and
        resubscribed over a blip the publishes ride out)."""
        try:
            self._heartbeat()
        except redis.RedisError as exc:
            if not (self._sharded and _briefly_refused(exc) and self._beat_window.refused()):
                raise
            return time.monotonic() + SETTLE_PAUSE * 4
        self._beat_window.ok()
        return time.monotonic() + HEARTBEAT_SECONDS

    def _heartbeat(self) -> None:
        """Keep this process alive in each of its rooms here; a room where it had been taken for dead
        (this process stalled past PROC_TTL, or Redis lost the keys) gets its members registered again."""
        with self.members_lock.exclusive(self._timeout):
            rooms = self.backend.rooms_of(self)
            incarnation = self.incarnation
            for start in range(0, max(len(rooms), 1), PUBLISH_BATCH):
                chunk = rooms[start:start + PUBLISH_BATCH]
                pipe = self.client.pipeline(transaction=False)
                for room in chunk:
                    self.run(self._heartbeat_script, wire.heartbeat_call(incarnation, room), client=pipe)
                pipe.ping()  # a shard without local rooms still shows whether it answers
                alive = pipe.execute()
                dead = [room for room, kept in zip(chunk, alive, strict=False) if not kept]
                if dead:
                    log.warning("broker: taken for dead in %d room(s) on %s; registering their members again",
                                len(dead), self.name)
                    pipe = self.client.pipeline(transaction=False)
                    for room in dead:
                        self._register_room(pipe, room, incarnation)
                    pipe.execute()
        self._backoff = MIN_BACKOFF
