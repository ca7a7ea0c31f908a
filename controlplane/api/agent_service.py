"""AgentService: the control plane's side of every cluster agent's stream.

Owns, per connected agent on this replica: its registration in etcd (cluster record and
endpoints under a lease this replica keeps alive while the agent sends heartbeats), the
views sent to it (one RoutingView per cluster, versioned by content, sent only when it
changes), and the proxies it reports (which view each ACKed), so convergence counts the
proxies of every cluster. A dead agent simply stops its heartbeats: its lease expires and
its endpoints leave every other cluster's view; a restarted agent (same `agent_id`) takes
its registration back.

The caller's credential is checked before the stream starts, by the API's one
authenticating interceptor (`controlplane.api.CallerInterceptor`); here the hello must
name the cluster that credential belongs to.

A replica that starts while agents reconnect (its own restart) sends no view until every
cluster ever registered (`knownclusters/` in etcd) has reported its endpoints again, or one
lease TTL has passed: a view built earlier would lack the clusters not back yet, and where a
version runs only there (a base version, say) its proxies would lose their endpoints. Agents
serve their last-known-good view meanwhile, so holding views back costs nothing.

The same holds after a stall of this replica (SIGSTOP, a blocked loop) or any moment a
connected agent's lease lapses: etcd expired the registrations meanwhile, and a view built
before the agents register again would lack their endpoints. So views are held again until
every cluster registered before the stall (and every connected one whose registration
lapsed) is back in the store with its endpoints, or `settle_seconds` have passed.

Concurrency: one asyncio loop; `AgentHub.publish` is called by the DataPlane on every new
store snapshot, sessions read their own queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from graylane.agent.wire import cluster_view
from graylane.controlplane.api.release_service import authenticated_cluster, status_for
from graylane.controlplane.domain import model
from graylane.controlplane.errors import GraylaneError, InvalidArgument, LeaseLost, Unavailable
from graylane.controlplane.reconcile import views
from graylane.controlplane.store import AgentStore, Snapshot
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import agent_pb2_grpc
from graylane.v1 import release_pb2 as pb
from graylane.xds import view as xv

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_SECONDS = 10
DEFAULT_HEARTBEAT_SECONDS = 1.0
_VIEW_HISTORY = 64


@dataclass
class AgentSession:
    """One connected agent, as this replica sees it."""

    info: model.ClusterInfo
    lease: int
    outbox: asyncio.Queue[apb.ControlMessage] = field(default_factory=asyncio.Queue)
    sent_version: str = ""
    sent_view: xv.RoutingView | None = None  # the view last given to send_view (same object: unchanged)
    views: OrderedDict[str, xv.RoutingView] = field(default_factory=OrderedDict)  # version -> view
    proxies: dict[str, str] = field(default_factory=dict)  # node id -> ACKed view version
    nacks: dict[str, apb.ProxyState] = field(default_factory=dict)  # node id -> its state, with a NACK
    scopes: dict[str, frozenset[str]] = field(default_factory=dict)  # node id -> its scope (scoped proxies only)
    endpoints: tuple[model.ClusterEndpoints, ...] = ()  # the last set reported
    reported_revision: int = 0  # the etcd revision holding that set (0: none yet on this stream)

    def send_view(self, view: xv.RoutingView) -> None:
        if view is self.sent_view:
            return  # built from the previous one with nothing changed (views.build_view_from)
        self.sent_view = view
        message = cluster_view(view)
        if message.version == self.sent_version:
            return
        self.sent_version = message.version
        self.views[message.version] = view
        self.views.move_to_end(message.version)
        while len(self.views) > _VIEW_HISTORY:
            self.views.popitem(last=False)
        self.outbox.put_nowait(apb.ControlMessage(view=message))

    def carried(self) -> list[xv.RoutingView | None]:
        return [self.views.get(version) for version in self.proxies.values()]


@dataclass(frozen=True, slots=True)
class AgentNack:
    """A proxy of an agent's cluster rejected configuration rendered from `rejected`."""

    cluster: str
    node_id: str
    nack: pb.Nack
    rejected: xv.RoutingView | None  # None: a view this replica no longer (or never) sent
    accepted: xv.RoutingView | None
    scope: frozenset[str] | None = None  # a scoped proxy's services: only their lanes are blamed


async def _no_guard(cluster: str, report: apb.GuardReport) -> None:
    return None


class AgentHub:
    """The agents connected to this replica, and what they report."""

    def __init__(
        self,
        store: AgentStore,
        *,
        lease_ttl_seconds: int = DEFAULT_LEASE_TTL_SECONDS,
        heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
        settle_seconds: float | None = None,
        identity: str = "",
    ) -> None:
        self.store = store
        # This replica, as its shared agent metrics name it ("": not shared, one replica).
        self.identity = identity
        self._sharing: set[asyncio.Task[None]] = set()
        self.share_failures = 0
        self.lease_ttl_seconds = lease_ttl_seconds
        # Three heartbeats per lease TTL at least, so one late heartbeat never expires a lease.
        self.heartbeat_seconds = min(heartbeat_seconds, lease_ttl_seconds / 3)
        # How long a starting replica may hold views back for clusters that do not come back.
        self.settle_seconds = float(lease_ttl_seconds) if settle_seconds is None else settle_seconds
        self.sessions: dict[str, AgentSession] = {}
        self._snap: Snapshot | None = None
        self._on_report: Callable[[], None] = lambda: None
        self._on_metrics: Callable[[str, apb.MetricsReport], object] = lambda cluster, report: None
        self._on_guard: Callable[[str, apb.GuardReport], Awaitable[None]] = _no_guard
        self._known: frozenset[str] | None = None  # clusters ever registered, read at the first connect
        self.settled = False
        self._settle_timer: asyncio.TimerHandle | None = None
        # After a stall or a lapsed lease: cluster -> whether it must come back with endpoints.
        self._awaited: dict[str, bool] = {}
        self._await_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_tick_at = 0.0
        self._given_up: set[str] = set()  # awaited in vain: not held for again until back
        # Per connected cluster, its last view build: the next is built from it and the
        # snapshot's changes (a full build per cluster on every change cost ~10 ms each at
        # 1,000 services), and is the very same view object when nothing of it changed.
        self._built: dict[str, views.BuiltView] = {}

    def on_report(self, callback: Callable[[], None]) -> None:
        """`callback` runs whenever an agent reports proxies (the DataPlane reconciles)."""
        self._on_report = callback

    def on_metrics(self, callback: Callable[[str, apb.MetricsReport], object]) -> None:
        """`callback(cluster, report)` runs on every agent's metrics (the MetricsCollector files them)."""
        self._on_metrics = callback

    def metrics_reported(self, session: AgentSession, report: apb.MetricsReport) -> None:
        self._on_metrics(session.info.name, report)
        if self.identity:
            # Shared through etcd with the other replicas (they file it on their watch), so
            # the leader judges every cluster's traffic whichever replica its agent reaches,
            # and a new leader has the history. Best effort: a report that cannot be shared
            # is missing on the others only.
            task = asyncio.create_task(self._share_metrics(session, report.SerializeToString()))
            self._sharing.add(task)
            task.add_done_callback(self._sharing.discard)

    async def _share_metrics(self, session: AgentSession, report: bytes) -> None:
        try:
            await self.store.put_agent_metrics(session.info.name, self.identity, report, session.lease)
        except Exception as exc:  # never the agent's stream: its metrics are filed here anyway
            self.share_failures += 1
            log.log(
                logging.WARNING if self.share_failures == 1 else logging.DEBUG,
                "cannot share cluster %s's metrics with the other replicas: %s (%d in a row)",
                session.info.name,
                exc,
                self.share_failures,
            )
        else:
            if self.share_failures:
                log.info("agents' metrics are shared again after %d failed reports", self.share_failures)
            self.share_failures = 0  # the next outage warns again

    def on_guard(self, callback: Callable[[str, apb.GuardReport], Awaitable[None]]) -> None:
        """`await callback(cluster, report)` for every local-guard action an agent reports."""
        self._on_guard = callback

    async def guard_reported(self, session: AgentSession, report: apb.GuardReport) -> None:
        await self._on_guard(session.info.name, report)

    # Settling. A replica that starts while agents are still reconnecting (after its own
    # restart, say, when their leases may have expired) would build each cluster a view
    # without the clusters not back yet: their versions would vanish from it, and a
    # version reached through them (a base running only there) would lose its endpoints.
    # So no view leaves this replica until every cluster known to etcd has reported its
    # endpoints again on this replica, or `settle_seconds` have passed; agents serve their
    # last-known-good view meanwhile. Once settled, views flow as the store changes.

    async def load_known(self) -> None:
        """Read the clusters to wait for (once, before the first registration) and arm the timeout."""
        if self._known is not None:
            return
        known = await self.store.known_clusters()
        if self._known is not None:
            return
        self._known = known
        if known:
            log.info(
                "waiting up to %gs for the agents of %s before sending views",
                self.settle_seconds,
                ", ".join(sorted(known)),
            )
        loop = asyncio.get_running_loop()
        self._settle_timer = loop.call_later(self.settle_seconds, self._settle_timeout)
        self._stall_tick_at = loop.time()
        self._stall_timer = loop.call_later(self._stall_tick_seconds, self._stall_tick)

    def _settle_timeout(self) -> None:
        if not self.settled:
            back = {name for name, s in self.sessions.items() if s.reported_revision}
            missing = sorted((self._known or frozenset()) - back)
            log.warning("sending views without the clusters that did not come back: %s", ", ".join(missing))
            self._settle()

    def _settle(self) -> None:
        self.settled = True
        if self._settle_timer is not None:
            self._settle_timer.cancel()
        if self._snap is not None:
            self.publish(self._snap)

    # Stalls and lapses (see the module docstring). A timer ticks every heartbeat; one that
    # fires much later than due means this replica's loop did not run meanwhile.

    @property
    def _stall_tick_seconds(self) -> float:
        return self.heartbeat_seconds

    def _stall_tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        stalled = now - self._stall_tick_at
        self._stall_tick_at = now
        self._stall_timer = loop.call_later(self._stall_tick_seconds, self._stall_tick)
        if stalled < self._stall_tick_seconds + max(1.0, self.heartbeat_seconds) or self._snap is None:
            return
        with_endpoints = {e.cluster for ce in self._snap.cluster_endpoints for e in ce.endpoints}
        before = {c.name: c.name in with_endpoints for c in self._snap.clusters}
        log.warning(
            "this replica did not run for %.1fs: agents' leases may have expired; holding views until %s are back",
            stalled,
            ", ".join(sorted(before)) or "no cluster",
        )
        self._await_clusters(before)

    def _await_clusters(self, clusters: dict[str, bool]) -> None:
        fresh = {name: need for name, need in clusters.items() if name not in self._awaited}
        if not fresh:
            return
        self._awaited.update(fresh)
        if self._await_timer is None:
            self._await_timer = asyncio.get_running_loop().call_later(self.settle_seconds, self._await_timeout)

    def _await_timeout(self) -> None:
        self._await_timer = None
        if self._awaited:
            log.warning(
                "sending views without the clusters that did not register again: %s", ", ".join(sorted(self._awaited))
            )
            self._given_up |= self._awaited.keys()
            self._awaited.clear()
            if self._snap is not None:
                self.publish(self._snap)

    def _back(self, snap: Snapshot) -> bool:
        """Whether every awaited cluster is registered in `snap` (with endpoints where it had them)."""
        registered = {c.name for c in snap.clusters}
        with_endpoints = {e.cluster for ce in snap.cluster_endpoints for e in ce.endpoints}
        # A connected agent whose registration lapsed under it: it registers again on its
        # next heartbeat, so wait for it rather than send a view without its endpoints.
        self._given_up -= registered & with_endpoints  # back after all: may be held for again
        lapsed = {
            name: bool(session.endpoints)
            for name, session in self.sessions.items()
            if session.reported_revision
            and name not in self._given_up
            and (name not in registered or (session.endpoints and name not in with_endpoints))
        }
        if lapsed:
            if lapsed.keys() - self._awaited.keys():
                log.warning("registrations of connected clusters lapsed: holding views (%s)", ", ".join(sorted(lapsed)))
            self._await_clusters(lapsed)
        if not self._awaited:
            return True
        missing = [
            name
            for name, need in self._awaited.items()
            if name not in registered or (need and name not in with_endpoints)
        ]
        if missing:
            return False
        log.info("clusters %s registered again: sending views", ", ".join(sorted(self._awaited)))
        self._awaited.clear()
        if self._await_timer is not None:
            self._await_timer.cancel()
            self._await_timer = None
        return True

    def _may_send(self, snap: Snapshot) -> bool:
        if self.settled:
            return self._back(snap)
        if self._known is None:
            return False
        back = {name for name, s in self.sessions.items() if 0 < s.reported_revision <= snap.revision}
        if self._known <= back:
            if self._known:
                log.info("the agents of %s are back: sending views", ", ".join(sorted(self._known)))
            self.settled = True
            if self._settle_timer is not None:
                self._settle_timer.cancel()
        return self.settled

    def publish(self, snap: Snapshot) -> None:
        """A new store snapshot: send each connected cluster its view if it changed."""
        self._snap = snap
        if not self._may_send(snap):
            return
        for session in self.sessions.values():
            session.send_view(self._view_for(snap, session.info.name))

    def _view_for(self, snap: Snapshot, cluster: str) -> xv.RoutingView:
        """`views.build_view(snap, cluster=cluster)`, built from the cluster's last build
        (each release compared by identity: a store follower keeps unchanged values). Staged
        lanes included: the agent serves their clusters too, so a start there also changes
        routes alone."""
        built = self._built[cluster] = views.build_view_from(self._built.get(cluster), snap, cluster=cluster)
        return built.view

    def carried(self) -> list[xv.RoutingView | None]:
        """Per proxy reported by any agent, the view its routes were rendered from."""
        return [v for session in self.sessions.values() for v in session.carried()]

    def attach(self, session: AgentSession) -> None:
        self.sessions[session.info.name] = session
        if self._snap is not None and self._may_send(self._snap):
            session.send_view(self._view_for(self._snap, session.info.name))

    def endpoints_stored(self, session: AgentSession, revision: int) -> None:
        """`session`'s endpoints are in etcd at `revision`: settling may be over."""
        session.reported_revision = revision
        if not self.settled and self._snap is not None:
            self.publish(self._snap)

    def detach(self, session: AgentSession) -> None:
        if self.sessions.get(session.info.name) is session:
            del self.sessions[session.info.name]
            self._built.pop(session.info.name, None)
            self._on_report()

    def reported(self, session: AgentSession, report: apb.ProxyReport) -> None:
        session.proxies = {p.node_id: p.view_version for p in report.proxies}
        session.nacks = {p.node_id: p for p in report.proxies if p.HasField("last_nack")}
        session.scopes = {p.node_id: frozenset(p.scope) for p in report.proxies if p.scope}
        self._on_report()

    def nacks(self) -> list[AgentNack]:
        """The NACKs agents report, with the views rejected and last accepted where known."""
        found = []
        for session in self.sessions.values():
            for node_id, state in session.nacks.items():
                found.append(
                    AgentNack(
                        cluster=session.info.name,
                        node_id=node_id,
                        nack=state.last_nack,
                        rejected=session.views.get(state.nacked_view_version),
                        accepted=session.views.get(state.view_version),
                        scope=session.scopes.get(node_id),
                    )
                )
        return found


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, hub: AgentHub) -> None:
        self._hub = hub

    async def Connect(
        self, requests: AsyncIterator[apb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[apb.ControlMessage]:
        try:
            first = await anext(aiter(requests))
        except StopAsyncIteration:
            return
        # The credential is checked against the hello before anything is written: a caller
        # must not claim (even briefly) a cluster its credential is not for.
        claimed = authenticated_cluster()
        if first.WhichOneof("kind") == "hello" and claimed is not None and claimed != first.hello.cluster:
            log.warning("refused an agent: credential of cluster %r, hello for %r", claimed, first.hello.cluster)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"hello.cluster: the credential is for cluster {claimed!r}, not {first.hello.cluster!r}",
            )
            return
        try:
            session = await self._register(first)
        except GraylaneError as exc:
            log.warning("refused an agent (cluster %r): %s", first.hello.cluster, exc)
            await context.abort(status_for(exc), str(exc))
            return
        log.info(
            "agent of cluster %s connected (gateway %s:%d)",
            session.info.name,
            session.info.gateway_host,
            session.info.gateway_port,
        )
        yield apb.ControlMessage(
            welcome=apb.Welcome(
                cluster=session.info.name,
                heartbeat_interval_ms=int(self._hub.heartbeat_seconds * 1000),
                lease_ttl_seconds=self._hub.lease_ttl_seconds,
            )
        )
        self._hub.attach(session)
        reader = asyncio.create_task(self._read(session, requests))
        outgoing: asyncio.Task[apb.ControlMessage] | None = None
        try:
            while True:
                outgoing = asyncio.create_task(session.outbox.get())
                done, _ = await asyncio.wait({outgoing, reader}, return_when=asyncio.FIRST_COMPLETED)
                if outgoing in done:
                    yield outgoing.result()
                    continue
                outgoing.cancel()
                error = reader.exception()
                if isinstance(error, GraylaneError):
                    log.warning("ending the stream of cluster %s: %s", session.info.name, error)
                    await context.abort(status_for(error), str(error))
                elif error is not None and not isinstance(error, (grpc.aio.AioRpcError, asyncio.CancelledError)):
                    log.error("stream of cluster %s failed", session.info.name, exc_info=error)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the control plane's log")
                return
        finally:
            if outgoing is not None:
                outgoing.cancel()  # a stream cancelled while waiting (the agent gave up on it)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._hub.detach(session)
            log.info("agent of cluster %s disconnected", session.info.name)

    async def _register(self, first: apb.AgentMessage) -> AgentSession:
        if first.WhichOneof("kind") != "hello":
            raise InvalidArgument("hello", "the first message of an agent stream must be its hello")
        info = model.hello_from_proto(first.hello)
        await self._hub.load_known()
        store = self._hub.store
        lease = await store.grant_lease(self._hub.lease_ttl_seconds)
        try:
            await store.register_cluster(info, lease)
        except BaseException:
            await store.revoke_lease(lease)
            raise
        return AgentSession(info=info, lease=lease)

    async def _renew(self, session: AgentSession) -> None:
        """The session's lease expired: claim the cluster again on a new lease, with its endpoints."""
        store = self._hub.store
        log.warning("the lease of cluster %s expired; registering it again", session.info.name)
        session.lease = await store.grant_lease(self._hub.lease_ttl_seconds)
        await store.register_cluster(session.info, session.lease)
        revision = await store.put_cluster_endpoints(session.info.name, session.endpoints, session.lease)
        self._hub.endpoints_stored(session, revision)

    async def _read(self, session: AgentSession, requests: AsyncIterator[apb.AgentMessage]) -> None:
        store = self._hub.store
        async for message in requests:
            kind = message.WhichOneof("kind")
            if kind == "endpoints":
                session.endpoints = model.cluster_endpoints_from_proto(session.info.name, message.endpoints)
                try:
                    revision = await store.put_cluster_endpoints(session.info.name, session.endpoints, session.lease)
                except LeaseLost:
                    await self._renew(session)  # expired during a stall: register again
                else:
                    self._hub.endpoints_stored(session, revision)
            elif kind == "proxies":
                self._hub.reported(session, message.proxies)
            elif kind == "metrics":
                self._hub.metrics_reported(session, message.metrics)
            elif kind == "heartbeat":
                try:
                    if await store.keep_alive(session.lease) == 0:
                        await self._renew(session)  # expired (a long pause)
                except Unavailable as exc:
                    log.warning("cannot refresh the lease of cluster %s: %s", session.info.name, exc)
            elif kind == "guard":
                log.warning(
                    "agent of cluster %s routed lanes %s back to base while the control plane was away: %s",
                    session.info.name,
                    list(message.guard.lanes),
                    message.guard.reason,
                )
                await self._hub.guard_reported(session, message.guard)
            elif kind == "hello":
                raise InvalidArgument("hello", "sent twice on one stream")
