"""reconcile (convergence, progress): the incremental proxy facts count exactly what a full recount counts."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from envoy.config.core.v3 import base_pb2
from graylane.controlplane.domain import model
from graylane.controlplane.domain.model import Release
from graylane.controlplane.reconcile import convergence, progress, views
from graylane.xds import tracker as tr
from graylane.xds import view as xv
from graylane.xds.resources import ROUTE
from graylane.xds.tracker import Nack, ProxyTracker, TypeAck

from tests.unit.controlplane.conftest import canary_release


def view_at(batch: int) -> xv.RoutingView:
    lane = views.lane_of(canary_release(batch=batch))
    return xv.RoutingView(services=(xv.ServiceRoute("checkout", "v1"),), endpoints=(), lanes=(lane,))


def full_recount(
    tracker: ProxyTracker, by_version: dict[str, xv.RoutingView], r: Release, *, since: float, now: float, stale: float
) -> views.Progress:
    """Every proxy's facts built afresh from the tracker, counted in one go."""
    facts = []
    for p in tracker.proxies().values():
        ack = p.acked.get(ROUTE)
        facts.append(
            views.ProxyFacts(
                name=convergence._proxy_name(p),
                carried=by_version.get(ack.version) if ack is not None else None,
                since=p.connected_at,
                problem=p.last_nack.message if p.last_nack is not None else "",
            )
        )
    intended = view_at(r.status.batch)
    groups = views.group_by_carried(facts)
    return views.grouped_progress(
        r, intended=intended, effective=intended, groups=groups, target_since=since, now=now, stale_seconds=stale
    )


def one_by_one(facts: list[views.ProxyFacts], r: Release, *, since: float, now: float, stale: float) -> views.Progress:
    """The rule as written, proxy by proxy (names in name order)."""
    want = views.target_in(view_at(r.status.batch), r)
    count = converged = gone = rejecting = 0
    lagging, gone_found, deadline = [], [], None
    for p in facts:
        if p.carried is not None and views.target_in(p.carried, r) == want:
            count, converged = count + 1, converged + 1
            continue
        why = f"rejected: {p.problem[:200]}" if p.problem else "has not ACKed it"
        due = max(since, p.since) + stale
        if now >= due:
            gone += 1
            gone_found.append((p.name, p.problem, f"{p.name}: {why} within {stale:g}s"))
            continue
        count += 1
        rejecting += bool(p.problem)
        deadline = due if deadline is None else min(deadline, due)
        lagging.append((p.name, p.problem, f"{p.name}: {why}"))
    return views.Progress(
        proxies=count,
        converged=converged,
        applied=True,
        lagging=tuple(t for *_, t in sorted(lagging)[: views.NAMES_SHOWN]),
        gone=gone,
        gone_names=tuple(t for *_, t in sorted(gone_found)[: views.NAMES_SHOWN]),
        next_deadline=deadline,
        rejecting=rejecting,
    )


@pytest.mark.parametrize("seed", range(6))
def test_incremental_facts_count_what_a_full_recount_counts(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    clock = [1000.0]
    monkeypatch.setattr(tr, "now", lambda: clock[0])
    tracker = ProxyTracker()
    own = convergence._OwnProxies(tracker)
    by_version = {f"v{b}": view_at(b) for b in range(3)}
    streams: list[str] = []
    target_since = 1000.0
    stale = 30.0
    checks = 0
    for step in range(2500):
        clock[0] += rng.random() * 0.05
        roll = rng.random()
        if roll < 0.15 or not streams:
            stream = tr.new_stream_id(f"node-{rng.randrange(40)}")
            tracker.connected(
                base_pb2.Node(id=stream.partition("#")[0], cluster="c"), stream=stream, key="k", protocol="sotw"
            )
            streams.append(stream)
        elif roll < 0.22:
            tracker.disconnected(streams.pop(rng.randrange(len(streams))))
        elif roll < 0.3:
            tracker.nacked(rng.choice(streams), Nack(ROUTE, "v9", str(step), f"bad {step % 3}", 0.0))
        elif roll < 0.32:
            by_version.pop(f"v{rng.randrange(3)}", None)  # the history forgot a view
        elif roll < 0.34:
            b = rng.randrange(3)
            by_version[f"v{b}"] = view_at(b)  # ... or remembers one again (a new object)
        else:
            tracker.acked(rng.choice(streams), ROUTE, TypeAck(f"v{rng.randrange(3)}"))
        if rng.random() < 0.1:
            own.refresh()
            groups = own.groups(lambda version, _part: by_version.get(version))
            r = canary_release(batch=rng.randrange(3))
            intended = view_at(r.status.batch)
            for now in (clock[0], target_since + stale + rng.random() * 30):  # before and after proxies go stale
                got = views.grouped_progress(
                    r,
                    intended=intended,
                    effective=intended,
                    groups=groups,
                    target_since=target_since,
                    now=now,
                    stale_seconds=stale,
                )
                full = full_recount(tracker, by_version, r, since=target_since, now=now, stale=stale)
                assert got == full, (step, now)
                facts = [
                    replace(f, carried=by_version.get(version) if version else None)
                    for version, f, _, _ in own._proxies.values()
                ]
                assert got == one_by_one(facts, r, since=target_since, now=now, stale=stale)
            assert own.nodes() == frozenset(p.node_id for p in tracker.proxies().values())
            checks += 1
    assert checks > 100


def _facts_of(own: convergence._OwnProxies) -> dict[str, tuple[str, str, float, str, str]]:
    return {s: (v, f.name, f.since, f.problem, node) for s, (v, f, node, _) in own._proxies.items()}


@pytest.mark.parametrize("seed", range(4))
def test_facts_read_in_slices_with_changes_between_them_end_as_one_read(seed: int) -> None:
    """A refresh that runs out of time leaves the rest for the next call (take_new=False
    reads only those, and a call that takes new changes keeps them); whatever changes
    between the slices, the facts then end as a refresh in one go finds them."""
    rng = random.Random(seed)
    tracker = ProxyTracker()
    own = convergence._OwnProxies(tracker)
    streams: list[str] = []

    def change() -> None:
        roll = rng.random()
        if roll < 0.1 or not streams:
            stream = tr.new_stream_id(f"node-{rng.randrange(500)}")
            tracker.connected(base_pb2.Node(id=stream.partition("#")[0]), stream=stream, key="k", protocol="sotw")
            streams.append(stream)
        elif roll < 0.15:
            tracker.disconnected(streams.pop(rng.randrange(len(streams))))
        elif roll < 0.2:
            tracker.nacked(rng.choice(streams), Nack(ROUTE, "v9", "1", f"bad {rng.randrange(3)}", 0.0))
        else:
            tracker.acked(rng.choice(streams), ROUTE, TypeAck(f"v{rng.randrange(3)}"))

    slices = 0
    for _ in range(20):
        for _ in range(rng.randrange(50, 600)):
            change()
        own.refresh(until=0.0)  # the clock is past: one slice of streams, the rest left
        while own.behind:
            slices += 1
            for _ in range(rng.randrange(20)):
                change()
            # (a new pass may take in what changed since before the last one read all)
            own.refresh(until=0.0, take_new=rng.random() < 0.2)
        own.refresh()
        fresh = convergence._OwnProxies(tracker)
        fresh.refresh()
        assert _facts_of(own) == _facts_of(fresh)
        assert {v: len(g) for v, g in own._groups.items()} == {v: len(g) for v, g in fresh._groups.items()}
    assert slices > 20  # most refreshes did stop short


@pytest.mark.parametrize("population", [60, 400])  # fewer members than it keeps first, and more
def test_a_proxy_group_keeps_its_summary_as_members_come_and_go(population: int) -> None:
    rng = random.Random(3)
    group = views.ProxyGroup()
    members: dict[str, views.ProxyFacts] = {}
    for i in range(4000):
        key = f"p{rng.randrange(population)}"
        if rng.random() < 0.4:
            group.remove(key)
            members.pop(key, None)
        else:
            f = views.ProxyFacts(
                f"name-{rng.randrange(max(100, population))}", None, since=rng.random(), problem=rng.choice(["", "x"])
            )
            group.add(key, f)
            members[key] = f
        if i % 3 == 0:
            assert len(group) == len(members)
            assert group.rejecting == sum(1 for f in members.values() if f.problem)
            assert group.earliest_since() == min((f.since for f in members.values()), default=float("inf"))
            # Ties in (name, message) read the same in a status: which of them is kept does not matter.
            shown = sorted((f.name, f.problem) for f in members.values())[:10]
            assert [(f.name, f.problem) for f in group.first_named()] == shown


def test_status_names_do_not_depend_on_the_order_proxies_are_counted_in() -> None:
    r = canary_release(batch=1)
    intended = view_at(1)
    facts = [views.ProxyFacts(f"p{i:02d}", view_at(0) if i % 2 else None, since=float(i)) for i in range(30)]
    results = set()
    for seed in range(5):
        random.Random(seed).shuffle(facts)
        groups = views.group_by_carried(facts)
        results.add(
            views.grouped_progress(
                r, intended=intended, effective=intended, groups=groups, target_since=0.0, now=1.0, stale_seconds=30
            )
        )
    assert len(results) == 1
    (p,) = results
    assert p.lagging == tuple(f"p{i:02d}: has not ACKed it" for i in range(10))
    assert model.Phase.PROGRESSING.routes_lane


def test_only_a_count_growing_short_of_its_proxies_may_be_published_late() -> None:
    rp = progress.ReplicaProgress
    before = {"r": rp("fp", 10, 3)}
    assert progress._only_grew(before, {"r": rp("fp", 10, 7)})
    assert not progress._only_grew(before, {"r": rp("fp", 10, 10)})  # fully converged here: at once
    assert not progress._only_grew(before, {"r": rp("fp", 10, 2)})  # fell
    assert not progress._only_grew(before, {"r": rp("fp", 11, 4)})  # a proxy joined
    assert not progress._only_grew(before, {"r": rp("other", 10, 4)})  # another target
    assert not progress._only_grew(before, {"r": rp("fp", 10, 4), "s": rp("fp", 1, 0)})


def test_a_status_that_only_gains_converged_proxies_may_wait_reached_never() -> None:
    was = views.Progress(proxies=10, converged=3, applied=True)
    written = (100.0, "fp", was)
    assert convergence._converging(written, "fp", replace(was, converged=7), 100.1)
    assert not convergence._converging(written, "fp", replace(was, converged=7), 100.0 + 0.3)  # interval over
    assert not convergence._converging(written, "fp", replace(was, converged=10), 100.1)  # reached: at once
    assert not convergence._converging(written, "other", replace(was, converged=7), 100.1)
    assert not convergence._converging(written, "fp", replace(was, converged=7, rejecting=1), 100.1)
    assert not convergence._converging(written, "fp", replace(was, converged=2), 100.1)
    assert not convergence._converging(written, "fp", replace(was, proxies=11, converged=7), 100.1)


def test_reasons_count_batches_from_one_and_say_proxy_for_one() -> None:
    assert convergence._target_words(canary_release(batch=0)) == "batch 1/3"
    assert (progress.n_proxies(1), progress.n_proxies(0), progress.n_proxies(2)) == (
        "1 proxy",
        "0 proxies",
        "2 proxies",
    )


def test_a_pending_release_created_edited_or_deleted_may_change_the_view_its_status_writes_not() -> None:
    from graylane.controlplane.reconcile.dataplane import _may_change_view

    pending = canary_release(model.Phase.PENDING, batch=-1)
    edited = replace(pending, spec=replace(pending.spec, entry="cart"))
    counted = replace(pending, status=replace(pending.status, proxies=3), revision=9)
    assert _may_change_view({"releases": {"r": (None, pending)}})  # created: its clusters are staged
    assert _may_change_view({"releases": {"r": (pending, edited)}})
    assert _may_change_view({"releases": {"r": (pending, None)}})  # deleted: its staged clusters go
    assert not _may_change_view({"releases": {"r": (pending, counted)}})
    started = replace(pending, status=replace(pending.status, phase=model.Phase.PROGRESSING, batch=0))
    assert _may_change_view({"releases": {"r": (pending, started)}})
