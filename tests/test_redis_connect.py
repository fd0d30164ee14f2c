"""redis_connect against real Redis set-ups: start-up checks, Cluster, Sentinel and TLS."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest
import redis

from tests.clients import connect, get_json, recv_json, recv_type, send_json, wait_for
from tests.harness import ROOT, ServerProcess
from tests.redis_topologies import PasswordRedis, RedisClusterProcs, SentinelProcs, TlsRedis, free_port
from wsapp.backends.redis_connect import check_broker, detect_cluster, make_client
from wsapp.config import Settings
from wsapp.exceptions import ConfigError


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


def run_server(env: dict[str, str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`python server.py` expected to stop by itself (a configuration error)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("WSAPP_") and k != "REDIS_URL"}
    full.update({"PORT": "0", "HOST": "127.0.0.1", **env})
    return subprocess.run([sys.executable, str(ROOT / "server.py")], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ---- start-up checks ---------------------------------------------------------------------------------


def test_wrong_or_missing_password_is_a_configuration_error(password_redis: PasswordRedis) -> None:
    check_broker(settings(REDIS_URL=password_redis.url(password_redis.password)))  # the right one passes
    for url, what in ((password_redis.url("wrong"), "authentication failed"),
                      (password_redis.url(), "authentication failed")):
        with pytest.raises(ConfigError) as caught:
            check_broker(settings(REDIS_URL=url))
        message = str(caught.value)
        assert message.startswith("REDIS_URL (") and what in message, message
        assert "wrong" not in message  # the password is not shown


def test_server_with_a_wrong_password_exits_2_naming_redis_url(password_redis: PasswordRedis) -> None:
    result = run_server({"REDIS_URL": password_redis.url("not-the-password")})
    assert result.returncode == 2, result.stderr
    assert "wsapp: configuration error: REDIS_URL (redis://:***@127.0.0.1:" in result.stderr
    assert "authentication failed" in result.stderr
    assert "Traceback" not in result.stderr and "not-the-password" not in result.stderr


def test_acl_user_without_permission_is_a_configuration_error(password_redis: PasswordRedis) -> None:
    admin = password_redis.client(password=password_redis.password)
    user = f"nopriv{uuid.uuid4().hex[:6]}"
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], commands=["+hello"])
    try:
        with pytest.raises(ConfigError, match="not allowed to run wsapp's commands"):
            check_broker(settings(REDIS_URL=f"redis://{user}:pw@127.0.0.1:{password_redis.port}/0"))
    finally:
        admin.acl_deluser(user)


def test_unreachable_redis_is_not_fatal(make_server: object) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    check_broker(settings(REDIS_URL=url))  # returns: an outage is not a configuration error
    srv = make_server(REDIS_URL=url)  # type: ignore[operator]
    _, body = wait_for(lambda: (h := get_json(srv.http("/healthz")))[0] == 503 and h, what="healthz 503")
    assert body["status"] == "degraded"
    assert "unreachable at start-up" in srv.log_text()


def test_cluster_flag_on_a_plain_server_is_refused_and_a_cluster_node_is_detected(
    redis_server: object, redis_cluster: RedisClusterProcs
) -> None:
    plain = settings(REDIS_URL=redis_server.url)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="unset WSAPP_REDIS_CLUSTER"):
        check_broker(settings(REDIS_URL=redis_server.url, WSAPP_REDIS_CLUSTER="1"))  # type: ignore[attr-defined]
    assert detect_cluster(plain) is plain
    # A Cluster node without the flag: recognised from INFO's cluster_enabled (servers and the Emitter).
    assert detect_cluster(settings(REDIS_URL=redis_cluster.url)).redis_cluster
    check_broker(settings(REDIS_URL=redis_cluster.url))
    check_broker(settings(REDIS_URL=redis_cluster.url, WSAPP_REDIS_CLUSTER="1"))
    unreachable = settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert detect_cluster(unreachable) is unreachable  # cannot ask: the settings decide


def test_sentinel_names_checked(redis_sentinel: SentinelProcs, redis_server: object) -> None:
    check_broker(settings(REDIS_URL=redis_sentinel.url, WSAPP_REDIS_SENTINEL_MASTER=redis_sentinel.master_name))
    with pytest.raises(ConfigError, match="no Sentinel knows a primary named 'nosuch'"):
        check_broker(settings(REDIS_URL=redis_sentinel.url, WSAPP_REDIS_SENTINEL_MASTER="nosuch"))
    with pytest.raises(ConfigError, match="is not a Redis Sentinel"):
        check_broker(settings(REDIS_URL=redis_server.url, WSAPP_REDIS_SENTINEL_MASTER="m"))  # type: ignore[attr-defined]


# ---- Redis Cluster -----------------------------------------------------------------------------------


def test_cluster_client_spans_slots(redis_cluster: RedisClusterProcs) -> None:
    client = make_client(settings(REDIS_URL=redis_cluster.url, WSAPP_REDIS_CLUSTER="1"))
    tag = uuid.uuid4().hex[:8]
    keys = [f"wsapp:test:{tag}:{i}" for i in range(30)]
    assert len({redis_cluster.port_of_key(key) for key in keys}) == 3  # every shard holds some of them
    for key in keys:
        client.set(key, key)
    assert [client.get(key) for key in keys] == [key.encode() for key in keys]

    client.close()


def test_cluster_shard_goes_away_and_comes_back(make_redis_cluster: object) -> None:
    cluster: RedisClusterProcs = make_redis_cluster()  # type: ignore[operator]
    client = make_client(settings(REDIS_URL=cluster.url, WSAPP_REDIS_CLUSTER="1"))
    key = next(k for k in (f"k{i}" for i in range(100)) if cluster.port_of_key(k) == cluster.nodes[1].port)
    client.set(key, "before")
    cluster.stop_node(1, kill=True)
    with pytest.raises((redis.ConnectionError, redis.exceptions.ClusterDownError, redis.TimeoutError)):
        client.get(key)
    cluster.start_node(1)
    # The same client finds the shard again (a command may fail while it refreshes its slot map).
    assert wait_for(lambda: _try(lambda: client.set(key, "after")), timeout=10, what="write after restart")
    assert cluster.nodes[1].client().get(key) == b"after"
    client.close()


# ---- Sentinel ----------------------------------------------------------------------------------------


def test_sentinel_client_follows_a_failover(redis_sentinel: SentinelProcs) -> None:
    client = make_client(settings(REDIS_URL=redis_sentinel.url, WSAPP_REDIS_SENTINEL_MASTER=redis_sentinel.master_name))
    assert client.set("wsapp:test:sentinel", "before")
    old_primary = redis_sentinel.primary_port()
    new_primary = redis_sentinel.kill_primary()
    assert new_primary != old_primary
    # The same client: the first command fails (its connection died with the old primary); the next
    # one asks the Sentinel and reaches the new primary, which has the replicated data.
    wait_for(lambda: _try(lambda: client.set("wsapp:test:sentinel", "after")), timeout=10, what="write after failover")
    new = redis.Redis(port=new_primary, socket_timeout=2)
    assert new.get("wsapp:test:sentinel") == b"after"
    assert client.connection_pool.get_master_address()[1] == new_primary
    client.close()


# ---- TLS ---------------------------------------------------------------------------------------------


def test_tls_verification_modes(tls_redis: TlsRedis) -> None:
    with pytest.raises(ConfigError) as caught:
        check_broker(settings(REDIS_URL=tls_redis.url))  # verify=full, and nothing trusts the test CA
    assert "TLS certificate verification failed" in str(caught.value)
    assert "WSAPP_REDIS_TLS_VERIFY=none" in str(caught.value)
    for env in ({"WSAPP_REDIS_TLS_VERIFY": "none"}, {"WSAPP_REDIS_TLS_CA": str(tls_redis.ca_file)}):
        tls = settings(REDIS_URL=tls_redis.url, **env)
        check_broker(tls)
        client = make_client(tls)
        assert client.set("wsapp:test:tls", "x") and client.get("wsapp:test:tls") == b"x"
        client.close()


def _try(action: object) -> bool:
    try:
        return bool(action())  # type: ignore[operator]
    except redis.RedisError:
        return False


# ---- the rooms backend on these set-ups ------------------------------------------------------------


def test_rooms_across_processes_through_sentinel_and_a_failover(redis_sentinel: SentinelProcs,
                                                                 make_server: Callable[..., ServerProcess]) -> None:
    env = {"REDIS_URL": redis_sentinel.url, "WSAPP_REDIS_SENTINEL_MASTER": redis_sentinel.master_name,
           "WSAPP_RATE_LIMIT": "0"}
    a, b = make_server(**env), make_server(**env)
    room = "s-" + uuid.uuid4().hex[:8]
    sender, member = connect(a.ws("/ws?name=ann")), connect(b.ws("/ws?name=bob"))
    try:
        for ws in (sender, member):
            recv_type(ws, "welcome")
            send_json(ws, type="join", room=room)
            epoch = recv_type(ws, "joined")["epoch"]
        send_json(sender, type="publish", room=room, data={"n": 1}, id="p1")
        first = recv_type(sender, "ack")["seq"]
        assert recv_type(member, "message")["seq"] == first
        redis_sentinel.kill_primary()
        # Both processes lose the broker, reconnect through the Sentinel to the promoted replica,
        # and rooms work across them again, in a new epoch: the replica may lack the primary's last
        # messages, and their seqs must not be given again in the old one.
        wait_for(lambda: "broker back" in a.log_text() and "broker back" in b.log_text(), timeout=20,
                 what="both processes back on the new primary")

        def published() -> int | None:
            send_json(sender, type="publish", room=room, data={"n": 2}, id="p2")
            answer = recv_json(sender)
            while answer["type"] not in ("ack", "error"):
                answer = recv_json(sender)
            return answer["seq"] if answer["type"] == "ack" else None  # `unavailable` until it is back

        second = wait_for(published, timeout=10, what="a publish acked after the failover")
        got = recv_json(member)
        notices = []
        while got["type"] != "message" or got["data"] != {"n": 2}:
            if got["type"] == "error":
                notices.append((got["code"], got["epoch"] != epoch))
            got = recv_json(member)
        assert got["seq"] == second and notices == [("history_gone", True)]
    finally:
        sender.close()
        member.close()
