"""The bundled server as an app factory: relay `/`, rooms `/ws`, echo, the page, health, stats, metrics."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from wsapp.config import Settings
from wsapp.services import EXTENSION_KEY, build_services

def _static_dir() -> Path:
    """The browser client: inside the package when installed from a wheel, else the repository's `static/`."""
    here = Path(__file__).resolve().parent
    packaged = here / "static"
    return packaged if packaged.is_dir() else here.parent / "static"


STATIC_DIR = _static_dir()


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app and its services; `settings` defaults to `Settings.from_env()`."""
    settings = settings or Settings.from_env()
    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.extensions[EXTENSION_KEY] = build_services(settings)
    from wsapp.routes import bp

    app.register_blueprint(bp)
    return app
