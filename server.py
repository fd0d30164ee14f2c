"""Run wsapp: `python server.py`. Reads $PORT, $HOST and WSAPP_* from the environment; drains on SIGTERM."""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
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
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _raise_fd_limit()
    app = create_app(settings)
    services = services_of(app)
    server = WSGIServer((settings.host, settings.port), app, handler_class=WsappHandler, log=None, backlog=1024)
    try:
        server.init_socket()
    except OSError as exc:
        print(f"wsapp: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    stopped = gevent.event.Event()

    def drain() -> None:
        log.info("SIGTERM: draining %d connections (at most %.0fs)", len(services.registry), settings.drain_seconds)
        server.close()  # stop accepting; open connections carry on
        services.registry.drain(time.monotonic() + settings.drain_seconds)
        services.backend.close()
        stopped.set()

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(drain))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(drain))
    server.start()
    log.info("wsapp listening on http://%s:%d (broker: %s)", settings.host, server.server_port, services.backend.name)
    stopped.wait()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
