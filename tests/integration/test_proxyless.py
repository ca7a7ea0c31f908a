"""Issue 15 end to end: proxyless gRPC clients routed by the same releases as Envoy.

Real parts only: a real etcd, the real control plane, real grpc.aio greeter servers (one
child process hosting every version), and two independent xDS clients, each in its own
process with a bootstrap pointing at the control plane: grpcio's own xDS resolver
(Python) and @grpc/grpc-js-xds (Node). Neither is told anything but `xds:///<service>`.

A missing node or @grpc/grpc-js-xds (`make node`) skips the Node parts on a developer
machine and fails them under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.store import EtcdStore
from graylane.deploy.demo.greeter import ClientProcess, GreeterProcess, ServerSpec, node_binary, node_modules
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE

from tests.conftest import require_binary
from tests.integration.conftest import binomial_bound

pytestmark = pytest.mark.etcd

LANE = "greeter-v2"


def share(result: dict[str, Any], path: str) -> float:
    return float(result["paths"].get(path, 0)) / max(result["ok"], 1)


def require_node() -> None:
    require_binary(node_binary(), "node is missing: apt-get install nodejs npm (make node)")
    require_binary(str(node_modules() or ""), "@grpc/grpc-js-xds is missing: make node")


@dataclass
class Plane:
    plane: ControlPlane
    stub: api_grpc.ReleaseServiceStub

    @property
    def xds_port(self) -> int:
        return self.plane.xds_port

    async def register(self, service: str, ports: dict[str, int], versions: tuple[str, ...] = ("v1", "v2")) -> None:
        await self.stub.PutService(api.PutServiceRequest(service=pb.Service(name=service, stable_version="v1")))
        for version in versions:
            endpoint = pb.Endpoint(address="127.0.0.1", port=ports[f"{service}:{version}"])
            await self.stub.PutVersion(
                api.PutVersionRequest(version=pb.Version(service=service, name=version, endpoints=[endpoint]))
            )

    async def act(self, call: Callable[..., Awaitable[pb.Release]], name: str = "rel") -> pb.Release:
        return await call(api.ActionRequest(name=name, actor="test"))

    async def until(self, pred: Callable[[pb.Release], bool], name: str = "rel", timeout: float = 15) -> pb.Release:
        async with asyncio.timeout(timeout):
            while True:
                r = await self.stub.GetRelease(api.GetReleaseRequest(name=name))
                if pred(r):
                    return r
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_plane(store: EtcdStore) -> AsyncIterator[Plane]:
    async with ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0").running() as plane:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
            yield Plane(plane, api_grpc.ReleaseServiceStub(channel))


def greeter_spec(batches: tuple[int, ...], rules: list[pb.MatchRule] | None = None) -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane=LANE,
        entry="greeter",
        services=[pb.ServiceVersions(service="greeter", base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        match=rules or [],
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in batches],
    )


CANARY_RULE = pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-canary", op=pb.EXACT, value="always")])
# A gRPC call has no query string: a rule on one must never match it (grpc-js would read
# a route with query_parameters as matching every call).
QUERY_RULE = pb.MatchRule(conditions=[pb.Condition(kind=pb.QUERY, name="preview", op=pb.PRESENT)])


# How far a client's split strays beyond a binomial one's, as a factor on its bound. grpcio
# (C-core) spread wider than independent picks would: over 12 runs of 1,000 calls, its share's
# standard deviation was 1.55x the binomial one at 10 % and 1.23x at 50 % (grpc-js: within it),
# so a 99.9 % binomial bound failed one run in a few dozen with nothing wrong.
_SPREAD = {"python": 2.0, "node": 1.0}


async def test_split_rule_and_rollback_reach_python_and_node_clients_with_no_failed_call(store: EtcdStore) -> None:
    require_node()
    async with contextlib.AsyncExitStack() as es:
        p = await es.enter_async_context(running_plane(store))
        servers = [ServerSpec(s, v) for s in ("greeter", "other") for v in ("v1", "v2")]
        greeters = await es.enter_async_context(GreeterProcess(servers, xds_port=p.xds_port))
        # Two services: a client subscribes to one route config of several (a part of the
        # set), which convergence must still recognise.
        await p.register("greeter", greeters.ports)
        await p.register("other", greeters.ports)
        clients = [
            await es.enter_async_context(ClientProcess("python", "xds:///greeter", xds_port=p.xds_port, node_id="py")),
            await es.enter_async_context(ClientProcess("node", "xds:///greeter", xds_port=p.xds_port, node_id="js")),
            # The xdstp form of the listener name (bootstrap template), same routes.
            await es.enter_async_context(
                ClientProcess("python", "xds:///greeter", xds_port=p.xds_port, node_id="py-xdstp", xdstp=True)
            ),
        ]
        for client in clients:
            await client.ready()
        for client in clients:
            before = await client.calls(100)
            assert before["failed"] == 0 and before["paths"] == {"greeter:v1": 100}, (client.kind, before)

        # Background calls on every client across the whole rollout: none may fail.
        for client in clients:
            await client.send({"op": "start", "concurrency": 2})

        spec = greeter_spec((10, 50), [QUERY_RULE, CANARY_RULE])
        await p.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
        for weight in (10, 50):
            r = await p.act(p.stub.NextBatch)
            r = await p.until(lambda r: r.status.reached and r.status.weight == weight)  # noqa: B023
            # Every proxyless client's ACK counts (the greeter servers make no xDS calls).
            assert (r.status.convergence.proxies, r.status.convergence.converged) == (3, 3), r.status
            for client in clients:
                result = await client.calls(1000, concurrency=16)
                assert result["failed"] == 0, (client.kind, result)
                got = share(result, "greeter:v2")
                bound = binomial_bound(result["ok"], weight / 100) * _SPREAD[client.kind]
                assert abs(got - weight / 100) <= bound, (client.kind, weight, got)

        # The rule: every matching call joins the lane (read as Envoy reads it).
        for client in clients:
            ruled = await client.calls(200, metadata=[("x-canary", "always")])
            assert ruled["failed"] == 0 and ruled["paths"] == {"greeter:v2": 200}, (client.kind, ruled)
            other = await client.calls(200, metadata=[("x-canary", "never")])
            assert set(other["paths"]) == {"greeter:v1", "greeter:v2"}, (client.kind, other)

        await p.act(p.stub.Rollback)
        r = await p.until(lambda r: r.status.phase == pb.ROLLED_BACK and r.status.reached)
        assert r.status.convergence.converged == 3
        for client in clients:
            after = await client.calls(300, metadata=[("x-canary", "always")])
            assert after["failed"] == 0 and after["paths"] == {"greeter:v1": 300}, (client.kind, after)

        for client in clients:
            steady = await client.send({"op": "stop"})
            assert steady["ok"] > 0 and steady["failed"] == 0, (client.kind, steady)


async def test_lane_runs_a_to_b_to_c_across_grpc_hops_with_gray_b(store: EtcdStore) -> None:
    require_node()
    async with contextlib.AsyncExitStack() as es:
        p = await es.enter_async_context(running_plane(store))
        servers = [
            ServerSpec("a", "v1", next_hop="b"),
            ServerSpec("b", "v1", next_hop="c"),
            # The gray version knows its lane: calls the split sends it arrive untagged.
            ServerSpec("b", "v2", next_hop="c", own_lane=LANE),
            ServerSpec("c", "v1"),
        ]
        greeters = await es.enter_async_context(GreeterProcess(servers, xds_port=p.xds_port))
        await p.register("a", greeters.ports, ("v1",))
        await p.register("b", greeters.ports)
        await p.register("c", greeters.ports, ("v1",))
        spec = pb.ReleaseSpec(
            lane=LANE,
            entry="b",
            services=[pb.ServiceVersions(service="b", base_version="v1", gray_version="v2")],
            strategy=pb.CANARY,
            batches=[pb.Batch(weight=50, pause=pb.Pause(manual=True))],
        )
        await p.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
        await p.act(p.stub.NextBatch)
        clients = [
            await es.enter_async_context(ClientProcess("python", "xds:///a", xds_port=p.xds_port, node_id="py")),
            await es.enter_async_context(ClientProcess("node", "xds:///a", xds_port=p.xds_port, node_id="js")),
        ]
        for client in clients:
            await client.ready()
        # The greeters' own channels (to b, to c: grpcio opens one xDS stream per target)
        # are proxyless clients too, and count.
        r = await p.until(lambda r: r.status.reached and r.status.convergence.proxies >= 4)
        assert r.status.convergence.converged == r.status.convergence.proxies

        lane_path = f"a:v1@{LANE}>b:v2@{LANE}>c:v1@{LANE}"
        for client in clients:
            for carrier in ([("x-graylane", LANE)], [("baggage", f"k=v,graylane={LANE}")]):
                tagged = await client.calls(100, metadata=carrier)
                assert tagged["failed"] == 0 and tagged["paths"] == {lane_path: 100}, (client.kind, carrier, tagged)
            # Untagged: split at b (the entry); b:v2 stamps its lane for c, b:v1 does not.
            untagged = await client.calls(400, concurrency=16)
            assert untagged["failed"] == 0, (client.kind, untagged)
            assert set(untagged["paths"]) == {"a:v1>b:v1>c:v1", f"a:v1>b:v2@{LANE}>c:v1@{LANE}"}, untagged
            assert abs(share(untagged, "a:v1>b:v1>c:v1") - 0.5) <= binomial_bound(untagged["ok"], 0.5)


# ------------------------------------------------------------------ a scripted gRPC client


class ScriptedGrpcClient:
    """An ADS client that presents itself as gRPC does (node, user agent, client feature)
    and subscribes as gRPC does, by name: LDS, then RDS, CDS and EDS for the names each
    answer gives. It ACKs everything, except that `reject` decides which RDS responses it
    NACKs: a stand-in for a client that objects to a configuration (no valid release found
    yields one real gRPC clients reject)."""

    def __init__(self, port: int, node_id: str, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.node = base_pb2.Node(id=node_id, user_agent_name="gRPC Python")
        self.node.client_features.append("envoy.lb.does_not_support_overprovisioning")
        self.names: dict[str, list[str]] = {LISTENER: [target], ROUTE: [], CLUSTER: [], ENDPOINT: []}
        self.held: dict[str, dict[str, Any]] = {t: {} for t in self.names}
        self.order: list[str] = []  # type of each response, in order
        self.reject: Callable[[discovery_pb2.DiscoveryResponse], bool] = lambda _r: False
        self._queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ScriptedGrpcClient:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task
        await self.channel.close()

    def _request(self, type_url: str, *, version: str = "", nonce: str = "", error: str = "") -> None:
        request = discovery_pb2.DiscoveryRequest(
            node=self.node, type_url=type_url, resource_names=self.names[type_url], version_info=version
        )
        request.response_nonce = nonce
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._queue.put_nowait(request)

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await self._queue.get()

    async def _run(self) -> None:
        from envoy.config.cluster.v3 import cluster_pb2
        from envoy.config.listener.v3 import listener_pb2
        from envoy.config.route.v3 import route_pb2
        from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._request(LISTENER)
        versions: dict[str, str] = {}
        async for response in stub.StreamAggregatedResources(self._requests()):
            t = response.type_url
            self.order.append(t)
            if t == ROUTE and self.reject(response):
                self._request(t, version=versions.get(t, ""), nonce=response.nonce, error="rejected by the script")
                continue
            versions[t] = response.version_info
            wanted: dict[str, list[str]] = {}
            for packed in response.resources:
                if t == LISTENER:
                    listener = listener_pb2.Listener()
                    packed.Unpack(listener)
                    manager = hcm.HttpConnectionManager()
                    listener.api_listener.api_listener.Unpack(manager)
                    self.held[t][listener.name] = listener
                    wanted.setdefault(ROUTE, []).append(manager.rds.route_config_name)
                elif t == ROUTE:
                    rc = route_pb2.RouteConfiguration()
                    packed.Unpack(rc)
                    self.held[t][rc.name] = rc
                    for route in rc.virtual_hosts[0].routes:
                        action = route.route
                        names = [w.name for w in action.weighted_clusters.clusters] or [action.cluster]
                        wanted.setdefault(CLUSTER, []).extend(names)
                elif t == CLUSTER:
                    cluster = cluster_pb2.Cluster()
                    packed.Unpack(cluster)
                    self.held[t][cluster.name] = cluster
                    wanted.setdefault(ENDPOINT, []).append(cluster.eds_cluster_config.service_name)
                else:
                    self.held[t][packed.type_url] = packed
            self._request(t, version=response.version_info, nonce=response.nonce)
            for next_type, names in wanted.items():
                merged = sorted(set(self.names[next_type]) | set(names)) if t == ROUTE else sorted(set(names))
                if next_type == ENDPOINT:
                    merged = sorted(set(self.names[ENDPOINT]) | set(names))
                if merged != self.names[next_type]:
                    self.names[next_type] = merged
                    self._request(next_type, version=versions.get(next_type, ""))


async def test_grpc_subscription_order_gets_its_listener_and_a_nack_pauses_naming_the_client(store: EtcdStore) -> None:
    async with contextlib.AsyncExitStack() as es:
        p = await es.enter_async_context(running_plane(store))
        greeters = await es.enter_async_context(
            GreeterProcess([ServerSpec("greeter", "v1"), ServerSpec("greeter", "v2")], xds_port=p.xds_port)
        )
        await p.register("greeter", greeters.ports)
        client = await es.enter_async_context(ScriptedGrpcClient(p.xds_port, "scripted-grpc", "greeter"))
        # LDS -> RDS -> CDS -> EDS by name: the listener and its routes come without any
        # cluster ACKed first, and every cluster a route names is there when asked for.
        async with asyncio.timeout(10):
            while not (client.held[LISTENER] and client.held[ROUTE] and client.held[CLUSTER] and client.held[ENDPOINT]):
                await asyncio.sleep(0.02)
        # (An LDS answer may come first without the listener, while the view catches up with
        # the registration: the client then waits for it, as gRPC does.)
        assert client.order.index(ROUTE) < client.order.index(CLUSTER), client.order

        await p.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=greeter_spec((10, 50))))
        await p.act(p.stub.NextBatch)
        r = await p.until(lambda r: r.status.reached and r.status.weight == 10)
        assert (r.status.convergence.proxies, r.status.convergence.converged) == (1, 1)
        # Every cluster the held routes name is held, with its endpoints.
        rc = client.held[ROUTE]["graylane/greeter"]
        named = {w.name for route in rc.virtual_hosts[0].routes for w in route.route.weighted_clusters.clusters}
        assert f"greeter|v2|{LANE}" in named and named <= client.held[CLUSTER].keys()

        client.reject = lambda _response: True
        await p.act(p.stub.NextBatch)
        paused = await p.until(lambda r: r.status.phase == pb.PAUSED)
        assert paused.status.last_nack.node == "scripted-grpc"
        assert "rejected by the script" in paused.status.last_nack.message
        assert "scripted-grpc" in paused.status.reason
        # Held where the client last accepted it: the 10 % batch.
        assert paused.status.served_weight == 10, paused.status


async def test_a_cohort_stays_in_the_lane_as_the_batch_grows_on_proxyless_clients(store: EtcdStore) -> None:
    require_node()
    async with contextlib.AsyncExitStack() as es:
        p = await es.enter_async_context(running_plane(store))
        greeters = await es.enter_async_context(
            GreeterProcess([ServerSpec("greeter", "v1"), ServerSpec("greeter", "v2")], xds_port=p.xds_port)
        )
        await p.register("greeter", greeters.ports)
        spec = greeter_spec((10, 50))
        spec.cohort.CopyFrom(pb.Cohort(header="x-user-id"))
        await p.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
        clients = [
            await es.enter_async_context(ClientProcess("python", "xds:///greeter", xds_port=p.xds_port, node_id="py")),
            await es.enter_async_context(ClientProcess("node", "xds:///greeter", xds_port=p.xds_port, node_id="js")),
        ]
        for client in clients:
            await client.ready()
        keys = [f"user-{i}" for i in range(300)]
        in_lane: dict[str, set[str]] = {}
        for weight in (10, 50):
            await p.act(p.stub.NextBatch)
            await p.until(lambda r: r.status.reached and r.status.weight == weight)  # noqa: B023
            for client in clients:
                command = {"op": "keyed", "header": "x-user-id", "keys": keys, "concurrency": 8}
                first, again = await client.send(command), await client.send(command)
                assert first["failed"] == again["failed"] == 0, (client.kind, first["errors"], again["errors"])
                for result in (first, again):
                    gray = {k for k, path in result["by_key"].items() if path == "greeter:v2"}
                    got = len(gray) / len(keys)
                    # (+0.02: the share of the ring the lane's points hold, besides sampling)
                    assert abs(got - weight / 100) <= binomial_bound(len(keys), weight / 100) + 0.02, (client.kind, got)
                if client.kind == "node":
                    continue  # split at random: its ring-hash picks can stall (see render._RING_CLIENTS)
                # A key's calls go to one version...
                assert first["by_key"] == again["by_key"], client.kind
                # ...and a key in the lane at 10 % is in it at 50 %.
                if client.kind in in_lane:
                    assert in_lane[client.kind] <= gray, (client.kind, sorted(in_lane[client.kind] - gray))
                in_lane[client.kind] = gray
