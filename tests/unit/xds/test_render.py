"""Unit tests for graylane.xds.render: the proto structure a RoutingView renders to.

No processes: what Envoy makes of these resources is checked in
tests/integration/test_render_envoy_validate.py. Regexes are checked here with google-re2,
the engine Envoy runs, including Envoy's default program-size limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import re2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message
from graylane.xds import resources
from graylane.xds import view as xv
from graylane.xds.cache import consistency_gaps
from graylane.xds.plan import route_clusters
from graylane.xds.render import (
    ViewIndex,
    effective_view,
    forget_reused,
    render,
    render_gateway,
    render_service,
)

PORT = 15001
ENVOY_MAX_PROGRAM_SIZE = 100  # Envoy's default re2.max_program_size.error_level
OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


# ------------------------------------------------------------------------------ helpers


def eps(*ports: int) -> tuple[xv.Endpoint, ...]:
    return tuple(xv.Endpoint("10.0.0.1", p) for p in ports)


def make_view(*lanes: xv.Lane, connect_timeout_ms: int = 1000) -> xv.RoutingView:
    """gateway -> cart -> stock; every version listed here has endpoints except stock v3."""
    return xv.RoutingView(
        services=(
            xv.ServiceRoute("stock", "v1"),
            xv.ServiceRoute("gateway", "v1"),
            xv.ServiceRoute("cart", "v1"),
        ),
        endpoints=(
            xv.VersionEndpoints("gateway", "v1", eps(8001)),
            xv.VersionEndpoints("gateway", "v2", eps(8002)),
            xv.VersionEndpoints("cart", "v1", eps(8011, 8010)),
            xv.VersionEndpoints("cart", "v2", eps(8012)),
            xv.VersionEndpoints("stock", "v1", eps(8021)),
            xv.VersionEndpoints("stock", "v2", eps(8022)),
            xv.VersionEndpoints("stock", "v3", ()),
        ),
        lanes=lanes,
        connect_timeout_ms=connect_timeout_ms,
    )


def lane(
    name: str,
    *,
    entry: str = "gateway",
    weight: int = 0,
    versions: tuple[tuple[str, str], ...] = (),
    rules: tuple[xv.Rule, ...] = (),
    cohort: xv.Cohort | None = None,
) -> xv.Lane:
    return xv.Lane(name=name, entry=entry, weight=weight, versions=versions, rules=rules, cohort=cohort)


def rule(*conditions: xv.Condition) -> xv.Rule:
    return xv.Rule(conditions)


def cond(kind: xv.MatchKind, name: str, op: xv.MatchOp, value: str = "") -> xv.Condition:
    return xv.Condition(kind, name, op, value)


def item(res: resources.Resources, type_url: str, name: str) -> Any:
    """One rendered resource (Any: the Envoy protos ship no type stubs)."""
    return res[type_url].items[name]


def addresses(res: resources.Resources, eds: str) -> list[tuple[str, int]]:
    """(address, port) of every endpoint in the ClusterLoadAssignment named `eds`."""
    return [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for locality in item(res, resources.ENDPOINT, eds).endpoints
        for e in locality.lb_endpoints
    ]


def route_config(res: resources.Resources) -> route_pb2.RouteConfiguration:
    """The gateway's one route config; for a proxy, its per-service ones merged in order."""
    if xv.ROUTE_CONFIG_NAME in res[resources.ROUTE].items:
        message = res[resources.ROUTE].items[xv.ROUTE_CONFIG_NAME]
        assert isinstance(message, route_pb2.RouteConfiguration)
        return message
    merged = route_pb2.RouteConfiguration()
    for name in res[resources.ROUTE]:
        split = res[resources.ROUTE].items[name]
        assert isinstance(split, route_pb2.RouteConfiguration)
        merged.virtual_hosts.extend(split.virtual_hosts)
    return merged


def routes_of(res: resources.Resources, service: str) -> list[route_components_pb2.Route]:
    for vhost in route_config(res).virtual_hosts:
        if vhost.name == service:
            return list(vhost.routes)
    raise AssertionError(f"no virtual host {service}")


def route_names(res: resources.Resources, service: str) -> list[str]:
    return [r.name for r in routes_of(res, service)]


def named(res: resources.Resources, service: str, name: str) -> route_components_pb2.Route:
    for r in routes_of(res, service):
        if r.name == name:
            return r
    raise AssertionError(f"no route {name} in {service}: {route_names(res, service)}")


def header(match: route_components_pb2.RouteMatch, name: str) -> route_components_pb2.HeaderMatcher:
    found = [h for h in match.headers if h.name == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def is_absent(matcher: route_components_pb2.HeaderMatcher) -> bool:
    """ "Header absent" as every client reads it: present, inverted (never present_match false)."""
    return matcher.present_match is True and matcher.invert_match is True


def is_present(matcher: route_components_pb2.HeaderMatcher) -> bool:
    return matcher.present_match is True and matcher.invert_match is False


def tags(options: object) -> dict[str, tuple[str, int]]:
    return {o.header.key: (o.header.value, o.append_action) for o in options}  # type: ignore[attr-defined]


def all_regexes(message: Message) -> Iterator[str]:
    """Every RegexMatcher.regex anywhere inside `message`."""
    if message.DESCRIPTOR.full_name == "envoy.type.matcher.v3.RegexMatcher":
        yield message.regex  # type: ignore[attr-defined]
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in value if field.is_repeated else [value]:
            yield from all_regexes(item)


def deprecated_fields(message: Message, path: str = "") -> Iterator[str]:
    for field, value in message.ListFields():
        where = f"{path}.{field.name}"
        if field.GetOptions().deprecated:
            yield where
        if field.message_type is not None:
            for item in value if field.is_repeated else [value]:
                yield from deprecated_fields(item, where)


def fullmatch(regex: str, value: str) -> bool:
    return re2.fullmatch(regex, value) is not None


def render_view(view: xv.RoutingView) -> resources.Resources:
    return render(view, listen_port=PORT)


# A view that uses every feature: two lanes entering at gateway, every kind and op.
RICH_VIEW = make_view(
    lane(
        "blue",
        weight=20,
        versions=(("cart", "v2"), ("gateway", "v2")),
        rules=(
            rule(
                cond(xv.MatchKind.HEADER, "X-User", xv.MatchOp.EXACT, "42"),
                cond(xv.MatchKind.COOKIE, "session", xv.MatchOp.PREFIX, "beta-"),
                cond(xv.MatchKind.PATH, "", xv.MatchOp.PREFIX, "/api"),
            ),
            rule(cond(xv.MatchKind.QUERY, "preview", xv.MatchOp.PRESENT)),
        ),
    ),
    lane(
        "green",
        weight=10,
        versions=(("stock", "v2"),),
        rules=(rule(cond(xv.MatchKind.HEADER, "x-tier", xv.MatchOp.REGEX, "gold|platinum")),),
    ),
)

# RICH_VIEW's clusters, sorted: blue has cart v2 and gateway v2, green has stock v2. green
# also enters at gateway, where its rules and share go to base through green's own cluster.
# Elsewhere a lane has no cluster: its traffic takes the service's base cluster.
RICH_VIEW_CLUSTERS = [
    "cart|v1",
    "cart|v2|blue",
    "gateway|v1",
    "gateway|v1|green",
    "gateway|v2|blue",
    "stock|v1",
    "stock|v2|green",
]


# --------------------------------------------------------------------------- effective view


def test_effective_view_drops_gray_versions_without_endpoints() -> None:
    view = make_view(lane("blue", weight=30, versions=(("cart", "v2"), ("stock", "v3"))))

    effective = effective_view(view)

    assert effective.lanes == (lane("blue", weight=30, versions=(("cart", "v2"),)),)
    assert effective != view


def test_effective_view_keeps_lanes_that_lose_every_version() -> None:
    view = make_view(lane("blue", weight=30, versions=(("stock", "v3"),)))

    (only,) = effective_view(view).lanes

    assert (only.name, only.weight, only.versions) == ("blue", 30, ())


def test_effective_view_of_a_servable_view_is_equal() -> None:
    view = make_view(lane("blue", weight=30, versions=(("cart", "v2"),)))
    assert effective_view(view) == view


def test_render_serves_empty_gray_versions_from_base() -> None:
    view = make_view(lane("blue", weight=30, versions=(("cart", "v2"), ("stock", "v3"))))
    res = render_view(view)

    assert not [n for n in res[resources.CLUSTER].items if n.startswith("stock|v3")]
    assert not [n for n in route_clusters(route_config(res)) if n.startswith("stock|v3")]
    assert not [n for n in res[resources.ENDPOINT].items if n.startswith("stock|v3")]
    # blue keeps no version of stock: no lane route there, its traffic takes stock's base.
    assert route_names(res, "stock") == ["default"]
    assert named(res, "stock", "default").route.cluster == "stock|v1"
    assert [n for n in res[resources.CLUSTER].items if n.startswith("stock|")] == ["stock|v1"]
    assert res[resources.ROUTE].version == render_view(effective_view(view))[resources.ROUTE].version


# --------------------------------------------------------------------------------- CDS/EDS


def test_clusters_are_each_base_and_one_per_lane_where_it_has_a_version_or_enters() -> None:
    res = render_view(RICH_VIEW)
    assert list(res[resources.CLUSTER]) == RICH_VIEW_CLUSTERS


def test_cluster_is_eds_over_ads() -> None:
    res = render_view(make_view(connect_timeout_ms=2500))
    cluster = item(res, resources.CLUSTER, "cart|v1")

    assert cluster.name == "cart|v1"
    assert cluster.type == cluster.DiscoveryType.EDS
    assert cluster.eds_cluster_config.service_name == "cart|v1"
    eds_config = cluster.eds_cluster_config.eds_config
    assert eds_config.HasField("ads")
    assert eds_config.resource_api_version == config_source_pb2.ApiVersion.V3
    assert (cluster.connect_timeout.seconds, cluster.connect_timeout.nanos) == (2, 500_000_000)
    assert cluster.lb_policy == cluster.LbPolicy.ROUND_ROBIN


def test_load_assignments_sort_and_deduplicate_endpoints() -> None:
    view = dataclasses.replace(
        make_view(),
        endpoints=(
            xv.VersionEndpoints(
                "cart",
                "v1",
                (xv.Endpoint("10.0.0.2", 80), xv.Endpoint("10.0.0.1", 81), xv.Endpoint("10.0.0.1", 80))
                + (xv.Endpoint("10.0.0.2", 80),),
            ),
        ),
    )
    assignment = item(render_view(view), resources.ENDPOINT, "cart|v1")

    (locality,) = assignment.endpoints
    addresses = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for e in locality.lb_endpoints
    ]
    assert assignment.cluster_name == "cart|v1"
    assert addresses == [("10.0.0.1", 80), ("10.0.0.1", 81), ("10.0.0.2", 80)]


def test_each_cluster_has_its_own_eds_resource_with_the_endpoints_of_its_version() -> None:
    # A new cluster warms in Envoy only once it receives its EDS resource, so no cluster
    # may share one the proxy already holds: every cluster asks for one named like itself.
    res = render_view(RICH_VIEW)
    clusters = res[resources.CLUSTER].items

    for name, cluster in clusters.items():
        assert cluster.eds_cluster_config.service_name == name  # type: ignore[attr-defined]
    # One ClusterLoadAssignment per cluster, named after it.
    assert list(res[resources.ENDPOINT]) == list(res[resources.CLUSTER])
    for name, assignment in res[resources.ENDPOINT].items.items():
        assert assignment.cluster_name == name  # type: ignore[attr-defined]
    # Each holds the endpoints of the version its cluster serves, whatever the lane.
    for name, ports in [
        ("cart|v1", [8010, 8011]),
        ("cart|v2|blue", [8012]),
        ("gateway|v1", [8001]),
        ("gateway|v1|green", [8001]),
        ("gateway|v2|blue", [8002]),
        ("stock|v1", [8021]),
        ("stock|v2|green", [8022]),
    ]:
        assert addresses(res, name) == [("10.0.0.1", p) for p in ports], name


def test_two_lanes_on_one_gray_version_get_two_clusters_and_two_assignments_with_identical_endpoints() -> None:
    res = render_view(
        make_view(
            lane("blue", versions=(("cart", "v2"),)),
            lane("green", versions=(("cart", "v2"),)),
        )
    )
    cart_clusters = [n for n in res[resources.CLUSTER] if n.startswith("cart|")]
    cart_assignments = [n for n in res[resources.ENDPOINT] if n.startswith("cart|")]

    assert cart_clusters == ["cart|v1", "cart|v2|blue", "cart|v2|green"]
    assert cart_assignments == ["cart|v1", "cart|v2|blue", "cart|v2|green"]
    for name in ("cart|v2|blue", "cart|v2|green"):
        assert item(res, resources.CLUSTER, name).eds_cluster_config.service_name == name
    assert addresses(res, "cart|v2|blue") == addresses(res, "cart|v2|green") == [("10.0.0.1", 8012)]


def test_a_lane_whose_gray_version_has_no_endpoints_falls_back_to_the_base_cluster_unless_it_enters_there() -> None:
    res = render_view(make_view(lane("blue", weight=30, versions=(("cart", "v2"), ("stock", "v3")))))

    # No lane route and no lane cluster at stock: blue's traffic takes stock's base cluster.
    assert route_names(res, "stock") == ["default"]
    assert named(res, "stock", "default").route.cluster == "stock|v1"
    assert [n for n in res[resources.CLUSTER] if n.startswith("stock|")] == ["stock|v1"]
    assert [n for n in res[resources.ENDPOINT] if n.startswith("stock|")] == ["stock|v1"]
    assert addresses(res, "stock|v1") == [("10.0.0.1", 8021)]
    # The lane's servable version keeps its own cluster.
    assert named(res, "cart", "lane/blue/header").route.cluster == "cart|v2|blue"

    # At the lane's entry, its share still goes to base through the lane's own cluster.
    entering = render_view(make_view(lane("blue", entry="stock", weight=30, versions=(("stock", "v3"),))))
    assert [n for n in entering[resources.CLUSTER] if n.startswith("stock|")] == ["stock|v1", "stock|v1|blue"]
    assert [n for n in entering[resources.ENDPOINT] if n.startswith("stock|")] == ["stock|v1", "stock|v1|blue"]
    assert item(entering, resources.CLUSTER, "stock|v1|blue").eds_cluster_config.service_name == "stock|v1|blue"
    assert addresses(entering, "stock|v1|blue") == addresses(entering, "stock|v1") == [("10.0.0.1", 8021)]
    split = named(entering, "stock", "split/without-baggage")
    assert weights(split) == [("stock|v1|blue", 30), ("stock|v1", 70)]
    assert not [n for n in route_names(entering, "stock") if n.startswith("lane/")]


def test_base_without_endpoints_still_has_a_cluster_and_an_empty_assignment() -> None:
    view = dataclasses.replace(make_view(), endpoints=())
    res = render_view(view)

    assert "gateway|v1" in res[resources.CLUSTER].items
    assert list(item(res, resources.ENDPOINT, "gateway|v1").endpoints) == []


def test_every_routed_cluster_exists_and_every_cluster_has_endpoints_resource() -> None:
    res = render_view(RICH_VIEW)
    clusters = res[resources.CLUSTER].items

    assert route_clusters(route_config(res)) <= set(clusters)
    eds_names = {c.eds_cluster_config.service_name for c in clusters.values()}  # type: ignore[attr-defined]
    assert set(res[resources.ENDPOINT].items) == eds_names


# ------------------------------------------------------------------------------------- LDS


def test_listener_serves_scoped_rds_through_the_router() -> None:
    res = render(make_view(), listen_port=18080, listen_address="0.0.0.0")
    (name,) = list(res[resources.LISTENER])
    listener = item(res, resources.LISTENER, name)

    assert name == "graylane_http_18080"
    assert listener.address.socket_address.address == "0.0.0.0"
    assert listener.address.socket_address.port_value == 18080
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    assert network_filter.name == "envoy.filters.network.http_connection_manager"
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    assert manager.stat_prefix == "graylane"
    assert not manager.HasField("rds")
    scoped = manager.scoped_routes
    assert scoped.name == xv.SCOPED_ROUTES_NAME
    (fragment,) = scoped.scope_key_builder.fragments
    extractor = fragment.header_value_extractor
    # The authority without its port: "cart" and "cart:8080" both key to the scope "cart".
    assert (extractor.name, extractor.element_separator, extractor.index) == (":authority", ":", 0)
    for source in (scoped.rds_config_source, scoped.scoped_rds.scoped_rds_config_source):
        assert source.HasField("ads")
        assert source.resource_api_version == config_source_pb2.ApiVersion.V3
    assert not scoped.HasField("scoped_route_configurations_list")
    (router,) = manager.http_filters
    assert router.name == "envoy.filters.http.router"
    assert router.typed_config.Unpack(router_pb2.Router())


# ------------------------------------------------------------------------------- RDS shape


def test_one_route_config_per_service_holding_exactly_its_virtual_host() -> None:
    res = render_view(make_view())

    assert list(res[resources.ROUTE]) == ["graylane/cart", "graylane/gateway", "graylane/stock"]
    for service in ("cart", "gateway", "stock"):
        config = item(res, resources.ROUTE, xv.route_config_name(service))
        assert config.name == f"graylane/{service}"
        assert [(v.name, list(v.domains)) for v in config.virtual_hosts] == [(service, [service, f"{service}:*"])]


def test_one_eager_scope_per_service_keyed_by_its_name_naming_its_route_config() -> None:
    res = render_view(make_view())

    assert list(res[resources.SCOPED_ROUTE]) == list(res[resources.ROUTE])
    for service in ("cart", "gateway", "stock"):
        scope = item(res, resources.SCOPED_ROUTE, xv.route_config_name(service))
        assert scope.route_configuration_name == xv.route_config_name(service)
        assert [f.string_key for f in scope.key.fragments] == [service]
        assert not scope.on_demand
        assert not scope.HasField("route_configuration")  # fetched by RDS, so it changes alone
    assert consistency_gaps(res) == ()


def test_a_weight_change_changes_only_the_entry_services_route_config() -> None:
    before = render_view(make_view(lane("blue", weight=10, versions=(("cart", "v2"),))))
    after = render_view(make_view(lane("blue", weight=20, versions=(("cart", "v2"),))))

    changed = {
        n for n in after[resources.ROUTE] if after[resources.ROUTE].versions[n] != before[resources.ROUTE].versions[n]
    }
    assert changed == {"graylane/gateway"}
    for type_url in (resources.CLUSTER, resources.ENDPOINT, resources.LISTENER, resources.SCOPED_ROUTE):
        assert after[type_url].versions == before[type_url].versions


# ------------------------------------------------------------------------- staged lanes


def test_a_staged_lane_has_its_clusters_and_endpoints_and_no_route() -> None:
    staged = lane("blue", versions=(("cart", "v2"), ("stock", "v2")))
    plain = render_view(make_view())
    res = render_view(dataclasses.replace(make_view(), staged=(staged,)))

    # The clusters it will have once live: its gray versions and its own one at the entry.
    added = set(res[resources.CLUSTER]) - set(plain[resources.CLUSTER])
    assert added == {"cart|v2|blue", "stock|v2|blue", "gateway|v1|blue"}
    assert set(res[resources.ENDPOINT]) - set(plain[resources.ENDPOINT]) == added
    assert addresses(res, "cart|v2|blue") == [("10.0.0.1", 8012)]
    # ...and not one route changes: tagged and untagged traffic go where they went.
    for type_url in (resources.ROUTE, resources.SCOPED_ROUTE, resources.LISTENER):
        assert res[type_url].versions == plain[type_url].versions
    assert not [n for n in route_clusters(route_config(res)) if n.endswith("|blue")]
    assert consistency_gaps(res) == ()


def test_a_staged_lane_going_live_changes_routes_only() -> None:
    versions = (("cart", "v2"), ("stock", "v2"))
    before = render_view(dataclasses.replace(make_view(), staged=(lane("blue", versions=versions),)))
    beta = rule(cond(xv.MatchKind.HEADER, "x-beta", xv.MatchOp.EXACT, "1"))
    after = render_view(make_view(lane("blue", weight=10, versions=versions, rules=(beta,))))

    for type_url in (resources.CLUSTER, resources.ENDPOINT, resources.LISTENER, resources.SCOPED_ROUTE):
        assert after[type_url].versions == before[type_url].versions, type_url
    assert after[resources.ROUTE].version != before[resources.ROUTE].version
    # And back (held at no lane, or a pending release deleted once no route uses it).
    assert render_view(make_view())[resources.CLUSTER].version != before[resources.CLUSTER].version


def test_a_staged_gray_version_without_endpoints_is_staged_as_it_will_be_served() -> None:
    # stock v3 has no endpoints: live, the lane would serve stock from base (no cluster).
    view = dataclasses.replace(make_view(), staged=(lane("blue", versions=(("cart", "v2"), ("stock", "v3"))),))
    res = render_view(view)
    assert not [n for n in res[resources.CLUSTER] if n.startswith("stock|v3")]
    assert "cart|v2|blue" in res[resources.CLUSTER].items
    assert effective_view(view).staged == (lane("blue", versions=(("cart", "v2"),)),)


def test_a_staged_lane_sharing_a_live_lanes_clusters_adds_nothing() -> None:
    live = lane("blue", weight=10, versions=(("cart", "v2"),))
    res = render_view(dataclasses.replace(make_view(live), staged=(lane("blue", versions=(("cart", "v2"),)),)))
    assert res[resources.CLUSTER].versions == render_view(make_view(live))[resources.CLUSTER].versions


def test_scope_keys_are_the_validated_lower_case_service_names() -> None:
    # Scope keys match the authority exactly (virtual-host domains did so case-insensitively).
    # Service names are validated lower-case DNS labels (controlplane.model), so the scope of
    # a service is its name as clients address it; a mixed-case Host finds no scope (404).
    res = render_view(make_view())
    keys = [f.string_key for s in res[resources.SCOPED_ROUTE].items.values() for f in s.key.fragments]  # type: ignore[attr-defined]
    assert keys == ["cart", "gateway", "stock"]
    assert all(key == key.lower() for key in keys)


def test_without_lanes_every_service_routes_to_base() -> None:
    res = render_view(make_view())
    for service in ("cart", "gateway", "stock"):
        (only,) = routes_of(res, service)
        assert only.match.prefix == "/"
        assert not only.match.headers
        assert only.route.cluster == f"{service}|v1"


def test_route_order_at_the_entry() -> None:
    assert route_names(render_view(RICH_VIEW), "gateway") == [
        "lane/blue/header",
        "lane/blue/baggage",
        # green has no gateway version: no lane routes, its tagged traffic takes tagged/*
        "tagged/header",
        "tagged/baggage",
        "rule/blue/0/with-baggage",
        "rule/blue/0/without-baggage",
        "rule/blue/1/with-baggage",
        "rule/blue/1/without-baggage",
        "rule/green/0/with-baggage",
        "rule/green/0/without-baggage",
        "split/with-baggage",
        "split/without-baggage",
        "default",
    ]


def test_a_service_inside_lanes_gets_only_the_routes_of_lanes_with_a_version_of_it_and_default() -> None:
    res = render_view(RICH_VIEW)
    # blue has a version of cart only, green of stock only.
    assert route_names(res, "cart") == ["lane/blue/header", "lane/blue/baggage", "default"]
    assert route_names(res, "stock") == ["lane/green/header", "lane/green/baggage", "default"]


def test_every_route_retries_only_failures_before_the_upstream() -> None:
    for vhost in route_config(render_view(RICH_VIEW)).virtual_hosts:
        for r in vhost.routes:
            assert r.route.retry_policy.retry_on == "connect-failure,refused-stream"
            assert r.route.retry_policy.num_retries.value == 2


def test_rendering_uses_no_deprecated_field() -> None:
    res = render_view(RICH_VIEW)
    for typed in res.by_type.values():
        for message in typed.items.values():
            assert list(deprecated_fields(message)) == []
    manager = hcm_pb2.HttpConnectionManager()
    listener = item(res, resources.LISTENER, "graylane_http_15001")
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert list(deprecated_fields(manager)) == []


def test_every_regex_compiles_in_re2_within_envoys_program_size() -> None:
    res = render_view(RICH_VIEW)
    regexes = list(all_regexes(route_config(res)))
    assert regexes
    for regex in regexes:
        assert re2.compile(regex).programsize <= ENVOY_MAX_PROGRAM_SIZE, regex


# ----------------------------------------------------------------------- step 1: lane routes


def test_lane_header_route_sends_the_lane_to_its_version() -> None:
    r = named(render_view(RICH_VIEW), "cart", "lane/blue/header")

    assert r.match.prefix == "/"
    (matcher,) = r.match.headers
    assert matcher.name == "x-graylane"
    assert matcher.string_match.exact == "blue"
    assert r.route.cluster == "cart|v2|blue"
    assert not r.request_headers_to_add  # already tagged: nothing to add


def test_lane_baggage_route_applies_only_without_the_lane_header() -> None:
    r = named(render_view(RICH_VIEW), "cart", "lane/blue/baggage")

    absent = header(r.match, "x-graylane")
    assert is_absent(absent)
    assert header(r.match, "baggage").string_match.HasField("safe_regex")
    assert r.route.cluster == "cart|v2|blue"


def test_lanes_are_listed_in_view_order() -> None:
    first = lane("zeta", weight=0, versions=(("cart", "v2"),))
    second = lane("alpha", weight=0, versions=(("cart", "v2"),))

    forward = route_names(render_view(make_view(first, second)), "cart")
    backward = route_names(render_view(make_view(second, first)), "cart")

    assert forward[:4] == ["lane/zeta/header", "lane/zeta/baggage"] + [
        "lane/alpha/header",
        "lane/alpha/baggage",
    ]
    assert backward[:2] == ["lane/alpha/header", "lane/alpha/baggage"]


def lane_baggage_regex(lane_name: str) -> str:
    res = render_view(make_view(lane(lane_name, versions=(("cart", "v2"),))))
    regex: str = header(named(res, "cart", f"lane/{lane_name}/baggage").match, "baggage").string_match.safe_regex.regex
    return regex


@pytest.mark.parametrize(
    "value",
    [
        "graylane=blue",
        "graylane=blue;ttl=3",
        "userId=alice,graylane=blue",
        "userId=alice, graylane = blue ;p, isProduction=false",
        "a=1,graylane=blue,b=2",
        "a=1;graylane=x,graylane=blue",  # a property named graylane is not a member
        "\tgraylane=blue\t",
        "a=1,graylane=blue",  # two baggage lines, as Envoy joins them
    ],
)
def test_lane_baggage_regex_matches_the_member(value: str) -> None:
    assert fullmatch(lane_baggage_regex("blue"), value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "graylane=blue2",
        "graylane=blu",
        "graylane=green",
        "xgraylane=blue",
        "graylanes=blue",
        "a=1;graylane=blue",  # property, not member
        "userId=graylane=blue",
        "graylane=bluex;p",
    ],
)
def test_lane_baggage_regex_rejects_other_values(value: str) -> None:
    assert not fullmatch(lane_baggage_regex("blue"), value)


def test_lane_names_are_escaped_in_baggage_regex() -> None:
    regex = lane_baggage_regex("r.1+x")
    assert fullmatch(regex, "graylane=r.1+x")
    assert not fullmatch(regex, "graylane=rZ11x")


def test_lane_baggage_regex_fits_envoys_limit_for_long_lane_names() -> None:
    regex = lane_baggage_regex("checkout-service-release-2024-11-22")
    assert re2.compile(regex).programsize <= ENVOY_MAX_PROGRAM_SIZE


def test_a_lane_without_a_version_of_a_service_has_no_lane_route_there_tagged_traffic_takes_the_base_cluster() -> None:
    res = render_view(RICH_VIEW)
    for service in ("cart", "gateway"):  # green has a version of stock only
        assert not [n for n in route_names(res, service) if n.startswith("lane/green/")]
        assert named(res, service, "default").route.cluster == f"{service}|v1"
    # Inside the lane, green's traffic reaches cart's default route: no green cluster.
    assert "cart|v1|green" not in res[resources.CLUSTER].items
    # At green's entry, its tagged traffic stays on base through the tagged routes.
    for carrier in ("header", "baggage"):
        assert named(res, "gateway", f"tagged/{carrier}").route.cluster == "gateway|v1"


# -------------------------------------------------------------------- step 2: tagged traffic


def test_tagged_traffic_not_claimed_by_a_lane_stays_on_base_at_the_entry() -> None:
    res = render_view(RICH_VIEW)
    by_header = named(res, "gateway", "tagged/header")
    by_baggage = named(res, "gateway", "tagged/baggage")

    (present,) = by_header.match.headers
    assert (present.name, present.present_match) == ("x-graylane", True)
    assert is_absent(header(by_baggage.match, "x-graylane"))
    for r in (by_header, by_baggage):
        assert r.route.cluster == "gateway|v1"
        assert not r.request_headers_to_add  # never re-tagged into another lane


@pytest.mark.parametrize(
    ("value", "tagged"),
    [
        ("graylane=gone", True),
        ("a=1, graylane = x;p", True),
        ("graylane=", True),
        ("a=1", False),
        ("a=1;graylane=x", False),
        ("xgraylane=x", False),
        ("", False),
    ],
)
def test_any_lane_baggage_regex(value: str, tagged: bool) -> None:
    r = named(render_view(RICH_VIEW), "gateway", "tagged/baggage")
    regex = header(r.match, "baggage").string_match.safe_regex.regex
    assert fullmatch(regex, value) is tagged


def test_no_tagged_route_where_no_lane_enters() -> None:
    assert not [n for n in route_names(render_view(RICH_VIEW), "cart") if n.startswith("tagged")]


# ----------------------------------------------------------------------- step 3: entry rules


def rule_route(c: xv.Condition, *, has_baggage: bool = False) -> route_components_pb2.Route:
    view = make_view(lane("blue", versions=(("gateway", "v2"),), rules=(rule(c),)))
    suffix = "with-baggage" if has_baggage else "without-baggage"
    return named(render_view(view), "gateway", f"rule/blue/0/{suffix}")


def test_rule_routes_tag_without_destroying_baggage() -> None:
    c = cond(xv.MatchKind.HEADER, "x-user", xv.MatchOp.EXACT, "42")
    with_baggage = rule_route(c, has_baggage=True)
    without = rule_route(c, has_baggage=False)

    assert is_present(header(with_baggage.match, "baggage"))
    assert is_absent(header(without.match, "baggage"))
    assert tags(with_baggage.request_headers_to_add) == {
        "x-graylane": ("blue", OVERWRITE),
        "baggage": ("%REQ(baggage)%,graylane=blue", OVERWRITE),
    }
    assert tags(without.request_headers_to_add) == {
        "x-graylane": ("blue", OVERWRITE),
        "baggage": ("graylane=blue", OVERWRITE),
    }
    for r in (with_baggage, without):
        assert r.route.cluster == "gateway|v2|blue"
        for option in r.request_headers_to_add:
            assert not option.HasField("append")


def test_rule_of_a_lane_without_entry_version_routes_to_base_but_tags() -> None:
    view = make_view(
        lane("blue", versions=(("cart", "v2"),), rules=(rule(cond(xv.MatchKind.PATH, "", xv.MatchOp.PREFIX, "/b")),))
    )
    r = named(render_view(view), "gateway", "rule/blue/0/without-baggage")

    assert r.route.cluster == "gateway|v1|blue"  # base, through the lane's own cluster
    assert tags(r.request_headers_to_add)["x-graylane"] == ("blue", OVERWRITE)


def test_at_the_entry_of_a_lane_without_a_version_of_it_rules_and_share_go_to_the_lanes_base_cluster() -> None:
    view = make_view(
        lane(
            "blue",
            weight=25,
            versions=(("cart", "v2"),),
            rules=(rule(cond(xv.MatchKind.PATH, "", xv.MatchOp.PREFIX, "/b")),),
        )
    )
    res = render_view(view)

    # The lane's own cluster on the entry's base version, so statistics count it per lane.
    assert [n for n in res[resources.CLUSTER] if n.startswith("gateway|")] == ["gateway|v1", "gateway|v1|blue"]
    assert addresses(res, "gateway|v1|blue") == addresses(res, "gateway|v1") == [("10.0.0.1", 8001)]
    for has_baggage in (True, False):
        expected = {
            "x-graylane": ("blue", OVERWRITE),
            "baggage": ("%REQ(baggage)%,graylane=blue" if has_baggage else "graylane=blue", OVERWRITE),
        }
        suffix = "with-baggage" if has_baggage else "without-baggage"
        r = named(res, "gateway", f"rule/blue/0/{suffix}")
        assert r.route.cluster == "gateway|v1|blue"
        assert tags(r.request_headers_to_add) == expected

        split = split_of(res, has_baggage=has_baggage)
        share, base = split.route.weighted_clusters.clusters
        assert (share.name, share.weight.value) == ("gateway|v1|blue", 25)
        assert tags(share.request_headers_to_add) == expected
        assert (base.name, base.weight.value, list(base.request_headers_to_add)) == ("gateway|v1", 75, [])
    # No lane route at the entry: tagged traffic stays on the plain base cluster.
    assert not [n for n in route_names(res, "gateway") if n.startswith("lane/")]
    assert named(res, "gateway", "tagged/header").route.cluster == "gateway|v1"


@pytest.mark.parametrize(
    ("op", "value", "field", "expected"),
    [
        (xv.MatchOp.EXACT, "42", "exact", "42"),
        (xv.MatchOp.PREFIX, "4", "prefix", "4"),
        (xv.MatchOp.REGEX, "[0-9]+", "safe_regex", "[0-9]+"),
    ],
)
def test_header_condition(op: xv.MatchOp, value: str, field: str, expected: str) -> None:
    r = rule_route(cond(xv.MatchKind.HEADER, "X-User", op, value))
    matcher = header(r.match, "x-user")  # Envoy header names are lower case

    assert matcher.string_match.WhichOneof("match_pattern") == field
    actual = getattr(matcher.string_match, field)
    assert (actual.regex if field == "safe_regex" else actual) == expected
    assert r.match.prefix == "/"


def test_header_present_condition() -> None:
    matcher = header(rule_route(cond(xv.MatchKind.HEADER, "x-beta", xv.MatchOp.PRESENT)).match, "x-beta")
    assert matcher.WhichOneof("header_match_specifier") == "present_match"
    assert matcher.present_match is True


@pytest.mark.parametrize(
    ("op", "value", "field"),
    [(xv.MatchOp.EXACT, "1", "exact"), (xv.MatchOp.PREFIX, "on", "prefix"), (xv.MatchOp.REGEX, "1|on", "safe_regex")],
)
def test_query_condition(op: xv.MatchOp, value: str, field: str) -> None:
    (matcher,) = rule_route(cond(xv.MatchKind.QUERY, "preview", op, value)).match.query_parameters

    assert matcher.name == "preview"
    assert matcher.string_match.WhichOneof("match_pattern") == field


def test_query_present_condition() -> None:
    (matcher,) = rule_route(cond(xv.MatchKind.QUERY, "preview", xv.MatchOp.PRESENT)).match.query_parameters
    assert matcher.WhichOneof("query_parameter_match_specifier") == "present_match"
    assert matcher.present_match is True


def test_path_exact_condition() -> None:
    r = rule_route(cond(xv.MatchKind.PATH, "", xv.MatchOp.EXACT, "/api/v2"))
    assert r.match.WhichOneof("path_specifier") == "path"
    assert r.match.path == "/api/v2"


def test_path_prefix_condition() -> None:
    r = rule_route(cond(xv.MatchKind.PATH, "", xv.MatchOp.PREFIX, "/api"))
    assert r.match.WhichOneof("path_specifier") == "prefix"
    assert r.match.prefix == "/api"


def test_path_regex_condition() -> None:
    r = rule_route(cond(xv.MatchKind.PATH, "", xv.MatchOp.REGEX, "/items/[0-9]+"))
    assert r.match.WhichOneof("path_specifier") == "safe_regex"
    assert r.match.safe_regex.regex == "/items/[0-9]+"


def test_path_present_is_rejected() -> None:
    with pytest.raises(ValueError, match="PATH"):
        rule_route(cond(xv.MatchKind.PATH, "", xv.MatchOp.PRESENT))


def test_two_path_conditions_in_one_rule_are_rejected() -> None:
    view = make_view(
        lane(
            "blue",
            rules=(
                rule(
                    cond(xv.MatchKind.PATH, "", xv.MatchOp.PREFIX, "/a"),
                    cond(xv.MatchKind.PATH, "", xv.MatchOp.PREFIX, "/b"),
                ),
            ),
        )
    )
    with pytest.raises(ValueError, match="PATH"):
        render_view(view)


def test_conditions_of_a_rule_are_anded_in_one_match() -> None:
    r = named(render_view(RICH_VIEW), "gateway", "rule/blue/0/without-baggage")

    assert r.match.prefix == "/api"
    assert header(r.match, "x-user").string_match.exact == "42"
    assert header(r.match, "cookie").string_match.HasField("safe_regex")
    assert is_absent(header(r.match, "baggage"))


def test_rules_are_ored_as_separate_routes() -> None:
    res = render_view(RICH_VIEW)
    second = named(res, "gateway", "rule/blue/1/without-baggage")

    assert second.match.prefix == "/"
    (query,) = second.match.query_parameters
    assert query.name == "preview"
    # `:method` present: true of every HTTP request, never of a gRPC call as gRPC clients
    # match it, so no proxyless client reads a query rule as matching.
    assert [h.name for h in second.match.headers] == [":method", "baggage"]
    assert is_present(second.match.headers[0])


def cookie_regex(op: xv.MatchOp, value: str = "", name: str = "session") -> str:
    r = rule_route(cond(xv.MatchKind.COOKIE, name, op, value))
    regex: str = header(r.match, "cookie").string_match.safe_regex.regex
    assert re2.compile(regex).programsize <= ENVOY_MAX_PROGRAM_SIZE
    return regex


# (op, value): the cookie headers the regex for `session <op> value` matches, and those it must not.
COOKIE_CASES: list[tuple[xv.MatchOp, str, list[tuple[str, bool]]]] = [
    (
        xv.MatchOp.EXACT,
        "abc",
        [
            ("session=abc", True),
            ("a=1; session=abc", True),
            ("session=abc; b=2", True),
            ("a=1; session=abc; b=2", True),
            ("a=1,session=abc", True),  # two Cookie lines joined by Envoy
            ("session=abcd", False),
            ("session=ab", False),
            ("xsession=abc", False),
            ("a=session=abc", False),
            ("session=", False),
            ("", False),
        ],
    ),
    (
        xv.MatchOp.PREFIX,
        "beta-",
        [
            ("session=beta-1", True),
            ("a=1; session=beta-; b=2", True),
            ("session=beta", False),
            ("session=alpha-beta-1", False),
            ("a=beta-1; session=x", False),
        ],
    ),
    (
        xv.MatchOp.REGEX,
        "u[0-9]+|gold",
        [
            ("session=u42", True),
            ("a=1; session=u7; b=2", True),
            ("session=u42x", False),  # the regex must match the whole value
            ("session=xu42", False),
            ("session=gold", True),  # alternation stays inside the value
            ("session=x; gold=1", False),
        ],
    ),
    (
        xv.MatchOp.PRESENT,
        "",
        [
            ("session=", True),
            ("a=1; session=x", True),
            ("sessions=x", False),
            ("a=session", False),
        ],
    ),
]


@pytest.mark.parametrize(
    ("op", "value", "cookie", "matches"),
    [(op, value, cookie, matches) for op, value, cases in COOKIE_CASES for cookie, matches in cases],
)
def test_cookie_match(op: xv.MatchOp, value: str, cookie: str, matches: bool) -> None:
    assert fullmatch(cookie_regex(op, value), cookie) is matches


def test_cookie_names_and_values_are_escaped() -> None:
    regex = cookie_regex(xv.MatchOp.EXACT, "a.b+c", name="s.id")
    assert fullmatch(regex, "s.id=a.b+c")
    assert not fullmatch(regex, "sXid=aXbbc")


# ------------------------------------------------------------------- step 4: weighted split


def split_of(res: resources.Resources, *, has_baggage: bool) -> route_components_pb2.Route:
    suffix = "with-baggage" if has_baggage else "without-baggage"
    return named(res, "gateway", f"split/{suffix}")


def weights(r: route_components_pb2.Route) -> list[tuple[str, int]]:
    return [(c.name, c.weight.value) for c in r.route.weighted_clusters.clusters]


def test_split_lists_lanes_in_view_order_then_base_remainder() -> None:
    r = split_of(render_view(RICH_VIEW), has_baggage=False)

    assert r.match.prefix == "/"
    assert is_absent(header(r.match, "baggage"))
    # green has no gateway version: its share goes to base through green's own cluster,
    # still tagged green.
    assert weights(r) == [("gateway|v2|blue", 20), ("gateway|v1|green", 10), ("gateway|v1", 70)]
    assert not r.route.weighted_clusters.HasField("total_weight")


def test_split_tags_each_lane_share_and_leaves_base_untagged() -> None:
    for has_baggage in (True, False):
        r = split_of(render_view(RICH_VIEW), has_baggage=has_baggage)
        blue, green, base = r.route.weighted_clusters.clusters
        expected_baggage = "%REQ(baggage)%,graylane=blue" if has_baggage else "graylane=blue"

        assert tags(blue.request_headers_to_add) == {
            "x-graylane": ("blue", OVERWRITE),
            "baggage": (expected_baggage, OVERWRITE),
        }
        assert tags(green.request_headers_to_add)["x-graylane"] == ("green", OVERWRITE)
        assert not base.request_headers_to_add
        assert (is_present if has_baggage else is_absent)(header(r.match, "baggage"))
        assert not r.request_headers_to_add


def test_split_at_100_has_no_base_share() -> None:
    res = render_view(make_view(lane("blue", weight=100, versions=(("gateway", "v2"),))))
    assert weights(split_of(res, has_baggage=True)) == [("gateway|v2|blue", 100)]


def test_lanes_at_weight_zero_are_left_out_of_the_split() -> None:
    res = render_view(
        make_view(
            lane("blue", weight=0, versions=(("gateway", "v2"),)),
            lane("green", weight=5, versions=(("cart", "v2"),)),
        )
    )
    assert weights(split_of(res, has_baggage=False)) == [("gateway|v1|green", 5), ("gateway|v1", 95)]


def test_no_split_when_every_weight_is_zero() -> None:
    res = render_view(make_view(lane("blue", weight=0, versions=(("gateway", "v2"),))))
    assert not [n for n in route_names(res, "gateway") if n.startswith("split")]
    assert route_names(res, "gateway")[-1] == "default"


def test_weights_above_100_at_one_entry_are_rejected() -> None:
    view = make_view(lane("blue", weight=60), lane("green", weight=50))
    with pytest.raises(ValueError, match="110"):
        render_view(view)


# ------------------------------------------------------------------- step 4: cohort split

HashPolicy = route_components_pb2.RouteAction.HashPolicy


def cohort_view(cohort: xv.Cohort | None) -> xv.RoutingView:
    return make_view(lane("blue", weight=20, versions=(("gateway", "v2"),), cohort=cohort))


@pytest.mark.parametrize(
    ("cohort", "expected"),
    [
        (xv.Cohort(xv.MatchKind.HEADER, "X-User-Id"), HashPolicy(header=HashPolicy.Header(header_name="x-user-id"))),
        (xv.Cohort(xv.MatchKind.HEADER, "x-user-id"), HashPolicy(header=HashPolicy.Header(header_name="x-user-id"))),
        (xv.Cohort(xv.MatchKind.COOKIE, "uid"), HashPolicy(cookie=HashPolicy.Cookie(name="uid"))),
        (xv.Cohort(xv.MatchKind.COOKIE, "Session.ID"), HashPolicy(cookie=HashPolicy.Cookie(name="Session.ID"))),
    ],
)
def test_a_cohort_hashes_both_split_routes_on_its_key(cohort: xv.Cohort, expected: Any) -> None:
    res = render_view(cohort_view(cohort))
    for has_baggage in (True, False):
        r = split_of(res, has_baggage=has_baggage)

        assert r.route.weighted_clusters.HasField("use_hash_policy")
        assert r.route.weighted_clusters.use_hash_policy.value is True
        assert list(r.route.hash_policy) == [expected]
        # The lane takes the first points of the hash, base the remainder after it.
        assert weights(r) == [("gateway|v2|blue", 20), ("gateway|v1", 80)]


def test_a_cookie_cohort_never_sets_a_cookie() -> None:
    res = render_view(cohort_view(xv.Cohort(xv.MatchKind.COOKIE, "uid")))
    (policy,) = split_of(res, has_baggage=False).route.hash_policy

    assert policy.WhichOneof("policy_specifier") == "cookie"
    assert not policy.cookie.HasField("ttl")  # with a ttl Envoy would generate the cookie
    assert not policy.cookie.path
    assert not policy.terminal


def test_without_a_cohort_the_split_has_no_hash_policy() -> None:
    for view in (cohort_view(None), RICH_VIEW):
        for has_baggage in (True, False):
            r = split_of(render_view(view), has_baggage=has_baggage)
            assert not r.route.weighted_clusters.HasField("use_hash_policy")
            assert list(r.route.hash_policy) == []


def test_a_cohort_hashes_only_the_split_routes() -> None:
    view = cohort_view(xv.Cohort(xv.MatchKind.HEADER, "x-user-id"))
    view = dataclasses.replace(view, lanes=(dataclasses.replace(view.lanes[0], rules=RICH_VIEW.lanes[0].rules),))
    for vhost in route_config(render_view(view)).virtual_hosts:
        for r in vhost.routes:
            hashed = bool(r.route.hash_policy)
            assert hashed is r.name.startswith("split/"), (vhost.name, r.name)


def test_lanes_sharing_a_cohort_at_one_entry_share_one_hash_policy() -> None:
    cohort = xv.Cohort(xv.MatchKind.HEADER, "x-user-id")
    res = render_view(
        make_view(
            lane("blue", weight=20, versions=(("gateway", "v2"),), cohort=cohort),
            lane("green", weight=10, versions=(("cart", "v2"),), cohort=cohort),
        )
    )
    r = split_of(res, has_baggage=True)

    assert list(r.route.hash_policy) == [HashPolicy(header=HashPolicy.Header(header_name="x-user-id"))]
    assert weights(r) == [("gateway|v2|blue", 20), ("gateway|v1|green", 10), ("gateway|v1", 70)]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (xv.Cohort(xv.MatchKind.HEADER, "x-user-id"), xv.Cohort(xv.MatchKind.HEADER, "x-tenant")),
        (xv.Cohort(xv.MatchKind.HEADER, "uid"), xv.Cohort(xv.MatchKind.COOKIE, "uid")),
    ],
)
def test_lanes_entering_one_service_with_different_cohorts_are_rejected(first: xv.Cohort, second: xv.Cohort) -> None:
    view = make_view(
        lane("blue", weight=20, versions=(("gateway", "v2"),), cohort=first),
        lane("green", weight=10, versions=(("cart", "v2"),), cohort=second),
    )
    with pytest.raises(ValueError, match="cohort"):
        render_view(view)


def test_lanes_entering_different_services_may_use_different_cohorts() -> None:
    res = render_view(
        make_view(
            lane("blue", weight=20, versions=(("gateway", "v2"),), cohort=xv.Cohort(xv.MatchKind.HEADER, "x-user-id")),
            lane(
                "green",
                entry="cart",
                weight=10,
                versions=(("cart", "v2"),),
                cohort=xv.Cohort(xv.MatchKind.COOKIE, "uid"),
            ),
        )
    )
    gateway_split = named(res, "gateway", "split/without-baggage")
    cart_split = named(res, "cart", "split/without-baggage")

    assert [p.WhichOneof("policy_specifier") for p in gateway_split.route.hash_policy] == ["header"]
    assert [p.WhichOneof("policy_specifier") for p in cart_split.route.hash_policy] == ["cookie"]
    assert weights(cart_split) == [("cart|v2|green", 10), ("cart|v1", 90)]


def test_a_cohort_change_changes_only_routes() -> None:
    before = render_view(cohort_view(None))
    after = render_view(cohort_view(xv.Cohort(xv.MatchKind.COOKIE, "uid")))

    assert before[resources.ROUTE].version != after[resources.ROUTE].version
    for type_url in (resources.CLUSTER, resources.ENDPOINT, resources.LISTENER):
        assert before[type_url].version == after[type_url].version


def test_the_default_route_goes_to_base() -> None:
    r = named(render_view(RICH_VIEW), "gateway", "default")
    assert r.match.prefix == "/"
    assert not r.match.headers
    assert r.route.cluster == "gateway|v1"


# ----------------------------------------------------------------------------- determinism


def test_rendering_twice_gives_identical_bytes_and_versions() -> None:
    first, second = render_view(RICH_VIEW), render_view(RICH_VIEW)
    for type_url in resources.PUSH_ORDER:
        assert first[type_url].versions == second[type_url].versions
        assert first[type_url].version == second[type_url].version
        for name, message in first[type_url].items.items():
            other = second[type_url].items[name]
            assert message.SerializeToString(deterministic=True) == other.SerializeToString(deterministic=True)


def test_equal_views_built_apart_render_equally() -> None:
    rebuilt = dataclasses.replace(
        RICH_VIEW,
        services=tuple(dataclasses.replace(s) for s in RICH_VIEW.services),
        endpoints=tuple(reversed(RICH_VIEW.endpoints)),
    )
    assert render_view(rebuilt)[resources.ROUTE].version == render_view(RICH_VIEW)[resources.ROUTE].version
    assert render_view(rebuilt)[resources.ENDPOINT].version == render_view(RICH_VIEW)[resources.ENDPOINT].version


def test_service_order_in_the_view_does_not_matter() -> None:
    shuffled = dataclasses.replace(RICH_VIEW, services=tuple(reversed(RICH_VIEW.services)))
    assert render_view(shuffled)[resources.ROUTE].version == render_view(RICH_VIEW)[resources.ROUTE].version


def test_lane_order_in_the_view_is_the_route_order() -> None:
    swapped = dataclasses.replace(RICH_VIEW, lanes=tuple(reversed(RICH_VIEW.lanes)))
    assert render_view(swapped)[resources.ROUTE].version != render_view(RICH_VIEW)[resources.ROUTE].version
    # Clusters and endpoints do not depend on the order of lanes.
    assert render_view(swapped)[resources.CLUSTER].version == render_view(RICH_VIEW)[resources.CLUSTER].version


def test_a_weight_change_changes_only_routes() -> None:
    blue, green = RICH_VIEW.lanes
    heavier = dataclasses.replace(RICH_VIEW, lanes=(dataclasses.replace(blue, weight=50), green))
    before, after = render_view(RICH_VIEW), render_view(heavier)

    assert before[resources.ROUTE].version != after[resources.ROUTE].version
    for type_url in (resources.CLUSTER, resources.ENDPOINT, resources.LISTENER):
        assert before[type_url].version == after[type_url].version


# ------------------------------------------------------------------------ route_clusters


def test_route_clusters_covers_direct_and_weighted_routes() -> None:
    config = route_pb2.RouteConfiguration(
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="s",
                routes=[
                    route_components_pb2.Route(route=route_components_pb2.RouteAction(cluster="a")),
                    route_components_pb2.Route(
                        route=route_components_pb2.RouteAction(
                            weighted_clusters=route_components_pb2.WeightedCluster(
                                clusters=[
                                    route_components_pb2.WeightedCluster.ClusterWeight(name="b"),
                                    route_components_pb2.WeightedCluster.ClusterWeight(name="a"),
                                ]
                            )
                        )
                    ),
                    route_components_pb2.Route(redirect=route_components_pb2.RedirectAction(host_redirect="x")),
                ],
            )
        ]
    )
    assert route_clusters(config) == frozenset({"a", "b"})


def test_route_clusters_of_a_rendering() -> None:
    assert route_clusters(route_config(render_view(RICH_VIEW))) == set(RICH_VIEW_CLUSTERS)


# ------------------------------------------------------------- versions in other clusters

GW = xv.Endpoint("192.0.2.7", 15443)  # the gateway of cluster "east"
# RICH_VIEW where gateway v2 and cart v2 (both gray in blue) and stock v1 (base) run only
# in cluster "east"; every other version runs here.
REMOTE = {("gateway", "v2"), ("cart", "v2"), ("stock", "v1")}
REMOTE_VIEW = dataclasses.replace(
    RICH_VIEW,
    endpoints=tuple(
        dataclasses.replace(ve, endpoints=(GW,), via_cluster="east") if (ve.service, ve.version) in REMOTE else ve
        for ve in RICH_VIEW.endpoints
    ),
)


def rewrite(message: Any) -> str | None:
    """The host rewrite of a RouteAction or a ClusterWeight: its literal, or None."""
    kind = message.WhichOneof("host_rewrite_specifier")
    if kind is None:
        return None
    assert kind == "host_rewrite_literal"
    literal: str = message.host_rewrite_literal
    return literal


def expected_rewrite(cluster: str) -> str | None:
    parsed = xv.parse_cluster_name(cluster)
    assert parsed is not None
    service, version, _ = parsed
    return xv.gateway_authority(service, version) if (service, version) in REMOTE else None


def test_routes_to_a_version_in_another_cluster_carry_its_gateway_authority() -> None:
    res = render_view(REMOTE_VIEW)

    direct = {(vhost.name, r.name): r.route for vhost in route_config(res).virtual_hosts for r in vhost.routes}
    # Lane traffic to a remote gray version, or to a remote base it falls back to.
    assert rewrite(direct["cart", "lane/blue/header"]) == xv.gateway_authority("cart", "v2")
    assert rewrite(direct["cart", "lane/blue/baggage"]) == xv.gateway_authority("cart", "v2")
    assert rewrite(direct["gateway", "rule/blue/0/with-baggage"]) == xv.gateway_authority("gateway", "v2")
    # blue has no version of stock: its traffic there takes the default route to the
    # remote base.
    assert ("stock", "lane/blue/header") not in direct
    assert rewrite(direct["stock", "default"]) == xv.gateway_authority("stock", "v1")
    # Local versions keep the service's own authority.
    for key in [
        ("cart", "default"),
        ("gateway", "tagged/header"),
        ("gateway", "rule/green/0/without-baggage"),
        ("gateway", "default"),
        ("stock", "lane/green/header"),
    ]:
        assert rewrite(direct[key]) is None, key


def test_weighted_entries_to_a_version_in_another_cluster_carry_its_gateway_authority() -> None:
    res = render_view(REMOTE_VIEW)
    for has_baggage in (True, False):
        r = split_of(res, has_baggage=has_baggage)
        blue, green, base = r.route.weighted_clusters.clusters

        assert rewrite(r.route) is None  # per entry, never for the whole split
        assert (blue.name, rewrite(blue)) == ("gateway|v2|blue", xv.gateway_authority("gateway", "v2"))
        assert (green.name, rewrite(green)) == ("gateway|v1|green", None)
        assert (base.name, rewrite(base)) == ("gateway|v1", None)
        # The lane tags still ride along with the rewritten entry.
        assert tags(blue.request_headers_to_add)["x-graylane"] == ("blue", OVERWRITE)


def test_every_route_target_is_rewritten_exactly_when_its_version_is_remote() -> None:
    res = render_view(REMOTE_VIEW)
    seen = {True: 0, False: 0}
    for vhost in route_config(res).virtual_hosts:
        for r in vhost.routes:
            action = r.route
            if action.HasField("weighted_clusters"):
                assert rewrite(action) is None
                targets: list[Any] = list(action.weighted_clusters.clusters)
                pairs = [(t.name, t) for t in targets]
            else:
                pairs = [(action.cluster, action)]
            for cluster, target in pairs:
                expected = expected_rewrite(cluster)
                assert rewrite(target) == expected, (vhost.name, r.name, cluster)
                seen[expected is not None] += 1
    assert seen[True] and seen[False]


def test_a_remote_version_is_served_through_a_cluster_on_the_gateway_endpoints() -> None:
    res = render_view(REMOTE_VIEW)

    for name in ("cart|v2|blue", "gateway|v2|blue", "stock|v1"):
        assert name in res[resources.CLUSTER].items
        assert addresses(res, name) == [(GW.address, GW.port)]
    assert consistency_gaps(res) == ()
    # Same clusters as with every version local: only endpoints and routes differ.
    local = render_view(RICH_VIEW)
    assert list(res[resources.CLUSTER]) == list(local[resources.CLUSTER])
    assert res[resources.CLUSTER].version == local[resources.CLUSTER].version


def test_without_remote_versions_nothing_is_rewritten() -> None:
    for vhost in route_config(render_view(RICH_VIEW)).virtual_hosts:
        for r in vhost.routes:
            assert rewrite(r.route) is None
            for weight in r.route.weighted_clusters.clusters:
                assert rewrite(weight) is None


# --------------------------------------------------------------------------- render_gateway

# What a cluster's gateway serves: local versions with endpoints. cart v2 runs only in
# "east" (left out: this gateway cannot serve it), stock v3 has no endpoints (left out).
GATEWAY_VIEW = xv.RoutingView(
    services=(xv.ServiceRoute("stock", "v1"), xv.ServiceRoute("cart", "v1")),
    endpoints=(
        xv.VersionEndpoints("stock", "v3", ()),
        xv.VersionEndpoints("stock", "v2", eps(8022)),
        xv.VersionEndpoints("stock", "v1", eps(8021)),
        xv.VersionEndpoints("cart", "v2", (GW,), via_cluster="east"),
        xv.VersionEndpoints("cart", "v1", eps(8011, 8010, 8011)),
    ),
    lanes=(
        lane(
            "blue",
            entry="cart",
            weight=30,
            versions=(("cart", "v2"), ("stock", "v2")),
            rules=(rule(cond(xv.MatchKind.HEADER, "x-user", xv.MatchOp.EXACT, "42")),),
        ),
    ),
    connect_timeout_ms=2500,
)
GATEWAY_PORT = 15443


def render_gw(view: xv.RoutingView = GATEWAY_VIEW) -> resources.Resources:
    return render_gateway(view, listen_port=GATEWAY_PORT)


def test_gateway_has_one_virtual_host_per_local_version_with_endpoints() -> None:
    config = route_config(render_gw())

    assert config.name == xv.ROUTE_CONFIG_NAME
    assert [(v.name, list(v.domains)) for v in config.virtual_hosts] == [
        (f"{svc}|{ver}", [xv.gateway_authority(svc, ver), xv.gateway_authority(svc, ver) + ":*"])
        for svc, ver in [("cart", "v1"), ("stock", "v1"), ("stock", "v2")]
    ]


def test_gateway_routes_each_version_to_its_cluster_restoring_the_service_authority() -> None:
    for vhost in route_config(render_gw()).virtual_hosts:
        service, version = vhost.name.split("|")
        (only,) = vhost.routes

        assert only.match.prefix == "/"
        assert not only.match.headers  # decides nothing: no lane or rule matching
        assert only.route.cluster == f"{service}|{version}"
        assert rewrite(only.route) == service
        assert not only.request_headers_to_add  # the lane tags pass through unchanged
        assert not only.route.HasField("weighted_clusters")


def test_gateway_clusters_and_endpoints_are_those_of_its_local_versions() -> None:
    res = render_gw()

    assert list(res[resources.CLUSTER]) == ["cart|v1", "stock|v1", "stock|v2"]
    assert list(res[resources.ENDPOINT]) == ["cart|v1", "stock|v1", "stock|v2"]
    for name, cluster in res[resources.CLUSTER].items.items():
        assert cluster.type == cluster.DiscoveryType.EDS  # type: ignore[attr-defined]
        assert cluster.eds_cluster_config.service_name == name  # type: ignore[attr-defined]
        assert cluster.eds_cluster_config.eds_config.HasField("ads")  # type: ignore[attr-defined]
        assert (cluster.connect_timeout.seconds, cluster.connect_timeout.nanos) == (2, 500_000_000)  # type: ignore[attr-defined]
    assert addresses(res, "cart|v1") == [("10.0.0.1", 8010), ("10.0.0.1", 8011)]  # sorted, deduplicated
    assert addresses(res, "stock|v2") == [("10.0.0.1", 8022)]
    assert route_clusters(route_config(res)) == set(res[resources.CLUSTER].items)
    assert consistency_gaps(res) == ()


def test_gateway_leaves_out_remote_versions_and_versions_without_endpoints() -> None:
    res = render_gw()
    vhosts = [v.name for v in route_config(res).virtual_hosts]
    domains = {d for v in route_config(res).virtual_hosts for d in v.domains}

    for service, version in [("cart", "v2"), ("stock", "v3")]:
        assert f"{service}|{version}" not in vhosts
        assert xv.gateway_authority(service, version) not in domains
        assert not [n for n in res[resources.CLUSTER] if n.startswith(f"{service}|{version}")]
        assert not [n for n in res[resources.ENDPOINT] if n.startswith(f"{service}|{version}")]


def test_gateway_with_no_local_version_serves_an_empty_route_config() -> None:
    view = dataclasses.replace(GATEWAY_VIEW, endpoints=(xv.VersionEndpoints("cart", "v1", (GW,), via_cluster="east"),))
    res = render_gw(view)

    assert len(res[resources.CLUSTER]) == 0
    assert len(res[resources.ENDPOINT]) == 0
    assert list(route_config(res).virtual_hosts) == []
    assert consistency_gaps(res) == ()


def test_gateway_listener_serves_rds_on_the_given_address() -> None:
    res = render_gateway(GATEWAY_VIEW, listen_port=GATEWAY_PORT, listen_address="0.0.0.0")
    listener = item(res, resources.LISTENER, f"graylane_http_{GATEWAY_PORT}")

    assert list(res[resources.LISTENER]) == [f"graylane_http_{GATEWAY_PORT}"]
    assert listener.address.socket_address.address == "0.0.0.0"
    assert listener.address.socket_address.port_value == GATEWAY_PORT
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.rds.route_config_name == xv.ROUTE_CONFIG_NAME
    default = item(render_gw(), resources.LISTENER, f"graylane_http_{GATEWAY_PORT}")
    assert default.address.socket_address.address == "127.0.0.1"


def test_gateway_ignores_lanes_services_and_endpoint_order() -> None:
    plain = dataclasses.replace(GATEWAY_VIEW, lanes=(), services=())
    reordered = dataclasses.replace(GATEWAY_VIEW, endpoints=tuple(reversed(GATEWAY_VIEW.endpoints)))
    first = render_gw()
    for other in (render_gw(plain), render_gw(reordered), render_gw()):
        for type_url in resources.PUSH_ORDER:
            assert other[type_url].version == first[type_url].version, type_url


def test_gateway_uses_no_deprecated_field() -> None:
    for typed in render_gw().by_type.values():
        for message in typed.items.values():
            assert list(deprecated_fields(message)) == []


def test_render_is_the_union_of_each_services_own_resources() -> None:
    view = effective_view(RICH_VIEW)
    res = render_view(view)
    index = ViewIndex(view)
    seen: dict[str, set[str]] = {t: set() for t in res.by_type}
    for service in view.services:
        own = render_service(service, index, connect_timeout_ms=view.connect_timeout_ms)
        assert own.route_config.name == own.scope.name == xv.route_config_name(service.name)
        assert [vh.name for vh in own.route_config.virtual_hosts] == [service.name]
        assert own.clusters.keys() == own.assignments.keys()
        assert all(xv.parse_cluster_name(name)[0] == service.name for name in own.clusters)  # type: ignore[index]
        # Every cluster the service's routes use is its own, so its route config waits for nothing else.
        assert route_clusters(own.route_config) <= own.clusters.keys()
        for type_url, items in (
            (resources.CLUSTER, own.clusters),
            (resources.ENDPOINT, own.assignments),
            (resources.ROUTE, {own.route_config.name: own.route_config}),
            (resources.SCOPED_ROUTE, {own.scope.name: own.scope}),
        ):
            assert not seen[type_url] & items.keys()  # no resource belongs to two services
            seen[type_url] |= items.keys()
            for name, message in items.items():
                assert resources.content_version(message) == res[type_url].versions[name]
    for type_url in (resources.CLUSTER, resources.ENDPOINT, resources.ROUTE, resources.SCOPED_ROUTE):
        assert seen[type_url] == set(res[type_url].items)


# ------------------------------------------------------------------------- proxyless gRPC


def test_proxyless_render_has_one_client_listener_per_service_naming_its_route_config() -> None:
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
    from graylane.xds.view import XDSTP_LISTENER_TEMPLATE, api_listener_names

    res = render(RICH_VIEW, listen_port=10000, proxyless=True)
    services = sorted(s.name for s in RICH_VIEW.services)
    assert set(res[resources.LISTENER].items) == {n for s in services for n in api_listener_names(s)}
    assert api_listener_names("cart") == ("cart", XDSTP_LISTENER_TEMPLATE % "cart")
    listener = res[resources.LISTENER].items["cart"]
    assert not listener.HasField("address") and not listener.filter_chains
    manager = hcm.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(manager)
    assert manager.rds.route_config_name == "graylane/cart"
    assert manager.rds.config_source.HasField("ads")
    (router,) = manager.http_filters  # gRPC wants the router last (here: alone)
    assert router.typed_config.Is(router_pb2.Router.DESCRIPTOR)
    # Everything else is what Envoys get, byte for byte.
    envoy = render(RICH_VIEW, listen_port=10000)
    for t in (resources.CLUSTER, resources.ENDPOINT, resources.ROUTE, resources.SCOPED_ROUTE):
        assert res[t].version == envoy[t].version


def test_endpoints_carry_a_locality_and_weights_that_grpc_clients_require() -> None:
    res = render(RICH_VIEW, listen_port=10000)
    for assignment in res[resources.ENDPOINT].items.values():
        for locality in assignment.endpoints:
            assert locality.HasField("locality") and locality.load_balancing_weight.value == 1
            assert all(e.load_balancing_weight.value == 1 for e in locality.lb_endpoints)


def test_a_header_cohort_gets_a_ring_hash_route_for_grpc_core_clients() -> None:
    from envoy.config.cluster.v3 import cluster_pb2

    res = render_view(cohort_view(xv.Cohort(xv.MatchKind.HEADER, "x-user-id")))
    ring = named(res, "gateway", "split/ring")
    assert ring.route.cluster == "gateway||cohort"
    assert list(ring.route.hash_policy) == [HashPolicy(header=HashPolicy.Header(header_name="x-user-id"))]
    method, path = ring.match.headers
    assert (method.name, path.name) == (":method", ":path")
    assert is_absent(method) and is_present(path)  # never Envoy's (every request has a method)
    (gateway,) = [vh for vh in route_config(res).virtual_hosts if vh.name == "gateway"]
    names = [r.name for r in gateway.routes if r.name.startswith("split/")]
    assert names == ["split/ring", "split/with-baggage", "split/without-baggage"]
    cluster = item(res, resources.CLUSTER, "gateway||cohort")
    assert cluster.lb_policy == cluster_pb2.Cluster.LbPolicy.RING_HASH
    assert cluster.ring_hash_lb_config.minimum_ring_size.value == cluster.ring_hash_lb_config.maximum_ring_size.value
    (locality,) = item(res, resources.ENDPOINT, "gateway||cohort").endpoints
    weights_by_port = {
        e.endpoint.address.socket_address.port_value: e.load_balancing_weight.value for e in locality.lb_endpoints
    }
    assert weights_by_port == {8002: 20 * 10_000, 8001: 80 * 10_000}  # the lane's share, the base's rest


def test_no_ring_route_for_a_cookie_cohort_or_without_a_cohort() -> None:
    for cohort in (xv.Cohort(xv.MatchKind.COOKIE, "uid"), None):
        res = render_view(cohort_view(cohort))
        assert "gateway||cohort" not in res[resources.CLUSTER].items
        assert all(r.name != "split/ring" for vh in route_config(res).virtual_hosts for r in vh.routes)


def test_what_one_render_builds_never_changes_what_the_next_builds() -> None:
    # Clusters, endpoint sets and routes start as copies of shared templates that are then
    # completed (a ring-hash cluster, a gateway's host rewrite, a cohort's hash policy):
    # completing one must never reach the template, or every later render would carry it.
    plain = make_view(lane("blue", weight=20, versions=(("gateway", "v2"),)))

    def versions() -> dict[str, str]:
        forget_reused()  # built afresh from the templates, nothing reused
        out = render_view(plain)
        return {t: out[t].version for t in resources.PUSH_ORDER}

    from envoy.config.cluster.v3 import cluster_pb2

    before = versions()
    for view in (cohort_view(xv.Cohort(xv.MatchKind.HEADER, "x-user-id")), REMOTE_VIEW, RICH_VIEW):
        forget_reused()
        render_view(view)
        render_gateway(view, listen_port=PORT + 1)
    assert versions() == before
    cluster = item(render_view(plain), resources.CLUSTER, "gateway|v1")
    assert cluster.lb_policy == cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN
    assert not cluster.HasField("ring_hash_lb_config")
