"""When a fan-out is written through (each recipient's frame straight to its socket) and when it is
coalesced (queued, one send per recipient at the end of the loop turn): issue 13. Real loopback
socket pairs, no server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest

from wsapp.config import Settings
from wsapp.connection import IDLE_GAP, Connection, Outbox
from wsapp.frames import OP_TEXT, encode_frame
from wsapp.metrics import Stats

Pair = tuple[Connection, socket.socket]


def end_turn() -> None:
    gevent.sleep(0)  # the Outbox's end-of-turn callbacks (flush, turn bookkeeping) run here


@pytest.fixture
def outbox() -> Iterator[Outbox]:
    box = Outbox()
    yield box
    end_turn()


@pytest.fixture
def pair(outbox: Outbox) -> Iterator[Pair]:
    """A server-side Connection and the raw peer socket it writes to (non-blocking, read by the test)."""
    ours, peer = gevent.socket.socketpair()
    conn = Connection(ours, b"", "127.0.0.1", "/", Settings.from_env({}), Stats(), outbox)
    raw_peer = peer._sock
    raw_peer.setblocking(False)
    yield conn, raw_peer
    conn.abort()
    ours.close()
    peer.close()


def waiting(peer: socket.socket) -> bytes:
    try:
        return peer.recv(1 << 20)
    except BlockingIOError:
        return b""


def fan_out(outbox: Outbox, conn: Connection, frames: list[bytes], reader: object = "sender") -> None:
    """What `reader` does with one read's messages to `conn`: decide, send each, stop writing through."""
    outbox.write_through = outbox.read(reader, len(frames), time.monotonic())
    try:
        for frame in frames:
            assert conn.send(frame)
    finally:
        outbox.write_through = False


R = "reader"
A, B, C = (encode_frame(OP_TEXT, x) for x in (b"a", b"b", b"c"))


def test_a_lone_message_reaches_the_socket_during_the_fan_out(outbox: Outbox, pair: Pair) -> None:
    conn, peer = pair
    fan_out(outbox, conn, [A])
    assert waiting(peer) == A  # before the loop turn ends
    assert not outbox.flush_pending
    end_turn()
    # The next turn's lone message (one message in flight at a time) goes through too.
    fan_out(outbox, conn, [B])
    assert waiting(peer) == B


def test_messages_of_one_turn_after_the_first_are_coalesced(outbox: Outbox, pair: Pair) -> None:
    conn, peer = pair
    fan_out(outbox, conn, [A], "one")  # first of the turn
    fan_out(outbox, conn, [B], "two")
    fan_out(outbox, conn, [C], "three")
    assert waiting(peer) == A
    end_turn()
    assert waiting(peer) == B + C  # one send, in order


def test_a_read_of_several_messages_is_coalesced_and_so_is_the_next_turn(
    outbox: Outbox, pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("wsapp.connection.IDLE_GAP", 60.0)  # a slow machine must not make the test idle
    conn, peer = pair
    fan_out(outbox, conn, [A, B])
    assert waiting(peer) == b""
    end_turn()
    assert waiting(peer) == A + B
    # Right after a busy turn, a lone message is queued: under load, coalescing wins.
    fan_out(outbox, conn, [C])
    assert waiting(peer) == b""
    end_turn()
    assert waiting(peer) == C
    # The turn with one message makes the next one lone again.
    fan_out(outbox, conn, [A])
    assert waiting(peer) == A


def test_readers_taking_turns_are_coalesced(
    outbox: Outbox, pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two senders whose single messages happen to land in separate turns: more will share a turn."""
    monkeypatch.setattr("wsapp.connection.IDLE_GAP", 60.0)
    conn, peer = pair
    fan_out(outbox, conn, [A], "one")  # a fresh outbox: idle, so lone
    assert waiting(peer) == A
    end_turn()
    fan_out(outbox, conn, [B], "two")
    assert waiting(peer) == b""
    end_turn()
    assert waiting(peer) == B
    fan_out(outbox, conn, [C], "two")  # the same reader again, after a turn of one message
    assert waiting(peer) == C


def test_after_a_busy_turn_the_next_message_is_queued_and_then_an_idle_gap_lets_another_reader_through(
    outbox: Outbox,
) -> None:
    assert outbox.read(R, 3, time.monotonic()) is False
    end_turn()
    assert outbox.read(R, 1, time.monotonic() + 2 * IDLE_GAP) is False  # the turn before carried 3
    end_turn()
    assert outbox.read("other", 1, time.monotonic() - IDLE_GAP) is False  # another reader, no gap
    end_turn()
    assert outbox.read("third", 1, time.monotonic() + 2 * IDLE_GAP) is True


def test_a_read_without_a_whole_frame_does_not_count(outbox: Outbox) -> None:
    assert outbox.read(R, 0, time.monotonic()) is False
    assert outbox.read(R, 1, time.monotonic()) is True


def test_write_through_keeps_order_behind_a_backlog(outbox: Outbox, pair: Pair) -> None:
    """A recipient that still has frames queued gets the lone message queued behind them."""
    conn, peer = pair
    assert conn.send(A)  # queued outside any read (e.g. from the broker), not yet flushed
    fan_out(outbox, conn, [B])
    assert waiting(peer) == b""
    end_turn()
    assert waiting(peer) == A + B
    assert conn.unsent_bytes == 0
    assert outbox.queued == 0
