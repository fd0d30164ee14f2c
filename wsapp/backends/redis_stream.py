"""A stream of commands on one Redis connection: written as they come, replies read as they arrive.

The room publisher used to send everything queued as one pipeline and wait for its replies before
sending the next, so this process and Redis took turns: Redis idle while the process prepared a
batch, the process idle while Redis ran it. Here one greenlet writes batches as soon as they queue
and another reads replies in order, so Redis runs one batch while the next is being written
(docs/SCALING.md has the figures). Redis answers one connection's commands in the order it got them,
which is how each reply finds its caller.

Commands are packed here (RESP arrays of bytes) rather than by redis-py's serializer, which cost a
fifth of a publish's CPU; replies are parsed by hiredis, asked directly (`ReplyReader`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import redis
from gevent.event import Event
from gevent.hub import Waiter, get_hub
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _HiredisParser

from wsapp.backends import BrokerUnavailable

log = logging.getLogger(__name__)

Arg = bytes | str | int
BATCH = 512  # commands per write at most

# How long commands keep being sent again while Redis keeps saying they can run later (a Cluster
# settling after a failover); past it they get the refusal. Counted from the first such reply since
# the last reply that was not one.
RETRY_WINDOW = 2.0


class RetryWindow:
    """Whether a refusal that says "later" is still worth retrying: for `seconds` from the first one
    since the last success (`ok`). `since` is None while nothing is being retried (the hot path
    looks at it before calling `ok`)."""

    __slots__ = ("_seconds", "since")

    def __init__(self, seconds: float = RETRY_WINDOW) -> None:
        self._seconds = seconds
        self.since: float | None = None

    def refused(self) -> bool:
        """A refusal came: True while within the window (retry), False once it is over."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return now - self.since < self._seconds

    def ok(self) -> None:
        """A success (or a new connection): the next refusal starts a whole window."""
        self.since = None


UNREACHABLE = "the broker is unreachable"
UNKNOWN = "the broker did not answer in time (the message may still be delivered)"
CUT = "the connection to the broker was lost (the message may still be delivered)"  # sent, not answered


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


# Told a command's reply (an error reply as an exception value) or, as its second argument, the
# stream's failure (BrokerUnavailable); runs in whichever greenlet answered, so it must not block.
Answered = Callable[[Any, BaseException | None], None]


NOTHING = object()  # ReplyReader.read: nothing came within the time given


class ReplyReader:
    """The replies on one redis-py connection, read as they come: each socket read brings as many
    as it holds, and each is then taken straight from hiredis's reader.

    redis-py's `read_response` costs, per reply, the text of its error message (an f-string) and a
    few checks, and `can_read` on an empty buffer a poll() and a MSG_PEEK recv: more than a small
    room's message costs to deliver. Error replies come back as values (`redis.ResponseError` and
    its kinds, e.g. NoScriptError); a connection that failed raises, as in redis-py. Without hiredis
    (redis-py's own parser), redis-py's calls, with the same results."""

    __slots__ = ("_conn", "_parser")

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        parser = conn._parser
        self._parser = parser if isinstance(parser, _HiredisParser) else None

    def read(self, timeout: float | None = None) -> Any:
        """The next reply; with `timeout`, NOTHING when none came within it (else the connection's
        socket timeout applies: redis.TimeoutError)."""
        parser = self._parser
        if parser is None:
            return self._read_response(timeout)
        reader = parser._reader
        if reader is None:
            raise redis.ConnectionError("the connection is closed")
        reply = reader.gets()
        while reply is NOT_ENOUGH_DATA:
            if timeout is None:
                parser.read_from_socket()
            elif not parser.read_from_socket(timeout=timeout, raise_on_timeout=False):
                return NOTHING
            reply = reader.gets()
        if isinstance(reply, redis.ConnectionError):
            raise reply
        return reply

    def _read_response(self, timeout: float | None) -> Any:
        conn = self._conn
        if timeout is not None and not conn.can_read(timeout=timeout):
            return NOTHING
        try:
            return conn.read_response()
        except redis.ResponseError as error:
            return error


class Reply:
    """One command's reply, waited for by its caller (`get`), or handed to its `callback`.

    Lighter than a gevent `AsyncResult` per command (its own callback on the event loop per set,
    a link list, a dummy timeout per get): the stream's reader collects the replies it read and
    wakes all their callers from one event-loop callback (`CommandStream._wake`)."""

    __slots__ = ("callback", "done", "error", "value", "waiter")

    def __init__(self, callback: Answered | None = None) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.waiter: Waiter | None = None
        self.callback = callback

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
    `usable()` is False commands fail at once too.

    `retryable(error)` is asked about an error reply: True when it says the command did not run for
    a cause `repair()` removes or waits out (NOSCRIPT: Redis lost its script cache, repair loads the
    scripts; CLUSTERDOWN: a Cluster settling after a failover, repair pauses). The stream then holds
    back what has not been written yet, reads what is in flight (setting aside each command that
    failed the same way), repairs once, and sends those again first, in their order: so commands run
    in the order they were submitted, retried or not (a caller with several publishes in flight keeps
    their order), and the repair runs once, not per reply. A command set aside is only sent again if
    nothing behind it ran meanwhile (Redis may stop refusing between two replies): once a later
    reply is not a refusal to retry, those set aside get their refusal as their answer rather than
    run after it. For `retry_window` seconds from the first such reply (until a reply that is not
    an error); after that the refusal is the answer.
    """

    def __init__(
        self,
        get_connection: Callable[[], Any],
        release_connection: Callable[[Any], None],
        on_lost: Callable[[BaseException], None],
        usable: Callable[[], bool],
        retryable: Callable[[Exception], bool] | None = None,
        repair: Callable[[], None] | None = None,
        identify: Callable[[Any], str] | None = None,
        retry_window: float = RETRY_WINDOW,
    ) -> None:
        self._get_connection = get_connection
        self._identify = identify
        self._release_connection = release_connection
        self._on_lost = on_lost
        self._usable = usable
        self._retryable = retryable
        self._repair = repair
        self._window = RetryWindow(retry_window)
        self._queue: deque[tuple[bytes, Reply]] = deque()
        self._inflight: deque[list[tuple[bytes, Reply]]] = deque()
        # Commands that did not run (and their refusals) and go again after the repair; while any,
        # nothing new is written.
        self._again: list[tuple[bytes, Reply, Exception]] = []
        self._answered: list[Reply] = []  # replies whose callers the next `_wake` switches to
        self._conn: Any = None
        self._write_wake = Event()
        self._read_wake = Event()
        self._writer: gevent.Greenlet | None = None
        self._reader: gevent.Greenlet | None = None
        self._closed = False

    def start(self) -> None:
        self._writer = gevent.spawn(self._write_forever)
        self._reader = gevent.spawn(self._read_forever)

    def close(self, timeout: float) -> None:
        self._closed = True  # from now on submit() refuses at once: nobody would answer
        for greenlet in (self._writer, self._reader):
            if greenlet is not None:
                greenlet.kill(timeout=timeout)
        self._drop_connection(BrokerUnavailable(CUT))
        failure = BrokerUnavailable(UNREACHABLE)
        while self._queue:  # nobody will send these now
            self._answer(self._queue.popleft()[1], None, failure)

    def open(self) -> str:
        """Take a new connection for the commands from now on (the broker was away: the one held may be
        dead without knowing it, or lead to another server now) and return what `identify` says of it.
        What is still queued or in flight fails: it was made for the old connection."""
        self._drop_connection(BrokerUnavailable(CUT))
        failure = BrokerUnavailable(UNREACHABLE)
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
        self._window.ok()  # a new connection gets a whole retry window
        return identity

    def submit(self, command: bytes, callback: Answered | None = None) -> Reply:
        """Queue one packed command (`pack_command`); the result's `get()` is its reply (an error
        reply as an exception value), or `BrokerUnavailable` raised. With a `callback`, nobody waits:
        it is called with the reply, or with `BrokerUnavailable` as its second argument, from the
        greenlet that got the answer (the stream's reader, mostly), in the order commands were sent.
        BrokerUnavailable raised at once once the stream is closed (a shard dropped after a topology
        change while its caller was switched out): its writer and reader are gone."""
        if self._closed:
            raise BrokerUnavailable(UNREACHABLE)
        result = Reply(callback)
        self._queue.append((command, result))
        if len(self._queue) == 1:
            self._write_wake.set()
        return result

    # ---- writer ---------------------------------------------------------------------------------

    def _write_forever(self) -> None:
        queue = self._queue
        while True:
            if not queue or self._again:
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
        again = self._again
        retryable = self._retryable
        window = self._window
        replies: ReplyReader | None = None
        replies_of: Any = None  # the connection `replies` reads
        while True:
            if not inflight:
                if again:  # all that was in flight is read: repair, then send those again first
                    self._send_again()
                    continue
                self._read_wake.clear()
                self._read_wake.wait()
                continue
            conn = self._conn
            if replies is None or conn is not replies_of:
                replies, replies_of = ReplyReader(conn), conn
            batch = inflight[0]
            try:
                while batch:
                    reply = replies.read()
                    # An error reply leaves the connection fine; some say the command can run later.
                    if isinstance(reply, redis.ResponseError):
                        if retryable is not None and retryable(reply) and window.refused():
                            command, result = batch[0]
                            again.append((command, result, reply))
                            del batch[0]
                            continue
                    elif window.since is not None:
                        window.ok()
                    if again:  # this one was not refused: those set aside would run after it, out of order
                        self._refuse_again()
                    self._answer(batch[0][1], reply, None)
                    del batch[0]
            except Exception as exc:  # the reader must live on: whatever broke, this connection is done
                if not isinstance(exc, (redis.RedisError, OSError)):
                    log.exception("broker: reading from Redis failed")
                self._lost(conn, exc)
                continue
            inflight.popleft()

    def _send_again(self) -> None:
        try:
            if self._repair is not None:
                self._repair()
        except Exception as exc:  # could not repair: this connection is done (what was set aside fails)
            if not isinstance(exc, (redis.RedisError, OSError)):
                log.exception("broker: repairing after an error reply failed")
            self._lost(self._conn, exc)
            return
        self._queue.extendleft([(command, result) for command, result, _ in reversed(self._again)])
        self._again.clear()
        self._write_wake.set()

    def _refuse_again(self) -> None:
        again, self._again[:] = list(self._again), []
        for _, result, refusal in again:
            self._answer(result, refusal, None)
        self._write_wake.set()  # the writer held back the queue for them

    # ---- answering callers ----------------------------------------------------------------------

    def _answer(self, result: Reply, value: Any, error: BaseException | None) -> None:
        callback = result.callback
        if callback is not None:
            try:
                callback(value, error)
            except Exception:  # the reader must live on
                log.exception("broker: handling a reply failed")
            return
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
        sent = BrokerUnavailable(UNKNOWN if isinstance(exc, redis.TimeoutError) else CUT)
        self._drop_connection(sent)
        self._on_lost(exc)

    def _drop_connection(self, sent: BrokerUnavailable) -> None:
        """Let go of the connection; what was written on it and not answered fails with `sent` (it may
        have run), what was refused and held for a resend with UNREACHABLE (it did not)."""
        conn, self._conn = self._conn, None
        if self._again:
            again, self._again[:] = list(self._again), []
            failure = BrokerUnavailable(UNREACHABLE)  # these did not run
            for _, result, _refusal in again:
                self._answer(result, None, failure)
            self._write_wake.set()  # the writer held back the queue for them
        while self._inflight:
            for _, result in self._inflight.popleft():
                self._answer(result, None, sent)
        if conn is not None:
            try:
                conn.disconnect()
            finally:
                self._release_connection(conn)
