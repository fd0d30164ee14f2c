"""A parked connection (no greenlet while its socket is quiet) that has learned to park right after a
short read, without asking `recv` again (issue 11: thousands of publishers at window 1), still reads
everything: split frames, bursts, and the end. Real loopback socket pairs on one Outbox, no server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest
from gevent.event import Event

from tests.rawws import client_frame
from wsapp.config import Settings
from wsapp.connection import PARK_AFTER, Connection, Outbox
from wsapp.frames import OP_TEXT
from wsapp.metrics import Stats

WAIT = 5.0
ROUNDS = 20  # messages each peer sends while learning (a read more than IDLE_GAP after the last is lone: no retry)


class Peer:
    """A server-side Connection served parked, and the raw client socket that writes to it."""

    def __init__(self, outbox: Outbox) -> None:
        ours, theirs = gevent.socket.socketpair()
        self.server_sock, self.client = ours, theirs._sock
        self.client_wrapper = theirs
        self.conn = Connection(ours, b"", "127.0.0.1", "/", Settings.from_env({}), Stats(), outbox)
        self.got: list[bytes] = []
        self.arrived = Event()
        self.ended = Event()
        self.conn.serve_parked(self._on_message, lambda conn: self.ended.set(), rate_limited=False)

    def _on_message(self, opcode: int, payload: bytes) -> None:
        assert opcode == OP_TEXT
        self.got.append(payload)
        self.arrived.set()

    def send(self, data: bytes) -> None:
        self.client.sendall(data)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(self.got) < count:
            self.arrived.clear()
            assert self.arrived.wait(max(0.0, deadline - time.monotonic())), f"{len(self.got)} of {count} arrived"

    def close(self) -> None:
        """As the server ends a connection: shut it, its reader sees the end, then the fd is freed."""
        self.conn.abort()
        assert self.ended.wait(WAIT)
        self.conn.close_socket()
        self.client_wrapper.close()


@pytest.fixture
def peers() -> Iterator[tuple[Peer, Peer]]:
    outbox = Outbox()
    pair = Peer(outbox), Peer(outbox)
    yield pair
    for peer in pair:
        peer.close()


def text(n: int) -> bytes:
    return client_frame(OP_TEXT, b"m%d" % n)


def learn_to_park(peers: tuple[Peer, Peer], rounds: int = ROUNDS) -> None:
    """Two senders taking turns, one message each at a time (their reads alternate, so neither is a
    lone message written through): every retry after a read comes back empty."""
    for i in range(rounds):
        for peer in peers:
            peer.send(text(i))
            peer.wait_for(i + 1)


def test_a_connection_learns_to_park_after_empty_retries(peers: tuple[Peer, Peer]) -> None:
    learn_to_park(peers)
    for peer in peers:
        assert peer.got == [b"m%d" % i for i in range(ROUNDS)]
        assert peer.conn._empty_retries >= PARK_AFTER  # it parks without asking again now


def test_a_frame_split_across_wakeups_still_arrives(peers: tuple[Peer, Peer]) -> None:
    learn_to_park(peers)
    peer = peers[0]
    frame = client_frame(OP_TEXT, b"split in two")
    seen = peer.conn.last_seen
    peer.send(frame[:5])  # a short read with no whole frame in it: the connection parks again
    deadline = time.monotonic() + WAIT
    while peer.conn.last_seen == seen:  # until the server has read the first half
        assert time.monotonic() < deadline, "the first half was never read"
        gevent.sleep(0.001)
    peer.send(frame[5:])
    peer.wait_for(ROUNDS + 1)
    assert peer.got[-1] == b"split in two"


def test_a_burst_after_learning_arrives_whole_and_in_order(peers: tuple[Peer, Peer]) -> None:
    learn_to_park(peers)
    peer = peers[1]
    peer.send(b"".join(text(100 + i) for i in range(200)))
    peer.wait_for(ROUNDS + 200)
    assert peer.got[ROUNDS:] == [b"m%d" % (100 + i) for i in range(200)]
    # And one at a time again afterwards: the probe every few reads keeps it reading.
    for i in range(20):
        peer.send(text(1000 + i))
        peer.wait_for(ROUNDS + 200 + i + 1)
    assert peer.got[-1] == b"m1019"


def test_the_end_of_a_parked_connection_is_noticed(peers: tuple[Peer, Peer]) -> None:
    learn_to_park(peers)
    peer = peers[0]
    peer.client.shutdown(socket.SHUT_WR)
    assert peer.ended.wait(WAIT)
    assert not peers[1].ended.is_set()
