from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import websocket

from tests.clients import connect, recv_json
from tests.harness import ServerProcess
from tests.rawws import RawClient
from tests.redis_fixture import make_redis, redis_server  # noqa: F401 - fixtures for tests/test_redis.py
from tests.redis_topologies import make_redis_cluster, password_redis, redis_cluster, redis_sentinel, tls_redis  # noqa: F401


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One shared server with default settings (in-memory broker); tests must not change its state."""
    proc = ServerProcess()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def relay_server() -> Iterator[ServerProcess]:
    """A server of the module's own: every client on `/` hears every other, so modules must not share it."""
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


@pytest.fixture
def raw() -> Iterator[Callable[..., RawClient]]:
    """Raw-socket clients (bad frames, bad handshakes); all closed after the test."""
    opened: list[RawClient] = []

    def open_raw(url: str, headers: dict[str, str] | None = None, **kw: object) -> RawClient:
        client = RawClient(url, headers, **kw)  # type: ignore[arg-type]
        opened.append(client)
        return client

    yield open_raw
    for client in opened:
        client.close()


@pytest.fixture
def rooms_clients() -> Iterator[Callable[[ServerProcess, str], websocket.WebSocket]]:
    """Open `/ws` clients named `name` on any server (welcome read); all are closed after the test."""
    opened: list[websocket.WebSocket] = []

    def open_client(srv: ServerProcess, name: str) -> websocket.WebSocket:
        ws = connect(srv.ws(f"/ws?name={name}"))
        assert recv_json(ws)["type"] == "welcome"
        opened.append(ws)
        return ws

    yield open_client
    for ws in opened:
        ws.close()


@pytest.fixture
def opened() -> Iterator[list[websocket.WebSocket]]:
    """Clients a test opens; closed after it (also those the server already closed)."""
    clients: list[websocket.WebSocket] = []
    yield clients
    for ws in clients:
        ws.close()
        ws.shutdown()  # close() returns early on a connection the server already closed
