"""The Redis broker's members lock: joins share it, re-registration and the heartbeat take it alone."""

from __future__ import annotations

import gevent
import pytest
import redis

from wsapp.backends.redis import SharedLock


def test_shared_holders_overlap_and_an_exclusive_one_waits_for_them_and_blocks_newcomers() -> None:
    lock = SharedLock()
    events: list[str] = []

    def joiner(name: str, hold: float) -> None:
        with lock.shared(1.0):
            events.append(f"{name} in")
            gevent.sleep(hold)
            events.append(f"{name} out")

    def heartbeat() -> None:
        with lock.exclusive(1.0):
            events.append("beat")

    first = [gevent.spawn(joiner, "j1", 0.05), gevent.spawn(joiner, "j2", 0.05)]
    gevent.sleep(0.01)
    beat = gevent.spawn(heartbeat)
    gevent.sleep(0.01)
    late = gevent.spawn(joiner, "j3", 0)
    gevent.joinall([*first, beat, late], timeout=2, raise_error=True)
    assert events[:2] == ["j1 in", "j2 in"]  # at once, not one after the other
    assert events.index("beat") > max(events.index("j1 out"), events.index("j2 out"))
    assert events.index("j3 in") > events.index("beat")  # a waiting heartbeat is not starved by new joins


def test_every_wait_is_bounded() -> None:
    lock = SharedLock()

    def stuck() -> None:
        with lock.shared(1.0):
            gevent.sleep(1)

    holder = gevent.spawn(stuck)
    gevent.sleep(0)
    with pytest.raises(redis.TimeoutError), lock.exclusive(0.05):
        pass
    holder.kill()
    with lock.exclusive(0.05), pytest.raises(redis.TimeoutError), lock.shared(0.05):
        pass
