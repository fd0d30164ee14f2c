"""wsapp.greenlets: request greenlets waiting for the next connection instead of a new one each."""

from __future__ import annotations

import contextvars

import gevent
import pytest
from gevent.event import Event
from greenlet import GreenletExit, getcurrent

from wsapp import greenlets

request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")


def run_jobs(*jobs: tuple) -> None:
    """Spawn each (func, args...) and wait until all have run (each sets the Event it is given last)."""
    done = []
    for func, *args in jobs:
        event = Event()
        done.append(event)
        greenlets.spawn(func, *args, event)
    for event in done:
        assert event.wait(5), "a job did not run"


def test_a_finished_greenlet_runs_the_next_job_and_each_job_has_a_fresh_context() -> None:
    seen: list[tuple[object, str]] = []

    def job(value: str, event: Event) -> None:
        seen.append((getcurrent(), request_var.get()))
        request_var.set(value)  # never reset: the next job must not see it
        event.set()

    run_jobs((job, "first"))
    gevent.sleep(0)  # the first job's greenlet goes back to waiting
    run_jobs((job, "second"))
    assert seen[0][0] is seen[1][0], "the second job should run in the first one's greenlet"
    assert [value for _, value in seen] == ["unset", "unset"]


def test_concurrent_jobs_get_greenlets_of_their_own() -> None:
    started: list[object] = []
    release = Event()

    def job(event: Event) -> None:
        started.append(getcurrent())
        event.set()
        release.wait(5)

    run_jobs((job,), (job,), (job,))
    assert len(set(map(id, started))) == 3
    release.set()


def test_a_failing_job_is_reported_and_its_greenlet_serves_on(capsys: pytest.CaptureFixture[str]) -> None:
    ran_in: list[object] = []

    def fails(event: Event) -> None:
        ran_in.append(getcurrent())
        event.set()
        raise ValueError("boom in a job")

    def fine(event: Event) -> None:
        ran_in.append(getcurrent())
        event.set()

    run_jobs((fails,))
    gevent.sleep(0)
    run_jobs((fine,))
    assert ran_in[0] is ran_in[1]
    assert "boom in a job" in capsys.readouterr().err


def test_a_stray_throw_into_a_waiting_greenlet_leaves_it_waiting_for_a_job() -> None:
    mine: list[object] = []

    def job(event: Event) -> None:
        mine.append(getcurrent())
        event.set()

    run_jobs((job,))
    gevent.sleep(0)
    waiting = mine[0]
    gevent.get_hub().loop.run_callback(waiting.throw, gevent.Timeout(0.01))  # e.g. a leaked timeout
    gevent.sleep(0)
    gevent.sleep(0)
    run_jobs((job,))
    assert mine[1] is waiting


def test_at_most_max_spare_greenlets_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(greenlets, "MAX_SPARE", 2)
    monkeypatch.setattr(greenlets, "_spare", [])
    release = Event()

    def job(event: Event) -> None:
        event.set()
        release.wait(5)

    run_jobs((job,), (job,), (job,), (job,))
    release.set()
    for _ in range(3):
        gevent.sleep(0)
    assert greenlets.spare_count() == 2


def test_a_killed_job_ends_its_greenlet_instead_of_serving_again() -> None:
    ran_in: list[object] = []

    def job(event: Event) -> None:
        ran_in.append(getcurrent())
        event.set()
        Event().wait(5)

    run_jobs((job,))
    victim = ran_in[0]
    gevent.get_hub().loop.run_callback(victim.throw, GreenletExit)
    gevent.sleep(0)
    gevent.sleep(0)
    assert victim.dead and victim not in greenlets._spare


def test_a_bounded_server_takes_no_more_than_its_size_and_accepts_again_when_one_ends() -> None:
    """gevent's StreamServer with `spawn=Bounded(1)`: the second connection's handler runs only once
    the first one's has returned (the server stops accepting while full, and starts again)."""
    from gevent import socket as gsocket
    from gevent.server import StreamServer

    handled: list[str] = []
    release = Event()
    second_in = Event()

    def handle(sock: gsocket.socket, _address: object) -> None:
        name = sock.recv(16).decode()
        handled.append(name)
        if name == "first":
            release.wait(5)
        else:
            second_in.set()

    pool = greenlets.Bounded(1)
    server = StreamServer(("127.0.0.1", 0), handle, spawn=pool)
    server.start()
    try:
        first = gsocket.create_connection(("127.0.0.1", server.server_port))
        first.sendall(b"first")
        second = gsocket.create_connection(("127.0.0.1", server.server_port))
        second.sendall(b"second")
        assert not second_in.wait(0.05), "the second was handled while the first held the only slot"
        assert handled == ["first"] and pool.full() and len(pool) == 1
        release.set()
        assert second_in.wait(5)
        assert handled == ["first", "second"]
        first.close()
        second.close()
    finally:
        server.stop(timeout=1)
    assert len(pool) == 0 and not pool.full() and pool.join(0.1)
