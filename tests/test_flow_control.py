"""Flow control (issue 10): a burst from one client never costs a healthy reader a message.

Three clients per case, as a new user would try it: a Node `ws` reader reading as fast as it can, a
stalled reader that reads nothing, and a flooder writing as fast as TCP lets it. The reader gets every
message in order, the stalled reader is closed 1013 within the grace (+ the heartbeat's tick), the
flooder is never closed by the server, and the server's memory stays within a stated bound.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psutil
import pytest

from tests.clients import get_json, wait_for
from tests.harness import ServerProcess
from tests.rawws import RawClient
from tests.redis_fixture import RedisServer

NODE_DIR = Path(__file__).resolve().parent
GRACE = 1.0
# What the server may grow by during a 20 MB burst: the stalled client's backlog (at most twice its
# cap, 4,096 frames of ~1 KiB here) shared with the reader's, plus the parser's and kernel's buffers.
RSS_BOUND = 64 * 1024 * 1024
FLOW_ENV = {"WSAPP_RATE_LIMIT": "0", "WSAPP_SLOW_CONSUMER_GRACE": str(GRACE)}
RawFactory = Callable[..., RawClient]
pytestmark = pytest.mark.node


def masked_frame(payload: bytes) -> bytes:
    """A client text frame with an all-zero mask (legal, and no per-byte work to build 20 MB of them)."""
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


def relay_burst(sender: int, count: int, size: int = 1024) -> bytes:
    frames = []
    for i in range(count):
        head = f"{sender}:{i:06d}".encode()
        frames.append(masked_frame(head + b"p" * (size - len(head))))
    return b"".join(frames)


def rooms_burst(sender: int, count: int, room: str) -> bytes:
    pad = "x" * 900
    return b"".join(
        masked_frame(orjson.dumps({"type": "publish", "room": room, "data": {"s": sender, "i": i, "pad": pad}}))
        for i in range(count)
    )


class NodeReader:
    """tests/node/reader.js in a child process: reads as fast as Node's `ws` can."""

    def __init__(self, url: str, mode: str, total: int, room: str = "") -> None:
        node = shutil.which("node")
        if node is None or not (NODE_DIR / "node_modules" / "ws").is_dir():
            pytest.fail("node and tests/node_modules/ws are required: run `npm ci --prefix tests`")
        self.proc = subprocess.Popen([node, "node/reader.js", url, mode, str(total), room], cwd=NODE_DIR,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def result(self, timeout: float = 60) -> dict[str, object]:
        out, _ = self.proc.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def node_reader() -> Iterator[Callable[..., NodeReader]]:
    started: list[NodeReader] = []

    def start(*args: object) -> NodeReader:
        reader = NodeReader(*args)  # type: ignore[arg-type]
        started.append(reader)
        return reader

    yield start
    for reader in started:
        reader.stop()


def join_raw(raw: RawFactory, url: str, room: str) -> RawClient:
    client = raw(url)
    client.send(0x1, orjson.dumps({"type": "join", "room": room}))
    while json.loads(client.recv_frame().payload).get("type") != "joined":
        pass
    return client


def flood(client: RawClient, burst: bytes) -> threading.Thread:
    thread = threading.Thread(target=client.sock.sendall, args=(burst,), daemon=True)
    client.sock.settimeout(60)
    thread.start()
    return thread


def watch(srv: ServerProcess, done: Callable[[], bool]) -> int:
    """Poll the server until `done()`; returns its peak RSS growth meanwhile."""
    proc = psutil.Process(srv.proc.pid)
    before = peak = proc.memory_info().rss

    def check() -> bool:
        nonlocal peak
        peak = max(peak, proc.memory_info().rss)
        return done()

    wait_for(check, timeout=60, what="the burst to be delivered")
    return peak - before


def delivered_whole(srv: ServerProcess, reader: NodeReader, sending: list[threading.Thread], n: int) -> int:
    """Wait for the reader to get all `n` messages in order (never closed); the server's RSS growth."""
    growth = watch(srv, lambda: reader.proc.poll() is not None)
    result = reader.result()
    assert result == {**result, "count": n, "outOfOrder": 0, "closeCode": None}
    for thread in sending:
        thread.join(10)
        assert not thread.is_alive()
    return growth


def assert_kicked_within_grace(srv: ServerProcess) -> None:
    wait_for(lambda: get_json(srv.http("/stats"))[1]["slow_consumer_kicks"] == 1, what="the stalled reader's 1013")
    over = [float(x) for x in re.findall(r"slow consumer: \d+ bytes queued, over its cap for ([\d.]+)s",
                                         srv.log_text())]
    assert len(over) == 1 and over[0] <= GRACE + 1.0, srv.log_text()


def assert_still_open(client: RawClient) -> None:
    client.send(0x9, b"still there?")
    assert client.recv_until_pong().payload == b"still there?"


def test_relay_burst_reaches_the_reader_whole_and_closes_only_the_stalled(
    make_server: Callable[..., ServerProcess], raw: RawFactory, node_reader: Callable[..., NodeReader]
) -> None:
    srv = make_server(**FLOW_ENV)
    n = 20000
    burst = relay_burst(0, n)
    stalled = raw(srv.ws("/"))
    flooder = raw(srv.ws("/"))
    reader = node_reader(srv.ws("/"), "relay", n)
    wait_for(lambda: get_json(srv.http("/stats"))[1]["relay_clients"] == 3, what="3 relay clients")
    growth = delivered_whole(srv, reader, [flood(flooder, burst)], n)
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert_kicked_within_grace(srv)
    assert_still_open(flooder)
    stats = get_json(srv.http("/stats"))[1]
    assert stats["paced"] >= 1 and stats["slow_consumer_kicks"] == 1
    assert stalled.sock.fileno() >= 0


def test_rooms_burst_reaches_the_reader_whole_and_closes_only_the_stalled(
    make_server: Callable[..., ServerProcess], raw: RawFactory, node_reader: Callable[..., NodeReader]
) -> None:
    srv = make_server(**FLOW_ENV)
    n = 20000
    burst = rooms_burst(0, n, "burst")
    join_raw(raw, srv.ws("/ws"), "burst")  # stalled from here on
    flooder = join_raw(raw, srv.ws("/ws"), "burst")
    reader = node_reader(srv.ws("/ws"), "rooms", n, "burst")
    growth = delivered_whole(srv, reader, [flood(flooder, burst)], n)
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert_kicked_within_grace(srv)
    assert_still_open(flooder)


def test_several_flooders_at_once(make_server: Callable[..., ServerProcess], raw: RawFactory,
                                  node_reader: Callable[..., NodeReader]) -> None:
    srv = make_server(**FLOW_ENV)
    per, senders = 5000, 3
    raw(srv.ws("/"))  # stalled
    flooders = [raw(srv.ws("/")) for _ in range(senders)]
    # On the relay each flooder also gets the others' bursts: these read (and count) theirs.
    received = [0] * senders
    ended = [threading.Event() for _ in range(senders)]

    def drain(k: int) -> None:
        sock = flooders[k].sock
        try:
            while chunk := sock.recv(1 << 20):
                received[k] += len(chunk)
        except OSError:
            pass
        ended[k].set()

    for k in range(senders):
        threading.Thread(target=drain, args=(k,), daemon=True).start()
    reader = node_reader(srv.ws("/"), "relay", per * senders)
    wait_for(lambda: get_json(srv.http("/stats"))[1]["relay_clients"] == senders + 2, what="every client")
    threads = [flood(f, relay_burst(k + 1, per)) for k, f in enumerate(flooders)]
    # Every sender's messages, each sender's in its own order (senders interleave).
    growth = delivered_whole(srv, reader, threads, per * senders)
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert_kicked_within_grace(srv)
    # No flooder was closed, and each got the other two bursts (1 KiB messages plus 4 bytes of header).
    assert not any(e.is_set() for e in ended)
    wait_for(lambda: all(r >= (senders - 1) * per * 1028 for r in received), what="the flooders' own reads")


# ---- across processes (Redis) ---------------------------------------------------------------------


@pytest.mark.redis
def test_relay_burst_across_two_processes(make_server: Callable[..., ServerProcess], raw: RawFactory,
                                          node_reader: Callable[..., NodeReader],
                                          make_redis: Callable[[], RedisServer]) -> None:
    broker = make_redis()  # the relay reaches every process on a Redis: a private one
    a = make_server(REDIS_URL=broker.url, **FLOW_ENV)
    b = make_server(REDIS_URL=broker.url, **FLOW_ENV)
    n = 20000
    raw(a.ws("/"))  # stalled, on the flooder's process
    flooder = raw(a.ws("/"))
    reader = node_reader(b.ws("/"), "relay", n)
    delivered_whole(b, reader, [flood(flooder, relay_burst(0, n))], n)
    assert_kicked_within_grace(a)
    assert_still_open(flooder)
    assert get_json(b.http("/stats"))[1]["broker_reconnects"] == 0


@pytest.mark.redis
def test_rooms_burst_across_two_processes(make_server: Callable[..., ServerProcess], raw: RawFactory,
                                          node_reader: Callable[..., NodeReader], redis_server: RedisServer) -> None:
    a = make_server(REDIS_URL=redis_server.url, **FLOW_ENV)
    b = make_server(REDIS_URL=redis_server.url, **FLOW_ENV)
    n = 20000
    room = f"burst-{id(a)}"
    join_raw(raw, a.ws("/ws"), room)  # stalled, on the flooder's process
    join_raw(raw, b.ws("/ws"), room)  # stalled, on the reader's process: its subscriber paces
    flooder = join_raw(raw, a.ws("/ws"), room)
    reader = node_reader(b.ws("/ws"), "rooms", n, room)
    delivered_whole(b, reader, [flood(flooder, rooms_burst(0, n, room))], n)
    assert_kicked_within_grace(a)
    assert_kicked_within_grace(b)
    assert_still_open(flooder)
    assert get_json(b.http("/stats"))[1]["broker_reconnects"] == 0


@pytest.mark.redis
def test_a_subscriber_redis_cuts_off_is_counted_and_comes_back(make_server: Callable[..., ServerProcess],
                                                               raw: RawFactory,
                                                               make_redis: Callable[[], RedisServer]) -> None:
    """The loss window, shown: a subscriber that pauses for its slow reader lets Redis buffer for it;
    past Redis's client-output-buffer-limit for pub/sub, Redis drops it. wsapp counts it, says so and
    subscribes again; what was published meanwhile does not reach that process live."""
    broker = make_redis()
    broker.client().config_set("client-output-buffer-limit", "pubsub 262144 131072 1")
    a = make_server(REDIS_URL=broker.url, **FLOW_ENV)
    b = make_server(REDIS_URL=broker.url, WSAPP_SEND_QUEUE="64", **FLOW_ENV)
    raw(b.ws("/"))  # stalled: b's subscriber waits for it, Redis buffers for b's subscriber
    flooder = raw(a.ws("/"))
    wait_for(lambda: get_json(b.http("/stats"))[1]["relay_clients"] == 1, what="the stalled client")
    sending = flood(flooder, relay_burst(0, 20000))
    wait_for(lambda: get_json(b.http("/stats"))[1]["broker_reconnects"] >= 1, timeout=30, what="b to resubscribe")
    sending.join(20)
    assert "broker lost" in b.log_text() and "broker back" in b.log_text()
    # b serves on, across processes too.
    status, health = get_json(b.http("/healthz"))
    assert status == 200 and health["broker_healthy"] is True
    listener = raw(b.ws("/"))
    wait_for(lambda: get_json(b.http("/stats"))[1]["relay_clients"] >= 1, what="the listener")
    flooder.send(0x1, b"after the cut")
    frame = listener.recv_frame()
    while frame.payload != b"after the cut":
        frame = listener.recv_frame()
    assert "broker_reconnects_total" in urllib.request.urlopen(b.http("/metrics"), timeout=5).read().decode()
