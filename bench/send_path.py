"""CPU cost of wsapp's send path alone: queue a frame to each connection, flush, per delivery.

    .venv/bin/python bench/send_path.py                       # this tree
    .venv/bin/python bench/send_path.py --tree /path/to/other/checkout
    .venv/bin/python bench/send_path.py --frames 1 --through   # also a lone message's write-through path

N loopback TCP connections in one process (no client, no parsing, no event-loop wake-ups): each loop
turn queues `frames` 64-byte frames to every connection with `Connection.send`, then lets the
`Outbox` flush them (one `send` syscall per connection per turn), then drains the peers outside the
timed part. Prints this thread's CPU time per delivery. It isolates what the closed-loop cases of
bench/run.py spend per delivery in wsapp's own code, free of the noise of a shared machine, so two
checkouts can be compared within a few percent. Run it pinned (`taskset -c 0`) and alternate trees.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(clients: int, frames: int, turns: int, warmup: int = 200, through: bool = False) -> float:
    """Microseconds of CPU per delivery for `turns` turns of `frames` frames to `clients` connections;
    `through`: the frames are written through (a lone message's path) instead of queued and flushed."""
    import socket

    import gevent

    from wsapp.config import Settings
    from wsapp.connection import Connection, Outbox
    from wsapp.frames import OP_TEXT, encode_frame
    from wsapp.metrics import Stats

    settings, stats, outbox = Settings.from_env({}), Stats(), Outbox()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(clients)
    conns, peers, keep = [], [], []
    for _ in range(clients):
        client = socket.create_connection(listener.getsockname())
        server_side, _addr = listener.accept()
        server_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(Connection(server_side, b"", "127.0.0.1", "/", settings, stats, outbox))
        client._sock.setblocking(False)  # the OS socket under gevent's: drained without the hub
        peers.append(client._sock)
        keep.append(client)
    frame = encode_frame(OP_TEXT, b"x" * 64)
    spent = 0.0
    for turn in range(warmup + turns):
        t0 = time.thread_time()
        outbox.write_through = through
        for _ in range(frames):
            for conn in conns:
                conn.send(frame)
        outbox.write_through = False
        gevent.sleep(0)  # the Outbox's flush is a loop callback: it runs here
        if turn >= warmup:
            spent += time.thread_time() - t0
        for peer in peers:
            try:
                while peer.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
    if stats.slow_consumer_kicks:
        raise RuntimeError("a peer was closed as a slow consumer: the measurement is void")
    for sock in keep:
        sock.close()
    listener.close()
    return 1e6 * spent / (turns * frames * clients)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=ROOT, help="checkout whose wsapp/ is measured")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--frames", default="1,4", help="frames queued per connection per loop turn (comma list)")
    p.add_argument("--deliveries", type=int, default=1_200_000, help="per measurement")
    p.add_argument("--repeat", type=int, default=3, help="measurements per setting; the median is printed")
    p.add_argument("--through", action="store_true",
                   help="also measure 1 frame per turn written through (Outbox.write_through), as a lone message is")
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    from gevent import monkey

    monkey.patch_all()
    import wsapp

    print(f"wsapp from {Path(wsapp.__file__).parent}")
    for frames in (int(f) for f in args.frames.split(",")):
        turns = max(1, args.deliveries // (frames * args.clients))
        runs = [measure(args.clients, frames, turns) for _ in range(args.repeat)]
        print(
            f"{args.clients} clients, {frames} frame(s) per turn: {statistics.median(runs):.3f} µs CPU per delivery "
            f"(runs {', '.join(f'{r:.3f}' for r in runs)})"
        )
    if args.through:
        runs = [measure(args.clients, 1, args.deliveries // args.clients, through=True) for _ in range(args.repeat)]
        print(f"{args.clients} clients, 1 frame per turn written through: {statistics.median(runs):.3f} µs CPU per "
              f"delivery (runs {', '.join(f'{r:.3f}' for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
