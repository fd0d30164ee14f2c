"""`Realtime`: wsapp as a Flask extension. Your app, your HTTP routes, your WebSocket routes.

    app = Flask(__name__)
    rt = Realtime(app)                  # or Realtime() and later rt.init_app(app)

    @rt.route("/shout")
    def shout(ws):
        for message in ws:
            ws.send(message.upper())

A WebSocket route is a Flask rule declared with `websocket=True`; wsapp's upgrade handler (in
gevent.pywsgi, or gunicorn with `wsapp.gunicorn.Worker`) runs every check before the 101, the
`authenticate` hook included, in a request context; then the handler runs in the connection's
greenlet with a `WebSocket` handle. The bundled server (`wsapp.app.create_app`) is built with this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Flask, Request, Response, current_app, has_app_context, request

from wsapp import protocol
from wsapp.auth import JwtAuthenticator
from wsapp.backends import Seq
from wsapp.config import Settings
from wsapp.connection import Connection, MessageHandler
from wsapp.exceptions import MessageError
from wsapp.policy import Authorize, OnPublish, Policy
from wsapp.services import EXTENSION_KEY, Services, build_services, services_of
from wsapp.websocket import WebSocket

log = logging.getLogger(__name__)

Handler = Callable[..., Any]
# A callback route (the built-in relay, echo and rooms): `start(conn, services, identity)` sets the
# connection up and returns what to call with each message and what to call at the end (or None).
# What it sends (rooms: `welcome`) leaves with the 101, in one send. Such a connection holds no
# greenlet while it is quiet, and no Flask request context at all.
Start = Callable[[Connection, Services, Any], tuple[MessageHandler, Callable[[Connection], None] | None]]
Authenticate = Callable[[Request], Any]
F = TypeVar("F", bound=Callable[..., Any])

# What the upgrade handler leaves in the WSGI environ for the route's view.
ENV_CONNECTION = "wsapp.connection"
ENV_IDENTITY = "wsapp.identity"
ENV_SUBPROTOCOL = "wsapp.subprotocol"


@dataclass(frozen=True)
class WebSocketRoute:
    """What a WebSocket route declares: the upgrade handler reads this, never an endpoint name."""

    path: str
    endpoint: str
    handler: Handler
    # Sec-WebSocket-Protocol values it speaks, in order of preference.
    subprotocols: tuple[str, ...] = ()
    # Whether the app's authenticate hook runs before its 101; None = WSAPP_AUTH_ALL_ROUTES decides
    # (the relay and echo, which Node `ws` clients reach without credentials by default).
    authenticate: bool | None = True
    # Set for a callback route (see `Start`): the upgrade handler runs it instead of the Flask view.
    start: Start | None = None
    # A callback route's messages count against WSAPP_RATE_LIMIT (over it: close 1008).
    rate_limited: bool = True

    def needs_authentication(self, settings: Settings) -> bool:
        return settings.auth_all_routes if self.authenticate is None else self.authenticate


class Realtime:
    """The wsapp extension: WebSocket routes, hooks, publishing, and the built-in endpoints."""

    def __init__(self, app: Flask | None = None, settings: Settings | None = None, rooms_path: str | None = "/ws"):
        self._settings = settings
        self._routes: dict[str, WebSocketRoute] = {}
        # Every registration made on this extension, replayed on each app it is initialised with.
        self._registrations: list[Callable[[Flask], None]] = []
        self._apps: list[Flask] = []
        self._authenticate: Authenticate | None = None
        self._jwt: dict[Settings, JwtAuthenticator] = {}
        self.policy = Policy()
        if rooms_path:
            self.mount_rooms(rooms_path)
        if app is not None:
            self.init_app(app)

    # ---- wiring ---------------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Build this app's services (settings, broker, hub, registry) and register every route on it.

        One Realtime may serve several apps (an app factory called twice, tests): each gets services of
        its own, and routes, hooks and mounts made before or after apply to all of them."""
        settings = self._settings or Settings.from_env()
        services = build_services(settings)
        services.realtime = self
        app.extensions[EXTENSION_KEY] = services
        self._apps.append(app)
        for register in self._registrations:
            register(app)

    def _when_ready(self, register: Callable[[Flask], None]) -> None:
        self._registrations.append(register)
        for app in self._apps:
            register(app)

    @property
    def app(self) -> Flask | None:
        """The app this extension serves: the current one inside an app context, else the last one."""
        if has_app_context() and EXTENSION_KEY in current_app.extensions:
            return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
        return self._apps[-1] if self._apps else None

    @property
    def services(self) -> Services:
        """The services of `app` (see there)."""
        app = self.app
        if app is None:
            raise RuntimeError("Realtime has no app yet: call init_app(app) first")
        return services_of(app)

    def websocket_route(self, endpoint: str) -> WebSocketRoute | None:
        """The WebSocket route registered under a Flask endpoint, or None (the upgrade is refused 404)."""
        return self._routes.get(endpoint)

    # ---- WebSocket routes -----------------------------------------------------------------------

    def route(
        self, path: str, subprotocols: list[str] | tuple[str, ...] = (), authenticate: bool | None = True,
        endpoint: str | None = None,
    ) -> Callable[[F], F]:
        """Decorator: `handler(ws, **url_args)` serves WebSocket upgrades to `path` (a Flask rule, so
        `/rooms/<name>` works), in the connection's greenlet, until it returns or the peer closes."""

        def decorate(handler: F) -> F:
            self.add_route(path, handler, subprotocols, authenticate, endpoint)
            return handler

        return decorate

    def add_route(
        self, path: str, handler: Handler, subprotocols: list[str] | tuple[str, ...] = (),
        authenticate: bool | None = True, endpoint: str | None = None,
    ) -> WebSocketRoute:
        """`route` without the decorator."""
        return self._add(WebSocketRoute(path, endpoint or f"wsapp_ws.{handler.__module__}.{handler.__qualname__}",
                                        handler, tuple(subprotocols), authenticate))

    def _add_callback_route(
        self, path: str, endpoint: str, start: Start, subprotocols: tuple[str, ...], authenticate: bool | None,
        rate_limited: bool = True,
    ) -> WebSocketRoute:
        def unreachable(ws: WebSocket) -> None:  # the upgrade handler runs `start`, never a view
            raise RuntimeError(f"{endpoint} is a callback route")

        return self._add(WebSocketRoute(path, endpoint, unreachable, subprotocols, authenticate, start, rate_limited))

    def _add(self, spec: WebSocketRoute) -> WebSocketRoute:
        path, endpoint = spec.path, spec.endpoint
        if endpoint in self._routes:
            raise ValueError(f"a WebSocket route with endpoint {endpoint!r} exists already")
        self._routes[endpoint] = spec

        def view(**kwargs: Any) -> Response:
            self._run(spec, kwargs)
            return Response(status=101)  # the 101 went out before; the handler never looks at this

        self._when_ready(lambda app: app.add_url_rule(path, endpoint, view, websocket=True))
        return spec

    def _run(self, spec: WebSocketRoute, kwargs: dict[str, Any]) -> None:
        services = services_of(current_app)
        env = request.environ
        conn: Connection = env[ENV_CONNECTION]
        ws = WebSocket(conn, services, self.policy, env.get(ENV_IDENTITY), env.get(ENV_SUBPROTOCOL))
        ws.run(spec.handler, kwargs)

    # ---- hooks ----------------------------------------------------------------------------------

    def authenticate(self, fn: F) -> F:
        """Decorator: `fn(request) -> identity`, before the 101 of every route that authenticates, in
        the Flask request context (cookies, session, headers). Raise `Refuse(status, reason)` to refuse.
        Without it, WSAPP_JWT_SECRET / WSAPP_JWT_JWKS_URL turn on the built-in JWT authenticator."""
        self._authenticate = fn
        return fn

    def authorize(self, fn: Authorize) -> Authorize:
        """Decorator: `fn(identity, action, room) -> bool` for every join and publish ("join"/"publish")
        of the rooms protocol and of `ws.join`/`ws.publish`; False answers `error` `forbidden`."""
        self.policy.authorize = fn
        return fn

    def on_publish(self, fn: OnPublish) -> OnPublish:
        """Decorator: `fn(identity, room, data) -> data` before a client's publish is numbered: validate,
        transform or store it; raise `Reject(code, message)` to answer the sender with an `error`."""
        self.policy.on_publish = fn
        return fn

    def authenticator(self, settings: Settings) -> Authenticate | None:
        """The hook the upgrade handler calls: the app's, else the built-in JWT one when configured."""
        if self._authenticate is not None:
            return self._authenticate
        if settings.jwt_secret or settings.jwt_jwks_url:
            if settings not in self._jwt:
                self._jwt[settings] = JwtAuthenticator(settings)  # one key cache per configuration
            return self._jwt[settings]
        return None

    # ---- publishing -----------------------------------------------------------------------------

    def publish(self, room: str, data: Any, sender: str = "server") -> Seq:
        """Publish `data` to `room` from server code (a view, a greenlet): numbered, kept in history and
        delivered to its members on every process sharing the broker. Returns the seq: an int with
        `.epoch`, the numbering life it belongs to (as in `joined` and `ack`). Like a client's
        burst, a burst of publishes waits while a recipient is over its backlog cap (at most the
        slow-consumer grace, after which that recipient is closed 1013). ValueError for a bad room
        name or sender."""
        try:
            protocol.check_room(room)
            protocol.check_sender(sender)
        except MessageError as exc:
            raise ValueError(exc.message) from None
        services = self.services
        seq = services.hub.post(room, data, sender)
        services.outbox.pace_if_needed()  # a burst of publishes waits for slow recipients like a client's
        return seq

    # ---- built-in endpoints ---------------------------------------------------------------------

    def mount_rooms(self, path: str = "/ws") -> None:
        """The JSON rooms protocol (presence, history, acks) at `path`, with this app's hooks."""
        from wsapp.rooms import RoomsSession

        def rooms(conn: Connection, services: Services, identity: Any) -> tuple[MessageHandler, Callable[..., None]]:
            session = RoomsSession(conn, services, self.policy, identity)
            session.welcome()
            return session.on_message, services.hub.leave_all

        # Rate limiting there answers `rate_limited` before closing, so the generic 1008 is off.
        self._add_callback_route(path, "wsapp.rooms", rooms, ("wsapp",), True, rate_limited=False)

    def mount_relay(self, path: str = "/") -> None:
        """The Node `ws` broadcast server at `path`: each message to every other client, same type."""

        def relay(conn: Connection, services: Services, identity: Any) -> tuple[MessageHandler, Callable[..., None]]:
            return services.relay.attach(conn)

        self._add_callback_route(path, "wsapp.relay", relay, ("wsapp",), None)

    def mount_echo(self, path: str = "/echo") -> None:
        """Every message back to its sender (conformance runs, probes)."""
        from wsapp.relay import echo_handler

        def echo(conn: Connection, services: Services, identity: Any) -> tuple[MessageHandler, None]:
            return echo_handler(conn, services.stats), None

        self._add_callback_route(path, "wsapp.echo", echo, ("wsapp",), None)

    def mount_page(self, path: str = "/", static_url: str = "/static") -> None:
        """The browser chat client at `path` (GET), its files under `static_url`; it talks to `/ws`."""
        from wsapp.routes import page_blueprint

        self._when_ready(lambda app: app.register_blueprint(page_blueprint(path, static_url)))

    def mount_ops(self, url_prefix: str | None = None) -> None:
        """`/healthz`, `/livez`, `/readyz`, `/stats` and `/metrics` (under `url_prefix` if given)."""
        from wsapp.routes import ops_blueprint

        self._when_ready(lambda app: app.register_blueprint(ops_blueprint(), url_prefix=url_prefix))

    def mount_publish_api(self, path: str = "/api/publish") -> None:
        """`POST path` for other backends, on only when WSAPP_API_KEY is set (else nothing is mounted)."""

        def register(app: Flask) -> None:
            if not services_of(app).settings.api_key:
                log.info("WSAPP_API_KEY is not set: %s is not served", path)
                return
            from wsapp.api import publish_api_view

            app.add_url_rule(path, "wsapp_publish_api", publish_api_view, methods=["POST"])

        self._when_ready(register)
