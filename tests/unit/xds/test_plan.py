"""Make-before-break planning: routes wait for their clusters, clusters outlive their routes."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message
from graylane.xds.plan import Held, listener_route_configs, plan, route_clusters
from graylane.xds.render import render
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, Resources
from graylane.xds.view import (
    ROUTE_CONFIG_NAME,
    Endpoint,
    Lane,
    RoutingView,
    ServiceRoute,
    VersionEndpoints,
    cluster_name,
    listener_name,
)

PORT = 10000
V1 = cluster_name("a", "v1")
V2 = cluster_name("a", "v2")
# The gray lane's own cluster for v2, with its own EDS resource (named like it) holding
# v2's endpoints: every cluster has its own, so a new cluster always gets its endpoints sent.
V2_GRAY = cluster_name("a", "v2", "gray")


def view(*, base: str = "v1", gray: str | None = None, weight: int = 50) -> RoutingView:
    endpoints = (
        VersionEndpoints("a", "v1", (Endpoint("127.0.0.1", 1001),)),
        VersionEndpoints("a", "v2", (Endpoint("127.0.0.1", 1002),)),
    )
    lanes = (Lane("gray", "a", weight, (("a", gray),)),) if gray else ()
    return RoutingView(services=(ServiceRoute("a", base),), endpoints=endpoints, lanes=lanes)


ONLY_V1 = render(view(), listen_port=PORT)
V1_AND_V2 = render(view(gray="v2"), listen_port=PORT)
ONLY_V2 = render(view(base="v2"), listen_port=PORT)


def held(resources: Resources, *types: str) -> dict[str, Mapping[str, Message]]:
    """A proxy state holding every resource of `types` from `resources`."""
    return {t: dict(resources[t].items) for t in types}


def merge(*states: Held) -> Held:
    out: dict[str, dict[str, Message]] = {}
    for state in states:
        for t, items in state.items():
            out.setdefault(t, {}).update(items)
    return out


def route(resources: Resources) -> Message:
    return resources[ROUTE].items[ROUTE_CONFIG_NAME]


def test_reference_helpers() -> None:
    assert route_clusters(route(V1_AND_V2)) == {V1, V2_GRAY}
    listener = V1_AND_V2[LISTENER].items[listener_name(PORT)]
    assert listener_route_configs(listener) == {ROUTE_CONFIG_NAME}  # type: ignore[arg-type]


def test_fresh_proxy_gets_clusters_and_endpoints_but_no_route_or_listener_yet() -> None:
    p = plan(ONLY_V1, acked={}, sent={})
    assert set(p.resources[CLUSTER].items) == {V1}
    assert set(p.resources[ENDPOINT].items) == {V1}
    assert len(p.resources[ROUTE]) == 0
    assert len(p.resources[LISTENER]) == 0
    assert p.held == {(ROUTE, ROUTE_CONFIG_NAME), (LISTENER, listener_name(PORT))}


def test_fully_acked_proxy_gets_the_whole_target() -> None:
    everything = held(ONLY_V1, *PUSH_ORDER)
    p = plan(ONLY_V1, acked=everything, sent=everything)
    assert p.held == frozenset()
    for t in PUSH_ORDER:
        assert p.resources[t].version == ONLY_V1[t].version


def test_new_route_waits_until_its_new_cluster_is_acked_in_cds_and_eds() -> None:
    old = held(ONLY_V1, *PUSH_ORDER)
    p = plan(V1_AND_V2, acked=old, sent=old)
    assert set(p.resources[CLUSTER].items) == {V1, V2_GRAY}
    assert set(p.resources[ENDPOINT].items) == {V1, V2_GRAY}  # V2_GRAY's own EDS resource
    assert route(p.resources) == route(ONLY_V1)  # the proxy keeps its old route
    assert (ROUTE, ROUTE_CONFIG_NAME) in p.held

    cds_acked = merge(old, held(V1_AND_V2, CLUSTER))
    p = plan(V1_AND_V2, acked=cds_acked, sent=cds_acked)
    assert route(p.resources) == route(ONLY_V1)  # V2_GRAY's endpoints not ACKed yet
    assert (ROUTE, ROUTE_CONFIG_NAME) in p.held

    eds_acked = merge(old, held(V1_AND_V2, ENDPOINT))
    p = plan(V1_AND_V2, acked=eds_acked, sent=eds_acked)
    assert route(p.resources) == route(ONLY_V1)  # V2_GRAY itself not ACKed yet
    assert (ROUTE, ROUTE_CONFIG_NAME) in p.held

    both_acked = merge(cds_acked, held(V1_AND_V2, ENDPOINT))
    p = plan(V1_AND_V2, acked=both_acked, sent=both_acked)
    assert route(p.resources) == route(V1_AND_V2)
    assert p.held == frozenset()


def test_cluster_removal_waits_until_the_routes_moved_away_and_were_acked() -> None:
    old = held(V1_AND_V2, *PUSH_ORDER)
    p = plan(ONLY_V2, acked=old, sent=old)
    # Promoted v2 serves outside the lane through a new cluster, V2: the route waits for it.
    assert route(p.resources) == route(V1_AND_V2)
    assert (ROUTE, ROUTE_CONFIG_NAME) in p.held
    assert set(p.resources[CLUSTER].items) == {V1, V2, V2_GRAY}  # the live route still uses V1, V2_GRAY
    # V2 has its own EDS resource, new to the proxy although V2_GRAY's holds the same endpoints.
    assert set(p.resources[ENDPOINT].items) == {V1, V2, V2_GRAY}

    # V2_GRAY's endpoints, ACKed long ago, do not warm V2: its CDS ACK alone is not enough.
    cds_acked = merge(old, held(ONLY_V2, CLUSTER))
    p = plan(ONLY_V2, acked=cds_acked, sent=cds_acked)
    assert route(p.resources) == route(V1_AND_V2)
    assert (ROUTE, ROUTE_CONFIG_NAME) in p.held

    both_acked = merge(cds_acked, held(ONLY_V2, ENDPOINT))
    p = plan(ONLY_V2, acked=both_acked, sent=both_acked)
    assert route(p.resources) == route(ONLY_V2)
    assert p.held == frozenset()
    assert set(p.resources[CLUSTER].items) == {V1, V2, V2_GRAY}
    assert set(p.resources[ENDPOINT].items) == {V1, V2, V2_GRAY}

    in_flight = merge(both_acked, held(ONLY_V2, ROUTE))  # new route sent, not yet ACKed
    p = plan(ONLY_V2, acked=both_acked, sent=in_flight)
    assert set(p.resources[CLUSTER].items) == {V1, V2, V2_GRAY}
    assert set(p.resources[ENDPOINT].items) == {V1, V2, V2_GRAY}

    p = plan(ONLY_V2, acked=in_flight, sent=in_flight)
    assert set(p.resources[CLUSTER].items) == {V2}
    assert set(p.resources[ENDPOINT].items) == {V2}


def test_a_route_sent_but_not_acked_also_keeps_its_clusters() -> None:
    acked = held(ONLY_V1, *PUSH_ORDER)
    sent = merge(held(V1_AND_V2, *PUSH_ORDER))
    p = plan(ONLY_V1, acked=acked, sent=sent)
    assert set(p.resources[CLUSTER].items) == {V1, V2_GRAY}
    assert set(p.resources[ENDPOINT].items) == {V1, V2_GRAY}


def test_listener_waits_for_its_route_config_but_keeps_the_one_the_proxy_has() -> None:
    other_port = render(view(), listen_port=PORT + 1)
    acked = merge(held(ONLY_V1, CLUSTER, ENDPOINT, LISTENER))
    target = Resources.of(
        {
            CLUSTER: V1_AND_V2[CLUSTER].items,
            ENDPOINT: V1_AND_V2[ENDPOINT].items,
            LISTENER: other_port[LISTENER].items,
            ROUTE: V1_AND_V2[ROUTE].items,
        }
    )
    p = plan(target, acked=acked, sent=acked)
    # No route config is plannable (v2 not ACKed, none held): the new listener waits.
    assert set(p.resources[LISTENER].items) == set()
    assert (LISTENER, listener_name(PORT + 1)) in p.held
