"""A stream of commands on one Redis connection: written as they come, replies read as they arrive.

The room publisher used to send everything queued as one pipeline and wait for its replies before
sending the next, so this process and Redis took turns: Redis idle while the process prepared a
batch, the process idle while Redis ran it. Here one greenlet writes batches as soon as they queue
and another reads replies in order, so Redis runs one batch while the next is being written
(docs/SCALING.md has the figures). Redis answers one connection's commands in the order it got them,
which is how each reply finds its caller.

Commands are packed here (RESP arrays of bytes) rather than by redis-py's serializer, which cost a
fifth of a publish's CPU; replies are read by redis-py's parser (hiredis when installed).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import redis
from gevent.event import Event
from gevent.hub import Waiter, get_hub

from wsapp.backends import BrokerUnavailable

log = logging.getLogger(__name__)

Arg = bytes | str | int
BATCH = 512  # commands per write at most

UNREACHABLE = "the broker is unreachable"
UNKNOWN = "the broker did not answer in time (the message may still be delivered)"


def pack_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings (what redis-py's serializer sends, built faster)."""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        append(b"$%d\r\n" % len(arg))
        append(arg)
        append(b"\r\n")
    return b"".join(parts)


class Reply:
    """One command's reply, waited for by its caller (`get`).

    Lighter than a gevent `AsyncResult` per command (its own callback on the event loop per set,
    a link list, a dummy timeout per get): the stream's reader collects the replies it read and
    wakes all their callers from one event-loop callback (`CommandStream._wake`)."""

    __slots__ = ("done", "error", "value", "waiter")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.waiter: Waiter | None = None

    def get(self) -> Any:
        """The reply (an error reply as an exception value), or the stream's failure raised."""
        if not self.done:
            waiter = self.waiter = Waiter()
            try:
                waiter.get()  # the stream's wake-up switches back here once `done`
            finally:
                self.waiter = None
        if self.error is not None:
            raise self.error
        return self.value


class CommandStream:
    """Commands to one Redis, many in flight on one connection, each caller answered with its own reply.

    `get_connection` gives a connected redis-py `Connection` (the client's pool: one server, the
    Sentinel-watched primary, TLS), `release_connection` takes it back. The owner opens a connection
    with `open()`, which asks `identify(conn)` about it first (commands may carry what it says: the
    primary's replication id). `on_lost(exc)` is told when the connection fails; the stream then fails
    what was in flight (`BrokerUnavailable`), and commands fail at once until the next `open()`. While
    `usable()` is False commands fail at once too. `retry` is asked about an error reply: True when
    the command may be sent again as it was (the error says it did not run and the cause was repaired:
    NOSCRIPT after loading the script).
    """

    def __init__(
        self,
        get_connection: Callable[[], Any],
        release_connection: Callable[[Any], None],
        on_lost: Callable[[BaseException], None],
        usable: Callable[[], bool],
        retry: Callable[[Exception], bool] | None = None,
        identify: Callable[[Any], str] | None = None,
    ) -> None:
        self._get_connection = get_connection
        self._identify = identify
        self._release_connection = release_connection
        self._on_lost = on_lost
        self._usable = usable
        self._retry = retry
        self._queue: deque[tuple[bytes, Reply]] = deque()
        self._inflight: deque[list[tuple[bytes, Reply]]] = deque()
        self._answered: list[Reply] = []  # replies whose callers the next `_wake` switches to
        self._conn: Any = None
        self._write_wake = Event()
        self._read_wake = Event()
        self._writer: gevent.Greenlet | None = None
        self._reader: gevent.Greenlet | None = None

    def start(self) -> None:
        self._writer = gevent.spawn(self._write_forever)
        self._reader = gevent.spawn(self._read_forever)

    def close(self, timeout: float) -> None:
        for greenlet in (self._writer, self._reader):
            if greenlet is not None:
                greenlet.kill(timeout=timeout)
        self._drop_connection(BrokerUnavailable(UNREACHABLE))
        failure = BrokerUnavailable(UNREACHABLE)
        while self._queue:  # nobody will send these now
            self._answer(self._queue.popleft()[1], None, failure)

    def open(self) -> str:
        """Take a new connection for the commands from now on (the broker was away: the one held may be
        dead without knowing it, or lead to another server now) and return what `identify` says of it.
        What is still queued or in flight fails: it was made for the old connection."""
        failure = BrokerUnavailable(UNREACHABLE)
        self._drop_connection(failure)
        while self._queue:
            self._answer(self._queue.popleft()[1], None, failure)
        conn = self._get_connection()
        try:
            identity = self._identify(conn) if self._identify is not None else ""
        except BaseException:
            try:
                conn.disconnect()
            finally:
                self._release_connection(conn)
            raise
        self._conn = conn
        return identity

    def submit(self, command: bytes) -> Reply:
        """Queue one packed command (`pack_command`); the result's `get()` is its reply (an error
        reply as an exception value), or `BrokerUnavailable` raised."""
        result = Reply()
        self._queue.append((command, result))
        if len(self._queue) == 1:
            self._write_wake.set()
        return result

    # ---- writer ---------------------------------------------------------------------------------

    def _write_forever(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._write_wake.clear()
                self._write_wake.wait()
                continue
            if not self._usable():
                failure = BrokerUnavailable(UNREACHABLE)
                while queue:
                    self._answer(queue.popleft()[1], None, failure)
                continue
            conn = self._conn
            if conn is None:  # lost, and not opened again yet: the owner's supervisor does that
                self._fail_queue(redis.ConnectionError("no connection to the broker"))
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), BATCH))]
            self._inflight.append(batch)
            self._read_wake.set()
            try:
                # No health check: it would send a PING and read its reply in the middle of the stream.
                conn.send_packed_command([b"".join([command for command, _ in batch])], check_health=False)
            except Exception as exc:  # the writer must live on: whatever broke, this connection is done
                if not isinstance(exc, (redis.RedisError, OSError)):
                    log.exception("broker: writing to Redis failed")
                self._lost(conn, exc)

    def _fail_queue(self, exc: BaseException) -> None:
        failure = BrokerUnavailable(UNREACHABLE)
        while self._queue:
            self._answer(self._queue.popleft()[1], None, failure)
        self._on_lost(exc)

    # ---- reader ---------------------------------------------------------------------------------

    def _read_forever(self) -> None:
        inflight = self._inflight
        while True:
            if not inflight:
                self._read_wake.clear()
                self._read_wake.wait()
                continue
            conn = self._conn
            batch = inflight[0]
            again: list[tuple[bytes, Reply]] = []
            try:
                while batch:
                    try:
                        reply = conn.read_response()
                    except redis.ResponseError as error:  # an error reply: the connection is fine
                        if self._retry is not None and self._retry(error):
                            again.append(batch[0])
                            del batch[0]
                            continue
                        reply = error
                    self._answer(batch[0][1], reply, None)
                    del batch[0]
            except Exception as exc:  # the reader must live on: whatever broke, this connection is done
                if not isinstance(exc, (redis.RedisError, OSError)):
                    log.exception("broker: reading from Redis failed")
                if again:
                    failure = BrokerUnavailable(UNREACHABLE)  # these did not run
                    for _, result in again:
                        self._answer(result, None, failure)
                self._lost(conn, exc)
                continue
            inflight.popleft()
            if again:
                self._queue.extendleft(reversed(again))
                self._write_wake.set()

    # ---- answering callers ----------------------------------------------------------------------

    def _answer(self, result: Reply, value: Any, error: BaseException | None) -> None:
        result.value = value
        result.error = error
        result.done = True
        answered = self._answered
        answered.append(result)
        if len(answered) == 1:
            get_hub().loop.run_callback(self._wake)

    def _wake(self) -> None:
        """On the event loop: switch to every caller answered since the last wake-up, in order (each
        runs until it waits again, then the loop comes back here for the next)."""
        answered, self._answered = self._answered, []
        for result in answered:
            waiter = result.waiter
            if waiter is not None:  # None: its caller has not waited yet (or was killed waiting)
                waiter.switch(None)

    # ---- failures -------------------------------------------------------------------------------

    def _lost(self, conn: Any, exc: BaseException) -> None:
        if conn is not self._conn:
            return  # the other greenlet already dealt with this connection
        sent = BrokerUnavailable(UNKNOWN if isinstance(exc, redis.TimeoutError) else UNREACHABLE)
        self._drop_connection(sent)
        self._on_lost(exc)

    def _drop_connection(self, sent: BrokerUnavailable) -> None:
        conn, self._conn = self._conn, None
        while self._inflight:
            for _, result in self._inflight.popleft():
                self._answer(result, None, sent)
        if conn is not None:
            try:
                conn.disconnect()
            finally:
                self._release_connection(conn)
