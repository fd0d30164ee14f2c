"""`POST /api/publish`: backends in other languages publish into rooms with `Authorization: Bearer <key>`.

Mounted only when WSAPP_API_KEY is set. The body is `{"room": ..., "data": ..., "from"?: ...}` (answered
`{"seq": n}`) or a JSON list of up to MAX_BATCH of those (answered `{"seqs": [...]}`, in order); every
item is checked before any is published. Errors are `{"error": code, "message": ...}`.
"""

from __future__ import annotations

import hmac
import math
from typing import Any

import orjson
from flask import Response, current_app, request

from wsapp import protocol
from wsapp.config import Settings
from wsapp.exceptions import MessageError
from wsapp.ratelimit import TokenBucket
from wsapp.services import services_of

MAX_BATCH = 1000  # items in one list body
# The API's token bucket allows this many times one connection's WSAPP_RATE_LIMIT / WSAPP_RATE_BURST,
# per process and counted in messages: one caller there stands in for many users.
API_RATE_SCALE = 10
_BUCKET_KEY = "wsapp.publish_api.bucket"
_FIELDS = frozenset({"room", "data", "from"})


class _Answer(Exception):
    """An error answer, raised from the checks below and turned into a response by the view."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def publish_api_view() -> Response:
    """The view for `POST /api/publish` (the lead mounts it when `settings.api_key` is set)."""
    services = services_of(current_app)
    settings = services.settings
    try:
        _check_key(settings.api_key)
        items = _parse(_read_body(settings.max_message_bytes), settings.max_json_depth)
        _check_rate(settings, len(items[1]))
    except _Answer as answer:
        return _json({"error": answer.code, "message": answer.message}, answer.status, answer.headers)
    single, batch = items
    seqs: list[int] = []
    epochs: list[str] = []  # each seq's numbering life: a batch may straddle a room's restart
    for room, data, sender in batch:
        try:
            seq = services.hub.post(room, data, sender)
        except MessageError as exc:  # `unavailable`: the broker cannot number it now; the earlier ones stand
            body = {"error": exc.code, "message": exc.message, "seqs": seqs, "epochs": epochs}
            return _json(body, 503, {"Retry-After": "1"})
        seqs.append(int(seq))
        epochs.append(seq.epoch)
        # Like rt.publish: a batch waits for recipients it put over their backlog cap.
        services.outbox.pace_if_needed()
    services.stats.api_publishes += len(seqs)
    if single:
        return _json({"seq": seqs[0], "epoch": epochs[0]}, 200)
    return _json({"seqs": seqs, "epochs": epochs}, 200)


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, content_type="application/json")


def _check_key(api_key: str | None) -> None:
    if not api_key:  # mounted without a key: refuse everything rather than publish for anyone
        raise _Answer(404, "not_found", "the publish API is off (WSAPP_API_KEY is not set)")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        challenge = {"WWW-Authenticate": 'Bearer realm="wsapp"'}
        raise _Answer(401, "unauthorized", "send Authorization: Bearer <WSAPP_API_KEY>", challenge)
    # Header values arrive decoded as Latin-1 (WSGI): compare the bytes the client sent.
    if not hmac.compare_digest(token.encode("latin-1", "replace"), api_key.encode("utf-8")):
        raise _Answer(403, "forbidden", "wrong API key")


def _read_body(limit: int) -> bytes:
    if not request.is_json:
        raise _Answer(415, "unsupported_media_type", "send Content-Type: application/json")
    too_large = _Answer(413, "too_large", f"the body is over WSAPP_MAX_MESSAGE_BYTES ({limit} bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large  # before reading a byte of it
    body = request.stream.read(limit + 1)  # chunked bodies have no length to check first
    if len(body) > limit:
        raise too_large
    return body


def _parse(body: bytes, max_depth: int) -> tuple[bool, list[tuple[str, Any, str]]]:
    """(single, [(room, data, sender), ...]) from the body, or an _Answer saying what is wrong."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Answer(400, protocol.BAD_JSON, f"the body is not valid JSON: {exc}") from None
    if isinstance(obj, dict):
        return True, [_item(obj, max_depth, "")]
    if not isinstance(obj, list):
        raise _Answer(400, protocol.BAD_MESSAGE, "send an object {room, data, from?} or a list of them")
    if len(obj) > MAX_BATCH:
        raise _Answer(413, "too_large", f"at most {MAX_BATCH} messages in one list")
    return False, [_item(item, max_depth, f"item {i}: ") for i, item in enumerate(obj)]


def _item(obj: Any, max_depth: int, where: str) -> tuple[str, Any, str]:
    try:
        if not isinstance(obj, dict):
            raise MessageError(protocol.BAD_MESSAGE, "each message is an object {room, data, from?}")
        unknown = obj.keys() - _FIELDS
        if unknown:
            raise MessageError(protocol.BAD_MESSAGE, f"unknown fields {sorted(unknown)[:5]}; expected room, data, from")
        room = protocol.check_room(obj.get("room"))
        if "data" not in obj:
            raise MessageError(protocol.BAD_MESSAGE, "field 'data' is required")
        data = obj["data"]
        if protocol.json_depth(data) > max_depth:
            raise MessageError(protocol.BAD_MESSAGE, f"data is nested deeper than {max_depth} levels")
        sender = protocol.check_sender(obj.get("from", "server"))
    except MessageError as exc:
        raise _Answer(400, exc.code, where + exc.message) from None
    return room, data, sender


def _check_rate(settings: Settings, count: int) -> None:
    if settings.rate_limit <= 0 or count == 0:
        return
    extensions = current_app.extensions
    bucket = extensions.get(_BUCKET_KEY)
    if bucket is None:
        bucket = extensions[_BUCKET_KEY] = TokenBucket(
            settings.rate_limit * API_RATE_SCALE, settings.rate_burst * API_RATE_SCALE
        )
    if count > bucket.burst:
        # Waiting would never help: say so instead of a 429 the caller would retry forever.
        raise _Answer(413, "too_large", f"at most {int(bucket.burst)} messages at once at this rate limit")
    if not bucket.allow(count):
        retry = max(1, math.ceil(bucket.seconds_until(count)))
        raise _Answer(
            429,
            protocol.RATE_LIMITED,
            f"over {bucket.rate:g} messages/s (burst {int(bucket.burst)}); retry in {retry}s",
            {"Retry-After": str(retry)},
        )
