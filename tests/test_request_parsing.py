"""Upgrade requests as bytes on the wire against the real server: the 101's exact bytes, and the
same answers as pywsgi's own parser for unusual header blocks (wsapp/request_headers.py parses
the plain ones itself; tests/unit/test_request_headers.py compares the two parsers in detail)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import zlib
from collections.abc import Callable

from tests.harness import ServerProcess
from tests.rawws import RawClient

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
UPGRADE_HEADERS = (f"Host: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {KEY}\r\n"
                   "Sec-WebSocket-Version: 13\r\n").encode()


def exchange(server: ServerProcess, request: bytes) -> bytes:
    """Send `request` as it is; the response head (up to the blank line) and what came with it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_the_101_is_exactly_what_gevent_websocket_sent(server: ServerProcess) -> None:
    head = exchange(server, b"GET / HTTP/1.1\r\n" + UPGRADE_HEADERS + b"\r\n").split(b"\r\n\r\n")[0]
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + ACCEPT)
    offer = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    head = exchange(server, b"GET /ws HTTP/1.1\r\n" + UPGRADE_HEADERS + offer + b"\r\n").split(b"\r\n\r\n")[0]
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\nSec-WebSocket-Extensions: permessage-deflate; "
                    b"server_no_context_takeover; client_no_context_takeover")


def test_the_welcome_of_ws_leaves_in_the_same_send_as_the_101(
    server: ServerProcess, make_server: Callable[..., ServerProcess], raw: Callable[..., RawClient]
) -> None:
    # One send: what the client's first read brought with the 101 (RawClient keeps it) is the
    # whole welcome frame, compressed exactly when deflate was negotiated and it is big enough.
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    compress_all = make_server(WSAPP_DEFLATE_MIN_BYTES="0")
    for srv, headers, rsv in ((server, {}, 0), (server, offer, 0), (compress_all, {}, 0), (compress_all, offer, 4)):
        client = raw(srv.ws("/ws?name=ana"), headers)
        assert client.status == 101
        arrived_with_it = client.buf
        frame = client.recv_frame()
        assert arrived_with_it and client.buf == b"", (srv.port, headers)
        assert (frame.opcode, frame.rsv) == (0x1, rsv), (srv.port, headers)
        text = zlib.decompressobj(-15).decompress(frame.payload + b"\x00\x00\xff\xff") if rsv else frame.payload
        welcome = json.loads(text)
        assert (welcome["type"], welcome["name"]) == ("welcome", "ana")
    relay = raw(server.ws("/"))
    assert relay.status == 101 and relay.buf == b""  # the relay sends nothing first


def test_unusual_but_valid_header_blocks_still_upgrade(server: ServerProcess) -> None:
    for extra in (
        b"X-Folded: a\r\n b\r\n\tc\r\n",  # obs-fold: the email parser's path
        b"Connection: keep-alive\r\n",  # a second Connection header: joined "Upgrade,keep-alive"
        b"X-Name: caf\xe9 \xff\r\n",  # latin-1 bytes
        b"X_Under: dropped\r\n",
        b"X-Empty:\r\n",
    ):
        response = exchange(server, b"GET / HTTP/1.1\r\n" + UPGRADE_HEADERS + extra + b"\r\n")
        assert status_of(response) == 101, extra
    bare_lf = UPGRADE_HEADERS.replace(b"\r\n", b"\n")
    assert status_of(exchange(server, b"GET / HTTP/1.1\n" + bare_lf + b"\n")) == 101


def test_malformed_header_blocks_get_what_pywsgi_gave_them(server: ServerProcess) -> None:
    request = b"GET / HTTP/1.1\r\n"
    # A header line over http.client's 65,536-byte limit, or over 100 header lines: 400, logged
    # in one line (no traceback: neither pywsgi's for the second, nor one from wsapp's access log).
    assert status_of(exchange(server, request + b"X-Long: " + b"v" * 70000 + b"\r\n" + UPGRADE_HEADERS
                              + b"\r\n")) == 400
    many = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(101))
    assert status_of(exchange(server, request + many + UPGRADE_HEADERS + b"\r\n")) == 400
    # A line without a colon ends the headers for the email parser: what follows it is not a
    # header, so this is no upgrade but a plain GET of the page.
    cut = exchange(server, request + b"Host: 127.0.0.1\r\nnot a header\r\n" + UPGRADE_HEADERS + b"\r\n")
    assert status_of(cut) == 200
    # The same with the upgrade's headers before it: they count, and the upgrade goes through.
    assert status_of(exchange(server, request + UPGRADE_HEADERS + b"not a header\r\n\r\n")) == 101
    assert "Traceback" not in server.log_text()


def test_keep_alive_requests_are_parsed_one_after_the_other(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2
