"""Frame decoding cost: wsapp's hand-written FrameParser against wsproto's FrameProtocol.

    .venv/bin/python bench/frame_codec.py
    .venv/bin/python bench/frame_codec.py --unmask   # unmask alone: the C apply_mask against pure Python

Both parse the same masked client frames (what a server reads) and deliver whole messages with
UTF-8 validated text. Reported: messages per second of one core, per payload size, and the ratio.
This is the measurement behind choosing our own codec (DESIGN.md: "whichever the benchmark favours").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsproto.frame_protocol import FrameProtocol, Opcode

from tests.rawws import client_frame
from wsapp.frames import FrameParser, unmask, unmask_python

READ_SIZE = 65536


def stream(size: int, count: int, text: bool) -> list[bytes]:
    """`count` frames of `size` bytes, cut into 64 KiB reads as a socket would deliver them."""
    payload = (b"a" * size) if text else os.urandom(size)
    one = client_frame(0x1 if text else 0x2, payload)
    data = one * count
    return [data[i : i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]


def run_wsapp(reads: list[bytes]) -> int:
    parser = FrameParser(1 << 30)
    messages = 0
    for chunk in reads:
        messages += len(parser.feed(chunk))
    return messages


def run_wsproto(reads: list[bytes]) -> int:
    proto = FrameProtocol(client=False, extensions=[])
    messages = 0
    for chunk in reads:
        proto.receive_bytes(chunk)
        for frame in proto.received_frames():
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION) and frame.message_finished:
                messages += 1
    return messages


def best_rate(fn, reads: list[bytes], expected: int, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        assert fn(reads) == expected
        best = min(best, time.perf_counter() - started)
    return expected / best


def compare_unmask() -> None:
    """Microseconds per call of `unmask` (websockets' C apply_mask when installed) and `unmask_python`."""
    mask = os.urandom(4)
    print(f"{'payload':>10} {'unmask us':>10} {'python us':>10} {'ratio':>7}")
    for size in (64, 125, 512, 4096, 65536):
        data = os.urandom(size)
        number = 20_000 if size < 10_000 else 2_000
        times = [min(timeit.repeat(lambda fn=fn, data=data: fn(data, mask), number=number, repeat=5)) / number * 1e6
                 for fn in (unmask, unmask_python)]
        print(f"{size:>10} {times[0]:>10.3f} {times[1]:>10.3f} {times[1] / times[0]:>6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unmask", action="store_true", help="time unmask (C and pure Python) instead")
    if parser.parse_args().unmask:
        compare_unmask()
        return
    print(f"{'payload':>10} {'kind':>6} {'wsapp msg/s':>14} {'wsproto msg/s':>14} {'ratio':>7}")
    for size, count in ((32, 200_000), (1024, 100_000), (65536, 2_000), (1 << 20, 100)):
        for text in (True, False):
            reads = stream(size, count, text)
            ours = best_rate(run_wsapp, reads, count)
            theirs = best_rate(run_wsproto, reads, count)
            kind = "text" if text else "binary"
            print(f"{size:>10} {kind:>6} {ours:>14,.0f} {theirs:>14,.0f} {ours / theirs:>6.1f}x")


if __name__ == "__main__":
    main()
