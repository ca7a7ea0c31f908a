"""Agent registration in etcd and the settling of a starting replica (controlplane/api/agent_service.py, the store).

Real etcd (a key prefix per test), no processes of our own: the AgentHub is driven by hand
the way the AgentService stream drives it, so each step is observed on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from graylane.controlplane.api.agent_service import AgentHub, AgentSession
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Cause
from graylane.controlplane.errors import AlreadyExists
from graylane.controlplane.progression.windows import SeriesKey
from graylane.controlplane.store import EtcdStore
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import agent_pb2_grpc
from graylane.v1 import release_pb2 as pb

pytestmark = pytest.mark.etcd

EAST = model.ClusterInfo(name="east", gateway_host="127.0.0.1", gateway_port=7001, agent_id="agent-east")
WEST = model.ClusterInfo(name="west", gateway_host="127.0.0.1", gateway_port=7002, agent_id="agent-west")


def runs(cluster: str, version: str, port: int) -> tuple[model.ClusterEndpoints, ...]:
    return (
        model.ClusterEndpoints(
            service="checkout",
            version=version,
            endpoints=(model.Endpoint(address="127.0.0.1", port=port, cluster=cluster),),
        ),
    )


async def registry(store: EtcdStore) -> None:
    await store.put_service(model.Service(name="checkout", stable_version="v1"))
    for version in ("v1", "v2"):
        await store.put_version(model.Version(service="checkout", name=version))


async def connect(
    hub: AgentHub, info: model.ClusterInfo, endpoints: tuple[model.ClusterEndpoints, ...]
) -> AgentSession:
    """What the AgentService does for one agent: register, attach, store its endpoints."""
    await hub.load_known()
    lease = await hub.store.grant_lease(hub.lease_ttl_seconds)
    await hub.store.register_cluster(info, lease)
    session = AgentSession(info=info, lease=lease, endpoints=endpoints)
    hub.attach(session)
    hub.publish(await hub.store.snapshot())
    hub.endpoints_stored(session, await hub.store.put_cluster_endpoints(info.name, endpoints, lease))
    hub.publish(await hub.store.snapshot())
    return session


async def east_agent_saying(message: apb.AgentMessage) -> AsyncIterator[apb.AgentMessage]:
    """An agent stream of cluster east: its hello, `message`, then open while the test looks."""
    yield apb.AgentMessage(hello=apb.AgentHello(cluster="east", gateway_address="127.0.0.1:9000", agent_id="a1"))
    yield message
    await asyncio.sleep(30)


def views(session: AgentSession) -> list[apb.ClusterView]:
    sent = []
    while not session.outbox.empty():
        sent.append(session.outbox.get_nowait().view)
    return sent


async def test_one_agent_per_cluster_name_and_a_restarted_agent_takes_it_back(store: EtcdStore) -> None:
    lease = await store.grant_lease(5)
    await store.register_cluster(EAST, lease)
    impostor = model.ClusterInfo(name="east", gateway_host="127.0.0.1", gateway_port=7009, agent_id="someone-else")
    with pytest.raises(AlreadyExists, match="served by another agent"):
        await store.register_cluster(impostor, await store.grant_lease(5))
    again = await store.grant_lease(5)
    await store.register_cluster(EAST, again)  # the same agent (after a restart) on a new lease
    await store.revoke_lease(lease)
    assert [c.name for c in (await store.snapshot()).clusters] == ["east"]  # it lives on the new lease
    await store.revoke_lease(again)
    assert (await store.snapshot()).clusters == ()
    assert await store.known_clusters() == frozenset({"east"})  # the lasting record stays


async def test_a_cold_replica_sends_views_at_once(store: EtcdStore) -> None:
    await registry(store)
    hub = AgentHub(store, lease_ttl_seconds=5, settle_seconds=60)
    east = await connect(hub, EAST, runs("east", "v1", 8081))
    assert hub.settled and views(east)


async def test_a_restarted_replica_holds_views_until_every_known_cluster_is_back(store: EtcdStore) -> None:
    await registry(store)
    first = AgentHub(store, lease_ttl_seconds=5)
    for info, version, port in ((EAST, "v1", 8081), (WEST, "v2", 8082)):
        await connect(first, info, runs(info.name, version, port))
    for session in first.sessions.values():
        await store.revoke_lease(session.lease)  # the replica and its leases are gone

    hub = AgentHub(store, lease_ttl_seconds=5, settle_seconds=60)
    east = await connect(hub, EAST, runs("east", "v1", 8081))
    # A view now would send checkout v2 nowhere and, for west, v1 (east's) nowhere either.
    assert not hub.settled and views(east) == []
    west = await connect(hub, WEST, runs("west", "v2", 8082))
    assert hub.settled
    [east_view] = views(east)[-1:]
    [west_view] = views(west)[-1:]
    where = {(e.version, e.via_cluster): [x.port for x in e.endpoints] for e in east_view.view.endpoints}
    assert where == {("v1", ""): [8081], ("v2", "west"): [7002]}
    where = {(e.version, e.via_cluster): [x.port for x in e.endpoints] for e in west_view.view.endpoints}
    assert where == {("v1", "east"): [7001], ("v2", ""): [8082]}


async def test_settling_gives_up_on_a_cluster_that_does_not_come_back(store: EtcdStore) -> None:
    await registry(store)
    lease = await store.grant_lease(5)
    await store.register_cluster(WEST, lease)
    await store.revoke_lease(lease)

    hub = AgentHub(store, lease_ttl_seconds=5, settle_seconds=0.3)
    east = await connect(hub, EAST, runs("east", "v1", 8081))
    assert views(east) == []
    async with asyncio.timeout(5):
        while east.outbox.empty():
            await asyncio.sleep(0.02)
    assert hub.settled
    [view] = views(east)
    # West's v2 runs nowhere now: listed without endpoints, so no lane sends traffic to it.
    assert [(e.version, e.via_cluster, len(e.endpoints)) for e in view.view.endpoints] == [("v1", "", 1), ("v2", "", 0)]


async def test_a_local_guard_action_is_recorded_on_the_release(store: EtcdStore) -> None:
    """An agent that routed a lane to base on its own reports it on reconnect; the release's
    history records it, with the cluster and the reason."""
    plane = ControlPlane(store, api_listen="127.0.0.1:0")
    async with plane.running():
        await store.put_service(model.Service(name="checkout", stable_version="v1"))
        await store.put_version(model.Version(service="checkout", name="v2"))
        spec = model.spec_from_proto(
            pb.ReleaseSpec(
                lane="checkout-v2",
                entry="checkout",
                services=[pb.ServiceVersions(service="checkout", base_version="v1", gray_version="v2")],
                batches=[pb.Batch(weight=10)],
            )
        )
        await plane.releases.create("rel", spec, Cause(actor="test"))
        guard = apb.GuardReport(lanes=["checkout-v2"], reason="error rate 12 % above the abort threshold")
        guard.at.GetCurrentTime()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect(east_agent_saying(apb.AgentMessage(guard=guard)))
            async with asyncio.timeout(10):
                while not [e for e in await store.history("rel") if e.action == "guard"]:
                    await asyncio.sleep(0.05)
            call.cancel()
    event = next(e for e in await store.history("rel") if e.action == "guard")
    assert event.actor == "graylane/agent/east" and event.details["cluster"] == "east"
    assert "error rate 12 %" in event.reason


async def test_an_agents_metrics_reach_every_replica_whichever_it_is_connected_to(store: EtcdStore) -> None:
    """The leader judges releases on its own metrics windows: an agent connected to another
    replica must reach them too (shared through etcd), and a new leader has their history."""
    first = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None)
    second = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None)
    async with first.running(), second.running():
        report = apb.MetricsReport(
            interval_seconds=1.0,
            series=[apb.SeriesDelta(service="checkout", version="v2", lane="gray", requests=40, errors=3)],
        )
        report.at.GetCurrentTime()

        def east(plane: ControlPlane) -> list[SeriesKey]:
            return [k for k in plane.windows.keys() if k.cluster == "east"]

        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.api_port}") as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect(east_agent_saying(apb.AgentMessage(metrics=report)))
            async with asyncio.timeout(10):
                while not (east(second) and east(first)):
                    await asyncio.sleep(0.05)
            call.cancel()
        key = SeriesKey("checkout", "v2", "gray", "east")
        for plane in (first, second):
            assert east(plane) == [key]
            window = plane.windows.window(key, 0, time.time() + 1)
            assert (window.requests, window.errors) == (40, 3)  # filed once on each replica
