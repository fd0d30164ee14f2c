"""wsapp.cli.tune_listener: accepted connections get TCP_NODELAY from the listener (Linux), and the
handler's check tells when they did not, so it sets it per connection then."""

from __future__ import annotations

import socket
import sys

import pytest

from wsapp.cli import tune_listener
from wsapp.handler import _has_nodelay


def accepted(tuned: bool) -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    if tuned:
        tune_listener(listener)
    client = socket.create_connection(listener.getsockname())
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # TCP_DEFER_ACCEPT hands it over once data is there
    conn, _ = listener.accept()
    listener.close()
    return conn, client


@pytest.mark.skipif(sys.platform != "linux", reason="Linux copies the listener's TCP_NODELAY")
def test_accepted_sockets_inherit_nodelay_from_a_tuned_listener() -> None:
    conn, client = accepted(tuned=True)
    try:
        assert _has_nodelay(conn)
    finally:
        conn.close()
        client.close()


def test_an_untuned_listener_gives_sockets_without_nodelay() -> None:
    conn, client = accepted(tuned=False)
    try:
        assert not _has_nodelay(conn)  # so the handler sets it on each connection itself
    finally:
        conn.close()
        client.close()
