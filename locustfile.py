"""Locust load test for wsapp: WebSocket fan-out latency and deliveries per second.

Web UI:     locust -f locustfile.py --host http://127.0.0.1:8080
Unattended: locust -f locustfile.py --headless -u 500 -r 100 -t 60s --host http://127.0.0.1:8080 --csv out

Each simulated user holds one WebSocket. In ``--mode rooms`` it connects to ``/ws?name=...`` and joins
one room of ``--room-size`` users (``load-0``, ``load-1``, ...); in ``--mode relay`` it connects to
``/``, where every message reaches every other relay client. ``--publisher-share`` of the users publish
``--publish-rate`` messages/s each, padded with ``--payload-bytes``, carrying the wall-clock send time.
A receiver greenlet per user reports every delivery as request type ``WS``, name ``deliver rooms`` or
``deliver relay``, with response time = receive time - send time, so Locust's tables and ``--csv``
files show fan-out latency percentiles and deliveries/s. ``connect``, ``join`` and ``publish ...``
get their own rows; ``error frame``, ``bad frame`` and ``unexpected close`` rows count failures.

Send and receive times come from ``time.time()`` in one process, so they share a clock. With
``--processes``/workers on several machines the clocks must be synchronised for latencies to mean
anything. Run the server with ``WSAPP_RATE_LIMIT=0`` or publishers get ``rate_limited`` errors.
In relay mode every frame from a client that is not part of the test counts as a ``bad frame``.
Locust rewrites the ``--csv`` files once a second, so they can miss the last second of a run; the
tables and the ``wsapp load summary`` printed at the end hold the final figures.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import random
import struct
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import gevent
import orjson
import websocket
from locust import User, events, task
from locust.env import Environment
from locust.runners import LocalRunner, MasterRunner, WorkerRunner
from locust.stats import StatsEntry

logger = logging.getLogger("wsapp.locust")

DEFAULT_HOST = "http://127.0.0.1:8080"
REQUEST_TYPE = "WS"
# A close handshake or a kill that takes longer than this is abandoned: stopping must not hang.
CLOSE_TIMEOUT_SECONDS = 2.0
# A send blocked this long means the server stopped reading; the connection is given up.
SEND_TIMEOUT_SECONDS = 10.0
# Listeners have nothing to do in their task; waking once a second keeps them cheap.
LISTENER_TICK_SECONDS = 1.0
# What a socket operation raises when the connection fails (refused, reset, timed out, closed, bad status).
CONNECTION_ERRORS = (websocket.WebSocketException, OSError)


class WsLoadError(Exception):
    """A failure seen by a simulated user; its text is what Locust's failure table groups by."""


class _RunState:
    """Per-test bookkeeping shared by the users of this process; reset at every test start."""

    def __init__(self) -> None:
        self.numbers = itertools.count()
        # Set once the test is stopping, so closes caused by the stop itself are not failures.
        self.stopping = False


_run = _RunState()


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any, **_kwargs: Any) -> None:
    parser.add_argument(
        "--mode",
        choices=("rooms", "relay"),
        default="rooms",
        help="rooms: JSON protocol on /ws; relay: broadcast on / (default rooms)",
    )
    parser.add_argument("--room-size", type=_positive_int, default=10, help="users per room in rooms mode (default 10)")
    parser.add_argument("--room-prefix", default="load", help="room and user name prefix (default load)")
    parser.add_argument(
        "--publisher-share",
        type=_share,
        default=0.1,
        help="fraction of users that publish, 0..1 (default 0.1)",
    )
    parser.add_argument(
        "--publish-rate",
        type=_positive_float,
        default=1.0,
        help="messages per second per publisher (default 1)",
    )
    parser.add_argument(
        "--payload-bytes",
        type=_non_negative_int,
        default=64,
        help="padding bytes added to every published message (default 64)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=10.0,
        help="seconds allowed for the WebSocket handshake and the room join (default 10)",
    )


@dataclass(frozen=True)
class LoadSettings:
    """The custom options, checked once per user (the web UI can change them between tests)."""

    mode: str = "rooms"
    room_size: int = 10
    room_prefix: str = "load"
    publisher_share: float = 0.1
    publish_rate: float = 1.0
    payload_bytes: int = 64
    connect_timeout: float = 10.0

    @classmethod
    def from_options(cls, options: argparse.Namespace | None) -> LoadSettings:
        defaults = cls()
        values = {name: getattr(options, name, getattr(defaults, name)) for name in cls.__dataclass_fields__}
        settings = cls(**values)
        if settings.mode not in ("rooms", "relay"):
            raise ValueError(f"--mode must be rooms or relay, got {settings.mode!r}")
        if settings.room_size < 1:
            raise ValueError(f"--room-size must be >= 1, got {settings.room_size}")
        if not 0.0 <= settings.publisher_share <= 1.0:
            raise ValueError(f"--publisher-share must be within 0..1, got {settings.publisher_share}")
        if not settings.publish_rate > 0:
            raise ValueError(f"--publish-rate must be > 0, got {settings.publish_rate}")
        if settings.payload_bytes < 0 or settings.connect_timeout <= 0:
            raise ValueError("--payload-bytes must be >= 0 and --connect-timeout > 0")
        return settings


def ws_url(host: str, path: str) -> str:
    """Turn Locust's --host (http, https, ws or wss) into the WebSocket URL of `path`."""
    parts = urlsplit(host if "://" in host else f"http://{host}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported --host scheme {parts.scheme!r}")
    base_path = parts.path.rstrip("/")
    route, _, query = path.partition("?")
    return urlunsplit((scheme, parts.netloc, base_path + route, query, ""))


def is_publisher(number: int, share: float) -> bool:
    """Spread publishers evenly: user n publishes when floor((n + 1) * share) steps up at n."""
    exact = Fraction(share).limit_denominator(1_000_000)
    return math.floor((number + 1) * exact) > math.floor(number * exact)


def _fire(name: str, response_time: float, length: int = 0, exception: Exception | None = None) -> None:
    events.request.fire(
        request_type=REQUEST_TYPE,
        name=name,
        response_time=response_time,
        response_length=length,
        exception=exception,
        context={},
        response=None,
    )


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _close_text(frame_data: bytes) -> str:
    if len(frame_data) < 2:
        return "close code 1005 (no status)"
    code = struct.unpack("!H", frame_data[:2])[0]
    reason = frame_data[2:].decode("utf-8", "replace")
    return f"close code {code}" + (f" {reason}" if reason else "")


class WsappUser(User):
    """One WebSocket per user: joins a room (or the relay), publishes if chosen, reports deliveries."""

    host = DEFAULT_HOST

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = LoadSettings.from_options(environment.parsed_options)
        self.number = next(_run.numbers)
        self.publisher = is_publisher(self.number, self.settings.publisher_share)
        prefix = self.settings.room_prefix
        if isinstance(environment.runner, WorkerRunner):
            # Each worker numbers its users from 0; keep their rooms apart.
            prefix = f"{prefix}-w{environment.runner.worker_index}"
        self.room = f"{prefix}-{self.number // self.settings.room_size}"
        self.user_name = f"{prefix}-{self.number}"[:32]
        self.interval = 1.0 / self.settings.publish_rate
        self.padding = "x" * self.settings.payload_bytes
        self.deliver_name = f"deliver {self.settings.mode}"
        self.publish_name = f"publish {self.settings.mode}"
        self.ws: websocket.WebSocket | None = None
        self.receiver: gevent.Greenlet | None = None
        self.closing = False
        # Random phase so that publishers do not all send in the same instant.
        self.next_publish = time.monotonic() + random.uniform(0.0, self.interval)

    def wait_time(self) -> float:
        if not self.publisher:
            return LISTENER_TICK_SECONDS
        self.next_publish = max(self.next_publish + self.interval, time.monotonic())
        return max(0.0, self.next_publish - time.monotonic())

    def on_start(self) -> None:
        path = f"/ws?name={quote(self.user_name)}" if self.settings.mode == "rooms" else "/"
        start = time.perf_counter()
        try:
            # websocket-client checks UTF-8 in pure Python (~170 us per KiB); orjson.loads checks it anyway.
            ws = websocket.create_connection(
                ws_url(self.host, path),
                timeout=self.settings.connect_timeout,
                enable_multithread=True,
                skip_utf8_validation=True,
            )
        except (*CONNECTION_ERRORS, ValueError) as exc:  # refused, HTTP status instead of 101, timeout
            _fire("connect", _elapsed_ms(start), exception=exc)
            return
        _fire("connect", _elapsed_ms(start))
        self.ws = ws
        if self.settings.mode == "rooms" and not self._join():
            self._abandon()
            return
        # Reads block until the next frame: the server's pings keep an idle socket alive, and on_stop
        # (bounded) ends the receiver; a send is bounded separately by SEND_TIMEOUT_SECONDS.
        ws.settimeout(None)
        self.receiver = gevent.spawn(self._receive, ws)

    def _join(self) -> bool:
        """Join the room and wait for `joined`, skipping welcome and presence frames."""
        assert self.ws is not None
        start = time.perf_counter()
        try:
            with gevent.Timeout(self.settings.connect_timeout, WsLoadError("no joined frame in time")):
                self.ws.send(orjson.dumps({"type": "join", "room": self.room}))
                while True:
                    reply = orjson.loads(self.ws.recv())
                    kind = reply.get("type") if isinstance(reply, dict) else None
                    if kind == "joined" and reply.get("room") == self.room:
                        break
                    if kind == "error":
                        raise WsLoadError(f"{reply.get('code')}: {reply.get('message')}")
        except (*CONNECTION_ERRORS, ValueError, WsLoadError) as exc:
            _fire("join", _elapsed_ms(start), exception=exc)
            return False
        _fire("join", _elapsed_ms(start))
        return True

    @task
    def publish(self) -> None:
        ws = self.ws
        if not self.publisher or ws is None or self.closing:
            return
        sent_at = time.time()
        if self.settings.mode == "rooms":
            frame = orjson.dumps({"type": "publish", "room": self.room, "data": {"t": sent_at, "pad": self.padding}})
        else:
            frame = orjson.dumps({"t": sent_at, "pad": self.padding})
        start = time.perf_counter()
        try:
            with gevent.Timeout(SEND_TIMEOUT_SECONDS, WsLoadError("send blocked")):
                ws.send(frame, websocket.ABNF.OPCODE_TEXT)
        except (*CONNECTION_ERRORS, WsLoadError) as exc:
            if not (self.closing or _run.stopping):
                _fire(self.publish_name, _elapsed_ms(start), exception=exc)
                self._abandon()
            return
        _fire(self.publish_name, _elapsed_ms(start), len(frame))

    def _receive(self, ws: websocket.WebSocket) -> None:
        """Read every frame until the socket closes; the only reader once the user has joined."""
        while True:
            try:
                opcode, frame = ws.recv_data_frame()
            except CONNECTION_ERRORS as exc:
                self._lost(WsLoadError(f"close code 1006 (no close frame): {exc.__class__.__name__}"))
                return
            received_at = time.time()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                # websocket-client has already answered the close frame.
                self._lost(WsLoadError(_close_text(frame.data)))
                return
            self._handle(frame.data, received_at)

    def _handle(self, data: bytes, received_at: float) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            _fire("bad frame", 0.0, len(data), WsLoadError("not JSON"))
            return
        if not isinstance(message, dict):
            _fire("bad frame", 0.0, len(data), WsLoadError("not a JSON object"))
            return
        if self.settings.mode == "rooms":
            kind = message.get("type")
            if kind == "error":
                _fire("error frame", 0.0, len(data), WsLoadError(str(message.get("code"))))
                return
            if kind != "message":
                return  # welcome, joined, presence, ack, pong: not deliveries
            body = message.get("data")
            message = body if isinstance(body, dict) else {}
        sent_at = message.get("t")
        if not isinstance(sent_at, (int, float)):
            _fire("bad frame", 0.0, len(data), WsLoadError("message without a send time"))
            return
        _fire(self.deliver_name, max(0.0, (received_at - sent_at) * 1000.0), len(data))

    def _lost(self, error: WsLoadError) -> None:
        if not (self.closing or _run.stopping):
            _fire("unexpected close", 0.0, exception=error)
        self.closing = True
        if self.ws is not None:
            self.ws.shutdown()
        self.ws = None

    def _abandon(self) -> None:
        """Give up this user's connection after a failure; the user then idles until the test stops."""
        self.closing = True
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.shutdown()

    def on_stop(self) -> None:
        self.closing = True
        ws, self.ws = self.ws, None
        if self.receiver is not None:
            # Kill the reader first: websocket-client's close() reads the server's close frame itself.
            self.receiver.kill(block=True, timeout=CLOSE_TIMEOUT_SECONDS)
            self.receiver = None
        if ws is not None:
            # The server may already have dropped the socket; shutdown() below is what matters.
            with contextlib.suppress(*CONNECTION_ERRORS):
                ws.close(timeout=CLOSE_TIMEOUT_SECONDS)
            ws.shutdown()


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kwargs: Any) -> None:
    global _run
    _run = _RunState()
    if not isinstance(environment.runner, WorkerRunner):
        settings = LoadSettings.from_options(environment.parsed_options)
        logger.info(
            "wsapp load: mode=%s room_size=%d publisher_share=%g publish_rate=%g/s payload=%dB host=%s",
            settings.mode,
            settings.room_size,
            settings.publisher_share,
            settings.publish_rate,
            settings.payload_bytes,
            environment.host or DEFAULT_HOST,
        )


@events.test_stopping.add_listener
def _on_test_stopping(**_kwargs: Any) -> None:
    _run.stopping = True


def _entries(environment: Environment) -> dict[str, StatsEntry]:
    return {name: entry for (name, method), entry in environment.stats.entries.items() if method == REQUEST_TYPE}


def summary_lines(environment: Environment) -> list[str]:
    """The end-of-test summary: deliveries, rate, fan-out latency percentiles, errors, closes."""
    entries = _entries(environment)
    lines = []
    for name, entry in sorted(entries.items()):
        if not name.startswith("deliver ") or entry.num_requests == 0:
            continue
        p50, p95, p99 = (entry.get_response_time_percentile(p) for p in (0.50, 0.95, 0.99))
        lines.append(
            f"{name}: {entry.num_requests} deliveries, {entry.total_rps:.1f}/s, "
            f"fan-out latency p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms, "
            f"max {entry.max_response_time:.0f} ms"
        )
    if not lines:
        lines.append("no deliveries")
    published = sum(e.num_requests for n, e in entries.items() if n.startswith("publish "))
    connect = entries.get("connect")
    connects = connect.num_requests if connect else 0
    connect_failures = connect.num_failures if connect else 0
    join = entries.get("join")
    join_failures = join.num_failures if join else 0
    errors = sum(entries[n].num_failures for n in ("error frame", "bad frame") if n in entries)
    send_failures = sum(e.num_failures for n, e in entries.items() if n.startswith("publish "))
    closes = entries["unexpected close"].num_failures if "unexpected close" in entries else 0
    lines.append(
        f"published {published}, connects {connects} ({connect_failures} failed), "
        f"join failures {join_failures}, error/bad frames {errors}, send failures {send_failures}, "
        f"unexpected closes {closes}"
    )
    return lines


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    # A master's stats are only complete once the workers' last reports are in: it prints at quitting.
    if isinstance(environment.runner, LocalRunner):
        _log_summary(environment)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        _log_summary(environment)


def _log_summary(environment: Environment) -> None:
    logger.info("wsapp load summary:\n  %s", "\n  ".join(summary_lines(environment)))
