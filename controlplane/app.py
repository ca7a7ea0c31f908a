"""The control plane's composition root: one process, one event loop, one TaskGroup.

Owns: starting the embedded etcd when no external one is given, the gRPC server
(ReleaseService + health + reflection, behind the CallerInterceptor), the xDS server for
Envoys, the background loops (routing views, convergence) and graceful shutdown on
SIGTERM/SIGINT. Everything long-lived is created here and handed down.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import grpc
from graylane.agent.stats import LOOPBACK_ONLY, AdminAllowList, EnvoyStatsScraper
from graylane.controlplane.api import auth
from graylane.controlplane.api.agent_service import DEFAULT_LEASE_TTL_SECONDS, AgentHub, AgentServicer
from graylane.controlplane.api.closing import ClosingInterceptor, run_until_signalled
from graylane.controlplane.api.dashboard import Dashboard
from graylane.controlplane.api.http import HttpServer, health_route, metrics_route
from graylane.controlplane.api.proxyauth import ProxyAuthenticator, xds_authenticator
from graylane.controlplane.api.release_service import (
    DEFAULT_MAX_STREAMS_PER_IDENTITY,
    DEFAULT_RECHECK_SECONDS,
    Authenticator,
    CallerInterceptor,
    ReleaseServicer,
    token_record,
)
from graylane.controlplane.api.tls import ServerTls, add_port
from graylane.controlplane.defaults import DEFAULT_LOOP_LAG_INTERVAL_SECONDS
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Cause
from graylane.controlplane.domain.releases import Releases
from graylane.controlplane.errors import GraylaneError, Unavailable
from graylane.controlplane.local.etcd import EtcdProcess
from graylane.controlplane.options import ServeOptions
from graylane.controlplane.progression.analyzer import DEFAULT_TICK_SECONDS, Analyzer
from graylane.controlplane.progression.metrics import (
    EnvoyAdminSource,
    MetricsCollector,
    MetricsSource,
    PrometheusQuerySource,
)
from graylane.controlplane.progression.webhooks import WebhookPolicy
from graylane.controlplane.progression.windows import Windows
from graylane.controlplane.reconcile.dataplane import DEFAULT_STALE_PROXY_SECONDS, DataPlane
from graylane.controlplane.reconcile.leader import DEFAULT_TTL_SECONDS as DEFAULT_LEADER_TTL_SECONDS
from graylane.controlplane.reconcile.leader import LeaderElection
from graylane.controlplane.reconcile.replicas import ReplicaRegistry
from graylane.controlplane.reconcile.traffic import TrafficReader, admin_addresses
from graylane.controlplane.store import EtcdStore, connect
from graylane.controlplane.telemetry import Telemetry, releases_by_phase
from graylane.v1 import agent_pb2, agent_pb2_grpc, release_service_pb2, release_service_pb2_grpc
from graylane.xds.scope import ScopedSnapshotCache
from graylane.xds.server import SERVER_OPTIONS, AdsServer
from graylane.xds.tracker import ProxyTracker
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = release_service_pb2.DESCRIPTOR.services_by_name["ReleaseService"].full_name
AGENT_SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
# Health is answered for the whole server ("") and each service by name: both need etcd.
HEALTH_NAMES = (SERVICE_NAME, AGENT_SERVICE_NAME, "")
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def serve_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Reflection under both names clients ask for: v1alpha (grpcio-reflection's) and v1
    (what newer grpcurl and Postman try first). The two protocols' messages are the same on
    the wire (v1 is v1alpha under a new package), so one servicer answers both."""
    names = (*services, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


_GRACE_SECONDS = 5.0
# etcd is probed with one linearizable read (it needs a quorum) this often; a probe that
# fails or takes longer than its timeout marks the replica NOT_SERVING until one succeeds.
_PROBE_SECONDS = 1.0
_PROBE_TIMEOUT_SECONDS = 2.0
_RESTART_SECONDS = 1.0  # first pause before a failed background loop starts again (doubling)
_MAX_RESTART_SECONDS = 30.0
WINDOW_SAMPLES = 600  # one sample a second per series: ten minutes
WINDOW_KEYS = 10_000
DEFAULT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_CONNECTION_IDLE_SECONDS = 300.0
# The store's unary calls go on the loop's grpc.aio channel while this replica serves at
# most this many streams (ADS and agents), in a worker thread beyond (see the store's
# `_Blocking`): a fan-out to a few dozen streams queues a few dozen completions.
_LOOP_CHANNEL_STREAMS = 32


class ControlPlane:
    """One control-plane replica over a store. `run()` serves until cancelled."""

    def __init__(
        self,
        store: EtcdStore,
        *,
        api_listen: str,
        xds_listen: str | None = None,
        agent_tokens: Mapping[str, str] | None = None,
        agent_lease_ttl_seconds: int = DEFAULT_LEASE_TTL_SECONDS,
        leader_ttl_seconds: int = DEFAULT_LEADER_TTL_SECONDS,
        analysis_tick_seconds: float = DEFAULT_TICK_SECONDS,
        http_listen: str | None = None,
        otlp_endpoint: str | None = None,
        embedded_etcd: EtcdProcess | None = None,
        stale_proxy_seconds: float = DEFAULT_STALE_PROXY_SECONDS,
        tune_collector: bool = True,
        auth: bool = False,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
        max_streams_per_identity: int = DEFAULT_MAX_STREAMS_PER_IDENTITY,
        max_connection_idle_seconds: float = DEFAULT_MAX_CONNECTION_IDLE_SECONDS,
        stream_recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
        webhook_policy: WebhookPolicy | None = None,
        tls: ServerTls | None = None,
        xds_auth: ProxyAuthenticator | None = None,
        admin_allow: AdminAllowList = LOOPBACK_ONLY,
        metrics_source: MetricsSource | None = None,
        loop_lag_interval: float = DEFAULT_LOOP_LAG_INTERVAL_SECONDS,
    ) -> None:
        self.store = store
        self._stream_recheck_seconds = stream_recheck_seconds
        # Who callers are: with `auth`, every API call needs a token or a certificate a
        # token record names; without it the API is open (a loopback try-out).
        self.authenticator = Authenticator(store, enabled=auth, agent_tokens=agent_tokens)
        # A loopback try-out (no auth) may call webhooks on this machine; beyond that, only
        # what the operator allowed.
        self._webhook_policy = webhook_policy or WebhookPolicy(allow_loopback=not auth)
        self._api_limits = (max_receive_message_bytes, max_streams_per_identity, max_connection_idle_seconds)
        # One certificate for every port (API and agents, xDS, HTTP); with a client CA,
        # every port requires a client certificate it signed.
        self._tls = tls
        # Who may receive xDS configuration (None: every proxy that connects, as before).
        self._xds_auth = xds_auth
        self._admin_allow = admin_allow
        self._tune_collector = tune_collector
        self._embedded_etcd = embedded_etcd
        # Why this replica cannot use etcd now (None: it can); health says NOT_SERVING meanwhile.
        self.store_problem: str | None = None
        self.releases = Releases(store)
        self._agent_tokens = dict(agent_tokens or {})
        self._api_listen = api_listen
        self._xds_listen = xds_listen
        self.api_port = 0
        self.xds_port = 0
        self.ads: AdsServer | None = None
        self.ready = asyncio.Event()
        self._closing = ClosingInterceptor()  # ends the API's response streams on stop
        self.cache = ScopedSnapshotCache()
        self.tracker = ProxyTracker()
        # One leader (etcd lease) writes convergence and judges the metrics windows it keeps;
        # every replica publishes what it counts of its own proxies and agents.
        self.election = LeaderElection(store, ttl_seconds=leader_ttl_seconds)
        # Agents' metrics are shared with the other replicas under this replica's identity.
        self.agents = AgentHub(store, lease_ttl_seconds=agent_lease_ttl_seconds, identity=self.election.identity)
        store.unary_on_loop_while(
            lambda: self.tracker.open_streams() + len(self.agents.sessions) <= _LOOP_CHANNEL_STREAMS
        )
        # The registry refreshes every second: a TTL of 3 s at least leaves two refreshes to spare.
        self.replicas = ReplicaRegistry(
            store, self.tracker, identity=self.election.identity, ttl_seconds=max(leader_ttl_seconds, 3)
        )
        self.dataplane = DataPlane(
            self.releases,
            self.cache,
            self.tracker,
            store=store,
            agents=self.agents,
            identity=self.election.identity,
            is_leader=lambda: self.election.is_leader,
            on_progress=self.replicas.set_progress,
            stale_proxy_seconds=stale_proxy_seconds,
        )
        self.election.on_change(self.dataplane.poke)
        self.windows = Windows(capacity=WINDOW_SAMPLES, max_keys=WINDOW_KEYS)
        self.analyzer = Analyzer(
            self.releases,
            self.windows,
            self.election,
            store=store,
            tick_seconds=analysis_tick_seconds,
            webhook_policy=self._webhook_policy,
            on_verdict=lambda release, outcome: self.telemetry.analysis_outcome(outcome.value, release),
        )
        # The series: this replica's own Envoys scraped every second (cluster ""), and the
        # deltas agents send for theirs.
        self.metrics = MetricsCollector(
            # Where this replica's own Envoys' series come from: their admin endpoints, or the
            # configured source (a Prometheus that scrapes them): never both, or every request
            # would count twice.
            metrics_source or EnvoyAdminSource(self._scrape_targets, admin_allow=admin_allow),
            self.windows,
        )
        self.agents.on_metrics(self.metrics.ingest_agent_report)
        self.dataplane.on_shared_metrics(
            lambda cluster, raw: self.metrics.ingest_agent_report(cluster, agent_pb2.MetricsReport.FromString(raw))
        )
        self.agents.on_guard(self._guarded)
        # Own telemetry: /metrics on the HTTP server (None: no HTTP server), traces over OTLP
        # when an endpoint is configured.
        self._http_listen = http_listen
        self.http_port = 0
        self.telemetry = Telemetry(otlp_endpoint=otlp_endpoint)
        self._loop_lag = self.telemetry.observe_loop(interval=loop_lag_interval)
        self.telemetry.observe_proxies(self.tracker)
        self.telemetry.observe_releases(self._releases_by_phase)
        self.telemetry.observe_agents(lambda: len(self.agents.sessions))
        self.telemetry.observe_store(lambda: self.store_problem is None)
        # The web dashboard on the HTTP server: it reads and acts through this replica's own
        # API, with the logged-in user's token.
        # It reaches the API over a Unix socket in a private folder (mode 0700) rather than
        # the API's own address, which may want TLS or a client certificate it does not have;
        # the socket is as private as the process, and every call still carries the user's token.
        self._local_api: str | None = None  # the socket's target, once the API serves on it
        self.dashboard = Dashboard(
            api_target=lambda: self._local_api,
            identify=lambda token: self.authenticator.identify({"authorization": f"Bearer {token}"}, {}),
            identity_of=self.authenticator.identity_of,
            delegate=self.authenticator.delegated,
            keys=store,
            auth_enabled=auth,
            on_denied=lambda code, method: self.telemetry.denied_call(code, method),
        )

    def _releases_by_phase(self) -> dict[str, int] | None:
        snap = self.dataplane.snapshot
        return releases_by_phase(r.status.phase for r in snap.releases) if snap is not None else None

    def http_server(self, listen: str) -> HttpServer:
        """The replica's one HTTP server with its routes registered (`run()` starts it)."""
        server = HttpServer(listen=listen, ssl_context=self._tls.ssl_context() if self._tls is not None else None)
        metrics_route(server, self.telemetry.metrics_text)
        health_route(server, self.ready.is_set, problem=lambda: self.store_problem)
        self.dashboard.add_routes(server)
        return server

    def _api_server(self, traffic: TrafficReader | None) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
        max_receive, max_streams, idle_seconds = self._api_limits
        server = grpc.aio.server(
            interceptors=[
                *self.telemetry.server_interceptors(),
                CallerInterceptor(
                    authenticator=self.authenticator,
                    on_denied=self.telemetry.denied_call,
                    max_streams_per_identity=max_streams,
                    recheck_seconds=self._stream_recheck_seconds,
                ),
                self._closing,
            ],
            options=[
                ("grpc.max_receive_message_length", max_receive),
                # A connection with no call open is closed after this (streams keep theirs).
                ("grpc.max_connection_idle_ms", round(idle_seconds * 1000)),
                # The server pings too, so a vanished client's streams (and the stream
                # slots they hold) end within about 40 s instead of at TCP's pace.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )
        release_service_pb2_grpc.add_ReleaseServiceServicer_to_server(
            ReleaseServicer(
                self.releases,
                store=self.store,
                traffic=traffic,
                windows=self.windows,
                is_leader=lambda: self.election.is_leader,
                authenticator=self.authenticator,
                webhook_policy=self._webhook_policy,
            ),
            server,
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(self.agents), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        serve_reflection(server, (SERVICE_NAME, AGENT_SERVICE_NAME, health.SERVICE_NAME))
        return server, health_servicer

    @contextlib.asynccontextmanager
    async def running(self, *, ready_timeout: float = 10.0) -> AsyncIterator[ControlPlane]:
        """`async with plane.running():` the replica serves inside the block (tests, demos)."""
        task = asyncio.create_task(self.run())
        try:
            async with asyncio.timeout(ready_timeout):
                await self.ready.wait()
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self._tune_collector:
                stack.enter_context(CollectorTuning(self.tracker))
            local_api = None
            if self._http_listen is not None:
                private = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graylane-api-")))
                local_api = f"unix:{private / 'api.sock'}"
                self.http_port = (await stack.enter_async_context(self.http_server(self._http_listen))).port
                stack.push_async_callback(self.dashboard.close)
            stack.push_async_callback(self.telemetry.flush)
            scraper = await stack.enter_async_context(EnvoyStatsScraper(admin_allow=self._admin_allow))
            traffic = None
            if self._xds_listen is not None:
                traffic = TrafficReader(
                    self.tracker,
                    scraper,
                    store=self.store,
                    identity=self.election.identity,
                    publish_to=self.replicas.set_traffic,
                    followed=self._followed_release,
                )
            await self._run(traffic, local_api=local_api)

    def _followed_release(self, name: str) -> model.Release | None:
        snap = self.dataplane.snapshot
        return snap.by_name.get(name) if snap is not None else None

    async def _run(self, traffic: TrafficReader | None, *, local_api: str | None = None) -> None:
        server, health_servicer = self._api_server(traffic)
        self.api_port = add_port(server, self._api_listen, self._tls)
        if self.api_port == 0:
            raise OSError(f"cannot listen on {self._api_listen}")
        if local_api is not None and server.add_insecure_port(local_api) == 0:
            raise OSError(f"cannot listen on {local_api}")
        xds_server, ads = None, None
        if self._xds_listen is not None:
            # Envoys get their own server (and port): separate flow control and limits, and
            # the API can later require credentials the proxies do not carry.
            xds_server = grpc.aio.server(options=SERVER_OPTIONS)
            self.ads = ads = AdsServer(self.cache, tracker=self.tracker, gate=self._xds_auth)
            ads.add_to_server(xds_server)
            self.xds_port = add_port(xds_server, self._xds_listen, self._tls)
            if self.xds_port == 0:
                raise OSError(f"cannot listen on {self._xds_listen}")
            await xds_server.start()
            log.info("xDS (ADS) on %s", self._xds_listen.rsplit(":", 1)[0] + f":{self.xds_port}")
        await server.start()
        for service in HEALTH_NAMES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("ReleaseService on %s", self._api_listen.rsplit(":", 1)[0] + f":{self.api_port}")
        self._local_api = local_api
        try:
            async with asyncio.TaskGroup() as tasks:
                self._start_background(tasks)
                if traffic is not None:
                    tasks.create_task(_supervised("traffic record", traffic.publish))
                tasks.create_task(self._watch_store(health_servicer))
                self.ready.set()
                await asyncio.Event().wait()  # until cancelled
        finally:
            # Streams (Watch, agents, Envoys' ADS) end now, so their clients reconnect to
            # another replica at once; unary calls in flight get the grace period.
            self._local_api = None
            await health_servicer.enter_graceful_shutdown()
            self._closing.close()
            if ads is not None:
                ads.close()
            await server.stop(_GRACE_SECONDS)
            if xds_server is not None:
                await xds_server.stop(_GRACE_SECONDS)

    async def _guarded(self, cluster: str, report: agent_pb2.GuardReport) -> None:
        """An agent routed lanes to base on its own: record it on each release, as evidence."""
        for release in await self.store.list_releases():
            if release.spec.lane not in report.lanes:
                continue
            cause = Cause(
                actor=f"graylane/agent/{cluster}",
                reason=f"the local guard of cluster {cluster} routed this lane to base: {report.reason}",
                details={"cluster": cluster, "at": report.at.ToDatetime().isoformat()},
            )
            with contextlib.suppress(GraylaneError):
                await self.releases.note(release.name, "guard", cause, expected_revision=release.revision)

    def _scrape_targets(self) -> dict[str, tuple[str, str]]:
        """Every proxy of every live replica (published in etcd), and this replica's own.

        Every replica keeps the series, so the leader's windows are warm when it takes over.
        """
        snap = self.dataplane.snapshot
        found = dict(snap.replica_proxies) if snap is not None else {}
        found.update(admin_addresses(self.tracker))
        return {node: (address, "") for node, address in found.items()}

    def _start_background(self, tasks: asyncio.TaskGroup) -> None:
        for name, run in (
            ("routing", self.dataplane.run),
            ("leader election", self.election.run),
            ("replica registry", self.replicas.run),
            ("analysis", self.analyzer.run),
            ("metrics", self.metrics.run),
            ("loop lag probe", self._loop_lag.run),
        ):
            tasks.create_task(_supervised(name, run))

    async def _store_problem(self) -> str | None:
        etcd = self._embedded_etcd
        if etcd is not None and (code := etcd.returncode) is not None:
            return f"the embedded etcd exited with status {code} (see its log beside its data)"
        try:
            await self.store.probe(timeout=_PROBE_TIMEOUT_SECONDS)
        except Unavailable as exc:
            return str(exc)
        return None

    async def _watch_store(self, health_servicer: health.aio.HealthServicer) -> None:
        """Keep `store_problem` and the gRPC health status in step with etcd's reachability."""
        while True:
            problem = await self._store_problem()
            if problem != self.store_problem:
                if problem is None:
                    log.info("etcd answers again: serving")
                else:
                    log.warning("not serving: %s", problem)
                self.store_problem = problem
                status = health_pb2.HealthCheckResponse.SERVING
                if problem is not None:
                    status = health_pb2.HealthCheckResponse.NOT_SERVING
                for service in HEALTH_NAMES:
                    await health_servicer.set(service, status)
            await asyncio.sleep(_PROBE_SECONDS)


class CollectorTuning:
    """Keeps the garbage collector's passes short while a fleet is connected.

    A replica serving 10,000 proxies holds over a million long-lived objects (streams, their
    state, rendered views); a full (generation-2) pass scans them all with the loop held
    (0.35-1.5 s each at that size), and a middle (generation-1) pass scans what the young
    passes promoted since the last one: during a change to 10,000 streams, each stream's
    new state (the old one freed, which lets the young generation grow past its threshold),
    240,000 objects and 230 ms of CPU in one measured pass. So what survives any pass is
    moved at once to the permanent generation (`gc.freeze`, a list splice), which no pass
    scans: each object is scanned by one young pass, the one after it was made, and never
    again while frozen. Young passes are also made rarer (every `_YOUNG_THRESHOLD`
    allocations instead of 700), so fewer of a change's short-lived objects are alive at one.

    The price: a frozen object that later becomes cyclic garbage (the state of a stream that
    ended, a cycle that was still in use at its young pass) is not reclaimed while frozen;
    garbage freed by reference counting (most of it) is freed as always. Two bounds, checked
    on the loop every `_CHECK_EVERY` young passes, thaw everything (`gc.unfreeze`) and run one
    full pass at once to reclaim it (a deliberate stall of that pass's length: 0.3-0.7 s at
    10,000 streams), after which freezing resumes: the streams that ended since the last
    thaw reach half of those open (and at least `_THAW_MIN_ENDED`), or the interpreter's
    allocated memory blocks (`sys.getallocatedblocks`: objects, frozen garbage included)
    per open stream (plus `_STREAM_SLACK`, so that a replica's own objects count) reach
    `_THAW_GROWTH` times what they were after the last thaw, or at the first check (at least
    `_MIN_PER_STREAM`; a connect wave grows both; garbage only the first). So frozen
    garbage stays within about the live state's size.

    Process-wide (the collector is): the first replica of a process installs it, the last
    one to stop removes it and thaws everything.
    """

    _installed = 0
    _previous_threshold: tuple[int, int, int] = gc.get_threshold()

    def __init__(self, tracker: ProxyTracker) -> None:
        self._tracker = tracker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._baseline = (tracker.membership, tracker.open_streams())
        self._per_stream = 0.0  # allocated blocks per open stream after the last thaw (0: not yet known)
        self._thawing = False  # between a thaw and the end of its full pass: nothing is frozen
        self.freezes = 0  # after full passes
        self.young_freezes = 0  # after young and middle passes
        self.thaws = 0
        self._young_passes = 0
        self._driver: asyncio.Task[None] | None = None

    def __enter__(self) -> CollectorTuning:
        self._loop = asyncio.get_running_loop()
        self._driver = self._loop.create_task(self._drive_young_passes())
        if CollectorTuning._installed == 0:
            CollectorTuning._previous_threshold = gc.get_threshold()
            gc.set_threshold(_YOUNG_THRESHOLD, *CollectorTuning._previous_threshold[1:])
        CollectorTuning._installed += 1
        gc.callbacks.append(self._on_collect)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_collect)
        if self._driver is not None:
            self._driver.cancel()
            self._driver = None
        self._loop = None  # a pass already handed to the loop does nothing now
        CollectorTuning._installed -= 1
        if CollectorTuning._installed == 0:
            gc.set_threshold(*CollectorTuning._previous_threshold)
            gc.unfreeze()

    def _on_collect(self, phase: str, info: Mapping[str, int]) -> None:
        # Runs inside the collector, on whichever thread allocated. The pass is over at
        # "stop", so its survivors can be frozen here and now (before anything else
        # allocates); reading the tracker is left to the loop.
        if phase != "stop" or self._loop is None or self._loop.is_closed():
            return
        generation = info.get("generation")
        if generation == 2:
            self._loop.call_soon_threadsafe(self.after_full_pass)
            return
        if not self._thawing:
            gc.freeze()  # also zeroes the generations' counts: no middle or full pass follows
            self.young_freezes += 1
        self._young_passes += 1
        if self._young_passes % _CHECK_EVERY == 0:
            self._loop.call_soon_threadsafe(self.check)

    async def _drive_young_passes(self) -> None:
        """While streams change, a young pass every `_YOUNG_SECONDS` at most, from the loop.

        The allocation count that starts young passes is net of objects freed, old ones
        included: while a change replaces every stream's state, the young generation grows far
        past `_YOUNG_THRESHOLD` objects before a pass starts, and that pass holds the loop for
        as long as it takes to scan them. Passes started on time keep each one short; idle
        (no stream changing), this waits on the tracker and costs nothing.
        """
        seq = self._tracker.seq
        while True:
            seq = await self._tracker.wait_for_change(seq)
            gc.collect(0)
            await asyncio.sleep(_YOUNG_SECONDS)

    def ended_since_thaw(self) -> int:
        """Streams that ended since the last thaw (opens plus ends is the membership count)."""
        membership, open_then = self._baseline
        changes = self._tracker.membership - membership
        opened_net = self._tracker.open_streams() - open_then
        return (changes - opened_net) // 2

    def _blocks_per_stream(self) -> float:
        # The interpreter's small-object blocks (most objects, garbage in frozen cycles
        # included), per open stream: O(arenas), well under a millisecond at 10,000 streams.
        # Counting the frozen objects instead (gc.get_freeze_count) walks every one of them:
        # 20-150 ms with the loop held, measured.
        return sys.getallocatedblocks() / (self._tracker.open_streams() + _STREAM_SLACK)

    def _should_thaw(self) -> bool:
        if self.ended_since_thaw() >= max(_THAW_MIN_ENDED, self._tracker.open_streams() // 2):
            return True
        return self._per_stream > 0 and self._blocks_per_stream() >= _THAW_GROWTH * self._per_stream

    def _set_per_stream(self) -> None:
        self._per_stream = max(self._blocks_per_stream(), _MIN_PER_STREAM)

    def check(self) -> None:
        """Thaw and collect everything now if a bound is reached (see the class)."""
        if self._loop is None or self._thawing:
            return
        if self._per_stream == 0:
            # No full pass runs on its own any more (freezing zeroes the counts): the first
            # check sets the growth bound's baseline.
            self._set_per_stream()
        if not self._should_thaw():
            return
        gc.unfreeze()
        self._thawing = True
        self._baseline = (self._tracker.membership, self._tracker.open_streams())
        self.thaws += 1
        gc.collect()  # its end calls `after_full_pass`, which freezes again

    def after_full_pass(self) -> None:
        if self._loop is None:
            return
        if not self._thawing and self._should_thaw():
            self.check()
            return
        gc.freeze()
        self.freezes += 1
        if self._thawing or self._per_stream == 0:
            self._thawing = False
            self._set_per_stream()


_YOUNG_THRESHOLD = 5_000
_THAW_MIN_ENDED = 1_000
_THAW_GROWTH = 2.0
_CHECK_EVERY = 10  # young passes between two checks of the thaw bounds
_YOUNG_SECONDS = 0.05
_STREAM_SLACK = 1_000
# The growth bound's least baseline: a small process is not thawed for every few blocks it keeps.
_MIN_PER_STREAM = 100.0


async def _supervised(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run one background loop for the life of the replica. The loops handle etcd's failures
    themselves; anything else they let out is logged and the loop started again after a
    pause that doubles (up to a limit), so no error takes the process down."""
    pause = _RESTART_SECONDS
    while True:
        try:
            await run()
            return
        except Exception:
            log.exception("%s failed; starting it again in %.0f s", name, pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, _MAX_RESTART_SECONDS)


async def serve(options: ServeOptions) -> None:
    """`graylane serve`: run one replica until SIGTERM or SIGINT, then stop cleanly. The
    signals are caught from the first instant: one that arrives while the embedded etcd
    starts stops that etcd too, instead of killing the process and leaving it behind."""
    await run_until_signalled(_serve(options))
    log.info("control plane stopped")


async def _serve(options: ServeOptions) -> None:
    async with contextlib.AsyncExitStack() as stack:
        etcd: EtcdProcess | None = None
        if options.embedded_etcd:
            etcd = await stack.enter_async_context(EtcdProcess(data_dir=(options.data_dir / "etcd").resolve()))
            endpoints = etcd.endpoint
        else:
            endpoints = ",".join(str(e) for e in options.etcd_endpoints)
        etcd_tls = options.etcd_tls if not options.embedded_etcd else None
        store = await connect(
            endpoints,
            prefix=options.etcd_prefix,
            credentials=etcd_tls.grpc_credentials() if etcd_tls is not None else None,
        )
        stack.push_async_callback(store.close)
        if options.tls is None and (options.auth or options.agent_tokens or options.xds_tokens):
            log.warning("API, agent and proxy tokens travel in clear text: serve TLS (--tls-cert, --tls-key)")
        if options.auth:
            await bootstrap_admin(store, options.token_file)
        prometheus = None
        if options.prometheus_url:
            prometheus = PrometheusQuerySource(
                options.prometheus_url,
                interval=options.prometheus_interval_seconds,
                selector=options.prometheus_selector,
            )
            stack.push_async_callback(prometheus.aclose)
        plane = ControlPlane(
            store,
            api_listen=str(options.listen),
            xds_listen=str(options.xds_listen),
            agent_tokens=dict(options.agent_tokens),
            agent_lease_ttl_seconds=options.agent_lease_ttl_seconds,
            leader_ttl_seconds=options.leader_ttl_seconds,
            http_listen=str(options.http_listen),
            otlp_endpoint=options.otlp_endpoint,
            embedded_etcd=etcd,
            stale_proxy_seconds=options.stale_proxy_seconds,
            auth=options.auth,
            max_receive_message_bytes=options.max_receive_message_bytes,
            max_streams_per_identity=options.max_streams_per_identity,
            max_connection_idle_seconds=options.max_connection_idle_seconds,
            webhook_policy=WebhookPolicy.parse(options.webhook_allow, allow_loopback=not options.auth),
            tls=options.tls,
            xds_auth=xds_authenticator(
                cluster=options.xds_cluster,
                tokens=options.xds_tokens,
                mutual=options.tls is not None and options.tls.mutual,
            ),
            admin_allow=AdminAllowList.parse(options.admin_allow),
            metrics_source=prometheus,
            loop_lag_interval=options.loop_lag_interval_seconds,
        )
        stack.push_async_callback(plane.telemetry.aclose)
        await plane.run()


BOOTSTRAP_TOKEN_NAME = "bootstrap-admin"


async def bootstrap_admin(store: EtcdStore, path: Path) -> bool:
    """On the first `--auth` start of an installation, make an admin token and write it to
    `path` (mode 0600, never logged). Once per installation: etcd keeps a marker, so another
    replica or a restart makes none (revoke it once you made your own admin tokens).
    Returns whether it made one."""
    made = auth.new_token()
    record = token_record(
        name=BOOTSTRAP_TOKEN_NAME, role="admin", made=made, created_by="graylane serve --auth (bootstrap)"
    )
    # Written aside first: a token etcd accepted is never lost to a failed write, and a
    # restart (etcd refuses a second one) leaves the file of the first start as it was.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pending = path.with_name(path.name + ".new")
    fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        out.write(made.token + "\n")
    try:
        created = await store.create_bootstrap_token(record)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    if not created:
        pending.unlink(missing_ok=True)
        return False
    pending.replace(path)
    log.warning("auth: first start, admin token %s written to %s (mode 0600)", record.token_id, path)
    return True
