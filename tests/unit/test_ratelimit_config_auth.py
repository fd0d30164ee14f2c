from __future__ import annotations

import time

import jwt
import pytest

from wsapp.auth import AuthError, JwtAuthenticator, client_ip, origin_allowed, token_from
from wsapp.config import Settings
from wsapp.exceptions import ConfigError
from wsapp.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    assert bucket.strikes == 1
    clock.now += 0.15  # one token back (and a half)
    assert bucket.allow() and not bucket.allow()
    clock.now += 100  # refills only up to the burst
    assert sum(bucket.allow() for _ in range(10)) == 3


def test_settings_defaults_and_overrides() -> None:
    s = Settings.from_env({})
    assert (s.port, s.host, s.max_message_bytes, s.max_fragments) == (8080, "0.0.0.0", 1048576, 16384)
    assert s.jwt_secret is None and s.allowed_origins == ()
    s = Settings.from_env({"PORT": "9000", "WSAPP_ALLOWED_ORIGINS": "https://a.example, http://b.example:8000/",
                           "WSAPP_JWT_SECRET": "hunter2-secret-of-at-least-32-bytes", "WSAPP_RATE_LIMIT": "0"})
    assert s.port == 9000 and s.rate_limit == 0 and s.jwt_secret == "hunter2-secret-of-at-least-32-bytes"
    assert s.allowed_origins == ("https://a.example", "http://b.example:8000")
    assert "hunter2" not in repr(s)  # secrets stay out of logs
    assert s.web_concurrency == 1
    s = Settings.from_env({"WEB_CONCURRENCY": "3", "REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert s.web_concurrency == 3 and s.workers == 3
    assert Settings.from_env({"WEB_CONCURRENCY": "3"}).workers == 1  # no broker: one process


@pytest.mark.parametrize("env", [{"PORT": "x"}, {"WSAPP_HISTORY": "-1"}, {"WSAPP_PING_INTERVAL": "30",
                                                                        "WSAPP_PING_TIMEOUT": "10"},
                                 {"WSAPP_JWT_SECRET": "short"}, {"WEB_CONCURRENCY": "0"}])
def test_settings_errors_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert any(name in str(info.value) for name in env)


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "h:8080", (), True),  # non-browser client
        ("http://h:8080", "h:8080", (), True),  # same origin
        ("http://H:8080/", "h:8080", (), True),
        ("https://h", "h:443", (), True),
        ("http://evil.example", "h:8080", (), False),
        ("http://h:9999", "h:8080", (), False),
        ("null", "h:8080", (), False),
        ("https://app.example", "h:8080", ("https://app.example",), True),
        ("https://other.example", "h:8080", ("https://app.example",), False),
        ("http://anything", "h:8080", ("*",), True),
    ],
)
def test_origin_policy(origin: str | None, host: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


def test_tokens() -> None:
    secret = "s3cret-" + "x" * 32
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, "rooms": ["a"]}, secret, algorithm="HS256")
    verify_token = JwtAuthenticator(Settings(jwt_secret=secret)).verify
    identity = verify_token(good)
    assert identity.sub == "alice" and identity.rooms == frozenset({"a"})
    assert identity.expires > time.time()
    assert token_from(None, f"Bearer {good}", None) == good
    expired = jwt.encode({"sub": "a", "exp": int(time.time()) - 10}, secret, algorithm="HS256")
    no_exp = jwt.encode({"sub": "a"}, secret, algorithm="HS256")
    wrong_key = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, "other-" + "y" * 32, algorithm="HS256")
    for token in (None, "garbage", expired, no_exp, wrong_key):
        with pytest.raises(AuthError):
            verify_token(token)


def test_client_ip_behind_trusted_proxies() -> None:
    assert client_ip("10.0.0.1", "1.2.3.4", 0) == "10.0.0.1"
    assert client_ip("10.0.0.1", None, 1) == "10.0.0.1"
    assert client_ip("10.0.0.1", "1.2.3.4", 1) == "1.2.3.4"
    assert client_ip("10.0.0.1", "forged, 1.2.3.4", 1) == "1.2.3.4"
    assert client_ip("10.0.0.1", "1.2.3.4, 10.9.9.9", 2) == "1.2.3.4"
    assert client_ip("10.0.0.1", "1.2.3.4", 2) == "10.0.0.1"  # fewer hops than promised: do not trust it


def test_gc_threshold_is_set_for_a_serving_process_and_0_leaves_pythons() -> None:
    import gc

    from wsapp.cli import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(Settings.from_env({"WSAPP_GC_THRESHOLD": "0"}))
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        tune_gc(Settings.from_env({}))
        assert gc.get_threshold() == (50000, before[1], before[2]) and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    with pytest.raises(ConfigError, match="WSAPP_GC_THRESHOLD"):
        Settings.from_env({"WSAPP_GC_THRESHOLD": "-1"})
