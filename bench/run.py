"""Benchmark wsapp against the Node `ws` reference broadcast server, in one run.

    .venv/bin/python bench/run.py                  # everything, about 7 minutes
    .venv/bin/python bench/run.py --servers node   # the reference alone
    .venv/bin/python bench/run.py --cases c100-s1,idle-10k --duration 3
    .venv/bin/python bench/run.py --cases burst             # the flow-control burst alone
    .venv/bin/python bench/run.py --cases deflate           # the permessage-deflate cases alone

Each (case, server) pair gets a fresh server pinned to core 0 and the same Node load generator
(bench/loadgen.js; bench/burst.js for the burst case) pinned to core 1. Needs `npm ci --prefix bench/node` and
`.venv/bin/pip install -r requirements-dev.txt -r bench/requirements.txt`.
Writes bench/results/latest.json, bench/results/latest.md, docs/perf-chart.png and, per run, the
server and load generator logs under bench/results/raw/<timestamp>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_speed  # bench/host_speed.py, next to this file

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
CHART = ROOT / "docs" / "perf-chart.png"
SERVER_CORE = 0
LOADGEN_CORE = 1
FD_LIMIT = 65536
# A core this busy over the window (its process plus the kernel's interrupt work on it) is the limit.
BUSY_PCT = 90.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One load shape; `window` is per sender (closed loop), `rate` is msgs/s in all (open loop)."""

    name: str
    description: str
    clients: int
    senders: int = 1
    pattern: str = "closed"
    window: int = 4
    rate: int = 0
    # permessage-deflate cases: clients offer it (the `ws` client, which inflates), the reference
    # server runs with it on, messages are `payload_bytes` of JSON-like text (0: --payload, padded).
    deflate: bool = False
    payload_bytes: int = 0
    client: str = ""  # "" : --client

    @property
    def json_payload(self) -> bool:
        return self.payload_bytes > 0
    payload: int | None = None  # bytes per relay message; None: --payload

    @property
    def idle(self) -> bool:
        return self.pattern == "idle"

    @property
    def connect(self) -> bool:
        return self.pattern == "connect"

    @property
    def burst(self) -> bool:
        return self.pattern == "burst"

    @property
    def title(self) -> str:
        size = f", {self.payload:,} B" if self.payload else ""
        if self.pattern != "closed" or self.deflate:
            return self.description + size
        return f"{self.description}{size}, window {self.window}{' per sender' if self.senders > 1 else ''}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A server and the protocol the load generator speaks to it."""

    name: str
    server: str  # node | wsapp
    mode: str  # relay | rooms
    path: str
    tree: Path = ROOT  # the checkout whose server.py runs (--baseline: another one, for before/after)


# Closed-loop windows are small on purpose (the "as fast as deliveries complete"): wsapp
# coalesces whatever is queued for a client into one write, so its throughput keeps climbing with the
# window while Node's `ws` writes each frame on its own. `--window N` reruns them with another window.
CASES = [
    Case("c100-s1", "100 clients, 1 sender, closed loop", clients=100, window=4),
    Case("c1000-s1", "1,000 clients, 1 sender, closed loop", clients=1000, window=4),
    Case("c100-s10", "100 clients, 10 senders, closed loop", clients=100, senders=10, window=1),
    Case("c100-open200", "100 clients, 1 sender, open loop 200 msg/s", clients=100, pattern="open", rate=200),
    # Issue 13: one message in flight at a time, where turnaround (not throughput) sets the pace and
    # the first recipients should not wait for the whole fan-out.
    Case("c100-s1-w1", "100 clients, 1 sender, closed loop", clients=100, window=1),
    Case("c1000-s1-w1", "1,000 clients, 1 sender, closed loop", clients=1000, window=1),
    Case("c10-s1-w1-4k", "10 clients, 1 sender, closed loop", clients=10, window=1, payload=4096),
    Case("c100-open500", "100 clients, 1 sender, open loop 500 msg/s", clients=100, pattern="open", rate=500),
    Case("idle-10k", "10,000 idle connections", clients=10000, pattern="idle"),
    # Issue 13: the opening handshakes alone (--connect-in-flight at a time), server CPU per handshake.
    Case("connect-10k", "opening 10,000 connections", clients=10000, pattern="connect"),
    # Issue 10: one client floods, one reads as fast as it can, one has stopped reading (bench/burst.js).
    Case("burst", "burst: 20,000 x 1 KiB from one client, one fast reader, one stalled", clients=3, pattern="burst"),
    # Issue 12: permessage-deflate negotiated by every client, JSON-like text of 1 and 4 KiB. Node ws
    # compresses a broadcast once per recipient, wsapp once per message.
    Case("z-c100-s1-1k", "deflate: 100 clients, 1 sender (window 4), 1 KiB JSON", clients=100, window=4,
         deflate=True, payload_bytes=1024, client="ws"),
    Case("z-c100-s1-4k", "deflate: 100 clients, 1 sender (window 4), 4 KiB JSON", clients=100, window=4,
         deflate=True, payload_bytes=4096, client="ws"),
    Case("z-c100-s10-1k", "deflate: 100 clients, 10 senders (window 1 each), 1 KiB JSON", clients=100,
         senders=10, window=1, deflate=True, payload_bytes=1024, client="ws"),
    Case("z-c100-s10-4k", "deflate: 100 clients, 10 senders (window 1 each), 4 KiB JSON", clients=100,
         senders=10, window=1, deflate=True, payload_bytes=4096, client="ws"),
    # What negotiating it costs an idle connection: the same 1,000 `ws` clients with and without the offer.
    Case("idle-1k-plain", "1,000 idle connections, `ws` client, no deflate offered", clients=1000, pattern="idle",
         client="ws"),
    Case("idle-1k-deflate", "1,000 idle connections, `ws` client, permessage-deflate negotiated", clients=1000,
         pattern="idle", deflate=True, client="ws"),
]
# --cases deflate: all of issue 12's cases.
CASE_GROUPS = {"deflate": [c.name for c in CASES if c.deflate or c.name == "idle-1k-plain"]}
VARIANTS = [
    Variant("node", "node", "relay", "/"),
    Variant("wsapp", "wsapp", "relay", "/"),
    Variant("wsapp-rooms", "wsapp", "rooms", "/ws"),
]
LABELS = {"node": "Node ws 8.23.0 (relay)", "wsapp": "wsapp relay /", "wsapp-rooms": "wsapp rooms /ws",
          "base": "baseline relay /", "base-rooms": "baseline rooms /ws"}

# wsapp as the issue asks for a benchmark: no per-connection rate limit, caps above the 10k case.
# LOG_LEVEL=WARNING because the reference logs nothing per connection either.
WSAPP_ENV = {
    "WSAPP_RATE_LIMIT": "0",
    "WSAPP_MAX_CONNECTIONS": "30000",
    "WSAPP_MAX_CONNECTIONS_PER_IP": "30000",
    "LOG_LEVEL": "WARNING",
    "WSAPP_DRAIN_SECONDS": "2",
}


def raise_fd_limit() -> None:
    """Runs in each child before exec: 10,000 sockets need more than the usual soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(FD_LIMIT, hard) if hard != resource.RLIM_INFINITY else FD_LIMIT
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):  # not root: the hard limit is the most we may have
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd]


class Server:
    """One server process, pinned to SERVER_CORE, its output in a log file."""

    def __init__(self, variant: Variant, log_path: Path, wsapp_env: dict[str, str], deflate: bool = False) -> None:
        self.port = free_port()
        self.answers_http = variant.server != "node"  # Node's reference server has no HTTP handler
        env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1"}
        if variant.server == "node":
            cmd = ["node", str(BENCH / "node" / "reference_server.js")]
            if deflate:
                env["REF_DEFLATE"] = "1"  # wsapp negotiates it by default (WSAPP_DEFLATE=1)
        else:
            python = ROOT / ".venv" / "bin" / "python"
            cmd = [str(python if python.exists() else sys.executable), str(variant.tree / "server.py")]
            env.update(wsapp_env)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server; closed in stop()
        self.proc = subprocess.Popen(pinned(SERVER_CORE, cmd), cwd=variant.tree, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit)
        self.ps = psutil.Process(self.proc.pid)  # taskset execs the server: same pid

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Until wsapp answers an HTTP request, not merely accepts TCP: it listens before it has loaded
        its app (a taken port fails at once), and a measurement started at the first accepted
        connection counted the app's loading in the opening's CPU and time and left it out of the idle
        RSS. Node's reference server listens once it is loaded, and answers no plain request."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    if not self.answers_http:
                        return
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    if sock.recv(64).startswith(b"HTTP/1."):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not answering on {self.port} after {timeout} s: {self.log_tail()}")

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def core_times() -> dict[int, tuple[float, float]]:
    """Per core since boot, from /proc/stat: (busy seconds, of which irq + softirq seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                v = [int(x) for x in fields[:8]]
                # user nice system idle iowait irq softirq steal
                out[int(name[3:])] = ((sum(v) - v[3] - v[4]) / tick, (v[5] + v[6]) / tick)
    return out


# A server's CPU seconds, the cores' busy times (core_times) and the time, read together: one end of a
# measured span (the opening, the window).
Mark = tuple[float, dict[int, tuple[float, float]], float]


def mark(server: Any) -> Mark:
    """Now, for `server` (anything with `cpu_seconds()`: one server, or scaling.py's several)."""
    return server.cpu_seconds(), core_times(), time.monotonic()


def run_pair(case: Case, variant: Variant, args: argparse.Namespace, raw: Path, rep: int) -> dict[str, Any]:
    """Start a fresh server, drive it with the load generator, return what both measured."""
    tag = f"{case.name}-{variant.name}" + (f"-{rep + 1}" if args.repeat > 1 else "")
    row: dict[str, Any] = {"case": case.name, "variant": variant.name, "server": variant.server,
                           "mode": variant.mode}
    server = Server(variant, raw / f"{tag}.server.log", args.wsapp_env, case.deflate)
    loadgen = None
    try:
        server.wait_listening()
        row["rss_idle"] = server.rss()
        spec = {
            "url": f"ws://127.0.0.1:{server.port}{variant.path}",
            "mode": variant.mode,
            "clients": case.clients,
            "senders": case.senders,
            "pattern": case.pattern,
            "window": case.window,
            "rate": case.rate or 1,
            "payloadBytes": case.payload_bytes or case.payload or args.payload,
            "payload": "json" if case.json_payload else "pad",
            "deflate": case.deflate,
            "warmupSeconds": 0 if case.idle or case.connect else args.warmup,
            "durationSeconds": args.idle_hold if case.idle else 0 if case.connect else args.duration,
            "connectConcurrency": args.connect_in_flight,
            "drainSeconds": args.drain,
            "client": case.client or args.client,
        }
        # Before the load generator starts: the server's CPU and the cores' busy time over the opening.
        before = mark(server)
        with open(raw / f"{tag}.loadgen.log", "wb") as lg_log:
            loadgen = subprocess.Popen(pinned(LOADGEN_CORE, ["node", str(BENCH / "loadgen.js"), json.dumps(spec)]),
                                       cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=lg_log,
                                       preexec_fn=raise_fd_limit)
            row.update(drive(loadgen, server, spec, args, before))
    except Exception as exc:  # a failed pair is a result too: record it and go on with the others
        row["error"] = str(exc)
    finally:
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        row["server_exit_early"] = server.proc.poll()
        server.stop()
    derive(row)
    return row


def drive(loadgen: subprocess.Popen[bytes], server: Server, spec: dict[str, Any],
          args: argparse.Namespace, before: Mark) -> dict[str, Any]:
    """Follow the load generator's events, sampling the server at each one."""
    assert loadgen.stdout is not None and loadgen.stdin is not None
    out: dict[str, Any] = {}
    deadline = time.monotonic() + 90 + spec["warmupSeconds"] + spec["durationSeconds"] + spec["drainSeconds"]
    sel = selectors.DefaultSelector()
    sel.register(loadgen.stdout, selectors.EVENT_READ)
    cpu0 = busy0 = t0 = None
    while True:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            raise RuntimeError("load generator timed out")
        line = loadgen.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited with {loadgen.wait()} before a result")
        event = json.loads(line)
        kind = event.get("event")
        if kind == "ready":
            cpu1, busy1, t1 = mark(server)
            cpu0, busy0, t0 = before
            # The opening: from before the load generator started until every client was connected.
            out["connect_cpu_s"] = cpu1 - cpu0
            out["connect_core_busy_pct"] = {c: 100 * (busy1[c][0] - busy0[c][0]) / (t1 - t0) for c in busy1}
            out["connect_wall_s"] = t1 - t0
            cpu0 = busy0 = t0 = None
            out["rss_ready"] = server.rss()
            loadgen.stdin.write(b"go\n")
            loadgen.stdin.flush()
        elif kind == "window_start":
            cpu0, busy0, t0 = mark(server)
        elif kind == "window_end":
            cpu1, busy1, t1 = mark(server)
            assert cpu0 is not None and busy0 is not None and t0 is not None
            out["server_cpu_s"] = cpu1 - cpu0
            out["wall_s"] = t1 - t0
            # How busy each core was meanwhile, and how much of that was the kernel's interrupt work
            # (loopback TCP runs largely in softirq, charged to the core but to no process).
            out["core_busy_pct"] = {c: 100 * (busy1[c][0] - busy0[c][0]) / (t1 - t0) for c in busy1}
            out["core_irq_pct"] = {c: 100 * (busy1[c][1] - busy0[c][1]) / (t1 - t0) for c in busy1}
            out["rss_end"] = server.rss()
        elif kind == "result":
            loadgen.wait(timeout=10)
            out["loadgen"] = event
            if not event.get("ok"):
                raise RuntimeError(event.get("error", "load generator failed"))
            return out


def derive(row: dict[str, Any]) -> None:
    """The table's figures from the raw samples."""
    lg = row.get("loadgen") or {}
    if not lg.get("ok"):
        return
    wall = row.get("wall_s") or lg["windowSeconds"]
    row["deliveries_per_s"] = lg["deliveriesPerSec"]
    row["p50_ms"] = lg["latencyMs"]["p50"]
    row["p99_ms"] = lg["latencyMs"]["p99"]
    row["lost"] = lg["lost"]
    row["loadgen_cpu_pct"] = lg["loadgenCpuPct"]
    row["server_cpu_pct"] = 100 * row["server_cpu_s"] / wall
    deliveries = lg["deliveriesPerSec"] * lg["windowSeconds"]
    row["cpu_us_per_delivery"] = 1e6 * row["server_cpu_s"] / deliveries if deliveries else None
    # Socket bytes the clients read in the window (WebSocket frames, headers included; TCP/IP
    # headers not), per delivery, against the messages' own bytes.
    row["wire_bytes_per_delivery"] = lg.get("wireBytesPerDelivery")
    row["payload_bytes_per_delivery"] = lg.get("payloadBytesPerDelivery")
    if row["wire_bytes_per_delivery"] and row["payload_bytes_per_delivery"]:
        row["compression"] = row["payload_bytes_per_delivery"] / row["wire_bytes_per_delivery"]
    # Noise gauge: what else (other processes on this machine) kept our two cores busy. Approximate:
    # per-process and per-core accounting do not split interrupt time the same way.
    busy, irq = row.get("core_busy_pct", {}), row.get("core_irq_pct", {})
    row["other_cpu_pct"] = {
        f"core{c}": max(0.0, busy.get(c, 0.0) - irq.get(c, 0.0) - own)
        for c, own in ((SERVER_CORE, row["server_cpu_pct"]), (LOADGEN_CORE, row["loadgen_cpu_pct"]))
    }
    # What capped the figure: a core near full (its process, the kernel's interrupt work on it and any
    # other process that ran there). Neither core full means the closed loop's turnaround did.
    full = [name for name, pct in (("server core", busy.get(SERVER_CORE, row["server_cpu_pct"])),
                                   ("load-gen core", busy.get(LOADGEN_CORE, row["loadgen_cpu_pct"])))
            if pct >= BUSY_PCT]
    row["limit"] = " + ".join(full) if full else ("rate" if lg["spec"]["pattern"] != "closed" else "turnaround")
    row["rss_mib"] = row["rss_end"] / 2**20
    if lg["spec"]["pattern"] == "idle":
        row["rss_per_conn_kib"] = (row["rss_end"] - row["rss_idle"]) / lg["connected"] / 1024
        row["setup_s"] = lg["setupSeconds"]
    if lg["spec"]["pattern"] == "connect":
        row["setup_s"] = lg["setupSeconds"]
        row["handshakes_per_s"] = lg["connected"] / lg["setupSeconds"]
        row["cpu_us_per_handshake"] = 1e6 * row["connect_cpu_s"] / lg["connected"]
        row["loadgen_cpu_us_per_handshake"] = 1e6 * lg["setupCpuSeconds"] / lg["connected"]
        row["rss_per_conn_kib"] = (row["rss_ready"] - row["rss_idle"]) / lg["connected"] / 1024
        # Others' share of core 0 over the opening (the server's own CPU taken out): the noise gauge.
        busy = row.get("connect_core_busy_pct", {})
        wall = row["connect_wall_s"]
        row["connect_other_pct"] = {f"core{c}": max(0.0, busy.get(c, 0.0) - own) for c, own in (
            (SERVER_CORE, 100 * row["connect_cpu_s"] / wall),
            (LOADGEN_CORE, 100 * lg["setupCpuSeconds"] / wall))}
    problems = []
    st = lg["stats"]
    want = lg["connected"] if lg["spec"].get("deflate") else 0
    if st.get("deflateNegotiated", 0) != want:
        problems.append(f"permessage-deflate negotiated by {st.get('deflateNegotiated', 0)} of {lg['connected']} "
                        f"clients (expected {want}): {st.get('extensions')}")
    for key, label in (("duplicates", "duplicates"), ("unknown", "unrecognised frames"),
                       ("typeMismatches", "text arrived as binary"), ("serverErrorCount", "error frames"),
                       ("unexpectedCloses", "unexpected closes")):
        if st.get(key):
            problems.append(f"{st[key]} {label}")
    if st.get("closeCodes"):
        problems.append(f"close codes {st['closeCodes']}")
    if lg.get("stalled"):
        problems.append("closed loop stalled (no message completed for 1 s)")
    if lg["lost"]:
        problems.append(f"{lg['lost']} of {lg['expected']} deliveries lost")
    if lg["spec"]["pattern"] == "open" and lg.get("maxSendLagMs", 0) > 20:
        problems.append(f"open-loop sender ran up to {lg['maxSendLagMs']:.0f} ms late")
    if problems:
        row["problems"] = problems


# ---- the burst case (issue 10) -------------------------------------------------------------------

# A slow consumer's close as wsapp logs it (wsapp/connection.py, kick_slow_consumer).
KICK_LOG = re.compile(r"slow consumer: (\d+) bytes queued, over its cap for ([\d.]+)s, closing (\d+)")
RSS_SAMPLE_S = 0.01


def peak_rss(pid: int) -> int | None:
    """The kernel's high-water mark of the process's RSS (VmHWM), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss(pid: int) -> bool:
    """Start VmHWM afresh from the current RSS (Linux 4.0+), so that it measures the burst alone."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_burst(case: Case, variant: Variant, args: argparse.Namespace, raw: Path, rep: int) -> dict[str, Any]:
    """Fresh server, bench/burst.js against it; RSS sampled every 10 ms from the burst's start to its end."""
    tag = f"{case.name}-{variant.name}" + (f"-{rep + 1}" if args.repeat > 1 else "")
    row: dict[str, Any] = {"case": case.name, "variant": variant.name, "server": variant.server,
                           "mode": variant.mode}
    server = Server(variant, raw / f"{tag}.server.log", args.wsapp_env)
    client = None
    spec = {"url": f"ws://127.0.0.1:{server.port}{variant.path}", "mode": variant.mode,
            "count": args.burst_count, "payloadBytes": args.burst_bytes, "timeoutSeconds": args.burst_timeout}
    try:
        server.wait_listening()
        with open(raw / f"{tag}.burst.log", "wb") as log:
            client = subprocess.Popen(pinned(LOADGEN_CORE, ["node", str(BENCH / "burst.js"), json.dumps(spec)]),
                                      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
            assert client.stdout is not None and client.stdin is not None
            sel = selectors.DefaultSelector()
            sel.register(client.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 60 + args.burst_timeout
            samples: list[tuple[float, int]] = []
            t0 = cpu0 = None
            while True:
                if time.monotonic() > deadline:
                    raise RuntimeError("burst client timed out")
                if not sel.select(timeout=RSS_SAMPLE_S):
                    if t0 is not None:
                        samples.append((time.monotonic() - t0, server.rss()))
                    continue
                line = client.stdout.readline()
                if not line:
                    raise RuntimeError(f"burst client exited with {client.wait()} before a result")
                event = json.loads(line)
                if event.get("event") == "ready":
                    row["rss_ready"] = server.rss()
                    row["hwm_reset"] = reset_peak_rss(server.proc.pid)
                    cpu0, t0 = server.cpu_seconds(), time.monotonic()
                    client.stdin.write(b"go\n")
                    client.stdin.flush()
                elif event.get("event") == "result":
                    assert cpu0 is not None and t0 is not None
                    row["server_cpu_s"] = server.cpu_seconds() - cpu0
                    row["wall_s"] = time.monotonic() - t0
                    row["rss_end"] = server.rss()
                    client.wait(timeout=10)
                    row["burst"] = event
                    if not event.get("ok"):
                        raise RuntimeError(event.get("error", "burst client failed"))
                    break
        row["rss_samples"] = len(samples)
        sampled = max((rss for _, rss in samples), default=row["rss_end"])
        hwm = peak_rss(server.proc.pid) if row["hwm_reset"] else None
        row["rss_peak"] = max(sampled, hwm or 0, row["rss_end"])
        row["rss_peak_sampled"], row["rss_hwm"] = sampled, hwm
        if variant.server == "wsapp":
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/stats", timeout=5) as resp:
                stats = json.load(resp)
            row["wsapp_stats"] = {k: stats.get(k) for k in ("paced", "slow_consumer_kicks", "drops")}
            row["kicks"] = [{"queued": int(q), "over_cap_s": float(t), "code": int(c)}
                            for q, t, c in KICK_LOG.findall(server.log_tail(1000))]
    except Exception as exc:  # a failed pair is a result too
        row["error"] = str(exc)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        row["server_exit_early"] = server.proc.poll()
        server.stop()
    derive_burst(row)
    return row


def derive_burst(row: dict[str, Any]) -> None:
    """The burst table's figures from what the client and the samples saw."""
    b = row.get("burst") or {}
    if not b.get("ok"):
        return
    rd, st, fl = b["reader"], b["stalled"], b["flooder"]
    row["reader_all_s"] = rd["allMs"] / 1000 if rd["allMs"] is not None else None
    row["lost"] = rd["lost"]
    row["rss_peak_mib"] = row["rss_peak"] / 2**20
    row["rss_growth_mib"] = (row["rss_peak"] - row["rss_ready"]) / 2**20
    if st["closeCode"] is not None:
        stalled = f"closed {st['closeCode']} \"{st['closeReason']}\""
    elif st["ended"]:
        stalled = "connection ended, no close frame"
    else:
        stalled = "not closed"
    stalled += f"; got {st['messages']:,} once it read"
    if st["badFrames"]:
        stalled += f", then {st['badFrames']} unparseable frame(s)"
    for k in row.get("kicks") or []:
        stalled += f" (server: over its cap {k['over_cap_s']:.2f} s, {k['queued'] / 2**20:.1f} MiB queued)"
    row["stalled"] = stalled
    if fl["closedDuringBurst"] or fl["closeCode"] is not None:
        row["flooder"] = f"closed {fl['closeCode'] or 'without close frame'}"
    else:
        row["flooder"] = "open, answers a ping" if fl["answersPing"] else "no answer to a ping"
    problems = []
    if rd["outOfOrder"]:
        problems.append(f"reader got {rd['outOfOrder']} messages out of order")
    if b["outcome"] not in ("all",):
        problems.append(f"reader stopped: {b['outcome']}"
                        + (f" (closed {rd['closeCode']} {rd['closeReason']})" if rd["closeCode"] is not None else ""))
    if problems:
        row["problems"] = problems


def burst_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    spec = next((r["burst"]["spec"] for r in rows if r.get("burst", {}).get("ok")), None)
    size = f"{spec['count']:,} messages of {spec['payloadBytes']:,} bytes" if spec else "the burst"
    lines = ["", f"Burst: {size} from one client; one `ws` reader, one stalled client (median of "
             f"{meta['repeat']} by the reader's time).", "",
             "| server | reader got | time to all, s | reader's longest wait, s (after how many) | lost "
             "| peak RSS MiB | RSS growth MiB | stalled client | flooder | server CPU s | paced / kicks "
             "| spread over runs |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    for r in rows:
        name = LABELS[r["variant"]]
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:120]} | | | | | | | | | | |")
            continue
        rd = r["burst"]["reader"]
        ws = r.get("wsapp_stats")
        times = sorted(x["reader_all_s"] for x in r.get("repeats", []) if x.get("reader_all_s") is not None)
        pacing = f"{ws['paced']} / {ws['slow_consumer_kicks']}" if ws else "-"
        spread_s = f"{times[0]:.2f}-{times[-1]:.2f} s" if len(times) > 1 else ""
        lines.append(
            f"| {name} | {rd['count']:,} | {fmt(r.get('reader_all_s'), 2)} "
            f"| {rd['longestGapMs'] / 1000:.2f} ({rd['gapAfter']:,}) | {fmt(r.get('lost'))} "
            f"| {fmt(r.get('rss_peak_mib'))} | {fmt(r.get('rss_growth_mib'))} | {r['stalled']} | {r['flooder']} "
            f"| {fmt(r.get('server_cpu_s'), 2)} | {pacing} | {spread_s} |")
    return lines


def summary(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    if "cpu_us_per_handshake" in row:
        return (f"{row['handshakes_per_s']:,.0f} handshakes/s ({row['setup_s']:.2f} s), server CPU "
                f"{row['cpu_us_per_handshake']:.0f} µs/handshake, load gen {row['loadgen_cpu_us_per_handshake']:.0f}")
    if "rss_per_conn_kib" in row:
        return f"{row['rss_per_conn_kib']:.1f} KiB/connection"
    if "burst" in row:
        rd = row["burst"]["reader"]
        return (f"reader got {rd['count']:,} in {fmt(row.get('reader_all_s'), 2)} s, peak RSS "
                f"{fmt(row.get('rss_peak_mib'))} MiB; stalled: {row.get('stalled')}; flooder: {row.get('flooder')}")
    return (f"{row.get('deliveries_per_s', 0):,.0f} deliveries/s, p99 {fmt(row.get('p99_ms'), 2)} ms, "
            f"lost {row.get('lost')}, server CPU {fmt(row.get('server_cpu_pct'), 0)}%, "
            f"load gen CPU {fmt(row.get('loadgen_cpu_pct'), 0)}%")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median headline figure: deliveries/s in a closed loop, p99 in an open loop
    (whose rate is fixed), RSS per connection when idle.

    A failed run wins over good ones: an error or a loss must not hide behind a median.
    """
    bad = [r for r in runs if "error" in r or r.get("lost") or (r.get("problems") and "burst" in r)]
    if bad:
        chosen = dict(bad[0])
    elif "burst" in runs[0]:
        chosen = dict(sorted(runs, key=lambda r: r["reader_all_s"])[(len(runs) - 1) // 2])
    else:
        pattern = runs[0]["loadgen"]["spec"]["pattern"]
        key = {"idle": "rss_per_conn_kib", "open": "p99_ms",
               "connect": "cpu_us_per_handshake"}.get(pattern, "deliveries_per_s")
        chosen = dict(sorted(runs, key=lambda r: r.get(key) or 0)[(len(runs) - 1) // 2])
    if len(runs) > 1:
        chosen["repeats"] = [{k: r.get(k) for k in ("deliveries_per_s", "p50_ms", "p99_ms", "lost",
                                                    "rss_per_conn_kib", "cpu_us_per_delivery", "error",
                                                    "reader_all_s", "rss_peak_mib", "stalled", "setup_s",
                                                    "handshakes_per_s", "cpu_us_per_handshake")}
                             for r in runs]
    return chosen


RATIO_KEYS = ["deliveries_per_s", "p50_ms", "p99_ms", "rss_mib", "cpu_us_per_delivery", "rss_per_conn_kib",
              "wire_bytes_per_delivery", "handshakes_per_s", "cpu_us_per_handshake"]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """wsapp ÷ Node per case, for each wsapp variant (rooms against Node's relay: Node has no rooms)."""
    out = []
    by = {(r["case"], r["variant"]): r for r in rows}
    for (case, variant), r in by.items():
        base = by.get((case, "node"))
        if variant == "node" or base is None or case == "burst":
            continue
        ratio = {"case": case, "variant": variant}
        for k in RATIO_KEYS:
            a, b = r.get(k), base.get(k)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                ratio[k] = a / b
        out.append(ratio)
    return out


# Per-run ratios: (key, label, higher is better).
PAIRED_KEYS = [("deliveries_per_s", "deliveries/s", True), ("p50_ms", "p50", False),
               ("cpu_us_per_delivery", "CPU/delivery", False), ("handshakes_per_s", "handshakes/s", True),
               ("cpu_us_per_handshake", "CPU/handshake", False)]


def run_ratios(runs: list[dict[str, Any]], others: list[dict[str, Any]], key: str) -> list[float]:
    """`key` of each run ÷ the same of the other setup's run of the same repeat (they ran next to each
    other: the host's speed drifts by 10-50 % over minutes here, so a median of these says more than
    a ratio of medians taken minutes apart). Pairs missing the figure are left out."""
    pairs = [(a.get(key), b.get(key)) for a, b in zip(runs, others, strict=False)]
    return [a / b for a, b in pairs if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b]


def paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each wsapp variant's runs against Node's (and, with --baseline, the baseline tree's) by
    `run_ratios`, for every PAIRED_KEYS figure the case has."""
    out = []
    by = {(r["case"], r["variant"]): r for r in rows}
    for (case, variant), r in by.items():
        if variant == "node" or case == "burst" or not r.get("repeats"):
            continue
        against = ["node"] + ([variant.replace("wsapp", "base")] if variant.startswith("wsapp") else [])
        for other in against:
            o = by.get((case, other))
            if o is None or not o.get("repeats"):
                continue
            ratios = {key: vals for key, _label, _higher in PAIRED_KEYS
                      if (vals := run_ratios(r["repeats"], o["repeats"], key))}
            if ratios:
                out.append({"case": case, "variant": variant, "against": other, **ratios})
    return out


def paired_markdown(pairs: list[dict[str, Any]], titles: dict[str, str]) -> list[str]:
    lines = ["", "Per-run ratios (each run ÷ the run next to it in the same repeat): median, range, and in how "
             "many runs the first was better.", "", "| case | server ÷ against | " +
             " | ".join(label for _k, label, _h in PAIRED_KEYS) + " |", "|---|---|" + "---|" * len(PAIRED_KEYS)]
    for e in pairs:
        cells = []
        for key, _label, higher in PAIRED_KEYS:
            vals = sorted(e.get(key) or [])
            if not vals:
                cells.append("")
                continue
            better = sum(1 for v in vals if (v > 1) == higher and v != 1)
            cells.append(f"{statistics.median(vals):.2f}x ({vals[0]:.2f}-{vals[-1]:.2f}), {better}/{len(vals)}")
        lines.append(f"| {titles.get(e['case'], e['case'])} | {LABELS[e['variant']]} ÷ {LABELS[e['against']]} | "
                     + " | ".join(cells) + " |")
    return lines


def fmt(v: Any, digits: int = 1, ratio: bool = False) -> str:
    if v is None:
        return "-"
    if ratio:
        return f"{v:.2f}x"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def spread(row: dict[str, Any]) -> str:
    """Lowest to highest deliveries/s over the repeats (p99 for an open loop, whose rate is fixed)."""
    reps = row.get("repeats") or []
    if len(reps) < 2:
        return ""
    is_open = row["loadgen"]["spec"]["pattern"] == "open"
    vals = sorted(r.get("p99_ms" if is_open else "deliveries_per_s") or 0 for r in reps)
    if is_open:
        return f"p99 {vals[0]:.1f}-{vals[-1]:.1f} ms"
    return f"{vals[0] / 1000:.0f}k-{vals[-1] / 1000:.0f}k/s"


# Cases with a table of their own (idle, burst, permessage-deflate).
SEPARATE_TABLES = ("idle", "burst", "z-", "connect")


# A results table: (header, right-aligned, the cell of a row, the key whose ÷ Node ratio goes under it).
Column = tuple[str, bool, Callable[[dict[str, Any]], str], str | None]


def _col(header: str, key: str, digits: int = 1, suffix: str = "", ratio: bool = True) -> Column:
    return (header, True, lambda r: f"{fmt(r.get(key), digits)}{suffix}", key if ratio else None)


def _others(r: dict[str, Any]) -> str:
    other = r.get("other_cpu_pct", {})
    return f"{fmt(other.get('core0'), 0)} / {fmt(other.get('core1'), 0)}"


def rows_markdown(columns: list[Column], rows: list[dict[str, Any]], rat: dict[tuple[str, str], dict[str, Any]],
                  titles: dict[str, str]) -> list[str]:
    """One line per (case, server) with the columns after `case | server`, and an italic ÷ Node line
    under it where a ratio exists."""
    lines = ["| case | server | " + " | ".join(c[0] for c in columns) + " |",
             "|---|---|" + "".join("---:|" if c[1] else "---|" for c in columns)]
    for r in rows:
        name = LABELS[r["variant"]]
        if "error" in r:
            lines.append(f"| {titles[r['case']]} | {name} | error: {r['error'][:120]} |" + " |" * (len(columns) - 1))
            continue
        lines.append(f"| {titles[r['case']]} | {name} | " + " | ".join(c[2](r) for c in columns) + " |")
        q = rat.get((r["case"], r["variant"]))
        if q:
            cells = [f"*{fmt(q.get(c[3]), ratio=True)}*" if c[3] else "" for c in columns]
            lines.append("| | *÷ Node* |" + "".join(f" {c} |" if c else " |" for c in cells))
    return lines


def _tail_columns() -> list[Column]:
    return [_col("server CPU %", "server_cpu_pct", 0, ratio=False),
            _col("load gen CPU %", "loadgen_cpu_pct", 0, ratio=False),
            ("others' CPU % core 0 / 1", True, _others, None),
            ("limit", False, lambda r: str(r.get("limit", "")), None),
            ("spread over runs", False, spread, None)]


THROUGHPUT_COLUMNS: list[Column] = [
    _col("deliveries/s", "deliveries_per_s"), _col("p50 ms", "p50_ms", 2), _col("p99 ms", "p99_ms", 2),
    _col("lost", "lost", ratio=False), _col("RSS MiB", "rss_mib"),
    _col("server CPU µs/delivery", "cpu_us_per_delivery", 2), *_tail_columns()]

DEFLATE_COLUMNS: list[Column] = [
    _col("deliveries/s", "deliveries_per_s"), _col("p50 ms", "p50_ms", 2), _col("p99 ms", "p99_ms", 2),
    _col("lost", "lost", ratio=False), _col("server CPU µs/delivery", "cpu_us_per_delivery", 2),
    _col("wire bytes/delivery", "wire_bytes_per_delivery", 0),
    _col("message bytes", "payload_bytes_per_delivery", 0, ratio=False),
    _col("compression", "compression", 2, "x", ratio=False), _col("RSS MiB", "rss_mib"), *_tail_columns()]


def deflate_markdown(meta: dict[str, Any], rows: list[dict[str, Any]], rat: dict[tuple[str, str], dict[str, Any]],
                     titles: dict[str, str]) -> list[str]:
    return ["", f"permessage-deflate: every client (`ws` {meta['node_ws']}) offers it, both servers accept; "
            "JSON-like text; wire bytes = the clients' socket bytes read in the window per delivery "
            f"(median of {meta['repeat']} runs by deliveries/s).", "",
            *rows_markdown(DEFLATE_COLUMNS, rows, rat, titles)]


def connect_markdown(rows: list[dict[str, Any]], rat: dict[tuple[str, str], dict[str, Any]],
                     titles: dict[str, str]) -> list[str]:
    """The opening handshakes: rate, and the server's CPU per handshake (the steadier figure)."""
    inflight = next((r["loadgen"]["spec"]["connectConcurrency"] for r in rows if "loadgen" in r), "?")
    lines = ["", f"Opening connections, {inflight} handshakes in flight (median run by server CPU per handshake; "
             "all runs in the last column).", "",
             "| case | server | handshakes/s | time s | server CPU µs/handshake | ÷ Node | load gen CPU µs/handshake "
             "| others' CPU % core 0 / 1 | runs: µs/handshake (handshakes/s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        name = LABELS[r["variant"]]
        if "error" in r:
            lines.append(f"| {titles[r['case']]} | {name} | error: {r['error'][:120]} |" + " |" * 6)
            continue
        q = rat.get((r["case"], r["variant"]), {})
        ratio = fmt(q.get("cpu_us_per_handshake"), ratio=True) if q else "-"
        other = r.get("connect_other_pct", {})
        runs = ", ".join(f"{x['cpu_us_per_handshake']:.0f} ({x['handshakes_per_s']:,.0f})"
                         for x in r.get("repeats", []) if x.get("cpu_us_per_handshake"))
        lines.append(
            f"| {titles[r['case']]} | {name} | {fmt(r.get('handshakes_per_s'))} | {fmt(r.get('setup_s'), 2)} "
            f"| {fmt(r.get('cpu_us_per_handshake'), 0)} | {ratio} "
            f"| {fmt(r.get('loadgen_cpu_us_per_handshake'), 0)} | {fmt(other.get('core0'), 0)} / "
            f"{fmt(other.get('core1'), 0)} | {runs} |")
    return lines


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], rats: list[dict[str, Any]]) -> str:
    titles = {c["name"]: c["title"] for c in meta["cases"]}
    lines = [
        f"Run {meta['started']} against commit `{meta['commit']}`"
        f"{' with uncommitted changes to ' + ', '.join(meta['dirty']) if meta['dirty'] else ''}; "
        f"{meta['cpu']}, {meta['cores']} cores; server on core {SERVER_CORE}, load generator on core "
        f"{LOADGEN_CORE}; {meta['duration']} s window after {meta['warmup']} s warm-up; "
        f"{meta['payload']}-byte messages; median of {meta['repeat']} runs per pair (idle case: one run); "
        f"load average {' '.join(meta['loadavg_before'])} before, {' '.join(meta.get('loadavg_after', []))} after; "
        f"{host_speed.describe(meta.get('host_before'), meta.get('host_after'))}.",
    ]
    rat = {(r["case"], r["variant"]): r for r in rats}
    main_rows = [r for r in rows if not r["case"].startswith(SEPARATE_TABLES)]
    if main_rows:
        lines += ["", *rows_markdown(THROUGHPUT_COLUMNS, main_rows, rat, titles)]
    idle = [r for r in rows if r["case"].startswith("idle")]
    if idle:
        lines += ["", "| idle connections | server | connected | RSS idle MiB | RSS with them MiB | KiB per connection "
                  "| ÷ Node | connect time s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in idle:
            name = LABELS[r["variant"]]
            if "error" in r:
                lines.append(f"| {titles[r['case']]} | {name} | error: {r['error'][:120]} | | | | | |")
                continue
            q = rat.get((r["case"], r["variant"]), {})
            lines.append(
                f"| {titles[r['case']]} | {name} | {fmt(r['loadgen']['connected'])} | {fmt(r['rss_idle'] / 2**20)} "
                f"| {fmt(r['rss_end'] / 2**20)} | {fmt(r.get('rss_per_conn_kib'))} "
                f"| {fmt(q.get('rss_per_conn_kib'), ratio=True) if q else '-'} | {fmt(r.get('setup_s'), 2)} |")
    connect = [r for r in rows if r["case"].startswith("connect")]
    if connect:
        lines += connect_markdown(connect, rat, titles)
    burst = [r for r in rows if r["case"] == "burst"]
    if burst:
        lines += burst_markdown(meta, burst)
    deflate = [r for r in rows if r["case"].startswith("z-")]
    if deflate:
        lines += deflate_markdown(meta, deflate, rat, titles)
    pairs = paired(rows)
    if pairs:
        lines += paired_markdown(pairs, titles)
    notes = [f"- {LABELS[r['variant']]}, {r['case']}: {'; '.join(r['problems'])}" for r in rows if r.get("problems")]
    if notes:
        lines += ["", "Problems seen:", *notes]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Deliveries/s and p99 per case, servers side by side; RSS per idle connection when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cases = [c for c in CASES if not c.idle and not c.burst and not c.deflate
             and any(r["case"] == c.name for r in rows)]
    variants = [v for v in VARIANTS if any(r["variant"] == v.name for r in rows)]
    by = {(r["case"], r["variant"]): r for r in rows}
    idle = [r for r in rows if r["case"] == "idle-10k" and "rss_per_conn_kib" in r]
    if not cases and not idle:
        return
    fig, axes = plt.subplots(1, 3 if idle else 2, figsize=(15 if idle else 11, 5),
                             gridspec_kw={"width_ratios": [3, 3, 1.4] if idle else [1, 1]})
    colors = {"node": "#4c8c2b", "wsapp": "#3060b0", "wsapp-rooms": "#8fb0e0", "base": "#b06030",
              "base-rooms": "#e0b08f"}
    width = 0.8 / max(1, len(variants))
    panels = ((axes[0], "deliveries_per_s", "deliveries/s (higher is better)", lambda y: f"{y / 1000:.0f}k"),
              (axes[1], "p99_ms", "p99 fan-out latency, ms (lower is better)", lambda y: f"{y:.1f}"))
    for ax, key, title, label in panels:
        for i, v in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(cases))]
            ys = [by.get((c.name, v.name), {}).get(key) or 0 for c in cases]
            bars = ax.bar(xs, ys, width, label=LABELS[v.name], color=colors[v.name])
            ax.bar_label(bars, labels=[label(y) if y else "n/a" for y in ys], fontsize=7)
        ax.set_xticks(range(len(cases)), [c.name for c in cases], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.12)
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y / 1000:.0f}k"))
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axes[0].legend(fontsize=8, loc="upper left")
    if idle:
        ax = axes[2]
        vals = [r["rss_per_conn_kib"] for r in idle]
        bars = ax.bar(range(len(idle)), vals, color=[colors[r["variant"]] for r in idle])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8)
        ax.set_xticks(range(len(idle)), [r["variant"] for r in idle], fontsize=8)
        ax.set_title(f"KiB of RSS per idle connection\n({idle[0]['loadgen']['connected']:,} open)", fontsize=10)
        ax.margins(y=0.12)
    fig.suptitle("wsapp vs the Node ws 8.23.0 broadcast server: each server on one core, same load generator "
                 "(bench/run.py)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
    except (subprocess.CalledProcessError, OSError):
        return ""


def metadata(args: argparse.Namespace) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git("rev-parse", "--short", "HEAD") or "none",
        # Uncommitted changes to the code under test; the bench's own files and outputs do not count.
        "dirty": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
                  if not line[3:].startswith(("bench/", "docs/"))],
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node,
        "node_ws": json.loads((BENCH / "node" / "node_modules" / "ws" / "package.json").read_text())["version"],
        "duration": args.duration,
        "warmup": args.warmup,
        "payload": args.payload,
        "repeat": args.repeat,
        "client": args.client,
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
        "host_before": host_speed.measure(),
        "wsapp_env": args.wsapp_env,
        "baseline": f"{args.baseline} at {git('-C', str(args.baseline), 'rev-parse', '--short', 'HEAD')}"
        if args.baseline else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="node,wsapp", help="node and/or wsapp (default both)")
    p.add_argument("--modes", default="relay,rooms", help="wsapp protocols: relay (/) and/or rooms (/ws)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help="comma list of: " + ", ".join(c.name for c in CASES) + "; `deflate`: all z-* and idle-1k-*")
    p.add_argument("--duration", type=float, default=2.5, help="measured window per case, s")
    p.add_argument("--warmup", type=float, default=0.5, help="load before the window, s")
    p.add_argument("--window", type=int, help="closed-loop messages in flight per sender, for all such cases")
    p.add_argument("--drain", type=float, default=3.0, help="wait for deliveries in flight after it, s")
    p.add_argument("--idle-hold", type=float, default=2.0, help="idle case: hold connections before RSS, s")
    p.add_argument("--idle-clients", type=int, default=10000)
    p.add_argument("--connect-in-flight", type=int, default=200,
                   help="idle and connect cases: handshakes the load generator keeps in flight")
    p.add_argument("--connect-clients", type=int, default=10000, help="connect case: connections opened")
    p.add_argument("--burst-count", type=int, default=20000, help="burst case: messages the flooder sends")
    p.add_argument("--burst-bytes", type=int, default=1024, help="burst case: bytes per message")
    p.add_argument("--burst-timeout", type=float, default=30.0, help="burst case: the reader's deadline, s")
    p.add_argument("--payload", type=int, default=64, help="relay message size, bytes")
    p.add_argument("--client", choices=["raw", "ws"], default="raw",
                   help="load generator's WebSocket client: its own lean one, or the `ws` package's")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per (case, server), idle case excepted; the table keeps the median")
    p.add_argument("--wsapp-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for wsapp (repeatable)")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also run wsapp from this other checkout (variants base, base-rooms), taking turns "
                        "with this one: before/after figures from one run")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="where latest.json / latest.md go")
    args = p.parse_args(argv)
    args.wsapp_env = {**WSAPP_ENV, **dict(kv.split("=", 1) for kv in args.wsapp_env)}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("bench: needs two cores (server on one, load generator on the other)", file=sys.stderr)
        return 2
    if not (BENCH / "node" / "node_modules" / "ws").exists():
        print("bench: run `npm ci --prefix bench/node` first", file=sys.stderr)
        return 2
    servers = set(args.servers.split(","))
    modes = set(args.modes.split(","))
    variants = [v for v in VARIANTS if v.server in servers and (v.server == "node" or v.mode in modes)]
    if args.baseline:
        base = args.baseline.resolve()
        variants += [dataclasses.replace(v, name=v.name.replace("wsapp", "base"), tree=base)
                     for v in variants if v.server == "wsapp"]
    wanted = [name for item in args.cases.split(",") for name in CASE_GROUPS.get(item, [item])]
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        print(f"bench: unknown case(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    cases = [dataclasses.replace(c, clients=args.idle_clients) if c.name == "idle-10k"
             else dataclasses.replace(c, clients=args.connect_clients) if c.name == "connect-10k"
             else dataclasses.replace(c, window=args.window) if args.window and c.pattern == "closed" else c
             for c in CASES if c.name in wanted]
    # The orchestrator mostly sleeps on a pipe; keep it off the server's core all the same.
    os.sched_setaffinity(0, {LOADGEN_CORE})

    meta = metadata(args)
    meta["cases"] = [{**dataclasses.asdict(c), "title": c.title} for c in cases]
    raw = args.out / "raw" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.monotonic()
    # Servers alternate within each case (and repeats within it), so that background load on this
    # machine falls on all of them alike.
    for case in cases:
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        for rep in range(1 if case.idle else args.repeat):
            for variant in variants:
                t = time.monotonic()
                row = (run_burst if case.burst else run_pair)(case, variant, args, raw, rep)
                runs[variant.name].append(row)
                print(f"bench: {case.name:14} {variant.name:12} {time.monotonic() - t:5.1f} s  {summary(row)}",
                      file=sys.stderr)
        rows += [median_run(runs[v.name]) for v in variants]
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    meta["host_after"] = host_speed.measure()
    meta["raw_logs"] = os.path.relpath(raw, ROOT)
    rats = ratios(rows)
    table = markdown(meta, rows, rats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(
        {"meta": meta, "results": rows, "ratios": rats},
        indent=2, default=str) + "\n")
    (args.out / "latest.md").write_text(table)
    if not args.no_chart:
        chart(rows, CHART)
    print(table)
    print(f"bench: {meta['elapsed_s']} s; wrote {args.out / 'latest.md'}, latest.json"
          f"{'' if args.no_chart else ', ' + str(os.path.relpath(CHART, ROOT))}; logs in {meta['raw_logs']}",
          file=sys.stderr)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    if shutil.which("taskset") is None:
        sys.exit("bench: needs taskset (util-linux)")
    sys.exit(main())
