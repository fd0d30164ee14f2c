"""A raw-socket WebSocket client for tests: sends exactly the bytes we choose (bad frames included)
and reads server frames without any library smoothing things over."""

from __future__ import annotations

import base64
import os
import socket
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    rsv: int = 0  # the RSV1-3 bits (4 = RSV1: a permessage-deflate compressed message)

    @property
    def close_code(self) -> int | None:
        assert self.opcode == 0x8, f"not a close frame: {self}"
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8")


def client_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bytes | None = None,
                 length: int | None = None) -> bytes:
    """A masked client frame; `length` lets a test announce a size different from the payload."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    if n < 126:
        header = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", b0, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


class RawClient:
    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 5.0,
                 upgrade: bool = True) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self.buf = b""
        self.status = 0
        self.response_headers: dict[str, str] = {}
        self.response_body = b""
        if upgrade:
            self.handshake(headers or {})

    def handshake(
        self, extra: dict[str, str], method: str = "GET", version: str = "HTTP/1.1", then: bytes = b"",
        then_apart: bool = False, head_apart: bool = False,
    ) -> int:
        """Send the upgrade request (and `then`: frames right behind it, in the same write or, with
        `then_apart`, in a second segment before the 101 is read; with `head_apart`, the request
        itself goes in two segments, cut inside a header line); the status."""
        headers = {
            "Host": f"{self.host}:{self.port}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
        headers.update(extra)
        lines = [f"{method} {self.path} {version}"] + [f"{k}: {v}" for k, v in headers.items() if v is not None]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if then_apart or head_apart:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cut = len(request) // 2 if head_apart else len(request)
            self.sock.sendall(request[:cut])
            self.sock.sendall(request[cut:] + then if head_apart else then)
        else:
            self.sock.sendall(request + then)
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                self.response_headers[k.strip().lower()] = v.strip()
        if self.status != 101:
            length = int(self.response_headers.get("content-length", "0"))
            self.response_body = self._read_exactly(length)
        return self.status

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before {marker!r}; got {self.buf!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(marker, 1)
        return head

    def _read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError(f"closed after {len(self.buf)} of {n} bytes")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, opcode: int, payload: bytes, **kw: object) -> None:
        self.sock.sendall(client_frame(opcode, payload, **kw))  # type: ignore[arg-type]

    def recv_frame(self) -> Frame:
        b0, b1 = self._read_exactly(2)
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exactly(8))[0]
        return Frame(bool(b0 & 0x80), b0 & 0x0F, self._read_exactly(n), (b0 >> 4) & 0x07)

    def recv_until_close(self) -> Frame:
        """Skip data frames until the close frame; fails if the server just drops the TCP connection."""
        while True:
            frame = self.recv_frame()
            if frame.opcode == 0x8:
                return frame

    def recv_until_pong(self) -> Frame:
        while True:
            frame = self.recv_frame()
            if frame.opcode == 0xA:
                return frame

    def closed_by_server(self) -> bool:
        """True once the server has shut the TCP connection (reads EOF)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
