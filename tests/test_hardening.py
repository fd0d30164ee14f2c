"""Broken, hostile and slow clients: each gets the right answer and nobody else notices (issue 5)."""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable

import jwt
import psutil
import pytest

from tests.clients import connect, get_json, recv_json, send_json, wait_for
from tests.harness import ServerProcess
from tests.rawws import RawClient, client_frame

RawFactory = Callable[..., RawClient]


# ---- frame layer over the wire -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(0x1, b"x", rsv=4), 1002),
        (client_frame(0x5, b"x"), 1002),
        (client_frame(0x9, b"x" * 126), 1002),
        (bytes([0x81, 0x02]) + b"hi", 1002),  # unmasked
        (client_frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"), 1007),
        (client_frame(0x8, b"\x03\xed"), 1002),  # close code 1005 on the wire
    ],
)
def test_invalid_frame_gets_its_close_code_and_the_relay_keeps_serving(
    make_server: Callable[..., ServerProcess], raw: RawFactory, data: bytes, code: int
) -> None:
    srv = make_server()
    a, b = connect(srv.ws("/")), connect(srv.ws("/"))
    try:
        bad = raw(srv.ws("/"))
        bad.send_raw(data)
        close = bad.recv_until_close()
        assert close.close_code == code
        assert close.close_reason  # a reason is given
        assert bad.closed_by_server()
        a.send("still serving")
        assert b.recv() == "still serving"
        assert get_json(srv.http("/stats"))[1]["protocol_errors"] == 1
    finally:
        a.close()
        b.close()


def test_oversized_message_is_refused_from_its_header(make_server: Callable[..., ServerProcess],
                                                      raw: RawFactory) -> None:
    srv = make_server(WSAPP_MAX_MESSAGE_BYTES="1000")
    # A header announcing 2^63-1 bytes: answered at once, nothing buffered.
    huge = raw(srv.ws("/echo"))
    huge.send_raw(bytes([0x82, 0xFF]) + struct.pack("!Q", 2**63 - 1) + b"mask")
    assert huge.recv_until_close().close_code == 1009
    # A fragmented message whose fragments add up to more than the limit.
    frag = raw(srv.ws("/echo"))
    frag.send_raw(client_frame(0x2, b"x" * 600, fin=False))
    frag.send_raw(client_frame(0x0, b"x" * 600)[:8])  # only the header of the second fragment
    assert frag.recv_until_close().close_code == 1009
    # Exactly at the limit is fine.
    ok = raw(srv.ws("/echo"))
    ok.send(0x2, b"y" * 1000)
    assert ok.recv_frame().payload == b"y" * 1000


def test_giant_announced_frames_do_not_grow_memory(make_server: Callable[..., ServerProcess], raw: RawFactory) -> None:
    srv = make_server()  # default 1 MiB limit
    proc = psutil.Process(srv.proc.pid)
    before = proc.memory_info().rss
    for _ in range(20):
        client = raw(srv.ws("/echo"))
        client.send_raw(bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 40) + b"mask" + b"z" * 65536)
        assert client.recv_until_close().close_code == 1009
    assert proc.memory_info().rss - before < 20 * 1024 * 1024


def test_too_many_fragments_is_a_policy_close(make_server: Callable[..., ServerProcess], raw: RawFactory) -> None:
    srv = make_server(WSAPP_MAX_FRAGMENTS="10")
    client = raw(srv.ws("/echo"))
    client.send_raw(client_frame(0x2, b"a", fin=False) + client_frame(0x0, b"a", fin=False) * 10)
    assert client.recv_until_close().close_code == 1008


def test_close_code_is_echoed_and_pings_are_answered(server: ServerProcess, raw: RawFactory) -> None:
    client = raw(server.ws("/echo"))
    client.send(0x9, b"are you there")
    pong = client.recv_frame()
    assert (pong.opcode, pong.payload) == (0xA, b"are you there")
    client.send(0x8, struct.pack("!H", 3001) + b"done")
    close = client.recv_frame()
    assert close.opcode == 0x8 and close.close_code == 3001
    assert client.closed_by_server()


# ---- handshakes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "method", "status"),
    [
        ({"Sec-WebSocket-Key": None}, "GET", 400),
        ({"Sec-WebSocket-Key": "not base64!!"}, "GET", 400),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, "GET", 400),  # 5 bytes, not 16
        ({"Sec-WebSocket-Version": "8"}, "GET", 426),
        ({}, "POST", 405),
        ({"Connection": "keep-alive"}, "GET", 400),
    ],
)
def test_malformed_handshakes_get_4xx_with_a_reason(
    server: ServerProcess, raw: RawFactory, headers: dict[str, str | None], method: str, status: int
) -> None:
    client = raw(server.ws("/"), upgrade=False)
    assert client.handshake(headers, method=method) == status  # type: ignore[arg-type]
    assert client.response_body.strip()
    if status == 426:
        assert client.response_headers["sec-websocket-version"] == "13"
    assert "Traceback" not in server.log_text()


def test_silent_tcp_client_is_dropped_after_the_handshake_timeout(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server(WSAPP_HANDSHAKE_TIMEOUT="0.3")
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    half = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        started = time.monotonic()
        assert silent.recv(1024) == b""
        answer = b""
        while chunk := half.recv(1024):
            answer += chunk
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4")  # an error status at most, then EOF
        assert time.monotonic() - started < 3
    finally:
        silent.close()
        half.close()


def test_connection_limits_refuse_before_the_upgrade(make_server: Callable[..., ServerProcess],
                                                      raw: RawFactory) -> None:
    per_ip = make_server(WSAPP_MAX_CONNECTIONS_PER_IP="2")
    held = [raw(per_ip.ws("/")) for _ in range(2)]
    assert [c.status for c in held] == [101, 101]
    refused = raw(per_ip.ws("/"))
    assert refused.status == 429
    total = make_server(WSAPP_MAX_CONNECTIONS="1")
    assert raw(total.ws("/")).status == 101
    assert raw(total.ws("/")).status == 503
    assert get_json(total.http("/stats"))[1]["refused"] == 1


def test_per_ip_limit_uses_the_trusted_proxy_address(make_server: Callable[..., ServerProcess],
                                                     raw: RawFactory) -> None:
    behind_router = make_server(WSAPP_MAX_CONNECTIONS_PER_IP="1", WSAPP_TRUSTED_PROXY_HOPS="1")
    assert raw(behind_router.ws("/"), {"X-Forwarded-For": "203.0.113.7"}).status == 101
    assert raw(behind_router.ws("/"), {"X-Forwarded-For": "198.51.100.9"}).status == 101
    # A forged left-most entry does not help: the router's own entry (right-most) is what counts.
    assert raw(behind_router.ws("/"), {"X-Forwarded-For": "192.0.2.1, 203.0.113.7"}).status == 429
    direct = make_server(WSAPP_MAX_CONNECTIONS_PER_IP="1")  # no proxy trusted: the header is ignored
    assert raw(direct.ws("/"), {"X-Forwarded-For": "203.0.113.7"}).status == 101
    assert raw(direct.ws("/"), {"X-Forwarded-For": "198.51.100.9"}).status == 429


# ---- Origin and tokens ---------------------------------------------------------------------------


def test_origin_policy_is_enforced_before_the_upgrade(make_server: Callable[..., ServerProcess],
                                                       raw: RawFactory) -> None:
    srv = make_server(WSAPP_ALLOWED_ORIGINS="https://app.example")
    host = f"127.0.0.1:{srv.port}"
    assert raw(srv.ws("/"), {"Origin": "https://evil.example"}).status == 403
    assert raw(srv.ws("/ws"), {"Origin": "https://evil.example"}).status == 403
    assert raw(srv.ws("/"), {"Origin": "https://app.example"}).status == 101
    assert raw(srv.ws("/"), {"Origin": f"http://{host}"}).status == 101  # same origin
    assert raw(srv.ws("/")).status == 101  # no Origin: not a browser


SECRET = "test-secret-" + "k" * 32


def token(sub: str = "alice", ttl: int = 60, **claims: object) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + ttl, **claims}, SECRET, algorithm="HS256")


def test_tokens_are_required_and_checked(make_server: Callable[..., ServerProcess], raw: RawFactory) -> None:
    srv = make_server(WSAPP_JWT_SECRET=SECRET)
    missing = raw(srv.ws("/ws"))
    assert missing.status == 401 and missing.response_headers["www-authenticate"] == "Bearer"
    assert raw(srv.ws("/ws?token=garbage")).status == 401
    assert raw(srv.ws(f"/ws?token={token(ttl=-30)}")).status == 401
    wrong = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "other-" + "z" * 32, algorithm="HS256")
    assert raw(srv.ws(f"/ws?token={wrong}")).status == 401
    assert raw(srv.ws("/ws"), {"Authorization": f"Bearer {token()}"}).status == 101
    # The relay is not behind tokens (Node ws clients send none).
    assert raw(srv.ws("/")).status == 101


def test_token_identity_and_room_allowlist(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server(WSAPP_JWT_SECRET=SECRET)
    ws = connect(srv.ws(f"/ws?token={token('carol', rooms=['ops'])}"))
    try:
        assert recv_json(ws)["name"] == "carol"
        send_json(ws, type="join", room="ops")
        assert recv_json(ws)["type"] == "joined"
        send_json(ws, type="join", room="finance")
        err = recv_json(ws)
        assert err["type"] == "error" and err["code"] == "forbidden"
    finally:
        ws.close()


def test_connection_is_closed_when_its_token_expires(make_server: Callable[..., ServerProcess],
                                                     raw: RawFactory) -> None:
    srv = make_server(WSAPP_JWT_SECRET=SECRET)
    client = raw(srv.ws(f"/ws?token={token('dora', ttl=2)}"))
    assert client.status == 101
    started = time.monotonic()
    close = client.recv_until_close()
    assert (close.close_code, close.close_reason) == (1008, "token expired")
    assert time.monotonic() - started < 4


# ---- liveness and backpressure -------------------------------------------------------------------


def test_silent_peer_is_pinged_then_dropped_and_presence_cleaned(make_server: Callable[..., ServerProcess],
                                                                  raw: RawFactory) -> None:
    srv = make_server(WSAPP_PING_INTERVAL="0.2", WSAPP_PING_TIMEOUT="0.8")
    room = "r-" + uuid.uuid4().hex[:8]
    watcher = connect(srv.ws("/ws?name=watcher"))
    inbox: queue.Queue[dict] = queue.Queue()

    def keep_reading() -> None:
        # websocket-client answers pings while it reads, so the watcher stays alive.
        with contextlib.suppress(Exception):
            while True:
                inbox.put(recv_json(watcher))

    reader = threading.Thread(target=keep_reading, daemon=True)
    try:
        assert recv_json(watcher)["type"] == "welcome"
        reader.start()
        send_json(watcher, type="join", room=room)
        assert inbox.get(timeout=5)["type"] == "joined"
        silent = raw(srv.ws("/ws?name=silent"))
        silent.recv_frame()  # welcome
        silent.send(0x1, f'{{"type":"join","room":"{room}"}}'.encode())
        assert inbox.get(timeout=5) == {"type": "presence", "room": room, "event": "join", "who": "silent"}
        frames = []
        started = time.monotonic()
        while True:
            frame = silent.recv_frame()
            frames.append(frame.opcode)
            if frame.opcode == 0x8:
                break
        assert 0x9 in frames  # it was pinged first
        assert frame.close_code == 1001
        assert time.monotonic() - started < 3
        assert inbox.get(timeout=5) == {"type": "presence", "room": room, "event": "leave", "who": "silent"}
        # The watcher answered its pings (pongs count as life) and is still connected.
        send_json(watcher, type="ping", id=1)
        assert inbox.get(timeout=5) == {"type": "pong", "id": 1}
        assert get_json(srv.http("/stats"))[1]["ping_timeouts"] == 1
    finally:
        watcher.close()
        reader.join(5)


def test_slow_consumer_is_closed_1013_and_the_others_lose_nothing(
    make_server: Callable[..., ServerProcess], raw: RawFactory
) -> None:
    srv = make_server(WSAPP_RATE_LIMIT="0", WSAPP_SEND_QUEUE_BYTES="262144", WSAPP_SLOW_CONSUMER_GRACE="0.2")
    stalled = raw(srv.ws("/"))
    sender, reader = connect(srv.ws("/")), connect(srv.ws("/"))
    proc = psutil.Process(srv.proc.pid)
    try:
        wait_for(lambda: get_json(srv.http("/stats"))[1]["relay_clients"] == 3, what="3 clients")
        payload = "p" * 4096
        count = 3000  # up to 12 MB through the room while one client reads nothing
        kicked_at = None
        for i in range(count):
            sender.send(f"{i:06d}{payload}")
            if i % 100 == 99:  # the fast reader keeps up as it goes
                for j in range(i - 99, i + 1):
                    assert reader.recv()[:6] == f"{j:06d}"
                if get_json(srv.http("/stats"))[1]["slow_consumer_kicks"] == 1:
                    kicked_at = i
                    break
        assert kicked_at is not None, "the stalled client was never closed"
        assert proc.memory_info().rss < 200 * 1024 * 1024
        # Once it reads again (before the closing handshake's own 3 s timeout shuts the socket), the
        # stalled client finds a 1013 after what was already in flight.
        stalled.sock.settimeout(5)
        assert stalled.recv_until_close().close_code == 1013
        sender.send("after the kick")
        assert reader.recv() == "after the kick"
        stalled.send(0x8, struct.pack("!H", 1000))  # its half of the closing handshake
        wait_for(lambda: get_json(srv.http("/stats"))[1]["relay_clients"] == 2, what="stalled client gone")
    finally:
        sender.close()
        reader.close()


def test_flood_with_a_stalled_reader_does_not_take_the_process_down(
    make_server: Callable[..., ServerProcess], raw: RawFactory
) -> None:
    srv = make_server(WSAPP_RATE_LIMIT="0")
    stalled = [raw(srv.ws("/")) for _ in range(3)]
    floods = [raw(srv.ws("/")) for _ in range(3)]
    for flood in floods:
        for _ in range(200):
            flood.send(0x2, b"f" * 8192)
    for flood in floods:
        flood.sock.close()
    # Stalled and flooding clients alike: the process lives and serves new clients.
    a, b = connect(srv.ws("/")), connect(srv.ws("/"))
    try:
        a.send("alive")
        assert b.recv() == "alive"
        assert srv.proc.poll() is None
        assert get_json(srv.http("/healthz"))[0] == 200
    finally:
        a.close()
        b.close()
    assert len(stalled) == 3


# ---- graceful shutdown ---------------------------------------------------------------------------


def test_sigterm_flushes_then_closes_everyone_with_1001(make_server: Callable[..., ServerProcess],
                                                        raw: RawFactory) -> None:
    srv = make_server(WSAPP_RATE_LIMIT="0", WSAPP_DRAIN_SECONDS="5")
    listeners = [raw(srv.ws("/")) for _ in range(3)]
    sender = raw(srv.ws("/"))
    wait_for(lambda: get_json(srv.http("/stats"))[1]["relay_clients"] == 4, what="4 clients")
    for i in range(500):
        sender.send(0x1, f"msg {i}".encode())
    # The last message is known to be accepted once the sender's own ping is answered.
    sender.send(0x9, b"sync")
    assert sender.recv_until_pong().payload == b"sync"
    started = time.monotonic()
    srv.terminate()
    for listener in listeners:
        got = []
        while True:
            frame = listener.recv_frame()
            if frame.opcode == 0x8:
                break
            got.append(frame.payload)
        assert got == [f"msg {i}".encode() for i in range(500)]  # nothing accepted was lost
        assert frame.close_code == 1001
        listener.send(0x8, struct.pack("!H", 1001))  # a well-behaved client answers the close
    sender.send(0x8, struct.pack("!H", 1001))
    assert srv.wait(10) == 0
    assert time.monotonic() - started < 5
    assert "draining" in srv.log_text()
