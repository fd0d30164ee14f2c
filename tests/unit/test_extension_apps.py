"""One Realtime, several apps: the Flask extension convention (`rt = Realtime()`, `init_app` in a factory)."""

from __future__ import annotations

from flask import Flask

from wsapp.config import Settings
from wsapp.extension import Realtime
from wsapp.services import services_of

rt = Realtime(settings=Settings(jwt_secret="s" * 32))


@rt.route("/feed/<topic>")
def feed(ws, topic):  # type: ignore[no-untyped-def]
    ws.send(topic)


def create_app() -> Flask:
    app = Flask(__name__)
    rt.init_app(app)
    return app


def rules(app: Flask) -> dict[str, bool]:
    return {r.rule: bool(r.websocket) for r in app.url_map.iter_rules() if r.rule != "/static/<path:filename>"}


def test_a_factory_called_twice_gets_two_complete_apps() -> None:
    first, second = create_app(), create_app()
    rt.mount_relay("/live")  # after both: applies to both
    for app in (first, second):
        assert rules(app) == {"/ws": True, "/feed/<topic>": True, "/live": True}
    assert services_of(first) is not services_of(second)
    assert services_of(first).hub is not services_of(second).hub
    with first.app_context():
        assert rt.app is first and rt.services is services_of(first)
    with second.app_context():
        assert rt.services is services_of(second)
    assert rt.websocket_route("wsapp.relay") is not None
    # The built-in JWT authenticator is built once per configuration, not once per call.
    settings = services_of(first).settings
    assert rt.authenticator(settings) is rt.authenticator(settings) is not None
