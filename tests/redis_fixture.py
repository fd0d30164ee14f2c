"""A real redis-server on a free loopback port, without persistence, for the scale-out tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import redis

REDIS_SERVER = "redis-server"


def command_calls(client: redis.Redis, command: str) -> int:
    """How many times a server ran `command` (INFO commandstats; scripts' calls included). Asking
    runs INFO, which the next reading of "info" counts."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def error_replies(client: redis.Redis, code: str) -> int:
    """How many error replies starting with `code` a server gave (INFO errorstats)."""
    return int(client.info("errorstats").get(f"errorstat_{code}", {}).get("count", 0))


def stop_process(proc: subprocess.Popen[bytes] | None, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL: a crash) a server process and wait for it, SIGKILL if it lingers."""
    if proc is not None and proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One `redis-server` child process; `stop()` and `start()` again keep the port (a broker outage)."""

    def __init__(self) -> None:
        binary = shutil.which(REDIS_SERVER)
        if binary is None:
            pytest.fail(f"{REDIS_SERVER} not found on PATH: install Debian's redis-server (scripts/test.sh does)")
        self._binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 10.0) -> None:
        args = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"{REDIS_SERVER} exited with {self.proc.returncode} on port {self.port}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        pytest.fail(f"{REDIS_SERVER} did not answer on port {self.port} within {timeout}s")
                    time.sleep(0.02)  # polling a process that is starting; no event to wait on
        finally:
            client.close()

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests that share it use their own room names."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def make_redis() -> Iterator[Callable[[], RedisServer]]:
    """Private redis-servers a test may stop and restart; all stopped after the test."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
