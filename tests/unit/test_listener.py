"""wsapp.cli.tune_listener and cli.listen: accepted connections get TCP_NODELAY from the listener (Linux),
also one made the moment it listens, and the handler's check tells when they did not, so it sets it
per connection then."""

from __future__ import annotations

import socket
import sys

import pytest

from wsapp.cli import listen, tune_listener
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
        assert _has_nodelay(conn) is True
    finally:
        conn.close()
        client.close()


def test_an_untuned_listener_gives_sockets_without_nodelay() -> None:
    conn, client = accepted(tuned=False)
    try:
        assert _has_nodelay(conn) is False  # so the handler sets it on each connection itself
    finally:
        conn.close()
        client.close()


def accept_one(listener: socket.socket, client: socket.socket) -> socket.socket:
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    conn, _ = listener.accept()
    return conn


@pytest.mark.skipif(sys.platform != "linux", reason="Linux copies the listener's TCP_NODELAY")
def test_a_connection_made_as_the_listener_opens_inherits_its_options() -> None:
    # The kernel copies the options when the connection is made: one that came in before they were set
    # lacks them (what happened when a probe connected while gevent's server looked up its host name,
    # between its listen() and the options; the handler then set TCP_NODELAY on every connection).
    late = socket.create_server(("127.0.0.1", 0))
    early_client = socket.create_connection(late.getsockname())
    tune_listener(late)
    early = accept_one(late, early_client)
    # cli.listen sets them before listen(): a client connecting the moment it returns has them.
    listener = listen("127.0.0.1", 0, 16)
    client = socket.create_connection(listener.getsockname())
    conn = accept_one(listener, client)
    try:
        assert _has_nodelay(early) is False
        assert _has_nodelay(conn) is True
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
    finally:
        for sock in (early, early_client, late, conn, client, listener):
            sock.close()


def test_listen_on_a_taken_port_raises() -> None:
    taken = listen("127.0.0.1", 0, 16)
    try:
        with pytest.raises(OSError):
            listen("127.0.0.1", taken.getsockname()[1], 16)
    finally:
        taken.close()


def test_a_socket_that_cannot_tell_decides_nothing() -> None:
    # The handler caches the first definite answer per server; a socket already gone gives none.
    conn, client = accepted(tuned=False)
    conn.close()
    client.close()
    assert _has_nodelay(conn) is None
