"""`graylane certs`: a certificate authority and the certificates of a local set-up.

Owns making (with the `cryptography` package) one CA and, signed by it, the server
certificate every Graylane port presents and the client certificates of Envoys, agents and
CLI users, each naming its identity in a URI SAN (`graylane.controlplane.api.tls` reads them
back). Keys are ECDSA P-256: small, fast to verify, and accepted by gRPC, Envoy and
OpenSSL alike. An existing CA in the output directory is kept and signs the new
certificates, so clusters and users can be added later; leaves are written again.

For a local or test set-up: production installs usually have a CA of their own (cert-manager,
Vault, SPIFFE); the identities Graylane expects are documented in the README (threat model).
Must not import: etcd, xds, agent code.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from graylane.controlplane.api.tls import agent_uri, proxy_uri, user_uri

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server.pem", "server-key.pem"
#: Names every local server certificate carries, so clients dialing loopback verify it.
LOCAL_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 365


@dataclass(frozen=True, slots=True)
class Issued:
    """One certificate written: its identity, and its certificate and key files."""

    name: str
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    # Created 0600 from the start: never readable by others, even for an instant.
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class CertificateAuthority:
    """A CA key and certificate, loaded from `directory` or made there."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert, self.key = cert, key

    @classmethod
    def load_or_create(cls, directory: Path, *, days: int = 10 * DEFAULT_DAYS) -> CertificateAuthority:
        cert_path, key_path = directory / CA_CERT, directory / CA_KEY
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: not an EC key (made by another tool?)")
            return cls(cert, key)
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "graylane local CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
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
            )  # fmt: skip
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        return cls(cert, key)

    def issue(
        self,
        common_name: str,
        *,
        sans: Sequence[x509.GeneralName],
        server: bool,
        days: int = DEFAULT_DAYS,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key

    def write(
        self, directory: Path, stem: str, common_name: str, *, sans: Sequence[x509.GeneralName], server: bool, days: int
    ) -> Issued:
        cert, key = self.issue(common_name, sans=sans, server=server, days=days)
        issued = Issued(common_name, directory / f"{stem}.pem", directory / f"{stem}-key.pem")
        _write_key(issued.key, key)
        _write_cert(issued.cert, cert)
        return issued


def make_local_certs(
    directory: Path,
    *,
    hosts: Sequence[str] = (),
    clusters: Sequence[str] = ("local",),
    users: Sequence[str] = ("admin",),
    days: int = DEFAULT_DAYS,
) -> list[Issued]:
    """A CA (kept if present) and, signed by it: `server` (LOCAL_HOSTS and `hosts`), per
    cluster `envoy-<cluster>` (any Envoy of the cluster) and `agent-<cluster>`, and per user
    `user-<name>`. Returns what was written, the CA first."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.load_or_create(directory)
    written = [Issued("CA", directory / CA_CERT, directory / CA_KEY)]
    names = list(dict.fromkeys((*LOCAL_HOSTS, *hosts)))
    written.append(ca.write(directory, "server", "graylane", sans=[_san(n) for n in names], server=True, days=days))

    def client(name: str, uri: str) -> Issued:
        """A client certificate whose identity is `uri` (its CN and its only SAN)."""
        return ca.write(directory, name, uri, sans=[x509.UniformResourceIdentifier(uri)], server=False, days=days)

    for cluster in clusters:
        written += [client(f"envoy-{cluster}", proxy_uri(cluster)), client(f"agent-{cluster}", agent_uri(cluster))]
    written += [client(f"user-{user}", user_uri(user)) for user in users]
    return written
