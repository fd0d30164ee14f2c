"""A user's app that takes only some of the built-in endpoints, at paths of its own."""

from __future__ import annotations

from flask import Flask

from wsapp import Realtime


def create() -> Flask:
    app = Flask(__name__)
    rt = Realtime(app, rooms_path=None)
    rt.mount_relay("/live")
    rt.mount_ops(url_prefix="/ops")
    return app
