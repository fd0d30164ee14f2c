"""What permessage-deflate context takeover would cost per connection, in this process's RSS.

    .venv/bin/python bench/deflate_memory.py            # 1,000 connections' worth, 1 KiB JSON-like
    .venv/bin/python bench/deflate_memory.py --n 5000

wsapp answers every offer with `client_no_context_takeover` and `server_no_context_takeover`: the
inflater of a client message lives for that message and one compressor per (window, level) serves
the whole process. A server that let the client keep its context (client -> server takeover) would
have to keep an inflater per connection between messages; one that kept its own (server -> client
takeover, Node `ws`'s default) a compressor per connection. This keeps N of each, as a connection
would after its first message, and reports the RSS they add, per connection.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zlib
from pathlib import Path

MESSAGE = json.dumps({"type": "message", "room": "general", "items": [
    {"id": 1000000 + i, "user": {"id": 10000 + i % 20, "name": f"user{i % 20}"}, "text": "the build is green " * 3}
    for i in range(8)]}).encode()


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def per_connection(n: int, make: str, bits: int, messages: int) -> float:
    """KiB of RSS per kept zlib object that has processed `messages` messages (its window fills up
    as traffic passes: zlib allocates it whole, but only the pages written count in RSS)."""
    stream = zlib.compressobj(6, zlib.DEFLATED, -bits)
    payloads = [stream.compress(MESSAGE) + stream.flush(zlib.Z_SYNC_FLUSH) for _ in range(messages)]
    before = rss()
    kept: list[object] = []
    for _ in range(n):
        if make == "inflater":
            inflater = zlib.decompressobj(-bits)
            for payload in payloads:
                inflater.decompress(payload)
            kept.append(inflater)
        else:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -bits)
            for _ in range(messages):
                compressor.compress(MESSAGE)
                compressor.flush(zlib.Z_SYNC_FLUSH)
            kept.append(compressor)
    return (rss() - before) / n / 1024


def measured(n: int, make: str, bits: int, messages: int) -> float:
    """per_connection() in a fresh interpreter: memory freed by an earlier measurement would be
    reused by the next one and hide its growth."""
    out = subprocess.run([sys.executable, __file__, "--one", make, str(bits), str(messages), "--n", str(n)],
                         capture_output=True, text=True, check=True).stdout
    return float(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="connections' worth of zlib objects")
    p.add_argument("--one", nargs=3, metavar=("KIND", "BITS", "MESSAGES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(per_connection(args.n, args.one[0], int(args.one[1]), int(args.one[2])))
        return
    print(f"zlib {zlib.ZLIB_RUNTIME_VERSION}, {args.n:,} objects each, {len(MESSAGE)}-byte message")
    print("| kept per connection | window bits | KiB of RSS per connection after 1 message | after 64 |")
    print("|---|---:|---:|---:|")
    for make, label in (("inflater", "inflater (client -> server context takeover)"),
                        ("compressor", "compressor, memLevel 8 (server -> client context takeover)")):
        for bits in (15, 9):
            one, many = (measured(args.n, make, bits, m) for m in (1, 64))
            print(f"| {label} | {bits} | {one:.1f} | {many:.1f} |")


if __name__ == "__main__":
    main()
