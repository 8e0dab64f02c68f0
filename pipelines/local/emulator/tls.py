"""The local stack's own certificate authority, for the gRPC port (grpc_bridge.py): Google's clients default to gRPC
over TLS and take the roots to trust from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, so unchanged client code trusts the stack
with one variable and nothing else trusts it. Made once per state dir; the keys are 0600."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA certificate: what a client trusts
    cert: Path  # the server's chain (its certificate, for localhost and 127.0.0.1)
    key: Path  # the server's key

    @property
    def bundle(self) -> Path:
        """The public roots (certifi's, what requests trusts by default) plus the stack's CA: REQUESTS_CA_BUNDLE for
        code that calls both the stack and the internet."""
        return self.ca.parent / "bundle.pem"


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def ensure_certificates(emulator_state_dir: Path) -> Certificates:
    """The state dir's CA and server certificate, made on first use (ten years: a local stack outlives no CA)."""
    directory = Path(emulator_state_dir) / "tls"
    certs = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    if all(p.is_file() for p in (certs.ca, certs.cert, certs.key, certs.bundle)):
        return certs
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vlp local stack CA ({directory})"[:64])])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = {"encoding": pem, "format": serialization.PrivateFormat.PKCS8}
    _write(directory / "ca-key.pem", ca_key.private_bytes(**private, encryption_algorithm=serialization.NoEncryption()), 0o600)
    _write(certs.key, key.private_bytes(**private, encryption_algorithm=serialization.NoEncryption()), 0o600)
    _write(certs.cert, cert.public_bytes(pem), 0o644)
    _write(certs.ca, ca.public_bytes(pem), 0o644)
    import certifi

    _write(certs.bundle, Path(certifi.where()).read_bytes() + b"\n" + ca.public_bytes(pem), 0o644)
    return certs
