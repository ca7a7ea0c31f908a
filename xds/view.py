"""The RoutingView: everything `render` needs to know, as plain frozen values.

Owns: the input contract of the xds package. A view says which services exist, which
versions of them run where (endpoints), which version is each service's base, and which
gray lanes are active with their entry, rules and batch weight. It says nothing of
releases, phases or etcd: the control plane (or an agent) builds a view from its own
state and hands it over.

Must not import: etcd, graylane.controlplane, graylane.agent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MatchKind(enum.Enum):
    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"
    PATH = "path"


class MatchOp(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"  # RE2, validated before it reaches a view
    PRESENT = "present"


@dataclass(frozen=True, slots=True)
class Condition:
    kind: MatchKind
    name: str  # header / cookie / query parameter name; "" for PATH
    op: MatchOp
    value: str = ""  # "" for PRESENT


@dataclass(frozen=True, slots=True)
class Rule:
    """All conditions must hold (AND)."""

    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class VersionEndpoints:
    """Where one version of one service can be reached from the cluster the view is for.

    For a version that runs only in another cluster, the endpoints are that cluster's
    gateway addresses.
    """

    service: str
    version: str
    endpoints: tuple[Endpoint, ...]
    # Non-empty: the version runs only in that cluster and `endpoints` are its gateways;
    # requests carry `gateway_authority(service, version)` so the gateway knows the version.
    via_cluster: str = ""


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """A routable service: its name is the HTTP authority Envoy matches."""

    name: str
    base_version: str


@dataclass(frozen=True, slots=True)
class Cohort:
    """The request key (a header or a cookie) whose hash decides the weighted batch.

    The same key always hashes to the same point of [0, 100), and the lane takes the first
    `weight` points of it, so a key in the lane at 5 % is in it at every larger weight.
    """

    kind: MatchKind  # HEADER or COOKIE
    name: str


@dataclass(frozen=True, slots=True)
class Lane:
    """One active gray lane (one release).

    `versions` maps service -> gray version in this lane; services not listed fall back
    to their base version for lane traffic. Requests that match any of `rules` at the
    `entry` service join the lane; of the rest, `weight` percent join it, at random or,
    with a `cohort`, by a consistent hash of the cohort key.
    """

    name: str
    entry: str
    weight: int  # 0..100
    versions: tuple[tuple[str, str], ...]  # (service, gray_version), sorted by service
    rules: tuple[Rule, ...] = ()
    cohort: Cohort | None = None

    def version_for(self, service: str) -> str | None:
        for svc, version in self.versions:
            if svc == service:
                return version
        return None


@dataclass(frozen=True, slots=True)
class RoutingView:
    """The whole routing intent for the proxies of one cluster.

    `lanes` (and `staged`) are in a stable order (the control plane sorts them by release
    name) so the rendered routes, and hence the content-derived versions, are identical on
    every replica.
    """

    services: tuple[ServiceRoute, ...]
    endpoints: tuple[VersionEndpoints, ...]
    lanes: tuple[Lane, ...] = ()
    # Knobs that are the same for every route; defaults suit loopback tests and demos.
    connect_timeout_ms: int = field(default=1000)
    # Lanes about to go live (a release created, not started): each one's clusters and
    # endpoints are rendered as they will be once it is in `lanes`, and no route reaches
    # them (only `name`, `entry` and `versions` are read). Its start then changes routes
    # alone, as any later batch does: Envoy has warmed the clusters long before.
    staged: tuple[Lane, ...] = ()

    def endpoints_of(self, service: str, version: str) -> tuple[Endpoint, ...]:
        found = self.version_endpoints(service, version)
        return found.endpoints if found is not None else ()

    def version_endpoints(self, service: str, version: str) -> VersionEndpoints | None:
        for ve in self.endpoints:
            if ve.service == service and ve.version == version:
                return ve
        return None

    def remote(self, service: str, version: str) -> bool:
        """Whether `version` of `service` is reached through another cluster's gateway."""
        found = self.version_endpoints(service, version)
        return found is not None and bool(found.via_cluster)


# The listener port of proxies whose node metadata names none (their cache key is
# `graylane.xds.cache.DEFAULT_KEY`): the one default of the control plane and the agents.
DEFAULT_LISTEN_PORT = 10000

# Header and baggage names that carry the lane decision between hops.
LANE_HEADER = "x-graylane"
BAGGAGE_HEADER = "baggage"
BAGGAGE_KEY = "graylane"


# Service, version and lane names never hold this character (they are validated tokens),
# so a cluster name splits back into its parts unambiguously.
CLUSTER_SEPARATOR = "|"


def cluster_name(service: str, version: str, lane: str = "") -> str:
    """The Envoy cluster for one version of one service, for traffic of one lane.

    Traffic outside any lane goes to ``service|version``; lane L's traffic goes to
    ``service|version|L`` even where it falls back to the base version, so Envoy's
    per-cluster statistics count every (service, version, lane) apart. The cluster's EDS
    resource has the same name.
    """
    if lane:
        return f"{service}{CLUSTER_SEPARATOR}{version}{CLUSTER_SEPARATOR}{lane}"
    return f"{service}{CLUSTER_SEPARATOR}{version}"


def cohort_cluster_name(service: str) -> str:
    """The ring-hash cluster of `service`'s cohort split for proxyless gRPC clients
    (`graylane.xds.render`): every version the split reaches, weighted by its share. It
    has no version, so `parse_cluster_name` reads it as no version's cluster (None)."""
    return f"{service}{CLUSTER_SEPARATOR}{CLUSTER_SEPARATOR}cohort"


def parse_cluster_name(name: str) -> tuple[str, str, str] | None:
    """(service, version, lane) of a cluster named by `cluster_name`, else None."""
    parts = name.split(CLUSTER_SEPARATOR)
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1], ""
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    return None


# The one RouteConfiguration of a gateway (`render_gateway`). A proxy's own listener
# instead splits its routes per service (`route_config_name`) behind scoped routes.
ROUTE_CONFIG_NAME = "graylane"
# The name of the scoped-routes configuration (SRDS) of a proxy's listener.
SCOPED_ROUTES_NAME = "graylane"


def route_config_name(service: str) -> str:
    """The RouteConfiguration holding exactly `service`'s virtual host (and its scope's name).

    Service names are lower-case DNS labels, so the name is unambiguous and never equals
    the gateway's single ROUTE_CONFIG_NAME.
    """
    return f"{ROUTE_CONFIG_NAME}/{service}"


# The authority suffix of requests sent to another cluster's gateway.
GATEWAY_DOMAIN = "graylane.gateway"


def gateway_authority(service: str, version: str) -> str:
    """The Host a request for one version of one service carries to another cluster's gateway.

    A gateway serves versions, not services (one cluster may run only the gray version),
    so the version travels in the authority; the gateway restores the plain service name.
    """
    return f"{version}.{service}.{GATEWAY_DOMAIN}"


def listener_name(port: int) -> str:
    return f"graylane_http_{port}"


# Proxyless gRPC clients ask for a Listener named after their target: `xds:///checkout`
# asks for `checkout`, and a bootstrap whose `client_default_listener_resource_name_template`
# is XDSTP_LISTENER_TEMPLATE asks for `xdstp://graylane/envoy.config.listener.v3.Listener/checkout`.
XDSTP_AUTHORITY = "graylane"
XDSTP_LISTENER_TEMPLATE = f"xdstp://{XDSTP_AUTHORITY}/envoy.config.listener.v3.Listener/%s"


def api_listener_names(service: str) -> tuple[str, str]:
    """The names a proxyless client's Listener for `service` goes by: plain, then xdstp.

    Both name the service's own route config (`route_config_name`), whose virtual host
    matches the authority `service` (and `service:<port>`) the client sends.
    """
    return service, XDSTP_LISTENER_TEMPLATE % service
