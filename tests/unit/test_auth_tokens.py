"""The built-in JWT authenticator: where tokens come from, HS256, RS256/ES256 from a real JWKS over
HTTP on 127.0.0.1, claim checks, algorithm confusion, key rotation and an unreachable provider."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import flask
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.jwks_server import JwksServer, SigningKey
from wsapp.auth import Identity, JwtAuthenticator, token_from
from wsapp.config import Settings
from wsapp.exceptions import ConfigError, Refuse
from wsapp.jwks import JwksKeys

SECRET = "a-test-secret-of-at-least-32-bytes!!"
AUDIENCE = "wsapp-tests"
ISSUER = "https://idp.example"
BEARER = [("WWW-Authenticate", "Bearer")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("rsa-1", "RS256")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey("ec-1", "ES256")


@pytest.fixture
def idp(rsa_key: SigningKey, ec_key: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer([rsa_key.jwk, ec_key.jwk])
    yield server
    server.stop()


def authenticate(auth: JwtAuthenticator, path: str = "/ws", headers: dict[str, str] | None = None) -> Identity:
    """Run the hook in a real Flask request context, as the handshake does."""
    with flask.Flask(__name__).test_request_context(path, headers=headers or {}):
        return auth(flask.request)


def refusal(auth: JwtAuthenticator, token: str | None, status: int = 401) -> Refuse:
    """The Refuse the hook raises for `token` in Authorization; asserts its status."""
    with pytest.raises(Refuse) as caught:
        authenticate(auth, headers={"Authorization": f"Bearer {token}"} if token else None)
    assert caught.value.status == status, caught.value.reason
    if status == 401:
        assert caught.value.headers == BEARER
    return caught.value


def jwks_auth(url: str, clock: Clock | None = None, **settings: Any) -> JwtAuthenticator:
    keys = JwksKeys(url, refetch_interval=10.0, lifespan=300.0, timeout=1.0, clock=clock or Clock())
    return JwtAuthenticator(Settings(jwt_jwks_url=url, **settings), jwks=keys)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(key: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An HS256 token signed with any bytes at all (PyJWT itself refuses a PEM as an HMAC secret)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@pytest.mark.parametrize(
    ("query", "authorization", "protocols", "expected"),
    [
        ("q", "Bearer a", "wsapp, bearer.p", "q"),
        (None, "Bearer a", "wsapp, bearer.p", "a"),
        (None, "bearer   a  ", None, "a"),
        (None, "Basic dXNlcjpwdw==", "bearer.p", "p"),
        (None, None, "wsapp, bearer.eyJ.eyJ.sig", "eyJ.eyJ.sig"),
        (None, None, " bearer.first ,bearer.second", "first"),
        (None, None, "wsapp,bearer.x", "x"),
        (None, None, "wsapp", None),
        (None, None, "wsapp, bearer.", None),
        (None, None, "Bearer.x", None),  # subprotocol names are case-sensitive (RFC 6455 4.1)
        (None, None, "xbearer.x", None),
        (None, "Bearer ", "", None),
        ("", None, None, None),
        (None, None, None, None),
    ],
)
def test_token_from(query: str | None, authorization: str | None, protocols: str | None, expected: str | None) -> None:
    assert token_from(query, authorization, protocols) == expected


def test_hs256_token_from_query_header_or_subprotocol() -> None:
    auth = JwtAuthenticator(Settings(jwt_secret=SECRET))
    exp = int(time.time()) + 60
    token = jwt.encode({"sub": "alice", "exp": exp, "rooms": ["a", "b"]}, SECRET, algorithm="HS256")
    expected = Identity("alice", frozenset({"a", "b"}), float(exp))
    assert authenticate(auth, f"/ws?token={token}") == expected
    assert authenticate(auth, headers={"Authorization": f"Bearer {token}"}) == expected
    assert authenticate(auth, headers={"Sec-WebSocket-Protocol": f"wsapp, bearer.{token}"}) == expected

    missing = refusal(auth, None)
    assert "token is required" in missing.reason and "bearer." in missing.reason
    wrong_key = jwt.encode({"sub": "a", "exp": exp}, "another-secret-of-32-bytes-or-more", algorithm="HS256")
    assert "Signature verification failed" in refusal(auth, wrong_key).reason
    assert "sub" in refusal(auth, jwt.encode({"exp": exp}, SECRET, algorithm="HS256")).reason
    assert "exp" in refusal(auth, jwt.encode({"sub": "a"}, SECRET, algorithm="HS256")).reason


def test_rs256_and_es256_from_the_jwks(idp: JwksServer, rsa_key: SigningKey, ec_key: SigningKey) -> None:
    auth = jwks_auth(idp.url)
    for key, sub in ((rsa_key, "rita"), (ec_key, "eve"), (rsa_key, "rob")):
        token = key.sign(sub, rooms=["lobby"])
        identity = authenticate(auth, headers={"Sec-WebSocket-Protocol": f"wsapp, bearer.{token}"})
        assert (identity.sub, identity.rooms) == (sub, frozenset({"lobby"}))
        assert identity.expires is not None and identity.expires > time.time()
    assert idp.fetches == 1  # one fetch, then the cached keys


def test_hs256_and_jwks_side_by_side(idp: JwksServer, rsa_key: SigningKey) -> None:
    auth = jwks_auth(idp.url, jwt_secret=SECRET)
    hs = jwt.encode({"sub": "local", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert authenticate(auth, headers={"Authorization": f"Bearer {hs}"}).sub == "local"
    assert authenticate(auth, headers={"Authorization": f"Bearer {rsa_key.sign('remote')}"}).sub == "remote"
    assert idp.fetches == 1  # an HS256 token never reaches the provider


def test_audience_and_issuer_are_checked_when_set(idp: JwksServer, rsa_key: SigningKey) -> None:
    auth = jwks_auth(idp.url, jwt_audience=AUDIENCE, jwt_issuer=ISSUER)
    assert authenticate(auth, headers={"Authorization": f"Bearer {rsa_key.sign(aud=AUDIENCE, iss=ISSUER)}"})
    assert authenticate(auth, headers={"Authorization": f"Bearer {rsa_key.sign(aud=['x', AUDIENCE], iss=ISSUER)}"})
    assert "audience" in refusal(auth, rsa_key.sign(aud="someone-else", iss=ISSUER)).reason.lower()
    assert "aud" in refusal(auth, rsa_key.sign(iss=ISSUER)).reason
    assert "issuer" in refusal(auth, rsa_key.sign(aud=AUDIENCE, iss="https://evil.example")).reason.lower()
    assert "iss" in refusal(auth, rsa_key.sign(aud=AUDIENCE)).reason

    # Without WSAPP_JWT_AUDIENCE a token meant for some audience is refused, not taken for ours.
    assert "audience" in refusal(jwks_auth(idp.url), rsa_key.sign(aud=AUDIENCE)).reason.lower()


def test_expired_and_not_yet_valid_tokens(idp: JwksServer, rsa_key: SigningKey) -> None:
    auth = jwks_auth(idp.url, jwt_secret=SECRET)
    assert "expired" in refusal(auth, rsa_key.sign(ttl=-30)).reason
    assert "expired" in refusal(auth, jwt.encode({"sub": "a", "exp": int(time.time()) - 30}, SECRET)).reason
    assert "not yet valid" in refusal(auth, rsa_key.sign(nbf=int(time.time()) + 120)).reason
    # A second or two of clock difference with the provider is tolerated.
    assert authenticate(auth, headers={"Authorization": f"Bearer {rsa_key.sign(iat=int(time.time()) + 2)}"})


def test_algorithm_confusion_is_refused(idp: JwksServer, rsa_key: SigningKey, ec_key: SigningKey) -> None:
    pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"sub": "mallory", "exp": int(time.time()) + 60}
    # HS256 "signed" with the provider's public key, which anyone can download.
    forged = hand_signed_hs256(pem, {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, claims)
    assert "'HS256' is not accepted" in refusal(jwks_auth(idp.url), forged).reason
    assert "Signature verification failed" in refusal(jwks_auth(idp.url, jwt_secret=SECRET), forged).reason

    none_header = b64url(json.dumps({"alg": "none", "kid": rsa_key.kid}).encode())
    unsigned = f"{none_header}.{b64url(json.dumps(claims).encode())}."
    assert "'none' is not accepted" in refusal(jwks_auth(idp.url, jwt_secret=SECRET), unsigned).reason

    # An EC key's kid under an RS256 header, and an RS256 signature passed off as PS256.
    assert "for ES256, not RS256" in refusal(jwks_auth(idp.url), rsa_key.sign(headers={"kid": ec_key.kid})).reason
    relabelled = jwt.encode(claims, rsa_key.private, algorithm="PS256", headers={"kid": rsa_key.kid})
    assert "for RS256, not PS256" in refusal(jwks_auth(idp.url), relabelled).reason

    # A symmetric key published in the JWKS is never used: it is no secret.
    idp.keys = [*idp.keys, {"kty": "oct", "kid": "sym", "k": b64url(b"k" * 32)}]
    symmetric = hand_signed_hs256(b"k" * 32, {"alg": "HS256", "kid": "sym"}, claims)
    assert "'HS256' is not accepted" in refusal(jwks_auth(idp.url), symmetric).reason
    with_rs_header = hand_signed_hs256(b"k" * 32, {"alg": "RS256", "kid": "sym"}, claims)
    assert "no key with its key id" in refusal(jwks_auth(idp.url), with_rs_header).reason


@pytest.mark.parametrize(
    "token",
    ["garbage", "a.b.c", "a.b", "....", "é.é.é", "eyJhbGciOiJIUzI1NiJ9.e30.", b64url(b"[1]") + ".e30.x",
     b64url(b'{"alg":["RS256"]}') + ".e30.x", b64url(b'{"alg":"RS256","kid":7}') + ".e30.x",
     b64url(b'{"alg":"RS256"}') + ".e30.x"],
)
def test_malformed_tokens_get_401_not_a_traceback(idp: JwksServer, token: str) -> None:
    assert refusal(jwks_auth(idp.url, jwt_secret=SECRET), token).reason.startswith("invalid token")


def test_unknown_kid_refetches_at_most_once_per_interval(idp: JwksServer, rsa_key: SigningKey) -> None:
    clock = Clock()
    auth = jwks_auth(idp.url, clock)
    assert authenticate(auth, headers={"Authorization": f"Bearer {rsa_key.sign()}"})
    assert idp.fetches == 1
    # A rotation: the provider starts signing with a key this process has not seen.
    rotated = SigningKey("rsa-2", "RS256")
    idp.keys = [*idp.keys, rotated.jwk]
    clock.now += 11
    assert authenticate(auth, headers={"Authorization": f"Bearer {rotated.sign('new')}"}).sub == "new"
    assert idp.fetches == 2

    # A flood of made-up kids: one refetch, then refused from the cache until the interval is over.
    for n in range(50):
        reason = refusal(auth, rsa_key.sign(headers={"kid": f"bogus-{n}"})).reason
        assert "no key with its key id" in reason
        clock.now += 0.1
    assert idp.fetches == 2  # the first bogus kid came within 10 s of the last fetch
    clock.now += 10
    refusal(auth, rsa_key.sign(headers={"kid": "bogus-again"}))
    refusal(auth, rsa_key.sign(headers={"kid": "bogus-again"}))
    assert idp.fetches == 3
    assert "no key id" in refusal(auth, rsa_key.sign(headers={"kid": ""})).reason


def test_keys_expire_and_a_removed_key_stops_working(idp: JwksServer, rsa_key: SigningKey, ec_key: SigningKey) -> None:
    clock = Clock()
    auth = jwks_auth(idp.url, clock)
    assert authenticate(auth, headers={"Authorization": f"Bearer {ec_key.sign()}"})
    idp.keys = [rsa_key.jwk]
    clock.now += 299
    assert authenticate(auth, headers={"Authorization": f"Bearer {ec_key.sign()}"})  # still cached
    clock.now += 2
    assert "no key with its key id" in refusal(auth, ec_key.sign()).reason
    assert idp.fetches == 2


def test_provider_unreachable_is_503_fast_and_logged(caplog: pytest.LogCaptureFixture, rsa_key: SigningKey) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/jwks.json"
    clock = Clock()
    auth = jwks_auth(url, clock, jwt_secret=SECRET)
    with caplog.at_level(logging.WARNING, logger="wsapp.jwks"):
        down = refusal(auth, rsa_key.sign(), status=503)
    assert down.reason == "identity provider unreachable, try again later"
    assert down.headers == [("Retry-After", "10")]
    assert [r.getMessage() for r in caplog.records if "JWKS fetch from" in r.getMessage() and url in r.getMessage()]
    caplog.clear()
    clock.now += 4
    assert refusal(auth, rsa_key.sign(), status=503).headers == [("Retry-After", "6")]
    assert caplog.records == []  # no second attempt inside the interval
    # HS256 tokens do not depend on the provider.
    hs = jwt.encode({"sub": "local", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert authenticate(auth, headers={"Authorization": f"Bearer {hs}"}).sub == "local"


def test_provider_that_never_answers_is_bounded_by_the_timeout(rsa_key: SigningKey) -> None:
    with socket.socket() as silent:  # accepts connections (in the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/jwks.json"
        auth = JwtAuthenticator(Settings(jwt_jwks_url=url), jwks=JwksKeys(url, timeout=0.3))
        started = time.monotonic()
        refusal(auth, rsa_key.sign(), status=503)
        assert time.monotonic() - started < 2.0


def test_cached_keys_outlive_an_outage(idp: JwksServer, rsa_key: SigningKey) -> None:
    clock = Clock()
    auth = jwks_auth(idp.url, clock)
    assert authenticate(auth, headers={"Authorization": f"Bearer {rsa_key.sign()}"})
    idp.stop()
    clock.now += 600  # past the lifespan: a refetch is due, and fails
    assert authenticate(auth, headers={"Authorization": f"Bearer {rsa_key.sign('still')}"}).sub == "still"
    # A kid the stale set lacks may be a new key the provider cannot tell us about: 503, not 401.
    refusal(auth, rsa_key.sign(headers={"kid": "rsa-9"}), status=503)


def test_needs_a_secret_or_a_jwks_url() -> None:
    with pytest.raises(ConfigError, match="WSAPP_JWT_SECRET or WSAPP_JWT_JWKS_URL"):
        JwtAuthenticator(Settings())
