"""Serving a view to the local proxies (graylane.xds.local), without processes: renders per
proxy group, the history from ACKed and NACKed versions back to views, scoped keys."""

from __future__ import annotations

import dataclasses

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2
from graylane.xds import view as xv
from graylane.xds.cache import DEFAULT_KEY, PROXYLESS_KEY, SnapshotCache
from graylane.xds.local import LocalServing, Rejection, ViewHistory, services_named
from graylane.xds.render import render
from graylane.xds.resources import CLUSTER, LISTENER, ROUTE
from graylane.xds.scope import ScopedSnapshotCache, scoped_key
from graylane.xds.tracker import SOTW, Nack, ProxyTracker, TypeAck

SIDECAR, GATEWAY = 10001, 9000


def _two_services(weight: int) -> xv.RoutingView:
    eps = tuple(
        xv.VersionEndpoints(s, v, (xv.Endpoint("127.0.0.1", 1000 + i),))
        for i, (s, v) in enumerate((("a", "v1"), ("a", "v2"), ("b", "v1")))
    )
    lanes = (xv.Lane("gray", "a", weight, (("a", "v2"),)),) if weight else ()
    return xv.RoutingView((xv.ServiceRoute("a", "v1"), xv.ServiceRoute("b", "v1")), eps, lanes)


def _node(node_id: str, port: int) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"listen_port": str(port)})
    return base_pb2.Node(id=node_id, metadata=metadata)


def _route_version(cache: SnapshotCache, key: str) -> str:
    snapshot = cache.snapshot(key)
    assert snapshot is not None
    return snapshot[ROUTE].version


def test_every_group_asked_for_is_rendered_at_once_or_when_it_first_asks() -> None:
    cache = SnapshotCache()
    serving: LocalServing[str] = LocalServing(cache, gateway_port=GATEWAY)
    cache.watch(str(SIDECAR), lambda: None)
    assert cache.snapshot(str(SIDECAR)) is None  # nothing to serve before the first view

    serving.set_view(_two_services(10), "v-1")
    sidecar = cache.snapshot(str(SIDECAR))
    assert sidecar is not None and sidecar[LISTENER].items.keys() == {xv.listener_name(SIDECAR)}
    assert (serving.tag, serving.kept_keys()) == ("v-1", {str(SIDECAR)})

    cache.watch(DEFAULT_KEY, lambda: None)  # a group asking later is rendered from the view in force
    default = cache.snapshot(DEFAULT_KEY)
    assert default is not None and default[LISTENER].items.keys() == {xv.listener_name(xv.DEFAULT_LISTEN_PORT)}
    cache.watch(str(GATEWAY), lambda: None)  # the gateway's port: the gateway's render
    gateway = cache.snapshot(str(GATEWAY))
    assert gateway is not None and gateway[ROUTE].items.keys() != sidecar[ROUTE].items.keys()
    assert serving.kept_keys() == {str(SIDECAR), DEFAULT_KEY, str(GATEWAY)}


def test_a_group_whose_last_proxy_left_is_forgotten_and_rendered_again_on_return() -> None:
    cache = SnapshotCache()
    serving: LocalServing[str] = LocalServing(cache)
    watch = cache.watch(str(SIDECAR), lambda: None)
    serving.set_view(_two_services(10), "v-1")
    first = _route_version(cache, str(SIDECAR))
    assert serving.view_of(ROUTE, first, {}) == "v-1"

    watch.close()
    assert cache.snapshot(str(SIDECAR)) is None and serving.kept_keys() == frozenset()
    assert serving.view_of(ROUTE, first, {}) is None  # only its renders held it

    serving.set_view(_two_services(50), "v-2")  # nobody asks: nothing rendered
    assert cache.snapshot(str(SIDECAR)) is None
    cache.watch(str(SIDECAR), lambda: None)
    assert serving.view_of(ROUTE, _route_version(cache, str(SIDECAR)), {}) == "v-2"


def test_acked_versions_name_the_view_they_were_rendered_from() -> None:
    cache = SnapshotCache()
    serving: LocalServing[str] = LocalServing(cache)
    cache.watch(str(SIDECAR), lambda: None)
    versions = {}
    for tag, weight in (("v-1", 10), ("v-2", 50), ("v-3", 100)):
        serving.set_view(_two_services(weight), tag)
        versions[tag] = _route_version(cache, str(SIDECAR))
    assert {tag: serving.view_of(ROUTE, v, {}) for tag, v in versions.items()} == {t: t for t in versions}
    assert serving.view_of(ROUTE, "no such version", {}) is None


def test_the_history_is_bounded_newest_kept() -> None:
    cache = SnapshotCache()
    # A lane's weight changes the route set only: the other four types keep one entry each.
    serving: LocalServing[int] = LocalServing(cache, history_size=4 + 3)
    cache.watch(str(SIDECAR), lambda: None)
    versions = []
    for weight in range(1, 8):
        serving.set_view(_two_services(weight), weight)
        versions.append(_route_version(cache, str(SIDECAR)))
    assert [serving.view_of(ROUTE, v, {}) for v in versions] == [None] * 4 + [5, 6, 7]


def test_a_proxyless_part_of_a_route_set_names_the_newest_view_holding_it() -> None:
    history: ViewHistory[xv.RoutingView] = ViewHistory()
    views_by_weight = {w: _two_services(w) for w in (0, 10, 50)}
    rendered = {w: render(v, listen_port=1, proxyless=True) for w, v in views_by_weight.items()}
    for w in (0, 10, 50):
        history.remember(rendered[w], views_by_weight[w], key=PROXYLESS_KEY)

    def part(w: int, *names: str) -> dict[str, str]:
        return {n: rendered[w][ROUTE].versions[n] for n in names}

    # A client of `a` at 10 % carries the 10 % view; at 50 %, the newest.
    assert history.containing(ROUTE, part(10, "graylane/a")) is views_by_weight[10]
    assert history.containing(ROUTE, part(50, "graylane/a")) is views_by_weight[50]
    # A client of `b` only: its routes never changed, so it carries the newest view.
    assert history.containing(ROUTE, part(0, "graylane/b")) is views_by_weight[50]
    assert history.containing(ROUTE, {}) is None
    assert history.containing(ROUTE, {"graylane/a": "no such content"}) is None


def test_a_scoped_proxy_names_the_view_of_its_scope_set() -> None:
    cache = ScopedSnapshotCache()
    serving: LocalServing[str] = LocalServing(cache)
    key = scoped_key(str(SIDECAR), {"b"})
    cache.watch(key, lambda: None)  # the owner sees the node group's key only
    serving.set_view(_two_services(10), "v-1")
    assert cache.requested_keys() == {str(SIDECAR)} and serving.kept_keys() == {str(SIDECAR)}
    scoped_v1 = _route_version(cache, key)
    assert serving.view_of(ROUTE, scoped_v1, {}, scope=frozenset({"b"})) == "v-1"
    # The view changes only `a`'s lane: `b`'s scoped set is unchanged and names the newest view.
    serving.set_view(_two_services(50), "v-2")
    assert _route_version(cache, key) == scoped_v1
    assert serving.view_of(ROUTE, scoped_v1, {}, scope=frozenset({"b"})) == "v-2"
    # Kept apart from the node group's versions: an unscoped lookup of it knows nothing.
    assert serving.view_of(ROUTE, scoped_v1, {}) is None
    assert serving.view_of(ROUTE, _route_version(cache, str(SIDECAR)), {}) == "v-2"


def test_a_nack_names_the_rejected_and_the_accepted_views() -> None:
    cache, tracker = SnapshotCache(), ProxyTracker()
    serving: LocalServing[str] = LocalServing(cache)
    tracker.connected(_node("sidecar", SIDECAR), stream="s", key=str(SIDECAR), protocol=SOTW)
    cache.watch(str(SIDECAR), lambda: None)
    serving.set_view(_two_services(10), "v-1")
    tracker.acked("s", ROUTE, TypeAck(version=_route_version(cache, str(SIDECAR))))
    status = tracker.get("s")
    assert status is not None and serving.rejection(status) is None  # no NACK: nothing rejected

    serving.set_view(_two_services(50), "v-2")
    tracker.nacked("s", Nack(ROUTE, _route_version(cache, str(SIDECAR)), "n-2", "bad route", at=1.0))
    status = tracker.get("s")
    assert status is not None and serving.rejection(status) == Rejection("v-2", "v-1", None)


def test_a_scoped_proxys_nack_blames_its_scope_only() -> None:
    cache, tracker = ScopedSnapshotCache(), ProxyTracker()
    serving: LocalServing[str] = LocalServing(cache)
    key = scoped_key(str(SIDECAR), {"a"})
    tracker.connected(_node("sidecar", SIDECAR), stream="s", key=key, protocol=SOTW)
    cache.watch(key, lambda: None)
    serving.set_view(_two_services(10), "v-1")
    tracker.acked("s", CLUSTER, TypeAck(version=cache.snapshot(key)[CLUSTER].version))  # type: ignore[index]
    serving.set_view(_two_services(50), "v-2")
    serving.set_view(dataclasses.replace(_two_services(50), lanes=()), "v-3")
    rejected = cache.snapshot(key)
    assert rejected is not None
    tracker.nacked("s", Nack(CLUSTER, rejected[CLUSTER].version, "n-3", "bad cluster", at=1.0))
    status = tracker.get("s")
    assert status is not None
    assert serving.rejection(status) == Rejection("v-3", "v-2", frozenset({"a"}))


def test_a_proxyless_nack_of_a_part_blames_the_services_the_parts_differ_in() -> None:
    cache, tracker = SnapshotCache(), ProxyTracker()
    serving: LocalServing[str] = LocalServing(cache)
    tracker.connected(base_pb2.Node(id="grpc"), stream="g", key=PROXYLESS_KEY, protocol=SOTW)
    cache.watch(PROXYLESS_KEY, lambda: None)
    serving.set_view(_two_services(10), "v-1")
    first = cache.snapshot(PROXYLESS_KEY)
    assert first is not None
    held = {n: first[ROUTE].versions[n] for n in ("graylane/a", "graylane/b")}
    tracker.acked("g", ROUTE, TypeAck(version="client's own", resources=held))
    serving.set_view(_two_services(50), "v-2")
    second = cache.snapshot(PROXYLESS_KEY)
    assert second is not None
    offered = {n: second[ROUTE].versions[n] for n in ("graylane/a", "graylane/b")}
    tracker.nacked("g", Nack(ROUTE, "client's other", "n-2", "bad route", at=1.0, resources=offered))
    status = tracker.get("g")
    assert status is not None
    assert serving.view_of(ROUTE, "client's own", held) == "v-1"
    assert serving.rejection(status) == Rejection("v-2", "v-1", frozenset({"a"}))


def test_services_named_by_resource_names() -> None:
    names = ["graylane/a", "b|v1", "c|v2|gray", "d", "xdstp://graylane/envoy.config.listener.v3.Listener/e"]
    assert services_named(names) == {"a", "b", "c", "d", "e"}
