"""TLS for every Graylane port, and the identities certificates carry.

Owns: `ServerTls` (a certificate, its key and, for mutual TLS, the CA client certificates
must chain to) turned into gRPC server credentials or an `ssl.SSLContext` for the HTTP
server; `ClientTls` (the CA to trust, and a client certificate) turned into gRPC channel
credentials; `open_channel`, the one place a client (CLI, agent, tests) opens a channel,
plain or TLS; and the identity names written in certificates as URI SANs:

    spiffe://graylane/proxy/<cluster>/<node id>   one Envoy (xDS client) of a cluster
    spiffe://graylane/proxy/<cluster>             any Envoy of that cluster
    spiffe://graylane/agent/<cluster>             a cluster's agent
    spiffe://graylane/user/<name>                 a person or a pipeline (API)

(SPIFFE IDs: a SPIFFE-aware CA can issue them, and names keep to SPIFFE's path characters.)

`peer_identities` reads them back from a gRPC call's auth context. Files are read once, when
the credentials are built (at start): a rotated certificate takes a restart.

Must not import: etcd, xds, agent code (the CLI imports this without the server).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

IDENTITY_PREFIX: Final = "spiffe://graylane/"
PROXY, AGENT, USER = "proxy", "agent", "user"
# Cluster, node and user names inside an identity: SPIFFE path characters, no `/`.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


class TlsConfigError(ValueError):
    """A certificate, key or CA file is missing or unreadable; the message names it."""


def check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r}: letters, digits and . _ - only (not starting with a symbol)")
    return name


def proxy_uri(cluster: str, node: str | None = None) -> str:
    """One Envoy of `cluster` (`node`), or any of them (None)."""
    check_name("cluster", cluster)
    if node is None:
        return f"{IDENTITY_PREFIX}{PROXY}/{cluster}"
    return f"{IDENTITY_PREFIX}{PROXY}/{cluster}/{check_name('node', node)}"


def agent_uri(cluster: str) -> str:
    return f"{IDENTITY_PREFIX}{AGENT}/{check_name('cluster', cluster)}"


def user_uri(name: str) -> str:
    return f"{IDENTITY_PREFIX}{USER}/{check_name('user', name)}"


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """An identity a verified client certificate names: `kind` and its parts
    (proxy: cluster, and the node when it names one; agent: cluster; user: name)."""

    kind: str
    parts: tuple[str, ...]

    @classmethod
    def parse(cls, uri: str) -> CertIdentity | None:
        if not uri.startswith(IDENTITY_PREFIX):
            return None
        kind, *parts = uri[len(IDENTITY_PREFIX) :].split("/")
        sizes = {PROXY: (1, 2), AGENT: (1,), USER: (1,)}
        if kind not in sizes or len(parts) not in sizes[kind] or not all(_NAME.fullmatch(p) for p in parts):
            return None
        return cls(kind, tuple(parts))

    def __str__(self) -> str:
        return f"{IDENTITY_PREFIX}{self.kind}/{'/'.join(self.parts)}"


def peer_identities(auth_context: Mapping[str, Sequence[bytes]]) -> tuple[CertIdentity, ...]:
    """The Graylane identities in the peer's certificate, if the call came over mutual TLS.

    gRPC puts a client certificate's SANs in the auth context only once the handshake
    verified it against the server's client CA, so what is here was signed by that CA.
    """
    if auth_context.get("transport_security_type") != [b"ssl"]:
        return ()
    found: list[CertIdentity] = []
    for raw in auth_context.get("x509_subject_alternative_name", ()):
        identity = CertIdentity.parse(raw.decode(errors="replace"))
        if identity is not None and identity not in found:
            found.append(identity)
    return tuple(found)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerTls:
    """What a server presents, and (`client_ca`) what client certificates must chain to:
    with a client CA, a client without a certificate it signed is refused at the handshake."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        ca = _read(self.client_ca, "client CA") if self.client_ca is not None else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def ssl_context(self) -> ssl.SSLContext:
        """For the HTTP server (/metrics, /healthz): the same certificate and client rule."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"TLS certificate {self.cert} / key {self.key}: {exc}") from exc
        return context


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientTls:
    """A client's TLS: the CA to verify the server with (None: the system's roots) and,
    for mutual TLS, a certificate and its key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError("a client certificate needs its key, and a key its certificate")

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA") if self.ca is not None else None,
            private_key=_read(self.key, "TLS key") if self.key is not None else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert is not None else None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTP clients (a scrape of /metrics over TLS, tests)."""
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca is not None else None)
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(self.cert, self.key)
        return context


def open_channel(
    target: str, tls: ClientTls | None = None, *, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: TLS with `tls`, plain text without."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.grpc_credentials(), options=list(options))


def add_port(server: grpc.aio.Server, listen: str, tls: ServerTls | None) -> int:
    """Bind `listen` on `server`, with TLS when given; the bound port (0: it failed)."""
    if tls is None:
        port: int = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, tls.grpc_credentials())
    return port
