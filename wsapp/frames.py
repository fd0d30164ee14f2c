"""RFC 6455 frame codec with no I/O: bytes in, (opcode, payload) events out; server frames out.

Hand-written rather than wsproto's FrameProtocol: `bench/frame_codec.py` measures both on the same
traffic (see docs/PERFORMANCE.md); this one parses small frames several times faster because it
works on the receive buffer directly and allocates one bytes object per message. Every header rule is
checked before any payload byte is buffered, and text is validated incrementally (fail fast).
"""

from __future__ import annotations

import codecs
import struct
import zlib
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from wsapp.exceptions import FrameError, InvalidPayload, MessageTooBig, PolicyViolation, ProtocolViolation

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

class CloseCode(IntEnum):
    """The close codes wsapp sends (RFC 6455 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # shutdown drain, ping timeout
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003  # binary on a JSON route
    INVALID_PAYLOAD = 1007  # text that is not UTF-8
    POLICY_VIOLATION = 1008  # flooding, too many fragments, token expired, a handler's Reject
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # slow consumer
    # Never on the wire (RFC 6455 7.4.1): what logs and metrics say when the peer's close frame had
    # no code, and when the connection ended with no close frame at all.
    NO_STATUS = 1005
    ABNORMAL = 1006


# (opcode, payload): bytes for data, ping and pong; (code or None, reason) for close.
FrameEvent = tuple[int, Any]

_DATA_OPCODES = (OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack
# Appended to a compressed message before the last inflate (RFC 7692 7.2.2).
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


def close_code_is_valid(code: int) -> bool:
    """Whether a peer may send `code` on the wire (RFC 6455 7.4; 1005/1006/1015 are local-only)."""
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame. The result can be queued to any number of clients."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, length))
    elif length < 65536:
        header = _pack_16(0x80 | opcode, 126, length)
    else:
        header = _pack_64(0x80 | opcode, 127, length)
    return header + payload


def encode_close(code: int | None, reason: str = "") -> bytes:
    """A close frame; `code=None` sends an empty body (answer to a close that carried no code)."""
    if code is None:
        return encode_frame(OP_CLOSE, b"")
    body = reason.encode("utf-8")[:123]
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + body)


# For each mask byte, a 256-byte table mapping b -> b ^ mask_byte (for bytes.translate).
_XOR_TABLES = [bytes(b ^ k for b in range(256)) for k in range(256)]
# Measured crossover (bench notes in docs/PERFORMANCE.md): below this the integer XOR is faster.
_TRANSLATE_FROM = 512


def unmask_python(data: bytes | bytearray | memoryview, mask: bytes, offset: int = 0) -> bytes:
    """`unmask` in pure Python: used when the C `apply_mask` is missing, and to test it against."""
    length = len(data)
    if not length:
        return b""
    if offset:
        mask = mask[offset:] + mask[:offset]
    if length < _TRANSLATE_FROM:
        # One big-integer XOR runs in C; a per-byte Python loop would be ~100x slower.
        key = (mask * ((length >> 2) + 1))[:length]
        value = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
        return value.to_bytes(length, "little")
    # Large payloads: four strided bytes.translate passes, ~3x faster than the integer XOR.
    buf = bytearray(data)
    for lane in range(4):
        buf[lane::4] = buf[lane::4].translate(_XOR_TABLES[mask[lane]])
    return bytes(buf)


_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:
    # The `websockets` package's C helper (a wheel for CPython 3.11): 0.08 us for 64 bytes and 0.18
    # for 4 KiB against 0.54 and 4.5 for unmask_python (bench/frame_codec.py --unmask).
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - a platform with no wheel: the pure-Python XOR
    _apply_mask = None


def unmask(data: bytes | bytearray | memoryview, mask: bytes, offset: int = 0) -> bytes:
    """XOR `data` with the 4-byte `mask`, starting `offset` bytes into the mask cycle."""
    if _apply_mask is None:
        return unmask_python(data, mask, offset)
    if offset:
        mask = mask[offset:] + mask[:offset]
    return _apply_mask(data, mask)


def _check_utf8(payload: bytes) -> None:
    """A whole text message that is not all ASCII must be valid UTF-8 (1007 otherwise)."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("text message is not valid UTF-8") from None


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """Validate a close frame body: (code or None, reason). Raises on a 1-byte body or a bad code."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolViolation("close frame body of 1 byte")
    code = int.from_bytes(payload[:2], "big")
    if not close_code_is_valid(code):
        raise ProtocolViolation(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("close reason is not valid UTF-8") from None
    return code, reason


class FrameParser:
    """Incremental decoder of client (masked) frames into complete messages and control frames.

    `feed(data)` returns a list of `(opcode, payload)`; for OP_CLOSE the payload is already
    validated by `parse_close`. Errors are raised as FrameError subclasses carrying the close code.
    """

    def __init__(self, max_message_bytes: int, max_fragments: int = 0, deflate: bool = False) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_fragments = max_fragments
        # permessage-deflate negotiated: RSV1 marks a compressed message (RFC 7692 6).
        self.deflate = deflate
        self._buf = b""
        # Frame in progress (after its header): None when the next bytes are a header.
        self._remaining: int | None = None
        self._opcode = 0
        self._fin = False
        self._mask = b""
        self._mask_pos = 0
        # Data message in progress (possibly fragmented).
        self._msg_opcode = 0
        self._msg_parts: list[bytes] = []
        self._msg_len = 0
        self._fragments = 0
        self._utf8: codecs.IncrementalDecoder | None = None
        # The inflater of the compressed message in progress (one per message: the client was told
        # client_no_context_takeover, so nothing is kept between messages), and its output so far.
        self._inflater: zlib._Decompress | None = None
        self._compressed = False
        self._inflated = 0
        self.failed: FrameError | None = None

    def feed(self, data: bytes) -> list[FrameEvent]:
        """Parse what `data` completes. If a violation follows complete messages in the same read,
        those messages are returned first and the error is left in `self.failed` for the caller,
        so a peer's last good messages are still served before the connection fails."""
        if self.failed is not None:
            raise self.failed
        if not self._buf and self._remaining is None and not self._msg_opcode and len(data) >= 6:
            # The common read: exactly one whole message, one final masked frame with a 7- or 16-bit
            # length and no reserved bit (so not compressed). What `_parse` would do, without its
            # general steps: the first code a message runs after `recv` runs cold (the fan-out's sends
            # evicted it), which made this parse cost ~10 µs per message at window 1.
            b0 = data[0]
            length = data[1] ^ 0x80  # the mask bit must be set: else >= 0x80 and not taken here
            if length < 126:
                header = 6
            elif length == 126:
                length = (data[2] << 8) | data[3]
                header = 8
            else:  # a 64-bit length, or unmasked: the general parse (no read is -2 bytes long)
                length = header = -1
            if (b0 == 0x81 or b0 == 0x82) and len(data) == length + header and length <= self.max_message_bytes:
                payload = unmask(data[header:], data[header - 4:header])
                if b0 == 0x81 and not payload.isascii():
                    _check_utf8(payload)
                return [(b0 & 0x0F, payload)]
        events: list[FrameEvent] = []
        try:
            self._parse(data, events)
        except FrameError as exc:
            if not events:
                raise
            self.failed = exc
        return events

    def _parse(self, data: bytes, events: list[FrameEvent]) -> None:
        buf = self._buf + data if self._buf else data
        end = len(buf)
        pos = 0
        while True:
            if self._remaining is None:
                if end - pos < 2:
                    break
                pos = self._read_header(buf, pos, end)
                if self._remaining is None:
                    break
            remaining = self._remaining
            opcode = self._opcode
            if opcode >= OP_CLOSE:
                # Control frames are tiny (<=125 bytes): wait for the whole payload.
                if end - pos < remaining:
                    break
                payload = unmask(buf[pos : pos + remaining], self._mask)
                pos += remaining
                self._remaining = None
                if opcode == OP_CLOSE:
                    events.append((OP_CLOSE, parse_close(payload)))
                    self._buf = b""
                    return
                events.append((opcode, payload))
                continue
            take = min(remaining, end - pos)
            if take == remaining and self._fin and self._fragments == 1 and not self._msg_parts:
                # Fast path: a whole unfragmented message is in the buffer.
                payload = unmask(buf[pos : pos + take], self._mask)
                pos += take
                self._remaining = None
                self._msg_opcode = self._msg_len = self._fragments = 0
                if self._compressed:
                    self._compressed = False
                    payload = self._inflate_whole(payload)
                if opcode == OP_TEXT and not payload.isascii():  # isascii: no str made, ~2x faster
                    _check_utf8(payload)
                events.append((opcode, payload))
                continue
            self._consume_data(buf[pos : pos + take])
            pos += take
            if self._remaining:
                break
            self._remaining = None
            if self._fin:
                events.append(self._finish_message())
        self._buf = buf[pos:] if pos < end else b""

    def _read_header(self, buf: bytes, pos: int, end: int) -> int:
        b0 = buf[pos]
        b1 = buf[pos + 1]
        length = b1 & 0x7F
        header_len = 6 if length < 126 else (8 if length == 126 else 14)
        if b0 & 0x70:
            self._check_reserved_bits(b0)
        if not b1 & 0x80:
            raise ProtocolViolation("client frames must be masked")
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        if opcode >= OP_CLOSE:
            if opcode not in _CONTROL_OPCODES:
                raise ProtocolViolation(f"reserved opcode {opcode:#x}")
            if not fin:
                raise ProtocolViolation("control frames must not be fragmented")
            if length > 125:
                raise ProtocolViolation("control frame payload over 125 bytes")
        elif opcode == OP_CONTINUATION:
            if not self._msg_opcode:
                raise ProtocolViolation("continuation frame with no message to continue")
        elif opcode in _DATA_OPCODES:
            if self._msg_opcode:
                raise ProtocolViolation("new message started before the previous one ended")
        else:
            raise ProtocolViolation(f"reserved opcode {opcode:#x}")
        if end - pos < header_len:
            if length == 127 and end - pos >= 3 and buf[pos + 2] & 0x80:
                raise ProtocolViolation("64-bit payload length with the high bit set")
            return pos
        if length == 126:
            length = (buf[pos + 2] << 8) | buf[pos + 3]
        elif length == 127:
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length >> 63:
                raise ProtocolViolation("64-bit payload length with the high bit set")
        if opcode < OP_CLOSE:
            # Limits from the header alone, before any of the payload is read.
            if self._msg_len + length > self.max_message_bytes:
                raise MessageTooBig(f"message exceeds {self.max_message_bytes} bytes")
            self._fragments += 1
            if self.max_fragments and self._fragments > self.max_fragments:
                raise PolicyViolation(f"message exceeds {self.max_fragments} fragments")
            if opcode:
                self._msg_opcode = opcode
                self._compressed = bool(b0 & 0x40)
                # A text message that is not wholly in this buffer is validated piece by piece.
                if opcode == OP_TEXT and not (fin and length <= end - pos - header_len):
                    self._utf8 = _Utf8Decoder()
        self._opcode = opcode if opcode else self._msg_opcode
        self._fin = fin
        self._mask = buf[pos + header_len - 4 : pos + header_len]
        self._mask_pos = 0
        self._remaining = length
        return pos + header_len

    def _consume_data(self, chunk: bytes) -> None:
        """Unmask and keep one piece of a data frame; validate text as it arrives."""
        piece = unmask(chunk, self._mask, self._mask_pos)
        self._mask_pos = (self._mask_pos + len(piece)) & 3
        assert self._remaining is not None
        self._remaining -= len(piece)
        self._msg_len += len(piece)
        if self._compressed:
            piece = self._inflate(piece)
        if self._utf8 is not None:
            try:
                self._utf8.decode(piece, False)
            except UnicodeDecodeError:
                raise InvalidPayload("text message is not valid UTF-8") from None
        self._msg_parts.append(piece)

    def _check_reserved_bits(self, b0: int) -> None:
        """RSV1 is allowed on the first frame of a data message once deflate was negotiated; nothing
        else may set a reserved bit."""
        opcode = b0 & 0x0F
        if b0 & 0x30 or not self.deflate:
            raise ProtocolViolation("reserved bits set without a negotiated extension")
        if opcode not in _DATA_OPCODES:
            raise ProtocolViolation("RSV1 set on a control or continuation frame")

    def _inflate(self, data: bytes) -> bytes:
        """Inflate one piece of a compressed message, never producing more than the size limit allows
        (a deflate bomb is refused after at most max_message_bytes + 1 bytes of output)."""
        if self._inflater is None:
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        room = self.max_message_bytes - self._inflated
        try:
            out = self._inflater.decompress(data, room + 1)
        except zlib.error:
            raise InvalidPayload("compressed message does not inflate") from None
        if len(out) > room:
            raise MessageTooBig(f"message inflates past {self.max_message_bytes} bytes")
        self._inflated += len(out)
        return out

    def _inflate_whole(self, data: bytes) -> bytes:
        try:
            return self._inflate(data) + self._inflate(_DEFLATE_TAIL)
        finally:
            self._inflater = None
            self._inflated = 0

    def _finish_message(self) -> tuple[int, bytes]:
        if self._compressed:
            tail = self._inflate(_DEFLATE_TAIL)
            if tail:
                self._msg_parts.append(tail)
                if self._utf8 is not None:
                    try:
                        self._utf8.decode(tail, False)
                    except UnicodeDecodeError:
                        raise InvalidPayload("text message is not valid UTF-8") from None
            self._compressed = False
            self._inflater = None
            self._inflated = 0
        if self._utf8 is not None:
            try:
                self._utf8.decode(b"", True)
            except UnicodeDecodeError:
                raise InvalidPayload("text message ends inside a UTF-8 sequence") from None
        parts = self._msg_parts
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        event = (self._msg_opcode, payload)
        self._msg_opcode = 0
        self._msg_parts = []
        self._msg_len = 0
        self._fragments = 0
        self._utf8 = None
        return event
