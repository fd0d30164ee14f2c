"""wsapp: real-time WebSockets for Flask on gevent: your routes and hooks, rooms, a Node `ws`-compatible relay.

    from wsapp import Realtime, Refuse, Reject
    rt = Realtime(app)

The package imports nothing eagerly, so the sans-I/O modules (`frames`, `protocol`, `hub`,
`backends.memory`) load without gevent or Flask; the names below are fetched on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ConnectionClosed", "Emitter", "Identity", "JoinedRoom", "Realtime", "Refuse", "Reject", "Seq", "Settings",
    "WebSocket", "create_app",
]

_WHERE = {
    "Realtime": "wsapp.extension",
    "WebSocket": "wsapp.websocket",
    "JoinedRoom": "wsapp.websocket",
    "Refuse": "wsapp.exceptions",
    "Reject": "wsapp.exceptions",
    "ConnectionClosed": "wsapp.exceptions",
    "Identity": "wsapp.auth",
    "Emitter": "wsapp.emitter",
    "Seq": "wsapp.backends",
    "Settings": "wsapp.config",
    "create_app": "wsapp.app",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'wsapp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
