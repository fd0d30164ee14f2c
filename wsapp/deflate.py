"""permessage-deflate (RFC 7692): negotiation, and compression of whole server frames, with no I/O.

The server always answers `server_no_context_takeover` and `client_no_context_takeover`: a message's
compressed bytes then depend on nothing sent before, so a broadcast is compressed once and the same
bytes go to every recipient with the same window size; and nothing is kept per connection between
messages (the inflater lives for one message). zlib from the standard library does the work.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

EXTENSION = "permessage-deflate"
# Appended by the receiver, stripped by the sender (RFC 7692 7.2.1): the end of a sync flush.
TAIL = b"\x00\x00\xff\xff"
RSV1 = 0x40
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BITS = re.compile(r"^(?:[89]|1[0-5])$")
# zlib refuses a raw deflate window of 8 (since 1.2.9); an 8-bit peer gets 9-bit compression restarted
# every 256 bytes, so no back reference reaches further than its window.
_WINDOW_8_CHUNK = 256


@dataclass(frozen=True)
class DeflateParams:
    """What was agreed for one connection (both directions without context takeover)."""

    server_max_window_bits: int = 15
    # The window the client said it will use (informational: one inflater of 15 bits reads them all).
    client_max_window_bits: int = 15
    # Server-to-client messages shorter than this go uncompressed (RSV1 clear).
    min_bytes: int = 256
    level: int = 6

    def response_header(self, offered_server_bits: bool) -> str:
        """The Sec-WebSocket-Extensions value of the 101."""
        parts = [EXTENSION, "server_no_context_takeover", "client_no_context_takeover"]
        if offered_server_bits:
            parts.append(f"server_max_window_bits={self.server_max_window_bits}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Negotiated:
    params: DeflateParams
    header: str


def parse_offers(header: str | None) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Sec-WebSocket-Extensions as [(extension, [(param, value or None)])], in the client's order."""
    offers: list[tuple[str, list[tuple[str, str | None]]]] = []
    if not header:
        return offers
    for element in header.split(","):
        name, *raw_params = (part.strip() for part in element.split(";"))
        if not name:
            continue
        params: list[tuple[str, str | None]] = []
        for raw in raw_params:
            key, eq, value = (s.strip() for s in raw.partition("="))
            if eq and len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]  # a quoted-string value must still be a token (RFC 7692 7.1)
            params.append((key.lower(), value if eq else None))
        offers.append((name.lower(), params))
    return offers


def accept_offer(params: list[tuple[str, str | None]], min_bytes: int, level: int) -> Negotiated | None:
    """The answer to one permessage-deflate offer, or None to decline it (RFC 7692 section 5:
    unknown or repeated parameters and bad values are declined, never an error)."""
    seen: set[str] = set()
    server_bits: int | None = None
    client_bits = 15
    for key, value in params:
        if key in seen or (value is not None and not _TOKEN.match(value)):
            return None
        seen.add(key)
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif key == "server_max_window_bits":
            if value is None or not _BITS.match(value):
                return None
            server_bits = int(value)
        elif key == "client_max_window_bits":
            # Without a value the client only says it supports the parameter (7.1.2.2).
            if value is not None:
                if not _BITS.match(value):
                    return None
                client_bits = int(value)
        else:
            return None
    deflate = DeflateParams(server_bits or 15, client_bits, min_bytes, level)
    return Negotiated(deflate, deflate.response_header(server_bits is not None))


def negotiate(header: str | None, min_bytes: int = 256, level: int = 6) -> Negotiated | None:
    """Accept the first acceptable permessage-deflate offer of the header; None: no compression."""
    for name, params in parse_offers(header):
        if name == EXTENSION:
            accepted = accept_offer(params, min_bytes, level)
            if accepted is not None:
                return accepted
    return None


# One compressor per (window bits, level) for the whole process: each message ends with a full
# flush, which resets the compressor's history, so no message's bytes depend on the one before.
_compressors: dict[tuple[int, int], zlib._Compress] = {}
# zlib's hash table has 2**(memLevel + 7) entries and is rewritten each time the window slides, that
# is every 2**bits bytes of input. With the default memLevel 8 (32,768 entries) and a small window
# that is most of the work: 128 KiB of JSON took 3.4 ms at 9 bits against 0.5 ms at 15 (zlib 1.2.13).
# memLevel 4 brings 9 bits to 0.55 ms for 2% less compression (docs/CONFORMANCE.md, "Where the time
# of 12 and 13 goes"); from 12 bits up the default is as fast or faster.
_SMALL_WINDOW_BITS = 11
_SMALL_WINDOW_MEM_LEVEL = 4


def compress(payload: bytes, window_bits: int = 15, level: int = 6) -> bytes:
    """The RFC 7692 payload of one message: raw deflate, flushed, without the trailing 00 00 ff ff."""
    bits = max(window_bits, 9)
    compressor = _compressors.get((bits, level))
    if compressor is None:
        mem_level = _SMALL_WINDOW_MEM_LEVEL if bits <= _SMALL_WINDOW_BITS else zlib.DEF_MEM_LEVEL
        compressor = _compressors[(bits, level)] = zlib.compressobj(level, zlib.DEFLATED, -bits, mem_level)
    if window_bits > 8:
        out = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
    else:
        pieces = []
        for start in range(0, len(payload), _WINDOW_8_CHUNK):
            pieces.append(compressor.compress(payload[start : start + _WINDOW_8_CHUNK]))
            pieces.append(compressor.flush(zlib.Z_FULL_FLUSH))
        out = b"".join(pieces) or compressor.flush(zlib.Z_FULL_FLUSH)
    return out[:-4] if out.endswith(TAIL) else out


def _header_length(frame: bytes) -> int:
    length = frame[1] & 0x7F
    return 2 if length < 126 else (4 if length == 126 else 10)


def deflate_frame(frame: bytes, params: DeflateParams) -> bytes:
    """The compressed variant of a final, unmasked server data frame; `frame` itself when it is a
    control frame, is under the size threshold, or would not get smaller."""
    b0 = frame[0]
    if b0 & 0x08 or len(frame) < params.min_bytes + 2:
        return frame
    start = _header_length(frame)
    if len(frame) - start < params.min_bytes:
        return frame
    body = compress(frame[start:], params.server_max_window_bits, params.level)
    if len(body) + 1 >= len(frame) - start:
        return frame
    n = len(body)
    first = b0 | RSV1
    if n < 126:
        header = bytes((first, n))
    elif n < 65536:
        header = bytes((first, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + n.to_bytes(8, "big")
    return header + body
