"""The upgrade, inside gevent.pywsgi: every check happens before the 101, and a refusal is a real
HTTP status. After the 101 the request greenlet becomes the connection's reader."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import socket
from urllib.parse import parse_qs

from gevent.pywsgi import WSGIHandler
from geventwebsocket.handler import WebSocketHandler
from werkzeug.exceptions import HTTPException

from wsapp.auth import AuthError, bearer_token, client_ip, origin_allowed, verify_token
from wsapp.connection import Connection
from wsapp.services import Services, services_of

log = logging.getLogger(__name__)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Refusal(Exception):
    """An upgrade request that gets an HTTP error instead of a 101."""

    def __init__(self, status: str, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


class WsappHandler(WebSocketHandler):
    """gevent-websocket's handler with wsapp's admission checks and wsapp's own connection object."""

    def handle(self) -> None:
        # Small frames must leave at once: Nagle + delayed ACK would add ~40 ms stalls to fan-out.
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A client that opens TCP and never finishes its request is dropped after this long.
        self.socket.settimeout(self._services().settings.handshake_timeout)
        super().handle()

    def _services(self) -> Services:
        return services_of(self.server.application)

    def _client_ip(self, services: Services) -> str:
        return client_ip(self.client_address[0], self.environ.get("HTTP_X_FORWARDED_FOR"),
                         services.settings.trusted_proxy_hops)

    def run_application(self) -> None:
        if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            WSGIHandler.run_application(self)
            return
        services = self._services()
        try:
            self._admit(services)
        except Refusal as refusal:
            services.stats.refused += 1
            log.info("refused upgrade of %s from %s: %s %s", self.environ.get("PATH_INFO"),
                     self._client_ip(services), refusal.status, refusal.reason)
            self._refuse(refusal)
            return
        self._upgrade_and_serve(services)

    def _admit(self, services: Services) -> None:
        env = self.environ
        if env.get("REQUEST_METHOD") != "GET":
            raise Refusal("405 Method Not Allowed", "a WebSocket upgrade must be a GET", [("Allow", "GET")])
        if "upgrade" not in [t.strip() for t in env.get("HTTP_CONNECTION", "").lower().split(",")]:
            raise Refusal("400 Bad Request", "Connection header must include 'Upgrade'")
        if self.request_version != "HTTP/1.1":
            raise Refusal("400 Bad Request", "WebSocket upgrades need HTTP/1.1")
        if env.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
            raise Refusal("426 Upgrade Required", "only WebSocket version 13 is supported",
                          [("Sec-WebSocket-Version", "13")])
        key = env.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError
        except (ValueError, binascii.Error):
            raise Refusal("400 Bad Request", "Sec-WebSocket-Key must be 16 bytes in base64") from None
        try:
            endpoint, _args = self.server.application.url_map.bind_to_environ(env).match()
        except HTTPException:
            raise Refusal("404 Not Found", "no WebSocket endpoint at this path") from None
        settings = services.settings
        if not origin_allowed(env.get("HTTP_ORIGIN"), env.get("HTTP_HOST"), settings.allowed_origins):
            raise Refusal("403 Forbidden", "Origin not allowed (see WSAPP_ALLOWED_ORIGINS)")
        if settings.jwt_secret and endpoint == "wsapp.rooms_socket":
            query = parse_qs(env.get("QUERY_STRING", ""))
            token = bearer_token(query.get("token", [None])[0], env.get("HTTP_AUTHORIZATION"))
            try:
                env["wsapp.identity"] = verify_token(token, settings.jwt_secret)
            except AuthError as exc:
                raise Refusal("401 Unauthorized", str(exc), [("WWW-Authenticate", "Bearer")]) from None
        refusal = services.registry.refusal(self._client_ip(services))
        if refusal is not None:
            raise Refusal(*refusal, [("Retry-After", "5")])

    def _take_buffered_input(self) -> bytes:
        """What pywsgi's reader already holds beyond the request (frames sent right behind it).

        The connection reads the socket itself from here on; closing the reader frees its 8 KiB
        buffer, a quarter of what an idle connection used to cost (docs/PERFORMANCE.md).
        """
        self.socket.settimeout(0.0)
        try:
            # Non-blocking: the buffered bytes, or whatever is already there, or b"".
            leftover = self.rfile.read1(65536)
        except OSError:
            leftover = b""
        finally:
            self.socket.settimeout(None)
        self.rfile.close()
        return leftover

    def _refuse(self, refusal: Refusal) -> None:
        body = (refusal.reason + "\n").encode("utf-8")
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        self.close_connection = True
        self.start_response(refusal.status, headers + refusal.headers)
        self.write(body)

    def _upgrade_and_serve(self, services: Services) -> None:
        env = self.environ
        conn = Connection(
            self.socket, self._take_buffered_input(), self._client_ip(services), env.get("PATH_INFO", "/"),
            services.settings, services.stats, services.outbox,
        )
        env["wsgi.websocket"] = conn  # tells gevent-websocket's start_response to send a bare 101
        env["wsapp.connection"] = conn
        self.start_response("101 Switching Protocols", [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key(env["HTTP_SEC_WEBSOCKET_KEY"].strip())),
        ])
        self.write(b"")
        services.registry.add(conn)
        log.info("conn %s open %s from %s", conn.id, conn.path, conn.remote_ip)
        try:
            # The Flask view runs the connection to its end; its HTTP response is meaningless now.
            result = self.server.application(env, lambda status, headers, exc_info=None: None)
            try:
                for _ in result:
                    pass
            finally:
                getattr(result, "close", lambda: None)()
        except Exception:
            services.stats.internal_errors += 1
            log.exception("conn %s failed in the application", conn.id)
            conn.terminate(1011, "internal error")
        finally:
            services.registry.remove(conn)
            conn.abort()
            log.info("conn %s closed", conn.id)
            env["wsgi.websocket"] = None

    def log_request(self) -> None:
        # One access line per HTTP request at DEBUG; connection events are logged by wsapp itself.
        if log.isEnabledFor(logging.DEBUG) and "101" not in str(self.status):
            log.debug(self.format_request())
