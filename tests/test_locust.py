"""Locust headless smoke tests: locustfile.py drives a real server and reports what it measured."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
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


def run_locust(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_SECONDS,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(90)
def test_distributed_master_with_two_workers(make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """`--master` and two `--worker`s, headless: the workers share the users, the master sums their
    figures and writes the report, and every process stops by itself when the run time is up."""
    server = make_server(WSAPP_RATE_LIMIT="0")
    prefix, report = tmp_path / "out", tmp_path / "report.html"
    port = free_port()
    master_cmd = [
        *locust_command(server, prefix, "rooms"),
        "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
        "--expect-workers", "2", "--expect-workers-max-wait", "20", "--exit-code-on-error", "1",
        "--html", str(report),
    ]
    worker_cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--worker",
        "--master-host", "127.0.0.1", "--master-port", str(port),
    ]
    master = subprocess.Popen(master_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = [
        subprocess.Popen(worker_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs: list[str] = []
    try:
        for proc in (master, *workers):
            out, _ = proc.communicate(timeout=LOCUST_TIMEOUT_SECONDS)
            outputs.append(out)
    finally:
        for proc in (master, *workers):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    master_log = outputs[0]
    assert master.returncode == 0, master_log[-4000:]
    assert [w.returncode for w in workers] == [0, 0], [o[-2000:] for o in outputs[1:]]

    rows = read_rows(Path(f"{prefix}_stats.csv"))
    assert count(rows["connect"]) == USERS and count(rows["connect"], "Failure Count") == 0
    assert count(rows["join"]) == USERS and count(rows["join"], "Failure Count") == 0
    assert count(rows["deliver rooms"]) > 0 and count(rows["publish rooms"]) > 0
    assert count(rows["Aggregated"], "Failure Count") == 0
    # The master prints the summary of all workers' figures once their last reports are in.
    assert "wsapp load summary" in master_log and "unexpected closes 0" in master_log
    # Both workers ran users: each numbers its rooms apart (load-w0-*, load-w1-*), and the server saw both.
    assert re.search(r"Worker .* connected", master_log) or "workers connected" in master_log.lower()
    html = report.read_text()
    assert "deliver rooms" in html and "<html" in html.lower()
    deadline = time.monotonic() + 5
    while (stats := server_stats(server))["connections"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["connections"] == 0 and stats["protocol_errors"] == 0, stats


def reconnect_rows(rows: dict[str, dict[str, str]]) -> None:
    """No failure of any kind: every seq of every room seen once, in order, by every member."""
    assert count(rows["Aggregated"], "Failure Count") == 0, {n: r["Failure Count"] for n, r in rows.items()}
    assert not {"gap", "repeat", "error frame", "bad frame", "unexpected close"} & rows.keys(), rows.keys()


@pytest.mark.timeout(90)
def test_users_that_come_back_resume_with_since_and_miss_nothing(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """--reconnect-interval: users close, stay away while the others publish, come back with since and
    epoch, and get what they missed as replay ("recover rooms"), then the live messages, no seq missed."""
    server = make_server(WSAPP_RATE_LIMIT="0")
    prefix = tmp_path / "out"
    command = [*locust_command(server, prefix, "rooms", run_time="5s"),
               "--reconnect-interval", "1", "--offline-seconds", "0.5"]
    result = run_locust(command)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_rows(Path(f"{prefix}_stats.csv"))
    reconnect_rows(rows)
    assert count(rows["reconnect"]) >= USERS  # each user came back at least once in 5 s
    assert count(rows["recover rooms"]) > 0
    assert count(rows["deliver rooms"]) > 0
    assert "recovered" in result.stderr


@pytest.mark.timeout(120)
@pytest.mark.redis
def test_reconnecting_users_recover_after_a_restart(make_redis: Callable[[], Any], tmp_path: Path) -> None:
    """--reconnect: the server restarts under the load (SIGTERM, then a new one on the same port and
    Redis); every user reconnects, rejoins with since and epoch, and misses no message of its room."""
    redis = make_redis()
    port = free_port()
    env = {"WSAPP_RATE_LIMIT": "0", "WSAPP_DRAIN_SECONDS": "1", "REDIS_URL": redis.url, "PORT": str(port)}
    server = ServerProcess(env)
    replacement: ServerProcess | None = None
    prefix = tmp_path / "out"
    command = [arg for arg in locust_command(server, prefix, "rooms", run_time="9s") if arg != "--only-summary"]
    locust = subprocess.Popen([*command, "--reconnect"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        output = LineWatcher(locust, rf"WS\s+join\s+{USERS}\s+0\(")
        assert output.matched.wait(20), "".join(output.lines)[-4000:]
        server.terminate()
        assert server.wait(15) == 0
        replacement = ServerProcess(env)
        locust.wait(LOCUST_TIMEOUT_SECONDS)
    finally:
        if locust.poll() is None:
            locust.kill()
            locust.wait(5)
        server.stop()
        if replacement is not None:
            replacement.stop()
    log = output.text()
    assert locust.returncode == 0, log[-4000:]
    rows = read_rows(Path(f"{prefix}_stats.csv"))
    reconnect_rows(rows)
    # Every user was told 1001 by the drain, and came back (the summary has the final figures).
    assert f"reconnects {USERS} (0 gave up" in log and f"server closes {USERS}," in log, log[-3000:]
    # Redis kept the rooms' numbers and history: no new epoch, so nothing was lost to history_gone.
    assert "history gone" not in rows
    assert count(rows["deliver rooms"]) > 0


def mint(secret: str, sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, secret, algorithm="HS256")


@pytest.mark.timeout(120)
def test_token_options_against_a_server_with_authentication(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    secret = "s" * 40
    server = make_server(WSAPP_RATE_LIMIT="0", WSAPP_JWT_SECRET=secret)

    # Each user mints its own token from the secret (here from the environment), sent as a subprotocol.
    minted = run_locust(locust_command(server, tmp_path / "minted", "rooms", run_time="3s"),
                        env={"LOCUST_WSAPP_JWT_SECRET": secret})
    assert minted.returncode == 0, minted.stderr[-4000:]
    rows = read_rows(tmp_path / "minted_stats.csv")
    assert count(rows["connect"]) == USERS and count(rows["deliver rooms"]) > 0
    assert count(rows["Aggregated"], "Failure Count") == 0

    # One given token for every user, in the query string.
    given = run_locust([*locust_command(server, tmp_path / "given", "rooms", run_time="3s"),
                        "--token", mint(secret, "loadtest"), "--token-in", "query"])
    assert given.returncode == 0, given.stderr[-4000:]
    rows = read_rows(tmp_path / "given_stats.csv")
    assert count(rows["connect"]) == USERS and count(rows["deliver rooms"]) > 0

    # Without a token every handshake is refused before the 101.
    # (The final figures are in the summary: the CSV files are rewritten once a second and can trail.)
    refused = run_locust(locust_command(server, tmp_path / "none", "rooms", run_time="2s"))
    assert refused.returncode == 1
    assert f"connects {USERS} ({USERS} failed)" in refused.stderr, refused.stderr[-4000:]
    failures = re.findall(r"^\s*(\d+)\s+WS connect: (.*)$", refused.stderr, re.MULTILINE)
    assert sum(int(n) for n, _ in failures) == USERS and all("401" in error for _, error in failures), failures
