"""What talks to Redis, built from Settings: one server, a Redis Cluster or a Sentinel-watched primary,
over TCP, TLS or a Unix socket; and `check_broker`, which tells a broker that can never work (a
configuration error) from one that is merely away (serve degraded, reconnect later).

No gevent here: the Emitter and other plain Python processes may use it too. Clients never retry on
their own (a lost reply after a script ran must not run it twice); the caller reconnects.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from wsapp.config import Settings, _without_password
from wsapp.exceptions import ConfigError

log = logging.getLogger(__name__)

Client = redis.Redis | RedisCluster
DEFAULT_SENTINEL_PORT = 26379


def client_options(settings: Settings, timeout: float) -> dict[str, Any]:
    """Connection keyword arguments every wsapp Redis client uses (timeouts, no retries, RESP2, TLS)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # Fail fast and let the caller reconnect: redis-py's own retries would hold a reader.
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
    }
    if is_tls(settings):
        options.update(tls_options(settings))
    return options


def is_tls(settings: Settings) -> bool:
    return (settings.redis_url or "").lower().startswith("rediss://")


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's ssl_* arguments for WSAPP_REDIS_TLS_VERIFY and WSAPP_REDIS_TLS_CA."""
    if settings.redis_tls_verify == "none":
        # Heroku Redis presents a self-signed certificate: the link is encrypted, the server unchecked.
        return {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": settings.redis_tls_ca}


def make_client(settings: Settings, timeout: float = 1.0, name: str | None = None) -> Client:
    """A client for REDIS_URL: `redis.Redis` for one server or the Sentinel-watched primary (it follows
    failovers), `RedisCluster` with WSAPP_REDIS_CLUSTER=1.

    A RedisCluster asks a node for the slot map while it is built, so for a Cluster this raises
    redis.RedisError (or RedisClusterException) when no node answers; the others connect lazily.
    """
    url = settings.redis_url
    if not url:
        raise ConfigError("REDIS_URL is not set")
    options = client_options(settings, timeout)
    if name is not None:
        options["client_name"] = name
    if settings.redis_cluster:
        return RedisCluster.from_url(url, **options)
    if settings.redis_sentinel_master is not None:
        return sentinel_for(settings, options).master_for(settings.redis_sentinel_master, **_primary_options(url))
    return redis.Redis.from_url(url, **options)


def node_client(cluster: RedisCluster, node: Any) -> redis.Redis:
    """A client of one Cluster node with the Cluster's connection settings (credentials, TLS, timeouts,
    no retries) but a pool of its own: RedisCluster closes its nodes' idle connections whenever it
    reloads the slot map, which must not cut a healthy shard's subscriber or pipelines."""
    pool = cluster.get_redis_connection(node).connection_pool
    return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **pool.connection_kwargs))


def detect_cluster(settings: Settings, timeout: float = 1.0) -> Settings:
    """Settings with `redis_cluster` on when REDIS_URL (one server, no Sentinel) names a Redis Cluster
    node (INFO's cluster_enabled); unchanged when it does not, or cannot be asked now."""
    if settings.redis_cluster or settings.redis_sentinel_master is not None or not settings.redis_url:
        return settings
    if settings.redis_url.lower().startswith("unix:"):
        return settings
    client = redis.Redis.from_url(settings.redis_url, **client_options(settings, timeout))
    try:
        enabled = str(client.info("cluster").get("cluster_enabled", "0")) == "1"
    except Exception:  # unreachable, INFO not allowed (managed services): keep what the settings say
        return settings
    finally:
        client.close()
    if enabled:
        log.info("REDIS_URL names a Redis Cluster node: using Redis Cluster (WSAPP_REDIS_CLUSTER=1)")
        return replace(settings, redis_cluster=True)
    return settings


def sentinel_for(settings: Settings, options: dict[str, Any]) -> Sentinel:
    """The Sentinels REDIS_URL lists (`redis[s]://[user:password@]host[:port][,host[:port]...][/db]`).

    The URL's credentials and db are the primary's; the Sentinels are asked without a password.
    """
    hosts = _sentinel_hosts(settings.redis_url or "")
    sentinel_options = {key: value for key, value in options.items() if key != "client_name"}
    return Sentinel(hosts, sentinel_kwargs=sentinel_options, **options)


def _sentinel_hosts(url: str) -> list[tuple[str, int]]:
    location = url.partition("://")[2].rpartition("@")[2].partition("/")[0].partition("?")[0]
    hosts = []
    for host in location.split(","):
        if host.startswith("["):
            name, _, port = host[1:].partition("]")
            port = port.removeprefix(":")
        else:
            name, _, port = host.partition(":")
        hosts.append((name or "localhost", int(port) if port else DEFAULT_SENTINEL_PORT))
    return hosts


def _primary_options(url: str) -> dict[str, Any]:
    userinfo, _, location = url.partition("://")[2].rpartition("@")
    path, _, query = location.partition("?")
    user, _, password = userinfo.partition(":")
    options: dict[str, Any] = {}
    if user:
        options["username"] = unquote(user)
    if password:
        options["password"] = unquote(password)
    db = path.partition("/")[2].strip("/") or dict(parse_qsl(query)).get("db", "")
    if db:
        options["db"] = int(db)
    return options


def where(settings: Settings) -> str:
    """REDIS_URL as it may be logged (no password), with what it names."""
    shown = _without_password(settings.redis_url or "")
    if settings.redis_cluster:
        return f"Redis Cluster via {shown}"
    if settings.redis_sentinel_master is not None:
        return f"primary {settings.redis_sentinel_master!r} via Sentinel {shown}"
    return shown


# ---- start-up check ----------------------------------------------------------------------------------


def check_broker(settings: Settings, timeout: float = 2.0) -> None:
    """Raise ConfigError naming REDIS_URL when the broker can never work (bad credentials or ACL,
    unknown Sentinel primary, failed TLS verification, WSAPP_REDIS_CLUSTER=1 on a server that is not a
    Cluster node); log and return when it is merely unreachable now (the server starts degraded and
    reconnects). A Cluster node without WSAPP_REDIS_CLUSTER is detected (`detect_cluster`), not refused."""
    if not settings.redis_url:
        return
    settings = detect_cluster(settings, timeout)
    shown = where(settings)
    try:
        if settings.redis_sentinel_master is not None:
            _check_sentinels(settings, timeout)
        client = make_client(settings, timeout, name="wsapp-check")
        try:
            client.ping()
        finally:
            client.close()
    except ConfigError:
        raise
    except Exception as exc:  # redis-py and ssl errors; anything not known to be fatal only degrades
        problem = _fatal(exc, settings)
        if problem is not None:
            raise ConfigError(f"REDIS_URL ({shown}): {problem}") from None
        log.warning("broker %s unreachable at start-up (%s): serving degraded until it answers", shown,
                    exc or type(exc).__name__)
        return
    log.info("broker %s answers", shown)


def _check_sentinels(settings: Settings, timeout: float) -> None:
    """Ask each Sentinel for the primary: one that answers without knowing it is a configuration error."""
    name = settings.redis_sentinel_master
    options = client_options(settings, timeout)
    answered = False
    for host, port in _sentinel_hosts(settings.redis_url or ""):
        sentinel = redis.Redis(host, port, **options)
        try:
            address = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
        except redis.ResponseError as exc:
            if "unknown command" in str(exc).lower() or "unknown subcommand" in str(exc).lower():
                raise ConfigError(f"REDIS_URL ({where(settings)}): {host}:{port} is not a Redis Sentinel "
                                  "(unset WSAPP_REDIS_SENTINEL_MASTER to use it as the server)") from None
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if _fatal(exc, settings) is not None:
                raise
            continue
        finally:
            sentinel.close()
        if address:
            return
        answered = True
    if answered:
        raise ConfigError(f"REDIS_URL ({where(settings)}): no Sentinel knows a primary named {name!r} "
                          "(WSAPP_REDIS_SENTINEL_MASTER)")


def _fatal(exc: BaseException, settings: Settings) -> str | None:
    """Why retrying `exc` can never succeed, or None when it may (the broker is down or restarting)."""
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return f"authentication failed ({exc}): check the user name and password in the URL"
    if isinstance(exc, (redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)):
        return f"the user is not allowed to run wsapp's commands ({exc})"
    if isinstance(exc, redis.ResponseError) and "DB index is out of range" in str(exc):
        return f"{exc}: the URL's database number does not exist on this server"
    if isinstance(exc, redis.exceptions.RedisClusterException) and "not enabled" in str(exc).lower():
        return "not a Redis Cluster node (cluster mode is not enabled): unset WSAPP_REDIS_CLUSTER"
    tls = _ssl_error(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        return (f"TLS certificate verification failed ({tls.verify_message or tls}): give the server's CA "
                "in WSAPP_REDIS_TLS_CA, or set WSAPP_REDIS_TLS_VERIFY=none to encrypt without checking "
                "the certificate (Heroku Redis)")
    if is_tls(settings) and "verify failed" in str(exc).lower():
        return f"TLS certificate verification failed ({exc})"
    return None


def _ssl_error(exc: BaseException | None) -> ssl.SSLError | None:
    """The ssl error redis-py wrapped into a ConnectionError, if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
