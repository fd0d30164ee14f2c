"""One process's background figures: the event loop's lag, and with several workers its share of the
instance's figures (a snapshot file written about once a second, see `wsapp.metrics_share`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent

from wsapp.metrics import Snapshot, Stats, merge
from wsapp.metrics_share import WorkerShare

log = logging.getLogger(__name__)

# How often the lag timer fires; the snapshot file is written every SHARE_EVERY of its ticks.
LAG_TICK_SECONDS = 0.25
SHARE_EVERY = 4


class Monitor:
    """A timer greenlet that measures its own lateness (wsapp_loop_lag_seconds) and shares figures."""

    def __init__(self, stats: Stats, export: Callable[[], Snapshot], share: WorkerShare | None = None) -> None:
        self._stats = stats
        self._export = export
        self.share = share
        self._timer: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start the timer (when the server starts serving; an app built in a test starts nothing)."""
        if self._timer is None:
            self._timer = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop the timer; with workers, fold this one's figures into the instance's retired ones."""
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        if self.share is not None:
            self.share.retire(self._export())

    def worker(self) -> Snapshot:
        """This process's figures."""
        return self._export()

    def instance(self) -> Snapshot:
        """The whole instance's figures: this process's alone when it is the only one."""
        mine = self._export()
        if self.share is None:
            return merge([mine], live=1)
        self.share.write(mine)  # the next scrape answered by another worker sees this one as of now
        return self.share.instance(mine)

    def _run(self) -> None:
        observe = self._stats.loop_lag_seconds.observe
        ticks = 0
        while True:
            if self.share is not None and ticks % SHARE_EVERY == 0:  # from the start: the others count this one
                try:
                    self.share.write(self._export())
                except Exception:  # the timer must outlive a bad snapshot
                    log.exception("sharing this worker's figures failed")
            start = time.monotonic()
            gevent.sleep(LAG_TICK_SECONDS)
            observe(max(0.0, time.monotonic() - start - LAG_TICK_SECONDS))
            ticks += 1
