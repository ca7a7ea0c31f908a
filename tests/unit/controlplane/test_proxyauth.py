"""Who may receive a cluster's xDS configuration (the xDS port's gate), without processes."""

from __future__ import annotations

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from graylane.controlplane.api.proxyauth import TOKEN_METADATA, ProxyAuthenticator
from graylane.controlplane.api.tls import agent_uri, proxy_uri, user_uri
from graylane.controlplane.options import parse_xds_tokens
from graylane.xds.server import ProxyRefused

TOKEN = "east-token-0123456789"
NODE_TOKEN = "node-token-0123456789"
GATE = ProxyAuthenticator(cluster="east", tokens=[("east", None, TOKEN), ("east", "envoy-1", NODE_TOKEN)])


def node(node_id: str = "envoy-1", cluster: str = "east", token: str | None = None) -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster=cluster)
    n.metadata.fields["admin_address"].string_value = "127.0.0.1:9901"
    if token is not None:
        n.metadata.fields[TOKEN_METADATA].string_value = token
    return n


def mtls(*uris: str) -> dict[str, list[bytes]]:
    return {"transport_security_type": [b"ssl"], "x509_subject_alternative_name": [u.encode() for u in uris]}


def refused(n: base_pb2.Node, peer: dict[str, list[bytes]]) -> ProxyRefused:
    with pytest.raises(ProxyRefused) as caught:
        GATE.admit(n, peer=peer)
    return caught.value


def test_a_proxy_certificate_of_the_served_cluster_is_admitted() -> None:
    assert GATE.admit(node(), peer=mtls(proxy_uri("east"))).node == node()
    assert GATE.admit(node("envoy-1"), peer=mtls(proxy_uri("east", "envoy-1"))).node.id == "envoy-1"


def test_a_token_admits_and_is_taken_out_of_the_node() -> None:
    admitted = GATE.admit(node("envoy-7", token=TOKEN), peer={})
    assert TOKEN_METADATA not in admitted.node.metadata.fields
    assert admitted.node.metadata.fields["admin_address"].string_value == "127.0.0.1:9901"
    assert admitted.services is None  # unscoped: the whole cluster
    assert GATE.admit(node("envoy-1", token=NODE_TOKEN), peer={}).node.id == "envoy-1"


@pytest.mark.parametrize(
    ("n", "peer", "code", "says"),
    [
        (node(), {}, grpc.StatusCode.UNAUTHENTICATED, "no proxy credential"),
        (node(token="wrong-token-0123456789"), {}, grpc.StatusCode.UNAUTHENTICATED, "unknown graylane_token"),
        # Certificates that are not a proxy's prove nothing here.
        (node(), mtls(agent_uri("east"), user_uri("admin")), grpc.StatusCode.UNAUTHENTICATED, "no proxy credential"),
        # Another cluster's proxy, by certificate or token.
        (node(cluster="west"), mtls(proxy_uri("west")), grpc.StatusCode.PERMISSION_DENIED, "may not receive"),
        # The node says another cluster than the one it proves.
        (node(cluster="west"), mtls(proxy_uri("east")), grpc.StatusCode.PERMISSION_DENIED, "says cluster 'west'"),
        # A credential naming one node, presented by another.
        (node("envoy-2"), mtls(proxy_uri("east", "envoy-1")), grpc.StatusCode.PERMISSION_DENIED, "proves east/envoy-1"),
        (node("envoy-2", token=NODE_TOKEN), {}, grpc.StatusCode.PERMISSION_DENIED, "proves east/envoy-1"),
    ],
)
def test_anything_else_is_refused_with_the_reason(
    n: base_pb2.Node, peer: dict[str, list[bytes]], code: grpc.StatusCode, says: str
) -> None:
    exc = refused(n, peer)
    assert exc.code == code and says in exc.message, exc.message
    assert TOKEN not in exc.message and NODE_TOKEN not in exc.message


def test_another_clusters_token_is_refused() -> None:
    gate = ProxyAuthenticator(cluster="east", tokens=[("west", None, TOKEN)])
    with pytest.raises(ProxyRefused) as caught:
        gate.admit(node(cluster="west", token=TOKEN), peer={})
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


SCOPED = ProxyAuthenticator(
    cluster="east",
    tokens=parse_xds_tokens(
        "east [a]: scoped-token-0123456789\n"
        "east/envoy-1 [a, b]: node-scoped-0123456789\n"
        "east [c]\n"  # certificates of east naming no node, or a node without a line of its own
        "east/envoy-2 [d]\n",
        source="t",
    ),
)


def test_a_scoped_token_admits_its_services_only() -> None:
    assert SCOPED.admit(node("envoy-7", token="scoped-token-0123456789"), peer={}).services == {"a"}
    assert SCOPED.admit(node("envoy-1", token="node-scoped-0123456789"), peer={}).services == {"a", "b"}


def test_a_certificate_takes_its_nodes_scope_else_its_clusters() -> None:
    assert SCOPED.admit(node("envoy-2"), peer=mtls(proxy_uri("east", "envoy-2"))).services == {"d"}
    assert SCOPED.admit(node("envoy-3"), peer=mtls(proxy_uri("east", "envoy-3"))).services == {"c"}
    # A certificate for any node of east: the node id is its own claim, so claiming envoy-2
    # does not buy envoy-2's scope.
    assert SCOPED.admit(node("envoy-2"), peer=mtls(proxy_uri("east"))).services == {"c"}
    # No scope line at all: the whole cluster, as before.
    assert GATE.admit(node("envoy-2"), peer=mtls(proxy_uri("east", "envoy-2"))).services is None
