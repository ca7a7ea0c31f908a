"""Proxies scoped to some services: their snapshot keys and their filtered configuration.

Owns: the scoped snapshot key (`scoped_key`: a node group's key plus the services its
credential may receive, `8080@checkout,payments`), `filter_resources` (a rendered
configuration cut down to a scope's services), and `ScopedSnapshotCache`, the snapshot
cache that serves scoped keys by deriving them from their node group's snapshot. It is
the one place both the control plane (`graylane.controlplane.reconcile.dataplane`) and an agent's
relay (`graylane.agent.relay`) get scoping from: neither renders a scoped key itself.

A scope filters by resource name, which names its service (`graylane.xds.view`):
clusters and their load assignments `service|version[|lane]` (and a cohort's
`service||cohort`), route configs and SRDS scopes `graylane/<service>`, a proxyless
client's Listener `service` (or its xdstp name). The socket listener is kept (it names
no service: it routes by scope, so out-of-scope hosts find no route). A route config that
names no single service (a gateway's `graylane`) keeps only the virtual hosts whose every
cluster is in scope (maybe none). Routes of a service route only to that service's clusters, so a
filtered configuration is as consistent as the one it came from.

Cost: keys of identical scopes are one key, so 10,000 proxies with 3 distinct scopes
derive 3 configurations per change; a derivation from the one before (the common case)
costs what the render changed (`TypedResources.changed` / `removed`), not what it holds.
Unscoped keys are untouched: the cache behaves exactly as `SnapshotCache` for them.

Concurrency: single asyncio loop, like `SnapshotCache`. Must not import: etcd,
graylane.controlplane, graylane.agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message
from graylane.xds import multimap
from graylane.xds.cache import SnapshotCache, Watch, listen_port_key
from graylane.xds.plan import route_clusters
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Resources
from graylane.xds.view import CLUSTER_SEPARATOR, ROUTE_CONFIG_NAME

log = logging.getLogger(__name__)

Scope = frozenset[str]  # the services a scoped proxy may receive

SCOPE_SEPARATOR = "@"  # in a key: never in a node group's key, a service name or a route version
_ROUTE_PREFIX = ROUTE_CONFIG_NAME + "/"


def scoped_key(key: str, services: AbstractSet[str] | None) -> str:
    """The snapshot key of a proxy of node group `key` scoped to `services` (None: unscoped,
    `key` itself). Equal scopes give equal keys, whatever order the services came in."""
    if services is None:
        return key
    return f"{key}{SCOPE_SEPARATOR}{','.join(sorted(services))}"


def parse_scoped_key(key: str) -> tuple[str, Scope | None]:
    """(the node group's key, the scope or None) of a snapshot key."""
    base, sep, names = key.partition(SCOPE_SEPARATOR)
    if not sep:
        return key, None
    return base, frozenset(n for n in names.split(",") if n)


def service_of(type_url: str, name: str) -> str | None:
    """The service a resource of this type and name belongs to (None: it names none)."""
    if type_url in (CLUSTER, ENDPOINT):
        service = name.split(CLUSTER_SEPARATOR, 1)[0]
        return service if CLUSTER_SEPARATOR in name and service else None
    if type_url in (ROUTE, SCOPED_ROUTE):
        return name[len(_ROUTE_PREFIX) :] if name.startswith(_ROUTE_PREFIX) else None
    if type_url == LISTENER:
        return name.rsplit("/", 1)[-1]
    return None


def _in_scope(type_url: str, name: str, message: Message, services: Scope) -> Message | None:
    """`message` as a proxy scoped to `services` receives it (None: not at all)."""
    if type_url == LISTENER and not message.HasField("api_listener"):
        return message  # the socket listener routes by scope: it names no service
    service = service_of(type_url, name)
    if service is not None:
        return message if service in services else None
    if type_url == ROUTE:
        config = route_pb2.RouteConfiguration()
        config.CopyFrom(message)  # a gateway's one route config: filtered in a copy
        return _route_config_in_scope(message, config, services)
    return None  # a resource of no known service is never sent to a scoped proxy


def _route_config_in_scope(message: Message, config: route_pb2.RouteConfiguration, services: Scope) -> Message | None:
    """A route config of several services (a gateway's, `message`, and `config` a copy of
    it) with only the virtual hosts whose every cluster is in scope (kept with none: the
    listener that names it stays consistent, and routes nothing)."""
    dropped = []
    for i, vhost in enumerate(config.virtual_hosts):
        clusters = route_clusters(route_pb2.RouteConfiguration(virtual_hosts=[vhost]))
        if not clusters or not all(service_of(CLUSTER, c) in services for c in clusters):
            dropped.append(i)
    if not dropped:
        return message
    for i in reversed(dropped):
        del config.virtual_hosts[i]
    filtered: Message = config
    return filtered


def _filtered(type_url: str, items: Mapping[str, Message], names: Iterable[str], services: Scope) -> dict[str, Message]:
    found = {}
    for name in names:
        kept = _in_scope(type_url, name, items[name], services)
        if kept is not None:
            found[name] = kept
    return found


def filter_resources(
    full: Resources, services: Scope, *, previous: tuple[Resources, Resources] | None = None
) -> Resources:
    """`full` as a proxy scoped to `services` receives it.

    `previous`: (an earlier full configuration, its filtered form). When `full` derives
    from that one (`Resources.replaced`), only what changed is looked at and the result
    derives from the earlier filtered form, so the cache and the ADS streams follow it in
    O(changes) too. Returns the earlier filtered form itself when nothing in scope changed.
    """
    if previous is not None:
        before, scoped = previous
        if full is before:
            return scoped
        if full.base_versions and all(
            full.base_versions.get(t) == before[t].version and (full[t] is before[t] or full[t].derives_from(before[t]))
            for t in full.by_type
        ):
            changes: dict[str, tuple[Mapping[str, Message], Iterable[str]]] = {}
            for type_url, typed in full.by_type.items():
                if typed is before[type_url]:
                    continue
                upserts = _filtered(type_url, typed.items, typed.changed, services)
                held = scoped[type_url].items
                removals = [n for n in typed.removed if n in held]
                removals += [n for n in typed.changed if n not in upserts and n in held]
                if upserts or removals:
                    changes[type_url] = (upserts, removals)
            return scoped.replaced(changes) if changes else scoped
        # Not derived from it: filtered whole, still derived from the earlier filtered form
        # wherever the contents agree (a name whose content is unchanged keeps its message).
        changes = {}
        for type_url, typed in full.by_type.items():
            upserts = _filtered(type_url, typed.items, typed.items, services)
            changes[type_url] = (upserts, [n for n in scoped[type_url].items if n not in upserts])
        return scoped.replaced(changes)
    return Resources.of({t: _filtered(t, typed.items, typed.items, services) for t, typed in full.by_type.items()})


# Called with (scoped key, the node group's configuration, the scoped one derived from it).
Derived = Callable[[str, Resources, Resources], None]


class ScopedSnapshotCache(SnapshotCache):
    """A SnapshotCache that also serves scoped keys (`scoped_key`), derived from their node
    group's snapshot whenever that one is set.

    To its owner (what renders and calls `set_snapshot`) a scoped key is invisible:
    `requested_keys()` and the `on_key_requested` / `on_key_released` callbacks name the
    node group's key, which stays requested while any of its scoped keys is watched, so
    the owner renders each node group once whatever the scopes. `on_derived` tells the
    owner of each derived configuration (to map the versions proxies ACK to what it
    rendered), `on_scope_released` of a scoped key no proxy watches any longer.
    """

    def __init__(
        self, *, key_for_node: Callable[[base_pb2.Node], str] = listen_port_key, history_size: int = 4096
    ) -> None:
        super().__init__(key_for_node=key_for_node, history_size=history_size)
        self._scoped: dict[str, set[str]] = {}  # node group key -> its watched scoped keys
        # scoped key -> (the node group configuration it was derived from, the derived one)
        self._derived: dict[str, tuple[Resources, Resources]] = {}
        self._on_derived: list[Derived] = []
        self._on_scope_released: list[Callable[[str], None]] = []
        super().on_key_released(self._released)  # first: the owners' callbacks see it done

    # -- the owner's view: node group keys only --------------------------------------------

    def requested_keys(self) -> frozenset[str]:
        return frozenset(parse_scoped_key(k)[0] for k in super().requested_keys())

    def on_key_requested(self, callback: Callable[[str], None]) -> None:
        def requested(key: str) -> None:
            base, services = parse_scoped_key(key)
            if services is None:
                callback(key)
            elif self.snapshot(base) is None:
                callback(base)  # its snapshot, once set, derives the scoped one
            else:
                self._derive(key)

        super().on_key_requested(requested)

    def on_key_released(self, callback: Callable[[str], None]) -> None:
        def released(key: str) -> None:
            base = parse_scoped_key(key)[0]
            if base not in super(ScopedSnapshotCache, self).requested_keys() and not self._scoped.get(base):
                callback(base)

        super().on_key_released(released)

    def on_derived(self, callback: Derived) -> None:
        self._on_derived.append(callback)

    def on_scope_released(self, callback: Callable[[str], None]) -> None:
        self._on_scope_released.append(callback)

    def scoped_keys(self) -> frozenset[str]:
        """The scoped keys proxies watch now."""
        return frozenset(k for keys in self._scoped.values() for k in keys)

    # -- deriving --------------------------------------------------------------------------

    def set_snapshot(self, key: str, resources: Resources) -> None:
        super().set_snapshot(key, resources)
        for scoped in sorted(self._scoped.get(key, ())):
            self._derive(scoped)

    def watch(self, key: str, on_change: Callable[[], None]) -> Watch:
        base, services = parse_scoped_key(key)
        if services is not None:
            self._scoped.setdefault(base, set()).add(key)
            if self.snapshot(key) is None and self.snapshot(base) is not None:
                self._derive(key)
        return super().watch(key, on_change)

    def _derive(self, key: str) -> None:
        base, services = parse_scoped_key(key)
        full = self.snapshot(base)
        if full is None or services is None:
            return
        try:
            scoped = filter_resources(full, services, previous=self._derived.get(key))
            super().set_snapshot(key, scoped)
        except ValueError:
            # A filter that broke consistency would be a bug here, not in the proxy: its
            # proxies keep what they hold rather than get a broken configuration.
            log.exception("cannot derive %s; its proxies keep their configuration", key)
            return
        self._derived[key] = (full, scoped)
        for callback in list(self._on_derived):
            try:
                callback(key, full, scoped)
            except Exception:
                log.exception("derived-snapshot callback %r failed for %s", callback, key)

    def _released(self, key: str) -> None:
        base, services = parse_scoped_key(key)
        if services is None:
            return
        multimap.discard(self._scoped, base, key)
        self._derived.pop(key, None)
        self.clear_snapshot(key)
        for callback in list(self._on_scope_released):
            try:
                callback(key)
            except Exception:
                log.exception("scope-released callback %r failed for %s", callback, key)
