"""The rooms broker path alone (hub + broker, no sockets): publishes/s and deliveries/s, in-process
against Redis, for one process.

    .venv/bin/python bench/rooms_broker.py --rooms 1 --members 100 --senders 10          # memory
    .venv/bin/python bench/rooms_broker.py --rooms 1 --members 100 --senders 10 --redis redis://127.0.0.1:6379/0
    .venv/bin/python bench/rooms_broker.py --rooms 2000 --members 1 --senders 64 --redis ...   # many small rooms

Members are recorders (the hub's only contract with a connection is `send`), so the figures are the
broker's and the hub's cost, not the network's; `bench/run.py` measures whole servers.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from wsapp.backends.memory import MemoryBackend  # noqa: E402
from wsapp.hub import Hub  # noqa: E402
from wsapp.metrics import Stats  # noqa: E402


class Recorder:
    """A member that counts what it is sent."""

    __slots__ = ("id", "name", "received")

    def __init__(self, n: int) -> None:
        self.id = f"m{n}"
        self.name = self.id
        self.received = 0

    def send(self, frame: bytes) -> bool:
        self.received += 1
        return True


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RedisCpu:
    """Redis's own CPU seconds (user + system of the server, from INFO cpu)."""

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url)

    def seconds(self) -> float:
        info = self._client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis", help="REDIS_URL; in-process broker without it")
    p.add_argument("--rooms", type=int, default=1)
    p.add_argument("--members", type=int, default=100, help="per room")
    p.add_argument("--senders", type=int, default=10, help="greenlets publishing at once")
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    if args.redis:
        from wsapp.backends.redis import RedisBackend
        from wsapp.config import Settings

        backend = RedisBackend(Settings.from_env({"REDIS_URL": args.redis, "WSAPP_HISTORY": "100"}))
    else:
        backend = MemoryBackend(100)  # type: ignore[assignment]
    hub = Hub(backend, lambda payload: payload, Stats(), max_rooms=10**6)  # type: ignore[arg-type]
    prefix = f"b{time.time_ns() % 10**9}-"
    rooms = [f"{prefix}{i}" for i in range(args.rooms)]
    members = [Recorder(n) for n in range(args.rooms * args.members)]
    for i, member in enumerate(members):
        hub.join(member, rooms[i // args.members])
    settle = time.monotonic() + 10
    while getattr(hub, "_joining", None) and time.monotonic() < settle:
        gevent.sleep(0.01)  # joiners go live when their presence comes back from the broker
    gevent.sleep(0.2)  # let the presence flood of the joins pass, then count from zero
    for member in members:
        member.received = 0
    published = 0
    deadline = time.monotonic() + args.seconds
    order = itertools.cycle(rooms)

    def sender() -> None:
        nonlocal published
        while time.monotonic() < deadline:
            hub.post(next(order), {"text": "x" * 40}, "bench")
            published += 1

    redis_cpu = RedisCpu(args.redis) if args.redis else None
    cpu0 = process_cpu()
    redis0 = redis_cpu.seconds() if redis_cpu else 0.0
    started = time.monotonic()
    gevent.joinall([gevent.spawn(sender) for _ in range(args.senders)])
    elapsed = time.monotonic() - started
    expected = published * args.members
    wait_until = time.monotonic() + 10
    while sum(m.received for m in members) < expected and time.monotonic() < wait_until:
        gevent.sleep(0.01)  # deliveries from the broker's subscription still arriving
    delivered_at = time.monotonic() - started
    cpu = process_cpu() - cpu0
    redis_seconds = redis_cpu.seconds() - redis0 if redis_cpu else 0.0
    delivered = sum(m.received for m in members)
    print(json.dumps({
        "broker": backend.name, "rooms": args.rooms, "members": args.members, "senders": args.senders,
        "publishes_per_s": round(published / elapsed), "deliveries_per_s": round(delivered / delivered_at),
        "delivered_all": delivered >= expected,
        # CPU per publish from the start of sending to the last delivery: this process, and Redis's own
        # (INFO cpu, so other clients of the same Redis count too: give the bench a Redis of its own).
        "process_cpu_pct": round(100 * cpu / delivered_at, 1),
        "process_us_per_publish": round(1e6 * cpu / max(published, 1), 2),
        "redis_us_per_publish": round(1e6 * redis_seconds / max(published, 1), 2) if redis_cpu else None,
    }))
    backend.close()


if __name__ == "__main__":
    main()
