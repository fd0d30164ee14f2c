"""permessage-deflate end to end: real Node `ws` clients and Chromium negotiate it, a client that did
not offer it gets plain frames of the same broadcast, and a deflate bomb is closed 1009 with the
server's memory flat."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.clients import get_json, wait_for
from tests.harness import ServerProcess
from tests.rawws import RawClient, client_frame
from tests.test_browser import browser, install_page_hooks, join_room, page_texts, python_client, recv_until  # noqa: F401
from tests.test_browser import wait_for as wait_for_page
from wsapp.deflate import compress

NODE_DIR = Path(__file__).resolve().parent
OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
CHAT = ('{"user":"ana","text":"hello everyone in the room, how is it going today?","ts":1764000000000}' * 30).encode()


def peak_rss(srv: ServerProcess) -> int:
    """The server's high-water RSS (VmHWM): catches memory held even briefly, then freed."""
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


@pytest.mark.node
@pytest.mark.parametrize(("path", "mode"), [("/", "relay"), ("/ws", "rooms")])
def test_node_ws_with_per_message_deflate(relay_server: ServerProcess, path: str, mode: str) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "ws").is_dir():
        pytest.fail("node and tests/node_modules/ws are required: run `npm ci --prefix tests`")
    result = subprocess.run([node, "node/deflate.js", relay_server.ws(path), mode], cwd=NODE_DIR,
                            capture_output=True, text=True, timeout=30)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, report
    # ws accepted the server's answer (it fails the connection on one it cannot honour).
    assert report["seen"]["extensions"] == ["permessage-deflate"] * 2
    assert report["seen"]["answers"] == [ANSWER] * 2
    assert report["seen"]["textAtoB"] >= 6000


def test_one_broadcast_compressed_for_those_that_negotiated_plain_for_the_others(
    relay_server: ServerProcess, raw: Callable[..., RawClient]
) -> None:
    sender = raw(relay_server.ws("/"), OFFER)
    squeezed = raw(relay_server.ws("/"), OFFER)
    plain = raw(relay_server.ws("/"))
    assert sender.response_headers["sec-websocket-extensions"] == ANSWER
    assert squeezed.response_headers["sec-websocket-extensions"] == ANSWER
    assert "sec-websocket-extensions" not in plain.response_headers
    wait_for(lambda: get_json(relay_server.http("/stats"))[1]["relay_clients"] >= 3, what="three relay clients")

    sender.send(0x1, compress(CHAT), rsv=4)  # a compressed client message
    got = squeezed.recv_frame()
    assert (got.opcode, got.rsv) == (0x1, 4)
    assert len(got.payload) < len(CHAT) // 5
    assert inflate(got.payload) == CHAT
    got = plain.recv_frame()
    assert (got.opcode, got.rsv, got.payload) == (0x1, 0, CHAT)

    # Below WSAPP_DEFLATE_MIN_BYTES a message goes plain to everyone; control frames are never compressed.
    sender.send(0x2, b"tiny")
    assert squeezed.recv_frame() == plain.recv_frame()
    squeezed.send(0x9, b"p")
    pong = squeezed.recv_until_pong()
    assert (pong.rsv, pong.payload) == (0, b"p")


def test_deflate_off_and_malformed_offers_proceed_uncompressed(make_server: Callable[..., ServerProcess],
                                                             raw: Callable[..., RawClient]) -> None:
    off = make_server(WSAPP_DEFLATE="0")
    client = raw(off.ws("/echo"), OFFER)
    assert client.status == 101 and "sec-websocket-extensions" not in client.response_headers
    client.send(0x1, compress(CHAT), rsv=4)  # RSV1 without a negotiated extension
    assert client.recv_until_close().close_code == 1002

    on = make_server()
    bad = raw(on.ws("/echo"), {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=99"})
    assert bad.status == 101 and "sec-websocket-extensions" not in bad.response_headers
    bad.send(0x1, CHAT)
    assert bad.recv_frame().payload == CHAT


def test_deflate_bomb_is_closed_1009_with_memory_flat(make_server: Callable[..., ServerProcess],
                                                      raw: Callable[..., RawClient]) -> None:
    srv = make_server()  # default WSAPP_MAX_MESSAGE_BYTES: 1 MiB
    warm = raw(srv.ws("/echo"), OFFER)
    warm.send(0x1, compress(CHAT), rsv=4)
    assert warm.recv_frame().rsv == 4
    before = peak_rss(srv)
    # 64 MiB of zeros ending in a full flush, repeated: a valid stream of 512 MiB from ~0.5 MiB on the wire.
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = deflater.compress(bytes(64 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH)
    bomb = segment * 8
    assert len(bomb) < 1 << 20
    for _ in range(3):
        client = raw(srv.ws("/echo"), OFFER)
        client.send_raw(client_frame(0x2, bomb, rsv=4))
        close = client.recv_until_close()
        assert close.close_code == 1009
        assert client.closed_by_server()
    growth = peak_rss(srv) - before
    assert growth < 24 << 20, f"the server's peak RSS grew {growth / 2**20:.1f} MiB"
    assert srv.proc.poll() is None


@pytest.mark.chromium
def test_chromium_negotiates_deflate_and_chats(server: ServerProcess, browser: webdriver.Chrome) -> None:  # noqa: F811
    tag = uuid.uuid4().hex[:8]
    room, page_name, py_name = f"deflate-{tag}", f"page-{tag}", f"py-{tag}"
    install_page_hooks(browser)
    browser.get(server.http("/"))
    join_room(browser, page_name, room)
    extensions = browser.execute_script("return window.__sockets.map((s) => s.extensions);")
    assert extensions and extensions[-1].startswith(ANSWER)

    conn, _ = python_client(server, py_name, room)  # websocket-client offers no extension: plain frames
    try:
        long_text = f"{tag} " + "a long chat message that compresses well, " * 40
        conn.send(json.dumps({"type": "publish", "room": room, "data": {"text": long_text}, "id": "p1"}))
        recv_until(conn, lambda f: f["type"] == "ack" and f["id"] == "p1")
        wait_for_page(browser, lambda d: long_text in page_texts(d, "#log .msg .text"), "page shows the long message")

        typed = f"from the page {tag} " + "é ✓ " * 100
        browser.find_element(By.ID, "text").send_keys(typed)
        browser.find_element(By.ID, "send-btn").click()
        message = recv_until(conn, lambda f: f["type"] == "message" and f["from"] == page_name)
        assert message["data"] == {"text": typed}
    finally:
        conn.close()
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
