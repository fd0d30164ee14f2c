"""A plain WebSocket upgrade request read in one look at the socket, instead of pywsgi's line by line.

pywsgi reads a request through a buffered file over the socket (`makefile`): the request line, then
each header line, then it builds the environ from the parsed message. For the usual upgrade request
(one TCP segment, `GET <path> HTTP/1.1`, plain `name: value` lines, no body) `read_plain_upgrade`
looks at what the kernel holds (`MSG_PEEK`), and only if the whole head is there and plain builds
the environ pywsgi would build and then takes the head's bytes off the socket. Anything else
(a head in pieces, a request with a body, a continuation line, TLS, HTTP/1.0, a plain GET) is
left where it is for pywsgi to read as it always does, so its outcomes (400s, 414s, keep-alive)
stay its own. tests/unit/test_upgrade_request.py compares the handler state and environ of both.
"""

from __future__ import annotations

import io
import re
import socket
from http import client
from typing import Any

from gevent.pywsgi import unquote_latin1

from wsapp.request_headers import HEADER_NAME, PlainMessage, environ_key

# The most a first look takes: pywsgi's reader asks the socket for its buffer's size, 8 KiB. A head
# that does not fit is read by pywsgi.
LOOK_BYTES = io.DEFAULT_BUFFER_SIZE
_REQUEST_LINE = re.compile(r"GET ([\x21-\x7e]+) HTTP/1\.1\r\n")
# A header line from a line's start: a block is plain when every line but the blank last one is one.
_HEADER = re.compile(rf"^({HEADER_NAME}):[ \t]*([^\r\n]*)\r\n", re.MULTILINE)
# Headers that make a request more than a plain upgrade for pywsgi (a body, a 100-continue, the
# content type it reads through the message): such requests are pywsgi's.
_BODY_HEADERS = frozenset(("content-length", "transfer-encoding", "content-type", "expect"))


class PlainUpgrade:
    """What `read_plain_upgrade` took off the socket: the handler state pywsgi's `read_request` and
    `get_environ` would have set, and the bytes the client sent behind the head."""

    __slots__ = ("close_connection", "environ", "headers", "leftover", "path", "requestline")

    def __init__(self, requestline: str, path: str, headers: Any, environ: dict[str, Any],
                 close_connection: bool) -> None:
        self.requestline = requestline
        self.path = path
        self.headers = headers  # a PlainMessage, as wsapp.request_headers gives pywsgi
        self.environ = environ
        self.close_connection = close_connection  # pywsgi's reading of Connection
        self.leftover = b""


def parse_plain_upgrade(data: bytes, env: dict[str, Any], client_address: Any) -> tuple[
        PlainUpgrade, int] | None:
    """The upgrade request at the start of `data` and the length of its head, or None when it is not a
    whole plain upgrade request (pywsgi's to read then). `env` is the server's base environ for this
    request, a dict of its own (pywsgi's `server.get_environ()`), filled in here as the request's."""
    end = data.find(b"\r\n\r\n")
    # http.client's limits, read here as wsapp.request_headers reads them: a head no longer than one
    # allowed line has no line over the limit.
    if end < 0 or end + 4 > getattr(client, "_MAXLINE"):  # noqa: B009 - private in typeshed
        return None
    text = data[:end + 4].decode("latin-1")
    line = _REQUEST_LINE.match(text)
    if line is None:
        return None
    block = text[line.end():]
    pairs = _HEADER.findall(block)
    # Each line gives at most one match, from its start; a line that is not plain gives none (a bare
    # CR or LF splits or spoils one). The blank line that ends the block counts to the limit too.
    if len(pairs) != block.count("\n") - 1 or len(pairs) >= getattr(client, "_MAXHEADERS"):  # noqa: B009
        return None
    path = line.group(1)
    route, query = path.split("?", 1) if "?" in path else (path, "")
    env["REQUEST_METHOD"] = "GET"  # in pywsgi's get_environ's order
    env["SCRIPT_NAME"] = ""
    env["PATH_INFO"] = unquote_latin1(route)
    env["QUERY_STRING"] = query
    env["SERVER_PROTOCOL"] = "HTTP/1.1"
    if isinstance(client_address, tuple):
        env["REMOTE_ADDR"] = str(client_address[0])
        env["REMOTE_PORT"] = str(client_address[1])
    connection = upgrade = None  # the first of each, as pywsgi's header lookups give them
    for name, value in pairs:
        key = _KEYS.get(name)
        if key is None:
            key = _learn(name)
        if key == _BODY:
            return None
        if key == "HTTP_CONNECTION":
            connection = value.lower() if connection is None else connection
        elif key == "HTTP_UPGRADE":
            upgrade = value.lower() if upgrade is None else upgrade
        if key != _DROPPED:
            value = value.strip()
            if key in env:  # repeated: joined as pywsgi's get_environ joins them
                env[key] += ("; " if "COOKIE" in key else ",") + value
            else:
                env[key] = value
    # An upgrade for wsapp (handshake.is_upgrade) that pywsgi takes for one too (its environ then
    # gives the reader itself as wsgi.input, unterminated).
    if env.get("HTTP_UPGRADE", "").lower() != "websocket" or not (connection == "upgrade" or upgrade == "websocket"):
        return None
    env["wsgi.input"] = io.BytesIO()  # an upgrade has no body: the socket is the connection's
    env["wsgi.input_terminated"] = False
    headers = PlainMessage()
    headers._headers = pairs
    headers.set_payload("")
    return PlainUpgrade(text[:line.end() - 2], path, headers, env, connection == "close"), end + 4


# A header name's environ key (request_headers.environ_key), learnt once per spelling; or one of:
_DROPPED = "-"  # a name with "_", which pywsgi leaves out of the environ
_BODY = "+"  # Content-Length and the like: not a plain upgrade
_KEYS: dict[str, str] = {}
_KEYS_KEPT = 512  # spellings remembered; a client inventing names only costs itself the lookups


def _learn(name: str) -> str:
    key = _BODY if name.lower() in _BODY_HEADERS else environ_key(name) or _DROPPED
    if len(_KEYS) < _KEYS_KEPT:
        _KEYS[name] = key
    return key


def read_plain_upgrade(sock: Any, env: dict[str, Any], client_address: Any) -> PlainUpgrade | None:
    """The plain upgrade request waiting on `sock` (a gevent socket), taken off it; None, with nothing
    read, when what is there is anything else. Waits, within the socket's timeout, for the first
    bytes; socket errors are raised."""
    data = sock.recv(LOOK_BYTES, socket.MSG_PEEK)
    parsed = parse_plain_upgrade(data, env, client_address)
    if parsed is None:
        return None
    request, head = parsed
    # All of it (the kernel holds at least that much now): what follows the head is the connection's.
    request.leftover = sock.recv(len(data))[head:]
    return request
