"""The versioned snapshot cache the ADS server serves from.

Owns: one consistent `Resources` snapshot per node-group key, the watches that wake the
ADS streams of a key when its snapshot changes, which keys connected proxies ask for, and
a bounded content-addressed history of resources (by content version), so a proxy that
reconnects presenting a version it already has is recognised and not re-sent anything.

Versions are the opaque content-derived strings of `graylane.xds.resources`, compared only
for equality: every replica that holds the same content agrees on them.

A snapshot derived from the key's stored one (`Resources.replaced`, as the incremental
`graylane.xds.renderer.Renderer` makes them) is checked for consistency and remembered in
O(changes): per key, how many resources refer to each name is kept up to date.

Concurrency: single asyncio loop; every method is called from that loop's thread. Waking
the watches of a key with many streams continues in a task owned by the cache, in batches.
Must not import: etcd, graylane.controlplane, graylane.agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from google.protobuf import json_format
from google.protobuf.message import Message
from graylane.xds.plan import eds_name, listener_route_configs, route_clusters, uses_eds
from graylane.xds.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    Resources,
    TypedResources,
    content_version,
    set_version,
)

log = logging.getLogger(__name__)

_V = TypeVar("_V")

DEFAULT_KEY = "default"
# Proxyless gRPC clients (grpcio, grpc-java, grpc-go, grpc-js-xds) share one snapshot: the
# same clusters, endpoints and routes as Envoys, with a client-side Listener per service
# (`graylane.xds.render.api_listeners`) instead of a socket listener.
PROXYLESS_KEY = "proxyless"
# Every gRPC implementation announces this client feature (gRFC A27); Envoy never does.
GRPC_CLIENT_FEATURE = "envoy.lb.does_not_support_overprovisioning"
# A snapshot change wakes the streams of its key in batches, yielding to the loop between
# batches, so a change fanned out to thousands of streams never holds it. The first batch
# has FANOUT_BATCH streams; later ones are sized so that the loop pass running a batch's
# pushes (and whatever else is ready) takes about FANOUT_SLICE seconds.
FANOUT_BATCH = 100
FANOUT_SLICE = 0.008
_FANOUT_MIN, _FANOUT_MAX = 10, 2000
LISTEN_PORT_METADATA = "listen_port"


class InconsistentSnapshot(ValueError):
    """A snapshot references resources it does not contain; `missing` names each gap."""

    def __init__(self, missing: tuple[str, ...]) -> None:
        super().__init__("inconsistent snapshot: " + "; ".join(missing))
        self.missing = missing


class InvalidNodeMetadata(ValueError):
    """A proxy's node metadata cannot be served; the message names the field and the value."""


def is_proxyless(node: base_pb2.Node) -> bool:
    """Whether `node` is a proxyless gRPC client rather than an Envoy.

    gRPC clients name themselves in `user_agent_name` ("gRPC Python", "grpc-node-js",
    "gRPC Go", "gRPC Java") and announce GRPC_CLIENT_FEATURE; Envoy names itself "envoy",
    and is never taken for one whatever features it announces.
    """
    agent = node.user_agent_name.lower()
    return agent.startswith("grpc") or (agent != "envoy" and GRPC_CLIENT_FEATURE in node.client_features)


def listen_port_key(node: base_pb2.Node) -> str:
    """Group proxies by the `listen_port` in their node metadata; DEFAULT_KEY without one;
    PROXYLESS_KEY for proxyless gRPC clients (a `listen_port` means nothing to them).

    A port is an integer 1..65535, given as a number or a string of digits; the key is its
    decimal form, so 8080 and "8080" share a key. Anything else raises InvalidNodeMetadata
    (the server ends the stream with INVALID_ARGUMENT) rather than inventing a listener or
    silently serving the default one.
    """
    if is_proxyless(node):
        return PROXYLESS_KEY
    fields = node.metadata.fields
    if LISTEN_PORT_METADATA not in fields:
        return DEFAULT_KEY
    value = fields[LISTEN_PORT_METADATA]
    kind = value.WhichOneof("kind")
    port: int | None = None
    if kind == "string_value":
        text = value.string_value
        if text.isascii() and text.isdigit() and len(text) <= 5:
            port = int(text)
        shown = repr(text)
    elif kind == "number_value":
        number = value.number_value
        if number.is_integer():
            port = int(number)
        shown = repr(int(number)) if number.is_integer() else repr(number)
    else:
        shown = json_format.MessageToJson(value, indent=None)
    if port is None or not 1 <= port <= 65535:
        raise InvalidNodeMetadata(
            f"node.metadata.{LISTEN_PORT_METADATA}: {shown} is not a port (an integer 1..65535, "
            "as a number or a string of digits)"
        )
    return str(port)


def consistency_gaps(resources: Resources) -> tuple[str, ...]:
    """Every dangling reference in a snapshot, as readable strings (empty: consistent).

    A listener using scoped routes (SRDS) with no scopes at all is consistent: it serves
    nothing yet (a view without services), and scopes may come later.
    """
    clusters = resources[CLUSTER].items
    endpoints = resources[ENDPOINT].items
    routes = resources[ROUTE].items
    gaps: list[str] = []
    eds_wanted: set[str] = set()
    for cluster in clusters.values():
        assert isinstance(cluster, cluster_pb2.Cluster)
        if uses_eds(cluster):
            eds_wanted.add(eds_name(cluster))
    gaps += [f"EDS resource {n!r} for EDS cluster is missing" for n in sorted(eds_wanted - endpoints.keys())]
    gaps += [f"EDS resource {n!r} names no EDS cluster" for n in sorted(endpoints.keys() - eds_wanted)]
    for name, listener in sorted(resources[LISTENER].items.items()):
        assert isinstance(listener, listener_pb2.Listener)
        for rc in sorted(listener_route_configs(listener) - routes.keys()):
            gaps.append(f"route config {rc!r} of listener {name!r} is missing")
    scopes = resources[SCOPED_ROUTE].items
    for name, scope in sorted(scopes.items()):
        assert isinstance(scope, scoped_route_pb2.ScopedRouteConfiguration)
        if scope.route_configuration_name not in routes:
            gaps.append(f"route config {scope.route_configuration_name!r} of scope {name!r} is missing")
    for name, rc_msg in sorted(routes.items()):
        assert isinstance(rc_msg, route_pb2.RouteConfiguration)
        for cluster_name in sorted(route_clusters(rc_msg) - clusters.keys()):
            gaps.append(f"cluster {cluster_name!r} routed to by {name!r} is missing")
    return tuple(gaps)


def check_consistency(resources: Resources) -> None:
    gaps = consistency_gaps(resources)
    if gaps:
        raise InconsistentSnapshot(gaps)


# What a resource refers to, by the kind of name: an EDS cluster wants its load
# assignment; a listener (plain RDS) and a scope name route configs; a route config
# routes to clusters.
_EDS, _ROUTES, _CLUSTERS = "eds", "routes", "clusters"


def _references(type_url: str, message: Message) -> tuple[str, Iterable[str]] | None:
    if type_url == CLUSTER:
        assert isinstance(message, cluster_pb2.Cluster)
        return (_EDS, (eds_name(message),)) if uses_eds(message) else None
    if type_url == LISTENER:
        assert isinstance(message, listener_pb2.Listener)
        return _ROUTES, listener_route_configs(message)
    if type_url == SCOPED_ROUTE:
        assert isinstance(message, scoped_route_pb2.ScopedRouteConfiguration)
        return _ROUTES, (message.route_configuration_name,)
    if type_url == ROUTE:
        assert isinstance(message, route_pb2.RouteConfiguration)
        return _CLUSTERS, route_clusters(message)
    return None


class _References:
    """How many resources of one consistent snapshot refer to each name, by kind.

    Lets a snapshot derived from the stored one (`Resources.base_versions`) be checked in
    O(changes): only names whose counts or presence changed can have become dangling.
    """

    def __init__(self, resources: Resources) -> None:
        self.counts: dict[str, Counter[str]] = {_EDS: Counter(), _ROUTES: Counter(), _CLUSTERS: Counter()}
        for type_url, typed in resources.by_type.items():
            for message in typed.items.values():
                refs = _references(type_url, message)
                if refs is not None:
                    self.counts[refs[0]].update(refs[1])

    def follow(self, stored: Resources, new: Resources) -> bool:
        """Whether `new`, derived from the consistent `stored`, is consistent; if so, count
        `new` from now on. False: not derived, or a gap (check it in full)."""
        if not new.base_versions:
            return False
        delta: dict[str, Counter[str]] = {kind: Counter() for kind in self.counts}
        touched: dict[str, set[str]] = {kind: set() for kind in self.counts}
        for type_url, typed in new.by_type.items():
            before = stored.by_type.get(type_url)
            if before is None or new.base_versions.get(type_url) != before.version:
                return False
            if typed is before or typed.version == before.version:
                continue
            if not typed.derives_from(before):
                return False
            for name in typed.changed | typed.removed:
                old = before.items.get(name)
                refs = _references(type_url, old) if old is not None else None
                if refs is not None:
                    delta[refs[0]].subtract(refs[1])
                    touched[refs[0]].update(refs[1])
            for name in typed.changed:
                refs = _references(type_url, typed.items[name])
                if refs is not None:
                    delta[refs[0]].update(refs[1])
                    touched[refs[0]].update(refs[1])
            # A resource added or removed may be what a reference names.
            kind = {ENDPOINT: _EDS, ROUTE: _ROUTES, CLUSTER: _CLUSTERS}.get(type_url)
            if kind is not None:
                touched[kind] |= typed.changed | typed.removed
        endpoints, routes, clusters = new[ENDPOINT].items, new[ROUTE].items, new[CLUSTER].items
        for name in touched[_EDS]:
            if (self.counts[_EDS][name] + delta[_EDS][name] > 0) != (name in endpoints):
                return False
        for name in touched[_ROUTES]:
            if self.counts[_ROUTES][name] + delta[_ROUTES][name] > 0 and name not in routes:
                return False
        for name in touched[_CLUSTERS]:
            if self.counts[_CLUSTERS][name] + delta[_CLUSTERS][name] > 0 and name not in clusters:
                return False
        for kind, changes in delta.items():
            counts = self.counts[kind]
            for name, change in changes.items():
                if change:
                    counts[name] += change
                    if counts[name] <= 0:
                        del counts[name]
        return True


class Watch:
    """A stream's interest in one key: `on_change()` runs whenever the key's snapshot changes."""

    def __init__(self, cache: SnapshotCache, key: str, on_change: Callable[[], None]) -> None:
        self.key = key
        self.on_change = on_change
        self._cache = cache

    def close(self) -> None:
        self._cache._drop_watch(self)


class _History:
    """Bounded, content-addressed memory of resources and of per-type sets sent or stored.

    Whole sets are kept as the (immutable) `TypedResources` themselves, the `set_limit`
    latest; a set derived from one already kept adds only its changed messages.
    """

    def __init__(self, size: int, set_limit: int = 64) -> None:
        self._size = size
        self._set_limit = set_limit
        self._messages: OrderedDict[tuple[str, str], Message] = OrderedDict()
        self._sets: OrderedDict[tuple[str, str], tuple[tuple[str, str], ...]] = OrderedDict()
        self._typed: OrderedDict[tuple[str, str], TypedResources] = OrderedDict()

    def remember_set(self, typed: TypedResources) -> None:
        """Remember a whole set (O(changes) if the set it derives from is remembered)."""
        key = (typed.type_url, typed.version)
        if key in self._typed:
            self._typed.move_to_end(key)
            return
        derived = bool(typed.base_version) and (typed.type_url, typed.base_version) in self._typed
        for name in typed.changed if derived else typed.items:
            self._put(self._messages, (typed.type_url, typed.versions[name]), typed.items[name])
        self._typed[key] = typed
        while len(self._typed) > self._set_limit:
            self._typed.popitem(last=False)

    def remember(self, type_url: str, items: Mapping[str, Message]) -> str:
        versions = {name: content_version(msg) for name, msg in items.items()}
        for name, msg in items.items():
            self._put(self._messages, (type_url, versions[name]), msg)
        version: str = set_version(versions)
        self._put(self._sets, (type_url, version), tuple(sorted(versions.items())))
        return version

    def message(self, type_url: str, version: str) -> Message | None:
        return self._messages.get((type_url, version))

    def resolve_set(self, type_url: str, version: str) -> Mapping[str, Message] | None:
        typed = self._typed.get((type_url, version))
        if typed is not None:
            return typed.items
        entries = self._sets.get((type_url, version))
        if entries is None:
            return None
        out: dict[str, Message] = {}
        for name, item_version in entries:
            msg = self._messages.get((type_url, item_version))
            if msg is None:
                return None
            out[name] = msg
        return MappingProxyType(out)

    def _put(self, store: OrderedDict[tuple[str, str], _V], key: tuple[str, str], value: _V) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > self._size:
            store.popitem(last=False)


class SnapshotCache:
    """Snapshots by node-group key, with watches and the keys proxies currently request."""

    def __init__(
        self,
        *,
        key_for_node: Callable[[base_pb2.Node], str] = listen_port_key,
        history_size: int = 4096,
    ) -> None:
        self.key_for_node = key_for_node
        self._snapshots: dict[str, Resources] = {}
        self._references: dict[str, _References] = {}  # of each key's stored snapshot
        self._watches: dict[str, set[Watch]] = {}
        self._requested: Counter[str] = Counter()
        self._key_requested: list[Callable[[str], None]] = []
        self._key_released: list[Callable[[str], None]] = []
        self.history = _History(history_size)
        self._fan_outs: set[asyncio.Task[None]] = set()

    def set_snapshot(self, key: str, resources: Resources) -> None:
        """Store a consistent snapshot for `key` and wake its streams; raises InconsistentSnapshot.

        A snapshot derived from the stored one (`Resources.replaced`) is checked and
        remembered in O(changes); any other in full.
        """
        previous = self._snapshots.get(key)
        if resources is previous:
            return
        references = self._references.get(key)
        if previous is None or references is None or not references.follow(previous, resources):
            check_consistency(resources)
            self._references[key] = _References(resources)
        for typed in resources.by_type.values():
            self.history.remember_set(typed)
        self._snapshots[key] = resources
        if previous is not None and _same_versions(previous, resources):
            return
        log.info("snapshot %s: %s", key, _describe(resources))
        watches = list(self._watches.get(key, ()))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            watches, rest = watches, []
        else:
            watches, rest = watches[:FANOUT_BATCH], watches[FANOUT_BATCH:]
        for watch in watches:
            watch.on_change()
        if rest:
            task = asyncio.create_task(self._fan_out(key, rest))
            self._fan_outs.add(task)
            task.add_done_callback(self._fan_outs.discard)

    async def _fan_out(self, key: str, watches: list[Watch]) -> None:
        """Wake `watches` in batches, yielding between them: the loop keeps serving meanwhile.

        A woken stream reads the latest snapshot whenever it runs, so a later change
        overtaking this one loses nothing; a watch closed meanwhile is skipped.
        """
        loop = asyncio.get_running_loop()
        batch, start = FANOUT_BATCH, 0
        while start < len(watches):
            began = loop.time()
            await asyncio.sleep(0)
            # The pass just run held the previous batch's pushes: size the next one to the slice.
            took = loop.time() - began
            if took > FANOUT_SLICE:
                batch = max(_FANOUT_MIN, int(batch * FANOUT_SLICE / took))
            elif took < FANOUT_SLICE / 2:
                batch = min(_FANOUT_MAX, batch * 2)
            live = self._watches.get(key, set())
            for watch in watches[start : start + batch]:
                if watch in live:
                    watch.on_change()
            start += batch

    def snapshot(self, key: str) -> Resources | None:
        return self._snapshots.get(key)

    def clear_snapshot(self, key: str) -> None:
        self._snapshots.pop(key, None)
        self._references.pop(key, None)

    def requested_keys(self) -> frozenset[str]:
        """Keys of the proxies connected now."""
        return frozenset(k for k, n in self._requested.items() if n > 0)

    def on_key_requested(self, callback: Callable[[str], None]) -> None:
        """Call `callback(key)` when a proxy connects with a key that has no snapshot yet.

        The callback runs on the loop, synchronously; it should render and `set_snapshot`,
        or schedule a task that will.
        """
        self._key_requested.append(callback)

    def on_key_released(self, callback: Callable[[str], None]) -> None:
        """Call `callback(key)` when the last stream watching `key` closes.

        The cache has dropped the key's watches and count; the snapshot stays until its
        owner clears it (`clear_snapshot`). An owner that renders per key should forget the
        key and clear its snapshot here: if a proxy asks for the key again,
        `on_key_requested` fires again and the key is rendered afresh.
        """
        self._key_released.append(callback)

    def keys(self) -> frozenset[str]:
        """Keys that hold a snapshot now."""
        return frozenset(self._snapshots)

    def watch(self, key: str, on_change: Callable[[], None]) -> Watch:
        """Register a stream for `key`; close the returned Watch when the stream ends."""
        watch = Watch(self, key, on_change)
        self._watches.setdefault(key, set()).add(watch)
        self._requested[key] += 1
        if key not in self._snapshots:
            for callback in list(self._key_requested):
                callback(key)
        return watch

    def _drop_watch(self, watch: Watch) -> None:
        """Close one watch; the last one of a key releases everything kept for the key.

        Per-key state must not outlive the proxies that asked for it: short-lived clients
        with distinct keys would otherwise make every later change slower, for good (the
        owners of snapshots hear `on_key_released`). Content history is kept (it is
        bounded), so a proxy that comes back presenting its versions is not re-sent them.
        """
        watches = self._watches.get(watch.key)
        if watches is None or watch not in watches:
            return
        watches.discard(watch)
        self._requested[watch.key] -= 1
        if watches:
            return
        del self._watches[watch.key]
        del self._requested[watch.key]
        for callback in list(self._key_released):
            try:
                callback(watch.key)
            except Exception:
                log.exception("key-released callback %r failed for %s", callback, watch.key)


def _same_versions(a: Resources, b: Resources) -> bool:
    return all(a[t].version == b[t].version for t in a.by_type)


def _describe(resources: Resources) -> str:
    return ", ".join(f"{t.rsplit('.', 1)[-1]}={resources[t].version}({len(resources[t])})" for t in resources.by_type)
