"""Settings from the environment (Heroku style) into one frozen object."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from wsapp.exceptions import ConfigError

T = TypeVar("T")
N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Settings:
    """Every tunable of the server; build it with `Settings.from_env()` or directly in tests."""

    port: int = 8080
    host: str = "0.0.0.0"
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    # What REDIS_URL names (redis_connect.py): one server, any node of a Redis Cluster, or Sentinels
    # watching the primary called redis_sentinel_master.
    redis_cluster: bool = False
    redis_sentinel_master: str | None = None
    # rediss:// certificate checks: "full" (chain and host name) or "none" (encrypted, server not
    # authenticated); redis_tls_ca trusts one CA bundle instead of the system's.
    redis_tls_verify: str = "full"
    redis_tls_ca: str | None = None
    # Worker processes sharing one listening socket (gunicorn's arbiter runs them); more than 1 needs Redis.
    web_concurrency: int = 1
    log_level: str = "INFO"
    # "text" (default) or "json": one JSON object per line (wsapp/logs.py).
    log_format: str = "text"
    # One line per HTTP request at INFO on the `wsapp.access` logger.
    access_log: bool = True
    # Where gunicorn workers share their figures (wsapp/metrics_share.py); the arbiter sets it up.
    metrics_dir: str | None = None
    # Frame layer limits (DESIGN.md section 4).
    max_message_bytes: int = 1024 * 1024
    max_fragments: int = 16384
    # Connection limits, checked before the 101.
    max_connections: int = 20000
    max_connections_per_ip: int = 1000
    # Proxies in front of us that append to X-Forwarded-For (Heroku's router: 1). 0 = trust none.
    trusted_proxy_hops: int = 0
    handshake_timeout: float = 10.0
    # Per connection: token bucket (0 = off), rooms, JSON nesting.
    rate_limit: float = 100.0
    rate_burst: int = 200
    max_rooms: int = 32
    max_json_depth: int = 32
    history: int = 100
    # Backpressure: frames and bytes waiting for one slow client before it is closed with 1013.
    send_queue: int = 4096
    send_queue_bytes: int = 16 * 1024 * 1024
    slow_consumer_grace: float = 2.0
    # Unsent bytes in the whole process (a frame queued to N clients counts N times) before producers wait.
    max_queued_bytes: int = 256 * 1024 * 1024
    # Liveness and shutdown.
    ping_interval: float = 20.0
    ping_timeout: float = 50.0
    drain_seconds: float = 10.0
    # Security.
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    jwt_secret: str | None = field(default=None, repr=False)
    # RS256/ES256 tokens from an identity provider: its JWKS document (keys cached), and the claims
    # a token must carry when these are set.
    jwt_jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Authentication on `/` and `/echo` too (by default only `/ws` and user routes ask for it).
    auth_all_routes: bool = False
    # `POST /api/publish` for other backends; off (404) while unset.
    api_key: str | None = field(default=None, repr=False)
    # The app `python server.py` / `python -m wsapp` serves: `module:attribute` (a Flask app or a factory).
    app: str | None = None
    # permessage-deflate (RFC 7692) when the client offers it; smaller messages go uncompressed.
    deflate: bool = True
    deflate_min_bytes: int = 256
    deflate_level: int = 6
    # The cyclic garbage collector's first threshold in a server process (0: Python's, 700). Python's
    # makes full collections of every connection's objects frequent under load (docs/SCALING.md).
    gc_threshold: int = 50000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read PORT, HOST, REDIS_URL, LOG_LEVEL and WSAPP_*; raise ConfigError naming a bad variable."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        settings = cls(
            port=reader.get("PORT", 8080, _int_range(0, 65535)),
            host=reader.get("HOST", "0.0.0.0", _nonempty),
            redis_url=reader.get("REDIS_URL", None, _redis_url),
            redis_cluster=reader.get("WSAPP_REDIS_CLUSTER", False, _bool),
            redis_sentinel_master=reader.get("WSAPP_REDIS_SENTINEL_MASTER", None, _sentinel_master),
            redis_tls_verify=reader.get("WSAPP_REDIS_TLS_VERIFY", "full", _tls_verify),
            redis_tls_ca=reader.get("WSAPP_REDIS_TLS_CA", None, _ca_file),
            web_concurrency=reader.get("WEB_CONCURRENCY", 1, _int_range(1, 1024)),
            log_level=reader.get("LOG_LEVEL", "INFO", _log_level),
            log_format=reader.get("LOG_FORMAT", "text", _log_format),
            access_log=reader.get("WSAPP_ACCESS_LOG", True, _bool),
            metrics_dir=reader.get("WSAPP_METRICS_DIR", None, _nonempty),
            max_message_bytes=reader.get("WSAPP_MAX_MESSAGE_BYTES", 1024 * 1024, _int_range(125, 2**40)),
            max_fragments=reader.get("WSAPP_MAX_FRAGMENTS", 16384, _int_range(0, 2**31)),
            max_connections=reader.get("WSAPP_MAX_CONNECTIONS", 20000, _int_range(1, 10**7)),
            max_connections_per_ip=reader.get("WSAPP_MAX_CONNECTIONS_PER_IP", 1000, _int_range(1, 10**7)),
            trusted_proxy_hops=reader.get("WSAPP_TRUSTED_PROXY_HOPS", 0, _int_range(0, 10)),
            handshake_timeout=reader.get("WSAPP_HANDSHAKE_TIMEOUT", 10.0, _float_range(0.1, 3600)),
            rate_limit=reader.get("WSAPP_RATE_LIMIT", 100.0, _float_range(0, 10**9)),
            rate_burst=reader.get("WSAPP_RATE_BURST", 200, _int_range(1, 10**9)),
            max_rooms=reader.get("WSAPP_MAX_ROOMS", 32, _int_range(1, 10**6)),
            max_json_depth=reader.get("WSAPP_MAX_JSON_DEPTH", 32, _int_range(1, 1000)),
            history=reader.get("WSAPP_HISTORY", 100, _int_range(0, 10**6)),
            send_queue=reader.get("WSAPP_SEND_QUEUE", 4096, _int_range(1, 10**7)),
            send_queue_bytes=reader.get("WSAPP_SEND_QUEUE_BYTES", 16 * 1024 * 1024, _int_range(1024, 2**40)),
            slow_consumer_grace=reader.get("WSAPP_SLOW_CONSUMER_GRACE", 2.0, _float_range(0, 3600)),
            max_queued_bytes=reader.get("WSAPP_MAX_QUEUED_BYTES", 256 * 1024 * 1024, _int_range(1 << 20, 2**50)),
            ping_interval=reader.get("WSAPP_PING_INTERVAL", 20.0, _float_range(0.05, 86400)),
            ping_timeout=reader.get("WSAPP_PING_TIMEOUT", 50.0, _float_range(0.05, 86400)),
            drain_seconds=reader.get("WSAPP_DRAIN_SECONDS", 10.0, _float_range(0, 3600)),
            allowed_origins=reader.get("WSAPP_ALLOWED_ORIGINS", (), _origins),
            jwt_secret=reader.get("WSAPP_JWT_SECRET", None, _secret),
            jwt_jwks_url=reader.get("WSAPP_JWT_JWKS_URL", None, _url),
            jwt_audience=reader.get("WSAPP_JWT_AUDIENCE", None, _nonempty),
            jwt_issuer=reader.get("WSAPP_JWT_ISSUER", None, _nonempty),
            auth_all_routes=reader.get("WSAPP_AUTH_ALL_ROUTES", False, _bool),
            api_key=reader.get("WSAPP_API_KEY", None, _api_key),
            app=reader.get("WSAPP_APP", None, _app_ref),
            deflate=reader.get("WSAPP_DEFLATE", True, _bool),
            deflate_min_bytes=reader.get("WSAPP_DEFLATE_MIN_BYTES", 256, _int_range(0, 2**40)),
            deflate_level=reader.get("WSAPP_DEFLATE_LEVEL", 6, _int_range(0, 9)),
            gc_threshold=reader.get("WSAPP_GC_THRESHOLD", 50000, _int_range(0, 10**8)),
        )
        if settings.ping_timeout <= settings.ping_interval:
            raise ConfigError("WSAPP_PING_TIMEOUT must be longer than WSAPP_PING_INTERVAL")
        _check_redis_combination(settings)
        return settings

    @property
    def workers(self) -> int:
        """Processes to run: WEB_CONCURRENCY, but only with a shared broker. Without REDIS_URL each
        worker would keep its own rooms and relay clients and users would split silently; and since
        platforms such as Heroku set WEB_CONCURRENCY by themselves, that is a warning, not an error."""
        return self.web_concurrency if self.redis_url else 1


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            shown = "(hidden)" if "SECRET" in name or "KEY" in name else repr(_without_password(raw))
            raise ConfigError(f"{name}={shown} is invalid: {exc}") from None


def _int_range(low: int, high: int) -> Callable[[str], int]:
    return _number_range(int, "a whole number", low, high)


def _float_range(low: float, high: float) -> Callable[[str], float]:
    return _number_range(float, "a number", low, high)


def _number_range(kind: Callable[[str], N], what: str, low: N, high: N) -> Callable[[str], N]:
    def parse(raw: str) -> N:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"expected {what}") from None
        if not low <= value <= high:  # type: ignore[operator]
            raise ValueError(f"expected a number from {low} to {high}")
        return value

    return parse


def _nonempty(raw: str) -> str:
    return raw


def _secret(raw: str) -> str:
    if len(raw.encode("utf-8")) < 32:
        raise ValueError("an HS256 secret needs at least 32 bytes (RFC 7518 3.2)")
    return raw


def _api_key(raw: str) -> str:
    if len(raw) < 16:
        raise ValueError("an API key needs at least 16 characters")
    return raw


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected 1 or 0 (true/false, yes/no, on/off)")


def _url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return raw


def _app_ref(raw: str) -> str:
    module, _, attr = raw.partition(":")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError("expected module:attribute, e.g. myapp:app or myapp:create_app")
    if attr and not all(part.isidentifier() for part in attr.removesuffix("()").split(".")):
        raise ValueError("expected module:attribute, e.g. myapp:app or myapp:create_app")
    return raw


def _log_format(raw: str) -> str:
    value = raw.lower()
    if value not in {"text", "json"}:
        raise ValueError("expected text or json")
    return value


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(part.strip().rstrip("/").lower() for part in raw.split(",") if part.strip())
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(f"origin {origin!r} needs a scheme, e.g. https://example.com")
    return origins


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _without_password(raw: str) -> str:
    """A URL as it may be logged: `scheme://user:***@host` (REDIS_URL carries the password)."""
    scheme, sep, rest = raw.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at:
        return raw
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hosts}" if colon or user else f"{scheme}://@{hosts}"


def _redis_url(raw: str) -> str:
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in REDIS_SCHEMES:
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    location = rest.rpartition("@")[2]
    if scheme.lower() == "unix":
        if not location.startswith("/"):
            raise ValueError("expected unix:///path/to/redis.sock")
        return raw
    db = location.partition("?")[0].partition("/")[2].strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database after the host must be a number, not {db!r}")
    hosts = location.partition("/")[0].partition("?")[0].split(",")
    for host in hosts:
        name, port = _host_port(host)
        if not name and len(hosts) > 1:  # alone, an empty host means localhost as in redis-py
            raise ValueError("expected host:port[,host:port...]")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"bad port {port!r}")
    return raw


def _host_port(host: str) -> tuple[str, str]:
    if host.startswith("["):  # [IPv6]:port
        name, _, rest = host[1:].partition("]")
        return name, rest.removeprefix(":")
    name, _, port = host.partition(":")
    return name, port


def _sentinel_master(raw: str) -> str:
    if any(ch.isspace() for ch in raw):
        raise ValueError("expected the name Sentinel knows the primary by (no spaces)")
    return raw


def _tls_verify(raw: str) -> str:
    value = raw.lower()
    if value not in {"full", "none"}:
        raise ValueError("expected full (check the certificate) or none (encrypt without checking it)")
    return value


def _ca_file(raw: str) -> str:
    if not os.path.isfile(raw):
        raise ValueError("expected the path of a PEM file of CA certificates")
    if not os.access(raw, os.R_OK):
        raise ValueError("the file is not readable")
    return raw


def _check_redis_combination(settings: Settings) -> None:
    """Settings that are each valid but cannot work together."""
    url = settings.redis_url
    scheme = url.partition("://")[0].lower() if url else ""
    for name, is_set in (
        ("WSAPP_REDIS_CLUSTER", settings.redis_cluster),
        ("WSAPP_REDIS_SENTINEL_MASTER", settings.redis_sentinel_master is not None),
        ("WSAPP_REDIS_TLS_CA", settings.redis_tls_ca is not None),
    ):
        if is_set and not url:
            raise ConfigError(f"{name} needs REDIS_URL")
    if settings.redis_cluster and settings.redis_sentinel_master is not None:
        raise ConfigError("WSAPP_REDIS_CLUSTER and WSAPP_REDIS_SENTINEL_MASTER cannot both be set: a Redis "
                          "Cluster fails over by itself, Sentinel watches a single primary")
    if scheme == "unix" and (settings.redis_cluster or settings.redis_sentinel_master is not None):
        raise ConfigError("REDIS_URL must be redis:// or rediss:// (host:port) with WSAPP_REDIS_CLUSTER or "
                          "WSAPP_REDIS_SENTINEL_MASTER")
    if url and "," in url and settings.redis_sentinel_master is None:
        raise ConfigError("REDIS_URL lists several hosts, which only WSAPP_REDIS_SENTINEL_MASTER uses "
                          "(a Redis Cluster needs just one of its nodes)")
    if settings.redis_tls_ca is not None:
        if scheme != "rediss":
            raise ConfigError("WSAPP_REDIS_TLS_CA needs a rediss:// REDIS_URL (TLS)")
        if settings.redis_tls_verify == "none":
            raise ConfigError("WSAPP_REDIS_TLS_CA is not used with WSAPP_REDIS_TLS_VERIFY=none: drop one of them")
