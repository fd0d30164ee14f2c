"""Serve a wsapp app: `python server.py` and `python -m wsapp [module:attribute]` both end up here.

The caller has already run `gevent.monkey.patch_all()`. The app is `WSAPP_APP` (or the argument):
`module:attribute`, a Flask app with a `Realtime` extension or a factory that returns one; default
the bundled server. One process serves it with gevent's WSGI server and wsapp's upgrade handler and
drains on SIGTERM; `WEB_CONCURRENCY>1` (with REDIS_URL) runs the same under gunicorn's arbiter.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

import gevent
from gevent.pywsgi import WSGIServer

from wsapp import greenlets, logs
from wsapp.config import Settings
from wsapp.exceptions import ConfigError
from wsapp.services import EXTENSION_KEY, Services, services_of

log = logging.getLogger("wsapp.server")
# gevent's WSGI server reports bad requests and socket errors here (its own access log is off: wsapp's
# handler writes one line per request to `wsapp.access`).
PYWSGI_ERRORS = logging.getLogger("gevent.pywsgi")

DEFAULT_APP = "wsapp.app:create_app"


def load_app(ref: str) -> Any:
    """Import `module:attribute` (default attribute `app`); call it if it is a factory, not an app.

    `myapp:app`, `myapp:create_app` and `myapp:create_app()` all work. The result must be a Flask
    app with a `Realtime` extension, or this raises ConfigError naming WSAPP_APP.
    """
    module_name, _, attr = ref.partition(":")
    attr = (attr or "app").removesuffix("()")
    # Like gunicorn: the user's module is found from the directory the server was started in, even
    # when that is not where server.py lives.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"WSAPP_APP={ref!r}: cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"WSAPP_APP={ref!r}: {module_name!r} has no attribute {attr!r}") from None
    app = target if hasattr(target, "wsgi_app") else target()
    if EXTENSION_KEY not in getattr(app, "extensions", {}):
        raise ConfigError(f"WSAPP_APP={ref!r} is not a Flask app with a wsapp.Realtime extension")
    return app


def raise_fd_limit() -> None:
    """Each connection is a file descriptor; the usual soft limit of 1024 is far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# Connections the kernel queues for accept() (capped by net.core.somaxconn).
LISTEN_BACKLOG = 1024
# How long the kernel holds a connection that has sent nothing before handing it over anyway.
DEFER_ACCEPT_SECONDS = 1


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket with `tune_listener`'s options set before it listens.

    Linux copies a listener's options to a connection when the connection is made, so one that came
    in between `listen()` and the options (a health check or a load generator polling the port;
    gevent's server looked up its own host name between the two) would lack them, and the handler,
    which asks the first accepted socket whether TCP_NODELAY is inherited, would then set it on every
    connection. SO_REUSEADDR as gevent and socket.create_server set it; IPv6 for a host with a colon."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune_listener(sock)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def tune_listener(listener: Any) -> None:
    """The listening socket's options, which accepted connections inherit on Linux (`listen` sets
    them before the socket listens; set later, connections made meanwhile miss them).

    TCP_DEFER_ACCEPT: be woken for a connection once its request has arrived, not at the TCP
    handshake, so the request greenlet reads at once instead of first parking on its socket: about a
    tenth of a WebSocket handshake's server CPU (docs/PERFORMANCE.md, "Connect time"). A client that
    sends nothing is accepted after about a second, and WSAPP_HANDSHAKE_TIMEOUT drops it.
    TCP_NODELAY: every connection needs it (WsappHandler.handle); set here, a setsockopt per
    connection is saved where the kernel copies it to accepted sockets (the handler checks once)."""
    if listener.family not in (socket.AF_INET, socket.AF_INET6):
        return
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is not None:
        with contextlib.suppress(OSError):
            listener.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS)
    with contextlib.suppress(OSError):
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune_gevent() -> None:
    """gevent records each greenlet's spawning stack (ten frames) and parent for debugging: time and
    memory spent on every connection's greenlet. Off unless GEVENT_TRACK_GREENLET_TREE says otherwise."""
    if "GEVENT_TRACK_GREENLET_TREE" not in os.environ:
        gevent.config.track_greenlet_tree = False


def setup_logging(settings: Settings, workers: int = 1) -> None:
    """LOG_LEVEL and LOG_FORMAT (text, or one JSON object per line) for this process (wsapp/logs.py)."""
    logs.setup_logging(settings.log_level, settings.log_format, workers)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m wsapp [module:attribute]   (default: $WSAPP_APP, else the bundled server)")
        return 0
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        logs.fatal(f"configuration error: {exc}")
        return 2
    app_ref = argv[0] if argv else settings.app or DEFAULT_APP
    workers = settings.workers
    setup_logging(settings, workers)
    if settings.web_concurrency > workers:
        log.warning("WEB_CONCURRENCY=%d needs REDIS_URL (workers must share rooms and the relay): "
                    "running one process", settings.web_concurrency)
    raise_fd_limit()
    tune_gevent()
    if settings.redis_url:  # bad credentials or TLS stop start-up here; an absent broker only degrades
        from wsapp.backends.redis_connect import check_broker  # not at the top: redis.cluster is slow to import

        try:
            check_broker(settings)
        except ConfigError as exc:
            logs.fatal(f"configuration error: {exc}")
            return 2
    if workers > 1:
        from wsapp.gunicorn import run_arbiter

        return run_arbiter(app_ref, settings)
    handler_class = _handler_class()  # its imports (Flask, gevent-websocket) before the port opens
    try:
        listener = listen(settings.host, settings.port, LISTEN_BACKLOG)
        listener.setblocking(False)  # as gevent's own listeners: its accept loop waits on the event loop
    except OSError as exc:
        logs.fatal(f"cannot listen on {settings.host}:{settings.port}: {exc}")
        return 1
    server = WSGIServer(listener, None, handler_class=handler_class, log=None, error_log=PYWSGI_ERRORS,
                        spawn=greenlets.spawn)
    server.init_socket()
    logs.route_gevent_errors()
    try:
        return serve(app_ref, settings, server)
    except ConfigError as exc:
        logs.fatal(f"configuration error: {exc}")
        return 2


def _handler_class() -> type:
    from wsapp.handler import WsappHandler

    return WsappHandler


def serve(app_ref: str, settings: Settings, server: WSGIServer) -> int:
    """Build the app in this process and serve until SIGTERM has drained it."""
    # A SIGTERM while the app is being built (Redis may take a moment) ends this process cleanly.
    early = gevent.event.Event()
    early_handlers = [gevent.signal_handler(sig, early.set) for sig in (signal.SIGTERM, signal.SIGINT)]
    app = load_app(app_ref)
    services = services_of(app)
    for handler in early_handlers:
        handler.cancel()
    if early.is_set():
        log.info("stopped before serving")
        services.backend.close()
        return 0
    server.application = app
    tune_gc(settings)
    stopped = gevent.event.Event()
    draining = False

    def drain() -> None:
        nonlocal draining
        if draining:
            return
        draining = True
        server.close()  # stop accepting; open connections carry on
        drain_services(services)
        stopped.set()

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(drain))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(drain))
    server.start()
    services.monitor.start()
    log.info("wsapp listening on http://%s:%d (broker: %s)", settings.host, server.server_port, services.backend.name)
    stopped.wait()
    services.monitor.stop()
    log.info("stopped")
    return 0


def tune_gc(settings: Settings) -> None:
    """A serving process: freeze what start-up made (imports, the app) out of the collector's way and
    collect young objects less often. Python's default (700 allocations) ran full collections over
    every connection's objects often enough to take ~40% of a busy server's CPU with 4,000 clients
    (py-spy, docs/SCALING.md); cycles are still collected, only in larger batches."""
    if settings.gc_threshold:
        gc.collect()
        gc.freeze()
        _, middle, old = gc.get_threshold()
        gc.set_threshold(settings.gc_threshold, middle, old)


def drain_services(services: Services) -> None:
    """SIGTERM: close every connection with 1001 after what is queued for it, within
    WSAPP_DRAIN_SECONDS, then leave the broker."""
    settings = services.settings
    log.info("draining %d connections (at most %.0fs)", len(services.registry), settings.drain_seconds)
    services.registry.drain(time.monotonic() + settings.drain_seconds)
    services.backend.close()
