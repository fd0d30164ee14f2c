"""permessage-deflate on its own: negotiation (a table of offers), server-side compression, and the
parser's inflating of client messages, with no sockets."""

from __future__ import annotations

import os
import zlib

import gevent
import pytest

from tests.rawws import client_frame
from wsapp.connection import Outbox
from wsapp.deflate import DeflateParams, compress, deflate_frame, negotiate
from wsapp.exceptions import FrameError
from wsapp.frames import OP_BINARY, OP_CONTINUATION, OP_PING, OP_TEXT, FrameParser, encode_frame

BASE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
TEXT = (b'{"type":"message","room":"lobby","from":"ana","data":{"text":"hello there, how is it going?"}}' * 20)


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        (None, None),
        ("", None),
        ("permessage-deflate", BASE),
        ("PerMessage-Deflate", BASE),
        ("permessage-deflate; client_max_window_bits", BASE),
        ("permessage-deflate; client_max_window_bits=10", BASE),
        ("permessage-deflate; server_no_context_takeover", BASE),
        ("permessage-deflate; client_no_context_takeover", BASE),
        ("permessage-deflate; server_max_window_bits=10", BASE + "; server_max_window_bits=10"),
        ('permessage-deflate; server_max_window_bits="12"', BASE + "; server_max_window_bits=12"),
        ("permessage-deflate; server_max_window_bits=8", BASE + "; server_max_window_bits=8"),
        ("x-webkit-deflate-frame", None),
        ("x-webkit-deflate-frame, permessage-deflate", BASE),
        # The first acceptable offer wins; malformed ones are skipped (declined), never an error.
        ("permessage-deflate; server_max_window_bits=9, permessage-deflate", BASE + "; server_max_window_bits=9"),
        ("permessage-deflate; bogus, permessage-deflate; client_max_window_bits", BASE),
        ("permessage-deflate; bogus", None),
        ("permessage-deflate; server_max_window_bits", None),
        ("permessage-deflate; server_max_window_bits=7", None),
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; server_max_window_bits=010", None),
        ("permessage-deflate; client_max_window_bits=abc", None),
        ("permessage-deflate; server_no_context_takeover=1", None),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", None),
        ("permessage-deflate; client_max_window_bits=10; client_max_window_bits=11", None),
        ('permessage-deflate; server_max_window_bits="1 0"', None),
        (";;,,", None),
    ],
)
def test_negotiation(offer: str | None, answer: str | None) -> None:
    result = negotiate(offer)
    assert (result.header if result else None) == answer


def test_negotiated_window_is_used() -> None:
    result = negotiate("permessage-deflate; server_max_window_bits=10")
    assert result is not None and result.params.server_max_window_bits == 10


def inflate(body: bytes, bits: int = 15) -> bytes:
    inflater = zlib.decompressobj(-bits)
    return inflater.decompress(body + b"\x00\x00\xff\xff")


@pytest.mark.parametrize("bits", [8, 9, 12, 15])
def test_compress_round_trips_within_the_window(bits: int) -> None:
    # An 8-bit peer inflates with an 8-bit window: no back reference may reach further.
    payload = TEXT + os.urandom(300) + TEXT
    body = compress(payload, bits)
    assert inflate(body, bits) == payload
    assert len(body) < len(payload) // 2


def test_compressed_bytes_do_not_depend_on_earlier_messages() -> None:
    first = compress(TEXT)
    compress(b"something else entirely " * 50)
    assert compress(TEXT) == first


def test_deflate_frame_sets_rsv1_and_keeps_small_and_control_frames() -> None:
    params = DeflateParams(min_bytes=256)
    frame = encode_frame(OP_TEXT, TEXT)
    out = deflate_frame(frame, params)
    assert out[0] == 0x80 | 0x40 | OP_TEXT
    assert len(out) < len(frame) // 3
    small = encode_frame(OP_TEXT, b"x" * 255)
    assert deflate_frame(small, params) is small
    ping = encode_frame(OP_PING, b"p" * 125)
    assert deflate_frame(ping, DeflateParams(min_bytes=0)) is ping
    noise = encode_frame(OP_BINARY, os.urandom(4000))  # incompressible: sent as it is
    assert deflate_frame(noise, params) is noise


def parser(max_bytes: int = 1 << 20, deflate: bool = True) -> FrameParser:
    return FrameParser(max_bytes, 0, deflate)


def compressed_frames(payload: bytes, opcode: int = OP_TEXT, pieces: int = 1) -> bytes:
    body = compress(payload)
    step = -(-len(body) // pieces)
    chunks = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
    out = b""
    for i, chunk in enumerate(chunks):
        out += client_frame(opcode if i == 0 else OP_CONTINUATION, chunk, fin=i == len(chunks) - 1,
                            rsv=4 if i == 0 else 0)
    return out


@pytest.mark.parametrize("pieces", [1, 3])
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_parser_inflates_whole_fragmented_and_trickled_messages(pieces: int, chunk: int | None) -> None:
    data = compressed_frames(TEXT, pieces=pieces) + client_frame(OP_TEXT, b"plain")
    p = parser()
    events = []
    step = chunk or len(data)
    for i in range(0, len(data), step):
        events += p.feed(data[i : i + step])
    assert events == [(OP_TEXT, TEXT), (OP_TEXT, b"plain")]


def error_of(data: bytes, **kw: object) -> FrameError:
    with pytest.raises(FrameError) as info:
        parser(**kw).feed(data)  # type: ignore[arg-type]
    return info.value


def test_rsv1_only_on_the_first_frame_of_a_data_message() -> None:
    first = client_frame(OP_TEXT, compress(b"abc"), fin=False, rsv=4)
    assert error_of(first + client_frame(OP_CONTINUATION, b"x", rsv=4)).close_code == 1002
    assert error_of(client_frame(OP_PING, b"", rsv=4)).close_code == 1002
    assert error_of(client_frame(OP_TEXT, b"x", rsv=2)).close_code == 1002
    assert error_of(client_frame(OP_TEXT, compress(b"abc"), rsv=4), deflate=False).close_code == 1002


def test_deflate_bomb_is_refused_while_inflating() -> None:
    # 64 MiB of zeros in ~64 KiB of wire bytes: refused 1009 after at most the limit is inflated.
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = bomb.compress(bytes(64 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(body) < 100_000
    assert error_of(client_frame(OP_BINARY, body, rsv=4), max_bytes=1 << 20).close_code == 1009
    # Split into fragments too.
    fragmented = client_frame(OP_BINARY, body[:1000], fin=False, rsv=4) + client_frame(OP_CONTINUATION, body[1000:])
    assert error_of(fragmented, max_bytes=1 << 20).close_code == 1009
    # Exactly at the limit is fine.
    at_limit = compress(bytes(1 << 20))
    assert parser(1 << 20).feed(client_frame(OP_BINARY, at_limit, rsv=4)) == [(OP_BINARY, bytes(1 << 20))]


def test_inflated_text_must_be_utf8_and_the_stream_valid() -> None:
    assert error_of(client_frame(OP_TEXT, compress(b"ok \xff" * 100), rsv=4)).close_code == 1007
    fragmented = compressed_frames(b"ok \xc3" + b"a" * 1000, pieces=3)
    assert error_of(fragmented).close_code == 1007
    assert error_of(client_frame(OP_BINARY, b"\xff\xff\xff\xff garbage", rsv=4)).close_code == 1007


def test_outbox_compresses_a_broadcast_once_per_loop_turn() -> None:
    outbox = Outbox()
    frame = encode_frame(OP_TEXT, TEXT)
    first = outbox.deflated(frame, DeflateParams())
    assert first != frame and outbox.deflated(frame, DeflateParams()) is first
    # Another window size is another variant; a small frame is the frame itself.
    assert outbox.deflated(frame, DeflateParams(server_max_window_bits=10)) is not first
    small = encode_frame(OP_TEXT, b"hi")
    assert outbox.deflated(small, DeflateParams()) is small
    gevent.idle()  # the loop turn ends: the cache is dropped, with its references to the frames
    again = outbox.deflated(frame, DeflateParams())
    assert again == first and again is not first
