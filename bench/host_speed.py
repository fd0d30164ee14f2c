"""How fast the host is right now: two figures printed beside every benchmark run, so runs taken at
different times can be told apart (this VM has run at two speeds within a day, and the syscall and
wake-up path moved by 2.5x while plain Python code did not move at all).

    .venv/bin/python bench/host_speed.py

- `loop_ms`: a plain Python loop of 1,000,000 additions on the server's core (CPU speed);
- `rtt_us`: the median of 2,000 round trips of 64 bytes over loopback TCP between a process on the
  server's core and one on the load generator's core (the path every delivery takes: a `send`, the
  kernel's loopback, a wake-up of the other core, a `recv`).

Compare benchmark figures across runs only when these agree; within one run, compare ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

SERVER_CORE, LOADGEN_CORE = 0, 1
ROUND_TRIPS = 2000

_ECHO = """
import os, socket, sys
os.sched_setaffinity(0, {%d})
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    data = sock.recv(64)
    if not data:
        break
    sock.sendall(data)
"""


def _pinned(core: int) -> set[int]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    return before


def loop_ms() -> float:
    """Best of 3: milliseconds for a Python loop of a million additions on the server's core."""
    before = _pinned(SERVER_CORE)
    try:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            total = 0
            for i in range(1_000_000):
                total += i
            best = min(best, time.perf_counter() - started)
        return round(best * 1000, 1)
    finally:
        os.sched_setaffinity(0, before)


def rtt_us() -> float:
    """Median microseconds of a 64-byte round trip over loopback TCP, server's core to the load
    generator's core and back (an echo process there)."""
    before = _pinned(SERVER_CORE)
    listener = socket.create_server(("127.0.0.1", 0))
    echo = subprocess.Popen([sys.executable, "-c", _ECHO % LOADGEN_CORE, str(listener.getsockname()[1])])
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()
        conn.settimeout(10)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = b"x" * 64
        times = []
        for _ in range(ROUND_TRIPS + 200):  # the first 200 warm up
            started = time.perf_counter()
            conn.sendall(payload)
            got = 0
            while got < len(payload):
                chunk = conn.recv(64 - got)
                if not chunk:
                    raise RuntimeError("the echo process went away")
                got += len(chunk)
            times.append(time.perf_counter() - started)
        conn.close()
        return round(statistics.median(times[200:]) * 1e6, 1)
    finally:
        listener.close()
        try:
            echo.wait(timeout=5)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait()
        os.sched_setaffinity(0, before)


def measure() -> dict[str, float]:
    return {"loop_ms": loop_ms(), "rtt_us": rtt_us()}


def describe(before: dict[str, float] | None, after: dict[str, float] | None) -> str:
    """One sentence for a results file's header."""
    def one(figures: dict[str, float] | None) -> str:
        if not figures:
            return "not measured"
        return f"loop {figures['loop_ms']} ms, round trip {figures['rtt_us']} µs"
    return f"host speed (bench/host_speed.py) before: {one(before)}; after: {one(after)}"


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(measure())
