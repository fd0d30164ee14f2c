"""wsapp: a real-time WebSocket server (Flask + gevent) with a Node `ws`-compatible relay and JSON rooms.

The package imports nothing eagerly, so the sans-I/O modules (`frames`, `protocol`, `hub`,
`backends.memory`) load without gevent or Flask; `create_app` and `Settings` are fetched on use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from wsapp.app import create_app

        return create_app
    if name == "Settings":
        from wsapp.config import Settings

        return Settings
    raise AttributeError(name)
