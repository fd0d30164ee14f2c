"""Where an idle connection's memory goes: tracemalloc, greenlet stacks and RSS around N idle sockets.

    .venv/bin/python bench/idle_memory.py --path /   --conns 2000
    .venv/bin/python bench/idle_memory.py --path /ws --conns 2000 --top 30 --out docs/profiles/idle-ws.txt

The server runs in a child process (the bundled app, bench/run.py's settings, tracemalloc on, one
core); this process is the client: it opens `--warm` connections, lets the server take its "before"
figures, opens `--conns` more (each waits for its 101, and on /ws for its `welcome`), lets the server
take its "after" figures and prints, per connection: RSS, traced Python heap, the C stacks that
greenlets saved, objects by type, and the allocation sites that grew most. Tracing costs memory of its
own (its bookkeeping is not in the traced figures, but is in RSS); run with `--no-trace` for a clean
RSS delta.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVER_ENV = {
    "WSAPP_RATE_LIMIT": "0",
    "WSAPP_MAX_CONNECTIONS": "60000",
    "WSAPP_MAX_CONNECTIONS_PER_IP": "60000",
    "LOG_LEVEL": "WARNING",
    "WSAPP_DRAIN_SECONDS": "1",
    # The clients here never answer a ping: keep the heartbeat from dropping them while they open.
    "WSAPP_PING_INTERVAL": "3600",
    "WSAPP_PING_TIMEOUT": "7200",
    "HOST": "127.0.0.1",
    "PORT": "0",
}


# ---- the server side (child process) -----------------------------------------------------------

def serve(trace: bool, top: int, frames: int) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gc
    import tracemalloc
    from collections import Counter

    import gevent
    import greenlet
    import psutil
    from gevent.os import make_nonblocking, nb_read
    from gevent.pywsgi import WSGIServer

    sys.path.insert(0, str(ROOT))
    from wsapp.cli import load_app, raise_fd_limit, tune_gevent
    from wsapp.config import Settings
    from wsapp.handler import WsappHandler
    from wsapp.services import services_of

    raise_fd_limit()
    tune_gevent()
    if trace:
        tracemalloc.start(frames)
    settings = Settings.from_env()
    app = load_app("wsapp.app:create_app")
    server = WSGIServer(("127.0.0.1", 0), app, handler_class=WsappHandler, log=None, backlog=1024)
    server.start()
    registry = services_of(app).registry
    proc = psutil.Process()
    print(f"port {server.server_port}", flush=True)
    del settings

    def figures() -> dict:
        gc.collect()
        greenlets = [o for o in gc.get_objects() if isinstance(o, greenlet.greenlet)]
        return {
            "rss": proc.memory_info().rss,
            "traced": tracemalloc.get_traced_memory()[0] if trace else 0,
            "snapshot": tracemalloc.take_snapshot() if trace else None,
            "greenlets": len(greenlets),
            "stack_saved": sum(g._stack_saved for g in greenlets),
            "types": Counter(type(o).__qualname__ for o in gc.get_objects()),
            "conns": len(registry),
        }

    make_nonblocking(0)
    buf = b""
    before = None
    while True:
        chunk = nb_read(0, 1024)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = line.decode().split()
            if cmd[0] == "wait":  # wait until the registry holds this many connections
                want = int(cmd[1])
                deadline = time.monotonic() + 60
                while len(registry) < want and time.monotonic() < deadline:
                    gevent.sleep(0.05)
                gevent.sleep(0.5)  # stragglers' welcome frames, anything the loop still has to do
                print(f"conns {len(registry)}", flush=True)
            elif cmd[0] == "before":
                before = figures()
                print("ok", flush=True)
            elif cmd[0] == "after":
                assert before is not None
                after = figures()
                report(before, after, top, frames)
                print("done", flush=True)
                return


def report(before: dict, after: dict, top: int, frames: int) -> None:
    n = after["conns"] - before["conns"]
    out = [
        f"connections measured: {n} (registry {before['conns']} -> {after['conns']})",
        f"RSS:                      {(after['rss'] - before['rss']) / n:8.0f} B per connection",
        f"traced Python heap:       {(after['traced'] - before['traced']) / n:8.0f} B per connection",
        f"  of which greenlet saved C stacks: {(after['stack_saved'] - before['stack_saved']) / n:8.0f} B "
        f"per connection ({after['greenlets'] - before['greenlets']} greenlets more, "
        f"{(after['greenlets'] - before['greenlets']) / n:.2f} per connection)",
        "",
        "objects per connection (gc-tracked, by type):",
    ]
    types = after["types"]
    types.subtract(before["types"])
    for name, count in types.most_common(30):
        if count / n < 0.5:
            break
        out.append(f"  {count / n:6.2f}  {name}")
    if after["snapshot"] is not None:
        stats = after["snapshot"].compare_to(before["snapshot"], "traceback")
        stats.sort(key=lambda s: s.size_diff, reverse=True)
        out += ["", f"allocation sites that grew most (B per connection, {frames} frames kept, innermost first):"]
        for stat in stats[:top]:
            if stat.size_diff / n < 8:
                break
            out.append(f"  {stat.size_diff / n:7.0f} B  {stat.count_diff / n:5.2f} blocks")
            shown = 0
            for fr in reversed(stat.traceback):
                if "tracemalloc" in fr.filename:
                    continue
                out.append(f"      {_short(fr.filename)}:{fr.lineno}")
                shown += 1
                if shown >= 6:
                    break
    print("\n".join(out), file=sys.stderr, flush=True)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/wsapp/", "/lib/python3"):
        if marker in path:
            return path[path.index(marker):].lstrip("/")
    return path


# ---- the client side (this process) -------------------------------------------------------------

def open_idle(port: int, path: str, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("server closed during the handshake")
            data += chunk
        if not data.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(data.decode(errors="replace"))
        if path.startswith("/ws") and len(data.split(b"\r\n\r\n", 1)[1]) < 2:
            s.recv(4096)  # the welcome frame
        socks.append(s)
    return socks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="/")
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--warm", type=int, default=200, help="connections opened before the 'before' figures")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--frames", type=int, default=12, help="traceback depth kept by tracemalloc")
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--out", type=Path, help="also write the report here")
    p.add_argument("--core", type=int, default=0, help="pin the server to this core (-1: no pinning)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(not args.no_trace, args.top, args.frames)
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    python = ROOT / ".venv" / "bin" / "python"
    cmd = [str(python if python.exists() else sys.executable), __file__, "--serve", "--top", str(args.top),
           "--frames", str(args.frames)] + (["--no-trace"] if args.no_trace else [])
    if args.core >= 0:
        cmd = ["taskset", "-c", str(args.core), *cmd]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WSAPP_")}, **SERVER_ENV}
    srv = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                           text=True, cwd=ROOT)
    assert srv.stdin and srv.stdout and srv.stderr

    def ask(line: str) -> str:
        srv.stdin.write(line + "\n")
        srv.stdin.flush()
        return srv.stdout.readline().strip()

    try:
        port = int(srv.stdout.readline().split()[1])
        warm = open_idle(port, args.path, args.warm)
        ask(f"wait {args.warm}")
        ask("before")
        t = time.monotonic()
        idle = open_idle(port, args.path, args.conns)
        opened = time.monotonic() - t
        ask(f"wait {args.warm + args.conns}")
        srv.stdin.write("after\n")
        srv.stdin.flush()
        srv.stdout.readline()
        text = f"path {args.path}, {args.conns} idle connections opened one after another in {opened:.2f} s\n"
        text += "".join(line for line in iter(srv.stderr.readline, "") if not line.startswith("done"))
        print(text)
        if args.out:
            args.out.write_text(text)
        for s in warm + idle:
            s.close()
    finally:
        srv.kill()
        srv.wait()


if __name__ == "__main__":
    main()
