"""SnapshotCache: consistency check, watches, requested keys, node keys, content history."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2
from graylane.xds.cache import (
    DEFAULT_KEY,
    PROXYLESS_KEY,
    InconsistentSnapshot,
    InvalidNodeMetadata,
    SnapshotCache,
    consistency_gaps,
    is_proxyless,
    listen_port_key,
)
from graylane.xds.render import render, render_gateway
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Resources
from graylane.xds.view import Endpoint, Lane, RoutingView, ServiceRoute, VersionEndpoints

VIEW = RoutingView(
    services=(ServiceRoute("a", "v1"),),
    endpoints=(
        VersionEndpoints("a", "v1", (Endpoint("127.0.0.1", 1001),)),
        VersionEndpoints("a", "v2", (Endpoint("127.0.0.1", 1002),)),
    ),
)
GOOD = render(VIEW, listen_port=10000)
GATEWAY = render_gateway(VIEW, listen_port=10000)
GRAY = render(
    RoutingView(VIEW.services, VIEW.endpoints, (Lane("g", "a", 10, (("a", "v2"),)),)),
    listen_port=10000,
)


def without(resources: Resources, type_url: str) -> Resources:
    return Resources.of({t: ({} if t == type_url else resources[t].items) for t in resources.by_type})


def test_a_rendered_snapshot_is_consistent() -> None:
    assert consistency_gaps(GOOD) == ()


@pytest.mark.parametrize(
    ("broken", "missing"),
    [
        (without(GOOD, ENDPOINT), "EDS resource 'a|v1' for EDS cluster is missing"),
        (without(GOOD, ROUTE), "route config 'graylane/a' of scope 'graylane/a' is missing"),
        (without(GATEWAY, ROUTE), "route config 'graylane' of listener 'graylane_http_10000' is missing"),
        (
            Resources.of(
                {
                    **{t: GRAY[t].items for t in GRAY.by_type},
                    CLUSTER: GOOD[CLUSTER].items,
                    ENDPOINT: GOOD[ENDPOINT].items,
                }
            ),
            "cluster 'a|v2|g' routed to by 'graylane/a' is missing",
        ),
        (
            # The gray lane's cluster a|v2|g has its own EDS resource, named like it.
            Resources.of({**{t: GOOD[t].items for t in GOOD.by_type}, ENDPOINT: GRAY[ENDPOINT].items}),
            "EDS resource 'a|v2|g' names no EDS cluster",
        ),
    ],
)
def test_set_snapshot_rejects_dangling_references(broken: Resources, missing: str) -> None:
    cache = SnapshotCache()
    with pytest.raises(InconsistentSnapshot) as info:
        cache.set_snapshot("k", broken)
    assert missing in info.value.missing
    assert cache.snapshot("k") is None


def test_a_listener_naming_a_route_config_is_inconsistent_without_it() -> None:
    only_listener = Resources.of({LISTENER: GATEWAY[LISTENER].items})
    assert consistency_gaps(only_listener) != ()


def test_a_listener_with_scoped_routes_and_no_scopes_is_consistent() -> None:
    # A view without services: the listener serves nothing (404) until scopes come.
    assert consistency_gaps(render(RoutingView((), ()), listen_port=10000)) == ()
    assert consistency_gaps(Resources.of({LISTENER: GOOD[LISTENER].items})) == ()


def test_a_scope_without_its_route_config_is_a_gap_even_with_other_route_configs() -> None:
    two = render(
        RoutingView((*VIEW.services, ServiceRoute("b", "v1")), (*VIEW.endpoints, VersionEndpoints("b", "v1", ()))),
        listen_port=10000,
    )
    routes = {n: m for n, m in two[ROUTE].items.items() if n != "graylane/b"}
    broken = Resources.of({**{t: two[t].items for t in two.by_type}, ROUTE: routes})
    assert consistency_gaps(broken) == ("route config 'graylane/b' of scope 'graylane/b' is missing",)
    scopes = {n: m for n, m in two[SCOPED_ROUTE].items.items() if n != "graylane/b"}
    # A route config no scope names is only unused, not dangling.
    assert consistency_gaps(Resources.of({**{t: two[t].items for t in two.by_type}, SCOPED_ROUTE: scopes})) == ()


def test_watchers_of_a_key_are_woken_only_by_a_change_of_that_key() -> None:
    cache = SnapshotCache()
    woken: list[str] = []
    cache.watch("k", lambda: woken.append("k"))
    other = cache.watch("other", lambda: woken.append("other"))
    cache.set_snapshot("k", GOOD)
    cache.set_snapshot("k", GOOD)  # same content: same versions, nobody woken
    cache.set_snapshot("k", GRAY)
    assert woken == ["k", "k"]
    other.close()
    cache.set_snapshot("other", GOOD)
    assert woken == ["k", "k"]


def test_requested_keys_and_the_key_requested_callback() -> None:
    cache = SnapshotCache()
    asked: list[str] = []
    cache.on_key_requested(asked.append)
    cache.set_snapshot("ready", GOOD)
    first = cache.watch("ready", lambda: None)
    second = cache.watch("new", lambda: None)
    third = cache.watch("new", lambda: None)
    assert asked == ["new", "new"]  # asked again while it still has no snapshot
    assert cache.requested_keys() == {"ready", "new"}
    first.close()
    second.close()
    assert cache.requested_keys() == {"new"}
    third.close()
    assert cache.requested_keys() == frozenset()


def test_the_key_requested_callback_may_set_the_snapshot_synchronously() -> None:
    cache = SnapshotCache()
    cache.on_key_requested(lambda key: cache.set_snapshot(key, GOOD))
    cache.watch("10000", lambda: None)
    assert cache.snapshot("10000") is GOOD


def node(**metadata: object) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    return base_pb2.Node(id="n", metadata=meta)


def test_listen_port_key() -> None:
    assert listen_port_key(node(listen_port="10001")) == "10001"
    assert listen_port_key(node(listen_port=10002)) == "10002"
    assert listen_port_key(node()) == DEFAULT_KEY
    assert listen_port_key(node(listen_port="08080")) == listen_port_key(node(listen_port=8080)) == "8080"
    assert listen_port_key(node(listen_port=1)) == "1" and listen_port_key(node(listen_port="65535")) == "65535"


def test_proxyless_grpc_clients_have_their_own_key_whatever_their_metadata() -> None:
    grpc_python = base_pb2.Node(id="c", user_agent_name="gRPC Python")
    grpc_js = base_pb2.Node(id="c", user_agent_name="grpc-node-js")
    by_feature = base_pb2.Node(id="c", client_features=["envoy.lb.does_not_support_overprovisioning"])
    for n in (grpc_python, grpc_js, by_feature):
        assert is_proxyless(n) and listen_port_key(n) == PROXYLESS_KEY
    with_port = node(listen_port="oops")
    with_port.user_agent_name = "gRPC Go"
    assert listen_port_key(with_port) == PROXYLESS_KEY  # a listen_port means nothing to it
    assert not is_proxyless(base_pb2.Node(id="e", user_agent_name="envoy"))
    envoy_with_feature = base_pb2.Node(id="e", user_agent_name="envoy", client_features=[by_feature.client_features[0]])
    assert not is_proxyless(envoy_with_feature)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(99999, "99999"), ("99999", "'99999'"), ("-5", "'-5'"), (-5, "-5"), (0, "0"), ("", "''"),
     (80.5, "80.5"), ("80a", "'80a'"), (" 80", "' 80'"), ("\u0668\u0660", "'\u0668\u0660'"),
     (True, "true"), (None, "null")],
)  # fmt: skip
def test_listen_port_key_refuses_anything_but_a_port(value: object, shown: str) -> None:
    with pytest.raises(InvalidNodeMetadata) as raised:
        listen_port_key(node(listen_port=value))
    assert str(raised.value).startswith(f"node.metadata.listen_port: {shown} is not a port")


def test_history_resolves_content_versions_of_stored_snapshots() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("k", GOOD)
    cache.set_snapshot("k", GRAY)
    typed = GOOD[CLUSTER]
    assert cache.history.resolve_set(CLUSTER, typed.version) == dict(typed.items)
    assert cache.history.message(CLUSTER, typed.versions["a|v1"]) == typed.items["a|v1"]
    assert cache.history.resolve_set(CLUSTER, "no-such-version") is None


def test_the_last_watch_of_a_key_releases_it_and_tells_the_owner() -> None:
    cache = SnapshotCache()
    released: list[str] = []
    requested: list[str] = []
    cache.on_key_requested(requested.append)
    cache.on_key_released(released.append)
    cache.set_snapshot("10001", GOOD)
    first, second = cache.watch("10001", lambda: None), cache.watch("10001", lambda: None)
    first.close()
    assert cache.requested_keys() == {"10001"} and released == []
    second.close()
    second.close()  # closing twice is harmless
    assert cache.requested_keys() == frozenset() and released == ["10001"]
    assert cache.keys() == {"10001"}  # the owner decides about the snapshot
    cache.clear_snapshot("10001")
    cache.watch("10001", lambda: None)  # a proxy comes back: the key is asked for afresh
    assert requested == ["10001"]
