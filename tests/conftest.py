from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.harness import ServerProcess


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One shared server with default settings (in-memory broker); tests must not change its state."""
    proc = ServerProcess()
    yield proc
    proc.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start extra servers with environment overrides; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        proc = ServerProcess(env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
