"""A tiny identity provider for the tests: RSA and EC keys, tokens signed with them, and their JWKS
served over real HTTP on 127.0.0.1 from a thread of the test process."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


class SigningKey:
    """A private key with its kid and algorithm; `jwk` is the public half as a JWKS entry."""

    def __init__(self, kid: str, alg: str) -> None:
        self.kid = kid
        self.alg = alg
        if alg == "RS256":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.jwk = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        else:
            raise ValueError(alg)
        self.jwk.update({"kid": kid, "use": "sig"})

    def sign(self, sub: str = "alice", ttl: float = 60, headers: dict[str, Any] | None = None,
             **claims: Any) -> str:
        """A token for `sub` that expires in `ttl` seconds, with this key's kid unless `headers` say otherwise."""
        payload = {"sub": sub, "exp": int(time.time() + ttl), "iat": int(time.time()), **claims}
        return jwt.encode(payload, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})})


class JwksServer:
    """Serves `{"keys": [...]}` at /jwks.json and counts the fetches; `keys` may be changed live."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket (fetches then fail with connection refused)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
