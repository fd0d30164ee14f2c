"""wsapp: a real-time WebSocket server (Flask + gevent) with a Node `ws`-compatible relay and JSON rooms."""

from wsapp.app import create_app
from wsapp.config import Settings

__all__ = ["Settings", "create_app"]
