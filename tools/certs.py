"""Makes a local mesh CA and one certificate per identity: `python -m tools.certs [DIR]` (default var/certs).

Each certificate names its identity as common name (what the services authorize on) and carries the
subject alternative names the identity is reached by: its service name, localhost and 127.0.0.1. Keys
are EC P-256, written readable by the owner only. The CA key stays beside them so that a lost identity
can be re-issued; Kubernetes mounts only the CA certificate and each pod's own pair from Secrets.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libs.config import REPO_ROOT
from libs.tls import Identity, ca_path, cert_path, key_path

VALIDITY = datetime.timedelta(days=365)
CA_NAME = "Sophia mesh local CA"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A little slack for clocks that run behind the one that signed.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    certificate = (
        _builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _issue(
    identity: Identity, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))])
    names = [
        x509.DNSName(str(identity)),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    ]
    certificate = (
        _builder(subject, ca.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # Every service is both a server and, towards the others, a client.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, key


def _complete(directory: Path) -> bool:
    paths = [ca_path(directory)]
    for identity in Identity:
        paths += [cert_path(directory, identity), key_path(directory, identity)]
    return all(path.is_file() for path in paths)


def generate(directory: Path) -> None:
    """A fresh CA and a certificate for every identity in `directory` (replacing what was there)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca()
    _write_private(directory / "ca-key.pem", _key_pem(ca_key))
    ca_path(directory).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for identity in Identity:
        certificate, key = _issue(identity, ca, ca_key)
        _write_private(key_path(directory, identity), _key_pem(key))
        cert_path(directory, identity).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def ensure(directory: Path) -> bool:
    """Generates the certificates unless all are there already; True when it made new ones."""
    if _complete(directory):
        return False
    # Partial material cannot be trusted to chain to one CA: start again from a new CA.
    generate(directory)
    return True


def main(argv: list[str]) -> int:
    directory = Path(argv[0]) if argv else REPO_ROOT / "var" / "certs"
    made = ensure(directory)
    print(f"{'generated' if made else 'kept existing'} mesh certificates in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
