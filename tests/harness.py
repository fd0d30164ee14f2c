"""Start the real server (`python server.py`, or another command) on an ephemeral loopback port and stop it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LISTEN_RE = re.compile(r"listening on https?://[^:]+:(\d+)")


class ServerProcess:
    """A `python server.py` child process bound to 127.0.0.1 on a port the kernel picks.

    `cmd` runs another command line instead (say, gunicorn, or `python -m wsapp` from an installed
    wheel), in `cwd` if given: it must bind 127.0.0.1:0 and log wsapp's "listening on" line. An `env`
    value of None removes that variable. With `capture_stdout`, stdout lines are kept in `stdout`
    (else stdout is discarded).
    """

    def __init__(
        self,
        env: Mapping[str, str | None] | None = None,
        startup_timeout: float = 15.0,
        cmd: list[str] | None = None,
        cwd: Path | None = None,
        capture_stdout: bool = False,
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("WSAPP_")}
        full_env.pop("REDIS_URL", None)
        full_env.update({"PORT": "0", "HOST": "127.0.0.1", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self.proc = subprocess.Popen(
            cmd or [sys.executable, str(ROOT / "server.py")],
            cwd=cwd or ROOT,
            env=full_env,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.stdout: list[str] = []
        self._out_reader: threading.Thread | None = None
        if capture_stdout:
            self._out_reader = threading.Thread(target=self._read_stdout, daemon=True)
            self._out_reader.start()
        self._port_found = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._port_found.wait(startup_timeout):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            match = _LISTEN_RE.search(line)
            if match and not self._port_found.is_set():
                self.port = int(match.group(1))
                self._port_found.set()
        self._port_found.set()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)

    def http(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def terminate(self) -> None:
        """Send SIGTERM (graceful drain) without waiting."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self._out_reader is not None:
            self._out_reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_text(self) -> str:
        return "".join(self.log)


@contextlib.contextmanager
def server_pair(env: dict[str, str]) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers with the same environment (say, one REDIS_URL), both stopped afterwards."""
    a = ServerProcess(env)
    try:
        b = ServerProcess(env)
    except Exception:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
