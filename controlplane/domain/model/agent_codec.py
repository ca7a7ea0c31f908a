"""The agent protocol's codec: an agent's hello and endpoint snapshot to validated domain
values (`hello_from_proto`, `cluster_endpoints_from_proto`), and back for the wire.

Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

from collections.abc import Sequence

from graylane.controlplane.address import HostPort
from graylane.controlplane.domain.model.validation import (
    NOT_AN_IP,
    check_name,
    check_version_name,
    endpoint_from_proto,
    valid_address,
)
from graylane.controlplane.domain.model.values import ClusterEndpoints, ClusterInfo, Endpoint
from graylane.controlplane.errors import InvalidArgument
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import release_pb2 as pb


def split_host_port(field_name: str, value: str, *, stored: bool = False) -> tuple[str, int]:
    """`host:port` (IPv6 as `[addr]:port`) into its parts, or InvalidArgument naming the field.
    The host must be an IP literal, except in a value read back from etcd (`stored`)."""
    try:
        address = HostPort.parse(value)
    except ValueError as exc:
        raise InvalidArgument(field_name, str(exc)) from None
    if not (valid_address(address.host) or stored):
        raise InvalidArgument(field_name, f"{address.host!r} {NOT_AN_IP}")
    return address.host, address.port


def hello_from_proto(hello: apb.AgentHello, *, stored: bool = False) -> ClusterInfo:
    """Validate an agent's hello; `stored` (read back from etcd) keeps a gateway host name an
    older Graylane accepted."""
    host, port = split_host_port("hello.gateway_address", hello.gateway_address, stored=stored)
    if not hello.agent_id:
        raise InvalidArgument("hello.agent_id", "is required")
    return ClusterInfo(
        name=check_name("hello.cluster", hello.cluster),
        gateway_host=host,
        gateway_port=port,
        agent_id=hello.agent_id,
        agent_version=hello.agent_version,
    )


def cluster_endpoints_from_proto(
    cluster: str, snapshot: apb.EndpointSnapshot, *, stored: bool = False
) -> tuple[ClusterEndpoints, ...]:
    """Validate an agent's endpoint snapshot; every endpoint is tagged with `cluster`.
    `stored`: read back from etcd (see `endpoint_from_proto`)."""
    out: list[ClusterEndpoints] = []
    seen: set[tuple[str, str]] = set()
    for i, v in enumerate(snapshot.versions):
        where = f"endpoints.versions[{i}]"
        key = (check_name(f"{where}.service", v.service), check_version_name(f"{where}.version", v.version))
        if key in seen:
            raise InvalidArgument(f"{where}.version", f"{key[0]} {key[1]} is listed twice")
        seen.add(key)
        endpoints = []
        for j, e in enumerate(v.endpoints):
            checked = endpoint_from_proto(f"{where}.endpoints[{j}]", e, stored=stored)
            endpoints.append(Endpoint(address=checked.address, port=checked.port, cluster=cluster))
        out.append(ClusterEndpoints(service=key[0], version=key[1], endpoints=tuple(dict.fromkeys(endpoints))))
    return tuple(out)


def cluster_to_proto(c: ClusterInfo) -> apb.AgentHello:
    host = f"[{c.gateway_host}]" if ":" in c.gateway_host else c.gateway_host
    return apb.AgentHello(
        cluster=c.name, gateway_address=f"{host}:{c.gateway_port}", agent_id=c.agent_id, agent_version=c.agent_version
    )


def cluster_endpoints_to_proto(items: Sequence[ClusterEndpoints]) -> apb.EndpointSnapshot:
    return apb.EndpointSnapshot(
        versions=[
            apb.VersionEndpoints(
                service=i.service,
                version=i.version,
                endpoints=[pb.Endpoint(address=e.address, port=e.port) for e in i.endpoints],
            )
            for i in items
        ]
    )
