"""How long a Redis Cluster primary failing over interrupts wsapp's rooms, as a client sees it
(docs/SCALING.md, "A Cluster primary failing over").

    .venv/bin/python bench/failover.py                                  # the table in docs/SCALING.md
    .venv/bin/python bench/failover.py --node-timeouts 15000 --repeat 1 # Redis's default timeout

Each case starts a Cluster of 3 masters with a replica each (tests/redis_topologies.py, loopback,
no persistence) with the given `cluster-node-timeout` and `cluster-require-full-coverage`, one wsapp
process on it, and two closed-loop publishers (one message at a time, waiting for its ack, retrying
`unavailable` 20 ms later): one in a room on the master that fails, one in a room on another master.
Then the master is SIGKILLed (or handed over with `CLUSTER FAILOVER`). Reported: when the Cluster
named the replica (as polled from outside), the longest gap between two acks of each publisher (how
long publishes were refused; on a loaded machine a slow ack shows too), and how long `/healthz`
answered 503. Light load: this measures Redis's
failure detection and wsapp's reaction, not throughput.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.clients import connect, get_json, recv_json, send_json  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402
from tests.redis_topologies import RedisClusterProcs  # noqa: E402
from tests.test_redis_cluster import rooms_on  # noqa: E402


class Publisher(threading.Thread):
    """One message at a time into `room`; the time of each ack."""

    def __init__(self, srv: ServerProcess, room: str) -> None:
        super().__init__(daemon=True)
        self.ws = connect(srv.ws("/ws?name=bench"))
        recv_json(self.ws)
        send_json(self.ws, type="join", room=room)
        while recv_json(self.ws)["type"] != "joined":
            pass
        self.room = room
        self.acks: list[float] = []
        self.refused = 0  # `unavailable` answers (each retried 20 ms later)
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            send_json(self.ws, type="publish", room=self.room, data=n, id=n)
            while (reply := recv_json(self.ws)).get("id") != n:
                pass
            if reply["type"] == "ack":
                self.acks.append(time.monotonic())
            else:
                self.refused += 1
                self.stop.wait(0.02)
            n += 1

    def longest_gap(self, since: float) -> float:
        times = [t for t in self.acks if t >= since - 1]
        return max(b - a for a, b in itertools.pairwise(times))


def case(node_timeout_ms: int, full_coverage: bool, graceful: bool) -> dict[str, Any]:
    cluster = RedisClusterProcs(Path(tempfile.mkdtemp()), replicas=1, node_timeout_ms=node_timeout_ms,
                                full_coverage=full_coverage)
    srv = ServerProcess({"REDIS_URL": cluster.url, "WSAPP_REDIS_CLUSTER": "1", "WSAPP_RATE_LIMIT": "0"})
    try:
        masters = [n.port for n in cluster.nodes if n.client().info("replication")["role"] == "master"]
        failing = Publisher(srv, rooms_on(cluster, masters[0])[0])
        other = Publisher(srv, rooms_on(cluster, masters[1])[0])
        for publisher in (failing, other):
            publisher.start()
        while len(failing.acks) < 50 or len(other.acks) < 50:
            time.sleep(0.05)
        degraded: list[float] = []
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                if get_json(srv.http("/healthz"))[0] == 503:
                    degraded.append(time.monotonic())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.monotonic()
        if graceful:
            cluster.manual_failover(masters[0])
        else:
            replica, slot = cluster.kill_primary(masters[0])
            cluster.wait_promoted(replica, slot, timeout=120)
        promoted = time.monotonic()
        while not failing.acks or failing.acks[-1] < promoted + 0.5:
            time.sleep(0.05)
        time.sleep(1)
        watching.set()
        for publisher in (failing, other):
            publisher.stop.set()
            publisher.join(5)
        return {
            "node_timeout_ms": node_timeout_ms, "full_coverage": full_coverage,
            "fault": "CLUSTER FAILOVER" if graceful else "SIGKILL",
            "replica_named_s": round(promoted - start, 2),
            "room_refused_s": round(failing.longest_gap(start), 2),
            "other_shard_refused_s": round(other.longest_gap(start), 3),
            "other_shard_refusals": other.refused,
            "healthz_503_s": round(max(degraded) - min(degraded) + 0.02, 2) if degraded else 0.0,
        }
    finally:
        srv.stop()
        cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--node-timeouts", default="1000,2000,5000", help="cluster-node-timeout values (ms)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each case")
    p.add_argument("--no-graceful", action="store_true", help="skip the CLUSTER FAILOVER case")
    args = p.parse_args()
    cases = [(int(t), False, False) for t in args.node_timeouts.split(",")]
    cases.append((cases[0][0], True, False))  # Redis's default full coverage: every shard waits
    if not args.no_graceful:
        cases.append((cases[0][0], False, True))
    rows = [case(*c) for c in cases for _ in range(args.repeat)]
    for row in rows:
        print(json.dumps(row), flush=True)
    print("\n| fault | cluster-node-timeout | full coverage | replica named (s) "
          "| room: longest gap between acks (s) | other shard: longest gap (s) | other shard: refusals "
          "| /healthz 503 (s) |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['fault']} | {row['node_timeout_ms']} ms | {'yes' if row['full_coverage'] else 'no'} "
              f"| {row['replica_named_s']} | {row['room_refused_s']} | {row['other_shard_refused_s']} "
              f"| {row['other_shard_refusals']} | {row['healthz_503_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
