"""Render a RoutingView into the Envoy resources one proxy serves.

Owns: the translation of routing intent (services, versions, endpoints, gray lanes) into
CDS, EDS, LDS, RDS and SRDS resources, following docs/ARCHITECTURE.md's routing section. Pure:
RoutingView -> Resources, no I/O, no clocks, no hidden state; the same view renders to
byte-identical resources (and so the same content versions) on every replica and agent.

Must not import: etcd, graylane.controlplane, graylane.agent.

Route order inside the virtual host of a service S (Envoy takes the first match):

1. lane routes: a request tagged with lane L (``x-graylane: L``, or a ``graylane=L``
   baggage member when ``x-graylane`` is absent) -> S's version in L, through the lane's
   own cluster ``S|version|L`` so Envoy's statistics count the lane apart;
2. if S is the entry of some lane: any other tagged request -> S's base (lane isolation:
   tagged traffic is never re-split, and tags of vanished lanes fall back to base);
3. entry rules of each lane entering at S -> the lane, tagging the request;
4. the weighted batch split of the lanes entering at S, tagging the gray share; with a
   cohort key the split is a consistent hash of that key (Envoy's route hash policy
   applied to the weighted clusters), the lane first, so its cohort only grows with the
   weight;
5. everything else -> S's base.

The ``x-graylane`` header is authoritative: baggage is consulted only when it is absent,
so a request whose two carriers disagree still has exactly one lane.

Staged lanes (`RoutingView.staged`: releases created, not started) get the clusters and
endpoints they will have once live, and no route of any kind: traffic, tagged or not, is
routed as if they did not exist, and their start changes route configs only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

import re2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import Message
from graylane.xds import resources
from graylane.xds.view import (
    BAGGAGE_HEADER,
    BAGGAGE_KEY,
    LANE_HEADER,
    ROUTE_CONFIG_NAME,
    SCOPED_ROUTES_NAME,
    Cohort,
    Condition,
    Endpoint,
    Lane,
    MatchKind,
    MatchOp,
    RoutingView,
    Rule,
    ServiceRoute,
    VersionEndpoints,
    api_listener_names,
    cluster_name,
    cohort_cluster_name,
    gateway_authority,
    listener_name,
    parse_cluster_name,
    route_config_name,
)

__all__ = [
    "ServiceResources",
    "api_listeners",
    "ViewIndex",
    "effective_lane",
    "effective_view",
    "render",
    "render_gateway",
    "render_service",
]

_MessageT = TypeVar("_MessageT", bound=Message)
_Routes = RepeatedCompositeFieldContainer[route_components_pb2.Route]  # a virtual host's routes

# Retried failures are those where the request never reached the upstream application,
# so a retry is always safe; it hides endpoint churn during a batch change.
_RETRY_ON = "connect-failure,refused-stream"
_NUM_RETRIES = 2

_STAT_PREFIX = "graylane"
_HCM_FILTER = "envoy.filters.network.http_connection_manager"
_ROUTER_FILTER = "envoy.filters.http.router"

# The one locality every endpoint set is in (proxyless gRPC needs a locality to be named).
_LOCALITY = base_pb2.Locality(zone="graylane")

# Every HTTP request Envoy routes has a `:method`; gRPC clients route a call on its
# metadata before its method is set (measured: grpcio and grpc-js see no `:method`): so a
# route asking for it is read by Envoy alone.
_ENVOY_ONLY_HEADER = ":method"
# The proxyless clients a cohort's ring-hash route is for: those that see the call's
# `:path` among its headers but no `:method` (gRPC C-core: grpcio and the other wrapped
# languages). grpc-js sees no `:path` and goes on to the weighted split: its ring-hash
# picks can wait for ever on an endpoint not connected yet (measured, one call in a few
# hundred), and a failed call costs more than a cohort kept.
_RING_CLIENTS = (
    route_components_pb2.HeaderMatcher(name=_ENVOY_ONLY_HEADER, present_match=True, invert_match=True),
    route_components_pb2.HeaderMatcher(name=":path", present_match=True),
)

_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD

# Regex building blocks. Envoy full-matches safe_regex against the whole header value, and
# joins repeated header lines with "," before matching, so each pattern accepts any
# members before and after the one it looks for. Kept small: Envoy rejects programs over
# RE2 size 100 by default.
_OWS = "[ \t]*"  # optional whitespace (RFC 9110 OWS)
_BAGGAGE_BEFORE = "(?:.*,)?" + _OWS  # W3C baggage members are ","-separated
_COOKIE_BEFORE = "(?:.*[;,])?" + _OWS  # cookies are "; "-separated, lines ","-joined
_REST = "(?:[;,].*)?"  # end of value, or a separator and anything after it


# --------------------------------------------------------------------------- public API


def effective_view(view: RoutingView) -> RoutingView:
    """The view as it can be served now: lanes keep only gray versions with endpoints.

    A gray version without endpoints would be an empty cluster behind a weight or a rule,
    failing every request sent to it; dropping it sends that lane's traffic for the
    service to base instead. Lanes themselves stay, so their tags and weights still apply.
    The control plane compares ``effective_view(v) == v`` to tell whether a batch is
    really applied. Staged lanes are trimmed the same way, so the clusters staged for a
    lane are exactly those it has once live.
    """
    index = ViewIndex(view, lanes=False)
    lanes = tuple(effective_lane(lane, index) for lane in view.lanes)
    staged = tuple(effective_lane(lane, index) for lane in view.staged)
    if lanes == view.lanes and staged == view.staged:
        return view
    return dataclasses.replace(view, lanes=lanes, staged=staged)


def effective_lane(lane: Lane, index: ViewIndex) -> Lane:
    """`lane` keeping only its gray versions with endpoints in `index` (itself if it keeps all)."""
    endpoints = index.endpoints
    for key in lane.versions:
        found = endpoints.get(key)
        if found is None or not found.endpoints:
            break
    else:
        # Kept whole, the common case, found without building anything: a view is made
        # effective on every change, over every live and staged lane (900 staged at 1,000
        # releases made a create's build 5x dearer the other way).
        return lane
    versions = tuple((service, version) for service, version in lane.versions if index.endpoints_of(service, version))
    return dataclasses.replace(lane, versions=versions)


class _Reuse:
    """Messages of the latest renders by the inputs they were built from.

    A change to one lane leaves every other cluster, endpoint set and virtual host the
    same; reusing those objects keeps render proportional to what changed and lets the
    encodings (`graylane.xds.resources.encoded`) and plans keyed by message identity hit.
    The output is the same content either way. Generational: entries not used by the last
    render are dropped at the next rotation, so the memory is bounded by two views. Callers
    never mutate what render returns (nor does render, after building).
    """

    def __init__(self, previous: dict[Hashable, Message] | None = None) -> None:
        self._previous: dict[Hashable, Message] = previous if previous is not None else {}
        self._current: dict[Hashable, Message] = {}

    @property
    def used(self) -> dict[Hashable, Message]:
        """What the renders since the last rotation used (the next one's `previous`)."""
        return self._current

    def get(self, key: Hashable, build: Callable[..., _MessageT], *args: Any) -> _MessageT:
        """The message reused for `key`, or `build(*args)` (no closure is made on a hit)."""
        found = self._current.get(key)
        if found is None:
            found = self._previous.get(key)
            if found is None:
                found = build(*args)
            self._current[key] = found
        return found  # type: ignore[return-value]

    def rotate(self) -> None:
        """After a render: what it used is kept for the next one, the rest is dropped."""
        self._previous, self._current = self._current, {}


_reuse = _Reuse()


def forget_reused() -> None:
    """Drop every reused message: the next render builds everything (benchmarks, tests)."""
    _reuse.rotate()
    _reuse.rotate()


class ViewIndex:
    """Lookups over one view, built once per render so rendering is linear in its size.

    `endpoints`: (service, version) -> VersionEndpoints (the first, as `RoutingView` finds);
    `entering`: service -> lanes entering there; `versioned`: service -> (lane, version) of
    lanes with a version of it; both in the view's lane order; `staged_entering` and
    `staged_versioned`: the same of the view's staged lanes (they add clusters, never
    routes); `remote_by_service`: service -> its versions reached through another cluster's
    gateway. Build it from `effective_view(view)`, as `render` does, before calling
    `render_service`.
    """

    def __init__(self, view: RoutingView, *, lanes: bool = True) -> None:
        """`lanes=False`: the endpoint lookups alone (what `effective_view` needs)."""
        self.endpoints: dict[tuple[str, str], VersionEndpoints] = {}
        for ve in view.endpoints:
            self.endpoints.setdefault((ve.service, ve.version), ve)
        remote: dict[str, set[str]] = {}
        for (service, version), ve in self.endpoints.items():
            if ve.via_cluster:
                remote.setdefault(service, set()).add(version)
        self.remote_by_service = {service: tuple(sorted(versions)) for service, versions in remote.items()}
        self.entering: dict[str, list[Lane]] = {}
        self.versioned: dict[str, list[tuple[Lane, str]]] = {}
        self.staged_entering: dict[str, list[Lane]] = {}
        self.staged_versioned: dict[str, list[tuple[Lane, str]]] = {}
        for of_kind, entering, versioned in (
            (view.lanes if lanes else (), self.entering, self.versioned),
            (view.staged if lanes else (), self.staged_entering, self.staged_versioned),
        ):
            for lane in of_kind:
                entering.setdefault(lane.entry, []).append(lane)
                seen: set[str] = set()
                for service, version in lane.versions:
                    if service not in seen:  # `Lane.version_for` takes the first
                        seen.add(service)
                        versioned.setdefault(service, []).append((lane, version))

    def endpoints_of(self, service: str, version: str) -> tuple[Endpoint, ...]:
        found = self.endpoints.get((service, version))
        return found.endpoints if found is not None else ()

    def remote(self, service: str, version: str) -> bool:
        found = self.endpoints.get((service, version))
        return found is not None and bool(found.via_cluster)

    def remote_versions(self, service: str) -> tuple[str, ...]:
        """Versions of `service` reached through another cluster's gateway, sorted."""
        return self.remote_by_service.get(service, ())


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceResources:
    """Everything one service contributes to a proxy's resources (shared, read-only).

    `route_config` holds exactly the service's virtual host; `scope` keys the service's
    name to it; `clusters` and `assignments` are the service's clusters (base and lanes)
    and their endpoints, by name.
    """

    route_config: route_pb2.RouteConfiguration
    scope: scoped_route_pb2.ScopedRouteConfiguration
    clusters: dict[str, Message]
    assignments: dict[str, Message]


def render(
    view: RoutingView, *, listen_port: int, listen_address: str = "127.0.0.1", proxyless: bool = False
) -> resources.Resources:
    """Every resource a proxy needs for `view`, listening on listen_address:listen_port.

    `proxyless`: for gRPC clients that speak xDS themselves: instead of the socket
    listener, one client-side Listener per service (`api_listeners`) naming the same
    per-service route configs; clusters, endpoints, routes and scopes are the same.

    Routes are split per service: one RouteConfiguration per service, each reached
    through a scope (SRDS) keyed by the service's name, so a change to one service's
    routes re-sends that service's route config alone, over SotW as over delta.

    Raises ValueError for a view that validation should have rejected: a PATH condition
    with PRESENT, two PATH conditions in one rule, or lanes entering one service whose
    weights add up to more than 100.
    """
    view = effective_view(view)
    index = ViewIndex(view)
    clusters: dict[str, Message] = {}
    assignments: dict[str, Message] = {}
    route_configs: dict[str, Message] = {}
    scopes: dict[str, Message] = {}
    for service in sorted(view.services, key=lambda s: s.name):
        rendered = render_service(service, index, connect_timeout_ms=view.connect_timeout_ms)
        clusters.update(rendered.clusters)
        assignments.update(rendered.assignments)
        route_configs[rendered.route_config.name] = rendered.route_config
        scopes[rendered.scope.name] = rendered.scope
    if proxyless:
        listeners = api_listeners(s.name for s in view.services)
    else:
        listener = _listener(listen_address, listen_port, scoped=True)
        listeners = {listener.name: listener}
    _reuse.rotate()
    return resources.Resources.of(
        {
            resources.CLUSTER: clusters,
            resources.ENDPOINT: assignments,
            resources.LISTENER: listeners,
            resources.SCOPED_ROUTE: scopes,
            resources.ROUTE: route_configs,
        }
    )


def render_service(
    service: ServiceRoute, index: ViewIndex, *, connect_timeout_ms: int, reuse: _Reuse | None = None
) -> ServiceResources:
    """The route config, scope, clusters and endpoints of one service (messages reused).

    Depends only on the service, the lanes (live or staged) entering at it or holding a
    version of it, and the endpoints of its versions, so an unchanged service yields the
    same objects. Staged lanes add clusters only: the route config is keyed without them.
    `reuse`: where messages are reused from (default: the module's, rotated by `render`).
    """
    memo = reuse if reuse is not None else _reuse
    clusters: dict[str, Message] = {}
    assignments: dict[str, Message] = {}
    for version, lane in _service_cluster_keys(service, index):
        # Each cluster has its own EDS resource, even where two hold the same endpoints: a
        # new cluster warms only once Envoy receives its endpoints, and a resource the proxy
        # already holds would not be sent again.
        name = cluster_name(service.name, version, lane)
        endpoints = index.endpoints_of(service.name, version)
        clusters[name] = memo.get(("cluster", name, connect_timeout_ms), _cluster, name, name, connect_timeout_ms)
        assignments[name] = memo.get(("cla", name, endpoints), _load_assignment, name, endpoints)
    split = _cohort_split(service, index)
    if split is not None:
        name = cohort_cluster_name(service.name)
        weights = tuple(sorted(split.items(), key=lambda item: (item[0].address, item[0].port)))
        clusters[name] = memo.get(("ring", name, connect_timeout_ms), _ring_hash_cluster, name, connect_timeout_ms)
        assignments[name] = memo.get(("weighted", name, weights), _weighted_assignment, name, weights)
    entering = tuple(index.entering.get(service.name, ()))
    versioned = tuple(index.versioned.get(service.name, ()))
    remote = index.remote_versions(service.name)
    route_config = memo.get(
        ("routes", service, entering, versioned, remote, split is not None), _route_config, service, index
    )
    scope = memo.get(("scope", service.name), _scope, service.name)
    return ServiceResources(route_config, scope, clusters, assignments)


def render_gateway(view: RoutingView, *, listen_port: int, listen_address: str = "127.0.0.1") -> resources.Resources:
    """The resources of a cluster's gateway: other clusters reach its local versions here.

    One virtual host per version that runs in this cluster (endpoints not `via_cluster`),
    matching `gateway_authority(service, version)` and restoring the service's name as the
    authority. The gateway decides nothing: the lane was decided where the request entered,
    and its tags pass through to the service, whose own hops follow them.

    Its routes stay in one RouteConfiguration (plain RDS, no scopes): they change only
    when a version starts or stops running in this cluster (endpoints), never with a
    release's weights or rules, so splitting them would save nothing on the changes that
    matter.
    """
    clusters: dict[str, Message] = {}
    assignments: dict[str, Message] = {}
    vhosts = []
    for ve in sorted(view.endpoints, key=lambda e: (e.service, e.version)):
        if ve.via_cluster or not ve.endpoints:
            continue
        name = cluster_name(ve.service, ve.version)
        clusters[name] = _cluster(name, name, view.connect_timeout_ms)
        assignments[name] = _load_assignment(name, ve.endpoints)
        authority = gateway_authority(ve.service, ve.version)
        route = _route("gateway", route_components_pb2.RouteMatch(prefix="/"), cluster=name)
        route.route.host_rewrite_literal = ve.service
        vhosts.append(
            route_components_pb2.VirtualHost(
                name=f"{ve.service}|{ve.version}", domains=[authority, f"{authority}:*"], routes=[route]
            )
        )
    listener = _listener(listen_address, listen_port, scoped=False)
    route_config = route_pb2.RouteConfiguration(name=ROUTE_CONFIG_NAME, virtual_hosts=vhosts)
    return resources.Resources.of(
        {
            resources.CLUSTER: clusters,
            resources.ENDPOINT: assignments,
            resources.LISTENER: {listener.name: listener},
            resources.ROUTE: {route_config.name: route_config},
        }
    )


# ------------------------------------------------------------------- clusters, endpoints


def _service_cluster_keys(service: ServiceRoute, index: ViewIndex) -> list[tuple[str, str]]:
    """(version, lane) of every cluster of `service`: its base for traffic outside lanes,
    and each lane's own cluster where the lane has a version of the service or enters at it
    (where its rules and its weighted share are routed and tagged).

    Lane traffic at other services falls back to their base cluster. A cluster per lane at
    every service would count those hops per lane too, but costs lanes x services
    clusters: 101,000 for 1,000 services and 100 lanes (an 11 s render).

    Staged lanes add the same clusters a live lane would have, and no route: so a lane
    going live (staged -> live, one view to the next) changes this service's routes only.
    """
    keys = {(service.base_version, "")}
    for versioned, entering in (
        (index.versioned, index.entering),
        (index.staged_versioned, index.staged_entering),
    ):
        for lane, version in versioned.get(service.name, ()):
            keys.add((version or service.base_version, lane.name))
        for lane in entering.get(service.name, ()):
            keys.add((lane.version_for(service.name) or service.base_version, lane.name))
    return sorted(keys)  # sorted: set order depends on the process's hash seed


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _cluster(name: str, eds: str, connect_timeout_ms: int) -> cluster_pb2.Cluster:
    # Merged from a template per timeout and then named: building the nested messages from
    # keywords on every call cost 5x as much (11,000 clusters at 10,000 services).
    template = _cluster_templates.get(connect_timeout_ms)
    if template is None:
        template = _cluster_templates[connect_timeout_ms] = cluster_pb2.Cluster(
            type=cluster_pb2.Cluster.DiscoveryType.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
            connect_timeout=duration_pb2.Duration(
                seconds=connect_timeout_ms // 1000, nanos=(connect_timeout_ms % 1000) * 1_000_000
            ),
            lb_policy=cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN,
        )
    cluster = cluster_pb2.Cluster(name=name)
    cluster.MergeFrom(template)
    cluster.eds_cluster_config.service_name = eds
    return cluster


# connect timeout (ms) -> a nameless cluster with every other field set (never mutated)
_cluster_templates: dict[int, cluster_pb2.Cluster] = {}


def _load_assignment(name: str, endpoints: Iterable[Endpoint]) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of one cluster, deduplicated and sorted; none is a valid answer."""
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    ordered = sorted(set(endpoints), key=_endpoint_order)
    if ordered:
        # gRPC clients drop a locality without a weight and an endpoint without one (Envoy
        # defaults both to 1, and ignores locality weights unless the cluster asks for them):
        # one locality, weight 1, and weight 1 for each endpoint, read the same by both.
        locality = assignment.endpoints.add()
        locality.MergeFrom(_LOCALITY_ENDPOINTS)
        for e in ordered:
            lb = locality.lb_endpoints.add()
            lb.MergeFrom(_WEIGHT_ONE_ENDPOINT)
            socket = lb.endpoint.address.socket_address
            socket.address = e.address
            socket.port_value = e.port
    return assignment


def _endpoint_order(endpoint: Endpoint) -> tuple[str, int]:
    return endpoint.address, endpoint.port


# Merged into each new message and then completed (cheaper than keyword construction).
_LOCALITY_ENDPOINTS = endpoint_components_pb2.LocalityLbEndpoints(
    locality=_LOCALITY, load_balancing_weight=wrappers_pb2.UInt32Value(value=1)
)
_WEIGHT_ONE_ENDPOINT = endpoint_components_pb2.LbEndpoint(load_balancing_weight=wrappers_pb2.UInt32Value(value=1))


def _socket_address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))


# ----------------------------------------------------------------------------- listener


def _pack(message: Message) -> any_pb2.Any:
    # Packed by hand with deterministic bytes so the content version never depends on
    # how the protobuf runtime happens to order anything.
    return any_pb2.Any(
        type_url="type.googleapis.com/" + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(deterministic=True),
    )


def _listener(address: str, port: int, *, scoped: bool) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=_STAT_PREFIX,
        http_filters=[hcm_pb2.HttpFilter(name=_ROUTER_FILTER, typed_config=_pack(router_pb2.Router()))],
    )
    if scoped:
        manager.scoped_routes.CopyFrom(_scoped_routes())
    else:
        manager.rds.CopyFrom(hcm_pb2.Rds(config_source=_ads(), route_config_name=ROUTE_CONFIG_NAME))
    return listener_pb2.Listener(
        name=listener_name(port),
        address=_socket_address(address, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=_HCM_FILTER, typed_config=_pack(manager))]
            )
        ],
    )


def api_listeners(services: Iterable[str]) -> dict[str, Message]:
    """The client-side Listeners of proxyless gRPC clients, by name, for `services`.

    gRPC resolves `xds:///<service>` by asking for the Listener `<service>` (or its xdstp
    name), reads the HttpConnectionManager in its `api_listener`, fetches the route config
    it names over ADS and routes each call as Envoy would (weighted clusters, header
    matches); the router filter must be the last filter. Each service's listener names
    that service's own route config, the one Envoy's scope for it names too, so both kinds
    of client are served the same routes from one render.
    """
    found: dict[str, Message] = {}
    for service in sorted(services):
        message = _api_listener_memo.get(service)
        if message is None:
            message = _api_listener_memo[service] = _api_listener(service)
        for name in api_listener_names(service):
            found[name] = message[name]
    if len(_api_listener_memo) > 4 * max(len(found), 1024):
        _api_listener_memo.clear()
    return found


# service -> its two listeners by name (immutable once built; they depend on the name only)
_api_listener_memo: dict[str, dict[str, listener_pb2.Listener]] = {}


def _api_listener(service: str) -> dict[str, listener_pb2.Listener]:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=_STAT_PREFIX,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_config_name(service)),
        http_filters=[hcm_pb2.HttpFilter(name=_ROUTER_FILTER, typed_config=_pack(router_pb2.Router()))],
    )
    api = api_listener_pb2.ApiListener(api_listener=_pack(manager))
    return {name: listener_pb2.Listener(name=name, api_listener=api) for name in api_listener_names(service)}


def _scoped_routes() -> hcm_pb2.ScopedRoutes:
    """Scopes from SRDS, keyed by the request's authority without its port.

    ``checkout`` and ``checkout:8080`` both key to the scope ``checkout``. Scope keys
    match exactly (virtual-host domains matched case-insensitively): service names are
    lower-case DNS labels, so a request must name its service in lower case (see README).
    """
    extractor = hcm_pb2.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder.HeaderValueExtractor(
        name=":authority", element_separator=":", index=0
    )
    return hcm_pb2.ScopedRoutes(
        name=SCOPED_ROUTES_NAME,
        scope_key_builder=hcm_pb2.ScopedRoutes.ScopeKeyBuilder(
            fragments=[hcm_pb2.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder(header_value_extractor=extractor)]
        ),
        rds_config_source=_ads(),
        scoped_rds=hcm_pb2.ScopedRds(scoped_rds_config_source=_ads()),
    )


def _scope(service: str) -> scoped_route_pb2.ScopedRouteConfiguration:
    """The scope of one service: its name (the authority without port) -> its route config.

    Eager (not on-demand): Envoy fetches every scope's route config up front, so the first
    request to a service never waits for a fetch.
    """
    name = route_config_name(service)
    scope = scoped_route_pb2.ScopedRouteConfiguration(name=name, route_configuration_name=name)
    scope.key.fragments.add(string_key=service)  # in place: a built Key would be copied in
    return scope


# -------------------------------------------------------------------------------- routes


def _route_config(service: ServiceRoute, index: ViewIndex) -> route_pb2.RouteConfiguration:
    """The route config of one service: exactly its virtual host (remote versions rewritten)."""
    # Built in place: wrapping a finished VirtualHost would copy it once more.
    config = route_pb2.RouteConfiguration(name=route_config_name(service.name))
    vhost = config.virtual_hosts.add(name=service.name, domains=[service.name, f"{service.name}:*"])
    _service_routes(service, index, vhost.routes)
    if index.remote_versions(service.name):
        _rewrite_remote(vhost, index)  # before the message is shared: never mutated after
    return config


def _rewrite_remote(vhost: route_components_pb2.VirtualHost, view: ViewIndex) -> None:
    """Requests to a version that runs only in another cluster name it in their authority.

    That cluster's gateway serves versions (see `render_gateway`); lane tags and every
    other header pass through unchanged, so the lane continues there.
    """
    for route in vhost.routes:
        action = route.route
        if action.HasField("cluster"):
            authority = _remote_authority(view, action.cluster)
            if authority:
                action.host_rewrite_literal = authority
        elif action.HasField("weighted_clusters"):
            for weight in action.weighted_clusters.clusters:
                authority = _remote_authority(view, weight.name)
                if authority:
                    weight.host_rewrite_literal = authority


def _remote_authority(view: ViewIndex, cluster: str) -> str:
    parsed = parse_cluster_name(cluster)
    if parsed is None or not view.remote(parsed[0], parsed[1]):
        return ""
    return gateway_authority(parsed[0], parsed[1])


def _service_routes(service: ServiceRoute, index: ViewIndex, into: _Routes) -> None:
    """The routes of `service`'s virtual host, in the order of the module docstring, added
    to `into` (each helper builds its routes in place: a route appended to a repeated field
    is copied, 18,000 of them at 10,000 services)."""
    entering = index.entering.get(service.name, [])
    _lane_routes(service, index.versioned.get(service.name, ()), into)
    if entering:
        _tagged_elsewhere_routes(service, into)
        for lane in entering:
            for position, rule in enumerate(lane.rules):
                _rule_routes(service, lane, rule, position, into)
        _split_routes(service, entering, into, ring=_cohort_split(service, index) is not None)
    _route(
        "default",
        _MATCH_ANY,
        cluster=cluster_name(service.name, service.base_version),
        into=into,
    )


_MATCH_ANY = route_components_pb2.RouteMatch(prefix="/")  # copied into each route, never mutated


def _lane_cluster(service: ServiceRoute, lane: Lane) -> str:
    """The lane's own cluster at `service`: its gray version there, or (at the entry of a
    lane without a version of it) the base version, still counted as the lane's."""
    version = lane.version_for(service.name) or service.base_version
    return cluster_name(service.name, version, lane.name)


def _lane_routes(service: ServiceRoute, versioned: Sequence[tuple[Lane, str]], into: _Routes) -> None:
    """Step 1: requests tagged with a live lane that has a version of `service` (lanes
    without one: their tagged traffic reaches base via steps 2 or 5)."""
    for lane, _version in versioned:
        cluster = _lane_cluster(service, lane)
        _route(
            f"lane/{lane.name}/header",
            _match_all(_header_exact(LANE_HEADER, lane.name)),
            cluster=cluster,
            into=into,
        )
        _route(
            f"lane/{lane.name}/baggage",
            _match_all(
                _header_present(LANE_HEADER, present=False),
                _header_regex(BAGGAGE_HEADER, _baggage_member_regex(lane.name)),
            ),
            cluster=cluster,
            into=into,
        )


def _tagged_elsewhere_routes(service: ServiceRoute, into: _Routes) -> None:
    """Step 2: tagged traffic not claimed above stays on base, never re-split."""
    base = cluster_name(service.name, service.base_version)
    _route("tagged/header", _match_all(_header_present(LANE_HEADER)), cluster=base, into=into)
    _route(
        "tagged/baggage",
        _match_all(
            _header_present(LANE_HEADER, present=False),
            _header_regex(BAGGAGE_HEADER, _baggage_any_member_regex()),
        ),
        cluster=base,
        into=into,
    )


def _rule_routes(service: ServiceRoute, lane: Lane, rule: Rule, index: int, into: _Routes) -> None:
    """Step 3: one entry rule, as a route pair (with / without an incoming baggage)."""
    for has_baggage in (True, False):
        match = _rule_match(rule)
        match.headers.append(_header_present(BAGGAGE_HEADER, present=has_baggage))
        _route(
            f"rule/{lane.name}/{index}/{_baggage_suffix(has_baggage)}",
            match,
            cluster=_lane_cluster(service, lane),
            headers_to_add=_lane_tags(lane.name, has_baggage=has_baggage),
            into=into,
        )


def _split_routes(service: ServiceRoute, entering: Sequence[Lane], into: _Routes, *, ring: bool = False) -> None:
    """Step 4: the batch weights of the lanes entering at `service`, gray share tagged.

    `ring`: the split has a header cohort and a ring-hash cluster for proxyless clients
    (`_cohort_split`). gRPC picks among weighted clusters at random on every call (it has
    nothing like `use_hash_policy`), so a cohort would not stay in the lane there: one more
    route, first, hashes the cohort key onto the ring-hash cluster for the clients that
    match it (`_RING_CLIENTS`); the others, and Envoy, go on to the weighted split.
    """
    weighted = [lane for lane in entering if lane.weight > 0]
    total = sum(lane.weight for lane in weighted)
    if total > 100:
        raise ValueError(f"lanes entering at {service.name!r} weigh {total} in total, above 100")
    if not weighted:
        return
    cohort = _entry_cohort(service, weighted)
    if ring and cohort is not None:
        route = _route("split/ring", _match_all(*_RING_CLIENTS), cluster=cohort_cluster_name(service.name), into=into)
        route.route.hash_policy.append(_hash_policy(cohort))
    for has_baggage in (True, False):
        split = route_components_pb2.WeightedCluster()
        if cohort is not None:
            split.use_hash_policy.value = True
        for lane in weighted:
            split.clusters.append(
                route_components_pb2.WeightedCluster.ClusterWeight(
                    name=_lane_cluster(service, lane),
                    weight=wrappers_pb2.UInt32Value(value=lane.weight),
                    request_headers_to_add=_lane_tags(lane.name, has_baggage=has_baggage),
                )
            )
        if total < 100:
            split.clusters.append(
                route_components_pb2.WeightedCluster.ClusterWeight(
                    name=cluster_name(service.name, service.base_version),
                    weight=wrappers_pb2.UInt32Value(value=100 - total),
                )
            )
        route = _route(
            f"split/{_baggage_suffix(has_baggage)}",
            _match_all(_header_present(BAGGAGE_HEADER, present=has_baggage)),
            weighted_clusters=split,
            into=into,
        )
        if cohort is not None:
            route.route.hash_policy.append(_hash_policy(cohort))


# The ring of a cohort split: one size, whatever the weights, so a key's point stays put and
# a version's points only grow with its weight (gRPC caps rings at 4,096 entries by default).
_RING_SIZE = 4096
# Endpoint weights of a cohort split: a version's share (percent) times this, over its endpoints.
_SHARE_SCALE = 10_000


def _cohort_split(service: ServiceRoute, index: ViewIndex) -> dict[Endpoint, int] | None:
    """The endpoints of `service`'s ring-hash cohort split and their weights, or None where
    there is none: no lane splits there by a header cohort, or a version it reaches has no
    endpoints or runs in another cluster (a gateway needs the authority rewritten per
    version, which one cluster cannot do); proxyless calls are then split at random.

    Each version's endpoints share its part of the split (a lane's weight, the base the
    rest), so a call's version follows its key's point on the ring. As the batch grows, the
    lane's endpoints gain points and the base's lose them, the ring's size fixed: a key in
    the lane stays in it.
    """
    weighted = [lane for lane in index.entering.get(service.name, ()) if lane.weight > 0]
    if not weighted or len({lane.cohort for lane in weighted}) != 1:
        return None
    cohort = weighted[0].cohort
    total = sum(lane.weight for lane in weighted)
    if cohort is None or cohort.kind is not MatchKind.HEADER or total > 100:
        return None
    shares: dict[str, int] = {}
    for lane in weighted:
        version = lane.version_for(service.name) or service.base_version
        shares[version] = shares.get(version, 0) + lane.weight
    if total < 100:
        shares[service.base_version] = shares.get(service.base_version, 0) + 100 - total
    weights: dict[Endpoint, int] = {}
    for version, share in sorted(shares.items()):
        endpoints = sorted(set(index.endpoints_of(service.name, version)), key=lambda e: (e.address, e.port))
        if not endpoints or index.remote(service.name, version):
            return None
        each = max(1, round(share * _SHARE_SCALE / len(endpoints)))
        for endpoint in endpoints:
            weights[endpoint] = weights.get(endpoint, 0) + each
    return weights


def _ring_hash_cluster(name: str, connect_timeout_ms: int) -> cluster_pb2.Cluster:
    cluster = _cluster(name, name, connect_timeout_ms)
    cluster.lb_policy = cluster_pb2.Cluster.LbPolicy.RING_HASH
    cluster.ring_hash_lb_config.minimum_ring_size.value = _RING_SIZE
    cluster.ring_hash_lb_config.maximum_ring_size.value = _RING_SIZE
    return cluster


def _weighted_assignment(name: str, weights: Sequence[tuple[Endpoint, int]]) -> endpoint_pb2.ClusterLoadAssignment:
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    assignment.endpoints.append(
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=_LOCALITY,
            load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(e.address, e.port)),
                    load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
                )
                for e, weight in weights
            ],
        )
    )
    return assignment


def _entry_cohort(service: ServiceRoute, weighted: Sequence[Lane]) -> Cohort | None:
    """The one cohort key of the lanes splitting `service` (validation keeps them equal)."""
    cohorts = {lane.cohort for lane in weighted}
    if len(cohorts) > 1:
        raise ValueError(f"lanes entering at {service.name!r} split by different cohort keys")
    return cohorts.pop()


def _hash_policy(cohort: Cohort) -> route_components_pb2.RouteAction.HashPolicy:
    """Hash the cohort key; a request without it yields no hash and is split at random."""
    policy = route_components_pb2.RouteAction.HashPolicy
    if cohort.kind is MatchKind.COOKIE:
        # No ttl: Envoy never invents the cookie, so keyless requests stay random.
        return policy(cookie=policy.Cookie(name=cohort.name))
    return policy(header=policy.Header(header_name=cohort.name.lower()))


def _route(
    name: str,
    match: route_components_pb2.RouteMatch,
    *,
    cluster: str = "",
    weighted_clusters: route_components_pb2.WeightedCluster | None = None,
    headers_to_add: Sequence[base_pb2.HeaderValueOption] = (),
    into: _Routes | None = None,
) -> route_components_pb2.Route:
    """A route to one cluster or a weighted split, with the shared retry policy: added to
    `into` (a virtual host's routes) when given, and returned."""
    # Built in place from a template: keyword construction copied the match and the action
    # once more and built the retry policy anew (18,000 routes at 10,000 services).
    route = into.add(name=name) if into is not None else route_components_pb2.Route(name=name)
    route.match.CopyFrom(match)
    route.MergeFrom(_ROUTE_TEMPLATE)
    if weighted_clusters is not None:
        route.route.weighted_clusters.CopyFrom(weighted_clusters)
    else:
        route.route.cluster = cluster
    if headers_to_add:
        route.request_headers_to_add.extend(headers_to_add)
    return route


_ROUTE_TEMPLATE = route_components_pb2.Route(
    route=route_components_pb2.RouteAction(
        retry_policy=route_components_pb2.RetryPolicy(
            retry_on=_RETRY_ON, num_retries=wrappers_pb2.UInt32Value(value=_NUM_RETRIES)
        )
    )
)


def _baggage_suffix(has_baggage: bool) -> str:
    return "with-baggage" if has_baggage else "without-baggage"


def _lane_tags(lane: str, *, has_baggage: bool) -> list[base_pb2.HeaderValueOption]:
    """Headers that carry the lane decision to every later hop.

    With an incoming baggage, the lane member is appended so other members survive; steps
    1-2 guarantee the incoming baggage has no graylane member yet. The result is one
    header line: `%REQ()%` yields only the first of several baggage lines, so members on
    later lines are dropped (rare: clients send one line). Appending a separate line
    instead would keep them, but readers that take the first line only (OpenTelemetry's
    Go propagator, for one) would then lose the lane.
    """
    member = f"{BAGGAGE_KEY}={lane}"
    baggage = f"%REQ({BAGGAGE_HEADER})%,{member}" if has_baggage else member
    return [_set_header(LANE_HEADER, lane), _set_header(BAGGAGE_HEADER, baggage)]


def _set_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


# ------------------------------------------------------------------------------ matching


def _match_all(*headers: route_components_pb2.HeaderMatcher) -> route_components_pb2.RouteMatch:
    return route_components_pb2.RouteMatch(prefix="/", headers=headers)


def _rule_match(rule: Rule) -> route_components_pb2.RouteMatch:
    """All conditions of a rule AND-ed in one RouteMatch."""
    match = route_components_pb2.RouteMatch()
    paths = [c for c in rule.conditions if c.kind is MatchKind.PATH]
    if len(paths) > 1:
        raise ValueError("a rule has at most one PATH condition")
    if paths:
        _set_path(match, paths[0])
    else:
        match.prefix = "/"
    for condition in rule.conditions:
        if condition.kind is MatchKind.HEADER:
            match.headers.append(_header_condition(condition))
        elif condition.kind is MatchKind.COOKIE:
            match.headers.append(_header_regex("cookie", _cookie_regex(condition)))
        elif condition.kind is MatchKind.QUERY:
            match.query_parameters.append(_query_condition(condition))
    if match.query_parameters:
        # A gRPC call has no query string, and grpc-js does not read query_parameters at
        # all (the route would match every call): asking for _ENVOY_ONLY_HEADER too, Envoy
        # reads the rule as written and no proxyless client ever matches it.
        match.headers.append(_header_present(_ENVOY_ONLY_HEADER))
    return match


def _set_path(match: route_components_pb2.RouteMatch, condition: Condition) -> None:
    if condition.op is MatchOp.EXACT:
        match.path = condition.value
    elif condition.op is MatchOp.PREFIX:
        match.prefix = condition.value
    elif condition.op is MatchOp.REGEX:
        match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=condition.value))
    else:
        raise ValueError(f"PATH cannot be matched with {condition.op.name}")


def _string_matcher(op: MatchOp, value: str) -> string_pb2.StringMatcher:
    if op is MatchOp.EXACT:
        return string_pb2.StringMatcher(exact=value)
    if op is MatchOp.PREFIX:
        return string_pb2.StringMatcher(prefix=value)
    if op is MatchOp.REGEX:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value))
    raise ValueError(f"{op.name} is not a string match")


def _header_condition(condition: Condition) -> route_components_pb2.HeaderMatcher:
    # Envoy stores header names lower-cased; matching on the same spelling is explicit.
    name = condition.name.lower()
    if condition.op is MatchOp.PRESENT:
        return _header_present(name)
    return route_components_pb2.HeaderMatcher(name=name, string_match=_string_matcher(condition.op, condition.value))


def _query_condition(condition: Condition) -> route_components_pb2.QueryParameterMatcher:
    if condition.op is MatchOp.PRESENT:
        return route_components_pb2.QueryParameterMatcher(name=condition.name, present_match=True)
    return route_components_pb2.QueryParameterMatcher(
        name=condition.name, string_match=_string_matcher(condition.op, condition.value)
    )


def _header_exact(name: str, value: str) -> route_components_pb2.HeaderMatcher:
    return route_components_pb2.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(exact=value))


def _header_present(name: str, *, present: bool = True) -> route_components_pb2.HeaderMatcher:
    # "Absent" is "present, inverted": every client reads it the same. `present_match:
    # false` alone means absent to Envoy but present to grpc-js (which ignores the value),
    # so a route meant for requests without the header would never match there.
    if present:
        return route_components_pb2.HeaderMatcher(name=name, present_match=True)
    return route_components_pb2.HeaderMatcher(name=name, present_match=True, invert_match=True)


def _header_regex(name: str, regex: str) -> route_components_pb2.HeaderMatcher:
    return route_components_pb2.HeaderMatcher(
        name=name,
        string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex)),
    )


def _literal(text: str) -> str:
    """`text` as an RE2 pattern that matches it literally (RE2's own QuoteMeta)."""
    escaped: str = re2.escape(text)
    return escaped


def _baggage_member_regex(lane: str) -> str:
    """A baggage header holding the member ``graylane=<lane>`` (with optional properties).

    W3C baggage: ``key OWS "=" OWS value *(OWS ";" property)``, members ","-separated.
    """
    return _BAGGAGE_BEFORE + _literal(BAGGAGE_KEY) + _OWS + "=" + _OWS + _literal(lane) + _OWS + _REST


def _baggage_any_member_regex() -> str:
    """A baggage header holding a ``graylane`` member, whatever its value."""
    return _BAGGAGE_BEFORE + _literal(BAGGAGE_KEY) + _OWS + "=.*"


def _cookie_regex(condition: Condition) -> str:
    """A Cookie header in which cookie `condition.name` satisfies the condition.

    The value of a cookie runs to the next ";" (or "," where Envoy joined two Cookie
    lines); a REGEX condition must match that whole value.
    """
    head = _COOKIE_BEFORE + _literal(condition.name) + "="
    if condition.op is MatchOp.EXACT:
        return head + _literal(condition.value) + _OWS + _REST
    if condition.op is MatchOp.PREFIX:
        return head + _literal(condition.value) + "[^;,]*" + _REST
    if condition.op is MatchOp.REGEX:
        return head + "(?:" + condition.value + ")" + _OWS + _REST
    return head + ".*"  # PRESENT
