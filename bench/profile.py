"""Profile a server under one of bench/run.py's cases with py-spy (pip install py-spy).

    .venv/bin/python bench/profile.py c100-s1-w1 docs/profiles/relay-100c-w1.svg
    .venv/bin/python bench/profile.py c100-s1-w1 /tmp/old.txt --tree ../old-checkout --format raw
    .venv/bin/python bench/profile.py connect-10k /tmp/connect.txt --format raw --mode rooms

The server runs pinned to core 0 as in bench/run.py, the load generator on core 1 (py-spy too: it
only reads the server's memory). py-spy samples for `--seconds` in the middle of a long window.
`--format raw` writes collapsed stacks (one line per stack with its sample count) for text tools.
The connect case is sampled over the whole opening instead: from before the load generator starts
until every client is connected (`--clients` of them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py, next to this file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", choices=[c.name for c in run.CASES if c.pattern in ("closed", "open", "connect")])
    p.add_argument("out", type=Path)
    p.add_argument("--tree", type=Path, default=run.ROOT, help="the checkout whose server.py runs")
    p.add_argument("--mode", choices=["relay", "rooms"], default="relay")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--format", choices=["flamegraph", "raw", "speedscope"], default="flamegraph")
    p.add_argument("--clients", type=int, help="clients (default: the case's)")
    p.add_argument("--nonblocking", action="store_true",
                   help="py-spy reads without pausing the server (less distortion, some bad samples)")
    args = p.parse_args()
    py_spy = shutil.which("py-spy") or str(run.ROOT / ".venv" / "bin" / "py-spy")
    case = next(c for c in run.CASES if c.name == args.case)
    variant = next(v for v in run.VARIANTS if v.server == "wsapp" and v.mode == args.mode)
    variant = run.dataclasses.replace(variant, tree=args.tree.resolve())
    logs = Path(tempfile.mkdtemp(prefix="wsapp-profile-"))
    server = run.Server(variant, logs / "server.log", run.WSAPP_ENV)
    loadgen = spy = None
    try:
        server.wait_listening()
        spy_cmd = run.pinned(run.LOADGEN_CORE, [py_spy, "record", "-r", str(args.rate), "-d",
                                                str(int(args.seconds)), "-p", str(server.proc.pid),
                                                "-f", args.format, "-o", str(args.out)]
                               + (["--nonblocking"] if args.nonblocking else []))
        if case.connect:
            spy_cmd[spy_cmd.index("-d") + 1] = "120"  # stopped (SIGINT) once every client is in
            spy = subprocess.Popen(spy_cmd)
            time.sleep(1.0)  # py-spy attached
        spec = {"url": f"ws://127.0.0.1:{server.port}{variant.path}", "mode": variant.mode,
                "clients": args.clients or case.clients, "senders": case.senders, "pattern": case.pattern,
                "window": case.window, "rate": case.rate or 1, "payloadBytes": case.payload or 64,
                "warmupSeconds": 1.0, "durationSeconds": args.seconds + 2, "drainSeconds": 2}
        loadgen = subprocess.Popen(run.pinned(run.LOADGEN_CORE, ["node", str(run.BENCH / "loadgen.js"),
                                                                  json.dumps(spec)]),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                   preexec_fn=run.raise_fd_limit)
        assert loadgen.stdin is not None and loadgen.stdout is not None
        while (ready := json.loads(loadgen.stdout.readline() or "{}")).get("event") != "ready":
            if loadgen.poll() is not None:
                raise RuntimeError(f"load generator exited with {loadgen.returncode}")
            pass
        if spy is not None:
            spy.send_signal(run.signal.SIGINT)
            spy.wait(timeout=60)
            print(f"{case.name}: {spec['clients']:,} connections in {ready['setupSeconds']:.2f} s", file=sys.stderr)
            return 0
        loadgen.stdin.write(b"go\n")
        loadgen.stdin.flush()
        time.sleep(1.5)
        subprocess.run(spy_cmd, check=True)
        for line in loadgen.stdout:
            event = json.loads(line)
            if event.get("event") == "result":
                print(f"{case.name}: {event.get('deliveriesPerSec', 0):,.0f} deliveries/s, "
                      f"p50 {event.get('latencyMs', {}).get('p50')} ms", file=sys.stderr)
                break
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
