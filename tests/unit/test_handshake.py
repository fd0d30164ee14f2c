"""The opening handshake as a table: each malformed or refused request maps to one HTTP status."""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import parse_qsl

import pytest

from wsapp.auth import Identity
from wsapp.exceptions import Reject
from wsapp.handshake import accept_key, check_upgrade, offered_subprotocols, query_value, select_subprotocol
from wsapp.policy import Policy

GOOD: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "HTTP_CONNECTION": "keep-alive, Upgrade",
    "HTTP_UPGRADE": "websocket",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
    "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
    "HTTP_HOST": "chat.example:8080",
}


@pytest.mark.parametrize(
    ("change", "version", "status"),
    [
        ({}, "HTTP/1.1", None),
        ({"REQUEST_METHOD": "POST"}, "HTTP/1.1", 405),
        ({"HTTP_CONNECTION": "keep-alive"}, "HTTP/1.1", 400),
        ({}, "HTTP/1.0", 400),
        ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, "HTTP/1.1", 426),
        ({"HTTP_SEC_WEBSOCKET_VERSION": ""}, "HTTP/1.1", 426),
        ({"HTTP_SEC_WEBSOCKET_KEY": "short"}, "HTTP/1.1", 400),
        ({"HTTP_SEC_WEBSOCKET_KEY": "!!!!not base64!!!!!!!!=="}, "HTTP/1.1", 400),
        ({"HTTP_SEC_WEBSOCKET_KEY": ""}, "HTTP/1.1", 400),
        ({"HTTP_ORIGIN": "https://evil.example"}, "HTTP/1.1", 403),
        ({"HTTP_ORIGIN": "http://chat.example:8080"}, "HTTP/1.1", None),  # same origin
        ({"HTTP_ORIGIN": "https://app.example"}, "HTTP/1.1", None),  # listed
    ],
)
def test_check_upgrade_table(change: dict[str, str], version: str, status: int | None) -> None:
    refusal = check_upgrade({**GOOD, **change}, version, ("https://app.example",))
    assert (refusal.status if refusal else None) == status
    if refusal is not None:
        assert refusal.reason


def test_version_refusal_names_the_version_it_speaks() -> None:
    refusal = check_upgrade({**GOOD, "HTTP_SEC_WEBSOCKET_VERSION": "8"}, "HTTP/1.1", ())
    assert refusal is not None and ("Sec-WebSocket-Version", "13") in refusal.headers


def test_accept_key_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_subprotocols_follow_the_route_preference_and_never_pick_a_token() -> None:
    assert offered_subprotocols("v1, bearer.abc.def, v2") == ["v1", "v2"]
    assert select_subprotocol("v1, v2", ("v2", "v1")) == "v2"
    assert select_subprotocol("bearer.v2", ("v2",)) is None
    assert select_subprotocol(None, ("v1",)) is None
    assert select_subprotocol("v3", ("v1",)) is None


def test_policy_token_rooms_then_the_apps_hook() -> None:
    policy = Policy()
    policy.check(None, "join", "anything")  # no hooks: open
    token = Identity("alice", frozenset({"lobby"}))
    with pytest.raises(Reject) as exc:
        policy.check(token, "join", "other")
    assert exc.value.code == "forbidden"
    policy.authorize = lambda identity, action, room: action == "join"
    policy.check(token, "join", "lobby")
    with pytest.raises(Reject):
        policy.check(token, "publish", "lobby", "m1")


def test_policy_filter_transforms_and_tags_rejections_with_the_message_id() -> None:
    policy = Policy()
    assert policy.filter("a", "r", {"x": 1}) == {"x": 1}

    def on_publish(identity: object, room: str, data: Any) -> Any:
        if data == "bad":
            raise Reject("invalid", "no")
        return {"wrapped": data}

    policy.on_publish = on_publish
    assert policy.filter("a", "r", 1) == {"wrapped": 1}
    with pytest.raises(Reject) as exc:
        policy.filter("a", "r", "bad", "m7")
    assert (exc.value.code, exc.value.msg_id) == ("invalid", "m7")


def _first(query: str, key: str) -> str | None:
    return next((value for name, value in parse_qsl(query, keep_blank_values=True) if name == key), None)


@pytest.mark.parametrize("query", [
    "", "name=ana", "name=", "name", "&name=ana", "x=1&name=b12&name=c", "na%6De=%61na", "name=a+b%20c",
    "name=caf%C3%A9", "name=%ff%fe", "name=%zz%", "name=a=b", "x=1;name=ana", "name+=1&name=2", "+name=1",
    "NAME=upper&name=lower", "&&", "==", "name=%2B", "name=ä",
])
def test_query_value_is_what_parse_qsl_gives(query: str) -> None:
    for key in ("name", "x", "name ", "absent"):
        assert query_value({"QUERY_STRING": query}, key) == _first(query, key), (query, key)
    assert query_value({}, "name") is None


def test_query_value_on_random_query_strings() -> None:
    rng = random.Random(13)
    alphabet = "ab=&+%2Bc3é;x "
    for _ in range(3000):
        query = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        for key in ("a", "b", "a b", "", "é"):
            assert query_value({"QUERY_STRING": query}, key) == _first(query, key), (query, key)
