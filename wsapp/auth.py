"""Pre-upgrade admission: the Origin policy and JWT tokens (DESIGN.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import jwt

from wsapp.exceptions import Refuse

if TYPE_CHECKING:
    from flask import Request

    from wsapp.config import Settings


@dataclass(frozen=True)
class Identity:
    """Who a client is, which rooms it may join (None = any), and when its credentials expire (a Unix
    time; None = never). What the built-in JWT authenticator returns; an `@rt.authenticate` hook may
    return one too, or any other value (a user name, a user object). `str(identity)` is `sub`."""

    sub: str
    rooms: frozenset[str] | None = None
    expires: float | None = None

    def __str__(self) -> str:
        return self.sub


class AuthError(Exception):
    """Missing or invalid token; answered with HTTP 401 before the upgrade."""


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Same-origin pages and clients without Origin are allowed; others must be listed (or `*`)."""
    if not origin:
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or not host:
        return False
    default_port = "443" if parts.scheme == "https" else "80"
    return _with_port(parts.netloc, default_port) == _with_port(host.strip().lower(), default_port)


def _with_port(netloc: str, default_port: str) -> str:
    if netloc.endswith("]") or ":" not in netloc.rsplit("]", 1)[-1]:
        return f"{netloc}:{default_port}"
    return netloc


def bearer_token(query_token: str | None, authorization: str | None) -> str | None:
    if query_token:
        return query_token
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def verify_token(token: str | None, secret: str) -> Identity:
    """Decode an HS256 JWT that must carry `sub` and `exp`; optional `rooms` list."""
    if not token:
        raise AuthError("a token is required (?token= or Authorization: Bearer)")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise AuthError("invalid token: 'sub' must be a non-empty string")
    rooms = claims.get("rooms")
    if rooms is not None and (not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms)):
        raise AuthError("invalid token: 'rooms' must be a list of room names")
    return Identity(sub, frozenset(rooms) if rooms is not None else None, float(claims["exp"]))


class JwtAuthenticator:
    """The built-in `authenticate` hook: a JWT from `?token=` or `Authorization: Bearer`, checked
    against WSAPP_JWT_SECRET (HS256). Missing or invalid: Refuse(401)."""

    def __init__(self, settings: Settings) -> None:
        self._secret = settings.jwt_secret or ""

    def __call__(self, request: Request) -> Identity:
        token = bearer_token(request.args.get("token"), request.headers.get("Authorization"))
        try:
            return verify_token(token, self._secret)
        except AuthError as exc:
            raise Refuse(401, str(exc), [("WWW-Authenticate", "Bearer")]) from None


def client_ip(peer: str, forwarded_for: str | None, trusted_hops: int) -> str:
    """The client's address: the peer's, or with `trusted_hops` proxies in front, the address the
    outermost trusted proxy saw (counted from the right of X-Forwarded-For, which clients can forge
    on the left)."""
    if trusted_hops <= 0 or not forwarded_for:
        return peer
    hops = [part.strip() for part in forwarded_for.split(",") if part.strip()]
    if len(hops) < trusted_hops:
        return peer
    return hops[-trusted_hops]
