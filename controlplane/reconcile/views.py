"""Routing views and convergence: pure functions from etcd state and proxy facts.

Owns: `build_view` (a store `Snapshot` -> the `RoutingView` xds renders; `build_view_from`
builds it from the previous one and the releases that changed; `served_lane` and
`staged_lane` say what each release puts in it), `grouped_progress`
(how many proxies carry a release's current batch, and whether it is reached) and
`blame_nack` (which lanes a rejected configuration introduced). No I/O here;
`controlplane.dataplane` runs these against etcd and the xDS server.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from types import MappingProxyType
from typing import TypeVar

from graylane.controlplane.domain import model
from graylane.controlplane.store import Snapshot
from graylane.xds import view as xv


def _condition(c: model.Condition) -> xv.Condition:
    return xv.Condition(
        kind=xv.MatchKind(c.kind.name.lower()),
        name=c.name,
        op=xv.MatchOp(c.op.name.lower()),
        value=c.value,
    )


def lane_of(release: model.Release, *, weight: int | None = None) -> xv.Lane:
    """The release's lane at `weight` (default: the weight its proxies are to be served)."""
    spec = release.spec
    return xv.Lane(
        name=spec.lane,
        entry=spec.entry,
        weight=model.served_weight_of(spec, release.status) if weight is None else weight,
        versions=tuple(sorted((s.service, s.gray_version) for s in spec.services)),
        rules=tuple(xv.Rule(tuple(_condition(c) for c in rule)) for rule in spec.match),
        cohort=None
        if spec.cohort is None
        else xv.Cohort(kind=xv.MatchKind(spec.cohort.kind.name.lower()), name=spec.cohort.name),
    )


def routed(release: model.Release) -> bool:
    """A live release (progressing or paused): its convergence is followed, its lane served
    unless a NACK holds it at "no lane" (see `served_lane`)."""
    return release.status.phase.routes_lane


def followed(release: model.Release) -> bool:
    """Releases whose convergence is counted and written: live ones, and finished ones until
    every proxy carries their end state (the lane gone; after a promote, gray as stable)."""
    st = release.status
    return st.phase.routes_lane or (st.phase.terminal and not st.reached)


def served_lane(release: model.Release) -> xv.Lane | None:
    """The lane the proxies are to be served for `release` (None: no lane).

    A rolled-back release is served its drained lane until every proxy carries it
    (`model.draining`).

    A release held by a NACK keeps the lane its proxies last accepted (`held_lane`: rules,
    weight and versions as they were, even if the spec was edited since), so a rejected
    change is never half-applied: proxies that accepted it are moved back to what the
    rejecting proxy still serves, and status says which lane that is.
    """
    st = release.status
    if model.draining(st):
        return replace(lane_of(release, weight=0), rules=(), cohort=None)
    if not st.phase.routes_lane:
        return None
    if model.held(st):
        if st.held_lane is not None:
            return held_lane_of(release, st.held_lane)
        if st.held_batch is None or st.held_batch < 0:
            return None
    return lane_of(release)


def staged_lane(release: model.Release) -> xv.Lane | None:
    """The lane whose clusters are rendered ahead for `release` (None: none), with no route.

    A release that will go live and has no lane now: created and not started (PENDING),
    or held by a NACK at "no lane" (its start rejected; staged as before the start). Its
    gray versions' clusters and endpoints, and its own cluster at the entry, are rendered
    as they will be once it is live (`RoutingView.staged`), so the start's NextBatch
    changes routes alone (RDS), like any later batch. Nothing reaches those clusters:
    tagged and untagged traffic go to base exactly as without them.

    The rest follows from the view, make-before-break as ever: on the start the staged
    lane becomes the live one with the same clusters; a pending release deleted (or its
    spec edited) drops its staged clusters, which no route uses; a finished release is
    never staged, so a release started over from ROLLED_BACK or FAILED by `restart` gets
    its clusters with its routes as before, and one applied again with `--restart`
    (PENDING) is staged again; a rolled-back lane drains as before (`served_lane`).

    Only the name, entry and versions matter (weight 0, no rules, no cohort), so the
    staged value stays put while the release waits.
    """
    st = release.status
    if st.phase.terminal or served_lane(release) is not None:
        return None
    spec = release.spec
    return xv.Lane(
        name=spec.lane,
        entry=spec.entry,
        weight=0,
        versions=tuple(sorted((s.service, s.gray_version) for s in spec.services)),
    )


def held_lane_of(release: model.Release, held: model.HeldLane) -> xv.Lane:
    """The lane `held` describes, under the release's lane name and cohort."""
    base = lane_of(release, weight=held.weight)
    return xv.Lane(
        name=base.name,
        entry=held.entry,
        weight=held.weight,
        versions=held.versions,
        rules=tuple(xv.Rule(tuple(_condition(c) for c in rule)) for rule in held.match),
        cohort=base.cohort,
    )


def held_lane_from(lane: xv.Lane) -> model.HeldLane:
    """What status keeps of a lane proxies accepted (the inverse of `held_lane_of`)."""
    return model.HeldLane(
        entry=lane.entry,
        weight=lane.weight,
        match=tuple(
            tuple(
                model.Condition(
                    kind=model.MatchKind[c.kind.value.upper()],
                    name=c.name,
                    op=model.MatchOp[c.op.value.upper()],
                    value=c.value,
                )
                for c in rule.conditions
            )
            for rule in lane.rules
        ),
        versions=tuple(lane.versions),
    )


def accepted_batch(release: model.Release, accepted: xv.RoutingView | None) -> int:
    """The batch of `release` whose lane a proxy's accepted configuration carries (-1: none,
    or a value of the lane no batch of the current spec matches)."""
    lane = lanes_by_name(accepted).get(release.spec.lane) if accepted is not None else None
    if lane is None:
        return -1
    matches = [i for i, b in enumerate(release.spec.batches) if lane_of(release, weight=b.weight) == lane]
    if not matches:
        return -1
    earlier = [i for i in matches if i <= release.status.batch]
    return max(earlier) if earlier else min(matches)


def build_view(snap: Snapshot, *, cluster: str = "") -> xv.RoutingView:
    """The routing intent for the proxies of `cluster` ("" = the local/single cluster).

    Where a version runs comes from the registry (endpoints registered by hand; those
    without a cluster count as local everywhere) and from the agents (tagged with their
    cluster). A version with endpoints in `cluster` is reached there directly; one that
    runs only in other clusters is reached through their gateways. A release's placement
    (`gray_clusters`) limits where its gray versions are taken from.
    """
    return build_view_from(None, snap, cluster=cluster).view


@dataclass(frozen=True, slots=True)
class BuiltView:
    """A view and what it was built from, so the next one is built from what changed.

    Immutable: a build never touches the previous `BuiltView`, so one may run in a worker
    thread while the loop still reads the last one. `view` shares every unchanged part
    with the previous view (see `build_view_from`).
    """

    view: xv.RoutingView
    cluster: str
    services_from: tuple[model.Service, ...]
    # release name -> (the value its lanes were derived from, the lane it is served, the
    # lane staged for it: None none)
    releases: Mapping[str, tuple[model.Release, xv.Lane | None, xv.Lane | None]]
    lanes: Mapping[str, xv.Lane]  # release name -> its served lane, for those served one
    staged: Mapping[str, xv.Lane]  # release name -> its staged lane, for those staged one
    # (versions, agents' endpoints, clusters, placement) the endpoints were derived from
    endpoints_from: tuple[object, ...]


def build_view_from(
    previous: BuiltView | None,
    snap: Snapshot,
    *,
    changed: Iterable[str] | None = None,
    cluster: str = "",
) -> BuiltView:
    """`build_view(snap)`, built from `previous` (the build of an earlier snapshot).

    `changed`: the names of the releases whose values may differ from those `previous`
    was built from (None: any may; each is then compared by identity, which a store
    follower keeps for values it did not re-read). Only those are looked at again.

    Unchanged parts are the same objects as in `previous.view`: the `services` tuple
    while no service changed, the `endpoints` tuple while no version, agent endpoint,
    cluster or placement changed, the `Lane` of every release whose served lane is equal,
    the `lanes` tuple while none changed (the same of staged lanes and the `staged`
    tuple), and the view itself when nothing did. Renders
    may rely on that identity as a shortcut; equality is what the result guarantees (the
    same value as a build from scratch).
    """
    if previous is not None and previous.cluster != cluster:
        previous = None
    old = previous.view if previous is not None else None
    # Services: compared element by element, which is by identity first for kept values.
    if previous is not None and old is not None and snap.services == previous.services_from:
        services = old.services
    else:
        kept_routes = {s.name: s for s in old.services} if old is not None else {}
        routes = []
        for s in sorted(snap.services, key=lambda s: s.name):
            route = xv.ServiceRoute(name=s.name, base_version=s.stable_version)
            kept_route = kept_routes.get(s.name)
            routes.append(kept_route if kept_route == route else route)
        services = tuple(routes)
        if old is not None and services == old.services:
            services = old.services
    # Lanes: derived again only for releases that may have changed.
    releases, lanes_by_release, staged_by_release, lanes_changed, staged_changed = _served_lanes(
        previous, snap, changed
    )
    lanes = _in_name_order(lanes_by_release, old.lanes if old is not None else None, lanes_changed)
    staged = _in_name_order(staged_by_release, old.staged if old is not None else None, staged_changed)
    # Endpoints: from the registry, the agents, the gateways and the placement of lanes.
    placement = _placement(releases, lanes_by_release, staged_by_release)
    endpoints_from = (snap.versions, snap.cluster_endpoints, snap.clusters, placement)
    if previous is not None and old is not None and endpoints_from == previous.endpoints_from:
        endpoints = old.endpoints
    else:
        endpoints = _endpoints(snap, cluster, placement)
        if old is not None:
            kept_endpoints = {(e.service, e.version): e for e in old.endpoints}
            endpoints = tuple(
                same if (same := kept_endpoints.get((e.service, e.version))) == e else e for e in endpoints
            )
            if endpoints == old.endpoints:
                endpoints = old.endpoints
    if (
        old is not None
        and services is old.services
        and endpoints is old.endpoints
        and lanes is old.lanes
        and staged is old.staged
    ):
        view = old
    else:
        view = xv.RoutingView(services=services, endpoints=endpoints, lanes=lanes, staged=staged)
    return BuiltView(
        view=view,
        cluster=cluster,
        services_from=snap.services,
        releases=releases,
        lanes=lanes_by_release,
        staged=staged_by_release,
        endpoints_from=endpoints_from,
    )


def _in_name_order(
    by_release: Mapping[str, xv.Lane], old: tuple[xv.Lane, ...] | None, changed: bool
) -> tuple[xv.Lane, ...]:
    """`by_release`'s lanes in release-name order; `old` itself when nothing changed or the
    result equals it (later stages compare by identity first)."""
    if old is not None and not changed:
        return old
    lanes = tuple(by_release[name] for name in sorted(by_release))
    return old if old is not None and lanes == old else lanes


_Lanes = tuple[model.Release, xv.Lane | None, xv.Lane | None]


def _lanes_of(release: model.Release, before: _Lanes | None) -> _Lanes:
    """`release`'s served and staged lanes, each the object of `before` where equal."""
    lane = served_lane(release)
    staged = staged_lane(release) if lane is None else None
    if before is not None:
        if before[1] == lane:
            lane = before[1]
        if before[2] == staged:
            staged = before[2]
    return release, lane, staged


def _served_lanes(
    previous: BuiltView | None, snap: Snapshot, changed: Iterable[str] | None
) -> tuple[Mapping[str, _Lanes], Mapping[str, xv.Lane], Mapping[str, xv.Lane], bool, bool]:
    """Per release, the value read and its served and staged lanes (kept for releases not
    changed); the served lanes by release; the staged lanes by release; and whether any
    served lane, or any staged lane, differs from `previous`'s."""
    if previous is None or changed is None:
        # Every release looked at; with a previous build, compared by identity: a kept
        # value keeps its lanes, and an equal lane stays the previous object (renders may
        # tell by identity that it did not change).
        kept = previous.releases if previous is not None else {}
        out: dict[str, _Lanes] = {}
        differs = staged_differs = previous is None or len(kept) != len(snap.releases)
        for r in snap.releases:
            before = kept.get(r.name)
            if before is not None and before[0] is r:
                out[r.name] = before
                continue
            lanes_now = out[r.name] = _lanes_of(r, before)
            if before is None or before[1] is not lanes_now[1]:
                differs = differs or before is not None or lanes_now[1] is not None
            if before is None or before[2] is not lanes_now[2]:
                staged_differs = staged_differs or before is not None or lanes_now[2] is not None
        if kept.keys() != out.keys():
            differs = staged_differs = True
        return (
            out,
            {name: lane for name, (_, lane, _s) in out.items() if lane is not None},
            {name: staged for name, (_, _l, staged) in out.items() if staged is not None},
            differs,
            staged_differs,
        )
    names = set(changed)
    if not names:
        return previous.releases, previous.lanes, previous.staged, False, False
    by_name = snap.by_name if len(snap.by_name) == len(snap.releases) else {r.name: r for r in snap.releases}
    releases = _copied(previous.releases)
    lanes = _copied(previous.lanes)
    staged_lanes = _copied(previous.staged)
    differs = staged_differs = False
    for name in names:
        found = by_name.get(name)
        before = releases.get(name)
        if found is None:
            if before is not None:
                del releases[name]
                differs = lanes.pop(name, None) is not None or differs
                staged_differs = staged_lanes.pop(name, None) is not None or staged_differs
            continue
        if before is not None and before[0] is found:
            continue
        now = releases[name] = _lanes_of(found, before)
        if before is None or before[1] is not now[1]:
            differs = differs or before is not None or now[1] is not None
            _set_or_pop(lanes, name, now[1])
        if before is None or before[2] is not now[2]:
            staged_differs = staged_differs or before is not None or now[2] is not None
            _set_or_pop(staged_lanes, name, now[2])
    return (
        MappingProxyType(releases),
        MappingProxyType(lanes),
        MappingProxyType(staged_lanes),
        differs,
        staged_differs,
    )


def _set_or_pop(table: dict[str, xv.Lane], name: str, lane: xv.Lane | None) -> None:
    if lane is None:
        table.pop(name, None)
    else:
        table[name] = lane


_K = TypeVar("_K")
_V = TypeVar("_V")


def _copied(mapping: Mapping[_K, _V]) -> dict[_K, _V]:
    """A dict copy of `mapping`. The builds keep read-only views of dicts: their `copy()`
    copies the dict at once, where `dict()` of the view goes key by key (3.5 against 54 us
    at 1,000 releases, twice on every NextBatch)."""
    if isinstance(mapping, dict | MappingProxyType):
        return mapping.copy()
    return dict(mapping)


def _placement(
    releases: Mapping[str, _Lanes], lanes: Mapping[str, xv.Lane], staged: Mapping[str, xv.Lane]
) -> Mapping[tuple[str, str], frozenset[str]]:
    """Where the gray versions of served releases may run (first release by name wins).

    Then staged releases, for versions no served release places: their staged endpoints
    are those they will be served once live (so the start changes no endpoints), and a
    release waiting to start never moves the endpoints of a version a live one routes to.
    """
    placement: dict[tuple[str, str], frozenset[str]] = {}
    placed = sorted(name for name in lanes if releases[name][0].spec.gray_clusters)
    for name in placed:
        spec = releases[name][0].spec
        for s in spec.services:
            placement.setdefault((s.service, s.gray_version), frozenset(spec.gray_clusters))
    staged_placed = sorted(name for name in staged if releases[name][0].spec.gray_clusters)
    if staged_placed:
        served = {version for lane in lanes.values() for version in lane.versions}
        for name in staged_placed:
            spec = releases[name][0].spec
            for s in spec.services:
                if (s.service, s.gray_version) not in served:
                    placement.setdefault((s.service, s.gray_version), frozenset(spec.gray_clusters))
    return placement


def _endpoints(
    snap: Snapshot, cluster: str, placement: Mapping[tuple[str, str], frozenset[str]]
) -> tuple[xv.VersionEndpoints, ...]:
    gateways = {c.name: xv.Endpoint(c.gateway_host, c.gateway_port) for c in snap.clusters}
    runs: dict[tuple[str, str], dict[str, set[xv.Endpoint]]] = {}
    for v in snap.versions:
        where = runs.setdefault((v.service, v.name), {})
        for e in v.endpoints:
            where.setdefault(e.cluster, set()).add(xv.Endpoint(e.address, e.port))
    for ce in snap.cluster_endpoints:
        where = runs.setdefault((ce.service, ce.version), {})
        for e in ce.endpoints:
            where.setdefault(e.cluster, set()).add(xv.Endpoint(e.address, e.port))
    return tuple(
        _version_endpoints(service, version, runs[key], cluster, gateways, placement.get(key))
        for key in sorted(runs)
        for service, version in (key,)
    )


def _version_endpoints(
    service: str,
    version: str,
    where: dict[str, set[xv.Endpoint]],
    cluster: str,
    gateways: Mapping[str, xv.Endpoint],
    allowed: frozenset[str] | None,
) -> xv.VersionEndpoints:
    def order(found: Iterable[xv.Endpoint]) -> tuple[xv.Endpoint, ...]:
        return tuple(sorted(set(found), key=lambda e: (e.address, e.port)))

    local = set(where.get("", ()))
    if allowed is None or cluster in allowed:
        local |= where.get(cluster, set()) if cluster else set()
    else:
        local = set()  # placed elsewhere: this cluster's copies (if any) get no lane traffic
    if local:
        return xv.VersionEndpoints(service=service, version=version, endpoints=order(local))
    remote = sorted(
        c
        for c, eps in where.items()
        if c and c != cluster and eps and c in gateways and (allowed is None or c in allowed)
    )
    return xv.VersionEndpoints(
        service=service,
        version=version,
        endpoints=order(gateways[c] for c in remote),
        via_cluster=",".join(remote),
    )


_LANES_KEPT = 64
# Views are immutable values: each one's lane index is built once (keyed by identity, the
# view held so the identity stays its own). A convergence pass asks it per release and per
# view a proxy carries, so rebuilding it there made a pass quadratic in the live releases.
_lanes_index: OrderedDict[int, tuple[xv.RoutingView, Mapping[str, xv.Lane]]] = OrderedDict()


def lanes_by_name(view: xv.RoutingView) -> Mapping[str, xv.Lane]:
    found = _lanes_index.get(id(view))
    if found is not None and found[0] is view:
        return found[1]
    lanes = MappingProxyType({lane.name: lane for lane in view.lanes})
    _lanes_index[id(view)] = (view, lanes)
    if len(_lanes_index) > _LANES_KEPT:
        _lanes_index.popitem(last=False)
    return lanes


Target = tuple[xv.Lane | None, tuple[tuple[str, str], ...]]


def target_in(view: xv.RoutingView, release: model.Release) -> Target:
    """What `release` asks the proxies to carry, as `view` has it: its lane (None: absent)
    and, for a promoted release, the base versions of its services (gray made stable)."""
    lane = lanes_by_name(view).get(release.spec.lane)
    if release.status.phase is not model.Phase.SUCCEEDED:
        return lane, ()
    wanted = {s.service for s in release.spec.services}
    return lane, tuple(sorted((s.name, s.base_version) for s in view.services if s.name in wanted))


def target_of(release: model.Release) -> Target:
    """What `release` asks the proxies to carry, from its own value alone."""
    if release.status.phase is not model.Phase.SUCCEEDED:
        return served_lane(release), ()
    return None, tuple(sorted((s.service, s.gray_version) for s in release.spec.services))


def fingerprint(target: Target) -> str:
    """A short, process-independent digest of a release's target, so replicas can tell
    whether they counted convergence against the same value of it ("-": nothing at all)."""
    if target == (None, ()):
        return "-"
    return hashlib.sha256(repr(target).encode()).hexdigest()[:16]


NAMES_SHOWN = 10  # proxies named in a status (lagging, gone); the counts say how many in all
_FIRST_KEPT = 8 * NAMES_SHOWN  # first members a group keeps (`ProxyGroup.first_named`)
_MESSAGE_SHOWN = 200


@dataclass(frozen=True, slots=True)
class ProxyFacts:
    """One proxy as convergence sees it."""

    name: str  # how status names it: node id, cluster, stream
    carried: xv.RoutingView | None  # the view its ACKed routes were rendered from (None: unknown)
    since: float = 0.0  # unix time it connected (0: unknown)
    problem: str = ""  # Envoy's message of its last NACK ("" none)
    scope: frozenset[str] | None = None  # the services its credential scopes it to (None: all)


def _shown(p: ProxyFacts) -> tuple[str, str]:
    """The order proxies are named in a status: by name (then message), so the names shown
    do not depend on the order the proxies were counted in."""
    return (p.name, p.problem)


@dataclass(frozen=True, slots=True)
class Progress:
    proxies: int  # proxies counted: those of the fleet not declared gone
    converged: int
    applied: bool  # the target as intended is what was rendered (no version lacks endpoints)
    lagging: tuple[str, ...] = ()  # first NAMES_SHOWN by name of the proxies - converged, with why
    gone: int = 0  # declared gone by the stale-proxy rule
    gone_names: tuple[str, ...] = ()
    next_deadline: float | None = None  # unix time the next lagging proxy would be declared gone
    rejecting: int = 0  # of the lagging proxies, those whose last word was a NACK
    # Proxies left out because their scope holds none of the release's services: they
    # neither block it nor serve it (counted only so that a fleet of them reaches it).
    scoped_out: int = 0

    @property
    def reached(self) -> bool:
        return self.applied and (self.proxies > 0 or self.scoped_out > 0) and self.converged == self.proxies


class ProxyGroup:
    """Proxies that carry one view (`carried`), by key, with what a count needs of them kept
    as members come and go: how many reject, the earliest connection, the first names.

    A count asks each group once whether its view carries a release's target; a group that
    does not is summed from these figures, so a pass costs the groups, not the proxies (only
    once proxies may be declared gone are the members looked at one by one). The owner may
    set `carried` again (the view a route version names may become known or forgotten).
    """

    __slots__ = ("carried", "scope", "_members", "_rejecting", "_since", "_first")

    def __init__(self, carried: xv.RoutingView | None = None, *, scope: frozenset[str] | None = None) -> None:
        self.carried = carried
        # The services its proxies may receive (None: all): a release of none of them is
        # not theirs to carry (`grouped_progress`).
        self.scope = scope
        self._members: dict[str, ProxyFacts] = {}
        self._rejecting = 0
        self._since: float | None = None  # the earliest `since` (None: not known now)
        # The first members by `_shown`, up to _FIRST_KEPT of them (None: not known now): at
        # least NAMES_SHOWN, or every member. Kept beyond NAMES_SHOWN so that members leaving
        # (a fan-out moves every proxy from one group to the next) rarely empty it: each
        # refill walks every member.
        self._first: list[ProxyFacts] | None = None

    def __len__(self) -> int:
        return len(self._members)

    @property
    def members(self) -> Mapping[str, ProxyFacts]:
        return MappingProxyType(self._members)

    @property
    def rejecting(self) -> int:
        return self._rejecting

    def add(self, key: str, p: ProxyFacts) -> None:
        """Add (or replace) the member `key`."""
        if key in self._members:
            self.remove(key)
        self._members[key] = p
        if p.problem:
            self._rejecting += 1
        if self._since is not None and p.since < self._since:
            self._since = p.since
        first = self._first
        if first is not None and (len(first) == len(self._members) - 1 or _shown(p) < _shown(first[-1])):
            bisect.insort(first, p, key=_shown)
            del first[_FIRST_KEPT:]

    def remove(self, key: str) -> None:
        p = self._members.pop(key, None)
        if p is None:
            return
        if p.problem:
            self._rejecting -= 1
        if self._since is not None and p.since <= self._since:
            self._since = None
        first = self._first
        if first is None or not first or p.name > first[-1].name:
            return  # not among the first (ordered by name first)
        shown = _shown(p)
        i = bisect.bisect_left(first, shown, key=_shown)
        while i < len(first) and _shown(first[i]) == shown:
            if first[i] is p:
                del first[i]
                if len(first) < NAMES_SHOWN and len(first) < len(self._members):
                    self._first = None  # too few left to name: found again when asked
                return
            i += 1

    def earliest_since(self) -> float:
        if self._since is None:
            self._since = min((p.since for p in self._members.values()), default=math.inf)
        return self._since

    def first_named(self) -> Sequence[ProxyFacts]:
        """The NAMES_SHOWN members named first (in status order)."""
        if self._first is None:
            self._first = heapq.nsmallest(_FIRST_KEPT, self._members.values(), key=_shown)
        return self._first[:NAMES_SHOWN]


ProxyGroups = Sequence[ProxyGroup]


def group_by_carried(proxies: Iterable[ProxyFacts]) -> ProxyGroups:
    """Proxies grouped by the view they carry (by identity: the view history hands out one
    object per rendered configuration), so a count asks each view once, not each proxy."""
    groups: dict[tuple[int, frozenset[str] | None], ProxyGroup] = {}
    for i, p in enumerate(proxies):
        group = groups.get((id(p.carried), p.scope))
        if group is None:
            group = groups[(id(p.carried), p.scope)] = ProxyGroup(p.carried, scope=p.scope)
        group.add(str(i), p)
    return tuple(groups.values())


def grouped_progress(
    release: model.Release,
    *,
    intended: xv.RoutingView,
    effective: xv.RoutingView,
    groups: ProxyGroups,
    target_since: float,
    now: float,
    stale_seconds: float,
) -> Progress:
    """How many proxies carry the release's target, which do not and why, over proxies
    grouped by the view they carry (`group_by_carried`).

    A proxy carries it when its accepted view has the target as `intended` has it (a
    rolled-back release's target is its drained lane, see `model.draining`). A proxy that has
    not carried it for `stale_seconds` after the later of the target appearing
    (`target_since`) and the proxy connecting is declared gone: left out of `proxies`, and
    named in `gone_names`. The result does not depend on the order of the proxies.

    A group whose view carries the target counts whole, and so does one that does not while
    none of its proxies can be stale yet; only then are the members looked at one by one."""
    want = target_in(intended, release)
    applied = want == target_in(effective, release)
    count = converged = gone = rejecting = scoped_out = 0
    behind: list[ProxyGroup] = []
    touched: frozenset[str] | None = None
    for group in groups:
        if not len(group):
            continue
        if group.scope is not None:
            if touched is None:
                touched = services_of(release)
            if group.scope.isdisjoint(touched):
                scoped_out += len(group)
                continue
        carried = group.carried
        if carried is not None and target_in(carried, release) == want:
            count += len(group)
            converged += len(group)
        else:
            behind.append(group)
    if not behind:
        return Progress(proxies=count, converged=converged, applied=applied, scoped_out=scoped_out)
    lagging: list[ProxyFacts] = []
    gone_found: list[ProxyFacts] = []
    deadline: float | None = None
    if now < target_since + stale_seconds:
        # Nobody can be gone before the target is stale_seconds old (a proxy's deadline is
        # the later of the target appearing and the proxy connecting, plus stale_seconds).
        for group in behind:
            count += len(group)
            rejecting += group.rejecting
            lagging.extend(group.first_named())
        deadline = max(target_since, min(g.earliest_since() for g in behind)) + stale_seconds
    else:
        for group in behind:
            for p in group.members.values():
                due = max(target_since, p.since) + stale_seconds
                if now >= due:
                    gone += 1
                    gone_found.append(p)
                    continue
                count += 1
                rejecting += 1 if p.problem else 0
                deadline = due if deadline is None else min(deadline, due)
                lagging.append(p)
    return Progress(
        proxies=count,
        converged=converged,
        applied=applied,
        lagging=tuple(f"{p.name}: {_why(p)}" for p in heapq.nsmallest(NAMES_SHOWN, lagging, key=_shown)),
        gone=gone,
        gone_names=tuple(
            f"{p.name}: {_why(p)} within {stale_seconds:g}s"
            for p in heapq.nsmallest(NAMES_SHOWN, gone_found, key=_shown)
        ),
        next_deadline=deadline,
        rejecting=rejecting,
        scoped_out=scoped_out,
    )


def services_of(release: model.Release) -> frozenset[str]:
    """The services a release's routes touch: those it runs a gray version of, and its entry
    (where its lane's rules and weighted share are routed)."""
    return frozenset({s.service for s in release.spec.services} | {release.spec.entry})


def _why(p: ProxyFacts) -> str:
    return f"rejected: {p.problem[:_MESSAGE_SHOWN]}" if p.problem else "has not ACKed it"


def blame_nack(rejected: xv.RoutingView | None, accepted: xv.RoutingView | None) -> frozenset[str]:
    """Lanes that differ between a rejected configuration and the last accepted one."""
    if rejected is None:
        return frozenset()
    before: Mapping[str, xv.Lane] = lanes_by_name(accepted) if accepted is not None else {}
    return frozenset(name for name, lane in lanes_by_name(rejected).items() if before.get(name) != lane)


def pause_due(release: model.Release) -> datetime | None:
    """When a reached batch with a duration pause may move on (None: manual, or not yet reached)."""
    st = release.status
    if st.phase is not model.Phase.PROGRESSING or not st.reached or st.batch_reached is None:
        return None
    if release.spec.analysis is not None:
        return None  # the leader's analysis moves it (after the pause), not the clock alone
    pause = release.spec.batches[st.batch].pause
    return None if pause is None else st.batch_reached + pause
