"""wsapp.route_match: the same endpoint as Werkzeug's `bind_to_environ(environ).match()`, remembered
only where that cannot change the answer."""

from __future__ import annotations

from typing import Any

from werkzeug.routing import BaseConverter, Map, Rule

from wsapp import route_match
from wsapp.route_match import endpoint_for


def upgrade(path: str, host: str = "chat.example", query: str = "") -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": query,
            "HTTP_HOST": host, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "wsgi.url_scheme": "http",
            "HTTP_CONNECTION": "Upgrade", "HTTP_UPGRADE": "websocket"}


def werkzeug(url_map: Map, environ: dict[str, Any]) -> str | None:
    try:
        return str(url_map.bind_to_environ(environ).match()[0])
    except Exception:
        return None


class Allowed(BaseConverter):
    """A converter whose answer changes over time (rooms that exist now)."""

    names: set[str] = set()

    def to_python(self, value: str) -> str:
        from werkzeug.routing import ValidationError

        if value not in self.names:
            raise ValidationError
        return value


def make_map() -> Map:
    return Map([Rule("/ws", endpoint="ws", websocket=True), Rule("/rooms/<allowed:name>", endpoint="room",
                                                                  websocket=True),
                Rule("/page", endpoint="page"), Rule("/dir/", endpoint="dir", websocket=True)],
               converters={"allowed": Allowed})


def test_same_answers_as_werkzeug() -> None:
    url_map = make_map()
    Allowed.names = {"a"}
    for env in (upgrade("/ws"), upgrade("/ws", query="name=x"), upgrade("/ws", host="other:1"),
                upgrade("/nowhere"), upgrade("/page"), upgrade("/rooms/a"), upgrade("/rooms/b"),
                upgrade("/dir"), upgrade("/dir/"), {**upgrade("/ws"), "REQUEST_METHOD": "POST"},
                {**upgrade("/ws"), "HTTP_UPGRADE": "h2c"}):
        for _ in range(2):  # the second time from what was remembered, if anything
            assert endpoint_for(url_map, env) == werkzeug(url_map, env), env


def test_converter_routes_are_asked_each_time() -> None:
    url_map = make_map()
    Allowed.names = {"a"}
    assert endpoint_for(url_map, upgrade("/rooms/a")) == "room"
    Allowed.names = set()
    assert endpoint_for(url_map, upgrade("/rooms/a")) is None
    Allowed.names = {"a"}
    assert endpoint_for(url_map, upgrade("/rooms/a")) == "room"


def test_rule_added_later_is_seen() -> None:
    url_map = make_map()
    assert endpoint_for(url_map, upgrade("/late")) is None
    assert endpoint_for(url_map, upgrade("/ws")) == "ws"
    url_map.add(Rule("/late", endpoint="late", websocket=True))
    assert endpoint_for(url_map, upgrade("/late")) == "late"
    assert endpoint_for(url_map, upgrade("/ws")) == "ws"
    url_map.add(Rule("/late-too", endpoint="late", websocket=True))  # a second rule of a known endpoint
    assert endpoint_for(url_map, upgrade("/late-too")) == "late"


def test_bounded() -> None:
    url_map = make_map()
    for i in range(3 * route_match.MAX_REMEMBERED):
        assert endpoint_for(url_map, upgrade("/ws", host=f"h{i}.example")) == "ws"
    assert 0 < len(route_match._remembered[url_map]) <= route_match.MAX_REMEMBERED
