"""Where a server's time goes between reading a message and its last send, at window 1, from the
kernel's syscall tracepoints (`perf record -e raw_syscalls:*`, needs linux-perf and root or
perf_event_paranoid <= 1), for Node's reference server and wsapp's routes alike.

    .venv/bin/python bench/first_send.py                          # node, wsapp relay, wsapp rooms; 100 clients
    .venv/bin/python bench/first_send.py --baseline ../other-checkout --rounds 3   # and that checkout's, in turns

Each round starts each server pinned to core 0 (as bench/run.py), drives it with bench/loadgen.js on
core 1 (one sender, window 1), traces the server's syscalls for `--seconds` in the middle of the
window, and reports per message (a "turn": the read that brought it and the sends that followed),
medians over the traced turns:

- `recv -> 1st send`: from the read's return to the first recipient's send: what the server does
  before anyone gets the message (parsing, checks, numbering, framing);
- `1st -> last send`, `in send`: the fan-out, and how much of it is spent inside the send syscalls;
- `between sends`: the server's own code per recipient during the fan-out.

Tracing costs every syscall a little, so compare servers within a round, not with bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the servers, pinned and configured as its cases run them

ROOT = run.ROOT
RECV = {0, 45, 47}  # read, recvfrom, recvmsg (x86-64 syscall numbers)
SEND = {1, 20, 44, 46}  # write, writev, sendto, sendmsg
VARIANTS = {  # --servers names: (server, mode, path)
    "node": ("node", "relay", "/"), "wsapp": ("wsapp", "relay", "/"), "rooms": ("wsapp", "rooms", "/ws"),
}


def turns(trace: str, clients: int) -> list[dict[str, float]]:
    """Turns from `perf script -F time,event,trace` output: a read that returned data after the
    previous turn's first send, and every syscall up to the next such read."""
    found: list[dict[str, float]] = []
    cur: dict[str, float] | None = None
    entered: dict[int, float] = {}
    for line in trace.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith(":"):
            continue
        t = float(parts[0][:-1])
        nr = int(parts[3])
        if "sys_enter" in parts[1]:
            entered[nr] = t
            if nr in SEND and cur is not None and "first" not in cur:
                cur["first"] = t
            continue
        ret = int(parts[-1])
        if nr in RECV and ret > 0 and (cur is None or "first" in cur):
            if cur is not None:
                found.append(cur)
            cur = {"read": t, "sends": 0, "in_send": 0.0}
        if cur is not None and nr in SEND and ret > 0:
            cur["sends"] += 1
            cur["in_send"] += t - entered.get(nr, t)
            cur["last"] = t
    return [c for c in found if "first" in c and "last" in c and c["sends"] >= clients * 0.9]


def one(kind: str, tree: Path, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    variant = run.Variant(kind, *VARIANTS[kind], tree=tree)
    server = run.Server(variant, workdir / f"{kind}.log", run.WSAPP_ENV)
    server.wait_listening()
    port, mode = server.port, variant.mode
    spec = {"url": f"ws://127.0.0.1:{port}{variant.path}", "mode": mode,
            "clients": args.clients, "senders": 1, "pattern": "closed", "window": 1, "payloadBytes": args.payload,
            "warmupSeconds": 1, "durationSeconds": args.seconds + 2, "drainSeconds": 1, "client": "raw",
            "room": "bench", "rooms": 1}
    data = workdir / f"{kind}-{port}.perf"
    loadgen = subprocess.Popen(run.pinned(run.LOADGEN_CORE, ["node", str(run.BENCH / "loadgen.js"), json.dumps(spec)]),
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert loadgen.stdin is not None
        loadgen.stdin.write(b"go\n")
        loadgen.stdin.flush()
        time.sleep(2.0)  # the opening and the warm-up: trace the steady state
        subprocess.run(["perf", "record", "-q", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit", "-p",
                        str(server.proc.pid), "-o", str(data), "--", "sleep", str(args.seconds)],
                       check=True, stderr=subprocess.DEVNULL)
        out = loadgen.communicate(timeout=120)[0].decode().strip().splitlines()
        result = json.loads(out[-1])
    finally:
        if loadgen.poll() is None:
            loadgen.kill()
        server.stop()
    trace = subprocess.run(["perf", "script", "-i", str(data), "-F", "time,event,trace"], capture_output=True,
                           text=True, check=True).stdout
    got = turns(trace, args.clients)

    def med(values: list[float]) -> float:
        return statistics.median(values) * 1e6 if values else float("nan")

    return {
        "deliveries_per_s": result["deliveriesPerSec"],
        "p50_ms": result["latencyMs"]["p50"],
        "turns": len(got),
        "recv_to_first_us": med([c["first"] - c["read"] for c in got]),
        "first_to_last_us": med([c["last"] - c["first"] for c in got]),
        "in_send_us": med([c["in_send"] for c in got]),
        "between_sends_us": med([(c["last"] - c["first"] - c["in_send"]) / max(1, c["sends"] - 1) for c in got]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="node,wsapp,rooms", help="node, wsapp (relay /), rooms (/ws)")
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose server.py runs")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--payload", type=int, default=64)
    p.add_argument("--seconds", type=float, default=1.5, help="traced per run")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--baseline", type=Path, help="also this checkout's relay and rooms (base, base-rooms), in turns")
    args = p.parse_args()
    servers = args.servers.split(",") + (["base", "base-rooms"] if args.baseline else [])
    if shutil.which("perf") is None:
        sys.exit("first_send: needs perf (linux-perf)")
    print("| round | server | deliveries/s | p50 ms | turns | recv -> 1st send µs | 1st -> last send µs "
          "| in send µs | between sends µs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(1, args.rounds + 1):
            for name in servers:
                kind = {"base": "wsapp", "base-rooms": "rooms"}.get(name, name)
                r = one(kind, args.baseline if name.startswith("base") else args.tree, args, Path(tmp))
                print(f"| {n} | {name} | {r['deliveries_per_s']:,.0f} | {r['p50_ms']:.3f} | {r['turns']} | "
                      f"{r['recv_to_first_us']:.1f} | {r['first_to_last_us']:.1f} | {r['in_send_us']:.1f} | "
                      f"{r['between_sends_us']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
