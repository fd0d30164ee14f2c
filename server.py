"""Run wsapp: `python server.py`. Reads $PORT, $HOST and WSAPP_* from the environment; drains on SIGTERM.

WEB_CONCURRENCY=N (N > 1, with REDIS_URL; without it: one process and a warning) forks N workers after
binding the listening socket, so they all accept from one queue; the parent only forwards SIGTERM/SIGINT
and waits for them.
"""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from wsapp.app import create_app, services_of  # noqa: E402
from wsapp.config import Settings  # noqa: E402
from wsapp.exceptions import ConfigError  # noqa: E402
from wsapp.handler import WsappHandler  # noqa: E402

log = logging.getLogger("wsapp.server")

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _raise_fd_limit() -> None:
    """Each connection is a file descriptor; the usual soft limit of 1024 is far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"wsapp: configuration error: {exc}", file=sys.stderr)
        return 2
    workers = settings.workers
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if workers > 1:
        fmt = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    logging.basicConfig(level=settings.log_level, format=fmt)
    if settings.web_concurrency > workers:
        log.warning("WEB_CONCURRENCY=%d needs REDIS_URL (workers must share rooms and the relay): "
                    "running one process", settings.web_concurrency)
    _raise_fd_limit()
    # Bound before any fork: the workers share one accept queue, a bad HOST/PORT is reported once, and
    # PORT=0 means one port for all. wsgi.multiprocess makes each worker accept one connection per
    # wake-up instead of up to 100, so a burst of connections spreads over the workers.
    server = WSGIServer(
        (settings.host, settings.port),
        None,
        handler_class=WsappHandler,
        log=None,
        backlog=1024,
        environ={"wsgi.multiprocess": True} if workers > 1 else None,
    )
    try:
        server.init_socket()
    except OSError as exc:
        print(f"wsapp: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    if workers == 1:
        return _serve(settings, server)
    return _run_workers(settings, server)


def _serve(settings: Settings, server: WSGIServer, worker: str = "") -> int:
    """Build the app (and its hub, backend, relay) in this process and serve until SIGTERM has drained it."""
    # A SIGTERM while the app is being built (Redis may take a moment) ends this process cleanly.
    early = gevent.event.Event()
    early_handlers = [gevent.signal_handler(sig, early.set) for sig in (signal.SIGTERM, signal.SIGINT)]
    app = create_app(settings)
    services = services_of(app)
    for handler in early_handlers:
        handler.cancel()
    if early.is_set():
        log.info("stopped before serving")
        services.backend.close()
        return 0
    server.application = app
    stopped = gevent.event.Event()
    draining = False

    def drain() -> None:
        nonlocal draining
        if draining:  # SIGINT from a terminal reaches the workers and the parent, which forwards it
            return
        draining = True
        log.info("SIGTERM: draining %d connections (at most %.0fs)", len(services.registry), settings.drain_seconds)
        server.close()  # stop accepting; open connections carry on
        services.registry.drain(time.monotonic() + settings.drain_seconds)
        services.backend.close()
        stopped.set()

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(drain))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(drain))
    server.start()
    log.info(
        "wsapp listening on http://%s:%d (broker: %s%s)",
        settings.host,
        server.server_port,
        services.backend.name,
        worker,
    )
    stopped.wait()
    log.info("stopped")
    return 0


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGTERM this worker if the parent dies without forwarding one (say, SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(settings: Settings, server: WSGIServer, number: int, parent: int) -> None:
    """The forked child: never returns into the parent's code."""
    code = 1
    try:
        _die_with_parent(parent)
        code = _serve(settings, server, f", worker {number} of {settings.workers}")
    except BaseException:
        log.exception("worker %d failed", number)
    finally:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)


def _run_workers(settings: Settings, server: WSGIServer) -> int:
    parent = os.getpid()
    pids: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def forward(signum: int) -> None:
        nonlocal stopping
        if not stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(pids))
        stopping = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # Forked after binding but before any app, hub or Redis connection exists, so each worker builds its own.
    for number in range(1, settings.workers + 1):
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("cannot start worker %d: %s", number, exc)
            forward(signal.SIGTERM)
            break
        if pid == 0:
            _worker(settings, server, number, parent)
        pids[pid] = number
    port = server.server_port
    server.close()  # the workers hold the socket; once they have all closed theirs, new connections are refused
    gevent.signal_handler(signal.SIGTERM, forward, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, forward, signal.SIGINT)
    log.info("started %d workers on port %d: pids %s", len(pids), port, " ".join(map(str, pids)))
    failed = len(pids) < settings.workers  # a fork failed
    while pids:
        pid, status = os.waitpid(-1, 0)
        if pid not in pids:
            continue
        number = pids.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if stopping and code == 0:
            log.info("worker %d (pid %d) stopped", number, pid)
        else:
            failed = True
            # Not restarted: the others carry on, and an orchestrator sees the exit status in the end.
            log.error("worker %d (pid %d) died (%s); %d still running", number, pid, how, len(pids))
    log.info("all workers stopped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
