"""Routing views and convergence: pure functions from etcd state and proxy facts.

Owns: `build_view` (a store `Snapshot` -> the `RoutingView` xds renders), `release_progress`
(how many proxies carry a release's current batch, and whether it is reached) and
`blame_nack` (which lanes a rejected configuration introduced). No I/O here;
`controlplane.dataplane` runs these against etcd and the xDS server.
"""

from __future__ import annotations

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
    """The routing intent for proxies of `cluster` ("" = the local/single cluster)."""
    services = tuple(
        xv.ServiceRoute(name=s.name, base_version=s.stable_version) for s in sorted(snap.services, key=lambda s: s.name)
    )
    endpoints = tuple(
        xv.VersionEndpoints(
            service=v.service,
            version=v.name,
            endpoints=tuple(
                sorted(
                    {xv.Endpoint(e.address, e.port) for e in v.endpoints if e.cluster in ("", cluster)},
                    key=lambda e: (e.address, e.port),
                )
            ),
        )
        for v in sorted(snap.versions, key=lambda v: (v.service, v.name))
    )
    lanes = tuple(lane_of(r) for r in sorted(snap.releases, key=lambda r: r.name) if routed(r))
    return xv.RoutingView(services=services, endpoints=endpoints, lanes=lanes)


def lanes_by_name(view: xv.RoutingView) -> dict[str, xv.Lane]:
    return {lane.name: lane for lane in view.lanes}


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
    pause = release.spec.batches[st.batch].pause
    return None if pause is None else st.batch_reached + pause
