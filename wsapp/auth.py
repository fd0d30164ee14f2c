"""Pre-upgrade admission: the Origin policy, bearer tokens and the built-in JWT authenticator (DESIGN.md section 4)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import jwt

from wsapp.exceptions import ConfigError, Refuse
from wsapp.jwks import ASYMMETRIC_ALGORITHMS, JwksKeys, KeysUnavailable

if TYPE_CHECKING:
    from flask import Request
    from jwt import PyJWK

    from wsapp.config import Settings

log = logging.getLogger(__name__)


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


# A Sec-WebSocket-Protocol entry that carries a token rather than naming a protocol: browsers cannot
# set Authorization on a WebSocket, and a token in the URL ends up in proxy and access logs.
TOKEN_PROTOCOL_PREFIX = "bearer."
# Tolerated clock difference with whoever issued the token (a fresh token's iat a second ahead).
LEEWAY_SECONDS = 5


def token_from(query_token: str | None, authorization: str | None, protocol_header: str | None) -> str | None:
    """The bearer token of a request: `?token=`, else `Authorization: Bearer`, else the first
    `bearer.<token>` entry of Sec-WebSocket-Protocol; None when there is none."""
    if query_token:
        return query_token
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    for entry in (protocol_header or "").split(","):
        entry = entry.strip()
        if entry.startswith(TOKEN_PROTOCOL_PREFIX) and len(entry) > len(TOKEN_PROTOCOL_PREFIX):
            return entry[len(TOKEN_PROTOCOL_PREFIX):]
    return None


def _decode(token: str, key: str | PyJWK, algorithm: str, audience: str | None = None,
            issuer: str | None = None) -> Identity:
    """The identity in a token signed with `key` by `algorithm` (and nothing else); it must carry
    `exp` and `sub`, and the `aud` and `iss` given."""
    required = ["exp", "sub", *(["aud"] if audience else []), *(["iss"] if issuer else [])]
    try:
        claims = jwt.decode(token, key, algorithms=[algorithm], options={"require": required},
                            audience=audience, issuer=issuer, leeway=LEEWAY_SECONDS)
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
    """The built-in `authenticate` hook: a JWT from `?token=`, `Authorization: Bearer` or a
    `bearer.<token>` subprotocol entry, HS256 with WSAPP_JWT_SECRET or RS256/ES256 (and the other
    public-key algorithms) with a key from WSAPP_JWT_JWKS_URL, chosen by the token's `alg`. A missing
    or invalid token: Refuse(401); the identity provider unreachable: Refuse(503)."""

    def __init__(self, settings: Settings, jwks: JwksKeys | None = None) -> None:
        if not settings.jwt_secret and not settings.jwt_jwks_url:
            raise ConfigError("JwtAuthenticator needs WSAPP_JWT_SECRET or WSAPP_JWT_JWKS_URL")
        self._secret = settings.jwt_secret
        if jwks is None and settings.jwt_jwks_url:
            jwks = JwksKeys(settings.jwt_jwks_url)
        self._jwks = jwks
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        if self._jwks is not None and not self._audience:
            # PyJWT refuses a token with an `aud` when no audience is expected, and accepting tokens an
            # identity provider issued for some other application would be worse.
            log.warning("WSAPP_JWT_JWKS_URL without WSAPP_JWT_AUDIENCE: tokens that name an audience are refused")

    def __call__(self, request: Request) -> Identity:
        token = token_from(request.args.get("token"), request.headers.get("Authorization"),
                           request.headers.get("Sec-WebSocket-Protocol"))
        try:
            return self.verify(token)
        except AuthError as exc:
            raise Refuse(401, str(exc), [("WWW-Authenticate", "Bearer")], "token") from None
        except KeysUnavailable as exc:
            # 503, not 401: the token may well be good, and a client told 401 would throw it away
            # or send its user to log in again for an outage that is ours.
            raise Refuse(503, "identity provider unreachable, try again later",
                         [("Retry-After", str(exc.retry_after))], "identity_provider") from None

    def verify(self, token: str | None) -> Identity:
        """The identity in `token`; raises AuthError (invalid) or KeysUnavailable (JWKS down)."""
        if not token:
            raise AuthError("a token is required (?token=, Authorization: Bearer, or a 'bearer.<token>' subprotocol)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        alg = header.get("alg")
        # The algorithm comes from the token, so it only picks which of OUR keys to try: the secret
        # for HS256, a JWKS key (bound to its own public-key algorithm) for the rest.
        if alg == "HS256" and self._secret:
            return _decode(token, self._secret, "HS256", self._audience, self._issuer)
        if isinstance(alg, str) and alg in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise AuthError("invalid token: its header names no key id (kid)")
            key = self._jwks.get(kid)
            if key is None:
                raise AuthError("invalid token: the identity provider has no key with its key id (kid)")
            if key.algorithm_name != alg:
                raise AuthError(f"invalid token: its key is for {key.algorithm_name}, not {alg}")
            return _decode(token, key, alg, self._audience, self._issuer)
        raise AuthError(f"invalid token: algorithm {str(alg)[:16]!r} is not accepted here")


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
