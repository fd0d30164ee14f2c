"""The bundled server with RS256 tokens from an identity provider's JWKS (served over HTTP on
127.0.0.1 by the test process): the token in Sec-WebSocket-Protocol, 401 before the 101, and
WSAPP_AUTH_ALL_ROUTES putting `/` and `/echo` behind it too."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from tests.clients import connect, recv_type, send_json, wait_for
from tests.harness import ServerProcess
from tests.jwks_server import JwksServer, SigningKey
from tests.rawws import RawClient

AUDIENCE = "wsapp-integration"
MakeServer = Callable[..., ServerProcess]
MakeRaw = Callable[..., RawClient]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("idp-rsa", "RS256")


@pytest.fixture
def idp(key: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer([key.jwk])
    yield server
    server.stop()


def token_protocols(token: str) -> dict[str, str]:
    return {"Sec-WebSocket-Protocol": f"wsapp, bearer.{token}"}


def test_rs256_token_in_the_subprotocol_header(make_server: MakeServer, raw: MakeRaw, idp: JwksServer,
                                               key: SigningKey) -> None:
    srv = make_server(WSAPP_JWT_JWKS_URL=idp.url, WSAPP_JWT_AUDIENCE=AUDIENCE)
    ws = connect(srv.ws("/ws"), subprotocols=["wsapp", f"bearer.{key.sign('ida', aud=AUDIENCE)}"])
    try:
        assert ws.getsubprotocol() == "wsapp"  # never the bearer entry
        assert recv_type(ws, "welcome")["name"] == "ida"
        send_json(ws, type="join", room="jwks-room")
        assert recv_type(ws, "joined")["members"] == ["ida"]
    finally:
        ws.close()

    # A token for another audience, one signed by a key the provider never published (under the
    # provider's kid), one without the bearer entry at all: 401, and no 101 was sent.
    stranger = SigningKey(key.kid, "RS256")
    for headers, reason in (
        (token_protocols(key.sign("ida", aud="someone-else")), "audience"),
        (token_protocols(stranger.sign("ida", aud=AUDIENCE)), "signature verification failed"),
        ({"Sec-WebSocket-Protocol": "wsapp"}, "token is required"),
    ):
        refused = raw(srv.ws("/ws"), headers)
        assert refused.status == 401
        assert refused.response_headers["www-authenticate"] == "Bearer"
        assert reason in refused.response_body.decode().lower()
    assert idp.fetches == 1  # the keys were cached across connections
    assert "Traceback" not in srv.log_text()

    # `/` and `/echo` stay open unless WSAPP_AUTH_ALL_ROUTES says otherwise.
    assert raw(srv.ws("/echo")).status == 101


def test_auth_all_routes_puts_relay_and_echo_behind_the_token(make_server: MakeServer, raw: MakeRaw,
                                                              idp: JwksServer, key: SigningKey) -> None:
    srv = make_server(WSAPP_JWT_JWKS_URL=idp.url, WSAPP_JWT_AUDIENCE=AUDIENCE, WSAPP_AUTH_ALL_ROUTES="1")
    for path in ("/", "/echo", "/ws"):
        assert raw(srv.ws(path)).status == 401, path
        assert raw(srv.ws(path), token_protocols(key.sign("x", aud="nope"))).status == 401, path
    token = key.sign("rex", aud=AUDIENCE)
    echo = connect(srv.ws("/echo"), subprotocols=["wsapp", f"bearer.{token}"])
    try:
        echo.send("ping?")
        assert echo.recv() == "ping?"
    finally:
        echo.close()
    relay = connect(srv.ws("/"), header=[f"Authorization: Bearer {token}"])
    relay.close()
    # The page itself is plain HTTP and still loads: it is what hands a browser its token.
    with urllib.request.urlopen(srv.http("/"), timeout=5) as page:
        assert page.status == 200


def test_unreachable_provider_is_503_promptly_and_logged(make_server: MakeServer, raw: MakeRaw,
                                                         key: SigningKey) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/jwks.json"
    srv = make_server(WSAPP_JWT_JWKS_URL=url, WSAPP_JWT_AUDIENCE=AUDIENCE)
    started = time.monotonic()
    refused = raw(srv.ws("/ws"), token_protocols(key.sign("ida", aud=AUDIENCE)))
    assert refused.status == 503
    assert time.monotonic() - started < 5
    assert int(refused.response_headers["retry-after"]) > 0
    assert b"identity provider unreachable" in refused.response_body
    # stderr reaches the test through a reader thread: the line may trail the HTTP answer a little.
    wait_for(lambda: f"JWKS fetch from {url} failed" in srv.log_text(), what="the log line about the provider")
