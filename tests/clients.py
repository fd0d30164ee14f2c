"""Small helpers around websocket-client for the integration tests."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import websocket

TEXT = websocket.ABNF.OPCODE_TEXT
BINARY = websocket.ABNF.OPCODE_BINARY


def connect(url: str, timeout: float = 5.0, **kw: Any) -> websocket.WebSocket:
    return websocket.create_connection(url, timeout=timeout, **kw)


def recv_json(ws: websocket.WebSocket) -> dict[str, Any]:
    opcode, data = ws.recv_data()
    assert opcode == TEXT, f"expected a text frame, got opcode {opcode}: {data!r}"
    return json.loads(data)  # type: ignore[no-any-return]


def recv_type(ws: websocket.WebSocket, kind: str, max_skip: int = 20) -> dict[str, Any]:
    """Next message of `type` kind, skipping presence and other chatter (bounded)."""
    for _ in range(max_skip):
        msg = recv_json(ws)
        if msg["type"] == kind:
            return msg
    raise AssertionError(f"no {kind!r} within {max_skip} messages")


def send_json(ws: websocket.WebSocket, **msg: Any) -> None:
    ws.send(json.dumps(msg))


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll a cheap condition until it holds (for server-side state that sends no event)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
