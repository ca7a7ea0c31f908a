"""The relay: the cluster's view, served to the local Envoys, and their state reported.

Owns: the view in force (from the control plane, from disk after a restart, or a guard's
override), handed to `graylane.xds.local.LocalServing` (which renders it per proxy group,
the gateway's port with `render_gateway`, and maps the versions proxies ACK back to the
view versions they came from), and the `ProxyReport` for the control plane's convergence
count: each local proxy with the view version its routes came from, its scope, and the
view its last NACK rejected. What a NACK does is the control plane's policy, not the relay's.

Concurrency: one asyncio loop. Holds no release logic: it applies views.
"""

from __future__ import annotations

import logging

from graylane.agent.wire import BadView, view_from_proto
from graylane.v1 import agent_pb2 as apb
from graylane.xds import view as xv
from graylane.xds.cache import SnapshotCache
from graylane.xds.local import LocalServing
from graylane.xds.resources import ROUTE
from graylane.xds.scope import parse_scoped_key
from graylane.xds.tracker import ProxyTracker

log = logging.getLogger(__name__)

_HISTORY = 1024  # (type, version) pairs: a few hundred views of every proxy group


class Relay:
    def __init__(
        self,
        cache: SnapshotCache,
        tracker: ProxyTracker,
        *,
        gateway_port: int | None = None,
        listen_address: str = "127.0.0.1",
        default_listen_port: int = xv.DEFAULT_LISTEN_PORT,
    ) -> None:
        self.cache = cache
        self.tracker = tracker
        self.gateway_port = gateway_port
        # Tagged by the ClusterView version: what the control plane counts proxies against.
        self.serving: LocalServing[str] = LocalServing(
            cache,
            listen_address=listen_address,
            default_listen_port=default_listen_port,
            gateway_port=gateway_port,
            history_size=_HISTORY,
        )

    @property
    def version(self) -> str:
        """The ClusterView version in force ("" before the first)."""
        return self.serving.tag or ""

    @property
    def view(self) -> xv.RoutingView | None:
        return self.serving.view

    def apply(self, message: apb.ClusterView) -> bool:
        """Serve `message` to every local proxy; False (and nothing changes) for a bad view."""
        try:
            view = view_from_proto(message.view)
        except BadView:
            log.exception("refusing view %s", message.version)
            return False
        if message.version == self.version:
            return True
        self.serving.set_view(view, message.version)
        return True

    def report(self) -> apb.ProxyReport:
        """Every connected local proxy with the view version its routes came from, and the
        view version its last NACK rejected (the control plane pauses what that view added)."""
        states = []
        duplicates = self.tracker.duplicate_node_ids()
        for stream, proxy in sorted(self.tracker.proxies().items()):
            # Two streams with one node id are two proxies: report each under its stream id.
            node_id = stream if proxy.node_id in duplicates else proxy.node_id
            scope = parse_scoped_key(proxy.key)[1]
            ack = proxy.acked.get(ROUTE)
            carried = self.serving.view_of(ROUTE, ack.version, ack.resources, scope=scope) if ack else None
            state = apb.ProxyState(
                node_id=node_id,
                view_version=carried or "",
                scope=sorted(scope or ()),
            )
            rejection = self.serving.rejection(proxy)
            if proxy.last_nack is not None and rejection is not None:
                state.last_nack.node = node_id
                state.last_nack.type_url = proxy.last_nack.type_url
                state.last_nack.version = proxy.last_nack.version
                state.last_nack.message = proxy.last_nack.message
                state.last_nack.at.FromNanoseconds(int(proxy.last_nack.at * 1e9))
                state.nacked_view_version = rejection.rejected or ""
            states.append(state)
        return apb.ProxyReport(proxies=states)
