"""Incremental rendering: a view derived from the previous one costs what changed.

Owns: `Renderer`, which remembers the last view it rendered, the lookups over it
(`graylane.xds.render.ViewIndex`), its effective lanes and every service's resources, and
given a new view re-renders only the services the difference touches. Its output is a
`Resources` derived from the previous output for the same listen port
(`Resources.replaced`: changed / removed names and O(changes) set versions), with the
same content, and so the same content versions, as the pure `graylane.xds.render.render`
of the same view (tests compare the two over random change sequences). The pure
`render` stays the reference, and `render_gateway` stays pure.

What a difference touches:
* a service added, removed or changed: that service;
* the endpoints of (service, version) added, removed or changed: that service, and every
  lane with a gray version of it (its effective versions may change);
* a lane added, removed or changed, or whose effective versions changed: its entry and
  every service it has an effective version of, before and after;
* the same for a staged lane (`RoutingView.staged`: clusters only, no routes; their order
  does not matter, since it adds clusters to a set).
Views are compared by identity first (the control plane keeps unchanged tuples and
objects from one view to the next) and then by equality, so correctness never depends on
identity; a change of connect timeout, lanes reordered, or duplicate names renders
everything again (from the previous messages where their inputs are equal).

Concurrency: `render` may be called from a worker thread and from the loop; one render
updates the state at a time (a lock). A caller that must not wait (`wait=False`) gets a
pure render instead while another holds it. Must not import: etcd,
graylane.controlplane, graylane.agent.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import threading
from collections.abc import Hashable, Iterable, Sequence
from types import MappingProxyType
from typing import TypeVar

from google.protobuf.message import Message
from graylane.xds import render as _render
from graylane.xds import resources
from graylane.xds.render import ServiceResources, ViewIndex, effective_lane, effective_view, render_service
from graylane.xds.resources import Resources, TypedResources
from graylane.xds.view import DEFAULT_LISTEN_PORT, Lane, RoutingView, ServiceRoute, VersionEndpoints, api_listener_names

__all__ = ["Renderer"]

_SERVICE_TYPES = (resources.CLUSTER, resources.ENDPOINT, resources.SCOPED_ROUTE, resources.ROUTE)
_PROXYLESS = -1  # where the last proxyless output is kept among the ports' outputs
_T = TypeVar("_T")


class _Full(Exception):
    """The difference cannot be followed incrementally: render everything."""


@dataclasses.dataclass(slots=True)
class _Service:
    """One service's rendered resources and the messages they were built from (reused)."""

    out: ServiceResources
    used: dict[Hashable, Message]


class _State:
    """Everything derived from the last view (mutated only under the renderer's lock)."""

    def __init__(self, view: RoutingView) -> None:
        self.view = view
        self.timeout = view.connect_timeout_ms
        self.services: dict[str, ServiceRoute] = {}
        self.raw_lanes: dict[str, Lane] = {}
        self.eff_lanes: dict[str, Lane] = {}
        self.trimmed: set[str] = set()  # lanes whose effective versions differ from the view's
        self.position: dict[str, int] = {}
        self.raw_versioned: dict[str, set[str]] = {}  # service -> lanes with a gray version of it
        self.entering: dict[str, set[str]] = {}  # service -> lanes entering there
        self.exact = True  # no two services, lanes or endpoint entries share a name
        self.versions_of: dict[str, set[str]] = {}  # service -> versions with endpoints entries
        # Staged lanes, kept like the live ones above (no positions: they add clusters only).
        self.raw_staged: dict[str, Lane] = {}
        self.eff_staged: dict[str, Lane] = {}
        self.staged_trimmed: set[str] = set()
        self.staged_versioned: dict[str, set[str]] = {}  # service -> staged lanes with a gray version of it
        self.staged_entering: dict[str, set[str]] = {}  # service -> staged lanes entering there
        self.index = ViewIndex(RoutingView((), ()))
        self.per_service: dict[str, _Service] = {}
        self.typed: dict[str, TypedResources] = {}
        self.effective = view


def _by_identity(old: Sequence[_T], new: Sequence[_T]) -> tuple[list[_T], list[_T]]:
    """(objects of `old` not in `new`, objects of `new` not in `old`), by identity."""
    old_ids = set(map(id, old))
    new_ids = set(map(id, new))
    return [o for o in old if id(o) not in new_ids], [o for o in new if id(o) not in old_ids]


class Renderer:
    """Renders views for proxies, each from the previous one (see the module docstring).

    `render(view, listen_port=...)` gives what `graylane.xds.render.render` gives, derived
    from this renderer's previous output for that port. `effective_view(view)` is
    `graylane.xds.render.effective_view(view)`, free for the view last rendered.
    """

    def __init__(self, *, listen_port: int = DEFAULT_LISTEN_PORT, listen_address: str = "127.0.0.1") -> None:
        self.listen_port = listen_port
        self.listen_address = listen_address
        self._lock = threading.Lock()
        self._state: _State | None = None
        self._last: dict[int, Resources] = {}
        self._listeners: dict[int, TypedResources] = {}
        # Proxyless clients' listeners (one pair per service), and the services they are for.
        self._api_services: frozenset[str] = frozenset()
        self._api_listeners = TypedResources(resources.LISTENER, {})

    # ------------------------------------------------------------------------ public

    def render(
        self, view: RoutingView, *, listen_port: int | None = None, wait: bool = True, proxyless: bool = False
    ) -> Resources:
        """Every resource a proxy listening on `listen_port` needs for `view`; with
        `proxyless`, what proxyless gRPC clients need instead (`render(proxyless=True)`).

        Raises ValueError where `render` does (and then forgets its state: the next render
        starts afresh). With `wait=False`, a render already running in another thread is not
        waited for: this one is a pure, full render instead.
        """
        port = self.listen_port if listen_port is None else listen_port
        if not self._lock.acquire(blocking=wait):
            return _render.render(view, listen_port=port, listen_address=self.listen_address, proxyless=proxyless)
        try:
            state = self._update(view)
            return self._output_proxyless(state) if proxyless else self._output(state, port)
        finally:
            self._lock.release()

    def effective_view(self, view: RoutingView) -> RoutingView:
        """`effective_view(view)`: the one already derived if `view` is the last rendered."""
        state = self._state
        if state is not None and state.view is view:
            return state.effective
        return effective_view(view)

    def forget(self, listen_port: int, *, proxyless: bool = False) -> None:
        """Nothing more is rendered for `listen_port` (or for proxyless clients): its next
        render is built afresh."""
        # No lock (the loop must not wait for a render in a worker thread): a render racing
        # with this may keep the port's last output, which is still a valid base.
        if proxyless:
            self._last.pop(_PROXYLESS, None)
            return
        self._last.pop(listen_port, None)
        self._listeners.pop(listen_port, None)

    # ------------------------------------------------------------------------ output

    def _output_proxyless(self, state: _State) -> Resources:
        names = frozenset(state.services)
        if names != self._api_services:
            old = self._api_services
            added = _render.api_listeners(names - old)
            gone = [n for service in old - names for n in api_listener_names(service)]
            self._api_listeners = self._api_listeners.replaced(added, gone)
            self._api_services = names
        return self._derive(_PROXYLESS, self._api_listeners, state)

    def _output(self, state: _State, port: int) -> Resources:
        listener = self._listeners.get(port)
        if listener is None:
            message = _render._listener(self.listen_address, port, scoped=True)
            listener = self._listeners[port] = TypedResources(resources.LISTENER, {message.name: message})
        return self._derive(port, listener, state)

    def _derive(self, port: int, listener: TypedResources, state: _State) -> Resources:
        by_type = {t: listener if t == resources.LISTENER else state.typed[t] for t in resources.PUSH_ORDER}
        last = self._last.get(port)
        if last is not None and all(last.by_type[t] is by_type[t] for t in resources.PUSH_ORDER):
            return last
        out = last.derived(by_type) if last is not None else Resources(MappingProxyType(by_type))
        self._last[port] = out
        return out

    # ------------------------------------------------------------------------ state

    def _update(self, view: RoutingView) -> _State:
        state = self._state
        if state is not None and state.view is view:
            return state
        try:
            if state is None or not state.exact or view.connect_timeout_ms != state.timeout:
                raise _Full
            self._follow(state, view)
        except _Full:
            state = self._state = self._build(view, state)
        except BaseException:
            self._state = None  # half-updated: the next render starts afresh
            raise
        return state

    def _build(self, view: RoutingView, previous: _State | None) -> _State:
        """Everything from scratch (reusing the previous messages whose inputs are equal)."""
        self._state = None
        state = _State(view)
        for lane in view.lanes:
            state.raw_lanes.setdefault(lane.name, lane)
        effective = effective_view(view)
        index = state.index = ViewIndex(effective)
        state.effective = effective
        for position, lane in enumerate(effective.lanes):
            state.eff_lanes.setdefault(lane.name, lane)
            state.position.setdefault(lane.name, position)
        for name, lane in state.raw_lanes.items():
            if state.eff_lanes[name] is not lane:
                state.trimmed.add(name)
            _link(state.entering, state.raw_versioned, lane)
        for lane in view.staged:
            state.raw_staged.setdefault(lane.name, lane)
        for lane in effective.staged:
            state.eff_staged.setdefault(lane.name, lane)
        for name, lane in state.raw_staged.items():
            if state.eff_staged[name] is not lane:
                state.staged_trimmed.add(name)
            _link(state.staged_entering, state.staged_versioned, lane)
        for service_name, version in index.endpoints:
            state.versions_of.setdefault(service_name, set()).add(version)
        state.exact = (
            len(state.raw_lanes) == len(view.lanes)
            and len(state.raw_staged) == len(view.staged)
            and len(index.endpoints) == len(view.endpoints)
            and len({s.name for s in view.services}) == len(view.services)
        )
        items: dict[str, dict[str, Message]] = {t: {} for t in _SERVICE_TYPES}
        for service in sorted(view.services, key=lambda s: s.name):
            state.services[service.name] = service
            old = previous.per_service.get(service.name) if previous is not None else None
            rendered = self._render_service(state, service, old)
            _add(items, rendered.out)
        state.typed = {t: TypedResources(t, items[t]) for t in _SERVICE_TYPES}
        self._state = state
        return state

    def _render_service(self, state: _State, service: ServiceRoute, old: _Service | None) -> _Service:
        reuse = _render._Reuse(dict(old.used) if old is not None else None)
        out = render_service(service, state.index, connect_timeout_ms=state.timeout, reuse=reuse)
        rendered = _Service(out, reuse.used)
        state.per_service[service.name] = rendered
        return rendered

    def _follow(self, state: _State, view: RoutingView) -> None:
        """Move `state` to `view`, re-rendering only the services the difference touches."""
        old_view = state.view
        dirty: set[str] = set()
        dirty |= self._follow_services(state, old_view.services, view.services)
        if len(state.services) != len(view.services):
            raise _Full  # duplicate service names
        recompute: set[str] = set()  # lanes whose effective versions may change
        recompute_staged: set[str] = set()  # the same of staged lanes
        touched = self._follow_endpoints(state, old_view.endpoints, view.endpoints)
        if len(state.index.endpoints) != len(view.endpoints):
            raise _Full  # two entries for one (service, version): the first wins, in view order
        for service in touched:
            dirty.add(service)
            recompute |= state.raw_versioned.get(service, set())
            recompute_staged |= state.staged_versioned.get(service, set())
        recompute |= self._follow_lanes(state, old_view.lanes, view.lanes)
        recompute_staged |= self._follow_staged(state, old_view.staged, view.staged)
        dirty |= self._follow_effective(state, view, recompute, recompute_staged)
        if state.trimmed or state.staged_trimmed:
            state.effective = dataclasses.replace(
                view,
                lanes=tuple(state.eff_lanes[lane.name] for lane in view.lanes),
                staged=tuple(state.eff_staged[lane.name] for lane in view.staged),
            )
        else:
            state.effective = view
        state.view = view  # after `effective`: `effective_view` reads them without the lock
        self._rerender(state, dirty)

    def _follow_services(self, state: _State, old: tuple[ServiceRoute, ...], new: tuple[ServiceRoute, ...]) -> set[str]:
        if old is new:
            return set()
        gone, came = _by_identity(old, new)
        before = {s.name: state.services.get(s.name) for s in (*gone, *came)}
        for service in gone:
            if state.services.get(service.name) is service:
                del state.services[service.name]
        for service in came:
            if service.name in state.services and state.services[service.name] is not service:
                raise _Full  # two services of one name
            state.services[service.name] = service
        return {name for name, was in before.items() if state.services.get(name) != was}

    def _follow_endpoints(
        self, state: _State, old: tuple[VersionEndpoints, ...], new: tuple[VersionEndpoints, ...]
    ) -> set[str]:
        """Update the endpoint lookups; the services whose endpoints changed."""
        if old is new:
            return set()
        index = state.index
        gone, came = _by_identity(old, new)
        keys = {(ve.service, ve.version) for ve in (*gone, *came)}
        before = {key: index.endpoints.get(key) for key in keys}
        for ve in gone:
            key = (ve.service, ve.version)
            if index.endpoints.get(key) is ve:
                del index.endpoints[key]
        for ve in came:
            key = (ve.service, ve.version)
            if key in index.endpoints:
                raise _Full  # a duplicate (service, version)
            index.endpoints[key] = ve
        touched: set[str] = set()
        for key, was in before.items():
            now = index.endpoints.get(key)
            if now == was:
                continue
            service, version = key
            touched.add(service)
            versions = state.versions_of.setdefault(service, set())
            if now is None:
                versions.discard(version)
            else:
                versions.add(version)
        for service in touched:
            remote = sorted(v for v in state.versions_of.get(service, ()) if index.endpoints[(service, v)].via_cluster)
            if remote:
                index.remote_by_service[service] = tuple(remote)
            else:
                index.remote_by_service.pop(service, None)
        return touched

    def _follow_lanes(self, state: _State, old: tuple[Lane, ...], new: tuple[Lane, ...]) -> set[str]:
        """Update the raw lanes; the names of lanes added, removed or changed."""
        if old is new:
            return set()
        changed = _swap_raw(state.raw_lanes, state.entering, state.raw_versioned, old, new)
        if len(old) == len(new):
            # Lanes replaced in place (a weight, a rule...): no position moved. The indexes
            # where the two differ, found at C speed; each must hold the same name.
            moved = itertools.compress(range(len(new)), map(operator.is_not, old, new))
            if all(old[i].name == new[i].name for i in moved):
                return changed
        position = {lane.name: i for i, lane in enumerate(new)}
        survivors_before = [name for name in state.position if name in position]
        survivors_before.sort(key=state.position.__getitem__)
        survivors_after = [lane.name for lane in new if lane.name in state.position]
        if survivors_before != survivors_after:
            raise _Full  # lanes reordered: every service two of them share would change
        state.position = position
        return changed

    def _follow_staged(self, state: _State, old: tuple[Lane, ...], new: tuple[Lane, ...]) -> set[str]:
        """Update the raw staged lanes; the names of those added, removed or changed."""
        if old is new:
            return set()
        return _swap_raw(state.raw_staged, state.staged_entering, state.staged_versioned, old, new)

    def _follow_effective(
        self, state: _State, view: RoutingView, names: Iterable[str], staged: Iterable[str] = ()
    ) -> set[str]:
        """Recompute the effective lanes `names` and staged lanes `staged`; the services
        whose lane lookups changed."""
        index = state.index
        dirty: set[str] = set()
        for name in staged:
            _follow_lane(name, state.raw_staged, state.eff_staged, state.staged_trimmed, index, dirty)
        for name in names:
            _follow_lane(name, state.raw_lanes, state.eff_lanes, state.trimmed, index, dirty)
        for service in dirty:
            self._reindex(state, service)
        return dirty

    def _reindex(self, state: _State, service: str) -> None:
        """`entering` and `versioned` of `service`, from the effective lanes, in view order."""
        index = state.index
        # Every lane entering at `service` or with an effective version of it (which is one
        # of its gray versions in the view).
        candidates = state.entering.get(service, set()) | state.raw_versioned.get(service, set())
        order = sorted((n for n in candidates if n in state.eff_lanes), key=state.position.__getitem__)
        entering, versioned = _entering_and_versioned(service, (state.eff_lanes[n] for n in order))
        _set_or_drop(index.entering, service, entering)
        _set_or_drop(index.versioned, service, versioned)
        # Staged lanes: by name (they only add clusters to a set: order does not matter).
        candidates = state.staged_entering.get(service, set()) | state.staged_versioned.get(service, set())
        order = sorted(n for n in candidates if n in state.eff_staged)
        entering, versioned = _entering_and_versioned(service, (state.eff_staged[n] for n in order))
        _set_or_drop(index.staged_entering, service, entering)
        _set_or_drop(index.staged_versioned, service, versioned)

    def _rerender(self, state: _State, dirty: set[str]) -> None:
        upserts: dict[str, dict[str, Message]] = {t: {} for t in _SERVICE_TYPES}
        removals: dict[str, set[str]] = {t: set() for t in _SERVICE_TYPES}
        for name in sorted(dirty):
            old = state.per_service.get(name)
            service = state.services.get(name)
            if service is None:
                if old is not None:
                    del state.per_service[name]
                    _remove(removals, old.out)
                continue
            new = self._render_service(state, service, old).out
            if old is not None:
                _remove(removals, old.out)
            _add(upserts, new)
        for t in _SERVICE_TYPES:
            removals[t] -= upserts[t].keys()
            state.typed[t] = state.typed[t].replaced(upserts[t], removals[t])


def _add(items: dict[str, dict[str, Message]], out: ServiceResources) -> None:
    items[resources.CLUSTER].update(out.clusters)
    items[resources.ENDPOINT].update(out.assignments)
    items[resources.SCOPED_ROUTE][out.scope.name] = out.scope
    items[resources.ROUTE][out.route_config.name] = out.route_config


def _remove(names: dict[str, set[str]], out: ServiceResources) -> None:
    names[resources.CLUSTER].update(out.clusters)
    names[resources.ENDPOINT].update(out.assignments)
    names[resources.SCOPED_ROUTE].add(out.scope.name)
    names[resources.ROUTE].add(out.route_config.name)


def _entering_and_versioned(service: str, lanes: Iterable[Lane]) -> tuple[list[Lane], list[tuple[Lane, str]]]:
    """Of `lanes`, in their order: those entering at `service`, and those with a version of it."""
    entering: list[Lane] = []
    versioned: list[tuple[Lane, str]] = []
    for lane in lanes:
        if lane.entry == service:
            entering.append(lane)
        version = lane.version_for(service)
        if version is not None:
            versioned.append((lane, version))
    return entering, versioned


def _link(entering: dict[str, set[str]], versioned: dict[str, set[str]], lane: Lane) -> None:
    """`lane` in the lookups by entry and by versioned service (live or staged ones)."""
    entering.setdefault(lane.entry, set()).add(lane.name)
    for service, _version in lane.versions:
        versioned.setdefault(service, set()).add(lane.name)


def _unlink(entering: dict[str, set[str]], versioned: dict[str, set[str]], lane: Lane) -> None:
    entering.get(lane.entry, set()).discard(lane.name)
    for service, _version in lane.versions:
        versioned.get(service, set()).discard(lane.name)


def _swap_raw(
    raw: dict[str, Lane],
    entering: dict[str, set[str]],
    versioned: dict[str, set[str]],
    old: tuple[Lane, ...],
    new: tuple[Lane, ...],
) -> set[str]:
    """`raw` (live or staged lanes by name) from `old` to `new`, each lane (un)linked in its
    lookups; the names added, removed or changed. _Full when two share a name."""
    gone, came = _by_identity(old, new)
    changed: set[str] = set()
    for lane in gone:
        if raw.get(lane.name) is lane:
            del raw[lane.name]
            _unlink(entering, versioned, lane)
        changed.add(lane.name)
    for lane in came:
        if lane.name in raw:
            raise _Full  # two lanes of one name
        raw[lane.name] = lane
        _link(entering, versioned, lane)
        changed.add(lane.name)
    if len(raw) != len(new):
        raise _Full
    return changed


def _follow_lane(
    name: str,
    raw: dict[str, Lane],
    effective: dict[str, Lane],
    trimmed: set[str],
    index: ViewIndex,
    dirty: set[str],
) -> None:
    """Recompute lane `name`'s effective form from `raw` into `effective` (and whether it is
    `trimmed`); a lane that changed adds its entry and versioned services to `dirty`. The
    same for live lanes and staged ones, each with its own tables."""
    was = effective.get(name)
    lane = raw.get(name)
    now = effective_lane(lane, index) if lane is not None else None
    if now is None:
        effective.pop(name, None)
        trimmed.discard(name)
    else:
        effective[name] = now
        if now is lane:
            trimmed.discard(name)
        else:
            trimmed.add(name)
    if now == was:
        return
    for changed in (was, now):
        if changed is not None:
            dirty.add(changed.entry)
            dirty.update(service for service, _version in changed.versions)


def _set_or_drop(table: dict[str, list[_T]], key: str, value: list[_T]) -> None:
    if value:
        table[key] = value
    else:
        table.pop(key, None)
