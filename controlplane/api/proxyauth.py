"""Who may receive xDS configuration: the gate of an xDS port (control plane or agent).

Owns `ProxyAuthenticator`, the `graylane.xds.server.ProxyGate` that admits a proxy's stream
on its first request, and the `--xds-tokens` file format. A proxy is admitted when it
proves an identity that names the cluster this xDS port serves:

* a client certificate (mutual TLS) with a proxy identity
  (`spiffe://graylane/proxy/<cluster>[/<node>]`, see `graylane.controlplane.api.tls`), or
* a token in its node metadata (`graylane_token`) listed in the `--xds-tokens` file, as
  `cluster: token` (any node of the cluster) or `cluster/node: token` lines
  (`graylane.controlplane.options.parse_xds_tokens`),

and its node agrees with that identity: `node.cluster` is the identity's cluster and, when
the identity names a node, `node.id` is that node.

Scopes: a credential may name the services its proxy may receive. A token's line says so
itself (`cluster[/node] [a,b]: token`); a certificate identity is scoped by a token-less
line of the same file (`cluster[/node] [a,b]`), so a scope needs no certificate extension
and can change without re-issuing certificates, and one file says what every proxy
credential may see. A certificate naming a node takes its node's line, else its cluster's;
one naming only the cluster takes the cluster's line alone (the node id it then sends is
its own claim, so it cannot pick a wider scope by picking a node). No line: the whole
cluster. A scoped proxy is served its services' listeners' routes, scopes, route configs,
clusters and endpoints only (`graylane.xds.scope`), whatever names it asks for. Anything else ends the stream before the
tracker or the cache see it (UNAUTHENTICATED without a credential, PERMISSION_DENIED with
the wrong one), so a refused stream is sent nothing and its ACKs and NACKs count for
nothing. The token is taken out of the node before it is recorded anywhere.

Tokens are kept as SHA-256 digests and looked up by digest, so a lookup's timing says
nothing about a stored token. Must not import: etcd, agent code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from graylane.controlplane.api.tls import PROXY, check_name, peer_identities
from graylane.controlplane.options import XdsCredential
from graylane.xds.server import Admitted, ProxyRefused

TOKEN_METADATA = "graylane_token"


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """A proven proxy identity: its cluster, and its node when the credential names one."""

    cluster: str
    node: str | None = None
    via: str = "token"  # "certificate" or "token", for messages
    services: frozenset[str] | None = None  # the scope (None: every service of the cluster)

    def __str__(self) -> str:
        scope = f" [{','.join(sorted(self.services))}]" if self.services is not None else ""
        return f"{self.cluster}/{self.node or '*'}{scope} ({self.via})"


Credentials = Sequence[XdsCredential | tuple[str, str | None, str]]


def xds_authenticator(*, cluster: str, tokens: Credentials, mutual: bool) -> ProxyAuthenticator | None:
    """The gate of an xDS port: on as soon as proxies have credentials to show (tokens, or
    client certificates under mutual TLS); None keeps the port open to every proxy."""
    if not tokens and not mutual:
        return None
    return ProxyAuthenticator(cluster=cluster, tokens=tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class ProxyAuthenticator:
    """Admits the proxies of `cluster` (see the module docstring)."""

    def __init__(self, *, cluster: str, tokens: Credentials = ()) -> None:
        """`tokens`: as `parse_xds_tokens` reads them (plain (cluster, node, token) triples
        are unscoped tokens)."""
        self.cluster = check_name("cluster", cluster)
        self._tokens: dict[bytes, ProxyIdentity] = {}
        # (cluster, node or None) -> the scope of the certificates naming that identity
        self._certificate_scopes: dict[tuple[str, str | None], frozenset[str]] = {}
        for line in tokens:
            c = XdsCredential(*line)
            if c.token:
                self._tokens[_digest(c.token)] = ProxyIdentity(c.cluster, c.node, services=c.services)
            elif c.services is not None:
                self._certificate_scopes[(c.cluster, c.node)] = c.services

    def identify(self, node: base_pb2.Node, peer: Mapping[str, Sequence[bytes]]) -> ProxyIdentity:
        for identity in peer_identities(peer):
            if identity.kind == PROXY:
                cluster, *named = identity.parts
                node = named[0] if named else None
                scopes = self._certificate_scopes
                services = scopes.get((cluster, node), scopes.get((cluster, None)) if node is not None else None)
                return ProxyIdentity(cluster, node, via="certificate", services=services)
        field = node.metadata.fields.get(TOKEN_METADATA)
        if field is not None and field.WhichOneof("kind") == "string_value":
            found = self._tokens.get(_digest(field.string_value))
            if found is not None:
                return found
            raise ProxyRefused(grpc.StatusCode.UNAUTHENTICATED, f"node {node.id!r}: unknown {TOKEN_METADATA}")
        raise ProxyRefused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"node {node.id!r}: no proxy credential (a client certificate naming a proxy of cluster "
            f"{self.cluster!r}, or node.metadata.{TOKEN_METADATA})",
        )

    def admit(self, node: base_pb2.Node, *, peer: Mapping[str, Sequence[bytes]]) -> Admitted:
        identity = self.identify(node, peer)
        if identity.cluster != self.cluster:
            raise ProxyRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node.id!r} proves {identity}, which may not receive cluster {self.cluster!r}'s configuration",
            )
        if node.cluster != identity.cluster:
            raise ProxyRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node.id!r} says cluster {node.cluster!r} but proves {identity}",
            )
        if identity.node is not None and node.id != identity.node:
            raise ProxyRefused(grpc.StatusCode.PERMISSION_DENIED, f"node {node.id!r} proves {identity}")
        if TOKEN_METADATA not in node.metadata.fields:
            return Admitted(node, identity.services)
        clean = base_pb2.Node()
        clean.CopyFrom(node)
        del clean.metadata.fields[TOKEN_METADATA]
        return Admitted(clean, identity.services)
