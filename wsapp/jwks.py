"""Signing keys from an identity provider's JWKS document, cached, with rate-limited refetches."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import jwt
from jwt import PyJWK, PyJWKClient

log = logging.getLogger(__name__)

# Public-key algorithms a JWKS key may verify. Never HS* (a key published in a JWKS is no secret:
# anyone could sign with it) and never `none`; PyJWK binds each key to one algorithm of these.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class KeysUnavailable(Exception):
    """The JWKS could not be fetched and no cached key fits; the next fetch is `retry_after` s away."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class JwksKeys:
    """Keys by key id (`kid`) from a JWKS URL: fetched on first use, kept `lifespan` seconds, refetched
    early when a token names an unknown kid. Every fetch, failed ones included, is at least
    `refetch_interval` seconds after the previous one, so a flood of bogus kids cannot hammer the
    identity provider; `timeout` bounds each connect and read of a fetch."""

    def __init__(
        self,
        url: str,
        *,
        lifespan: float = 300.0,
        refetch_interval: float = 10.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The client's own caches are off: this class decides when to fetch (and keeps stale keys
        # through an outage, which the client's cache would drop).
        self._client = PyJWKClient(
            url, cache_jwk_set=False, timeout=timeout, cooldown_duration=0, headers={"User-Agent": "wsapp"}
        )
        self._url = url
        self._lifespan = lifespan
        self._refetch_interval = refetch_interval
        self._clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._failed = False
        # One fetch at a time: the connections that arrive meanwhile wait for its result instead of
        # fetching too (a monkey-patched lock under gevent, so only those greenlets wait).
        self._lock = threading.Lock()

    def get(self, kid: str) -> PyJWK | None:
        """The key with this kid, or None if the identity provider has none; raises KeysUnavailable
        when the JWKS cannot be fetched and no cached key fits."""
        key = self._keys.get(kid)
        if key is not None and self._clock() - self._fetched_at < self._lifespan:
            return key
        self._refresh()
        key = self._keys.get(kid)
        if key is not None:
            return key  # possibly stale: while the provider is down, the last keys it published stand
        if self._failed:
            wait = self._attempted_at + self._refetch_interval - self._clock()
            raise KeysUnavailable("identity provider unreachable", max(1, math.ceil(wait)))
        return None

    def _refresh(self) -> None:
        with self._lock:
            now = self._clock()
            if now - self._attempted_at < self._refetch_interval:
                return
            self._attempted_at = now
            try:
                keys = self._client.get_signing_keys(refresh=True)
            # Connection errors, HTTP errors, timeouts, a body that is no JSON or holds no usable keys.
            except (jwt.PyJWTError, OSError, ValueError) as exc:
                self._failed = True
                log.warning("JWKS fetch from %s failed (%s); next try in %.0f s, %d cached keys in use",
                            self._url, exc, self._refetch_interval, len(self._keys))
                return
            usable = {key.key_id: key for key in keys if key.key_id and key.algorithm_name in ASYMMETRIC_ALGORITHMS}
            if not usable:
                self._failed = True
                log.warning("JWKS from %s has no public signing keys with a kid; next try in %.0f s",
                            self._url, self._refetch_interval)
                return
            self._keys = usable
            self._fetched_at = self._clock()
            self._failed = False
            log.info("JWKS from %s: %d signing keys", self._url, len(usable))
