"""A process's own publish delivered from the numbering's reply (RedisBackend.deliver_own), without Redis:
when it is the room's next message here it goes at once and its copy from the subscription is dropped;
otherwise it waits for the subscription, which keeps the room's order."""

from __future__ import annotations

from typing import Any

from wsapp.backends import Seq
from wsapp.backends import redis_wire as wire
from wsapp.backends.redis import RedisBackend
from wsapp.config import Settings


def backend_with(delivered: list[tuple[Any, ...]], accept: list[bool]) -> RedisBackend:
    """A backend that never connects (attach is not called), one room "r" with a local member, its
    cursor at seq 4 of epoch "e1"; what the hub is handed goes to `delivered`, and an early delivery
    is accepted while accept[0] (False: producers must wait)."""
    backend = RedisBackend(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/0"}))

    def deliver(room: str, seq: int, origin: str | None, payload: bytes, early: bool = False) -> bool:
        if early and not accept[0]:
            return False
        delivered.append((room, seq, origin, payload, early))
        return True

    backend._deliver = deliver
    backend._members["r"] = {"m1": "ann"}
    backend._cursors.start("r", "e1", 4)
    return backend


def copy(backend: RedisBackend, seq: int, payload: bytes, epoch: str = "e1", origin: str = "m1") -> bytes:
    """The subscription's copy of one of this process's messages."""
    return wire.envelope(backend._bus.next_incarnation(), "r", seq, payload, epoch, origin)


def test_the_rooms_next_message_goes_from_the_reply_and_its_copy_is_dropped() -> None:
    delivered: list[tuple[Any, ...]] = []
    backend = backend_with(delivered, [True])
    backend.deliver_own("r", Seq(5, "e1"), "m1", b'{"seq":', b"}")
    assert delivered == [("r", 5, "m1", b'{"seq":5}', True)]
    backend.on_message(copy(backend, 5, b'{"seq":5}'))
    assert len(delivered) == 1  # the copy: a repeat
    backend.on_message(copy(backend, 6, b'{"seq":6}', origin="m2"))  # the subscription goes on after it
    assert delivered[-1] == ("r", 6, "m2", b'{"seq":6}', False)


def test_anything_else_waits_for_the_subscription() -> None:
    delivered: list[tuple[Any, ...]] = []
    accept = [True]
    backend = backend_with(delivered, accept)
    backend.deliver_own("r", Seq(6, "e1"), "m1", b"<", b">")  # 5 (another process's) is still on its way
    backend.deliver_own("r", Seq(5, "e2"), "m1", b"<", b">")  # another epoch: the subscription says it restarted
    backend.deliver_own("elsewhere", Seq(1, "e1"), "m1", b"<", b">")  # no local member
    backend._marking.add("m9")  # a local join waits for its own presence: it must reach members first
    backend.deliver_own("r", Seq(5, "e1"), "m1", b"<", b">")
    backend._marking.clear()
    accept[0] = False  # producers must wait: the hub refuses, and the cursor stays
    backend.deliver_own("r", Seq(5, "e1"), "m1", b"<", b">")
    assert delivered == []
    assert backend._cursors.position("r") == ("e1", 4)
    backend.on_message(copy(backend, 5, b"<5>"))
    assert delivered == [("r", 5, "m1", b"<5>", False)]  # from the subscription, in its turn
