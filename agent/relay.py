"""The relay: the cluster's view, rendered for each local Envoy and served over ADS.

Owns: the view in force (from the control plane, from disk after a restart, or a
guard's override), rendering it with `graylane.xds.render` for every proxy group (keyed,
like the control plane, by the listener port in the node metadata; the gateway's port
renders with `render_gateway`), and the mapping from the route versions proxies ACK back
to the view versions they came from, for the control plane's convergence count. Proxies
scoped to some services are served by the cache (`graylane.xds.scope.ScopedSnapshotCache`
derives their configuration from their group's render); the relay maps their versions too
and reports their scope.

Concurrency: one asyncio loop. Holds no release logic: it applies views.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

from graylane.agent.wire import BadView, view_from_proto
from graylane.v1 import agent_pb2 as apb
from graylane.xds import view as xv
from graylane.xds.cache import DEFAULT_KEY, PROXYLESS_KEY, SnapshotCache
from graylane.xds.render import render_gateway
from graylane.xds.renderer import Renderer
from graylane.xds.resources import ROUTE, Resources
from graylane.xds.scope import SCOPE_SEPARATOR, ScopedSnapshotCache, parse_scoped_key
from graylane.xds.tracker import ProxyTracker

log = logging.getLogger(__name__)

DEFAULT_LISTEN_PORT = 10000
_HISTORY = 1024  # (type, version) pairs: a few hundred views of every proxy group


class Relay:
    def __init__(
        self,
        cache: SnapshotCache,
        tracker: ProxyTracker,
        *,
        gateway_port: int | None = None,
        listen_address: str = "127.0.0.1",
        default_listen_port: int = DEFAULT_LISTEN_PORT,
    ) -> None:
        self.cache = cache
        self.tracker = tracker
        self.gateway_port = gateway_port
        self._address = listen_address
        self._default_port = default_listen_port
        self._keys: set[str] = set()
        self._renderer = Renderer(listen_address=listen_address)  # incremental, shared by every port
        self.version = ""  # the ClusterView version in force
        self.view: xv.RoutingView | None = None
        # (type URL, resource version) -> the view version it was rendered from
        self._rendered: OrderedDict[tuple[str, str], str] = OrderedDict()
        # The same, for proxyless clients' sets, with each set's content versions: such a
        # client holds a part of a set, whose version no render produced (`_view_of`).
        self._parts: OrderedDict[tuple[str, str], tuple[str, Mapping[str, str]]] = OrderedDict()
        # (scope, type URL, version) -> view version, for scoped proxies' sets: kept apart, as
        # an unchanged scoped set maps to the newest view (within its scope, what it serves)
        self._scoped: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._scoped_parts: dict[tuple[str, str, str], Mapping[str, str]] = {}
        cache.on_key_requested(self._render_key)
        cache.on_key_released(self._release_key)
        if isinstance(cache, ScopedSnapshotCache):
            cache.on_derived(self._remember_derived)

    def apply(self, message: apb.ClusterView) -> bool:
        """Serve `message` to every local proxy; False (and nothing changes) for a bad view."""
        try:
            view = view_from_proto(message.view)
        except BadView:
            log.exception("refusing view %s", message.version)
            return False
        if message.version == self.version:
            return True
        self.version, self.view = message.version, view
        for key in sorted(self._keys | self.cache.requested_keys()):
            self._render_key(key)
        return True

    def _release_key(self, key: str) -> None:
        """The last proxy of `key` left: stop rendering it (rendered again if one returns)."""
        self._keys.discard(key)
        self.cache.clear_snapshot(key)
        self._renderer.forget(self._port_of(key), proxyless=key == PROXYLESS_KEY)

    def _port_of(self, key: str) -> int:
        return self._default_port if key == DEFAULT_KEY or not key.isdigit() else int(key)

    def _render_key(self, key: str) -> None:
        if self.view is None:
            return
        self._keys.add(key)
        port = self._port_of(key)
        try:
            if self.gateway_port is not None and port == self.gateway_port:
                resources = render_gateway(self.view, listen_port=port, listen_address=self._address)
            else:
                resources = self._renderer.render(self.view, listen_port=port, proxyless=key == PROXYLESS_KEY)
        except ValueError:
            log.exception("cannot render view %s for %s; proxies keep their configuration", self.version, key)
            return
        for type_url, typed in resources.by_type.items():
            self._rendered[(type_url, typed.version)] = self.version
            self._rendered.move_to_end((type_url, typed.version))
            if key == PROXYLESS_KEY:
                self._parts[(type_url, typed.version)] = (self.version, typed.shared_versions())
                self._parts.move_to_end((type_url, typed.version))
        while len(self._rendered) > _HISTORY:
            self._rendered.popitem(last=False)
        while len(self._parts) > _HISTORY:
            self._parts.popitem(last=False)
        self.cache.set_snapshot(key, resources)

    def _remember_derived(self, key: str, full: Resources, scoped: Resources) -> None:
        view_version = self._rendered.get((ROUTE, full[ROUTE].version), "")
        if not view_version:
            return
        base, _, mark = key.partition(SCOPE_SEPARATOR)
        for type_url, typed in scoped.by_type.items():
            entry = (mark, type_url, typed.version)
            self._scoped[entry] = view_version
            self._scoped.move_to_end(entry)
            if base == PROXYLESS_KEY:  # such clients hold parts of a set (`_view_of`)
                self._scoped_parts[entry] = typed.shared_versions()
        while len(self._scoped) > _HISTORY:
            dropped, _ = self._scoped.popitem(last=False)
            self._scoped_parts.pop(dropped, None)

    def _view_of(self, type_url: str, version: str, part: Mapping[str, str], key: str = "") -> str:
        """The view version a proxy's `type_url` `version` (holding `part`) came from: that
        of the set, or the newest whose set holds the part ("" unknown); for a proxy of a
        scoped `key`, the view of that scope's set."""
        _, scope = parse_scoped_key(key)
        if scope is not None:
            mark = key.partition(SCOPE_SEPARATOR)[2]
            found = self._scoped.get((mark, type_url, version), "")
            if found or not part:
                return found
            for entry, view_version in reversed(self._scoped.items()):
                versions = self._scoped_parts.get(entry)
                if entry[:2] == (mark, type_url) and versions is not None:
                    if all(versions.get(n) == v for n, v in part.items()):
                        return view_version
            return ""
        found = self._rendered.get((type_url, version), "")
        if found or not part:
            return found
        for (t, _), (view_version, versions) in reversed(self._parts.items()):
            if t == type_url and all(versions.get(n) == v for n, v in part.items()):
                return view_version
        return ""

    def report(self) -> apb.ProxyReport:
        """Every connected local proxy with the view version its routes came from, and the
        view version its last NACK rejected (the control plane pauses what that view added)."""
        states = []
        duplicates = self.tracker.duplicate_node_ids()
        for stream, proxy in sorted(self.tracker.proxies().items()):
            # Two streams with one node id are two proxies: report each under its stream id.
            node_id = stream if proxy.node_id in duplicates else proxy.node_id
            ack = proxy.acked.get(ROUTE)
            state = apb.ProxyState(
                node_id=node_id,
                view_version=self._view_of(ROUTE, ack.version, ack.resources, proxy.key) if ack else "",
                scope=sorted(parse_scoped_key(proxy.key)[1] or ()),
            )
            if proxy.last_nack is not None:
                state.last_nack.node = node_id
                state.last_nack.type_url = proxy.last_nack.type_url
                state.last_nack.version = proxy.last_nack.version
                state.last_nack.message = proxy.last_nack.message
                state.last_nack.at.FromNanoseconds(int(proxy.last_nack.at * 1e9))
                nack = proxy.last_nack
                state.nacked_view_version = self._view_of(nack.type_url, nack.version, nack.resources, proxy.key)
            states.append(state)
        return apb.ProxyReport(proxies=states)
