"""Locust headless smoke tests: locustfile.py drives a real server and reports what it measured."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, ServerProcess

USERS = 20
ROOM_SIZE = 5
PUBLISHER_SHARE = 0.2  # one publisher per room of 5
LOCUST_TIMEOUT_SECONDS = 45  # hard cap on one locust subprocess; a run takes about 6 s


def locust_command(server: ServerProcess, csv_prefix: Path, mode: str, run_time: str = "4s") -> list[str]:
    options = (
        f"--headless -u {USERS} -r {USERS} -t {run_time} --only-summary --mode {mode} --room-size {ROOM_SIZE}"
        f" --publisher-share {PUBLISHER_SHARE} --publish-rate 5 --payload-bytes 100"
    )
    files = ["-f", str(ROOT / "locustfile.py"), "--csv", str(csv_prefix)]
    return [sys.executable, "-m", "locust", *files, "--host", server.http(), *options.split()]


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def server_stats(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(server.http("/stats"), timeout=5) as response:
        return json.load(response)


def count(row: dict[str, str], column: str = "Request Count") -> int:
    return int(row[column])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["rooms", "relay"])
def test_headless_run_reports_deliveries(make_server: Callable[..., ServerProcess], tmp_path: Path, mode: str) -> None:
    server = make_server(WSAPP_RATE_LIMIT="0")
    prefix = tmp_path / "out"
    result = subprocess.run(
        locust_command(server, prefix, mode),
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=LOCUST_TIMEOUT_SECONDS,
    )
    # Locust exits 1 when any request failed, so 0 also means no error frames and no unexpected closes.
    assert result.returncode == 0, result.stderr[-4000:]

    rows = read_rows(Path(f"{prefix}_stats.csv"))
    deliver, publish, connect = rows[f"deliver {mode}"], rows[f"publish {mode}"], rows["connect"]
    assert count(connect) == USERS and count(connect, "Failure Count") == 0
    if mode == "rooms":
        assert count(rows["join"]) == USERS and count(rows["join"], "Failure Count") == 0
    assert count(deliver) > 0 and count(deliver, "Failure Count") == 0
    assert count(publish) > 0 and count(publish, "Failure Count") == 0
    assert not {"error frame", "bad frame", "unexpected close"} & rows.keys()

    # Every publish fans out to the other members (rooms) or to every other client (relay). Members
    # still joining when the first messages go out miss them, hence the lower bound of half.
    fan_out = ROOM_SIZE - 1 if mode == "rooms" else USERS - 1
    published = count(publish)
    assert published * fan_out // 2 <= count(deliver) <= (published + 1) * fan_out
    # Fan-out latency is receive time minus send time on one clock: small and never negative.
    assert 0 <= float(deliver["Min Response Time"]) <= float(deliver["Median Response Time"]) < 1000

    assert "wsapp load summary" in result.stderr
    assert f"deliver {mode}: " in result.stderr
    assert "unexpected closes 0" in result.stderr

    # The users closed their sockets properly when the run ended: the server holds none and saw no
    # protocol errors. Its close bookkeeping may trail Locust's exit by a moment.
    deadline = time.monotonic() + 5
    while (stats := server_stats(server))["connections"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["connections"] == 0, stats
    assert stats["protocol_errors"] == 0, stats


class LineWatcher:
    """Collects a subprocess's output on a thread and signals when a line matches."""

    def __init__(self, proc: subprocess.Popen[str], pattern: str) -> None:
        self.lines: list[str] = []
        self.matched = threading.Event()
        self._pattern = re.compile(pattern)
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line)
            if self._pattern.search(line):
                self.matched.set()

    def text(self) -> str:
        """Everything the process wrote; call after it exited."""
        self._thread.join(5)
        assert self._proc.stdout is not None
        self._proc.stdout.close()
        return "".join(self.lines)


@pytest.mark.timeout(90)
def test_server_shutdown_is_reported_as_unexpected_close_with_code(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = make_server(WSAPP_RATE_LIMIT="0", WSAPP_DRAIN_SECONDS="1")
    prefix = tmp_path / "out"
    command = [arg for arg in locust_command(server, prefix, "rooms", run_time="6s") if arg != "--only-summary"]
    locust = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Headless Locust prints its stats table every 2 s; wait for the row showing every user joined.
        output = LineWatcher(locust, rf"WS\s+join\s+{USERS}\s+0\(")
        assert output.matched.wait(20), "".join(output.lines)[-4000:]
        server.terminate()
        server.wait(15)
        locust.wait(LOCUST_TIMEOUT_SECONDS)
    finally:
        if locust.poll() is None:
            locust.kill()
            locust.wait(5)
    log = output.text()

    assert locust.returncode == 1, log[-4000:]
    with Path(f"{prefix}_failures.csv").open(newline="") as handle:
        closes = [row for row in csv.DictReader(handle) if row["Name"] == "unexpected close"]
    # The server says "going away" (1001) to every client when it drains.
    assert sum(int(row["Occurrences"]) for row in closes if "close code 1001" in row["Error"]) == USERS, closes
    assert f"unexpected closes {USERS}" in log
