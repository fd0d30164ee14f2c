"""REDIS_URL and the WSAPP_REDIS_* settings: what is accepted, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsapp.backends.redis_connect import _primary_options, _sentinel_hosts, tls_options
from wsapp.config import Settings
from wsapp.exceptions import ConfigError


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL='http://localhost:6379' is invalid"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL='localhost:6379' is invalid"),
        ({"REDIS_URL": "redis://:hunter2@h:70000"}, "bad port"),
        ({"REDIS_URL": "redis://h:6379/zero"}, "database after the host must be a number"),
        ({"REDIS_URL": "unix://relative.sock"}, "unix:///path"),
        ({"REDIS_URL": "redis://a:1,b:2"}, "only WSAPP_REDIS_SENTINEL_MASTER"),
        ({"WSAPP_REDIS_CLUSTER": "1"}, "WSAPP_REDIS_CLUSTER needs REDIS_URL"),
        ({"WSAPP_REDIS_CLUSTER": "maybe", "REDIS_URL": "redis://h"}, "WSAPP_REDIS_CLUSTER='maybe' is invalid"),
        ({"WSAPP_REDIS_SENTINEL_MASTER": "m"}, "WSAPP_REDIS_SENTINEL_MASTER needs REDIS_URL"),
        ({"WSAPP_REDIS_SENTINEL_MASTER": "my master", "REDIS_URL": "redis://h"}, "no spaces"),
        ({"WSAPP_REDIS_SENTINEL_MASTER": "m", "WSAPP_REDIS_CLUSTER": "1", "REDIS_URL": "redis://h"},
         "cannot both be set"),
        ({"WSAPP_REDIS_CLUSTER": "1", "REDIS_URL": "unix:///tmp/r.sock"}, "must be redis:// or rediss://"),
        ({"WSAPP_REDIS_TLS_VERIFY": "yes", "REDIS_URL": "rediss://h"}, "WSAPP_REDIS_TLS_VERIFY='yes' is invalid"),
        ({"WSAPP_REDIS_TLS_CA": "/nonexistent/ca.pem", "REDIS_URL": "rediss://h"}, "WSAPP_REDIS_TLS_CA="),
        ({"WSAPP_REDIS_TLS_CA": "{ca}", "REDIS_URL": "redis://h"}, "WSAPP_REDIS_TLS_CA needs a rediss://"),
        ({"WSAPP_REDIS_TLS_CA": "{ca}", "WSAPP_REDIS_TLS_VERIFY": "none", "REDIS_URL": "rediss://h"},
         "not used with WSAPP_REDIS_TLS_VERIFY=none"),
    ],
)
def test_bad_redis_settings_name_the_variable(env: dict[str, str], error: str, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {key: value.replace("{ca}", str(ca)) for key, value in env.items()}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert error in str(caught.value)
    assert "hunter2" not in str(caught.value)  # the password never reaches a log


def test_good_redis_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    assert Settings.from_env({}).redis_tls_verify == "full"
    for url in ("redis://localhost", "redis://:pw@h:6379/2", "rediss://u:p@h:6380", "unix:///run/redis.sock",
                "redis://[::1]:6379", "redis://"):
        assert Settings.from_env({"REDIS_URL": url}).redis_url == url
    settings = Settings.from_env({"REDIS_URL": "rediss://h", "WSAPP_REDIS_TLS_CA": str(ca)})
    assert tls_options(settings) == {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": str(ca)}
    settings = Settings.from_env({"REDIS_URL": "rediss://h", "WSAPP_REDIS_TLS_VERIFY": "NONE"})
    assert tls_options(settings) == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    settings = Settings.from_env({"REDIS_URL": "redis://h:7000", "WSAPP_REDIS_CLUSTER": "true"})
    assert settings.redis_cluster and settings.redis_sentinel_master is None
    url = "redis://user:p%40ss@s1:26380,s2,[::1]:26381/3"
    settings = Settings.from_env({"REDIS_URL": url, "WSAPP_REDIS_SENTINEL_MASTER": "mymaster"})
    assert settings.redis_sentinel_master == "mymaster"
    assert _sentinel_hosts(url) == [("s1", 26380), ("s2", 26379), ("::1", 26381)]
    assert _primary_options(url) == {"username": "user", "password": "p@ss", "db": 3}
