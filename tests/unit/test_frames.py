"""Each RFC 6455 frame rule, checked on the codec alone (no sockets)."""

from __future__ import annotations

import random
import struct

import pytest

from tests.rawws import client_frame
from wsapp import frames
from wsapp.exceptions import FrameError
from wsapp.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    close_code_is_valid,
    encode_close,
    encode_frame,
    unmask,
    unmask_python,
)

MiB = 1024 * 1024


def parse_all(data: bytes, chunk: int | None = None, **kw: int) -> list[tuple[int, object]]:
    parser = FrameParser(kw.get("max_message_bytes", MiB), kw.get("max_fragments", 0))
    if chunk is None:
        return parser.feed(data)
    events: list[tuple[int, object]] = []
    for i in range(0, len(data), chunk):
        events += parser.feed(data[i : i + chunk])
    return events


def error_of(data: bytes, **kw: int) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_all(data, **kw)
    return info.value


@pytest.mark.parametrize(
    ("size", "chunk"),
    [(size, chunk) for size in (0, 1, 125, 126, 65535, 65536, 200_000) for chunk in (None, 1, 7, 4096)
     if not (chunk == 1 and size > 70000)],  # byte-at-a-time over 200 kB is slow and adds nothing
)
def test_messages_of_every_length_encoding_survive_any_chunking(size: int, chunk: int | None) -> None:
    payload = bytes(i % 251 for i in range(size))
    assert parse_all(client_frame(OP_BINARY, payload), chunk) == [(OP_BINARY, payload)]


def test_fragmented_text_with_interleaved_ping() -> None:
    text = "héllo wörld ✓".encode()
    data = (
        client_frame(OP_TEXT, text[:2], fin=False)  # splits the é
        + client_frame(OP_PING, b"p")
        + client_frame(0x0, text[2:9], fin=False)
        + client_frame(0x0, text[9:])
    )
    for chunk in (None, 1, 3):
        assert parse_all(data, chunk) == [(OP_PING, b"p"), (OP_TEXT, text)]


def test_several_frames_in_one_read() -> None:
    data = client_frame(OP_TEXT, b"a") + client_frame(OP_BINARY, b"b") + client_frame(OP_PONG, b"")
    assert parse_all(data) == [(OP_TEXT, b"a"), (OP_BINARY, b"b"), (OP_PONG, b"")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(OP_TEXT, b"x", rsv=4), 1002),  # RSV1 without permessage-deflate
        (client_frame(OP_TEXT, b"x", rsv=1), 1002),
        (client_frame(0x3, b"x"), 1002),  # reserved data opcode
        (client_frame(0xB, b"x"), 1002),  # reserved control opcode
        (client_frame(OP_PING, b"x", fin=False), 1002),  # fragmented control frame
        (client_frame(OP_PING, b"x" * 126), 1002),  # control frame over 125 bytes
        (client_frame(0x0, b"x"), 1002),  # continuation with nothing to continue
        (client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"), 1002),  # new message mid-message
        (bytes([0x81, 0x01]) + b"x", 1002),  # unmasked client frame
        (client_frame(OP_TEXT, b"\xff"), 1007),
        (client_frame(OP_TEXT, b"\xed\xa0\x80"), 1007),  # UTF-16 surrogate
        (client_frame(OP_TEXT, b"ok\xc3", fin=False) + client_frame(0x0, b"", fin=True), 1007),  # truncated
        (client_frame(OP_CLOSE, b"\x03"), 1002),  # 1-byte close body
        (client_frame(OP_CLOSE, struct.pack("!H", 1005)), 1002),
        (client_frame(OP_CLOSE, struct.pack("!H", 999)), 1002),
        (client_frame(OP_CLOSE, struct.pack("!H", 2000)), 1002),
        (client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    ],
)
def test_violations_map_to_close_codes(data: bytes, code: int) -> None:
    assert error_of(data).close_code == code


def test_invalid_utf8_fails_fast_before_the_frame_ends() -> None:
    parser = FrameParser(MiB)
    frame = client_frame(OP_TEXT, b"valid start \xf4\x90\x80\x80" + b"x" * 1000)
    with pytest.raises(FrameError) as info:
        parser.feed(frame[:40])  # the bad sequence is in here; the rest never arrives
    assert info.value.close_code == 1007


def test_size_limit_is_checked_from_the_header_alone() -> None:
    parser = FrameParser(1000)
    header_only = client_frame(OP_BINARY, b"", length=1001)[:8]
    with pytest.raises(FrameError) as info:
        parser.feed(header_only)
    assert info.value.close_code == 1009


def test_a_header_announcing_2_to_the_63_is_refused_not_read() -> None:
    huge = bytes([0x82, 0xFF]) + struct.pack("!Q", 2**63 - 1) + b"mask"
    assert error_of(huge).close_code == 1009
    top_bit = bytes([0x82, 0xFF]) + struct.pack("!Q", 2**63) + b"mask"
    assert error_of(top_bit).close_code == 1002


def test_fragmented_message_size_counts_all_fragments() -> None:
    data = client_frame(OP_BINARY, b"x" * 600, fin=False) + client_frame(0x0, b"x" * 600)
    assert error_of(data, max_message_bytes=1000).close_code == 1009


def test_fragment_count_limit() -> None:
    frames = client_frame(OP_BINARY, b"x", fin=False) + client_frame(0x0, b"x", fin=False) * 3
    assert error_of(frames, max_fragments=3).close_code == 1008
    ok = client_frame(OP_BINARY, b"x", fin=False) + client_frame(0x0, b"x")
    assert parse_all(ok, max_fragments=2) == [(OP_BINARY, b"xx")]


def test_close_frames_are_parsed_and_validated() -> None:
    assert parse_all(client_frame(OP_CLOSE, b"")) == [(OP_CLOSE, (None, ""))]
    body = struct.pack("!H", 4000) + "bye ✓".encode()
    assert parse_all(client_frame(OP_CLOSE, body) + b"ignored after close") == [(OP_CLOSE, (4000, "bye ✓"))]


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999])
def test_valid_close_codes(code: int) -> None:
    assert close_code_is_valid(code)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes(code: int) -> None:
    assert not close_code_is_valid(code)


def test_server_frames_are_unmasked_and_minimal() -> None:
    assert encode_frame(OP_TEXT, b"hi") == b"\x81\x02hi"
    assert encode_frame(OP_BINARY, b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert encode_frame(OP_BINARY, b"x" * 65536)[:10] == b"\x82\x7f" + struct.pack("!Q", 65536)
    assert encode_close(1001, "going away") == b"\x88\x0c\x03\xe9going away"
    assert encode_close(None) == b"\x88\x00"


def test_unmask_with_offset_matches_a_whole_unmask() -> None:
    data = bytes(range(200))
    mask = b"\x01\x02\x03\x04"
    whole = unmask(data, mask)
    assert unmask(data[:7], mask) + unmask(data[7:], mask, 7 % 4) == whole
    assert unmask(unmask(data, mask), mask) == data


def _xor_reference(data: bytes, mask: bytes, offset: int) -> bytes:
    return bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(data))


def test_the_c_unmask_is_in_use() -> None:
    # requirements.txt pins `websockets` for its C apply_mask: without it unmask is 5-25x slower.
    assert frames._apply_mask is not None


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 63, 64, 125, 126, 511, 512, 513, 4096, 65537])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_unmask_matches_a_per_byte_xor(size: int, offset: int, kind: type) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    mask = b"\x9a\x01\xff\x5c"
    expected = _xor_reference(data, mask, offset)
    for fn in (unmask, unmask_python):
        out = fn(kind(data), mask, offset)
        assert type(out) is bytes
        assert out == expected


def test_the_parser_works_without_the_c_unmask(monkeypatch: pytest.MonkeyPatch) -> None:
    # A platform with no `websockets` wheel falls back to unmask_python.
    monkeypatch.setattr(frames, "_apply_mask", None)
    payload = "caf\u00e9 ".encode() * 1000
    data = client_frame(OP_TEXT, payload) + client_frame(OP_BINARY, b"\x00\xff" * 40)
    assert parse_all(data, 333) == [(OP_TEXT, payload), (OP_BINARY, b"\x00\xff" * 40)]


@pytest.mark.parametrize(
    "payload, ok",
    [
        (b"", True),
        (b"plain ascii", True),
        ("caf\u00e9 \u20ac \U0001f600".encode(), True),  # 2-, 3- and 4-byte sequences
        (b"x" * 4096 + "\u00e9".encode(), True),
        (b"\x80", False),  # a lone continuation byte
        (b"\xc0\xaf", False),  # overlong
        (b"\xed\xa0\x80", False),  # a surrogate
        (b"ok \xe2\x82", False),  # ends inside a sequence
        (b"x" * 4096 + b"\xff", False),
    ],
)
def test_text_is_validated_whole_and_in_pieces(payload: bytes, ok: bool) -> None:
    frame = client_frame(OP_TEXT, payload)
    for chunk in (None, 1, 7):
        if ok:
            assert parse_all(frame, chunk) == [(OP_TEXT, payload)]
        else:
            with pytest.raises(FrameError) as err:
                parse_all(frame, chunk)
            assert err.value.close_code == 1007


def test_good_messages_before_a_violation_in_the_same_read_are_still_returned() -> None:
    parser = FrameParser(MiB)
    data = client_frame(OP_TEXT, b"Hello, world!") + client_frame(OP_TEXT, b"x", rsv=2) + client_frame(OP_PING, b"")
    assert parser.feed(data) == [(OP_TEXT, b"Hello, world!")]
    assert parser.failed is not None and parser.failed.close_code == 1002
    with pytest.raises(FrameError):
        parser.feed(b"more")


def _outcome(parser: FrameParser, pieces: list[bytes]) -> object:
    events: list[tuple[int, object]] = []
    try:
        for piece in pieces:
            events += parser.feed(piece)
    except FrameError as exc:
        return (type(exc).__name__, str(exc), events)
    return events


def test_the_one_whole_frame_read_gives_what_the_general_parser_gives() -> None:
    """`feed` takes a shortcut when a read is exactly one whole frame of up to 64 KiB; fed in two pieces the same
    bytes take the general path. Both must agree on every frame, good or bad, and leave the parser
    ready for the next message (a fragmented one, here)."""
    rng = random.Random(13)
    samples = [b"", b"a", "é€😀".encode(), b"\xff", b"\xed\xa0\x80", b"ok" + b"\xc3", b"x" * 125]
    frames_tried = 0
    for _ in range(3000):
        size = rng.choice([0, 1, 2, 5, 60, 124, 125, 126, 127, 200, 4096] * 3 + [65535, 65536, 70000])
        payload = rng.choice(samples) if rng.random() < 0.3 else rng.randbytes(size)
        if rng.random() < 0.4:
            payload = payload.decode("utf-8", "replace").encode()[:size]
        opcode = rng.choice([OP_TEXT, OP_BINARY, OP_TEXT, 0x0, 0x9, 0x3])
        fin = rng.random() < 0.9
        rsv = rng.choice([0, 0, 0, 0, 4, 2])
        frame = client_frame(opcode, payload, fin=fin, rsv=rsv)
        if rng.random() < 0.05:
            frame = bytes([frame[0], frame[1] & 0x7F]) + frame[6:]  # unmasked
        limit = rng.choice([MiB, 125, 60, 5, 4096, 65535])
        for deflate in (False, True):
            whole = FrameParser(limit, 0, deflate=deflate)
            split = FrameParser(limit, 0, deflate=deflate)
            got = _outcome(whole, [frame])
            assert got == _outcome(split, [frame[:1], frame[1:]]), (frame, limit, deflate)
            if not isinstance(got, tuple):  # no error: both go on alike
                after = client_frame(OP_TEXT, b"next", fin=False) + client_frame(0x0, b" one")
                assert _outcome(whole, [after]) == _outcome(split, [after])
            frames_tried += 1
    assert frames_tried == 6000
    # Reads the shortcut must refuse whatever their length adds up to: unmasked (the length byte
    # then reads as 128 + n), a 64-bit length, a frame followed by more bytes.
    for n in range(0, 126, 5):
        unmasked = bytes([0x81, n]) + b"x" * n
        for extra in range(0, 260, 1):
            data = unmasked + b"y" * extra
            assert _outcome(FrameParser(MiB), [data]) == _outcome(FrameParser(MiB), [data[:1], data[1:]])
    long_header = client_frame(OP_TEXT, b"z" * 70000)
    assert long_header[1] & 0x7F == 127
    assert _outcome(FrameParser(MiB), [long_header]) == [(OP_TEXT, b"z" * 70000)]
