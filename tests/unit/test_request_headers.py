"""wsapp.request_headers against what it replaces: gevent.pywsgi's `headers_factory`
(`http.client.parse_headers` with the `email` feed parser), on a table of header blocks and on
random ones. Both must give the same message, leave the stream at the same place, raise the same
errors and give pywsgi the same environ."""

from __future__ import annotations

import io
import random
from http import client
from types import SimpleNamespace
from typing import Any

import pytest
from gevent.pywsgi import OldMessage, WSGIHandler, headers_factory

from wsapp.handler import WsappHandler
from wsapp.request_headers import PlainMessage, TooManyHeaders, environ_headers, parse_headers

UPGRADE = (b"Host: 127.0.0.1:8080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")

BLOCKS = [
    UPGRADE + b"\r\n",
    UPGRADE + b"\r\nGET /next HTTP/1.1\r\n",  # a pipelined request behind it stays unread
    UPGRADE + b"\r\n\x81\x85abcd",  # a frame right behind the handshake
    b"\r\n",
    b"\n",
    b"",
    b"Host: x\n\n",  # bare LF line ends
    b"Host: x\r\nAccept: */*\n\r\n",  # mixed
    b"Host:x\r\n\r\n",  # no space after the colon
    b"Host: \t x \t\r\n\r\n",  # spaces and tabs around the value
    b"Host:\r\n\r\n",  # empty value
    b"X-Empty:   \r\n\r\n",
    b"Cookie: a=1\r\nCookie: b=2\r\nAccept: a\r\nAccept: b\r\n\r\n",  # duplicates (pywsgi joins them)
    b"X-Dup: 1\r\nx-dup: 2\r\nX-DUP: 3\r\n\r\n",
    b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n--xyz\r\n",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Type: MULTIPART/mixed\r\n\r\n",
    b"X-Latin: caf\xe9 \xff\x80\r\n\r\n",  # latin-1 bytes in a value
    b"X-Nul: a\x00b\r\n\r\n",
    b"X-Ctl: a\x0bb\x0cc\x1cd\x85e\r\n\r\n",  # characters str.splitlines would split on
    b"X-Nbsp: \xa0a\xa0\r\n\r\n",
    b"X\xe9: 1\r\n\r\n",  # non-ASCII in a name
    b"X Y: 1\r\n\r\n",  # space in a name
    b"X-A : 1\r\n\r\n",  # space before the colon
    b"X_Under: 1\r\n\r\n",  # underscore: pywsgi drops it from the environ
    b"X-Fold: a\r\n b\r\n\tc\r\n\r\n",  # obs-fold continuation lines
    b" Leading: continuation first\r\nHost: x\r\n\r\n",
    b"Host: x\r\nno colon here\r\nUpgrade: websocket\r\n\r\n",  # ends the headers for the feed parser
    b"Host: x\r\n: no name\r\n\r\n",
    b"From me: x\r\nHost: y\r\n\r\n",
    b"Host: y\r\nFrom x\r\n\r\n",
    b"From: someone\r\n\r\n",
    b"Host: a\rb\r\n\r\n",  # a bare CR inside a value
    b"Host: a\r\r\n\r\n",
    b"Host: a\r\n\r\r\n\r\n",
    b"Host: x\r\nX-Unterminated: 1",  # the stream ends inside a line
    b"Host: x\r\n",  # ... after a complete line
    b"a:b\r\n!#$%&'*+-.^_`|~(),/;<=>?@[]{}\"\\: odd but legal for the feed parser\r\n\r\n",
    b"X-Long: " + b"v" * 70000 + b"\r\n\r\n",  # over http.client's line limit
    b"X-Near: " + b"v" * 65520 + b"\r\n\r\n",  # just under it
    b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(100)) + b"\r\n",  # at the count limit
    b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(101)) + b"\r\n",  # over it
]


def reference(data: bytes) -> tuple[Any, Any, bytes]:
    return _run(headers_factory, data)


def ours(data: bytes) -> tuple[Any, Any, bytes]:
    return _run(lambda fp: parse_headers(fp), data)


class Trickle(io.RawIOBase):
    """A raw stream that gives at most `step` bytes per read, as a socket may (segments)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._step = data, step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._step, len(self._data))
        buffer[:n], self._data = self._data[:n], self._data[n:]
        return n


def _run(parse: Any, data: bytes, step: int | None = None) -> tuple[Any, Any, bytes]:
    """(message or None, exception or None, what is left unread in the stream)."""
    # What pywsgi's rfile is: a BufferedReader (over a socket that may give the bytes in pieces).
    fp = io.BufferedReader(io.BytesIO(data) if step is None else Trickle(data, step))
    try:
        message, error = parse(fp), None
    except Exception as exc:
        message, error = None, exc
    return message, error, fp.read()


def described(message: Any) -> dict[str, Any] | None:
    if message is None:
        return None
    return {
        "type": OldMessage if isinstance(message, OldMessage) else type(message),  # a PlainMessage is one
        "status": message.status,
        "headers": list(message._headers),
        "payload": ([described(part) for part in message.get_payload()] if message.is_multipart()
                    else message.get_payload()),
        "defects": [type(d) for d in message.defects],
        "unixfrom": message.get_unixfrom(),
        "pywsgi_lines": list(message.headers),
        "typeheader": message.typeheader,
        "content_length": message.getheader("content-length"),
    }


def environ(message: Any, handler_class: type = WSGIHandler) -> dict[str, Any]:
    """What gevent.pywsgi's get_environ makes of the message (a request to `/`), through pywsgi's
    handler or wsapp's (whose `_headers` takes a plain message's pairs as they are)."""
    handler = handler_class.__new__(handler_class)
    handler.headers = message
    handler.command, handler.path, handler.request_version = "GET", "/", "HTTP/1.1"
    handler.client_address = ("192.0.2.1", 40000)
    handler.server = SimpleNamespace(get_environ=dict)
    handler.rfile = io.BufferedReader(io.BytesIO(b""))
    handler.socket = None
    env = handler.get_environ()
    del env["wsgi.input"]
    return env


def assert_same(data: bytes) -> None:
    ref_msg, ref_err, ref_rest = reference(data)
    our_msg, our_err, our_rest = ours(data)
    # The same error, but as a ValueError too (pywsgi's "bad request" without a traceback).
    assert type(our_err) is (TooManyHeaders if isinstance(ref_err, client.HTTPException) else type(ref_err))
    assert str(our_err) == str(ref_err)
    assert described(our_msg) == described(ref_msg)
    assert our_rest == ref_rest
    if ref_msg is not None and not ref_msg.status:
        try:
            want: Any = environ(ref_msg)
        except Exception as exc:  # pywsgi's own environ can fail on what the feed parser made
            want = type(exc)
        for handler_class in (WSGIHandler, WsappHandler):
            try:
                got: Any = environ(our_msg, handler_class)
            except Exception as exc:
                got = type(exc)
            assert got == want, handler_class


@pytest.mark.parametrize("data", BLOCKS, ids=range(len(BLOCKS)))
def test_same_as_http_client(data: bytes) -> None:
    assert_same(data)


def test_plain_upgrade_is_parsed_without_the_email_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the module: the usual header block never reaches the feed parser."""
    import wsapp.request_headers as module

    def no_email(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the email parser ran")

    monkeypatch.setattr(module, "Parser", no_email)
    message = parse_headers(io.BufferedReader(io.BytesIO(UPGRADE + b"\r\n")))
    assert message["upgrade"] == "websocket"
    assert message.get("SEC-WEBSOCKET-KEY") == "dGhlIHNhbXBsZSBub25jZQ=="


def test_limits_follow_http_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "_MAXHEADERS", 3)
    assert_same(b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    monkeypatch.setattr(client, "_MAXLINE", 10)
    assert_same(b"A: 123456789\r\n\r\n")
    assert_same(b"A: 12345\r\n\r\n")


# Random header blocks from pieces that sit on every boundary the two parsers draw.
PIECES = [b"Host", b"X-A", b"x-a", b"Content-Type", b"Content-Length", b"Cookie", b"From", b"X_B", b"",
          b":", b": ", b":\t", b" ", b"\t", b"\r\n", b"\n", b"\r", b"value", b"multipart/x", b"message/y",
          b"\xe9", b"\x00", b"\x0b", b"\x85", b"\xa0", b"5", b",", b";", b"From "]


@pytest.mark.parametrize("seed", range(8))
def test_random_blocks(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        lines = []
        for _ in range(rng.randint(0, 6)):
            if rng.random() < 0.6:  # mostly header-like lines, so the fast path is taken often
                lines.append(rng.choice(PIECES[:8]) + rng.choice([b": ", b":", b":\t"])
                             + b"".join(rng.choices(PIECES, k=rng.randint(0, 3))) + rng.choice([b"\r\n", b"\n"]))
            else:
                lines.append(b"".join(rng.choices(PIECES, k=rng.randint(1, 5))))
        tail = rng.choice([b"\r\n", b"\n", b"", b"\r\nbody"])
        assert_same(b"".join(lines) + tail)


def test_a_plain_upgrade_gives_its_environ_pairs_without_pywsgi_reformatting_them() -> None:
    message, error, _ = ours(b"Host: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX_Under: 1\r\n"
                             b"Content-Length: 0\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n")
    assert error is None
    assert environ_headers(message) == [("HTTP_HOST", "a"), ("HTTP_UPGRADE", "websocket"),
                                        ("HTTP_CONNECTION", "Upgrade"), ("HTTP_COOKIE", "a=1"), ("HTTP_COOKIE", "b=2")]
    assert environ(message, WsappHandler)["HTTP_COOKIE"] == "a=1; b=2"  # joined by get_environ, as before
    folded, _, _ = ours(b"Host: a\r\nX-Folded: 1\r\n 2\r\n\r\n")  # continuation: the email parser's
    assert environ_headers(folded) is None


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.10", "HTTP/01.1",
                                     "HTTP/1", "HTTP/x.1", "http/1.1", "HTTP/1.-1", "HTTP/ 1.1", ""])
def test_http_version_check_is_pywsgis(version: str) -> None:
    def check(handler_class: type) -> Any:
        handler = handler_class.__new__(handler_class)
        handler.request_version = version
        try:
            return handler._check_http_version()
        except Exception as exc:
            return type(exc)

    assert check(WsappHandler) == check(WSGIHandler)


def test_plain_message_lookups_follow_every_change_as_the_email_package_does() -> None:
    block = b"Host: a\r\nContent-Length: 5\r\nX-Dup: 1\r\nx-dup: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
    plain, _, _ = ours(block)
    reference_msg, _, _ = reference(block)
    assert isinstance(plain, PlainMessage) and not isinstance(reference_msg, PlainMessage)
    names = ["host", "HOST", "content-length", "x-dup", "X-DUP", "transfer-encoding", "missing", "new", "Other"]

    def same() -> None:
        for name in names:
            assert plain.get(name) == reference_msg.get(name), name
            assert plain.get(name, "fallback") == reference_msg.get(name, "fallback"), name
            assert (name in plain) == (name in reference_msg), name
            assert plain[name] == reference_msg[name], name

    same()
    for change in (lambda m: m.__delitem__("content-length"),  # what pywsgi does for a chunked body
                   lambda m: m.__setitem__("New", "3"),
                   lambda m: m.replace_header("x-dup", "9"),  # in place: same list, same length
                   lambda m: m.add_header("Other", "v", p="q"),
                   lambda m: m.set_raw("Host", "second"),
                   lambda m: m.__delitem__("x-dup")):
        change(plain)
        change(reference_msg)
        same()


@pytest.mark.parametrize("step", [1, 7, 40])
def test_a_block_arriving_in_pieces_reads_the_same(step: int) -> None:
    # A socket may give the request in pieces: the reader holds part of the block at a time.
    for data in [*BLOCKS[:-4], b"Host: a\r\nUpgrade: websocket\r\n\r\n\x81\x85frame"]:
        ref_msg, ref_err, ref_rest = _run(headers_factory, data, step)
        our_msg, our_err, our_rest = _run(lambda fp: parse_headers(fp), data, step)
        assert type(our_err) is (TooManyHeaders if isinstance(ref_err, client.HTTPException) else type(ref_err))
        assert str(our_err) == str(ref_err)
        assert described(our_msg) == described(ref_msg)
        assert our_rest == ref_rest
