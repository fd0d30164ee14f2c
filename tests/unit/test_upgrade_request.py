"""wsapp.upgrade_request against what it stands in for: gevent.pywsgi reading the same request line by
line (its stock handler, `email` parser and all). For every request the one-look reader takes, the
handler state and environ must be pywsgi's; every request it leaves must be left unread."""

from __future__ import annotations

import io
import random
import socket
from http import client as http_client
from types import SimpleNamespace
from typing import Any

import pytest
from gevent import socket as gsocket
from gevent.pywsgi import WSGIHandler

from wsapp.handler import WsappHandler
from wsapp.upgrade_request import LOOK_BYTES, parse_plain_upgrade, read_plain_upgrade

BASE = {"GATEWAY_INTERFACE": "CGI/1.1", "SERVER_NAME": "localhost", "SERVER_PORT": "8080", "SCRIPT_NAME": "",
        "wsgi.url_scheme": "http", "wsgi.multithread": False}
PEER = ("192.0.2.1", 40000)
HEAD = (b"Host: 127.0.0.1:8080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
FRAME = b"\x81\x85abcd" + bytes(c ^ k for c, k in zip(b"hello", b"abcdabcd", strict=False))

TAKEN = [  # plain upgrades: read in one look
    b"GET / HTTP/1.1\r\n" + HEAD + b"\r\n",
    b"GET /ws?name=ana&x=%41 HTTP/1.1\r\n" + HEAD + b"\r\n",
    b"GET /a%20b/%C3%A9?q HTTP/1.1\r\n" + HEAD + b"\r\n",  # PATH_INFO unquoted as latin-1
    b"GET /? HTTP/1.1\r\n" + HEAD + b"\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"\r\n" + FRAME,  # a frame behind the head: the connection's
    b"GET / HTTP/1.1\r\n" + HEAD + b"\r\nGET /next HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"Cookie: a=1\r\nCookie: b=2\r\nAccept: a\r\nAccept: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"Connection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"X-Dup: 1\r\nx-dup: 2\r\nX-DUP: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"X_Under: dropped\r\nX-Empty:\r\nX-Sp:  \t v \t\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"X-Latin: caf\xe9 \xff\x80\r\nX-Nul: a\x00b\r\nX-Ctl: a\x0bb\x1cd\x85e\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"a:b\r\n!#$%&'*+-.^_`|~(),/;<=>?@[]{}\"\\: odd but legal\r\n\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: WebSocket\r\n\r\n",  # an upgrade with nothing else: check_upgrade's to refuse
    b"GET / HTTP/1.1\r\nUpgrade:  websocket \r\nConnection: upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(94)) + HEAD + b"\r\n",
]

LEFT = [  # anything else: pywsgi's
    b"",
    b"GET / HTTP/1.1\r\n" + HEAD,  # the head not all there yet
    b"GET / HTTP/1.1\r\n" + HEAD + b"\r",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # no upgrade: a plain GET
    b"GET / HTTP/1.1\r\n" + HEAD.replace(b"websocket", b"h2c") + b"\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",  # not for wsapp
    b"GET / HTTP/1.1\r\nUpgrade: websocket \r\nConnection: keep-alive, Upgrade\r\n\r\n",  # nor for pywsgi
    b"GET / HTTP/1.0\r\n" + HEAD + b"\r\n",
    b"POST / HTTP/1.1\r\n" + HEAD + b"\r\n",
    b"get / HTTP/1.1\r\n" + HEAD + b"\r\n",
    b"GET  / HTTP/1.1\r\n" + HEAD + b"\r\n",  # two spaces
    b"GET /\t HTTP/1.1\r\n" + HEAD + b"\r\n",
    b"GET /caf\xe9 HTTP/1.1\r\n" + HEAD + b"\r\n",
    b"GET / HTTP/1.1 \r\n" + HEAD + b"\r\n",
    b"GET /\r\n" + HEAD + b"\r\n",  # HTTP/0.9
    b"GET / HTTP/1.1\n" + HEAD + b"\r\n",  # bare LF
    b"GET / HTTP/1.1\r\n" + HEAD.replace(b"\r\n", b"\n") + b"\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"X-Fold: a\r\n b\r\n\r\n",  # continuation line
    b"GET / HTTP/1.1\r\n" + HEAD + b"no colon\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"X-A : 1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"Host: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"Content-Length: 0\r\n\r\n",  # a body, or what pywsgi reads as one
    b"GET / HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"Content-Type: text/plain\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HEAD + b"Expect: 100-continue\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(95)) + HEAD + b"\r\n",  # 100 lines
    b"GET / HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"v" * LOOK_BYTES + b"\r\n\r\n",  # over one look
]


def pywsgi_state(data: bytes) -> dict[str, Any]:
    """What gevent.pywsgi's stock handler makes of the request before it runs the application."""
    handler = WSGIHandler.__new__(WSGIHandler)
    handler.rfile = io.BufferedReader(io.BytesIO(data))
    handler.socket = None
    handler.client_address = PEER
    handler.server = SimpleNamespace(get_environ=lambda: dict(BASE))
    requestline = handler.read_requestline()
    assert handler.read_request(requestline)
    return described(handler, handler.get_environ(), handler.rfile.read())


def wsapp_state(data: bytes) -> dict[str, Any] | None:
    parsed = parse_plain_upgrade(data, dict(BASE), PEER)
    if parsed is None:
        return None
    request, head = parsed
    handler = WsappHandler.__new__(WsappHandler)
    handler.server = SimpleNamespace(application=None)
    handler._start_plain_upgrade(request)
    assert handler.application is None
    return described(handler, handler.environ, data[head:])


def described(handler: Any, env: dict[str, Any], rest: bytes) -> dict[str, Any]:
    env = dict(env)
    del env["wsgi.input"]  # pywsgi's reader of the socket; an empty stream in ours (no body either way)
    return {"requestline": handler.requestline.rstrip(), "command": handler.command, "path": handler.path,
            "version": handler.request_version, "content_length": handler.content_length,
            "close_connection": handler.close_connection, "headers": list(handler.headers._headers),
            "header_lookups": [handler.headers.get(name) for name in ("connection", "Upgrade", "HOST", "x-dup")],
            "environ": env, "rest": rest}


@pytest.mark.parametrize("data", TAKEN, ids=range(len(TAKEN)))
def test_a_plain_upgrade_leaves_the_handler_as_pywsgi_does(data: bytes) -> None:
    assert wsapp_state(data) == pywsgi_state(data)


@pytest.mark.parametrize("data", LEFT, ids=range(len(LEFT)))
def test_anything_else_is_left_to_pywsgi(data: bytes) -> None:
    assert parse_plain_upgrade(data[:LOOK_BYTES], dict(BASE), PEER) is None  # what one look sees


@pytest.mark.parametrize("seed", range(4))
def test_random_requests_are_pywsgis_or_left_to_it(seed: int) -> None:
    rng = random.Random(seed)
    lines = [b"GET / HTTP/1.1\r\n", b"GET /x?y=%7A HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n", b"GET /\xe9 HTTP/1.1\r\n"]
    pieces = [b"Upgrade: websocket\r\n", b"Connection: Upgrade\r\n", b"Host: a\r\n", b"Cookie: c=1\r\n",
              b"X_U: 1\r\n", b"x-a:\t2 \r\n", b"X-A: 3\r\n", b" folded\r\n", b"X-B: \xe9\r\n", b"X-C: a\rb\r\n",
              b"Content-Length: 0\r\n", b"bad line\r\n", b"X-D: 4\n", b"Connection: close\r\n"]
    taken = left = 0
    for _ in range(1000):
        headers = [rng.choice(pieces) for _ in range(rng.randrange(6))]
        if rng.random() < 0.8:
            headers.insert(rng.randrange(len(headers) + 1), rng.choice(pieces[:2]))
        data = rng.choice(lines) + b"".join(headers) + b"\r\n"
        data += rng.choice([b"", FRAME])
        ours = wsapp_state(data)
        if ours is None:
            left += 1
            continue
        taken += 1
        assert ours == pywsgi_state(data), data
    assert taken > 50 and left > 50  # both ways were tried


def test_what_is_read_off_the_socket() -> None:
    a, b = gsocket.socketpair()
    with a, b:
        b.sendall(TAKEN[0] + FRAME)
        request = read_plain_upgrade(a, dict(BASE), PEER)
        assert request is not None and request.leftover == FRAME  # the head and nothing else is taken
        assert request.environ["PATH_INFO"] == "/"
        b.sendall(LEFT[3])
        assert read_plain_upgrade(a, dict(BASE), PEER) is None
        assert a.recv(65536, socket.MSG_DONTWAIT) == LEFT[3]  # left where it was, for pywsgi


def test_a_reset_or_a_timeout_is_the_sockets_error() -> None:
    a, b = gsocket.socketpair()
    with a, b:
        a.settimeout(0.01)
        with pytest.raises(TimeoutError):
            read_plain_upgrade(a, dict(BASE), PEER)
        b.close()
        assert read_plain_upgrade(a, dict(BASE), PEER) is None  # end of stream: pywsgi's to see


def test_http_clients_limits_are_read_when_a_request_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lowered at run time, as tests/unit/test_request_headers.py lowers them for pywsgi's path: a
    request with more lines than allowed, or a head longer than one allowed line (this reader does not
    measure each line), is left to pywsgi."""
    request = TAKEN[15]  # 99 header lines, 1,167 bytes
    assert parse_plain_upgrade(request, dict(BASE), PEER) is not None
    monkeypatch.setattr(http_client, "_MAXHEADERS", 99)
    assert parse_plain_upgrade(request, dict(BASE), PEER) is None
    monkeypatch.setattr(http_client, "_MAXHEADERS", 100)
    monkeypatch.setattr(http_client, "_MAXLINE", 1000)
    assert parse_plain_upgrade(request, dict(BASE), PEER) is None
    assert parse_plain_upgrade(TAKEN[0], dict(BASE), PEER) is not None
