"""The incremental path equals the full one: render, plan and the snapshot check.

Random change sequences (services, versions, endpoints and remote `via_cluster` versions,
lanes added / removed / changed, rules, cohorts, invalid weights, whole views rebuilt with
equal but new objects, lanes reordered, connect timeouts, staged lanes added / removed /
changed / started) are rendered both ways; every
step must give the same names and content versions per type, the same effective view,
the same ValueError, and a Resources derived from the previous step's (changed / removed
exactly the difference).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.discovery.v3 import discovery_pb2
from graylane.xds import resources
from graylane.xds import view as xv
from graylane.xds.cache import InconsistentSnapshot, SnapshotCache, consistency_gaps
from graylane.xds.plan import _plan, plan_derived
from graylane.xds.render import effective_view, render
from graylane.xds.renderer import Renderer
from graylane.xds.resources import Resources
from graylane.xds.server import WILDCARD_TYPES, _DeltaStream, _Selections, _SotwStream
from graylane.xds.tracker import ProxyTracker

PORT = 15001
SERVICES = [f"s{i}" for i in range(8)]
VERSIONS = ["v1", "v2", "v3"]
LANE_NAMES = [f"lane{i}" for i in range(6)]
STAGED_NAMES = [f"staged{i}" for i in range(4)] + ["lane0"]  # one may share a live lane's name


def _rule(rng: random.Random) -> xv.Rule:
    kind = rng.choice([xv.MatchKind.HEADER, xv.MatchKind.COOKIE, xv.MatchKind.QUERY, xv.MatchKind.PATH])
    op = rng.choice([xv.MatchOp.EXACT, xv.MatchOp.PREFIX] if kind is xv.MatchKind.PATH else list(xv.MatchOp))
    value = "" if op is xv.MatchOp.PRESENT else rng.choice(["a", "/b", "c.*"])
    return xv.Rule((xv.Condition(kind, "" if kind is xv.MatchKind.PATH else "x-k", op, value),))


def _lane(rng: random.Random, name: str) -> xv.Lane:
    services = sorted(rng.sample(SERVICES, rng.randint(0, 3)))
    return xv.Lane(
        name=name,
        entry=rng.choice(SERVICES + ["ghost"]),
        weight=rng.choice([0, 0, 5, 10, 30, 60]),
        versions=tuple((s, rng.choice(VERSIONS)) for s in services),
        rules=tuple(_rule(rng) for _ in range(rng.randint(0, 2))),
        cohort=rng.choice([None, None, xv.Cohort(xv.MatchKind.HEADER, "x-user")]),
    )


def _endpoints(rng: random.Random, service: str, version: str) -> xv.VersionEndpoints:
    count = rng.choice([0, 1, 1, 2])
    return xv.VersionEndpoints(
        service,
        version,
        tuple(xv.Endpoint(f"10.0.0.{rng.randint(1, 3)}", 8000 + rng.randint(0, 2)) for _ in range(count)),
        via_cluster=rng.choice(["", "", "", "east"]),
    )


def _view(rng: random.Random) -> xv.RoutingView:
    services = tuple(xv.ServiceRoute(s, rng.choice(VERSIONS)) for s in sorted(rng.sample(SERVICES, 5)))
    endpoints = tuple(_endpoints(rng, s, v) for s in SERVICES for v in VERSIONS if rng.random() < 0.5)
    lanes = tuple(_lane(rng, n) for n in sorted(rng.sample(LANE_NAMES, 3)))
    staged = tuple(_staged(rng, n) for n in sorted(rng.sample(STAGED_NAMES, 2)))
    return xv.RoutingView(services, endpoints, lanes, staged=staged)


def _staged(rng: random.Random, name: str) -> xv.Lane:
    """A staged lane as the control plane builds one: weight 0, no rules, no cohort."""
    return dataclasses.replace(_lane(rng, name), weight=0, rules=(), cohort=None)


def _change(rng: random.Random, view: xv.RoutingView) -> xv.RoutingView:
    """One random change; every object it does not touch is the same object."""
    op = rng.randrange(14)
    services, endpoints, lanes = list(view.services), list(view.endpoints), list(view.lanes)
    staged = list(view.staged)
    if op == 0:  # a service added or removed
        names = {s.name for s in services}
        missing = [s for s in SERVICES if s not in names]
        if missing and (rng.random() < 0.5 or not services):
            services.append(xv.ServiceRoute(rng.choice(missing), rng.choice(VERSIONS)))
            services.sort(key=lambda s: s.name)
        elif services:
            services.pop(rng.randrange(len(services)))
    elif op == 1 and services:  # a base version changed
        i = rng.randrange(len(services))
        services[i] = xv.ServiceRoute(services[i].name, rng.choice(VERSIONS))
    elif op in (2, 3):  # endpoints added, removed or changed (remote or not)
        key = (rng.choice(SERVICES), rng.choice(VERSIONS))
        found = [i for i, ve in enumerate(endpoints) if (ve.service, ve.version) == key]
        if found and rng.random() < 0.4:
            endpoints.pop(found[0])
        elif found:
            endpoints[found[0]] = _endpoints(rng, *key)
        else:
            endpoints.append(_endpoints(rng, *key))
    elif op in (4, 5, 6):  # a lane's weight, rules, cohort or versions changed
        if lanes:
            i = rng.randrange(len(lanes))
            fresh = _lane(rng, lanes[i].name)
            field = rng.choice(["weight", "rules", "cohort", "versions", "entry", "all"])
            lanes[i] = fresh if field == "all" else dataclasses.replace(lanes[i], **{field: getattr(fresh, field)})
    elif op == 7:  # a lane added or removed
        names = {lane.name for lane in lanes}
        missing = [n for n in LANE_NAMES if n not in names]
        if missing and (rng.random() < 0.5 or not lanes):
            lanes.append(_lane(rng, rng.choice(missing)))
            lanes.sort(key=lambda lane: lane.name)
        elif lanes:
            lanes.pop(rng.randrange(len(lanes)))
    elif op == 8:  # the same view rebuilt: equal objects, none identical
        return xv.RoutingView(
            tuple(dataclasses.replace(s) for s in services),
            tuple(dataclasses.replace(ve) for ve in endpoints),
            tuple(dataclasses.replace(lane) for lane in lanes),
            view.connect_timeout_ms,
            tuple(dataclasses.replace(lane) for lane in staged),
        )
    elif op == 9:  # rare: lanes reordered, or the connect timeout changed
        if rng.random() < 0.5:
            rng.shuffle(lanes)
        else:
            return dataclasses.replace(view, connect_timeout_ms=rng.choice([250, 1000, 1500]))
    elif op == 11:  # a staged lane added, removed or changed
        names = {lane.name for lane in staged}
        missing = [n for n in STAGED_NAMES if n not in names]
        if missing and (rng.random() < 0.5 or not staged):
            staged.append(_staged(rng, rng.choice(missing)))
            staged.sort(key=lambda lane: lane.name)
        elif staged and rng.random() < 0.5:
            staged.pop(rng.randrange(len(staged)))
        elif staged:
            i = rng.randrange(len(staged))
            fresh = _staged(rng, staged[i].name)
            field = rng.choice(["versions", "entry"])
            staged[i] = dataclasses.replace(staged[i], **{field: getattr(fresh, field)})
    elif op == 12:  # a staged lane starts: live with its versions and entry, no longer staged
        names = {lane.name for lane in lanes}
        ready = [i for i, lane in enumerate(staged) if lane.name not in names]
        if ready:
            lane = staged.pop(rng.choice(ready))
            lanes.append(dataclasses.replace(lane, weight=rng.choice([5, 10]), rules=_lane(rng, lane.name).rules))
            lanes.sort(key=lambda lane: lane.name)
    elif op == 13:  # a live lane held back to no lane: staged again
        names = {lane.name for lane in staged}
        held = [i for i, lane in enumerate(lanes) if lane.name not in names]
        if held:
            lane = lanes.pop(rng.choice(held))
            staged.append(dataclasses.replace(lane, weight=0, rules=(), cohort=None))
            staged.sort(key=lambda lane: lane.name)
    else:  # several at once
        for _ in range(3):
            view = _change(rng, view)
        return view
    return xv.RoutingView(tuple(services), tuple(endpoints), tuple(lanes), view.connect_timeout_ms, tuple(staged))


def _same(incremental: resources.Resources, full: resources.Resources) -> None:
    for t in resources.PUSH_ORDER:
        assert dict(incremental[t].versions) == dict(full[t].versions), t
        assert incremental[t].version == full[t].version, t


def _check_derived(out: resources.Resources, before: resources.Resources | None) -> None:
    if before is None or out is before or not out.base_versions:
        return
    for t in resources.PUSH_ORDER:
        assert out.base_versions[t] == before[t].version
        typed = out[t]
        if typed.version == before[t].version:
            continue
        assert typed.derives_from(before[t])
        changed = {n for n, v in typed.versions.items() if before[t].versions.get(n) != v}
        removed = set(before[t].versions) - set(typed.versions)
        assert typed.changed == changed, t
        assert typed.removed == removed, t


@pytest.mark.parametrize("seed", range(40))
def test_incremental_render_equals_the_full_render_over_random_changes(seed: int) -> None:
    rng = random.Random(seed)
    renderer = Renderer(listen_port=PORT)
    view = _view(rng)
    before: resources.Resources | None = None
    for _ in range(60):
        try:
            full: resources.Resources | None = render(view, listen_port=PORT)
        except ValueError as exc:
            full, error = None, str(exc)
        if full is None:
            with pytest.raises(ValueError) as raised:
                renderer.render(view)
            assert str(raised.value) == error
            before = None
        else:
            out = renderer.render(view)
            _same(out, full)
            _check_derived(out, before)
            assert renderer.effective_view(view) == effective_view(view)
            before = out
        view = _change(rng, view)


def test_a_weight_change_rerenders_one_route_config_and_shares_everything_else() -> None:
    rng = random.Random(7)
    view = _view(rng)
    while any(sum(lane.weight for lane in view.lanes if lane.entry == s) > 100 for s in SERVICES):
        view = _view(rng)
    view = xv.RoutingView(
        view.services,
        view.endpoints,
        (xv.Lane("a", view.services[0].name, 10, ()),),
    )
    renderer = Renderer(listen_port=PORT)
    first = renderer.render(view)
    second = renderer.render(dataclasses.replace(view, lanes=(dataclasses.replace(view.lanes[0], weight=20),)))
    assert second[resources.ROUTE].changed == {f"graylane/{view.services[0].name}"}
    assert second[resources.ROUTE].removed == frozenset()
    for t in (resources.CLUSTER, resources.ENDPOINT, resources.SCOPED_ROUTE, resources.LISTENER):
        assert second[t] is first[t]
    assert renderer.render(second_view := dataclasses.replace(view)) is not None
    assert renderer.effective_view(second_view) == second_view


def test_ports_share_the_rendered_services() -> None:
    view = xv.RoutingView(
        (xv.ServiceRoute("a", "v1"),), (xv.VersionEndpoints("a", "v1", (xv.Endpoint("10.0.0.1", 1),)),)
    )
    renderer = Renderer()
    one, two = renderer.render(view, listen_port=1), renderer.render(view, listen_port=2)
    assert one[resources.ROUTE] is two[resources.ROUTE]
    assert one[resources.LISTENER].version != two[resources.LISTENER].version
    _same(two, render(view, listen_port=2))


@pytest.mark.parametrize("seed", range(10))
def test_incremental_proxyless_render_equals_the_full_one_and_shares_the_routes(seed: int) -> None:
    rng = random.Random(seed)
    renderer = Renderer(listen_port=PORT)
    view = _view(rng)
    for _ in range(40):
        try:
            full = render(view, listen_port=PORT, proxyless=True)
        except ValueError:
            view = _change(rng, view)
            continue
        out = renderer.render(view, proxyless=True)
        _same(out, full)
        envoy = renderer.render(view)
        # One render of the view: the proxyless clients' routes are the Envoys' objects.
        for t in (resources.CLUSTER, resources.ENDPOINT, resources.ROUTE, resources.SCOPED_ROUTE):
            assert out[t] is envoy[t]
        view = _change(rng, view)


def _renders(seed: int, steps: int = 60) -> list[resources.Resources]:
    """The renderer's outputs over one random change sequence (views that render)."""
    rng = random.Random(seed)
    renderer = Renderer(listen_port=PORT)
    view = _view(rng)
    out = []
    for _ in range(steps):
        try:
            out.append(renderer.render(view))
        except ValueError:
            pass
        view = _change(rng, view)
    return out


@pytest.mark.parametrize("seed", range(25))
def test_derived_plan_equals_the_full_plan(seed: int) -> None:
    derived = 0
    outputs = _renders(seed)
    for before, target in zip(outputs, outputs[1:], strict=False):
        holding = {t: before[t] for t in resources.PUSH_ORDER}
        fast = plan_derived(target, holding)
        if fast is None:
            continue
        derived += 1
        held_items = {t: before[t].items for t in resources.PUSH_ORDER}
        slow = _plan(target, acked=held_items, sent=held_items)
        assert fast.held == slow.held
        for t in resources.PUSH_ORDER:
            assert dict(fast.resources[t].versions) == dict(slow.resources[t].versions), t
            assert fast.resources[t].version == slow.resources[t].version
            planned = fast.resources[t]
            assert planned is target[t] or planned is before[t] or planned.derives_from(before[t])
    assert derived > 0


@pytest.mark.parametrize("seed", range(15))
def test_derived_snapshots_are_checked_like_full_ones(seed: int) -> None:
    """set_snapshot's O(changes) check refuses exactly what the full check refuses."""
    rng = random.Random(seed)
    cache = SnapshotCache()
    for target in _renders(seed):
        stored = cache.snapshot("k")
        candidate = target
        if stored is not None and rng.random() < 0.5:
            # Break the derived snapshot: drop, or add, something a reference needs.
            t = rng.choice([resources.CLUSTER, resources.ENDPOINT, resources.ROUTE])
            names = sorted(target[t].items)
            if names and rng.random() < 0.7:
                candidate = Resources(
                    target.by_type | {t: target[t].replaced({}, [rng.choice(names)])}, target.base_versions
                )
            elif t == resources.ENDPOINT:
                orphan = ClusterLoadAssignment(cluster_name="orphan")
                candidate = Resources(
                    target.by_type | {t: target[t].replaced({"orphan": orphan})}, target.base_versions
                )
        gaps = consistency_gaps(candidate)
        if gaps:
            with pytest.raises(InconsistentSnapshot):
                cache.set_snapshot("k", candidate)
            assert cache.snapshot("k") is stored
        else:
            cache.set_snapshot("k", candidate)
            assert cache.snapshot("k") is candidate


@pytest.mark.parametrize("seed", range(25))
def test_derived_plan_of_a_stream_part_way_equals_the_full_plan(seed: int) -> None:
    """A stream holding, per type, the previous snapshot's set or the new one's (clusters
    ACKed, routes still held...): the derived plan is the full plan, or None where what the
    stream holds would be inconsistent."""
    rng = random.Random(seed)
    derived = refused = 0
    outputs = _renders(seed)
    for before, target in zip(outputs, outputs[1:], strict=False):
        if not target.base_versions:
            continue
        for _ in range(4):
            holding = {t: rng.choice([before[t], target[t]]) for t in resources.PUSH_ORDER}
            fast = plan_derived(target, holding)
            held_items = {t: holding[t].items for t in resources.PUSH_ORDER}
            mixed = Resources.of(held_items)
            if fast is None:
                refused += 1
                assert consistency_gaps(mixed) or any(
                    holding[t].version not in (target[t].version, target.base_versions[t]) for t in resources.PUSH_ORDER
                ), "a consistent holding of base/target sets is planned incrementally"
                continue
            derived += 1
            slow = _plan(target, acked=held_items, sent=held_items)
            assert fast.held == slow.held
            for t in resources.PUSH_ORDER:
                assert dict(fast.resources[t].versions) == dict(slow.resources[t].versions), t
    assert derived > 0


class _Proxy:
    """One stream driven by hand like Envoy: wildcard CDS/LDS/SRDS, EDS for the clusters it
    holds, RDS for the scopes it holds; ACKs everything; records what it is sent."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        stream.key, stream.stream_id = "k", f"p-{stream.protocol}"
        stream.tracker.connected(
            base_pb2.Node(id=stream.stream_id), stream=stream.stream_id, key="k", protocol=stream.protocol
        )
        self.log: list[tuple[str, str, tuple[tuple[str, str], ...], tuple[str, ...]]] = []

    def wanted(self, type_url: str) -> set[str]:
        source = resources.CLUSTER if type_url == resources.ENDPOINT else resources.SCOPED_ROUTE
        return set(self.stream.types[source].sent)

    def request(self, type_url: str, *, nonce: str = "", version: str = "") -> Any:
        names = [] if type_url in WILDCARD_TYPES else sorted(self.wanted(type_url))
        if self.stream.protocol == "sotw":
            return discovery_pb2.DiscoveryRequest(
                type_url=type_url, version_info=version, response_nonce=nonce, resource_names=names
            )
        st = self.stream.types.get(type_url)
        held = st.names if st is not None else set()
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            response_nonce=nonce,
            resource_names_subscribe=sorted(set(names) - held),
            resource_names_unsubscribe=sorted(held - set(names)),
        )

    def settle(self) -> None:
        for _ in range(20):
            bodies = self.stream.push()
            requests = []
            for body in bodies:
                if self.stream.protocol == "sotw":
                    r = discovery_pb2.DiscoveryResponse.FromString(body)
                    got = tuple(sorted((a.TypeName(), resources.content_version(_unpack(a))) for a in r.resources))
                    self.log.append((r.type_url, r.version_info, got, ()))
                    requests.append(self.request(r.type_url, nonce=r.nonce, version=r.version_info))
                else:
                    d = discovery_pb2.DeltaDiscoveryResponse.FromString(body)
                    got = tuple(sorted((x.name, x.version) for x in d.resources))
                    self.log.append((d.type_url, d.system_version_info, got, tuple(d.removed_resources)))
                    requests.append(self.request(d.type_url, nonce=d.nonce))
            for type_url in (resources.ENDPOINT, resources.ROUTE):
                st = self.stream.types[type_url]
                if type_url not in {r.type_url for r in requests} and self.wanted(type_url) != st.names:
                    requests.append(self.request(type_url, nonce=st.latest_nonce, version=st.sotw_version))
            if not requests:
                return
            for request in requests:
                self.stream.handle(request)
                self.check(request)
        raise AssertionError("the stream never settled")

    def check(self, request: Any) -> None:
        """What the stream's shortcuts claim holds: the names it keeps are the ones last
        requested (SotW), an ACKed selection is the ACKed content, the tracker has it."""
        st = self.stream.types[request.type_url]
        if not st.wildcard:  # a named subscription holds only what it wants
            assert set(st.sent_versions) <= st.names and set(st.acked_versions) <= st.names
            assert set(st.sent) <= set(st.sent_versions) and set(st.acked) == set(st.acked_versions)
        if self.stream.protocol == "sotw":
            if not st.wildcard:
                assert set(st.names) == set(request.resource_names) - {"*"}
        elif st.acked_selection is not None:
            assert dict(st.acked_versions) == dict(st.acked_selection.versions)
        status = self.stream.tracker.get(self.stream.stream_id)
        ack = status.acked.get(request.type_url) if status is not None else None
        if ack is not None:
            assert dict(ack.resources) == dict(st.acked_versions)


def _unpack(packed: Any) -> Any:
    message = resources.MESSAGE_TYPES["type.googleapis.com/" + packed.TypeName()]()
    packed.Unpack(message)
    return message


def _fleet(cache: SnapshotCache, *, names_keyed: int | None = None) -> list[_Proxy]:
    selections = _Selections()
    if names_keyed is not None:
        selections.names_keyed = names_keyed
    proxies = [
        _Proxy(_SotwStream(cache, ProxyTracker(), selections)),
        _Proxy(_DeltaStream(cache, ProxyTracker(), selections)),
    ]
    for proxy in proxies:
        for t in resources.PUSH_ORDER:
            proxy.stream.handle(proxy.request(t))
    return proxies


@pytest.mark.parametrize("seed", range(12))
def test_streams_are_sent_the_same_from_derived_snapshots_as_from_full_ones(seed: int) -> None:
    """Two caches over one random change sequence, one fed the Renderer's derived snapshots,
    one the pure render's: every SotW and delta response carries the same resources, versions
    and removals, in the same order of pushes."""
    rng = random.Random(seed)
    renderer = Renderer(listen_port=PORT)
    derived, full = SnapshotCache(), SnapshotCache()
    fleets: list[list[_Proxy]] = []
    view = _view(rng)
    for _ in range(40):
        try:
            pure = render(view, listen_port=PORT)
        except ValueError:
            view = _change(rng, view)
            continue
        derived.set_snapshot("k", renderer.render(view))
        full.set_snapshot("k", pure)
        if not fleets:
            # The fleet on derived snapshots keys every SotW request's names (as at fleet
            # size); the other reads them (too few to key).
            fleets = [_fleet(derived, names_keyed=0), _fleet(full)]
        for proxies in fleets:
            for proxy in proxies:
                proxy.settle()
        view = _change(rng, view)
    for fast, slow in zip(fleets[0], fleets[1], strict=True):
        assert fast.log == slow.log
