"""Write a self-signed TLS certificate and key for the compose proxy: `python deploy/selfsigned.py DIR`.

For trying the stack on one machine only: browsers warn about a self-signed certificate, and
clients must be told to trust `DIR/tls.crt` (or not to verify). In production, mount a real
certificate and key (Let's Encrypt, your CA) at the same paths instead. Uses `cryptography`, which
requirements.txt already pins, so the wsapp image can run it and no other image or tool is needed.
An existing pair is kept, so restarting the stack does not change the certificate under clients.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_NAME = "tls.crt"
KEY_NAME = "tls.key"
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


def make_pair(names: list[str], days: int) -> tuple[bytes, bytes]:
    """A PEM certificate (self-signed, P-256, the given DNS names and IP addresses) and its PEM key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where tls.crt and tls.key go")
    parser.add_argument("--name", action="append", help="a DNS name or IP address (repeatable; default localhost)")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="replace an existing pair")
    args = parser.parse_args(argv)
    cert_path, key_path = args.directory / CERT_NAME, args.directory / KEY_NAME
    if cert_path.exists() and key_path.exists() and not args.force:
        print(f"keeping the certificate in {cert_path}")
        return 0
    args.directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_pair(args.name or list(DEFAULT_NAMES), args.days)
    # The key is written readable by its owner only, before any byte of it is in the file.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    cert_path.write_bytes(cert_pem)
    print(f"wrote a self-signed certificate to {cert_path} and its key to {key_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
