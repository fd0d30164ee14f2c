"""One instance's figures across gunicorn workers: each worker's snapshot in a file, added up on demand.

The gunicorn arbiter makes a directory (WSAPP_METRICS_DIR, wiped at start, removed at exit); each
worker writes its snapshot there (`<pid>.json`, replaced atomically) about once a second and when it
answers a scrape, so one scrape of any worker shows the whole instance, other workers' figures at
most a second old. A worker that exits folds its counters and histograms into `retired.json` (so
the instance's counters never go down when gunicorn replaces a worker) and removes its file; the
file of a worker that was killed is folded in by whoever reads it next. Gauges (connections, memory)
count live workers only.

Why not prometheus-client's multiprocess mode: its values live in mmap files updated under a lock
on every `inc`/`observe`, which on wsapp's per-message paths would cost more than the send path
itself (docs/PERFORMANCE.md); it cannot carry custom collectors (the hub's gauges, the broker's
counters) nor process metrics. Here the hot path stays plain integers and the files are written
once a second. The files are replaced and listed under one lock (a listing that runs while a file is
renamed over may miss it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from wsapp.metrics import Snapshot, merge

log = logging.getLogger(__name__)

ENV_DIR = "WSAPP_METRICS_DIR"
RETIRED = "retired.json"
LOCK = ".lock"
# A worker's file older than this is taken for a dead worker's even if its pid is in use again.
STALE_SECONDS = 60.0


def prepare_dir(path: str | None) -> tuple[str, bool]:
    """The arbiter's directory: `path` emptied of old snapshots, else a new temporary one; and
    whether this call created it (then the arbiter removes it at exit)."""
    if path:
        os.makedirs(path, exist_ok=True)
        for old in Path(path).glob("*.json"):
            with contextlib.suppress(OSError):
                old.unlink()
        return path, False
    return tempfile.mkdtemp(prefix="wsapp-metrics-"), True


def remove_dir(path: str) -> None:
    """Remove a directory `prepare_dir` created (the arbiter, at exit)."""
    for entry in Path(path).glob("*"):
        with contextlib.suppress(OSError):
            entry.unlink()
    with contextlib.suppress(OSError):
        os.rmdir(path)


class WorkerShare:
    """This worker's snapshot file in the instance's directory, and the sum over every worker."""

    def __init__(self, directory: str, pid: int | None = None) -> None:
        self.dir = Path(directory)
        self.pid = os.getpid() if pid is None else pid
        self._path = self.dir / f"{self.pid}.json"

    def write(self, snap: Snapshot) -> None:
        """Replace this worker's file with `snap` (readers never see half a file)."""
        tmp = self.dir / f".{self.pid}.tmp"
        try:
            tmp.write_bytes(orjson.dumps({**snap, "pid": self.pid}))
            # Under the lock: a directory listing that runs while a file is renamed over may miss it.
            with self._locked():
                os.replace(tmp, self._path)
        except OSError as exc:
            log.warning("cannot write the metrics snapshot to %s: %s", self.dir, exc)

    def instance(self, mine: Snapshot) -> Snapshot:
        """`mine` plus every other live worker's latest snapshot plus what exited workers left."""
        # Under the lock: a worker folding an exited one into retired.json must not be seen halfway
        # (its counters in neither file, or in both).
        with self._locked():
            live: list[Snapshot] = [mine]
            dead: list[Path] = []
            for path in self.dir.glob("*.json"):
                if path.name == RETIRED or path == self._path:
                    continue
                snap = _read(path)
                if snap is None:
                    continue
                if _alive(int(snap.get("pid", 0)), float(snap.get("time", 0))):
                    live.append(snap)
                else:
                    dead.append(path)
            if dead:
                self._retire_locked(dead)
            retired = _read(self.dir / RETIRED)
        return merge(live + ([retired] if retired else []), live=len(live))

    def retire(self, last: Snapshot) -> None:
        """This worker is exiting: fold `last` into the retired figures and remove its file."""
        self.write(last)
        with self._locked():
            self._retire_locked([self._path])

    def _retire_locked(self, paths: list[Path]) -> None:
        snaps = [snap for snap in map(_read, paths) if snap is not None]
        if snaps:
            retired = _read(self.dir / RETIRED)
            total = merge(snaps + ([retired] if retired else []), live=0)
            kept = {k: total[k] for k in ("counters", "labelled", "histograms")} | {"gauges": {}, "process": {}}
            tmp = self.dir / f".retired.{self.pid}.tmp"
            try:
                tmp.write_bytes(orjson.dumps(kept))
                os.replace(tmp, self.dir / RETIRED)
            except OSError as exc:
                log.warning("cannot keep exited workers' figures in %s: %s", self.dir, exc)
                return
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for a file read and write: microseconds
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> Snapshot | None:
    try:
        return orjson.loads(path.read_bytes())  # type: ignore[no-any-return]
    except (OSError, orjson.JSONDecodeError):
        return None


def _alive(pid: int, written: float) -> bool:
    if pid <= 0 or time.time() - written > STALE_SECONDS:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
