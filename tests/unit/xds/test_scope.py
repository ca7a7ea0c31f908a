"""Scoped proxies' configuration and snapshot keys (graylane.xds.scope), without processes."""

from __future__ import annotations

import random

import pytest
from envoy.config.core.v3 import base_pb2
from graylane.xds import resources
from graylane.xds.cache import DEFAULT_KEY, check_consistency
from graylane.xds.render import render
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Resources
from graylane.xds.scope import ScopedSnapshotCache, filter_resources, parse_scoped_key, scoped_key, service_of
from graylane.xds.view import Endpoint, Lane, RoutingView, ServiceRoute, VersionEndpoints

from tests.unit.xds.test_renderer import PORT, SERVICES, _change, _view


def test_equal_scopes_share_one_key_and_it_parses_back() -> None:
    assert scoped_key("8080", {"b", "a"}) == scoped_key("8080", frozenset({"a", "b"})) == "8080@a,b"
    assert scoped_key("8080", None) == "8080"
    assert parse_scoped_key("8080@a,b") == ("8080", {"a", "b"})
    assert parse_scoped_key(DEFAULT_KEY) == (DEFAULT_KEY, None)


def _services(full: Resources) -> set[str]:
    found = set()
    for t, typed in full.by_type.items():
        for name in typed.items:
            service = service_of(t, name)
            if service is not None and t != LISTENER:
                found.add(service)
    return found


def _expected(full: Resources, scope: frozenset[str]) -> dict[str, set[str]]:
    return {
        t: {n for n in typed.items if (t == LISTENER and service_of(t, n) not in SERVICES) or service_of(t, n) in scope}
        for t, typed in full.by_type.items()
    }


VIEW = RoutingView(
    services=(ServiceRoute("a", "v1"), ServiceRoute("b", "v1")),
    endpoints=(
        VersionEndpoints("a", "v1", (Endpoint("10.0.0.1", 80),)),
        VersionEndpoints("a", "v2", (Endpoint("10.0.0.2", 80),)),
        VersionEndpoints("b", "v1", (Endpoint("10.0.0.3", 80),)),
        VersionEndpoints("b", "v2", (Endpoint("10.0.0.4", 80),)),
    ),
    lanes=(Lane("gray-b", entry="b", weight=10, versions=(("b", "v2"),)),),
)


@pytest.mark.parametrize("proxyless", [False, True])
def test_a_scope_keeps_its_services_and_the_listener_only(proxyless: bool) -> None:
    full = render(VIEW, listen_port=PORT, proxyless=proxyless)
    scoped = filter_resources(full, frozenset({"a"}))
    check_consistency(scoped)
    assert set(scoped[CLUSTER].items) == {"a|v1"} and set(scoped[ENDPOINT].items) == {"a|v1"}
    assert set(scoped[ROUTE].items) == set(scoped[SCOPED_ROUTE].items) == {"graylane/a"}
    if proxyless:
        assert all(service_of(LISTENER, n) == "a" for n in scoped[LISTENER].items) and scoped[LISTENER].items
    else:
        assert scoped[LISTENER].items.keys() == full[LISTENER].items.keys()
    # Nothing of b, its gray version or its lane is anywhere in what a scoped proxy gets.
    wire = b"".join(e for t in resources.PUSH_ORDER for e in scoped[t].entries().values())
    assert b"gray-b" not in wire and b"b|v" not in wire and b"10.0.0.3" not in wire


@pytest.mark.parametrize("seed", range(20))
def test_a_scope_followed_over_changes_equals_the_scope_filtered_whole(seed: int) -> None:
    from graylane.xds.renderer import Renderer

    rng = random.Random(seed)
    renderer = Renderer(listen_port=PORT)
    view = _view(rng)
    scope = frozenset(rng.sample(SERVICES, 3))
    previous: tuple[Resources, Resources] | None = None
    for _ in range(40):
        try:
            full = renderer.render(view)
        except ValueError:
            view = _change(rng, view)
            continue
        scoped = filter_resources(full, scope, previous=previous)
        whole = filter_resources(full, scope)
        check_consistency(scoped)
        for t in resources.PUSH_ORDER:
            assert dict(scoped[t].versions) == dict(whole[t].versions), t
            assert set(scoped[t].items) == _expected(full, scope)[t], t
        if previous is not None and full.base_versions:
            # Followed in O(changes): derived from the scoped form before.
            assert scoped is previous[1] or scoped.base_versions
        previous = (full, scoped)
        view = _change(rng, view)


def node(port: str | None = None) -> base_pb2.Node:
    n = base_pb2.Node(id="envoy", cluster="east", user_agent_name="envoy")
    if port is not None:
        n.metadata.fields["listen_port"].string_value = port
    return n


def test_the_cache_renders_node_groups_once_and_derives_every_scope() -> None:
    cache = ScopedSnapshotCache()
    requested: list[str] = []
    released: list[str] = []
    derived: list[str] = []
    scopes_released: list[str] = []

    def render_key(key: str) -> None:
        requested.append(key)
        cache.set_snapshot(key, render(VIEW, listen_port=PORT))

    cache.on_key_requested(render_key)
    cache.on_key_released(released.append)
    cache.on_derived(lambda key, full, scoped: derived.append(key))
    cache.on_scope_released(scopes_released.append)
    woken: list[str] = []
    a1 = cache.watch("10000@a", lambda: woken.append("a1"))
    a2 = cache.watch("10000@a", lambda: woken.append("a2"))
    b = cache.watch("10000@b", lambda: woken.append("b"))
    # The owner rendered the node group once and hears of nothing else.
    assert requested == ["10000"] and cache.requested_keys() == {"10000"}
    assert cache.scoped_keys() == {"10000@a", "10000@b"}
    assert derived == ["10000@a", "10000@b"]
    snap_a = cache.snapshot("10000@a")
    assert snap_a is not None and set(snap_a[CLUSTER].items) == {"a|v1"}
    # A change to the node group wakes the scopes it changes and derives each once per key.
    moved = RoutingView(VIEW.services, VIEW.endpoints, (Lane("gray-b", entry="b", weight=50, versions=(("b", "v2"),)),))
    woken.clear()
    cache.set_snapshot("10000", render(moved, listen_port=PORT))
    assert woken == ["b"]  # a's configuration did not change: its proxies are not woken
    a1.close()
    a2.close()
    assert scopes_released == ["10000@a"] and released == [] and cache.snapshot("10000@a") is None
    b.close()
    # The last proxy of the group left: the owner hears of the group, once.
    assert released == ["10000"] and cache.requested_keys() == frozenset()


def test_a_gateways_route_config_keeps_the_virtual_hosts_of_its_scope() -> None:
    from graylane.xds.render import render_gateway

    full = render_gateway(VIEW, listen_port=PORT)
    scoped = filter_resources(full, frozenset({"a"}))
    check_consistency(scoped)
    (config,) = scoped[ROUTE].items.values()
    hosts = [d for vhost in config.virtual_hosts for d in vhost.domains]
    assert hosts and all(".a." in h for h in hosts), hosts
    assert set(scoped[CLUSTER].items) == {n for n in full[CLUSTER].items if n.startswith("a|")}


def test_a_gateway_scoped_to_no_service_it_serves_stays_consistent() -> None:
    from graylane.xds.render import render_gateway

    scoped = filter_resources(render_gateway(VIEW, listen_port=PORT), frozenset({"ghost"}))
    check_consistency(scoped)
    (config,) = scoped[ROUTE].items.values()
    assert not config.virtual_hosts and not scoped[CLUSTER].items
