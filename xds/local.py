"""Serving one routing view to the local proxies: the component a control-plane replica and
an agent's relay both are, around the snapshot cache.

Owns: the view in force (and the tag its owner names it by: the control plane the view
itself, an agent the ClusterView version it came in); its render for every proxy group the
cache is asked for (keyed by the listener port in the node metadata,
`graylane.xds.view.DEFAULT_LISTEN_PORT` without one; the proxyless key; a gateway's port
rendered with `render_gateway`), rendered lazily for a group first asked for after the
view was set, and forgotten when the group's last proxy leaves; and the bounded history
that maps what a proxy ACKed or NACKed back to the view it came from (`view_of`,
`rejection`). Scoped keys are the cache's (`graylane.xds.scope.ScopedSnapshotCache`
derives them): this component only notes which view each derived configuration came from.

It holds no policy: what a NACK does (pause a release, report it upstream) is its owner's;
`rejection` only says which views the rejected and the accepted configurations came from,
and which services' lanes may be blamed.

Concurrency: one asyncio loop; `render` (and `effective_view`) may also run in a worker
thread (the renderer's lock), everything else on the loop. Must not import: etcd,
graylane.controlplane, graylane.agent.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Generic, TypeVar

from graylane.xds import multimap
from graylane.xds import view as xv
from graylane.xds.cache import DEFAULT_KEY, PROXYLESS_KEY, SnapshotCache
from graylane.xds.render import render_gateway
from graylane.xds.renderer import Renderer
from graylane.xds.resources import PUSH_ORDER, ROUTE, Resources
from graylane.xds.scope import Scope, ScopedSnapshotCache, parse_scoped_key, scoped_key
from graylane.xds.tracker import ProxyStatus
from graylane.xds.view import DEFAULT_LISTEN_PORT

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 512  # (type, version) pairs remembered: a few hundred views of every group

T = TypeVar("T")


class ViewHistory(Generic[T]):
    """Which view (its tag) produced a given (type, version): bounded, newest kept; the
    entries a cache key's renders added go with the key (unless another key rendered them too).

    Proxyless gRPC clients subscribe to resources by name, so what they ACK is a part of a
    rendered set, whose version no render produced: for the sets rendered for them
    (PROXYLESS_KEY), the content versions of each set are kept too, and `containing` finds
    the newest view whose set holds a given part."""

    def __init__(self, size: int = DEFAULT_HISTORY) -> None:
        self._size = size
        self._views: OrderedDict[tuple[str, str], T] = OrderedDict()
        self._keys: dict[str, set[tuple[str, str]]] = {}  # cache key -> entries it rendered
        self._users: dict[tuple[str, str], set[str]] = {}  # entry -> keys that rendered it
        # entry -> the content versions of that set (the set's own dict, never mutated)
        self._sets: dict[tuple[str, str], Mapping[str, str]] = {}
        self.generation = 0  # moves on every change: what `get` answers may have changed
        # (scope, type, version) -> view, for scoped proxies' configurations (`remember_scoped`)
        self._scoped: OrderedDict[tuple[str, str, str], T] = OrderedDict()
        self._scoped_sets: dict[tuple[str, str, str], Mapping[str, str]] = {}

    def remember(self, resources: Resources, view: T, *, key: str = "") -> None:
        self.generation += 1
        mine = self._keys.setdefault(key, set())
        for type_url in PUSH_ORDER:
            entry = (type_url, resources[type_url].version)
            self._views[entry] = view
            self._views.move_to_end(entry)
            mine.add(entry)
            self._users.setdefault(entry, set()).add(key)
            if key == PROXYLESS_KEY:
                self._sets[entry] = resources[type_url].shared_versions()
        while len(self._views) > self._size:
            dropped, _ = self._views.popitem(last=False)
            self._sets.pop(dropped, None)
            for user in self._users.pop(dropped, ()):
                self._keys[user].discard(dropped)

    def containing(self, type_url: str, part: Mapping[str, str]) -> T | None:
        """The newest view whose rendered `type_url` set holds every resource of `part` at
        its content version (None: none remembered, or `part` is empty)."""
        if not part:
            return None
        for entry in reversed(self._views):
            if entry[0] != type_url:
                continue
            versions = self._sets.get(entry)
            if versions is not None and all(versions.get(name) == v for name, v in part.items()):
                return self._views[entry]
        return None

    def forget(self, key: str) -> None:
        """`key`'s last proxy left: drop what only its renders added."""
        self.generation += 1
        for entry in self._keys.pop(key, ()):
            if multimap.discard(self._users, entry, key):
                self._views.pop(entry, None)
                self._sets.pop(entry, None)

    def keys(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._views)

    def get(self, type_url: str, version: str) -> T | None:
        return self._views.get((type_url, version))

    def remember_scoped(self, scope: Scope, resources: Resources, view: T, *, proxyless: bool = False) -> None:
        """`resources` (a scoped configuration, `graylane.xds.scope`) came from `view`.

        Kept apart from the node groups' renders, by scope: a scoped set equal to some
        node group's (its scope holds every service there is) must not make that group's
        proxies look as if they carried a newer view. A set the scope's renders leave
        unchanged maps to the newest view: within its scope, that is what it serves."""
        self.generation += 1
        mark = scoped_key("", scope)
        for type_url in PUSH_ORDER:
            entry = (mark, type_url, resources[type_url].version)
            self._scoped[entry] = view
            self._scoped.move_to_end(entry)
            if proxyless:  # (as for PROXYLESS_KEY: such clients hold parts of a set)
                self._scoped_sets[entry] = resources[type_url].shared_versions()
        while len(self._scoped) > self._size:
            dropped, _ = self._scoped.popitem(last=False)
            self._scoped_sets.pop(dropped, None)

    def get_scoped(self, scope: Scope, type_url: str, version: str) -> T | None:
        return self._scoped.get((scoped_key("", scope), type_url, version))

    def containing_scoped(self, scope: Scope, type_url: str, part: Mapping[str, str]) -> T | None:
        """`containing`, among the sets rendered for proxyless clients of `scope`."""
        if not part:
            return None
        mark = scoped_key("", scope)
        for entry in reversed(self._scoped):
            if entry[0] != mark or entry[1] != type_url:
                continue
            versions = self._scoped_sets.get(entry)
            if versions is not None and all(versions.get(name) == v for name, v in part.items()):
                return self._scoped[entry]
        return None


@dataclass(frozen=True, slots=True)
class Rejection(Generic[T]):
    """What a proxy's last NACK rejected: the view the rejected configuration came from, the
    view of the one it holds of that type (None: unknown, or none accepted), and the
    services whose lanes alone may be blamed (None: any the two views differ in)."""

    rejected: T | None
    accepted: T | None
    services: frozenset[str] | None = None


def services_named(names: Iterable[str]) -> frozenset[str]:
    """The services resources of these names belong to: a route config ``graylane/<service>``,
    a cluster or its endpoints ``<service>|<version>[|<lane>]``, a proxyless listener
    ``<service>`` (or its xdstp name)."""
    found: set[str] = set()
    for name in names:
        parsed = xv.parse_cluster_name(name)
        if parsed is not None:
            found.add(parsed[0])
        elif name.startswith(xv.ROUTE_CONFIG_NAME + "/"):
            found.add(name.split("/", 1)[1])
        else:
            found.add(name.rsplit("/", 1)[-1])
    return frozenset(found)


@dataclass(eq=False)
class LocalServing(Generic[T]):
    """One view served to every local proxy group through `cache`, and the views behind
    what the proxies ACK and NACK.

    `set_view` renders every requested group at once. An owner that renders off the loop
    instead calls `render` per key (in a worker thread), then `install` and `set_rendered`
    per key on the loop, so a group asked for meanwhile is rendered from the installed view.
    """

    cache: SnapshotCache
    _: KW_ONLY
    listen_address: str = "127.0.0.1"
    default_listen_port: int = DEFAULT_LISTEN_PORT
    gateway_port: int | None = None
    history_size: int = DEFAULT_HISTORY
    _renderer: Renderer = field(init=False)  # incremental, shared by every port
    _history: ViewHistory[T] = field(init=False)
    _view: xv.RoutingView | None = field(init=False, default=None)
    _tag: T | None = field(init=False, default=None)
    # (type, version) of a proxyless client's part -> (history generation, the view it names)
    _partial: dict[tuple[str, str], tuple[int, T | None]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._renderer = Renderer(listen_address=self.listen_address)
        self._history = ViewHistory(self.history_size)
        self.cache.on_key_requested(self.render_key)
        self.cache.on_key_released(self._release_key)
        if isinstance(self.cache, ScopedSnapshotCache):
            self.cache.on_derived(self._remember_derived)

    @property
    def view(self) -> xv.RoutingView | None:
        """The view in force (None: none yet)."""
        return self._view

    @property
    def tag(self) -> T | None:
        """The owner's name for the view in force."""
        return self._tag

    @property
    def history(self) -> ViewHistory[T]:
        return self._history

    # -- rendering -------------------------------------------------------------------------

    def port_of(self, key: str) -> int:
        """The listener port of a proxy group's cache key."""
        if key == DEFAULT_KEY or not key.isdigit():
            return self.default_listen_port
        return int(key)

    def render(self, view: xv.RoutingView, key: str, *, wait: bool = True) -> Resources:
        """`view` rendered for the proxy group `key` (ValueError: it cannot be). Safe in a
        worker thread; `wait=False` never blocks on a render running in one."""
        port = self.port_of(key)
        if self.gateway_port is not None and port == self.gateway_port:
            return render_gateway(view, listen_port=port, listen_address=self.listen_address)
        return self._renderer.render(view, listen_port=port, wait=wait, proxyless=key == PROXYLESS_KEY)

    def effective_view(self, view: xv.RoutingView) -> xv.RoutingView:
        """What proxies carrying `view` route by (`Renderer.effective_view`)."""
        return self._renderer.effective_view(view)

    def install(self, view: xv.RoutingView, tag: T) -> None:
        """Make `view` (named `tag`) the view in force without rendering it: the owner sets
        each key's render with `set_rendered`; keys asked for from now on render from it."""
        self._view, self._tag = view, tag

    def set_view(self, view: xv.RoutingView, tag: T) -> None:
        """Serve `view` (named `tag`) to every proxy group asked for."""
        self.install(view, tag)
        for key in sorted(self.cache.requested_keys()):
            self.render_key(key)

    def set_rendered(self, key: str, tag: T, resources: Resources | ValueError) -> None:
        """Remember `resources` as the view `tag`'s and set them as `key`'s snapshot; a
        render that failed (or an inconsistent one) leaves the key's proxies on what they
        hold rather than push a broken configuration or stop the caller."""
        try:
            if isinstance(resources, ValueError):
                raise resources
            self._history.remember(resources, tag, key=key)
            self.cache.set_snapshot(key, resources)
        except ValueError:
            log.exception("cannot render the view for %s; proxies keep their last configuration", key)

    def render_key(self, key: str) -> None:
        """Render the view in force for `key` and set it (the cache asks on a new group)."""
        if self._view is None or self._tag is None:
            return
        try:
            resources: Resources | ValueError = self.render(self._view, key, wait=False)
        except ValueError as exc:
            resources = exc
        self.set_rendered(key, self._tag, resources)

    def _release_key(self, key: str) -> None:
        """The last proxy of `key` left: nothing is kept for it (rendered again on request)."""
        self.cache.clear_snapshot(key)
        self._history.forget(key)
        self._renderer.forget(self.port_of(key), proxyless=key == PROXYLESS_KEY)

    def kept_keys(self) -> frozenset[str]:
        """Cache keys with per-key state kept here (their views' history)."""
        return self._history.keys()

    def _remember_derived(self, key: str, full: Resources, scoped: Resources) -> None:
        view = self._history.get(ROUTE, full[ROUTE].version)
        base, scope = parse_scoped_key(key)
        if view is not None and scope is not None:
            self._history.remember_scoped(scope, scoped, view, proxyless=base == PROXYLESS_KEY)

    # -- what proxies hold -----------------------------------------------------------------

    def view_of(self, type_url: str, version: str, part: Mapping[str, str], *, scope: Scope | None = None) -> T | None:
        """The view a proxy's `type_url` `version` (holding `part`) came from: that of the
        set, or for a proxyless client (which holds a part of a set) the newest view whose
        set holds that part; for a proxy scoped to `scope`, among that scope's sets."""
        history = self._history
        if scope is not None:
            found = history.get_scoped(scope, type_url, version)
            return found if found is not None else history.containing_scoped(scope, type_url, part)
        found = history.get(type_url, version)
        if found is not None or not part:
            return found
        memo = self._partial.get((type_url, version))
        if memo is not None and memo[0] == history.generation:
            return memo[1]
        found = history.containing(type_url, part)
        self._partial[(type_url, version)] = (history.generation, found)
        while len(self._partial) > self.history_size:
            self._partial.pop(next(iter(self._partial)))
        return found

    def rejection(self, proxy: ProxyStatus) -> Rejection[T] | None:
        """The views behind `proxy`'s last NACK (None: it sent none)."""
        nack = proxy.last_nack
        if nack is None:
            return None
        accepted_ack = proxy.acked.get(nack.type_url)
        scope = parse_scoped_key(proxy.key)[1]
        history = self._history
        if scope is not None:
            # A scoped proxy's sets: its views in between may have changed lanes of services
            # it never sees, so only lanes of its scope's services are blamed.
            rejected = self.view_of(nack.type_url, nack.version, nack.resources, scope=scope)
            accepted = None
            if accepted_ack is not None:
                accepted = self.view_of(nack.type_url, accepted_ack.version, accepted_ack.resources, scope=scope)
            return Rejection(rejected, accepted, scope)
        rejected = history.get(nack.type_url, nack.version)
        accepted = history.get(nack.type_url, accepted_ack.version) if accepted_ack else None
        if rejected is None and nack.resources:
            # A proxyless client rejected a part of a set: the views holding that part and
            # the part it accepted, blaming only lanes of the services the parts differ in
            # (views in between may have changed other services' lanes).
            held = accepted_ack.resources if accepted_ack is not None else {}
            rejected = history.containing(nack.type_url, nack.resources)
            accepted = history.containing(nack.type_url, held) if held else None
            return Rejection(
                rejected, accepted, services_named(n for n, v in nack.resources.items() if held.get(n) != v)
            )
        return Rejection(rejected, accepted)
