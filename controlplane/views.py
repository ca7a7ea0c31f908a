"""Routing views and convergence: pure functions from etcd state and proxy facts.

Owns: `build_view` (a store `Snapshot` -> the `RoutingView` xds renders), `release_progress`
(how many proxies carry a release's current batch, and whether it is reached) and
`blame_nack` (which lanes a rejected configuration introduced). No I/O here;
`controlplane.dataplane` runs these against etcd and the xDS server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from graylane.controlplane import model
from graylane.controlplane.store import Snapshot
from graylane.xds import view as xv


def _condition(c: model.Condition) -> xv.Condition:
    return xv.Condition(
        kind=xv.MatchKind(c.kind.name.lower()),
        name=c.name,
        op=xv.MatchOp(c.op.name.lower()),
        value=c.value,
    )


def lane_of(release: model.Release) -> xv.Lane:
    spec = release.spec
    return xv.Lane(
        name=spec.lane,
        entry=spec.entry,
        weight=release.weight(),
        versions=tuple(sorted((s.service, s.gray_version) for s in spec.services)),
        rules=tuple(xv.Rule(tuple(_condition(c) for c in rule)) for rule in spec.match),
        cohort=None
        if spec.cohort is None
        else xv.Cohort(kind=xv.MatchKind(spec.cohort.kind.name.lower()), name=spec.cohort.name),
    )


def held_by_nack(release: model.Release) -> bool:
    """A release paused because a proxy rejected its config stays out of the view until resumed."""
    return release.status.phase is model.Phase.PAUSED and release.status.last_nack is not None


def routed(release: model.Release) -> bool:
    return release.status.phase.routes_lane and not held_by_nack(release)


def build_view(snap: Snapshot, *, cluster: str = "") -> xv.RoutingView:
    """The routing intent for the proxies of `cluster` ("" = the local/single cluster).

    Where a version runs comes from the registry (endpoints registered by hand; those
    without a cluster count as local everywhere) and from the agents (tagged with their
    cluster). A version with endpoints in `cluster` is reached there directly; one that
    runs only in other clusters is reached through their gateways. A release's placement
    (`gray_clusters`) limits where its gray versions are taken from.
    """
    services = tuple(
        xv.ServiceRoute(name=s.name, base_version=s.stable_version) for s in sorted(snap.services, key=lambda s: s.name)
    )
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
    routed_releases = sorted((r for r in snap.releases if routed(r)), key=lambda r: r.name)
    placement: dict[tuple[str, str], frozenset[str]] = {}
    for r in routed_releases:
        if r.spec.gray_clusters:
            for s in r.spec.services:
                placement.setdefault((s.service, s.gray_version), frozenset(r.spec.gray_clusters))
    endpoints = tuple(
        _version_endpoints(service, version, runs[key], cluster, gateways, placement.get(key))
        for key in sorted(runs)
        for service, version in (key,)
    )
    lanes = tuple(lane_of(r) for r in routed_releases)
    return xv.RoutingView(services=services, endpoints=endpoints, lanes=lanes)


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


def lanes_by_name(view: xv.RoutingView) -> dict[str, xv.Lane]:
    return {lane.name: lane for lane in view.lanes}


def lane_fingerprint(view: xv.RoutingView, lane: str) -> str:
    """A short, process-independent digest of `lane` as `view` has it ("-": absent), so
    replicas can tell whether they counted convergence against the same value of it."""
    found = lanes_by_name(view).get(lane)
    if found is None:
        return "-"
    return hashlib.sha256(repr(found).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Progress:
    proxies: int
    converged: int
    applied: bool  # the lane as intended is what was rendered (no version lacks endpoints)


def release_progress(
    release: model.Release,
    *,
    intended: xv.RoutingView,
    effective: xv.RoutingView,
    carried: Iterable[xv.RoutingView | None],
) -> Progress:
    """How many proxies carry the release's current lane.

    `carried` holds, per connected proxy, the view its ACKed route configuration was
    rendered from (None when unknown). A proxy carries the release when the release's lane
    there equals the lane now intended (both absent counts too: a rolled-back release is
    carried once its lane is gone everywhere).
    """
    want = lanes_by_name(intended).get(release.spec.lane)
    applied = want == lanes_by_name(effective).get(release.spec.lane)
    proxies = converged = 0
    for v in carried:
        proxies += 1
        if v is not None and lanes_by_name(v).get(release.spec.lane) == want:
            converged += 1
    return Progress(proxies=proxies, converged=converged, applied=applied)


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
