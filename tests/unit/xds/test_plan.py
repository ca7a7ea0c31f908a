"""Make-before-break planning: routes wait for their clusters, clusters outlive their routes."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message
from graylane.xds import view as xv
from graylane.xds.plan import Held, listener_route_configs, plan, route_clusters
from graylane.xds.render import render, render_gateway
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SCOPED_ROUTE, Resources

PORT = 10000
V1 = xv.cluster_name("a", "v1")
V2 = xv.cluster_name("a", "v2")
# The gray lane's own cluster for v2, with its own EDS resource (named like it) holding
# v2's endpoints: every cluster has its own, so a new cluster always gets its endpoints sent.
V2_GRAY = xv.cluster_name("a", "v2", "gray")


def view(*, base: str = "v1", gray: str | None = None, weight: int = 50) -> xv.RoutingView:
    endpoints = (
        xv.VersionEndpoints("a", "v1", (xv.Endpoint("127.0.0.1", 1001),)),
        xv.VersionEndpoints("a", "v2", (xv.Endpoint("127.0.0.1", 1002),)),
    )
    lanes = (xv.Lane("gray", "a", weight, (("a", gray),)),) if gray else ()
    return xv.RoutingView(services=(xv.ServiceRoute("a", base),), endpoints=endpoints, lanes=lanes)


ONLY_V1 = render(view(), listen_port=PORT)
V1_AND_V2 = render(view(gray="v2"), listen_port=PORT)
ONLY_V2 = render(view(base="v2"), listen_port=PORT)
RC_A = xv.route_config_name("a")  # service a's route config, and its scope


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
    return resources[ROUTE].items[RC_A]


def test_reference_helpers() -> None:
    assert route_clusters(route(V1_AND_V2)) == {V1, V2_GRAY}
    listener = V1_AND_V2[LISTENER].items[xv.listener_name(PORT)]
    assert listener_route_configs(listener) == set()  # type: ignore[arg-type]  # its scopes name them
    gateway = render_gateway(view(), listen_port=PORT)[LISTENER].items[xv.listener_name(PORT)]
    assert listener_route_configs(gateway) == {xv.ROUTE_CONFIG_NAME}  # type: ignore[arg-type]


def test_fresh_proxy_gets_clusters_and_endpoints_but_no_route_or_listener_yet() -> None:
    p = plan(ONLY_V1, acked={}, sent={})
    assert set(p.resources[CLUSTER].items) == {V1}
    assert set(p.resources[ENDPOINT].items) == {V1}
    assert len(p.resources[ROUTE]) == 0
    assert len(p.resources[SCOPED_ROUTE]) == 0  # a scope waits for the route config it names
    # The listener names no route config (its scopes do): it may come, and warms on SRDS.
    assert set(p.resources[LISTENER].items) == {xv.listener_name(PORT)}
    assert p.held == {(ROUTE, RC_A), (SCOPED_ROUTE, RC_A)}


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
    assert (ROUTE, RC_A) in p.held

    cds_acked = merge(old, held(V1_AND_V2, CLUSTER))
    p = plan(V1_AND_V2, acked=cds_acked, sent=cds_acked)
    assert route(p.resources) == route(ONLY_V1)  # V2_GRAY's endpoints not ACKed yet
    assert (ROUTE, RC_A) in p.held

    eds_acked = merge(old, held(V1_AND_V2, ENDPOINT))
    p = plan(V1_AND_V2, acked=eds_acked, sent=eds_acked)
    assert route(p.resources) == route(ONLY_V1)  # V2_GRAY itself not ACKed yet
    assert (ROUTE, RC_A) in p.held

    both_acked = merge(cds_acked, held(V1_AND_V2, ENDPOINT))
    p = plan(V1_AND_V2, acked=both_acked, sent=both_acked)
    assert route(p.resources) == route(V1_AND_V2)
    assert p.held == frozenset()


def test_cluster_removal_waits_until_the_routes_moved_away_and_were_acked() -> None:
    old = held(V1_AND_V2, *PUSH_ORDER)
    p = plan(ONLY_V2, acked=old, sent=old)
    # Promoted v2 serves outside the lane through a new cluster, V2: the route waits for it.
    assert route(p.resources) == route(V1_AND_V2)
    assert (ROUTE, RC_A) in p.held
    assert set(p.resources[CLUSTER].items) == {V1, V2, V2_GRAY}  # the live route still uses V1, V2_GRAY
    # V2 has its own EDS resource, new to the proxy although V2_GRAY's holds the same endpoints.
    assert set(p.resources[ENDPOINT].items) == {V1, V2, V2_GRAY}

    # V2_GRAY's endpoints, ACKed long ago, do not warm V2: its CDS ACK alone is not enough.
    cds_acked = merge(old, held(ONLY_V2, CLUSTER))
    p = plan(ONLY_V2, acked=cds_acked, sent=cds_acked)
    assert route(p.resources) == route(V1_AND_V2)
    assert (ROUTE, RC_A) in p.held

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
    # A listener naming its route config through RDS (a gateway's).
    other_port = render_gateway(view(), listen_port=PORT + 1)
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
    assert (LISTENER, xv.listener_name(PORT + 1)) in p.held


# Two services: b is added (new clusters) while a's weight changes.
def two(*, with_b: bool, weight: int = 50) -> Resources:
    base = view(gray="v2", weight=weight)
    services = (*base.services, xv.ServiceRoute("b", "v1")) if with_b else base.services
    endpoints = (*base.endpoints, xv.VersionEndpoints("b", "v1", (xv.Endpoint("127.0.0.1", 2001),)))
    return render(xv.RoutingView(services=services, endpoints=endpoints, lanes=base.lanes), listen_port=PORT)


RC_B = xv.route_config_name("b")


def test_a_new_services_scope_and_routes_wait_for_its_clusters_without_holding_other_services() -> None:
    old = held(two(with_b=False), *PUSH_ORDER)
    target = two(with_b=True, weight=60)
    p = plan(target, acked=old, sent=old)
    # a's new weight needs no new cluster: it goes now; only b's route config and scope wait.
    assert p.resources[ROUTE].items[RC_A] is target[ROUTE].items[RC_A]
    assert p.held == {(ROUTE, RC_B), (SCOPED_ROUTE, RC_B)}
    assert set(p.resources[SCOPED_ROUTE].items) == {RC_A}
    assert set(p.resources[CLUSTER].items) == {V1, V2_GRAY, "b|v1"}

    acked = merge(old, held(target, CLUSTER, ENDPOINT))
    p = plan(target, acked=acked, sent=acked)
    assert p.held == frozenset()
    assert p.resources[SCOPED_ROUTE].items[RC_B] is target[SCOPED_ROUTE].items[RC_B]
    assert p.resources[ROUTE].items[RC_B] is target[ROUTE].items[RC_B]


def test_a_held_route_config_the_proxy_has_keeps_its_scope() -> None:
    old = held(render(view(), listen_port=PORT), *PUSH_ORDER)
    p = plan(V1_AND_V2, acked=old, sent=old)
    assert (ROUTE, RC_A) in p.held  # waits for V2_GRAY
    assert set(p.resources[SCOPED_ROUTE].items) == {RC_A}  # its old route config stands in
    assert (SCOPED_ROUTE, RC_A) not in p.held


def test_a_removed_services_clusters_stay_while_its_route_config_is_live() -> None:
    old = held(two(with_b=True), *PUSH_ORDER)
    target = two(with_b=False)
    p = plan(target, acked=old, sent=old)
    # The scope goes at once (SRDS is the whole set); b's clusters stay while the proxy
    # still holds b's route config (until it unsubscribes from it, after the scope is gone).
    assert set(p.resources[SCOPED_ROUTE].items) == {RC_A}
    assert "b|v1" in p.resources[CLUSTER].items
    unsubscribed = {t: {n: m for n, m in items.items() if n != RC_B} for t, items in old.items()}
    p = plan(target, acked=unsubscribed, sent=unsubscribed)
    assert "b|v1" not in p.resources[CLUSTER].items


# ------------------------------------------------------- clients that ask for clusters by name

PROXYLESS_V1 = render(view(), listen_port=PORT, proxyless=True)
PROXYLESS_V1_AND_V2 = render(view(gray="v2"), listen_port=PORT, proxyless=True)
PROXYLESS_ONLY_V2 = render(view(base="v2"), listen_port=PORT, proxyless=True)


def test_api_listener_names_its_route_config() -> None:
    listener = PROXYLESS_V1[LISTENER].items["a"]
    assert listener_route_configs(listener) == {RC_A}  # type: ignore[arg-type]


def test_a_client_asking_by_name_gets_listener_and_routes_before_any_cluster_is_acked() -> None:
    # gRPC's order: LDS, then RDS, then CDS and EDS for the names the routes give. Waiting
    # for cluster ACKs would hold the routes, and so the listener, forever.
    p = plan(PROXYLESS_V1, acked={}, sent={}, on_demand=True)
    assert {"a", "xdstp://graylane/envoy.config.listener.v3.Listener/a"} <= set(p.resources[LISTENER].items)
    assert set(p.resources[ROUTE].items) == {RC_A}
    # ...and every cluster those routes name is there, with its endpoints, when asked for.
    assert route_clusters(route(p.resources)) <= p.resources[CLUSTER].items.keys()
    assert route_clusters(route(p.resources)) <= p.resources[ENDPOINT].items.keys()
    assert p.held == frozenset()
    # The same target for a proxy that subscribes to every cluster waits for its ACKs.
    assert (ROUTE, RC_A) in plan(PROXYLESS_V1, acked={}, sent={}).held


def test_a_client_asking_by_name_keeps_a_dropped_cluster_while_it_subscribes_to_it() -> None:
    # It held the gray lane's cluster; the target dropped it (rolled back). The client
    # unsubscribes once no route and no call uses it: until then it stays, with endpoints.
    state = held(PROXYLESS_V1_AND_V2, CLUSTER, ENDPOINT, ROUTE, LISTENER)
    rolled_back = render(view(), listen_port=PORT, proxyless=True)
    p = plan(rolled_back, acked=state, sent=state, on_demand=True)
    assert V2_GRAY in p.resources[CLUSTER].items and V2_GRAY in p.resources[ENDPOINT].items
    assert route_clusters(route(p.resources)) == {V1}  # the new routes go at once
    # Once it no longer subscribes to it (the stream forgets what it held of it), it goes.
    dropped = {t: {n: m for n, m in items.items() if n != V2_GRAY} for t, items in state.items()}
    assert V2_GRAY not in plan(rolled_back, acked=dropped, sent=dropped, on_demand=True).resources[CLUSTER].items


def test_a_route_naming_a_cluster_without_endpoints_waits_even_by_name() -> None:
    only_v2 = dict(PROXYLESS_ONLY_V2[ENDPOINT].items)
    del only_v2[xv.cluster_name("a", "v2")]
    broken = Resources.of({t: ({**PROXYLESS_ONLY_V2[t].items} if t != ENDPOINT else only_v2) for t in PUSH_ORDER})
    p = plan(broken, acked={}, sent={}, on_demand=True)
    assert (ROUTE, RC_A) in p.held
    assert "a" not in p.resources[LISTENER].items  # its route config is not planned


def test_planning_over_what_a_client_asks_for_equals_the_whole_plan_selected() -> None:
    from graylane.xds.plan import plan_wanted

    target = PROXYLESS_V1_AND_V2
    # gRPC's first step: the listener only. Its route config is ready (its clusters can be
    # served) although the client has asked for no cluster yet.
    first = plan_wanted(target, acked={}, sent={}, wanted={LISTENER: frozenset({"a"})})
    assert set(first.resources[LISTENER].items) == {"a"}
    assert len(first.resources[ROUTE]) == 0 and first.held == frozenset()
    # Then everything by name: the same content as the whole on-demand plan, for those names.
    wanted = {
        LISTENER: frozenset({"a"}),
        ROUTE: frozenset({RC_A}),
        CLUSTER: frozenset({V1, V2_GRAY}),
        ENDPOINT: frozenset({V1, V2_GRAY}),
    }
    part = plan_wanted(target, acked={}, sent={}, wanted=wanted)
    whole = plan(target, acked={}, sent={}, on_demand=True)
    for t, names in wanted.items():
        assert part.resources[t].items == {n: whole.resources[t].items[n] for n in names}
