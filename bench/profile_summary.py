"""Self and inclusive shares per source line of a py-spy raw profile (bench/profile.py --format raw).

    .venv/bin/python bench/profile_summary.py /tmp/relay.txt --top 15
    .venv/bin/python bench/profile_summary.py /tmp/rooms.txt /tmp/relay.txt --functions   # per function

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


def summarize(path: Path, top: int, match: str, functions: bool = False) -> str:
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if functions:  # `name (file:line)` -> `name (file)`: one entry per function
            frames = [_LINE.sub(")", frame) for frame in frames]
        own[frames[-1]] += n
        for frame in set(frames):
            anywhere[frame] += n
    out = [f"{path.name}: {total} samples", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    out.append(f"inclusive (frames in wsapp/{', matching ' + match if match else ''}):")
    shown = [(f, n) for f, n in anywhere.most_common() if "wsapp/" in f and match in f][:top]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in shown]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--match", default="", help="only inclusive lines containing this text")
    p.add_argument("--functions", action="store_true", help="per function instead of per source line")
    args = p.parse_args()
    for path in args.profiles:
        print(summarize(path, args.top, args.match, args.functions))
        print()


if __name__ == "__main__":
    main()
