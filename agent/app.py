"""The agent process: one per cluster, between the control plane and the cluster's Envoys.

Composition root of `graylane agent`. Owns the tasks of one agent and their order at start:
the last-known-good view is served first (so Envoys restarted during a control-plane
outage get their configuration), then the xDS server opens, then the control-plane
session, the endpoint source, the proxy reports and the local guard run side by side.

A view from the control plane that no longer serves versions from this cluster's own
endpoints, while the cluster still reports them, is held (the current view stays) for up to
one agent lease: it is what a control plane sends when it lost its agents' registrations.
The local guard judges lanes by the cluster's own Envoy statistics (`LaneErrorRate` fed by
the metrics reporter) and acts only while the control plane is away (`--guard-after`).

Must not hold release logic: the control plane decides views, the agent applies them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from graylane.agent.defaults import (
    DEFAULT_AGENT_XDS_PORT,
    DEFAULT_ANSWER_TIMEOUT_SECONDS,
    DEFAULT_GUARD_AFTER_SECONDS,
    DEFAULT_MAX_ERROR_RATE,
    DEFAULT_RECONNECT_MAX_SECONDS,
)
from graylane.agent.guard import (
    DEFAULT_MIN_REQUESTS,
    DEFAULT_WINDOW_SECONDS,
    AbortCheck,
    LaneErrorRate,
    LocalGuard,
)
from graylane.agent.health import AgentHealth
from graylane.agent.lkg import StateDir
from graylane.agent.metrics import MetricsReporter
from graylane.agent.relay import Relay
from graylane.agent.session import (
    DEFAULT_KEEPALIVE_SECONDS,
    Backoff,
    ControlPlaneSession,
)
from graylane.agent.sources import EndpointSource, FileEndpointSource
from graylane.agent.stats import AdminAllowList
from graylane.agent.wire import cluster_view, view_from_proto
from graylane.controlplane.address import HostPort
from graylane.controlplane.api.closing import run_until_signalled
from graylane.controlplane.api.http import HttpServer, metrics_route
from graylane.controlplane.api.proxyauth import xds_authenticator
from graylane.controlplane.api.tls import ClientTls, ServerTls, add_port
from graylane.controlplane.options import DEFAULT_ADMIN_ALLOW, XdsCredential
from graylane.controlplane.telemetry import agent_telemetry
from graylane.v1 import agent_pb2 as apb
from graylane.xds.scope import ScopedSnapshotCache
from graylane.xds.server import SERVER_OPTIONS, AdsServer
from graylane.xds.tracker import ProxyTracker

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
_GUARD_TICK_SECONDS = 0.5
_DEFAULT_HOLD_SECONDS = 10.0  # before a welcome said the control plane's lease TTL


def _local_versions(view: apb.RoutingView) -> set[tuple[str, str]]:
    """(service, version)s `view` serves from this cluster's own endpoints."""
    return {(ve.service, ve.version) for ve in view.endpoints if not ve.via_cluster and ve.endpoints}


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentOptions:
    cluster: str
    control_plane: str  # host:port of a control plane's API
    gateway_address: str  # host:port where other clusters reach this cluster's gateway Envoy
    state_dir: Path
    endpoints_file: Path | None = None
    xds_listen: str = f"127.0.0.1:{DEFAULT_AGENT_XDS_PORT}"
    # The gateway Envoy's listener port, when it differs from the gateway address's port
    # (a load balancer in front, say).
    gateway_listen_port: int | None = None
    token: str = ""
    guard_after_seconds: float = DEFAULT_GUARD_AFTER_SECONDS
    # The local guard's abort condition: the gray versions of a lane failing this share of
    # at least `guard_min_requests` requests over the last `guard_window_seconds`.
    guard_max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    guard_min_requests: int = DEFAULT_MIN_REQUESTS
    guard_window_seconds: float = DEFAULT_WINDOW_SECONDS
    # A control plane that answers nothing (health checks, keepalive pings) for this long
    # counts as gone, even with its connection open.
    answer_timeout_seconds: float = DEFAULT_ANSWER_TIMEOUT_SECONDS
    keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS
    backoff_base_seconds: float = 0.1
    backoff_cap_seconds: float = DEFAULT_RECONNECT_MAX_SECONDS
    http_listen: str | None = None  # /metrics and /healthz; None: no HTTP server
    otlp_endpoint: str | None = None
    # TLS of the connection to the control plane (its CA, and this agent's certificate for
    # mutual TLS); None: plain text.
    control_plane_tls: ClientTls | None = None
    # TLS of what this agent serves (its xDS port and HTTP server); with a client CA, both
    # require a client certificate it signed.
    tls: ServerTls | None = None
    # Proxies' tokens and scopes (`parse_xds_tokens`): with these or mutual TLS, only proxies
    # proving they belong to this cluster are served, each only its scope's services (see
    # controlplane.proxyauth).
    xds_tokens: tuple[XdsCredential, ...] = ()
    # Where this cluster's Envoys' self-reported admin endpoints may be fetched.
    admin_allow: tuple[str, ...] = DEFAULT_ADMIN_ALLOW


class Agent:
    def __init__(
        self,
        options: AgentOptions,
        *,
        source: EndpointSource | None = None,
        abort_check: AbortCheck | None = None,
    ) -> None:
        self.options = options
        if source is None and options.endpoints_file is not None:
            source = FileEndpointSource(options.endpoints_file)
        self.source = source
        self.state = StateDir(options.state_dir, cluster=options.cluster, control_plane=options.control_plane)
        self.cache = ScopedSnapshotCache()
        self.tracker = ProxyTracker()
        self.telemetry = agent_telemetry(self.tracker, otlp_endpoint=options.otlp_endpoint)
        self.http_port = 0
        gateway_port = options.gateway_listen_port or HostPort.parse(options.gateway_address).port
        self.relay = Relay(self.cache, self.tracker, gateway_port=gateway_port)
        self.error_rate: LaneErrorRate | None = None
        if abort_check is None:
            # The agent's own judge: its Envoys' statistics, as its metrics reporter reads them.
            self.error_rate = abort_check = LaneErrorRate(
                max_error_rate=options.guard_max_error_rate,
                min_requests=options.guard_min_requests,
                window_seconds=options.guard_window_seconds,
            )
        self.guard = LocalGuard(abort_check, after_seconds=options.guard_after_seconds)
        self.session = ControlPlaneSession(
            target=options.control_plane,
            hello=apb.AgentHello(
                cluster=options.cluster,
                gateway_address=options.gateway_address,
                agent_version=AGENT_VERSION,
                agent_id=self.state.agent_id(),
            ),
            token=options.token,
            on_view=self._on_view,
            backoff=Backoff(base=options.backoff_base_seconds, cap=options.backoff_cap_seconds),
            answer_timeout_seconds=options.answer_timeout_seconds,
            keepalive_seconds=options.keepalive_seconds,
            tls=options.control_plane_tls,
        )
        self.ready = asyncio.Event()
        self.health = AgentHealth(state=self.state, session=self.session, guard=self.guard, ready=self.ready.is_set)
        self.telemetry.registry.register(self.health)
        self._control_view: apb.ClusterView | None = None  # the control plane's, never the guard's
        self._endpoints: apb.EndpointSnapshot | None = None  # what this cluster reports now
        self._held: apb.ClusterView | None = None  # a view that dropped this cluster's own endpoints
        self._hold_until: float | None = None
        self.xds_port = 0
        self.ads: AdsServer | None = None

    def _dropped_own(self, message: apb.ClusterView) -> list[tuple[str, str]]:
        """(service, version)s served now from this cluster's own endpoints, still reported by
        it, that `message` no longer serves from them."""
        if self._endpoints is None or self._control_view is None:
            return []
        reported = {(v.service, v.version) for v in self._endpoints.versions if v.endpoints}
        return sorted(reported & _local_versions(self._control_view.view) - _local_versions(message.view))

    def _on_view(self, message: apb.ClusterView) -> None:
        # A view without endpoints this cluster still reports is what a control plane sends
        # when it lost its agents' registrations (a stall longer than their lease): serving
        # it would fail every request to those versions. Hold it (keep serving the current
        # view) for up to one lease TTL; a later view replaces it, and if the control plane
        # still means it after that, it is applied.
        dropped = self._dropped_own(message)
        now = time.monotonic()
        if dropped:
            if self._hold_until is None:
                self._hold_until = now + (self.session.lease_ttl_seconds or _DEFAULT_HOLD_SECONDS)
                log.warning(
                    "view %s lacks this cluster's own endpoints of %s, which it still reports: "
                    "serving view %s for up to %.0fs",
                    message.version,
                    ", ".join(f"{s}/{v}" for s, v in dropped),
                    self.relay.version,
                    self._hold_until - now,
                )
            if now < self._hold_until:
                self._held = message
                self.health.held_view = f"view {message.version} lacks this cluster's endpoints of {dropped}"
                return
            log.warning("applying view %s without this cluster's endpoints of %s: held long enough", message.version,
                        dropped)  # fmt: skip
        self._held = self._hold_until = None
        self.health.held_view = ""
        self._apply(message)

    def _release_held(self) -> None:
        if self._held is not None and self._hold_until is not None and time.monotonic() >= self._hold_until:
            self._on_view(self._held)

    def _apply(self, message: apb.ClusterView) -> None:
        if self.relay.apply(message):
            self._control_view = message
            self.state.keep(message)  # a failure is counted and shown in /healthz and /metrics
            log.info("serving view %s from the control plane", message.version)
            # Proxies whose configuration this view leaves unchanged (a gateway, when only a
            # weight moved) send no new ACK; report them against the new view now.
            self.session.set_report(self.relay.report())

    async def run(self) -> None:
        # The cluster's proxies are scraped every second; deltas go up while connected.
        observe = self.error_rate.observe if self.error_rate is not None else None
        metrics = MetricsReporter(
            self.tracker,
            send=self.session.send_metrics,
            observe=observe,
            admin_allow=AdminAllowList.parse(self.options.admin_allow),
        )
        last_good = self.state.load_view()
        if last_good is not None and self.relay.apply(last_good):
            self._control_view = last_good
            self.health.lkg_served = last_good.version
            log.info("serving the last-known-good view %s until the control plane answers", last_good.version)
        elif last_good is None and not self.state.load_note:
            log.info("no last-known-good view at %s: Envoys get a view once the control plane answers",
                     self.state.view_file)  # fmt: skip
        http = None
        if self.options.http_listen is not None:
            tls = self.options.tls
            http = HttpServer(listen=self.options.http_listen, ssl_context=tls.ssl_context() if tls else None)
            metrics_route(http, self.telemetry.metrics_text)
            self.health.route(http)
            await http.start()
            self.http_port = http.port
        server = grpc.aio.server(options=SERVER_OPTIONS)
        options = self.options
        self.ads = ads = AdsServer(
            self.cache,
            tracker=self.tracker,
            gate=xds_authenticator(
                cluster=options.cluster,
                tokens=options.xds_tokens,
                mutual=options.tls is not None and options.tls.mutual,
            ),
        )
        ads.add_to_server(server)
        self.xds_port = add_port(server, options.xds_listen, options.tls)
        if self.xds_port == 0:
            raise OSError(f"cannot listen on {self.options.xds_listen}")
        await server.start()
        log.info("agent of cluster %s: xDS on port %d", self.options.cluster, self.xds_port)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.session.run())
                tasks.create_task(self._follow_endpoints())
                tasks.create_task(self._follow_proxies())
                tasks.create_task(self._guard_loop())
                tasks.create_task(metrics.run())
                self.ready.set()
        finally:
            ads.close()  # the Envoys keep their configuration and reconnect on their own
            await server.stop(1.0)
            if http is not None:
                await http.stop()
            await self.telemetry.flush()

    async def _follow_endpoints(self) -> None:
        if self.source is None:
            return
        async for snapshot in self.source.watch():
            self._endpoints = snapshot
            self.session.set_endpoints(snapshot)

    async def _follow_proxies(self) -> None:
        seen = -1
        while True:
            seen = await self.tracker.wait_for_change(seen)
            self.session.set_report(self.relay.report())

    async def _guard_loop(self) -> None:
        while True:
            await asyncio.sleep(_GUARD_TICK_SECONDS)
            self._release_held()
            since = self.session.disconnected_since
            if since is None and self.guard.pending:
                self.session.add_guard_reports(self.guard.reconnected())
                continue
            control = self._control_view
            if control is None:
                continue
            override = self.guard.tick(
                view_from_proto(control.view),
                disconnected_for=None if since is None else time.monotonic() - since,
                now=time.time(),
            )
            if override is not None:
                log.warning(
                    "local guard: the control plane is away; routing lanes %s to base (%s)",
                    sorted(self.guard.aborted),
                    self.guard.pending[-1].reason if self.guard.pending else "abort condition met",
                )
                self.relay.apply(cluster_view(override))


async def run_agent(options: AgentOptions) -> None:
    """`graylane agent`: run until SIGTERM or SIGINT."""
    agent = Agent(options)
    try:
        await run_until_signalled(agent.run())
    finally:
        await agent.telemetry.aclose()
