"""Several processes on one machine: wsapp under gunicorn's arbiter.

`gunicorn -k wsapp.gunicorn.Worker -w 4 myapp:app` serves a Flask app that has a `Realtime`
extension with wsapp's upgrade handler in each worker; `python server.py` with WEB_CONCURRENCY>1
starts the same arbiter through `run_arbiter`. The arbiter replaces a worker that dies; SIGTERM
drains every worker (1001) and SIGHUP starts new workers while the old ones drain.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import select
import socket
import sys
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config
from gunicorn.errors import AppImportError
from gunicorn.http.wsgi import base_environ
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import VERSION, GeventPyWSGIWorker

from wsapp import greenlets, logs
from wsapp.cli import PYWSGI_ERRORS, drain_services, listen, load_app, setup_logging, tune_gc, tune_gevent
from wsapp.config import Settings
from wsapp.exceptions import ConfigError
from wsapp.metrics_share import ENV_DIR, prepare_dir, remove_dir
from wsapp.services import EXTENSION_KEY, Services, services_of

log = logging.getLogger("wsapp.server")

# What a worker may still need once its drain (WSAPP_DRAIN_SECONDS) is over: noticing the signal
# (up to one heartbeat), leaving the broker, exiting. gunicorn SIGKILLs a worker after its
# graceful_timeout, so that timeout is the drain plus this.
DRAIN_MARGIN_SECONDS = 5.0
# How often a worker tells the arbiter it is alive (the arbiter kills one silent for `timeout`).
HEARTBEAT_SECONDS = 1.0
# Connections the kernel holds for the workers to accept (gunicorn's default backlog).
LISTEN_BACKLOG = 2048


def graceful_timeout(settings: Settings) -> int:
    """gunicorn's graceful_timeout (whole seconds) that lets a worker finish its drain."""
    return math.ceil(settings.drain_seconds + DRAIN_MARGIN_SECONDS)


class _Server(WSGIServer):
    """gevent's WSGI server that knows its worker (for the request count)."""

    worker: Worker


def _counting_handler() -> type[WSGIHandler]:
    """wsapp's upgrade handler (every pre-101 check), counting requests for gunicorn's max_requests.

    Imported in the worker, after gevent's monkey-patching: the handler pulls in modules that keep
    names from `ssl`, and the arbiter (which loads this module) is not patched.
    """
    from wsapp.handler import WsappHandler

    class CountingHandler(WsappHandler):
        server: _Server

        def run_application(self) -> None:
            self.server.worker.request_started()
            super().run_application()

    return CountingHandler


class Worker(GeventPyWSGIWorker):
    """gunicorn's gevent worker serving with wsapp's upgrade handler; drains on a graceful stop.

    On SIGTERM (arbiter stopping, SIGHUP reload, max_requests) it stops accepting, closes every
    WebSocket with 1001 after what is queued for it (within WSAPP_DRAIN_SECONDS), then exits.
    """

    alive: bool  # gunicorn's flag: False once a graceful stop began

    @classmethod
    def check_config(cls, cfg: Config, glog: Any) -> None:
        """In the arbiter, before any worker: no preloading; graceful_timeout covers WSAPP_DRAIN_SECONDS."""
        if cfg.preload_app:
            # The app would be built in the arbiter, before gevent is set up, and its broker
            # connection shared by every worker.
            raise RuntimeError("wsapp.gunicorn.Worker cannot preload the app (--preload): each worker builds its own")
        _metrics_dir()
        try:
            settings = Settings.from_env()
        except ConfigError:
            return  # each worker reports it when it loads the app
        needed = graceful_timeout(settings)
        if cfg.graceful_timeout < needed:
            glog.info("graceful_timeout raised from %ss to %ss to cover WSAPP_DRAIN_SECONDS=%s",
                      cfg.graceful_timeout, needed, settings.drain_seconds)
            cfg.set("graceful_timeout", needed)

    def load_wsgi(self) -> None:
        # A failure is logged here, through the configured handlers, and ends the worker with the status
        # that makes the arbiter stop: gunicorn's own path would also print() it to stderr, a line that
        # is not JSON under LOG_FORMAT=json.
        try:
            super().load_wsgi()
            if EXTENSION_KEY not in getattr(self.wsgi, "extensions", {}):
                ref = getattr(self.app, "app_uri", None) or "the app"
                raise AppImportError(
                    f"{ref} is not a Flask app with a wsapp.Realtime extension (it is a "
                    f"{type(self.wsgi).__name__}), which wsapp.gunicorn.Worker needs: give gunicorn the "
                    "Flask app itself, not a wrapper around it")
        except AppImportError as exc:
            self.log.error("%s", exc)
            sys.exit(Arbiter.APP_LOAD_ERROR)  # the arbiter stops instead of respawning
        except Exception:
            self.log.exception("cannot load the app")
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def request_started(self) -> None:
        """gunicorn's max_requests: after that many, this worker drains and the arbiter replaces it."""
        self.nr += 1
        if self.alive and self.nr >= self.max_requests:
            self.log.info("Autorestarting worker after %d requests.", self.nr)
            self.alive = False
            with contextlib.suppress(OSError):
                os.write(self.PIPE[1], b".")  # ends run()'s wait

    def notify(self) -> None:
        """Heartbeat to the arbiter; if the arbiter is gone, drain (gunicorn's gevent worker just exits)."""
        self.tmp.notify()
        if self.alive and self.ppid != os.getppid():
            self.log.info("Parent changed, draining: %s", self)
            self.alive = False

    def run(self) -> None:
        tune_gevent()
        services = services_of(self.wsgi)
        settings = services.settings
        if not logging.getLogger().handlers:  # run by the gunicorn command, not by wsapp.cli
            setup_logging(settings, self.cfg.workers)
        logs.route_gevent_errors()
        tune_gc(settings)
        if self.cfg.workers > 1 and not settings.redis_url:
            log.warning("%d workers without REDIS_URL: each keeps its own rooms and relay clients, so users "
                        "split between workers; set REDIS_URL to share them", self.cfg.workers)
        if settings.drain_seconds > self.cfg.graceful_timeout - DRAIN_MARGIN_SECONDS:
            log.warning("graceful_timeout=%ss may end the drain (WSAPP_DRAIN_SECONDS=%s) early; use %ss",
                        self.cfg.graceful_timeout, settings.drain_seconds, graceful_timeout(settings))
        servers = [self._serve(listener, services) for listener in self.sockets]
        services.monitor.start()
        while self.alive:
            self.notify()
            # A signal writes to PIPE (gunicorn's wakeup fd) and so ends this wait at once.
            select.select([self.PIPE[0]], [], [], HEARTBEAT_SECONDS)
            with contextlib.suppress(OSError):
                os.read(self.PIPE[0], 4096)
        for server in servers:
            server.close()  # stop accepting; open connections carry on until the drain closes them
        drainer = gevent.spawn(drain_services, services)
        while not drainer.ready():
            self.notify()  # the arbiter must not take a draining worker for a hung one
            drainer.join(HEARTBEAT_SECONDS)
        services.monitor.stop()  # its counters stay in the instance's figures
        log.info("stopped")

    def _serve(self, listener: socket.socket, services: Services) -> WSGIServer:
        listener.setblocking(True)
        environ = base_environ(self.cfg)
        environ["SERVER_SOFTWARE"] = VERSION
        ssl_args: dict[str, Any] = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        # A WebSocket holds its greenlet for hours and the registry answers 503 beyond
        # WSAPP_MAX_CONNECTIONS, so the pool leaves worker_connections slots above that for HTTP
        # requests and those refusals instead of silently leaving connections in the backlog.
        pool = greenlets.Bounded(services.settings.max_connections + self.worker_connections)
        server = _Server(listener, application=self.wsgi, spawn=pool, log=None, error_log=PYWSGI_ERRORS,
                         handler_class=_counting_handler(), environ=environ, **ssl_args)
        server.worker = self
        server.start()
        log.info("wsapp listening on %s (broker: %s, worker pid %d)",
                 _url(listener, self.cfg.is_ssl), services.backend.name, os.getpid())
        return server


def _metrics_dir() -> None:
    """In the arbiter: the directory where workers share their figures (WSAPP_METRICS_DIR, emptied;
    else a temporary one removed when the arbiter exits), in the environment the workers inherit."""
    global _metrics_dir_owner
    if _metrics_dir_owner == os.getpid():
        return  # a reload (SIGHUP) checks the configuration again: keep the directory
    _metrics_dir_owner = arbiter = os.getpid()
    path, created = prepare_dir(os.environ.get(ENV_DIR))
    os.environ[ENV_DIR] = path
    log.info("workers share their figures in %s", path)

    def remove() -> None:
        # Workers are forked from the arbiter and inherit its atexit hooks: only the arbiter removes it.
        if os.getpid() == arbiter:
            remove_dir(path)

    if created:
        atexit.register(remove)


_metrics_dir_owner = 0


def _url(listener: socket.socket, tls: bool) -> str:
    address = listener.getsockname()
    if isinstance(address, str | bytes):
        return f"unix:{address!s}"
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


class _Arbiter(BaseApplication):  # type: ignore[misc]
    """gunicorn configured from wsapp's Settings (not from the command line), loading `app_ref`."""

    def __init__(self, app_ref: str, settings: Settings, listener_fd: int) -> None:
        self._app_ref = app_ref
        self._settings = settings
        self._listener_fd = listener_fd
        super().__init__(prog="wsapp")

    def load_config(self) -> None:
        settings = self._settings
        options = {
            "bind": [f"fd://{self._listener_fd}"],
            "workers": settings.workers,
            "worker_class": "wsapp.gunicorn.Worker",
            "graceful_timeout": graceful_timeout(settings),
            "loglevel": settings.log_level.lower(),
            "errorlog": "-",
            # gunicorn's own lines in wsapp's format (LOG_FORMAT), through wsapp's handlers.
            "logger_class": "wsapp.logs.GunicornLogger",
            "accesslog": None,
            "proc_name": "wsapp",
            # gunicorn's control socket is one path per user ($HOME/.gunicorn/gunicorn.ctl): two
            # instances would fight over it, and wsapp is run by signals.
            "control_socket_disable": True,
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        # Runs in each worker (no preload), so each builds its own app, hub and broker connection,
        # and a SIGHUP's new workers import the app's code afresh.
        try:
            return load_app(self._app_ref)
        except ConfigError as exc:
            raise AppImportError(f"wsapp: configuration error: {exc}") from None


def _bind(settings: Settings) -> socket.socket:
    return listen(settings.host, settings.port, LISTEN_BACKLOG)


def run_arbiter(app_ref: str, settings: Settings) -> int:
    """Serve `app_ref` with settings.workers gunicorn workers until SIGTERM; the exit status."""
    # Bound here rather than by gunicorn: a bad HOST/PORT fails at once (gunicorn retries for 5 s),
    # and PORT=0 picks one port that every worker accepts on, SIGHUP's new ones included.
    try:
        listener = _bind(settings)
    except OSError as exc:
        logs.fatal(f"cannot listen on {settings.host}:{settings.port}: {exc}")
        return 1
    arbiter_pid = os.getpid()
    try:
        _Arbiter(app_ref, settings, listener.detach()).run()
    except SystemExit as exc:
        if os.getpid() != arbiter_pid:
            raise  # a worker leaving: never return into the arbiter's caller
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.stderr.flush()
    return 0
