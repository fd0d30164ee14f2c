"""`POST /api/publish` (on with WSAPP_API_KEY): auth, limits, clear errors, seqs, delivery to `/ws` members."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import websocket

from tests.clients import connect, get_json, recv_json, recv_type, send_json, wait_for
from tests.harness import ServerProcess
from tests.redis_fixture import RedisServer

KEY = "test-api-key-" + "k" * 20
MAX_BYTES = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
Answer = tuple[int, dict[str, str], dict[str, Any]]


def room() -> str:
    return "api-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def api_server() -> Iterator[ServerProcess]:
    env = {"WSAPP_API_KEY": KEY, "WSAPP_MAX_MESSAGE_BYTES": str(MAX_BYTES), "WSAPP_RATE_LIMIT": "0"}
    proc = ServerProcess(env)
    yield proc
    proc.stop()


def post(srv: ServerProcess, body: Any, headers: dict[str, str] | None = AUTH) -> Answer:
    """POST to /api/publish: `body` as JSON, raw bytes, or an iterable of chunks (sent chunked)."""
    data = body if isinstance(body, (bytes, Iterator)) else json.dumps(body).encode()
    request = urllib.request.Request(srv.http("/api/publish"), data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, dict(err.headers), json.loads(raw) if raw.startswith(b"{") else {}


def member(srv: ServerProcess, r: str) -> tuple[websocket.WebSocket, str]:
    """A `/ws` client in room `r`, and the room's epoch its `joined` named."""
    ws = connect(srv.ws("/ws?name=reader"))
    assert recv_json(ws)["type"] == "welcome"
    send_json(ws, type="join", room=r)
    return ws, recv_type(ws, "joined")["epoch"]


def seqs_of(answer: Answer) -> tuple[int, Any]:
    """(status, seq or seqs) of an answer whose epochs were checked to be one well-formed epoch each."""
    status, _, body = answer
    if "seq" in body:
        assert set(body) == {"seq", "epoch"} and isinstance(body["epoch"], str) and body["epoch"], body
        return status, body["seq"]
    assert set(body) == {"seqs", "epochs"} and len(body["epochs"]) == len(body["seqs"]), body
    assert all(isinstance(epoch, str) and epoch for epoch in body["epochs"]), body
    return status, body["seqs"]


def test_off_without_a_key(server: ServerProcess) -> None:
    status, _, _ = post(server, {"room": "r", "data": 1})
    assert status == 404


def test_publish_one_and_a_list_in_order(api_server: ServerProcess) -> None:
    r = room()
    ws, epoch = member(api_server, r)
    try:
        _, before = get_json(api_server.http("/stats"))
        # Each seq comes with the epoch it belongs to: the one the room's members were told.
        assert post(api_server, {"room": r, "data": {"text": "hi"}})[::2] == (200, {"seq": 1, "epoch": epoch})
        msg = recv_json(ws)
        assert (msg["type"], msg["seq"], msg["from"], msg["data"]) == ("message", 1, "server", {"text": "hi"})

        other = room()
        batch = [{"room": r, "data": n, "from": "billing"} for n in range(5)] + [{"room": other, "data": "elsewhere"}]
        status, _, body = post(api_server, batch)
        assert (status, body["seqs"][:5], body["seqs"][5]) == (200, [2, 3, 4, 5, 6], 1)
        assert body["epochs"][:5] == [epoch] * 5
        assert body["epochs"][5] != epoch  # another room, numbered in a life of its own
        assert [(m["seq"], m["data"], m["from"]) for m in (recv_json(ws) for _ in range(5))] == [
            (n + 2, n, "billing") for n in range(5)
        ]
        assert post(api_server, [])[::2] == (200, {"seqs": [], "epochs": []})
        _, after = get_json(api_server.http("/stats"))
        assert after["api_publishes"] - before["api_publishes"] == 7
    finally:
        ws.close()


def test_authorization(api_server: ServerProcess) -> None:
    body = {"room": room(), "data": 1}
    for headers in ({"Content-Type": "application/json"}, {**AUTH, "Authorization": f"Basic {KEY}"},
                    {**AUTH, "Authorization": "Bearer "}):
        status, answer_headers, answer = post(api_server, body, headers)
        assert (status, answer["error"]) == (401, "unauthorized")
        assert answer_headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in (KEY[:-1], KEY + "x", KEY[:-1] + "K", "é" * len(KEY)):
        status, _, answer = post(api_server, body, {**AUTH, "Authorization": f"Bearer {wrong}"})
        assert (status, answer["error"]) == (403, "forbidden"), wrong
    assert seqs_of(post(api_server, body, {**AUTH, "Authorization": f"bearer  {KEY}"})) == (200, 1)


def test_too_large_by_length_by_reading_and_by_count(api_server: ServerProcess) -> None:
    r = room()
    big = {"room": r, "data": "x" * MAX_BYTES}
    status, _, answer = post(api_server, big)
    assert (status, answer["error"]) == (413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"room": "%s", "data": "' % r.encode()
        for _ in range(MAX_BYTES // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    status, _, answer = post(api_server, chunks())
    assert (status, answer["error"]) == (413, "too_large")
    # Announced too large: refused from the header alone, without waiting for a byte of the body.
    with socket.create_connection(("127.0.0.1", api_server.port), timeout=5) as sock:
        head = f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        sock.sendall(head.encode() + b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    status, _, answer = post(api_server, [{"room": r, "data": 0}] * 1001)
    assert (status, answer["error"]) == (413, "too_large")
    # Under the limits, a chunked body is fine, and nothing above took a number.
    small: Iterable[bytes] = iter([b'[{"room": "%s",' % r.encode(), b' "data": 1}]'])
    assert seqs_of(post(api_server, small)) == (200, [1])


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"room": "r", "data": 1}', "text/plain", 415, "unsupported_media_type"),
        (b'{"room": "r", "data": ', "application/json", 400, "bad_json"),
        (b'"just a string"', "application/json", 400, "bad_message"),
        (b'{"room": "a b", "data": 1}', "application/json", 400, "bad_room"),
        (b'{"data": 1}', "application/json", 400, "bad_message"),
        (b'{"room": "r"}', "application/json", 400, "bad_message"),
        (b'{"room": "r", "data": 1, "extra": 2}', "application/json", 400, "bad_message"),
        (b'{"room": "r", "data": 1, "from": ""}', "application/json", 400, "bad_message"),
        (b'{"room": "r", "data": 1, "from": 7}', "application/json", 400, "bad_message"),
        (b'{"room": "r", "data": ' + b"[" * 40 + b"]" * 40 + b"}", "application/json", 400, "bad_message"),
        (b'[{"room": "ok", "data": 1}, {"room": "", "data": 2}]', "application/json", 400, "bad_room"),
        (b"[1]", "application/json", 400, "bad_message"),
    ],
)
def test_bad_requests_get_a_code_and_publish_nothing(
    api_server: ServerProcess, body: bytes, content_type: str, status: int, code: str
) -> None:
    r = room()
    body = body.replace(b'"r"', b'"%s"' % r.encode()).replace(b'"ok"', b'"%s"' % r.encode())
    got_status, _, answer = post(api_server, body, {**AUTH, "Content-Type": content_type})
    assert (got_status, answer["error"]) == (status, code)
    assert answer["message"]
    # Not even the valid first item of a bad list was published: the room's first seq is still 1.
    assert seqs_of(post(api_server, {"room": r, "data": "after"})) == (200, 1)


def test_rate_limited_per_process(make_server: Any) -> None:
    # One connection may send 0.01/s with a burst of 1; the API ten times that: 0.1 messages/s, burst 10.
    srv = make_server(WSAPP_API_KEY=KEY, WSAPP_RATE_LIMIT="0.01", WSAPP_RATE_BURST="1")
    r = room()
    assert seqs_of(post(srv, [{"room": r, "data": n} for n in range(10)])) == (200, list(range(1, 11)))
    status, headers, answer = post(srv, {"room": r, "data": "one too many"})
    assert (status, answer["error"]) == (429, "rate_limited")
    assert 1 <= int(headers["Retry-After"]) <= 10
    # More than the burst could never pass: that is no reason to retry.
    status, _, answer = post(srv, [{"room": r, "data": n} for n in range(11)])
    assert (status, answer["error"]) == (413, "too_large")


@pytest.mark.redis
def test_api_publish_reaches_members_of_another_process(redis_server: RedisServer, make_server: Any) -> None:
    env = {"REDIS_URL": redis_server.url, "WSAPP_API_KEY": KEY}
    a, b = make_server(**env), make_server(**env)
    r = room()
    ws, epoch = member(b, r)
    try:
        send_json(ws, type="publish", room=r, data="member first", id="m")
        assert recv_type(ws, "ack")["seq"] == 1
        status, _, body = post(a, [{"room": r, "data": "api", "from": "backend"}, {"room": r, "data": "api 2"}])
        assert (status, body) == (200, {"seqs": [2, 3], "epochs": [epoch, epoch]})
        assert [(m["seq"], m["from"]) for m in (recv_json(ws), recv_json(ws))] == [(2, "backend"), (3, "server")]
    finally:
        ws.close()


@pytest.mark.redis
def test_api_answers_503_unavailable_while_redis_is_away_and_publishes_after(make_redis: Any, make_server: Any) -> None:
    """Without its broker a process cannot number a message: the API says so with a code to retry on,
    publishes nothing, and numbers on once Redis is back (a restart empties it: a new epoch)."""
    broker: RedisServer = make_redis()
    srv = make_server(REDIS_URL=broker.url, WSAPP_API_KEY=KEY)
    r = room()
    status, first = seqs_of(post(srv, [{"room": r, "data": 0}]))
    assert (status, first) == (200, [1])
    before = post(srv, {"room": r, "data": 1})[2]["epoch"]
    broker.stop()
    wait_for(lambda: get_json(srv.http("/healthz"))[0] == 503, timeout=10, what="healthz degraded")
    status, headers, body = post(srv, [{"room": r, "data": 2}, {"room": r, "data": 3}])
    assert (status, body["error"], body["seqs"], body["epochs"]) == (503, "unavailable", [], [])
    assert headers["Retry-After"] == "1" and body["message"]
    broker.start()
    wait_for(lambda: get_json(srv.http("/healthz"))[0] == 200, timeout=15, what="healthz ok")
    status, _, body = post(srv, {"room": r, "data": 4})
    assert (status, body["seq"]) == (200, 1) and body["epoch"] != before
