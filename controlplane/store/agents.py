"""The clusters' agents in etcd: who serves each cluster, its endpoints, its metrics.

Keys (below the prefix):
    clusters/<name>                      AgentHello of the cluster's agent, under its lease
    clusterendpoints/<name>              EndpointSnapshot the agent reported, under its lease
    knownclusters/<name>                 AgentHello last registered for the cluster (no lease: kept)
    agentmetrics/<cluster>               the cluster's last metrics report, shared between replicas

An agent's keys live on an etcd lease kept alive by the replica holding the agent's
stream: when the agent (or that replica) dies, its cluster and endpoints expire with it.
Must not import: graylane.xds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from etcd3.etcdrpc import kv_pb2, rpc_pb2
from graylane.controlplane.domain import model
from graylane.controlplane.errors import AlreadyExists, Conflict, FailedPrecondition, NotFound
from graylane.controlplane.store._client import EtcdClient, LeaseHolder
from graylane.controlplane.store._codec import _dump, _load
from graylane.v1 import agent_pb2 as apb


class AgentStore(LeaseHolder, Protocol):
    """What the agents' hub uses: claim a cluster, publish its endpoints and metrics."""

    async def register_cluster(self, info: model.ClusterInfo, lease: int) -> None: ...

    async def known_clusters(self) -> frozenset[str]: ...

    async def forget_cluster(self, name: str) -> None: ...

    async def put_cluster_endpoints(self, cluster: str, items: Sequence[model.ClusterEndpoints], lease: int) -> int: ...

    async def put_agent_metrics(self, cluster: str, origin: str, report: bytes, lease: int) -> None: ...

    def agent_metrics_in(self, events: Sequence[kv_pb2.Event]) -> list[tuple[str, str, bytes]]: ...


class AgentRecords(EtcdClient):
    """Clusters, their endpoints and their shared metrics reports."""

    async def put_agent_metrics(self, cluster: str, origin: str, report: bytes, lease: int) -> None:
        """Share one agent metrics report (serialised `MetricsReport`) with the other replicas:
        written over the cluster's last one under the agent's lease; each write reaches every
        replica's watch as an event (`agent_metrics_in`), so none is lost to the overwrite.
        `origin` is the writing replica, which has filed the report already."""
        value = origin.encode() + b"\n" + report
        await self._txn([], [self._put(self._key("agentmetrics", cluster), value, lease=lease)])

    def agent_metrics_in(self, events: Sequence[kv_pb2.Event]) -> list[tuple[str, str, bytes]]:
        """(cluster, origin replica, serialised MetricsReport) of each shared report in a watch batch."""
        prefix = self._key("agentmetrics") + b"/"
        out = []
        for ev in events:
            if ev.type == kv_pb2.Event.PUT and ev.kv.key.startswith(prefix):
                origin, _, report = ev.kv.value.partition(b"\n")
                out.append((ev.kv.key[len(prefix) :].decode(), origin.decode(), report))
        return out

    async def register_cluster(self, info: model.ClusterInfo, lease: int) -> None:
        """Claim `info.name` for this agent under `lease`.

        A cluster name belongs to one agent (its `agent_id`) while that agent's lease lives;
        the same agent may claim it again (after its own restart, or a replica's), any other
        agent is refused with AlreadyExists.
        """
        key = self._key("clusters", info.name)
        value = _dump(model.cluster_to_proto(info))
        # The lasting record that the cluster exists, so a replica that starts after the
        # leases expired still knows which clusters to wait for (see `known_clusters`).
        known = self._put(self._key("knownclusters", info.name), value)
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        resp = await self._txn([absent], [self._put(key, value, lease=lease), known])
        if resp.succeeded:
            return
        current = await self._get(key)
        if current is not None:
            holder = _load(current.value, apb.AgentHello())
            if holder.agent_id != info.agent_id:  # type: ignore[attr-defined]
                raise AlreadyExists(
                    f"cluster {info.name!r} is served by another agent ({holder.agent_id}); "  # type: ignore[attr-defined]
                    "stop it first, or give this agent another cluster name"
                )
            same = rpc_pb2.Compare(
                key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=current.mod_revision
            )
        else:
            same = absent  # expired in between: claim it afresh
        if not (await self._txn([same], [self._put(key, value, lease=lease), known])).succeeded:
            raise Conflict(f"cluster {info.name!r} was claimed concurrently; reconnect")

    async def known_clusters(self) -> frozenset[str]:
        """Every cluster an agent has ever registered under this prefix (no lease: it outlives them)."""
        prefix = self._key("knownclusters", "")
        resp = await self._range(prefix)
        return frozenset(kv.key[len(prefix) :].decode() for kv in resp.kvs)

    async def forget_cluster(self, name: str) -> None:
        """Drop a known cluster whose agent is not connected (starting replicas stop waiting for it)."""
        live = self._key("clusters", name)
        known = self._key("knownclusters", name)
        absent = rpc_pb2.Compare(
            key=live, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        present = rpc_pb2.Compare(
            key=known, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.GREATER, create_revision=0
        )
        delete = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=known))
        if (await self._txn([absent, present], [delete])).succeeded:
            return
        if await self._get(live) is not None:
            raise FailedPrecondition(f"cluster {name!r} has a connected agent; stop the agent first")
        raise NotFound(f"cluster {name!r} is not known")

    async def put_cluster_endpoints(self, cluster: str, items: Sequence[model.ClusterEndpoints], lease: int) -> int:
        """Replace the cluster's endpoints under `lease`; the etcd revision that holds them."""
        key = self._key("clusterendpoints", cluster)
        resp = await self._txn([], [self._put(key, _dump(model.cluster_endpoints_to_proto(items)), lease=lease)])
        return int(resp.header.revision)
