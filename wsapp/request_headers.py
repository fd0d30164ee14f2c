"""A request's header block for gevent.pywsgi, parsed without the `email` package when it is plain.

pywsgi reads the headers with `http.client.parse_headers`, which runs them through the `email`
package's feed parser: about a quarter of the Python time of a WebSocket handshake
(docs/PERFORMANCE.md, "Connect time"). `parse_headers` here reads the lines exactly as
`http.client` does (same line and count limits, same errors) and, when every line is a plain
`name: value` line (a name of visible ASCII without `:`, a value without CR or LF, each line
ended by LF or CRLF), builds the same `OldMessage` from one regular expression (a `PlainMessage`,
whose header lookups and environ pairs skip work pywsgi would repeat). Anything else
(continuation lines, a line without a colon, a stray CR, an unterminated last line, a multipart or
message Content-Type) goes to the `email` parser as before, so pywsgi's outcome, its 400s and
its environ stay exactly what they were (tests/unit/test_request_headers.py compares both).
"""

from __future__ import annotations

import re
from email.parser import Parser
from http import client
from typing import Any

from gevent.pywsgi import OldMessage

# What the feed parser takes for a header line (email.feedparser.headerRE: a name of the
# characters 0x21-0x7E except ':'), narrowed to one that needs no further rule: a non-empty name,
# then the value up to the line end. The parser strips spaces and tabs before the value (the
# compat32 policy's `header_source_parse`), keeps those after it, and drops the CR LF.
HEADER_NAME = r"[\x21-\x39\x3b-\x7e]+"
_PLAIN_BLOCK = re.compile(rf"(?:{HEADER_NAME}:[^\r\n]*\r?\n)*(?:\r?\n)?")
_HEADER = re.compile(rf"({HEADER_NAME}):[ \t]*([^\r\n]*)\r?\n")


class PlainMessage(OldMessage):  # type: ignore[misc]  # gevent's class, untyped
    """The `OldMessage` of a block of plain lines, with a faster `get`.

    pywsgi asks a request's message for a header about seven times (Transfer-Encoding,
    Content-Length, Connection, Content-Type, Upgrade), and the `email` package's `get` lowercases
    every name each time. This one looks names up in a dict of the first value of each, rebuilt when
    the header list is replaced or grows (`del`, `__setitem__`, `set_raw`, `add_header`) or a value is
    replaced in place (`replace_header`); the value is given as the `email` package gives it.
    """

    def get(self, name: str, failobj: Any = None) -> Any:
        headers = self._headers
        index = self.__dict__.get("_index")
        if index is None or index[0] is not headers or index[1] != len(headers):
            first: dict[str, tuple[str, str]] = {}
            for key, value in headers:
                first.setdefault(key.lower(), (key, value))
            index = self.__dict__["_index"] = (headers, len(headers), first)
        found = index[2].get(name.lower())
        return failobj if found is None else self.policy.header_fetch_parse(*found)

    def replace_header(self, _name: str, _value: Any) -> None:
        self.__dict__.pop("_index", None)
        super().replace_header(_name, _value)


class TooManyHeaders(client.HTTPException, ValueError):
    """More header lines than http.client allows. A ValueError too, so that pywsgi answers 400 and
    logs one line, as for any bad request, instead of also printing a traceback to stderr."""


def parse_headers(fp: Any) -> Any:
    """`http.client.parse_headers(fp, _class=OldMessage)` as gevent.pywsgi calls it (a line over the
    limit gives a message whose `status` says so; too many lines raise `TooManyHeaders`)."""
    # Read here, not copied: whoever changes http.client's limits changes these too.
    max_line: int = getattr(client, "_MAXLINE")  # noqa: B009 - private in typeshed, public in effect
    max_headers: int = getattr(client, "_MAXHEADERS")  # noqa: B009
    lines = []
    while True:
        line = fp.readline(max_line + 1)
        if len(line) > max_line:
            too_long = OldMessage()
            too_long.status = "Line too long"
            return too_long
        lines.append(line)
        if len(lines) > max_headers:
            raise TooManyHeaders(f"got more than {max_headers} headers")
        if line in (b"\r\n", b"\n", b""):
            break
    text = b"".join(lines).decode("iso-8859-1")
    if _PLAIN_BLOCK.fullmatch(text):
        pairs = _HEADER.findall(text)
        if not any(_parses_body(name, value) for name, value in pairs):
            message = PlainMessage()
            message._headers = pairs  # what the feed parser's `set_raw` would have appended, in order
            message.set_payload("")  # the empty body the feed parser leaves after the headers
            return message
    return Parser(_class=OldMessage).parsestr(text)


def environ_headers(message: Any) -> Any:
    """The `HTTP_*` environ pairs of a message `parse_headers` built from plain lines, as pywsgi's
    `WSGIHandler._headers` makes them (it formats each pair as a line again and splits it): names
    with `_` dropped, CONTENT_TYPE and CONTENT_LENGTH left to get_environ, values stripped. None for
    any other message (continuation lines and the like: pywsgi's own then)."""
    if not isinstance(message, PlainMessage):
        return None
    return [(key, value.strip()) for name, value in message._headers
            if (key := environ_key(name)) is not None and key not in _LEFT_TO_ENVIRON]


def environ_key(name: str) -> str | None:
    """The environ key pywsgi gives a header's value (`HTTP_` and the name in upper case, `-` as
    `_`), or None for a name with `_`, which pywsgi leaves out."""
    return None if "_" in name else "HTTP_" + name.replace("-", "_").upper()


_LEFT_TO_ENVIRON = ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH")


def _parses_body(name: str, value: str) -> bool:
    """A Content-Type the feed parser acts on (it looks for parts or a nested message in the body)."""
    if len(name) != 12 or name.lower() != "content-type":
        return False
    lowered = value.lower()
    return "multipart" in lowered or "message" in lowered
