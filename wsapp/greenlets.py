"""Request greenlets used again: the `spawn` of wsapp's servers (gevent's StreamServer).

gevent's servers start a new greenlet for each connection. On Python 3.11 a new greenlet also maps a
fresh 16 KiB stack for its Python frames when it starts and unmaps it when it ends (two system calls
and page faults): with the greenlet itself, ~11 µs more per connection than switching into one that
waits (a micro-benchmark, docs/PERFORMANCE.md "Connect time"), against ~190 µs of server CPU for a
whole WebSocket handshake. A request greenlet that is done waits here for the next connection
instead, up to MAX_SPARE of them. Each job runs in a fresh `contextvars` context, as in a new
greenlet, so nothing a request set there is seen by the next. `python server.py` passes `spawn`;
gunicorn workers pass a `Bounded`, which also caps the connections a worker takes at once.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable
from typing import Any

import gevent
from gevent.lock import Semaphore
from greenlet import GreenletExit, getcurrent, greenlet

# Enough for the handshakes of a burst of connections in flight at once; each waiting one keeps its
# small saved stack and its frame stack's touched pages (a few KiB).
MAX_SPARE = 128
_spare: list[greenlet] = []


def spawn(func: Callable[..., Any], *args: Any) -> None:
    """Run `func(*args)` in a greenlet of its own from the event loop's next turn, as gevent's
    `Greenlet.spawn` would: a waiting one if there is one, else a new one."""
    hub = gevent.get_hub()
    worker = _spare.pop() if _spare else greenlet(_work, parent=hub)
    hub.loop.run_callback(worker.switch, func, args)


def spare_count() -> int:
    return len(_spare)


class Bounded:
    """What a gevent server takes a `Pool` for, over these greenlets: at most `size` requests at once.
    The server asks `full()` before it accepts, stops accepting while it is, and starts again when
    the semaphore it links to (`_semaphore`, the name gevent's BaseServer uses for its Pool's) is
    released by a request that ended."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._semaphore = Semaphore(size)

    def full(self) -> bool:
        return self._semaphore.locked()

    def __len__(self) -> int:
        """Requests running (a server's `stop()` waits for them when there are any)."""
        return self._size - self._semaphore.counter

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no request runs (BaseServer.stop), at most `timeout` seconds."""
        taken = 0
        try:
            with gevent.Timeout(timeout, False):
                while taken < self._size:
                    self._semaphore.acquire()
                    taken += 1
        finally:
            for _ in range(taken):
                self._semaphore.release()
        return taken == self._size

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        """BaseServer.stop's last step for a Pool; requests here end with their connections (drain)."""

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        if not self._semaphore.acquire(blocking=False):  # the server checked full(): never waits here
            raise RuntimeError("more requests than the server allows at once")
        spawn(self._run, func, args)

    def _run(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            func(*args)
        finally:
            self._semaphore.release()


def _work(func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    hub = gevent.get_hub()
    me = getcurrent()
    while True:
        try:
            contextvars.Context().run(func, *args)
        except GreenletExit:  # killed: this greenlet ends, as a killed one would
            return
        except BaseException:  # reported as gevent reports a greenlet's uncaught error; then the next job
            hub.handle_error(me, *sys.exc_info())
        func = args = None  # type: ignore[assignment]  # nothing of the last job stays referenced
        if len(_spare) >= MAX_SPARE:
            return
        _spare.append(me)
        while True:
            try:
                func, args = hub.switch()
                break
            except GreenletExit:  # collected while waiting (the process is ending)
                return
            except BaseException:  # thrown into a waiting greenlet (a Timeout an earlier job left running):
                continue  # not a job
