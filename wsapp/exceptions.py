"""One exception tree for wsapp; each error carries the close code or error code it maps to."""

from __future__ import annotations


class WsappError(Exception):
    """Base of every error wsapp raises on purpose."""


class ConfigError(WsappError):
    """A setting from the environment is missing or malformed; names the variable."""


class FrameError(WsappError):
    """The peer broke RFC 6455 or a limit at the frame layer; the connection closes with `close_code`."""

    close_code = 1002

    def __init__(self, reason: str, close_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if close_code is not None:
            self.close_code = close_code


class ProtocolViolation(FrameError):
    """Malformed framing (bad opcode, RSV bits, unmasked frame, bad control frame): close 1002."""

    close_code = 1002


class InvalidPayload(FrameError):
    """A text message or close reason that is not valid UTF-8: close 1007."""

    close_code = 1007


class PolicyViolation(FrameError):
    """The peer broke a policy (too many fragments, flooding): close 1008."""

    close_code = 1008


class UnsupportedData(FrameError):
    """The endpoint does not accept this kind of data (binary on a JSON route): close 1003."""

    close_code = 1003


class MessageTooBig(FrameError):
    """A frame header or fragment sequence announces more than the configured maximum: close 1009."""

    close_code = 1009


class MessageError(WsappError):
    """A rooms-protocol message is unacceptable; answered with an `error` frame, connection stays open."""

    def __init__(self, code: str, message: str, msg_id: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id


class Reject(MessageError):
    """Raised by an `on_publish` or `authorize` hook (or a handler) to refuse one message: the client
    gets an `error` with this `code` and `message`, and the connection stays open."""


class Refuse(WsappError):
    """Raised before the 101 (by `@rt.authenticate` or an admission check): the client gets this HTTP
    `status` with `reason` as a one-line body, never an upgrade. `kind` is a short fixed name for
    logs and the `reason` label of wsapp_refusals_total (default: the status's phrase, `unauthorized`)."""

    def __init__(
        self, status: int, reason: str, headers: list[tuple[str, str]] | None = None, kind: str | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []
        if kind is None:
            from http import HTTPStatus

            try:
                kind = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
            except ValueError:
                kind = str(status)
        self.kind = kind


class ConnectionClosed(WsappError):
    """`ws.receive()` on a connection that has ended; iterating over `ws` simply stops instead."""
