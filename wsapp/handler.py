"""The upgrade, inside gevent.pywsgi: every check happens before the 101, and a refusal is a real
HTTP status. After the 101 the request greenlet becomes the connection's reader."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from flask import request as flask_request
from gevent import socket as gsocket
from gevent.pywsgi import Input, WSGIHandler
from geventwebsocket.handler import WebSocketHandler

from wsapp.auth import Identity, client_ip
from wsapp.connection import CAUSE_INTERNAL_ERROR, Closed, Connection
from wsapp.deflate import negotiate
from wsapp.exceptions import Refuse
from wsapp.extension import ENV_CONNECTION, ENV_IDENTITY, ENV_SUBPROTOCOL, WebSocketRoute
from wsapp.frames import CloseCode
from wsapp.handshake import accept_key, check_upgrade, is_upgrade, query_value, select_subprotocol
from wsapp.request_headers import environ_headers, parse_headers
from wsapp.rooms import display_name
from wsapp.route_match import endpoint_for
from wsapp.services import Services, services_of
from wsapp.upgrade_request import PlainUpgrade, read_plain_upgrade

log = logging.getLogger(__name__)
# One line per HTTP request (never its query string: tokens travel there).
access_log = logging.getLogger("wsapp.access")


class WsappHandler(WebSocketHandler):
    """gevent-websocket's handler with wsapp's admission checks and wsapp's own connection object."""

    _refusal: Refuse | None = None
    _leftover = b""  # what a plain upgrade's client sent behind its head (wsapp/upgrade_request.py)
    socket: Any  # pywsgi's; None once the connection has taken it
    status: Any  # pywsgi's: the status line's bytes, or a str saying what failed

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None) -> None:
        # pywsgi's, but its request reader (`makefile`) is made when a request needs it: a plain
        # upgrade request is read without one (`handle_one_request`).
        self.socket = sock
        self.client_address = address
        self.server = server
        if rfile is not None:
            self.__dict__["rfile"] = rfile

    @property
    def rfile(self) -> Any:
        """pywsgi's buffered reader of the socket, made on first use."""
        reader = self.__dict__.get("rfile")
        if reader is None:
            reader = self.__dict__["rfile"] = self.socket.makefile("rb", -1)
        return reader

    @rfile.setter
    def rfile(self, reader: Any) -> None:
        self.__dict__["rfile"] = reader

    def handle(self) -> None:
        # Small frames must leave at once: Nagle + delayed ACK would add ~40 ms stalls to fan-out.
        # Linux copies it from a listener that has it (wsapp.cli.tune_listener): asked once per server.
        server = self.server.__dict__
        inherited = server.get("wsapp_nodelay_inherited")
        if inherited is None:
            inherited = _has_nodelay(self.socket)
            if inherited is not None:  # a socket that could not say (already reset) decides nothing
                server["wsapp_nodelay_inherited"] = inherited
        if not inherited:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A client that opens TCP and never finishes its request is dropped after this long.
        self.socket.settimeout(self._services().settings.handshake_timeout)
        super().handle()
        then = self.__dict__.get("_then")
        if then is not None:
            # The upgrade is done and pywsgi's frames are gone: drop the request (environ, headers,
            # parsed request line) this handler still holds, and serve the connection from here,
            # at the top of the greenlet, where its saved stack is small.
            self.__dict__.clear()
            then()

    def handle_one_request(self) -> Any:
        """pywsgi's, but a plain upgrade request (the usual one) is read in one look at the socket
        instead of line by line through a reader (wsapp/upgrade_request.py); anything else, or a
        socket with a reader already (its buffer may hold the request), is pywsgi's as before."""
        sock = self.socket
        if "rfile" in self.__dict__ or type(sock) is not gsocket.socket:
            return super().handle_one_request()
        try:
            request = read_plain_upgrade(sock, self.server.get_environ(), self.client_address)
        except OSError:  # reset, or the handshake timeout: pywsgi ends such connections quietly too
            return None
        if request is None:
            return super().handle_one_request()
        self._start_plain_upgrade(request)
        self.handle_one_response()
        return None if self.close_connection else True

    def _start_plain_upgrade(self, request: PlainUpgrade) -> None:
        """The state pywsgi's `handle_one_request` leaves before it calls `handle_one_response`."""
        self.requestline = request.requestline
        self.response_length = 0
        self.command, self.path, self.request_version = "GET", request.path, "HTTP/1.1"
        self.headers = request.headers
        self.content_length = None
        self.close_connection = request.close_connection
        self.environ = request.environ
        self.wsgi_input = Input(None, None)  # no body: nothing to discard after the response
        self._leftover = request.leftover
        self.application = self.server.application

    def MessageClass(self, fp: Any, *_args: Any) -> Any:  # pywsgi's name
        """The request headers, as pywsgi's own parser gives them, without its `email` parser for
        plain header blocks (wsapp/request_headers.py)."""
        return parse_headers(fp)

    def _headers(self) -> Any:  # pywsgi's: the HTTP_* pairs of the environ, from self.headers
        pairs = environ_headers(self.headers)
        return super()._headers() if pairs is None else pairs

    def _check_http_version(self) -> bool:  # pywsgi's, which parses the version into ints each time
        return self.request_version in _USUAL_VERSIONS or super()._check_http_version()

    def _services(self) -> Services:
        return services_of(self.server.application)

    def _client_ip(self, services: Services) -> str:
        # No environ when pywsgi refused the request line or headers (its 400s): the peer's address.
        forwarded = self.environ.get("HTTP_X_FORWARDED_FOR") if self.environ is not None else None
        return client_ip(self.client_address[0], forwarded,
                         services.settings.trusted_proxy_hops)

    def run_application(self) -> None:
        if not is_upgrade(self.environ):
            WSGIHandler.run_application(self)
            self._skip_refused_body()
            return
        services = self._services()
        try:
            route = self._admit(services)
        except Refuse as refusal:
            stats = services.stats
            stats.refused += 1
            stats.refusals[(str(refusal.status), refusal.kind)] += 1
            self._refusal = refusal  # its reason goes into the request's access line
            self._refuse(refusal)
            return
        self._upgrade_and_serve(services, route)

    def _skip_refused_body(self) -> None:
        """A request refused (4xx) before its body was read, a 413 for a huge upload say: close the
        connection instead of letting pywsgi read and discard the whole announced body first."""
        body = self.wsgi_input
        if body is None or not 400 <= (getattr(self, "code", 0) or 0) < 500:
            return
        if body.chunked_input or body.position < (body.content_length or 0):
            self.close_connection = True
            body._chunked_input_error = True  # pywsgi's own "the stream is unusable, do not discard" flag

    def _admit(self, services: Services) -> WebSocketRoute:
        """Every check before the 101, cheapest first; the route says whether it authenticates."""
        env = self.environ
        settings = services.settings
        refusal = check_upgrade(env, self.request_version, settings.allowed_origins)
        if refusal is not None:
            raise refusal
        app = self.server.application
        endpoint = endpoint_for(app.url_map, env)
        route = services.realtime.websocket_route(endpoint) if endpoint else None
        if route is None:
            raise Refuse(404, "no WebSocket endpoint at this path")
        limit = services.registry.refusal(self._client_ip(services))
        if limit is not None:
            raise limit
        authenticate = services.realtime.authenticator(settings) if route.needs_authentication(settings) else None
        if authenticate is not None:
            env[ENV_IDENTITY] = self._authenticate(app, authenticate)
        env[ENV_SUBPROTOCOL] = select_subprotocol(env.get("HTTP_SEC_WEBSOCKET_PROTOCOL"), route.subprotocols)
        return route

    def _authenticate(self, app: Any, authenticate: Any) -> Any:
        """The app's hook in a request context of this upgrade request (cookies, session, headers)."""
        try:
            with app.request_context(self.environ):
                return authenticate(flask_request)
        except Refuse:
            raise
        except Exception:
            log.exception("the authenticate hook failed for %s", self.environ.get("PATH_INFO"))
            raise Refuse(500, "authentication failed", kind="authenticate_hook_failed") from None

    def _take_buffered_input(self) -> bytes:
        """What pywsgi's reader already holds beyond the request (frames sent right behind it).

        The connection reads the socket itself from here on; closing the reader frees its 8 KiB
        buffer, a quarter of what an idle connection used to cost (docs/PERFORMANCE.md).
        """
        rfile = self.__dict__.get("rfile")  # pywsgi's `makefile("rb")`: a BufferedReader over the socket
        if rfile is None:  # a plain upgrade, read without one
            return self._leftover
        # Only what the reader holds: with its raw stream saying "nothing now", read1 returns the
        # buffered bytes or b"" without a recv. Bytes still in the kernel are the connection's to
        # read; asking for them here cost a recv failing with EAGAIN and its exception on nearly
        # every upgrade (the client waits for the 101 before it sends).
        rfile.raw.readinto = _nothing_now
        leftover: bytes = rfile.read1(65536)
        rfile.close()
        return leftover

    def _refuse(self, refusal: Refuse) -> None:
        body = (refusal.reason + "\n").encode("utf-8")
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        self.close_connection = True
        self.start_response(f"{refusal.status} {HTTPStatus(refusal.status).phrase}", headers + refusal.headers)
        self.write(body)

    def _upgrade_and_serve(self, services: Services, route: WebSocketRoute) -> None:
        """The 101, then the connection: a callback route's is parked on the event loop (no greenlet
        while quiet); a handler route's is served once pywsgi has unwound (see `handle`)."""
        env = self.environ
        settings = services.settings
        deflate = (negotiate(env.get("HTTP_SEC_WEBSOCKET_EXTENSIONS"), settings.deflate_min_bytes,
                             settings.deflate_level) if settings.deflate else None)
        leftover = self._take_buffered_input()
        env["wsgi.websocket"] = True  # tells gevent-websocket's start_response to send a bare 101
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key(env["HTTP_SEC_WEBSOCKET_KEY"].strip())),
        ]
        if env.get(ENV_SUBPROTOCOL):
            headers.append(("Sec-WebSocket-Protocol", env[ENV_SUBPROTOCOL]))
        if deflate is not None:
            headers.append(("Sec-WebSocket-Extensions", deflate.header))
        head = self._switch_protocols(headers)
        sock, parkable = self._take_socket()
        if not parkable:  # TLS: the wrapper writes, as it will the frames
            self._send_head(sock, head)
        conn = Connection(sock, leftover, self._client_ip(services), env.get("PATH_INFO", "/"), settings,
                          services.stats, services.outbox, deflate.params if deflate else None,
                          head if parkable else b"")
        if not parkable:
            conn.bytes_out += len(head)
        identity = env.get(ENV_IDENTITY)
        # An authenticated client is named after its identity, so nobody can pass for another user;
        # `?name=` names anonymous clients only.
        conn.name = display_name(str(identity) if identity is not None else query_value(env, "name"))
        if isinstance(identity, Identity) and identity.expires is not None:
            conn.expires_at = identity.expires
        services.registry.add(conn)
        if log.isEnabledFor(logging.INFO):  # its fields would be built for nothing otherwise
            fields = {"event": "ws_open", "conn": conn.id, "path": conn.path, "client": conn.remote_ip}
            log.info("conn %s open %s from %s", conn.id, conn.path, conn.remote_ip, extra={"fields": fields})
        self.close_connection = True
        if route.start is not None:
            _start_callback_route(route, conn, services, identity, parkable)
            return
        conn.flush_nowait()  # the 101, before the handler runs (its sends are its own business)
        env["wsgi.websocket"] = env[ENV_CONNECTION] = conn
        self._then = _view_runner(self.server.application, env, conn, services)

    def _switch_protocols(self, headers: list[tuple[str, str]]) -> bytes:
        """The 101's bytes: what gevent-websocket's `start_response` and pywsgi's `write` would send
        (no Date, no Content-Length), with the handler's state set as they leave it, but not sent: the
        connection writes them with the route's first frames (docs/PERFORMANCE.md)."""
        if any("\r" in value or "\n" in value for _, value in headers):  # pywsgi refuses it: keep its error
            self.start_response("101 Switching Protocols", headers)
            self.write(b"")
            raise AssertionError("pywsgi sent a header value with CR or LF")  # it raises ValueError first
        status = "101 Switching Protocols"
        self.status, self._orig_status, self.code = status.encode("latin-1"), status, 101
        self.response_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        self.provided_date = True  # gevent-websocket's: no Date on a 101
        self.provided_content_length = False  # nor a Content-Length
        self.response_use_chunked = False
        self.close_connection = True
        self.headers_sent = self.connection_upgraded = True
        data = b"".join([b"HTTP/1.1 ", self.status, b"\r\n",
                         *(b"%s: %s\r\n" % pair for pair in self.response_headers), b"\r\n"])
        self.response_length += len(data)
        return data

    def _send_head(self, sock: Any, head: bytes) -> None:
        """The 101 at once, through `sock` (a socket the connection cannot write raw: TLS)."""
        try:
            sock.sendall(head)
        except OSError as exc:  # as pywsgi's _sendall leaves it
            self.status = f"socket error: {exc}"
            self.code = -self.code
            raise

    def _take_socket(self) -> tuple[Any, bool]:
        """The connection's socket from here on, and whether the event loop can watch it for us.

        The server closes a request's socket when its greenlet ends; a plain socket gets the hold a
        file object of it (`makefile`) would take, so that close only marks it closed and the
        connection, which may outlive that greenlet, frees it (Connection.close_socket). Detaching
        the descriptor into a new socket did the same for ~4 µs a handshake (a new socket object and
        its event-loop watchers; docs/PERFORMANCE.md, "Connect time")."""
        sock = self.socket
        self.socket = None  # pywsgi's handle() neither reads more requests nor closes it
        if type(sock) is not gsocket.socket:  # TLS: served in this greenlet, closed by pywsgi after
            return sock, False
        sock._io_refs += 1
        sock.settimeout(None)  # the handshake's timeout is over; gevent's recv waits as long as it takes
        return sock, True

    def log_request(self) -> None:
        """One line per HTTP request (a WebSocket's is its close line); never the query string."""
        if self.code == 101:  # an upgrade (its line is the connection's close line)
            return
        code = _status_code(self.status)
        services = self._services()
        services.stats.http_requests += 1
        refusal: Refuse | None = getattr(self, "_refusal", None)
        self._refusal = None
        # Refused upgrades are logged even with WSAPP_ACCESS_LOG=0: they are events, not traffic.
        if (refusal is None and not services.settings.access_log) or not access_log.isEnabledFor(logging.INFO):
            return
        method = getattr(self, "command", None) or "-"
        path = (getattr(self, "path", None) or "-").split("?", 1)[0]
        duration = (self.time_finish - self.time_start) if self.time_finish else 0.0
        fields: dict[str, object] = {
            "event": "http", "method": method, "path": path, "status": code,
            "duration_ms": round(duration * 1000, 3), "bytes": self.response_length,
            "client": self._client_ip(services) if self.client_address else "-",
        }
        if refusal is not None:
            fields["refused"] = refusal.kind
            access_log.info("%s %s %d %s", method, path, code, refusal.reason, extra={"fields": fields})
        else:
            access_log.info("%s %s %d", method, path, code, extra={"fields": fields})


def _ended(conn: Connection, services: Services, identity: Any) -> None:
    """The last step of every connection: out of the registry, socket freed, and its one closing line
    with its figures: code, who closed first, why, traffic."""
    services.registry.remove(conn)
    conn.close_socket()
    stats = services.stats
    duration = time.monotonic() - conn.opened
    code = conn.close_code if conn.close_code is not None else CloseCode.ABNORMAL
    by = conn.closed_by or Closed.NONE
    stats.closes[(close_code_label(code), by, conn.close_cause)] += 1
    stats.connection_duration_seconds.observe(duration)
    fields = {
        "event": "ws_close", "conn": conn.id, "path": conn.path, "client": conn.remote_ip,
        "identity": None if identity is None else str(identity), "name": conn.name,
        "code": code, "closed_by": by, "reason": conn.close_cause, "duration_s": round(duration, 3),
        "messages_in": conn.messages_in, "bytes_in": conn.bytes_in,
        "messages_out": max(0, conn.frames_out - conn.control_out), "bytes_out": conn.bytes_out,
    }
    log.info("conn %s closed %d by %s (%s) after %.1fs", conn.id, code, by, conn.close_cause, duration,
             extra={"fields": fields})


def _start_callback_route(route: WebSocketRoute, conn: Connection, services: Services, identity: Any,
                          parkable: bool) -> None:
    assert route.start is not None
    try:
        on_message, on_route_end = route.start(conn, services, identity)
    except Exception:
        services.stats.internal_errors += 1
        log.exception("conn %s failed to start", conn.id)
        conn.terminate(CloseCode.INTERNAL_ERROR, "internal error", CAUSE_INTERNAL_ERROR)  # after the 101
        _ended(conn, services, identity)
        return
    # The 101 and what `start` sent (rooms: its `welcome`) in one send, one TCP segment.
    conn.flush_nowait()

    def on_end(conn: Connection) -> None:
        try:
            if on_route_end is not None:
                on_route_end(conn)
        finally:
            _ended(conn, services, identity)

    conn.serve_parked(on_message, on_end, route.rate_limited, parkable)


def _view_runner(app: Any, env: dict[str, Any], conn: Connection, services: Services) -> Callable[[], None]:
    """A handler route: the Flask view runs the connection to its end (its HTTP response is
    meaningless now), in the request context of the upgrade request."""

    def run() -> None:
        try:
            result = app(env, lambda status, headers, exc_info=None: None)
            try:
                for _ in result:
                    pass
            finally:
                getattr(result, "close", lambda: None)()
        except Exception:
            services.stats.internal_errors += 1
            log.exception("conn %s failed in the application", conn.id)
            conn.terminate(CloseCode.INTERNAL_ERROR, "internal error", CAUSE_INTERNAL_ERROR)
        finally:
            _ended(conn, services, env.get(ENV_IDENTITY))

    return run


def close_code_label(code: int) -> str:
    """A close code as a metric label: the application ranges (3000-4999) folded so a client cannot
    make up series."""
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    if 1000 <= code <= 1015:
        return str(code)
    return "other"


_USUAL_VERSIONS = ("HTTP/1.1", "HTTP/1.0")  # what pywsgi's _check_http_version accepts, surely


def _status_code(status: object) -> int:
    if isinstance(status, bytes):
        status = status.decode("latin-1")
    try:
        return int(str(status).split(None, 1)[0])
    except (ValueError, IndexError):
        return 0


def _has_nodelay(sock: Any) -> bool | None:
    """Whether an accepted socket came with TCP_NODELAY (inherited from its listener); None when
    the socket cannot tell."""
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return None


def _nothing_now(_buffer: Any) -> None:
    """A raw stream's readinto when it has nothing now (what a non-blocking socket's gives)."""
    return None
