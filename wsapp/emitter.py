"""Publish into wsapp rooms from any Python process (a Celery task, a cron job) through the servers' Redis.

Plain redis-py, no gevent and no monkey patching: the Emitter runs the servers' own publish script
with the servers' keys, envelope and message bytes (`redis_wire`, `protocol.message_parts`), so a
message it publishes is numbered, kept and delivered exactly like `rt.publish` inside a server.
"""

from __future__ import annotations

import time
from dataclasses import replace
from types import TracebackType
from typing import Any

from wsapp import protocol
from wsapp.backends import Seq
from wsapp.backends import redis_wire as wire
from wsapp.backends.redis_connect import detect_cluster, make_client
from wsapp.config import Settings
from wsapp.exceptions import MessageError


class Emitter:
    """Publishes to the rooms of every wsapp server sharing `redis_url` (their REDIS_URL).

    `history` must be the servers' WSAPP_HISTORY (default 100 on both sides): every publish trims the
    room's log to that length, so a different value changes how much a `join` with `since` can replay.
    Thread-safe (redis-py's connection pool); create it after forking, as any Redis client. It reads
    the servers' WSAPP_REDIS_* settings (Cluster, Sentinel, TLS) from the environment too; a Redis
    Cluster node is recognised without WSAPP_REDIS_CLUSTER, as in the servers.
    """

    def __init__(self, redis_url: str, history: int = 100, timeout: float = 5.0) -> None:
        if type(history) is not int or history < 0:
            raise ValueError("history must be a whole number >= 0 (the servers' WSAPP_HISTORY)")
        self._history = history
        # The servers' connection rules (redis_connect): Sentinel and TLS as WSAPP_REDIS_* say, no
        # automatic retry (a reply lost after the script ran would publish the message twice; a
        # connection Redis closed while idle is replaced by the pool before use, not retried).
        settings = detect_cluster(replace(Settings.from_env(), redis_url=redis_url), timeout)
        # On a Redis Cluster the script runs on the shard owning the room's slot and SPUBLISHes there.
        self._sharded = settings.redis_cluster
        self._client = make_client(settings, timeout, name="wsapp-emitter")
        self._publish_script = self._client.register_script(wire.PUBLISH_SCRIPT)
        # A process id of its own: every server delivers what it publishes (none takes it for its echo).
        self._bus = wire.BusIdentity()

    def publish(self, room: str, data: Any, sender: str = "server") -> Seq:
        """Number, keep and deliver `data` in `room` as a `message` from `sender`; returns its seq (an
        int with `.epoch`, the room's numbering life it belongs to, as in `joined`).

        Raises ValueError for a bad room or sender name, TypeError when `data` is not JSON-serializable,
        and redis.RedisError when Redis cannot be reached (the message may then not have been published).
        """
        try:
            protocol.check_room(room)
            protocol.check_sender(sender)
        except MessageError as exc:
            raise ValueError(exc.message) from None
        try:
            head, tail = protocol.message_parts(room, sender, int(time.time() * 1000), data)
        except TypeError as exc:  # orjson.JSONEncodeError
            raise TypeError(f"data is not JSON-serializable: {exc}") from None
        # No life passed: the script looks the primary's up (INFO) on every publish. A life learned
        # earlier cannot be passed back: redis-py reconnects inside the call, so after a restart from
        # a snapshot or a failover it would be the stale one, the very life a kept counter was written
        # under, and the script would number on in the old epoch (seqs given twice; redis_wire._COUNTER).
        call = wire.publish_call(self._bus.incarnation, room, head, tail, self._history, sharded=self._sharded)
        reply = self._publish_script(keys=call.keys, args=call.args)
        return Seq(int(reply[0]), reply[1].decode())

    def close(self) -> None:
        """Close the Redis connections."""
        self._client.close()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
