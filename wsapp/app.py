"""The bundled server, built with the public API: relay `/`, rooms `/ws`, echo, page, health, stats."""

from __future__ import annotations

from flask import Flask

from wsapp.config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """The bundled server's Flask app; `settings` defaults to `Settings.from_env()`."""
    from wsapp.extension import Realtime

    app = Flask(__name__, static_folder=None)
    rt = Realtime(app, settings=settings)  # the rooms protocol at /ws
    rt.mount_relay("/")
    rt.mount_echo("/echo")
    rt.mount_page("/")
    rt.mount_ops()
    rt.mount_publish_api()
    return app
