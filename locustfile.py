"""Locust load test for wsapp: WebSocket fan-out latency and deliveries per second.

Web UI:     locust -f locustfile.py --host http://127.0.0.1:8080
Unattended: locust -f locustfile.py --headless -u 500 -r 100 -t 60s --host http://127.0.0.1:8080 --csv out --html o.html
Distributed: locust -f locustfile.py --master --headless --expect-workers 2 -u 2000 -r 200 -t 60s --host URL
             locust -f locustfile.py --worker --master-host MASTER  (one per core; --html works on the master)

Each simulated user holds one WebSocket. In ``--mode rooms`` it connects to ``/ws?name=...`` and joins
one room of ``--room-size`` users (``load-0``, ``load-1``, ...); in ``--mode relay`` it connects to
``/``, where every message reaches every other relay client. ``--publisher-share`` of the users publish
``--publish-rate`` messages/s each, padded with ``--payload-bytes``, carrying the wall-clock send time.
A receiver greenlet per user reports every delivery as request type ``WS``, name ``deliver rooms`` or
``deliver relay``, with response time = receive time - send time, so Locust's tables and ``--csv``
files show fan-out latency percentiles and deliveries/s. ``connect``, ``join`` and ``publish ...``
get their own rows; ``error frame``, ``bad frame`` and ``unexpected close`` rows count failures.

``--reconnect`` makes users connect again when the server closes or drops them (a restart, a deploy)
and rejoin with ``since`` and ``epoch``; ``--reconnect-interval S`` makes them leave now and then on
their own (``--offline-seconds``) and come back the same way. Either way rooms users join with
``echo`` and check every seq of their room: ``reconnect`` rows time each return (loss to ``joined``),
``recover rooms`` rows are the replayed messages (response time = how long each waited), ``gap`` and
``repeat`` rows are failures. ``--token`` (or ``LOCUST_WSAPP_TOKEN``) presents one JWT for every
user, ``--jwt-secret`` (or ``LOCUST_WSAPP_JWT_SECRET``) mints one per user (``sub`` = its name),
placed by ``--token-in protocol|query|header``; ``--cookie`` sends a Cookie header. In distributed
mode the master hands these options to its workers.

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
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import gevent
import jwt
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
# Where --token-in puts a token.
TOKEN_PLACES = ("protocol", "query", "header")
# The subprotocol offered beside a bearer.<token> entry: wsapp answers it, never the token entry.
SUBPROTOCOL = "wsapp"
# Tokens minted with --jwt-secret live this long: longer than any load test, so none expires mid-run.
MINTED_TOKEN_SECONDS = 24 * 3600
# Reconnection after a server close: first wait, cap, and how long to keep trying before it is a failure.
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 2.0
RECONNECT_GIVE_UP_SECONDS = 60.0


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


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
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
    parser.add_argument(
        "--reconnect",
        action="store_true",
        default=False,
        help="reconnect when the server closes or drops a connection, and in rooms mode rejoin with since and "
        "epoch: the load of recoveries after a restart (default off: such a close is a failure)",
    )
    parser.add_argument(
        "--reconnect-interval",
        type=_non_negative_float,
        default=0.0,
        help="each user closes its connection after about this many seconds (0.5x to 1.5x), stays away "
        "--offline-seconds, then reconnects and resumes; 0 = never (default 0)",
    )
    parser.add_argument(
        "--offline-seconds",
        type=_non_negative_float,
        default=1.0,
        help="how long a user stays away with --reconnect-interval (default 1)",
    )
    parser.add_argument(
        "--token",
        default="",
        env_var="LOCUST_WSAPP_TOKEN",
        is_secret=True,
        help="a bearer token (JWT) every user presents (env LOCUST_WSAPP_TOKEN)",
    )
    parser.add_argument(
        "--jwt-secret",
        default="",
        env_var="LOCUST_WSAPP_JWT_SECRET",
        is_secret=True,
        help="the server's WSAPP_JWT_SECRET: each user presents its own HS256 token, sub = its name "
        "(env LOCUST_WSAPP_JWT_SECRET)",
    )
    parser.add_argument(
        "--token-in",
        choices=TOKEN_PLACES,
        default="protocol",
        help="where the token goes: a bearer.<token> Sec-WebSocket-Protocol entry (what browsers do), "
        "?token= or an Authorization header (default protocol)",
    )
    parser.add_argument(
        "--cookie",
        default="",
        env_var="LOCUST_WSAPP_COOKIE",
        is_secret=True,
        help="a Cookie header sent with every handshake, for apps whose authenticate hook reads a session "
        "cookie (env LOCUST_WSAPP_COOKIE)",
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
    reconnect: bool = False
    reconnect_interval: float = 0.0
    offline_seconds: float = 1.0
    token: str = ""
    jwt_secret: str = ""
    token_in: str = "protocol"
    cookie: str = ""

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
        if settings.reconnect_interval < 0 or settings.offline_seconds < 0:
            raise ValueError("--reconnect-interval and --offline-seconds must be >= 0")
        if settings.token_in not in TOKEN_PLACES:
            raise ValueError(f"--token-in must be one of {', '.join(TOKEN_PLACES)}, got {settings.token_in!r}")
        if settings.token and settings.jwt_secret:
            raise ValueError("give --token or --jwt-secret, not both")
        return settings

    @property
    def resumes(self) -> bool:
        """Users come back after a close: rooms users then rejoin with since and check every seq."""
        return self.reconnect or self.reconnect_interval > 0


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


def mint_token(secret: str, sub: str, now: float | None = None) -> str:
    """An HS256 JWT for `sub`, as the server's WSAPP_JWT_SECRET expects (sub, exp)."""
    issued = int(time.time() if now is None else now)
    return jwt.encode({"sub": sub, "iat": issued, "exp": issued + MINTED_TOKEN_SECONDS}, secret, algorithm="HS256")


@dataclass(frozen=True)
class Handshake:
    """What one user sends with its opening handshake: the URL, extra headers and subprotocols."""

    url: str
    header: tuple[str, ...] = ()
    subprotocols: tuple[str, ...] = ()


def handshake(host: str, path: str, settings: LoadSettings, user_name: str) -> Handshake:
    """The handshake for `path`, carrying the token (given, or minted for `user_name`) and the cookie."""
    token = settings.token or (mint_token(settings.jwt_secret, user_name) if settings.jwt_secret else "")
    header: list[str] = []
    subprotocols: tuple[str, ...] = ()
    if token and settings.token_in == "query":
        path += ("&" if "?" in path else "?") + urlencode({"token": token})
    elif token and settings.token_in == "header":
        header.append(f"Authorization: Bearer {token}")
    elif token:
        subprotocols = (SUBPROTOCOL, f"bearer.{token}")
    if settings.cookie:
        header.append(f"Cookie: {settings.cookie}")
    return Handshake(ws_url(host, path), tuple(header), subprotocols)


class WsappUser(User):
    """One WebSocket per user: joins a room (or the relay), publishes if chosen, reports deliveries.

    A session greenlet per user reads every frame. With --reconnect it also connects again when the
    server closes or drops the connection, and with --reconnect-interval the user closes now and then
    and comes back; in rooms mode it rejoins with `since` and `epoch`, and, having joined with `echo`,
    checks that it sees every seq of its room once and in order (a `gap` or `repeat` is a failure).
    """

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
        self.rooms_mode = self.settings.mode == "rooms"
        # Checking every seq needs the user's own messages too (echo); they are not counted as deliveries.
        self.tracks_seqs = self.rooms_mode and self.settings.resumes
        self.ws: websocket.WebSocket | None = None
        self.session: gevent.Greenlet | None = None
        self.closing = False
        self.cycling = False
        # The room's epoch and the last seq seen in it, for `since`; the seq expected next (None: unknown).
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.expected_seq: int | None = None
        # Messages up to this seq are the replay of a resumed join, counted as recoveries.
        self.replay_until = 0
        # Random phase so that publishers do not all send in the same instant.
        self.next_publish = time.monotonic() + random.uniform(0.0, self.interval)
        self.next_cycle = self._cycle_deadline()

    def _cycle_deadline(self) -> float:
        interval = self.settings.reconnect_interval
        return time.monotonic() + random.uniform(0.5 * interval, 1.5 * interval) if interval else math.inf

    def wait_time(self) -> float:
        wake = min(self.next_cycle, self.next_publish) if self.publisher else self.next_cycle
        return max(0.0, min(wake - time.monotonic(), LISTENER_TICK_SECONDS))

    def on_start(self) -> None:
        ws = self._connect_and_join(resume=False)
        if ws is not None:
            self.ws = ws
            self.session = gevent.spawn(self._run_session, ws)

    def _connect_and_join(self, resume: bool) -> websocket.WebSocket | None:
        """Open the WebSocket (and join the room); None after a failure, reported unless resuming."""
        path = f"/ws?name={quote(self.user_name)}" if self.rooms_mode else "/"
        start = time.perf_counter()
        try:
            shake = handshake(self.host, path, self.settings, self.user_name)
            # websocket-client checks UTF-8 in pure Python (~170 us per KiB); orjson.loads checks it anyway.
            ws = websocket.create_connection(
                shake.url,
                timeout=self.settings.connect_timeout,
                enable_multithread=True,
                skip_utf8_validation=True,
                header=list(shake.header),
                subprotocols=list(shake.subprotocols) or None,
            )
        except (*CONNECTION_ERRORS, ValueError) as exc:  # refused, HTTP status instead of 101, timeout
            if not resume:
                _fire("connect", _elapsed_ms(start), exception=exc)
            return None
        if not resume:
            _fire("connect", _elapsed_ms(start))
        if self.rooms_mode and not self._join(ws, resume):
            ws.shutdown()
            return None
        # Reads block until the next frame: the server's pings keep an idle socket alive, and on_stop
        # (bounded) ends the session; a send is bounded separately by SEND_TIMEOUT_SECONDS.
        ws.settimeout(None)
        return ws

    def _join(self, ws: websocket.WebSocket, resume: bool) -> bool:
        """Join the room (with since and epoch when resuming) and wait for `joined`, skipping welcome and
        presence frames; what follows `joined` (history_gone, the replay) is the session's to read."""
        join: dict[str, Any] = {"type": "join", "room": self.room}
        if self.tracks_seqs:
            join["echo"] = True
        if resume and self.last_seq is not None:
            join["since"] = self.last_seq
            if self.epoch is not None:
                join["epoch"] = self.epoch
        start = time.perf_counter()
        try:
            with gevent.Timeout(self.settings.connect_timeout, WsLoadError("no joined frame in time")):
                ws.send(orjson.dumps(join))
                while True:
                    reply = orjson.loads(ws.recv())
                    kind = reply.get("type") if isinstance(reply, dict) else None
                    if kind == "joined" and reply.get("room") == self.room:
                        break
                    if kind == "error":
                        raise WsLoadError(f"{reply.get('code')}: {reply.get('message')}")
        except (*CONNECTION_ERRORS, ValueError, WsLoadError) as exc:
            if not resume:
                _fire("join", _elapsed_ms(start), exception=exc)
            return False
        if not resume:
            _fire("join", _elapsed_ms(start))
        seq, epoch = reply.get("seq"), reply.get("epoch")
        if isinstance(seq, int) and isinstance(epoch, str):
            if resume and epoch == self.epoch and self.last_seq is not None:
                self.expected_seq = self.last_seq + 1  # the replay picks up right after `since`
            else:
                # A first join, or a new epoch (history_gone follows): live messages come after `seq`.
                self.expected_seq, self.last_seq = seq + 1, seq
            self.replay_until = seq if resume else 0
            self.epoch = epoch
        return True

    @task
    def publish(self) -> None:
        if time.monotonic() >= self.next_cycle:
            self._cycle()
            return
        if not self.publisher or time.monotonic() < self.next_publish:
            return
        self.next_publish = max(self.next_publish + self.interval, time.monotonic())
        ws = self.ws
        if ws is None or self.closing:
            return  # reconnecting (or given up): this turn's message is not sent
        sent_at = time.time()
        if self.rooms_mode:
            data = {"t": sent_at, "u": self.number, "pad": self.padding}
            frame = orjson.dumps({"type": "publish", "room": self.room, "data": data})
        else:
            frame = orjson.dumps({"t": sent_at, "pad": self.padding})
        start = time.perf_counter()
        try:
            with gevent.Timeout(SEND_TIMEOUT_SECONDS, WsLoadError("send blocked")):
                ws.send(frame, websocket.ABNF.OPCODE_TEXT)
        except (*CONNECTION_ERRORS, WsLoadError) as exc:
            # A connection that failed under a reconnecting user is the session's to notice and replace.
            if not (self.closing or _run.stopping or self.settings.reconnect):
                _fire(self.publish_name, _elapsed_ms(start), exception=exc)
                self._abandon()
            return
        _fire(self.publish_name, _elapsed_ms(start), len(frame))

    def _cycle(self) -> None:
        """Close on purpose (--reconnect-interval); the session stays away, then comes back."""
        self.next_cycle = math.inf  # the session sets the next one once it is back
        ws, self.ws = self.ws, None
        if ws is None or self.session is None or self.closing:
            return
        self.cycling = True
        # Only the close frame: the session is the socket's one reader and gets the server's answer.
        with contextlib.suppress(*CONNECTION_ERRORS):
            ws.send_close()

    def _run_session(self, ws: websocket.WebSocket) -> None:
        """Read frames until the connection ends; then, for a reconnecting user, connect again and go on."""
        while True:
            error = self._receive(ws)
            if self.closing or _run.stopping:
                return
            cycled, self.cycling = self.cycling, False
            if cycled:
                gevent.sleep(self.settings.offline_seconds)
            elif self.settings.reconnect:
                _fire("server close", 0.0)
            else:
                self._lost(error)
                return
            replacement = self._reconnect()
            if replacement is None:
                return
            ws = replacement

    def _reconnect(self) -> websocket.WebSocket | None:
        """Connect and rejoin with backoff; `reconnect` reports the time it took (a failure past the limit)."""
        self.ws = None
        start = time.perf_counter()
        delay = RECONNECT_FIRST_DELAY
        while not (self.closing or _run.stopping):
            ws = self._connect_and_join(resume=True)
            if ws is not None:
                _fire("reconnect", _elapsed_ms(start))
                self.ws = ws
                self.next_cycle = self._cycle_deadline()
                return ws
            if _elapsed_ms(start) > RECONNECT_GIVE_UP_SECONDS * 1000:
                _fire("reconnect", _elapsed_ms(start), exception=WsLoadError("gave up reconnecting"))
                return None
            gevent.sleep(random.uniform(0.5 * delay, delay))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
        return None

    def _receive(self, ws: websocket.WebSocket) -> WsLoadError:
        """Handle every frame until the socket closes; returns how it ended."""
        while True:
            try:
                opcode, frame = ws.recv_data_frame()
            except CONNECTION_ERRORS as exc:
                return WsLoadError(f"close code 1006 (no close frame): {exc.__class__.__name__}")
            received_at = time.time()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                # websocket-client has already answered the close frame.
                ws.shutdown()
                return WsLoadError(_close_text(frame.data))
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
        name = self.deliver_name
        if self.rooms_mode:
            kind = message.get("type")
            if kind == "error":
                self._room_error(message, len(data))
                return
            if kind != "message":
                return  # welcome, joined, presence, ack, pong: not deliveries
            seq = message.get("seq")
            if isinstance(seq, int) and not self._check_seq(seq, len(data)):
                return
            body = message.get("data")
            message = body if isinstance(body, dict) else {}
            if self.tracks_seqs and message.get("u") == self.number:
                return  # this user's own message, echoed for the seq check
            if isinstance(seq, int) and seq <= self.replay_until:
                name = "recover rooms"  # replayed after a `since`: its latency is how long it waited
        sent_at = message.get("t")
        if not isinstance(sent_at, (int, float)):
            _fire("bad frame", 0.0, len(data), WsLoadError("message without a send time"))
            return
        _fire(name, max(0.0, (received_at - sent_at) * 1000.0), len(data))

    def _room_error(self, message: dict[str, Any], length: int) -> None:
        if message.get("code") == "history_gone":
            # Not a failure: the server says which messages it can no longer give (trimmed, or a new
            # epoch after the room's history was lost); numbering goes on from what comes next.
            _fire("history gone", 0.0, length)
            epoch = message.get("epoch")
            if isinstance(epoch, str):
                self.epoch = epoch
            self.expected_seq = None
            return
        _fire("error frame", 0.0, length, WsLoadError(str(message.get("code"))))

    def _check_seq(self, seq: int, length: int) -> bool:
        """Record `seq`; with --reconnect/--reconnect-interval a missed or repeated seq is a failure.
        Returns False for a repeat (not counted again as a delivery)."""
        if not self.tracks_seqs:
            return True
        expected = self.expected_seq
        if expected is not None and seq < expected:
            _fire("repeat", 0.0, length, WsLoadError(f"seq {seq} again (expected {expected})"))
            return False
        if expected is not None and seq > expected:
            _fire("gap", 0.0, length, WsLoadError(f"missed {seq - expected} message(s)"))
        self.expected_seq = seq + 1
        self.last_seq = seq
        return True

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
        if self.session is not None:
            # Kill the reader first: websocket-client's close() reads the server's close frame itself.
            self.session.kill(block=True, timeout=CLOSE_TIMEOUT_SECONDS)
            self.session = None
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
    if "reconnect" in entries or "recover rooms" in entries:
        def requests(name: str) -> int:
            return entries[name].num_requests if name in entries else 0

        def failures(name: str) -> int:
            return entries[name].num_failures if name in entries else 0

        reconnect = entries.get("reconnect")
        p95 = reconnect.get_response_time_percentile(0.95) if reconnect and reconnect.num_requests else 0
        lines.append(
            f"reconnects {requests('reconnect')} ({failures('reconnect')} gave up, p95 {p95:.0f} ms), "
            f"server closes {requests('server close')}, recovered {requests('recover rooms')}, "
            f"history gone {requests('history gone')}, gaps {failures('gap')}, repeats {failures('repeat')}"
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
