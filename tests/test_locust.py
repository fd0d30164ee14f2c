"""Locust headless smoke tests: locustfile.py drives a real server and reports what it measured."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import ROOT, ServerProcess

USERS = 20
ROOM_SIZE = 5
PUBLISHER_SHARE = 0.2  # one publisher per room of 5
LOCUST_TIMEOUT_SECONDS = 45  # hard cap on one locust subprocess; a run takes about 6 s


def locust_command(server: ServerProcess, csv_prefix: Path, mode: str, run_time: str = "4s") -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"),
        "--headless", "-u", str(USERS), "-r", str(USERS), "-t", run_time,
        "--host", server.http(), "--csv", str(csv_prefix), "--only-summary",
        "--mode", mode, "--room-size", str(ROOM_SIZE), "--publisher-share", str(PUBLISHER_SHARE),
        "--publish-rate", "5", "--payload-bytes", "100",
    ]


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def count(row: dict[str, str], column: str = "Request Count") -> int:
    return int(row[column])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["rooms", "relay"])
def test_headless_run_reports_deliveries(
    make_server: Callable[..., ServerProcess], tmp_path: Path, mode: str
) -> None:
    server = make_server(WSAPP_RATE_LIMIT="0")
    prefix = tmp_path / "out"
    result = subprocess.run(locust_command(server, prefix, mode), cwd=ROOT, capture_output=True, text=True,
                            timeout=LOCUST_TIMEOUT_SECONDS)
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


@pytest.mark.timeout(90)
def test_server_shutdown_is_reported_as_unexpected_close_with_code(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = make_server(WSAPP_RATE_LIMIT="0", WSAPP_DRAIN_SECONDS="1")
    prefix = tmp_path / "out"
    locust = subprocess.Popen(locust_command(server, prefix, "rooms", run_time="5s"), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Locust rewrites the stats CSV every second; wait until every user has joined its room.
        stats = Path(f"{prefix}_stats.csv")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            join = read_rows(stats).get("join") if stats.exists() else None
            if join is not None and count(join) == USERS:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the users did not all join within 20 s")
        server.terminate()
        server.wait(15)
        _, stderr = locust.communicate(timeout=LOCUST_TIMEOUT_SECONDS)
    finally:
        if locust.poll() is None:
            locust.kill()
            locust.wait(5)

    assert locust.returncode == 1, stderr[-4000:]
    failures = list(csv.DictReader(Path(f"{prefix}_failures.csv").open(newline="")))
    closes = [row for row in failures if row["Name"] == "unexpected close"]
    assert closes, failures
    # The server says "going away" (1001) to every client when it drains.
    assert sum(int(row["Occurrences"]) for row in closes if "close code 1001" in row["Error"]) == USERS
    assert f"unexpected closes {USERS}" in stderr
