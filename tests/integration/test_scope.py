"""Issue 13: proxies scoped to some of their cluster's services, end to end — a real etcd,
real Envoys (a scoped token; a scoped client certificate from `graylane certs` over mTLS
ADS; behind an agent's relay) and scripted ADS clients asking by name for what their
scope leaves out. A scoped proxy is served its services only, counts for releases of its
services only, and a release of its services waits for its ACK."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from graylane.controlplane.api.certs import make_local_certs
from graylane.controlplane.api.proxyauth import TOKEN_METADATA, xds_authenticator
from graylane.controlplane.api.tls import open_channel
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.lifecycle import cancel_and_wait
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.options import XdsCredential
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import run_load
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc
from graylane.xds.plan import route_clusters
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE

from tests.integration.conftest import east_agent, eventually, lane_spec, poll_release, register

from .test_tls import client, envoy_tls, server_tls

pytestmark = [pytest.mark.etcd, pytest.mark.envoy]

SERVICES = ("checkout", "search")
CHECKOUT_TOKEN = "checkout-only-token-0123456789"
WHOLE_TOKEN = "whole-cluster-token-0123456789"
BOTH_TOKEN = "checkout-and-search-token-0123456789"
TOKENS = (
    XdsCredential("local", None, CHECKOUT_TOKEN, frozenset({"checkout"})),
    XdsCredential("local", None, BOTH_TOKEN, frozenset(SERVICES)),
    XdsCredential("local", None, WHOLE_TOKEN),
    # Client certificates of cluster local: checkout only (no certificate extension needed).
    XdsCredential("local", None, "", frozenset({"checkout"})),
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    make_local_certs(directory, clusters=["local", "east"], users=["admin"])
    return directory


@contextlib.asynccontextmanager
async def scoped_plane(store: EtcdStore, certs: Path | None = None) -> AsyncIterator[tuple[ControlPlane, Any]]:
    """A control plane whose proxies prove themselves with TOKENS (and, with `certs`, client
    certificates over mutual TLS), with checkout and search registered (v1 and v2 each)."""
    async with contextlib.AsyncExitStack() as es:
        ups = {
            (s, v): await es.enter_async_context(Upstream(s, v)) for s in ("checkout", "search") for v in ("v1", "v2")
        }
        plane = ControlPlane(
            store,
            api_listen="127.0.0.1:0",
            xds_listen="127.0.0.1:0",
            tls=server_tls(certs) if certs is not None else None,
            xds_auth=xds_authenticator(cluster="local", tokens=TOKENS, mutual=certs is not None),
        )
        await es.enter_async_context(plane.running())
        tls = client(certs, "user-admin") if certs is not None else None
        channel = await es.enter_async_context(open_channel(f"127.0.0.1:{plane.api_port}", tls))
        stub = api_grpc.ReleaseServiceStub(channel)
        for s in SERVICES:
            await register(stub, s, ups[(s, "v1")], ups[(s, "v2")])
        await eventually(lambda: services_in_view(plane), what="the services in the control plane's view")
        yield plane, stub


def services_in_view(plane: ControlPlane) -> bool:
    view = plane.dataplane.view
    return view is not None and {s.name for s in view.services} == set(SERVICES)


async def config_dump(proxy: EnvoyProcess) -> str:
    status, body = await proxy.admin_get("/config_dump")
    assert status == 200
    return body


async def holds_checkout_only(proxy: EnvoyProcess) -> None:
    async def loaded() -> bool:
        dump = await config_dump(proxy)
        return "checkout|v1" in dump and "graylane/checkout" in dump

    await eventually(loaded, what="checkout's configuration in the Envoy")
    dump = await config_dump(proxy)
    assert "search|" not in dump and "graylane/search" not in dump, "search leaked into a checkout-only proxy"


async def search_finds_no_route(proxy: EnvoyProcess) -> None:
    result = await run_load(proxy.listen_port, authority="search", count=20, max_seconds=10)
    assert result.statuses == {404: 20}, (result.statuses, result.errors)


async def walk_to(stub: Any, name: str, weight: int) -> pb.Release:
    while True:
        release = await stub.GetRelease(api.GetReleaseRequest(name=name))
        if release.status.weight >= weight:
            return await poll_release(stub, name, lambda r: r.status.reached and r.status.weight == weight)
        await stub.NextBatch(api.ActionRequest(name=name))
        await poll_release(stub, name, lambda r: r.status.reached)


async def releases_reach_with_a_scoped_proxy(stub: Any, proxy: EnvoyProcess) -> None:
    """Checkout's release is carried by the checkout-only proxy and serves its split there;
    search's reaches with that proxy connected, not counting it."""
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="shop", spec=lane_spec("checkout", "shop")))
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="find", spec=lane_spec("search", "find")))
    before = await run_load(proxy.listen_port, authority="checkout", count=40, max_seconds=10)
    assert before.versions == {"v1": 40}, (before.statuses, before.errors)
    shop = await walk_to(stub, "shop", 100)
    assert shop.status.convergence.proxies == shop.status.convergence.converged == 1
    after = await run_load(proxy.listen_port, authority="checkout", count=40, max_seconds=10)
    assert after.versions == {"v2": 40}, (after.statuses, after.errors)
    find = await walk_to(stub, "find", 10)
    assert find.status.reached and find.status.convergence.proxies == 0
    await search_finds_no_route(proxy)
    await holds_checkout_only(proxy)


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_an_envoy_with_a_scoped_token_is_served_its_services_only(
    store: EtcdStore, envoy: Any, protocol: str
) -> None:
    async with scoped_plane(store) as (plane, stub):
        proxy: EnvoyProcess = await envoy(
            ads_port=plane.xds_port,
            protocol=protocol,
            node_id="shop-envoy",
            node_cluster="local",
            xds_token=CHECKOUT_TOKEN,
        )
        await holds_checkout_only(proxy)
        await search_finds_no_route(proxy)
        await releases_reach_with_a_scoped_proxy(stub, proxy)
        (status,) = plane.tracker.of_node("shop-envoy")
        assert status.key.endswith("@checkout") and TOKEN_METADATA not in status.metadata


async def test_an_envoy_with_a_scoped_certificate_over_mtls_ads_is_served_its_services_only(
    store: EtcdStore, envoy: Any, certs: Path
) -> None:
    async with scoped_plane(store, certs) as (plane, stub):
        proxy: EnvoyProcess = await envoy(
            ads_port=plane.xds_port, node_id="mtls-shop", node_cluster="local", tls=envoy_tls(certs)
        )
        await holds_checkout_only(proxy)
        await releases_reach_with_a_scoped_proxy(stub, proxy)


async def test_an_agents_relay_serves_a_scoped_envoy_its_services_only(
    store: EtcdStore, envoy: Any, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as es:
        ups = {
            (s, v): await es.enter_async_context(Upstream(s, v)) for s in ("checkout", "search") for v in ("v1", "v2")
        }
        plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0")
        await es.enter_async_context(plane.running())
        channel = await es.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}"))
        stub = api_grpc.ReleaseServiceStub(channel)
        for s in SERVICES:
            await register(stub, s, ups[(s, "v1")], ups[(s, "v2")])
        agent = await east_agent(
            es,
            plane.api_port,
            tmp_path,
            ups.values(),
            xds_tokens=(XdsCredential("east", "east-shop", CHECKOUT_TOKEN, frozenset({"checkout"})),),
        )
        proxy: EnvoyProcess = await envoy(
            ads_port=agent.xds_port, node_id="east-shop", node_cluster="east", xds_token=CHECKOUT_TOKEN
        )
        await holds_checkout_only(proxy)
        await search_finds_no_route(proxy)
        await releases_reach_with_a_scoped_proxy(stub, proxy)
        (reported,) = agent.relay.report().proxies
        assert list(reported.scope) == ["checkout"] and reported.view_version == agent.relay.version


# ------------------------------------------------------------------ scripted ADS clients


def node(node_id: str, token: str, listen_port: int = 10000) -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster="local", user_agent_name="envoy")
    n.metadata.fields[TOKEN_METADATA].string_value = token
    n.metadata.fields["listen_port"].string_value = str(listen_port)
    return n


def names_in(resources: Any, message_type: Any) -> set[str]:
    found = set()
    for packed in resources:
        message = message_type()
        packed.Unpack(message)
        found.add(getattr(message, "name", "") or getattr(message, "cluster_name", ""))
    return found


def ack(response: discovery_pb2.DiscoveryResponse, names: list[str] | None = None) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(
        type_url=response.type_url,
        version_info=response.version_info,
        response_nonce=response.nonce,
        resource_names=names or [],
    )


class SotwClient:
    """A scripted SotW ADS client: subscribes like an Envoy (clusters, listeners, scopes as
    wildcards; load assignments and route configs by name) and ACKs every response, except
    route configs while `hold_routes` is set (it then keeps the last one unACKed)."""

    def __init__(self, port: int, node: base_pb2.Node) -> None:
        self._queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._node = node
        self.held: discovery_pb2.DiscoveryResponse | None = None
        self.hold_routes = False
        self.received: dict[str, discovery_pb2.DiscoveryResponse] = {}
        self._subscribed: dict[str, list[str]] = {}  # type -> names (EDS, RDS)
        self.acked: dict[str, str] = {}  # type -> the version last ACKed
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SotwClient:
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel).StreamAggregatedResources(
            self._requests()
        )
        first = True
        for type_url in (CLUSTER, LISTENER, SCOPED_ROUTE):
            request = discovery_pb2.DiscoveryRequest(type_url=type_url)
            if first:
                request.node.CopyFrom(self._node)
                first = False
            self._queue.put_nowait(request)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._call.cancel()
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._channel.close()

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await self._queue.get()

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: list[str] | None = None) -> None:
        self.acked[response.type_url] = response.version_info
        request = discovery_pb2.DiscoveryRequest(
            type_url=response.type_url, version_info=response.version_info, response_nonce=response.nonce
        )
        if names is not None:
            request.resource_names.extend(sorted(names))
        self._queue.put_nowait(request)

    def ask(self, type_url: str, names: list[str], response: discovery_pb2.DiscoveryResponse | None) -> None:
        self._subscribed[type_url] = names
        self._queue.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                resource_names=sorted(names),
                version_info=response.version_info if response is not None else "",
                response_nonce=response.nonce if response is not None else "",
            )
        )

    async def _read(self) -> None:
        async for response in self._call:
            self.received[response.type_url] = response
            if response.type_url == CLUSTER:
                self.ack(response)
                eds = sorted(names_in(response.resources, cluster_pb2.Cluster))
                self.ask(ENDPOINT, eds, self.received.get(ENDPOINT))
            elif response.type_url == SCOPED_ROUTE:
                self.ack(response)
                routes = set()
                for packed in response.resources:
                    scope = scoped_route_pb2.ScopedRouteConfiguration()
                    packed.Unpack(scope)
                    routes.add(scope.route_configuration_name)
                self.ask(ROUTE, sorted(routes), self.received.get(ROUTE))
            elif response.type_url == ROUTE and self.hold_routes:
                self.held = response
            else:
                self.ack(response, self._names(response.type_url))

    def _names(self, type_url: str) -> list[str] | None:
        return None if type_url in (CLUSTER, LISTENER, SCOPED_ROUTE) else self._subscribed.get(type_url)

    def release_held(self) -> None:
        if self.held is not None:
            self.ack(self.held, self._names(ROUTE))
            self.held = None

    def nack_held(self, message: str) -> None:
        """Reject the held route configs, keeping the ones ACKed before (as Envoy does)."""
        assert self.held is not None
        accepted = self.acked.get(ROUTE, "")
        request = discovery_pb2.DiscoveryRequest(
            type_url=ROUTE,
            version_info=accepted,
            response_nonce=self.held.nonce,
            resource_names=self._names(ROUTE) or [],
            error_detail=status_pb2.Status(code=3, message=message),
        )
        self._queue.put_nowait(request)
        self.held = None


async def test_a_scoped_client_asking_by_name_for_another_services_resources_gets_nothing(store: EtcdStore) -> None:
    async with scoped_plane(store) as (plane, _stub):
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(grpc.aio.insecure_channel(f"127.0.0.1:{plane.xds_port}"))
        asked = ["checkout|v1", "search|v1", "search|v2"]
        # SotW: the proxy names search's load assignments and route config.
        call = stub.StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(node=node("sotw-spy", CHECKOUT_TOKEN), type_url=CLUSTER))
        clusters = await asyncio.wait_for(call.read(), 10)
        assert names_in(clusters.resources, cluster_pb2.Cluster) == {"checkout|v1"}
        await call.write(ack(clusters))
        await call.write(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=asked))
        eds = await asyncio.wait_for(call.read(), 10)
        assert eds.type_url == ENDPOINT
        assert names_in(eds.resources, endpoint_pb2.ClusterLoadAssignment) == {"checkout|v1"}
        await call.write(ack(eds, asked))  # (routes go once their clusters are ACKed)
        await call.write(
            discovery_pb2.DiscoveryRequest(type_url=ROUTE, resource_names=["graylane/search", "graylane/checkout"])
        )
        rds = await asyncio.wait_for(call.read(), 10)
        assert names_in(rds.resources, route_pb2.RouteConfiguration) == {"graylane/checkout"}
        assert b"search" not in b"".join(r.SerializeToString() for r in (clusters, eds, rds))
        call.cancel()
        # Delta: the same names, subscribed to.
        dcall = stub.DeltaAggregatedResources()
        await dcall.write(discovery_pb2.DeltaDiscoveryRequest(node=node("delta-spy", CHECKOUT_TOKEN), type_url=CLUSTER))
        got = await asyncio.wait_for(dcall.read(), 10)
        assert got.type_url == CLUSTER and [r.name for r in got.resources] == ["checkout|v1"]
        await dcall.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=got.nonce))
        await dcall.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=asked))
        got = await asyncio.wait_for(dcall.read(), 10)
        assert got.type_url == ENDPOINT and [r.name for r in got.resources] == ["checkout|v1"]
        await dcall.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, response_nonce=got.nonce))
        await dcall.write(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=ROUTE, resource_names_subscribe=["graylane/search", "graylane/checkout"]
            )
        )
        got = await asyncio.wait_for(dcall.read(), 10)
        assert got.type_url == ROUTE and [r.name for r in got.resources] == ["graylane/checkout"]
        assert b"search" not in b"".join(r.resource.SerializeToString() for r in got.resources)
        dcall.cancel()
        # The same client unscoped (another token) is told of search: the scope did it.
        call = stub.StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(node=node("whole", WHOLE_TOKEN), type_url=CLUSTER))
        clusters = await asyncio.wait_for(call.read(), 10)
        assert names_in(clusters.resources, cluster_pb2.Cluster) == {"checkout|v1", "search|v1"}
        call.cancel()


@contextlib.asynccontextmanager
async def shop_and_find_held(store: EtcdStore, node_id: str) -> AsyncIterator[tuple[Any, SotwClient]]:
    """`scoped_plane` with release shop (of checkout) and find (of search) applied, and a
    scripted proxy `node_id` scoped to checkout that ACKed its routes and now holds new
    ones unACKed: the API stub and the proxy."""
    async with scoped_plane(store) as (plane, stub):
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="shop", spec=lane_spec("checkout", "shop")))
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="find", spec=lane_spec("search", "find")))
        async with SotwClient(plane.xds_port, node(node_id, CHECKOUT_TOKEN)) as proxy:
            await eventually(lambda: plane.dataplane.proxies_current(), what="the scripted proxy ACKing its routes")
            proxy.hold_routes = True
            yield stub, proxy


async def test_a_release_waits_for_a_scoped_proxy_only_when_it_touches_its_services(store: EtcdStore) -> None:
    async with shop_and_find_held(store, "scripted-shop") as (stub, proxy):
        # Search is outside its scope: reached while it is connected (and never counted).
        await stub.NextBatch(api.ActionRequest(name="find"))
        find = await poll_release(stub, "find", lambda r: r.status.reached and r.status.weight == 10)
        assert find.status.convergence.proxies == 0
        # Checkout is in its scope: its new routes are pushed, not ACKed: not reached.
        await stub.NextBatch(api.ActionRequest(name="shop"))
        await eventually(lambda: proxy.held is not None, what="checkout's new routes pushed")
        shop = await poll_release(stub, "shop", lambda r: r.status.weight == 10 and r.status.convergence.proxies == 1)
        assert not shop.status.reached and shop.status.convergence.converged == 0
        assert any("scripted-shop" in lag for lag in shop.status.convergence.lagging), shop.status.convergence
        # Another search batch still reaches meanwhile: the held proxy does not block it.
        await stub.NextBatch(api.ActionRequest(name="find"))
        await poll_release(stub, "find", lambda r: r.status.reached and r.status.weight == 50)
        assert not (await stub.GetRelease(api.GetReleaseRequest(name="shop"))).status.reached
        # Its ACK reaches the release.
        proxy.hold_routes = False
        proxy.release_held()
        shop = await poll_release(stub, "shop", lambda r: r.status.reached and r.status.weight == 10)
        assert shop.status.convergence.proxies == shop.status.convergence.converged == 1


class ProxylessClient(SotwClient):
    """A scripted proxyless gRPC client: asks for listeners by name (its channel targets),
    then for the route configs, clusters and load assignments they name, and ACKs each."""

    def __init__(self, port: int, node: base_pb2.Node, targets: list[str]) -> None:
        super().__init__(port, node)
        self._targets = targets

    async def __aenter__(self) -> SotwClient:
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel).StreamAggregatedResources(
            self._requests()
        )
        request = discovery_pb2.DiscoveryRequest(type_url=LISTENER, resource_names=self._targets)
        request.node.CopyFrom(self._node)
        self._subscribed[LISTENER] = self._targets
        self._queue.put_nowait(request)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for response in self._call:
            self.received[response.type_url] = response
            self.ack(response, self._subscribed.get(response.type_url))
            if response.type_url == LISTENER:
                routes = set()
                for packed in response.resources:
                    listener = listener_pb2.Listener()
                    packed.Unpack(listener)
                    manager = hcm_pb2.HttpConnectionManager()
                    listener.api_listener.api_listener.Unpack(manager)
                    routes.add(manager.rds.route_config_name)
                self.ask(ROUTE, sorted(routes), self.received.get(ROUTE))
            elif response.type_url == ROUTE:
                clusters: set[str] = set()
                for packed in response.resources:
                    config = route_pb2.RouteConfiguration()
                    packed.Unpack(config)
                    clusters |= route_clusters(config)
                if sorted(clusters) != self._subscribed.get(CLUSTER):
                    self.ask(CLUSTER, sorted(clusters), self.received.get(CLUSTER))
            elif response.type_url == CLUSTER:
                names = sorted(names_in(response.resources, cluster_pb2.Cluster))
                if names != self._subscribed.get(ENDPOINT):
                    self.ask(ENDPOINT, names, self.received.get(ENDPOINT))

    def _names(self, type_url: str) -> list[str] | None:
        return self._subscribed.get(type_url)


async def test_a_scoped_proxyless_client_gets_its_services_and_carries_their_releases(store: EtcdStore) -> None:
    async with scoped_plane(store) as (plane, stub):
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="shop", spec=lane_spec("checkout", "shop")))
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="find", spec=lane_spec("search", "find")))
        grpc_node = node("grpc-shop", CHECKOUT_TOKEN)
        grpc_node.user_agent_name = "gRPC Python"
        async with ProxylessClient(plane.xds_port, grpc_node, ["checkout", "search"]) as client:
            await eventually(lambda: ENDPOINT in client.received, what="the proxyless client configured")
            assert names_in(client.received[LISTENER].resources, listener_pb2.Listener) == {"checkout"}
            (status,) = plane.tracker.of_node("grpc-shop")
            assert status.key == "proxyless@checkout"
            await stub.NextBatch(api.ActionRequest(name="find"))
            find = await poll_release(stub, "find", lambda r: r.status.reached and r.status.weight == 10)
            assert find.status.convergence.proxies == 0
            await stub.NextBatch(api.ActionRequest(name="shop"))
            shop = await poll_release(stub, "shop", lambda r: r.status.reached and r.status.weight == 10)
            assert shop.status.convergence.proxies == shop.status.convergence.converged == 1
            assert "search" not in str(client.received)


async def test_a_scoped_proxyless_client_holding_part_of_its_scope_carries_its_releases(store: EtcdStore) -> None:
    """Its route set is a part of its scope's (it asks for one target of two): the view it
    carries is found from that part, as for an unscoped proxyless client."""
    async with scoped_plane(store) as (plane, stub):
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="shop", spec=lane_spec("checkout", "shop")))
        grpc_node = node("grpc-both", BOTH_TOKEN)
        grpc_node.user_agent_name = "gRPC Python"
        async with ProxylessClient(plane.xds_port, grpc_node, ["checkout"]):
            await stub.NextBatch(api.ActionRequest(name="shop"))
            shop = await poll_release(stub, "shop", lambda r: r.status.reached and r.status.weight == 10)
            assert shop.status.convergence.proxies == shop.status.convergence.converged == 1


async def test_a_scoped_proxys_nack_pauses_only_releases_of_its_services(store: EtcdStore) -> None:
    """While it holds checkout's new routes, search's release moves (outside its scope: its
    configuration does not change); its NACK then pauses checkout's release alone, though
    the views between what it accepted and what it rejected changed search's lane too."""
    async with shop_and_find_held(store, "picky-shop") as (stub, proxy):
        await stub.NextBatch(api.ActionRequest(name="shop"))
        await eventually(lambda: proxy.held is not None, what="checkout's new routes pushed")
        await stub.NextBatch(api.ActionRequest(name="find"))
        await poll_release(stub, "find", lambda r: r.status.reached and r.status.weight == 10)
        proxy.nack_held("route rejected by a picky proxy")
        shop = await poll_release(stub, "shop", lambda r: r.status.phase == pb.PAUSED)
        assert shop.status.last_nack.node == "picky-shop"
        find = await stub.GetRelease(api.GetReleaseRequest(name="find"))
        assert find.status.phase == pb.PROGRESSING and not find.status.HasField("last_nack")
        await stub.NextBatch(api.ActionRequest(name="find"))
        find = await poll_release(stub, "find", lambda r: r.status.reached and r.status.weight == 50)
        assert find.status.phase == pb.PROGRESSING
