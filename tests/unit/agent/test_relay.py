"""The relay (agent/relay.py): one view rendered per local proxy group, and ACKs mapped back to views."""

from __future__ import annotations

import dataclasses

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2
from graylane.agent.relay import Relay
from graylane.agent.wire import cluster_view
from graylane.xds import view as xv
from graylane.xds.cache import SnapshotCache
from graylane.xds.resources import LISTENER, ROUTE, set_version
from graylane.xds.tracker import SOTW, Nack, ProxyTracker, TypeAck

SIDECAR, GATEWAY = 10001, 9000

VIEW = xv.RoutingView(
    services=(xv.ServiceRoute("checkout", "v1"),),
    endpoints=(
        xv.VersionEndpoints("checkout", "v1", (xv.Endpoint("127.0.0.1", 8081),)),
        xv.VersionEndpoints("checkout", "v2", (xv.Endpoint("127.0.0.1", GATEWAY + 1),), via_cluster="west"),
    ),
    lanes=(xv.Lane(name="gray", entry="checkout", weight=10, versions=(("checkout", "v2"),)),),
)


def node(node_id: str, port: int) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"listen_port": str(port)})
    return base_pb2.Node(id=node_id, metadata=metadata)


def ack(tracker: ProxyTracker, cache: SnapshotCache, node_id: str, key: str) -> None:
    snapshot = cache.snapshot(key)
    assert snapshot is not None
    tracker.acked(node_id, ROUTE, TypeAck(version=snapshot[ROUTE].version))


def test_renders_sidecars_and_the_gateway_once_a_view_arrives() -> None:
    cache, tracker = SnapshotCache(), ProxyTracker()
    relay = Relay(cache, tracker, gateway_port=GATEWAY)
    cache.watch(str(SIDECAR), lambda: None)
    assert cache.snapshot(str(SIDECAR)) is None  # nothing to serve before the first view

    assert relay.apply(cluster_view(VIEW))
    sidecar = cache.snapshot(str(SIDECAR))
    assert sidecar is not None and sidecar[LISTENER].items.keys() == {xv.listener_name(SIDECAR)}

    cache.watch(str(GATEWAY), lambda: None)  # the gateway connects later
    gateway = cache.snapshot(str(GATEWAY))
    assert gateway is not None
    [route_config] = gateway[ROUTE].items.values()
    # A gateway serves this cluster's own versions only: v1 here, never the remote v2.
    assert [vh.domains[0] for vh in route_config.virtual_hosts] == [xv.gateway_authority("checkout", "v1")]


def test_reports_each_proxy_against_the_view_its_routes_came_from() -> None:
    cache, tracker = SnapshotCache(), ProxyTracker()
    relay = Relay(cache, tracker, gateway_port=GATEWAY)
    for node_id, port in (("sidecar", SIDECAR), ("gateway", GATEWAY)):
        tracker.connected(node(node_id, port), stream=node_id, key=str(port), protocol=SOTW)
        cache.watch(str(port), lambda: None)
    first = cluster_view(VIEW)
    relay.apply(first)
    assert {p.node_id: p.view_version for p in relay.report().proxies} == {"sidecar": "", "gateway": ""}
    ack(tracker, cache, "sidecar", str(SIDECAR))
    ack(tracker, cache, "gateway", str(GATEWAY))
    assert {p.view_version for p in relay.report().proxies} == {first.version}

    # A weight change: the sidecar's routes change, the gateway's do not (so it sends no new ACK),
    # yet the gateway is reported on the new view at once.
    second = cluster_view(dataclasses.replace(VIEW, lanes=(dataclasses.replace(VIEW.lanes[0], weight=50),)))
    relay.apply(second)
    report = {p.node_id: p.view_version for p in relay.report().proxies}
    assert report == {"sidecar": first.version, "gateway": second.version}
    ack(tracker, cache, "sidecar", str(SIDECAR))
    assert {p.view_version for p in relay.report().proxies} == {second.version}

    tracker.disconnected("sidecar")
    assert [p.node_id for p in relay.report().proxies] == ["gateway"]


def _relay_and_sidecar() -> tuple[SnapshotCache, ProxyTracker, Relay]:
    """A relay on a fresh cache and tracker, and one connected sidecar watching its port's key."""
    cache, tracker = SnapshotCache(), ProxyTracker()
    relay = Relay(cache, tracker)
    tracker.connected(node("sidecar", SIDECAR), stream="sidecar", key=str(SIDECAR), protocol=SOTW)
    cache.watch(str(SIDECAR), lambda: None)
    return cache, tracker, relay


def test_a_nack_is_reported_with_the_view_it_rejected() -> None:
    cache, tracker, relay = _relay_and_sidecar()
    first = cluster_view(VIEW)
    relay.apply(first)
    ack(tracker, cache, "sidecar", str(SIDECAR))
    [state] = relay.report().proxies
    assert not state.HasField("last_nack") and state.nacked_view_version == ""

    second = cluster_view(dataclasses.replace(VIEW, lanes=(dataclasses.replace(VIEW.lanes[0], weight=50),)))
    relay.apply(second)
    rejected = cache.snapshot(str(SIDECAR))
    assert rejected is not None
    tracker.nacked("sidecar", Nack(ROUTE, rejected[ROUTE].version, "n-2", "bad route", at=1_700_000_000.5))
    [state] = relay.report().proxies
    # Still on the first view (its routes are what it ACKed), rejecting the second.
    assert (state.view_version, state.nacked_view_version) == (first.version, second.version)
    assert (state.last_nack.type_url, state.last_nack.message) == (ROUTE, "bad route")
    assert state.last_nack.at.ToMilliseconds() == 1_700_000_000_500


def test_a_bad_view_changes_nothing() -> None:
    cache, tracker = SnapshotCache(), ProxyTracker()
    relay = Relay(cache, tracker)
    good = cluster_view(VIEW)
    assert relay.apply(good)
    bad = cluster_view(VIEW)
    bad.view.lanes[0].rules.add().conditions.add(kind=99)
    bad.version = "bad"
    assert not relay.apply(bad)
    assert relay.version == good.version and relay.view == VIEW


def test_a_key_nobody_asks_for_any_more_is_no_longer_rendered() -> None:
    cache, tracker = SnapshotCache(), ProxyTracker()
    relay = Relay(cache, tracker)
    relay.apply(cluster_view(VIEW))
    watches = [cache.watch(str(20000 + i), lambda: None) for i in range(3)]
    assert cache.keys() == {"20000", "20001", "20002"}
    for watch in watches[1:]:
        watch.close()
    assert cache.keys() == {"20000"}
    relay.apply(cluster_view(dataclasses.replace(VIEW, lanes=())))  # a change renders the live key only
    assert cache.keys() == {"20000"}


def _with_service(name: str, port: int) -> xv.RoutingView:
    """VIEW and one more service, `name` at v1 on 127.0.0.1:`port`."""
    return dataclasses.replace(
        VIEW,
        services=(*VIEW.services, xv.ServiceRoute(name, "v1")),
        endpoints=(*VIEW.endpoints, xv.VersionEndpoints(name, "v1", (xv.Endpoint("127.0.0.1", port),))),
    )


def test_a_proxy_holding_only_some_services_route_configs_carries_no_view() -> None:
    """Routes are split per service (one route config per scope): a proxy that has not yet
    subscribed to every scope's route config ACKs a smaller set, which no view rendered, so
    it is reported on no view (unsure means not reached) until it holds them all."""
    two = _with_service("cart", 8091)
    cache, tracker, relay = _relay_and_sidecar()
    applied = cluster_view(two)
    relay.apply(applied)
    snapshot = cache.snapshot(str(SIDECAR))
    assert snapshot is not None and len(snapshot[ROUTE]) == 2
    only_checkout = {xv.route_config_name("checkout"): snapshot[ROUTE].versions[xv.route_config_name("checkout")]}
    tracker.acked("sidecar", ROUTE, TypeAck(version=set_version(only_checkout), resources=only_checkout))
    assert [p.view_version for p in relay.report().proxies] == [""]
    ack(tracker, cache, "sidecar", str(SIDECAR))
    assert [p.view_version for p in relay.report().proxies] == [applied.version]


def test_a_proxyless_client_holding_part_of_a_route_set_is_reported_on_its_view() -> None:
    from types import MappingProxyType

    from graylane.xds.cache import PROXYLESS_KEY

    two = _with_service("search", 8082)
    cache, tracker = SnapshotCache(), ProxyTracker()
    relay = Relay(cache, tracker)
    grpc_node = base_pb2.Node(id="grpc", user_agent_name="gRPC Python")
    tracker.connected(grpc_node, stream="grpc", key=PROXYLESS_KEY, protocol=SOTW)
    cache.watch(PROXYLESS_KEY, lambda: None)
    first = cluster_view(two)
    relay.apply(first)
    snapshot = cache.snapshot(PROXYLESS_KEY)
    assert snapshot is not None and "checkout" in snapshot[LISTENER].items
    rc = xv.route_config_name("checkout")
    part = {rc: snapshot[ROUTE].versions[rc]}  # it asked for checkout's routes only
    tracker.acked("grpc", ROUTE, TypeAck(set_version(part), MappingProxyType(part)))
    assert [p.view_version for p in relay.report().proxies] == [first.version]

    second = cluster_view(dataclasses.replace(two, lanes=(dataclasses.replace(VIEW.lanes[0], weight=50),)))
    relay.apply(second)
    assert [p.view_version for p in relay.report().proxies] == [first.version]  # not yet ACKed
    rejected = cache.snapshot(PROXYLESS_KEY)
    assert rejected is not None
    bad = {rc: rejected[ROUTE].versions[rc]}
    tracker.nacked("grpc", Nack(ROUTE, set_version(bad), "3", "no", at=0.0, resources=MappingProxyType(bad)))
    [state] = relay.report().proxies
    assert (state.view_version, state.nacked_view_version) == (first.version, second.version)
