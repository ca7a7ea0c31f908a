"""Who may receive xDS configuration: the gate of an xDS port (control plane or agent).

Owns `ProxyAuthenticator`, the `graylane.xds.server.ProxyGate` that admits a proxy's stream
on its first request, and the `--xds-tokens` file format. A proxy is admitted when it
proves an identity that names the cluster this xDS port serves:

* a client certificate (mutual TLS) with a proxy identity
  (`spiffe://graylane/proxy/<cluster>[/<node>]`, see `graylane.controlplane.tls`), or
* a token in its node metadata (`graylane_token`) listed in the `--xds-tokens` file, as
  `cluster: token` (any node of the cluster) or `cluster/node: token` lines
  (`graylane.controlplane.options.parse_xds_tokens`),

and its node agrees with that identity: `node.cluster` is the identity's cluster and, when
the identity names a node, `node.id` is that node. Anything else ends the stream before the
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
from graylane.controlplane.tls import PROXY, check_name, peer_identities
from graylane.xds.server import ProxyRefused

TOKEN_METADATA = "graylane_token"


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """A proven proxy identity: its cluster, and its node when the credential names one."""

    cluster: str
    node: str | None = None
    via: str = "token"  # "certificate" or "token", for messages

    def __str__(self) -> str:
        return f"{self.cluster}/{self.node or '*'} ({self.via})"


def xds_authenticator(
    *, cluster: str, tokens: Sequence[tuple[str, str | None, str]], mutual: bool
) -> ProxyAuthenticator | None:
    """The gate of an xDS port: on as soon as proxies have credentials to show (tokens, or
    client certificates under mutual TLS); None keeps the port open to every proxy."""
    if not tokens and not mutual:
        return None
    return ProxyAuthenticator(cluster=cluster, tokens=tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class ProxyAuthenticator:
    """Admits the proxies of `cluster` (see the module docstring)."""

    def __init__(self, *, cluster: str, tokens: Sequence[tuple[str, str | None, str]] = ()) -> None:
        """`tokens`: (cluster, node or None for any node, token), as `parse_xds_tokens` reads them."""
        self.cluster = check_name("cluster", cluster)
        self._tokens = {_digest(token): ProxyIdentity(c, n) for c, n, token in tokens}

    def identify(self, node: base_pb2.Node, peer: Mapping[str, Sequence[bytes]]) -> ProxyIdentity:
        for identity in peer_identities(peer):
            if identity.kind == PROXY:
                cluster, *named = identity.parts
                return ProxyIdentity(cluster, named[0] if named else None, via="certificate")
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

    def admit(self, node: base_pb2.Node, *, peer: Mapping[str, Sequence[bytes]]) -> base_pb2.Node:
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
            return node
        clean = base_pb2.Node()
        clean.CopyFrom(node)
        del clean.metadata.fields[TOKEN_METADATA]
        return clean
