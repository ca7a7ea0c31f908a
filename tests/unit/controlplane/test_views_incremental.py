"""views.build_view_from: the view built from the previous one and what changed equals a
build from scratch, and shares every unchanged part with the previous view (by identity)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from graylane.controlplane.domain import model
from graylane.controlplane.reconcile import views
from graylane.controlplane.store import Snapshot

from tests.unit.controlplane.conftest import NOW

SERVICES = [f"s{i}" for i in range(12)]
CLUSTERS = ["east", "west"]


def _spec(rng: random.Random, i: int) -> model.ReleaseSpec:
    picked = rng.sample(SERVICES, rng.randint(1, 3))
    match = ()
    if rng.random() < 0.5:
        match = ((model.Condition(model.MatchKind.HEADER, "x-user", model.MatchOp.EXACT, f"u{rng.randint(0, 3)}"),),)
    return model.ReleaseSpec(
        lane=f"lane-{i}",
        entry=picked[0],
        services=tuple(model.ServiceVersions(s, "v1", rng.choice(["v2", "v3"])) for s in sorted(picked)),
        strategy=model.Strategy.CANARY,
        match=match,
        batches=tuple(model.Batch(w, None) for w in (10, 50, 100)),
        gray_clusters=tuple(rng.sample(CLUSTERS, rng.randint(1, 2))) if rng.random() < 0.3 else (),
    )


def _status(rng: random.Random) -> model.ReleaseStatus:
    phase = rng.choice(list(model.Phase))
    batch = rng.randint(-1, 2) if phase is not model.Phase.PENDING else -1
    status = model.ReleaseStatus(phase=phase, batch=batch, proxies=rng.randint(0, 3))
    if phase is model.Phase.PAUSED and rng.random() < 0.4:
        nack = model.Nack(node="n", type_url="rds", version="v", message="no", at=NOW)
        held_lane = None
        if rng.random() < 0.5:
            held_lane = model.HeldLane(entry="s0", weight=rng.choice([0, 10]), match=(), versions=(("s0", "v2"),))
        status = replace(status, last_nack=nack, held_batch=rng.randint(-1, 2), held_lane=held_lane)
    return status


def _release(rng: random.Random, i: int) -> model.Release:
    return model.Release(f"r{i:02d}", _spec(rng, i), _status(rng), created=NOW)


def _version(rng: random.Random, service: str, version: str) -> model.Version:
    endpoints = tuple(
        model.Endpoint("10.0.0.1", 8000 + rng.randint(0, 3), cluster=rng.choice(["", *CLUSTERS]))
        for _ in range(rng.randint(0, 2))
    )
    return model.Version(service=service, name=version, endpoints=endpoints)


def _agent_endpoints(rng: random.Random) -> tuple[model.ClusterEndpoints, ...]:
    return tuple(
        model.ClusterEndpoints(s, v, (model.Endpoint("10.1.0.1", 9000 + rng.randint(0, 2), cluster=c),))
        for c in CLUSTERS
        for s in rng.sample(SERVICES, 2)
        for v in (rng.choice(["v1", "v2"]),)
    )


def _snapshot(
    services: dict[str, model.Service],
    versions: dict[tuple[str, str], model.Version],
    releases: dict[str, model.Release],
    clusters: tuple[model.ClusterInfo, ...],
    agent: tuple[model.ClusterEndpoints, ...],
) -> Snapshot:
    ordered = tuple(releases[n] for n in sorted(releases))
    return Snapshot(
        revision=1,
        services=tuple(services[n] for n in sorted(services)),
        versions=tuple(versions[k] for k in sorted(versions)),
        releases=ordered,
        clusters=clusters,
        cluster_endpoints=agent,
        by_name={r.name: r for r in ordered},
    )


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("cluster", ["", "east"])
def test_built_from_the_previous_view_equals_a_build_from_scratch_and_keeps_what_did_not_change(
    seed: int, cluster: str
) -> None:
    rng = random.Random(seed)
    services = {s: model.Service(s, "v1") for s in SERVICES}
    versions = {(s, v): _version(rng, s, v) for s in SERVICES for v in ("v1", "v2", "v3")}
    releases = {r.name: r for r in (_release(rng, i) for i in range(10))}
    clusters = tuple(model.ClusterInfo(c, f"gw.{c}", 443, agent_id=c) for c in CLUSTERS)
    agent = _agent_endpoints(rng)
    snap = _snapshot(services, versions, releases, clusters, agent)
    built = views.build_view_from(None, snap, cluster=cluster)
    assert built.view == views.build_view(snap, cluster=cluster)
    for step in range(150):
        changed: set[str] = set()
        kinds: set[str] = set()
        for _ in range(rng.choice([1, 1, 1, 2, 4])):
            what = rng.random()
            if what < 0.55:  # a release moves, is edited, created or deleted
                i = rng.randrange(14)
                name = f"r{i:02d}"
                roll = rng.random()
                if name in releases and roll < 0.1:
                    del releases[name]
                elif name in releases and roll < 0.7:
                    releases[name] = replace(releases[name], status=_status(rng))
                elif name in releases and roll < 0.8:
                    releases[name] = replace(releases[name], revision=releases[name].revision + 1)  # status only
                else:
                    releases[name] = _release(rng, i)
                changed.add(name)
                kinds.add("releases")
            elif what < 0.7:
                s = rng.choice(SERVICES)
                services[s] = model.Service(s, rng.choice(["v1", "v2"]))
                kinds.add("services")
            elif what < 0.85:
                s, v = rng.choice(SERVICES), rng.choice(["v1", "v2", "v3"])
                versions[(s, v)] = _version(rng, s, v)
                kinds.add("versions")
            elif what < 0.95:
                agent = _agent_endpoints(rng)
                kinds.add("clusterendpoints")
            else:
                c = rng.choice(CLUSTERS)
                clusters = tuple(
                    model.ClusterInfo(x.name, x.gateway_host, rng.choice([443, 8443]), x.agent_id) if x.name == c else x
                    for x in clusters
                )
                kinds.add("clusters")
        before = built
        snap = _snapshot(services, versions, releases, clusters, agent)
        # Half the time with the changed names (a watch batch), half compared by identity (a re-read).
        given = changed if step % 2 else None
        built = views.build_view_from(before, snap, changed=given, cluster=cluster)
        scratch = views.build_view(snap, cluster=cluster)
        assert built.view == scratch, f"seed {seed} step {step}"
        old = before.view
        if built.view == old:
            assert built.view is old
        if built.view.services == old.services:
            assert built.view.services is old.services
        if built.view.endpoints == old.endpoints:
            assert built.view.endpoints is old.endpoints
        if built.view.lanes == old.lanes:
            assert built.view.lanes is old.lanes
        kept = {lane.name: lane for lane in old.lanes}
        for lane in built.view.lanes:
            if kept.get(lane.name) == lane:
                assert lane is kept[lane.name], f"seed {seed} step {step}: lane {lane.name} rebuilt"
        if built.view.staged == old.staged:
            assert built.view.staged is old.staged
        kept = {lane.name: lane for lane in old.staged}
        for lane in built.view.staged:
            if kept.get(lane.name) == lane:
                assert lane is kept[lane.name], f"seed {seed} step {step}: staged lane {lane.name} rebuilt"
        if "services" not in kinds:
            assert built.view.services is old.services
        if not kinds & {"versions", "clusterendpoints", "clusters", "releases"}:
            assert built.view.endpoints is old.endpoints


def test_a_status_only_change_keeps_the_very_same_view() -> None:
    rng = random.Random(1)
    r = model.Release("r", _spec(rng, 0), model.ReleaseStatus(phase=model.Phase.PROGRESSING, batch=0), created=NOW)
    services = {s: model.Service(s, "v1") for s in SERVICES}
    versions = {(s, v): _version(rng, s, v) for s in SERVICES for v in ("v1", "v2", "v3")}
    built = views.build_view_from(None, _snapshot(services, versions, {"r": r}, (), ()))
    counted = replace(r, status=replace(r.status, proxies=3, converged=1), revision=7)
    after = views.build_view_from(built, _snapshot(services, versions, {"r": counted}, (), ()), changed={"r"})
    assert after.view is built.view
    moved = replace(counted, status=replace(counted.status, batch=1))
    again = views.build_view_from(after, _snapshot(services, versions, {"r": moved}, (), ()), changed={"r"})
    assert again.view is not built.view
    assert again.view.services is built.view.services and again.view.endpoints is built.view.endpoints
    assert again.view.lanes[0].weight == 50


def test_a_pending_release_is_staged_and_its_start_moves_it_to_the_lanes() -> None:
    rng = random.Random(3)
    spec = _spec(rng, 0)
    pending = model.Release("r", spec, model.ReleaseStatus(), created=NOW)
    services = {s: model.Service(s, "v1") for s in SERVICES}
    versions = {(s, v): _version(rng, s, v) for s in SERVICES for v in ("v1", "v2", "v3")}
    built = views.build_view_from(None, _snapshot(services, versions, {"r": pending}, (), ()))
    assert built.view.lanes == ()
    gray = tuple(sorted((s.service, s.gray_version) for s in spec.services))
    assert built.view.staged == (views.xv.Lane(name="lane-0", entry=spec.entry, weight=0, versions=gray),)
    # A status write that is not a move keeps the very same view.
    counted = replace(pending, revision=2)
    same = views.build_view_from(built, _snapshot(services, versions, {"r": counted}, (), ()), changed={"r"})
    assert same.view is built.view
    # The start: live, no longer staged; the versions and entry are the staged ones.
    started = replace(counted, status=replace(counted.status, phase=model.Phase.PROGRESSING, batch=0))
    live = views.build_view_from(same, _snapshot(services, versions, {"r": started}, (), ()), changed={"r"})
    assert live.view.staged == ()
    assert [(lane.name, lane.entry, lane.versions, lane.weight) for lane in live.view.lanes] == [
        ("lane-0", spec.entry, gray, 10)
    ]
    assert live.view.services is built.view.services and live.view.endpoints is built.view.endpoints
    # Deleted while pending: the staged lane goes.
    gone = views.build_view_from(built, _snapshot(services, versions, {}, (), ()), changed={"r"})
    assert gone.view.staged == () and gone.view.lanes == ()


@pytest.mark.parametrize(
    ("phase", "staged"),
    [
        (model.Phase.PENDING, True),
        (model.Phase.PROGRESSING, False),
        (model.Phase.PAUSED, False),
        (model.Phase.SUCCEEDED, False),
        (model.Phase.ROLLED_BACK, False),
        (model.Phase.FAILED, False),
    ],
)
def test_only_a_release_that_will_go_live_is_staged(phase: model.Phase, staged: bool) -> None:
    rng = random.Random(4)
    batch = -1 if phase is model.Phase.PENDING else 0
    # reached: a finished release's lane is drained (a rolled-back one not yet reached drains).
    r = model.Release("r", _spec(rng, 0), model.ReleaseStatus(phase=phase, batch=batch, reached=True), created=NOW)
    assert (views.staged_lane(r) is not None) is staged


def test_a_release_held_at_no_lane_by_a_nack_is_staged_again() -> None:
    rng = random.Random(5)
    nack = model.Nack(node="n", type_url="rds", version="v", message="no", at=NOW)
    status = model.ReleaseStatus(phase=model.Phase.PAUSED, batch=0, last_nack=nack, held_batch=-1)
    r = model.Release("r", _spec(rng, 0), status, created=NOW)
    assert views.served_lane(r) is None
    staged = views.staged_lane(r)
    assert staged is not None and staged.weight == 0 and staged.rules == ()
