"""Scale-out benchmark (docs/SCALING.md): wsapp over Redis against wsapp in-process, in one run.

    .venv/bin/python bench/scaling.py                         # every part, about 4 minutes
    .venv/bin/python bench/scaling.py --parts broker          # rooms and relay, 10 senders into 100 clients
    .venv/bin/python bench/scaling.py --parts small           # 2,000 rooms of 2, every client publishing
    .venv/bin/python bench/scaling.py --parts processes --processes 1,2,4
    .venv/bin/python bench/scaling.py --parts small --brokers redis --baseline ../main   # before/after

Placement on this 2-core machine: wsapp (every process of a multi-process run) on core 0, the Node
load generator (bench/loadgen.js) on core 1, and a private redis-server (no persistence, flushed
before each run) on `--redis-core` (default 1: a broker is another machine's work, not the server's;
it then shares the load generator's core, so the `limit` column says which core was full).
Variants alternate within each repeat so background load falls on all alike; the table keeps the
median of `--repeat` runs. CPU per message counts every wsapp process (user + system) and Redis's own
(/proc, the same as INFO cpu) over the measured window. Writes bench/results/scaling.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # bench/run.py: server start-up, driving the load generator, derived figures)

RESULTS = base.RESULTS


@dataclasses.dataclass(frozen=True)
class Setup:
    """One measured configuration: a load shape, a protocol, and where rooms live."""

    part: str
    case: str
    mode: str  # relay | rooms
    broker: str  # memory | redis
    processes: int = 1
    clients: int = 100
    senders: int = 10
    rooms: int = 1
    window: int = 1
    tree: Path | None = None  # --baseline: the other checkout whose server.py runs (None: this one)

    @property
    def label(self) -> str:
        where = "in-process" if self.broker == "memory" else "Redis"
        procs = f", {self.processes} processes" if self.processes > 1 else ""
        return f"{self.mode} {where}{procs}{' (baseline)' if self.tree is not None else ''}"


class RedisServer:
    """A private redis-server pinned to one core; its CPU read from /proc."""

    def __init__(self, core: int, workdir: Path) -> None:
        self.port = base.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench: needs redis-server (Debian's redis-server package)")
        self.proc = subprocess.Popen(
            base.pinned(core, [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(workdir)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        self.client = redis.Redis(port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)  # a process starting up: nothing to wait on but its port

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


class Servers:
    """One or more wsapp processes (each its own port, all pinned to the server core), seen as one
    server by bench/run.py's `drive`: CPU and RSS are their sums. Redis's CPU is read at the same
    moments (drive marks the servers' CPU when the opening starts, when every client is ready, and
    exactly at window start and end)."""

    def __init__(self, setup: Setup, raw: Path, tag: str, env: dict[str, str], redis_server: RedisServer | None):
        variant = base.Variant("wsapp", "wsapp", setup.mode, "/" if setup.mode == "relay" else "/ws",
                               setup.tree or base.ROOT)
        self.servers = [base.Server(variant, raw / f"{tag}-p{i}.server.log", env) for i in range(setup.processes)]
        self.redis = redis_server
        self.redis_marks: list[float] = []

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.servers[0].proc

    def wait_listening(self) -> None:
        for server in self.servers:
            server.wait_listening()

    def cpu_seconds(self) -> float:
        if self.redis is not None:
            self.redis_marks.append(self.redis.cpu_seconds())
        return sum(server.cpu_seconds() for server in self.servers)

    def rss(self) -> int:
        return sum(server.rss() for server in self.servers)

    def broker_messages_in(self) -> int:
        total = 0
        for server in self.servers:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/stats", timeout=5) as resp:
                total += int(json.load(resp).get("broker_messages_in", 0))
        return total

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def run_setup(setup: Setup, args: argparse.Namespace, raw: Path, rep: int, redis_server: RedisServer) -> dict[str, Any]:
    which = "-baseline" if setup.tree is not None else ""
    tag = f"{setup.part}-{setup.case}-{setup.mode}-{setup.broker}-{setup.processes}{which}-{rep + 1}"
    row: dict[str, Any] = {**dataclasses.asdict(setup), "label": setup.label, "baseline": setup.tree is not None}
    env = dict(args.wsapp_env)
    if setup.broker == "redis":
        redis_server.client.flushall()
        env["REDIS_URL"] = redis_server.url
    servers = Servers(setup, raw, tag, env, redis_server if setup.broker == "redis" else None)
    loadgen = None
    try:
        servers.wait_listening()
        row["rss_idle"] = servers.rss()
        path = "/" if setup.mode == "relay" else "/ws"
        urls = [f"ws://127.0.0.1:{s.port}{path}" for s in servers.servers]
        spec = {
            "url": urls[0], "urls": urls, "mode": setup.mode, "clients": setup.clients, "senders": setup.senders,
            "rooms": setup.rooms, "pattern": "closed", "window": setup.window, "rate": 1,
            "payloadBytes": args.payload, "warmupSeconds": args.warmup, "durationSeconds": args.duration,
            "drainSeconds": args.drain, "client": "raw", "setupTimeoutSeconds": 120,
        }
        in0 = servers.broker_messages_in() if setup.broker == "redis" else 0
        # drive() reports the opening (connects) from this mark: the servers' CPU and the cores' busy time.
        before = base.mark(servers)
        with open(raw / f"{tag}.loadgen.log", "wb") as lg_log:
            loadgen = subprocess.Popen(
                base.pinned(base.LOADGEN_CORE, ["node", str(base.BENCH / "loadgen.js"), json.dumps(spec)]),
                cwd=base.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=lg_log,
                preexec_fn=base.raise_fd_limit)
            row.update(base.drive(loadgen, servers, spec, args, before))  # type: ignore[arg-type]
        if setup.broker == "redis":
            row["broker_messages_in"] = servers.broker_messages_in() - in0
        if len(servers.redis_marks) >= 4:
            # Marks: the opening's start, ready, window start, window end (drive() samples at each).
            row["redis_cpu_s"] = servers.redis_marks[3] - servers.redis_marks[2]
    except Exception as exc:  # a failed run is a result too
        row["error"] = str(exc)
    finally:
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        servers.stop()
    base.derive(row)
    lg = row.get("loadgen") or {}
    if lg.get("ok"):
        messages = lg["messagesPerSec"] * lg["windowSeconds"]
        row["messages_per_s"] = lg["messagesPerSec"]
        row["server_us_per_message"] = 1e6 * row["server_cpu_s"] / messages if messages else None
        if "redis_cpu_s" in row:
            row["redis_us_per_message"] = 1e6 * row["redis_cpu_s"] / messages if messages else None
            row["redis_cpu_pct"] = 100 * row["redis_cpu_s"] / row["wall_s"]
    return row


def setups(args: argparse.Namespace) -> list[list[Setup]]:
    """Groups of setups compared within one repeat (alternating); with --baseline each setup is
    followed by the same one served from the other checkout."""
    groups = []
    parts = args.parts.split(",")
    brokers = [b for b in ("memory", "redis") if b in args.brokers.split(",")]
    if "broker" in parts:
        groups.append([Setup("broker", "c100-s10", mode, broker)
                       for mode in ("rooms", "relay") for broker in brokers])
    small = dict(clients=args.small_rooms * 2, senders=args.small_rooms * 2, rooms=args.small_rooms)
    if "small" in parts:
        groups.append([Setup("small", f"rooms{args.small_rooms}x2", "rooms", broker, **small)  # type: ignore[arg-type]
                       for broker in brokers])
    if "processes" in parts:
        counts = [int(n) for n in args.processes.split(",")]
        groups.append([Setup("processes", f"rooms{args.small_rooms}x2", "rooms", "redis", n, **small)  # type: ignore[arg-type]
                       for n in counts])
        groups.append([Setup("processes", "c100-s10", "rooms", "redis", n) for n in counts])
    if args.baseline:
        tree = args.baseline.resolve()
        groups = [[s for setup in group for s in (setup, dataclasses.replace(setup, tree=tree))] for group in groups]
    return groups


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    bad = [r for r in runs if "error" in r or r.get("lost")]
    chosen = dict(bad[0] if bad else sorted(runs, key=lambda r: r.get("messages_per_s") or 0)[(len(runs) - 1) // 2])
    chosen["repeats"] = [{k: r.get(k) for k in ("messages_per_s", "deliveries_per_s", "server_us_per_message",
                                                "redis_us_per_message", "lost", "error")} for r in runs]
    return chosen


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    baseline = f"; baseline {meta['baseline']}, each run right after the same one here" if meta.get("baseline") else ""
    out = [f"# wsapp scale-out benchmark ({meta['started']}, commit {meta['commit']})", "",
           f"{meta['cpu']}, {meta['cores']} cores; wsapp on core {base.SERVER_CORE}, load generator on core "
           f"{base.LOADGEN_CORE}, Redis on core {meta['redis_core']}; {meta['duration']} s windows, median of "
           f"{meta['repeat']}; load average before {' '.join(meta['loadavg_before'])}, after "
           f"{' '.join(meta['loadavg_after'])}{baseline}; "
           f"{base.host_speed.describe(meta.get('host_before'), meta.get('host_after'))}.",
           "",
           "| case | setup | messages/s | deliveries/s | p50 / p99 ms | lost | wsapp CPU µs/message | "
           "Redis CPU µs/message | Redis CPU % | broker messages in per message sent | core 0 / core 1 busy % "
           "(load generator %) | limit | runs (messages/s) | runs (wsapp CPU µs/message) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | {r['label']} | error: {r['error']} |||||||||||||")
            continue
        lg = r["loadgen"]
        # Over the whole run (joins' presence events included) per message sent.
        per_in = (r["broker_messages_in"] / lg["sent"]
                  if r.get("broker_messages_in") is not None and lg["sent"] else None)
        runs = ", ".join(f"{x['messages_per_s']:,.0f}" for x in r["repeats"] if x.get("messages_per_s"))
        cpu_runs = ", ".join(base.fmt(x.get("server_us_per_message"), 1) for x in r["repeats"]
                             if x.get("messages_per_s"))
        # Which core waited on what: with Redis on the load generator's core, neither at 90 % ("turnaround")
        # can still mean that core's two tenants together are near full.
        busy = {str(core): pct for core, pct in (r.get("core_busy_pct") or {}).items()}  # int keys until saved
        cores = (f"{base.fmt(busy.get(str(base.SERVER_CORE)), 0)} / {base.fmt(busy.get(str(base.LOADGEN_CORE)), 0)} "
                 f"({base.fmt(r.get('loadgen_cpu_pct'), 0)})")
        out.append(
            f"| {r['case']} | {r['label']} | {r['messages_per_s']:,.0f} | {r['deliveries_per_s']:,.0f} | "
            f"{base.fmt(r['p50_ms'], 2)} / {base.fmt(r['p99_ms'], 2)} | {r['lost']} | "
            f"{base.fmt(r.get('server_us_per_message'), 1)} | {base.fmt(r.get('redis_us_per_message'), 1)} | "
            f"{base.fmt(r.get('redis_cpu_pct'), 0)} | {base.fmt(per_in, 2)} | {cores} | {r['limit']} | {runs} | "
            f"{cpu_runs} |")
    by = {(r["part"], r["case"], r["mode"], r["broker"], r["processes"], r.get("baseline", False)): r for r in rows}
    lines = []
    for (part, case, mode, broker, procs, baseline), r in by.items():
        mem = by.get((part, case, mode, "memory", procs, baseline))
        which = " (baseline)" if baseline else ""
        if broker == "redis" and mem and r.get("messages_per_s") and mem.get("messages_per_s"):
            lines.append(f"- {case} {mode}{which}: Redis ÷ in-process = "
                         f"{r['messages_per_s'] / mem['messages_per_s']:.2f}x messages/s{per_run(r, mem)}")
        old = by.get((part, case, mode, broker, procs, True))
        if not baseline and old and r.get("server_us_per_message") and old.get("server_us_per_message"):
            lines.append(f"- {case} {mode} {broker}, {procs} process(es): this checkout ÷ baseline = "
                         f"{r['messages_per_s'] / old['messages_per_s']:.2f}x messages/s, "
                         f"{r['server_us_per_message'] / old['server_us_per_message']:.2f}x wsapp CPU per message")
    if lines:
        out += ["", *lines]
    return "\n".join(out) + "\n"


def per_run(r: dict[str, Any], other: dict[str, Any]) -> str:
    """Each run's messages/s ÷ the other setup's run of the same repeat (`run.run_ratios`): median
    and range."""
    vals = sorted(base.run_ratios(r.get("repeats") or [], other.get("repeats") or [], "messages_per_s"))
    if len(vals) < 2:
        return ""
    return f" (run by run: median {statistics.median(vals):.2f}x, {vals[0]:.2f}-{vals[-1]:.2f}x)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="broker,small,processes")
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--small-rooms", type=int, default=2000, help="rooms of 2 in the small-rooms case")
    p.add_argument("--redis-core", type=int, default=base.LOADGEN_CORE)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=3.0)
    p.add_argument("--payload", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--brokers", default="memory,redis", help="in-process (memory) and/or redis")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also run every setup from this other checkout, taking turns with this one")
    p.add_argument("--wsapp-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.wsapp_env = {**base.WSAPP_ENV, **dict(kv.split("=", 1) for kv in args.wsapp_env)}
    os.sched_setaffinity(0, {base.LOADGEN_CORE})
    meta = base.metadata(argparse.Namespace(duration=args.duration, warmup=args.warmup, payload=args.payload,
                                            repeat=args.repeat, client="raw", wsapp_env=args.wsapp_env,
                                            baseline=args.baseline))
    meta["redis_core"] = args.redis_core
    raw = args.out / "raw" / ("scaling-" + time.strftime("%Y%m%d-%H%M%S"))
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        redis_server = RedisServer(args.redis_core, Path(workdir))
        try:
            for group in setups(args):
                runs: dict[Setup, list[dict[str, Any]]] = {s: [] for s in group}
                for rep in range(args.repeat):
                    for setup in group:
                        t = time.monotonic()
                        row = run_setup(setup, args, raw, rep, redis_server)
                        runs[setup].append(row)
                        print(f"bench: {setup.case:14} {setup.label:28} {time.monotonic() - t:5.1f} s  "
                              f"{row.get('messages_per_s', 0):,.0f} messages/s, wsapp "
                              f"{base.fmt(row.get('server_us_per_message'), 1)} µs/msg, Redis "
                              f"{base.fmt(row.get('redis_us_per_message'), 1)} µs/msg, lost {row.get('lost')}, "
                              f"limit {row.get('limit')} {row.get('error', '')}", file=sys.stderr)
                rows += [median(runs[s]) for s in group]
        finally:
            redis_server.stop()
    meta["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    meta["host_after"] = base.host_speed.measure()
    table = markdown(meta, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")
    (args.out / "scaling.md").write_text(table)
    print(table)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
