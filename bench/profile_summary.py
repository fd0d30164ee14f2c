"""Self and inclusive shares per source line of a py-spy raw profile (bench/profile.py --format raw).

    .venv/bin/python bench/profile_summary.py /tmp/relay.txt --top 15
    .venv/bin/python bench/profile_summary.py /tmp/rooms.txt /tmp/relay.txt --functions   # per function
    .venv/bin/python bench/profile_summary.py /tmp/rooms.txt /tmp/relay.txt --functions --diff 10000 10000 --rate 1000

A raw profile is one line per distinct stack, `frame;frame;...;frame count`. "Self" counts the
samples whose innermost frame is that line (where the time went), "inclusive" those with the line
anywhere on the stack (what it led to). Idle time shows as the gevent hub's loop (`Hub.run`) and a
thread waiting on a lock (`acquire_with_timeout`): py-spy samples wall-clock time.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def count(path: Path, functions: bool) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Samples in all, by innermost frame (self), and by any frame on the stack (inclusive)."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        n = int(samples)
        total += n
        frames = stack.split(";")
        if functions:  # `name (file:line)` -> `name (file)`: one entry per function
            frames = [_LINE.sub(")", frame) for frame in frames]
        own[frames[-1]] += n
        for frame in set(frames):
            anywhere[frame] += n
    return total, own, anywhere


def summarize(path: Path, top: int, match: str, functions: bool = False) -> str:
    total, own, anywhere = count(path, functions)
    out = [f"{path.name}: {total} samples", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    out.append(f"inclusive (frames in wsapp/{', matching ' + match if match else ''}):")
    shown = [(f, n) for f, n in anywhere.most_common() if "wsapp/" in f and match in f][:top]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in shown]
    return "\n".join(out)


def diff(a: Path, b: Path, top: int, match: str, functions: bool, per_a: float, per_b: float, rate: float) -> str:
    """Inclusive wall time per frame in `a` and `b` (µs at py-spy's sampling `rate`), each divided by its
    work units (`per_*`: handshakes, messages, ...), largest difference (either way) first."""
    _, _, in_a = count(a, functions)
    _, _, in_b = count(b, functions)
    scale_a, scale_b = 1e6 / rate / per_a, 1e6 / rate / per_b
    rows = sorted(set(in_a) | set(in_b), key=lambda f: -abs(in_a[f] * scale_a - in_b[f] * scale_b))
    out = [f"inclusive µs per unit: {a.name} ({per_a:g} units), {b.name} ({per_b:g} units), difference"]
    out += [f"  {in_a[f] * scale_a:8.2f} {in_b[f] * scale_b:8.2f} {in_a[f] * scale_a - in_b[f] * scale_b:+8.2f}  {f}"
            for f in rows if match in f][:top]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--match", default="", help="only inclusive lines containing this text")
    p.add_argument("--functions", action="store_true", help="per function instead of per source line")
    p.add_argument("--diff", nargs=2, type=float, metavar=("UNITS_A", "UNITS_B"),
                   help="two profiles: inclusive µs per unit side by side (units: handshakes, messages, ...)")
    p.add_argument("--rate", type=float, default=250, help="with --diff: py-spy's samples per second")
    args = p.parse_args()
    if args.diff:
        if len(args.profiles) != 2:
            p.error("--diff takes exactly two profiles")
        (a, b), (units_a, units_b) = args.profiles, args.diff
        print(diff(a, b, args.top, args.match, args.functions, units_a, units_b, args.rate))
        return
    for path in args.profiles:
        print(summarize(path, args.top, args.match, args.functions))
        print()


if __name__ == "__main__":
    main()
