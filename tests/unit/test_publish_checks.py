"""Checks shared by the Emitter and the HTTP API: room and sender names, a token bucket charged per batch."""

from __future__ import annotations

import pytest

from wsapp import protocol
from wsapp.exceptions import MessageError
from wsapp.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_batch_takes_all_its_tokens_or_none() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=10, clock=clock)
    assert bucket.allow(7)
    assert not bucket.allow(4)  # 3 left: refused, and the 3 are still there
    assert bucket.seconds_until(4) == pytest.approx(0.5)
    assert bucket.allow(3) and not bucket.allow()
    clock.now += 0.5
    assert bucket.allow()
    assert TokenBucket(rate=0, burst=1, clock=clock).seconds_until(2) == float("inf")


@pytest.mark.parametrize("room", ["lobby", "user:42", "a.b-c_d", "x" * 64])
def test_valid_rooms(room: str) -> None:
    assert protocol.check_room(room) == room


@pytest.mark.parametrize(("room", "code"), [("", "bad_room"), ("a b", "bad_room"), ("x" * 65, "bad_room"),
                                            ("/", "bad_room"), (None, "bad_message"), (5, "bad_message")])
def test_invalid_rooms(room: object, code: str) -> None:
    with pytest.raises(MessageError) as caught:
        protocol.check_room(room)
    assert caught.value.code == code


def test_sender_names() -> None:
    for good in ("server", "x" * 32, "Zoë"):
        assert protocol.check_sender(good) == good
    for bad in ("", "x" * 33, "a\nb", None, 3):
        with pytest.raises(MessageError):
            protocol.check_sender(bad)
