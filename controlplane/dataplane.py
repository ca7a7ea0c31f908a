"""DataPlane: keeps Envoy configuration in step with etcd, and release status in step with Envoy.

Owns two loops of one control-plane replica:
* follow the store: watch the key prefix from a revision; on every change re-read one
  consistent snapshot, build the routing view, render it for every proxy group (by the
  proxy's listen port) and set it in the xDS snapshot cache. After a compaction or a lost
  connection it re-reads and continues, so no change is missed.
* follow the proxies: whenever a proxy ACKs or NACKs (the xDS tracker), an agent reports,
  or the view changes, count per live release the proxies carrying its current batch (this
  replica's and its agents'), publish that count for the other replicas, and, on the
  leader, write each live release's convergence over every replica (`reached` once all
  proxies carry it); pause a release whose change a proxy rejected, naming the proxy and
  Envoy's message.

It remembers, for a bounded number of rendered configurations, the view each was rendered
from (keyed by content versions), so an ACK or NACK names a view without guesswork.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from graylane.controlplane import model, views
from graylane.controlplane.agents import AgentHub
from graylane.controlplane.errors import Conflict, FailedPrecondition, GraylaneError
from graylane.controlplane.machine import Action, Cause
from graylane.controlplane.releases import Releases, StatusUpdate
from graylane.controlplane.store import Compacted, ReplicaProgress, Snapshot
from graylane.xds import view as xv
from graylane.xds.cache import DEFAULT_KEY, SnapshotCache
from graylane.xds.render import effective_view, render
from graylane.xds.resources import PUSH_ORDER, ROUTE, Resources
from graylane.xds.tracker import ProxyStatus, ProxyTracker

log = logging.getLogger(__name__)

ACTOR = "graylane/dataplane"
DEFAULT_LISTEN_PORT = 10000
_HISTORY = 512
_RETRY_SECONDS = 1.0


class _ViewHistory:
    """Which view produced a given (type, version): bounded, newest kept."""

    def __init__(self, size: int = _HISTORY) -> None:
        self._size = size
        self._views: OrderedDict[tuple[str, str], xv.RoutingView] = OrderedDict()

    def remember(self, resources: Resources, view: xv.RoutingView) -> None:
        for type_url in PUSH_ORDER:
            key = (type_url, resources[type_url].version)
            self._views[key] = view
            self._views.move_to_end(key)
        while len(self._views) > self._size:
            self._views.popitem(last=False)

    def get(self, type_url: str, version: str) -> xv.RoutingView | None:
        return self._views.get((type_url, version))


class DataPlane:
    def __init__(
        self,
        releases: Releases,
        cache: SnapshotCache,
        tracker: ProxyTracker,
        *,
        listen_address: str = "127.0.0.1",
        default_listen_port: int = DEFAULT_LISTEN_PORT,
        agents: AgentHub | None = None,
        identity: str = "",
        is_leader: Callable[[], bool] | None = None,
        on_progress: Callable[[dict[str, ReplicaProgress]], None] | None = None,
    ) -> None:
        self._releases = releases
        self._store = releases.store
        self._cache = cache
        self._tracker = tracker
        self._listen_address = listen_address
        self._default_port = default_listen_port
        self._history = _ViewHistory()
        self._keys: set[str] = set()
        self._snap: Snapshot | None = None
        self._view: xv.RoutingView | None = None
        self._effective: xv.RoutingView | None = None
        self._changed = asyncio.Event()
        self._handled_nacks: set[tuple[str, str]] = set()
        self.synced = asyncio.Event()  # set once the first snapshot is in the cache
        cache.on_key_requested(self._render_key)
        self._agents = agents
        if agents is not None:
            agents.on_report(self._changed.set)
        # Several replicas: each publishes what it counts (`on_progress`), and the leader
        # alone writes status from its own count plus the others' (None: a lone replica).
        self._identity = identity
        self._is_leader = is_leader
        self._on_progress = on_progress

    def poke(self) -> None:
        """Reconcile again (leadership changed, say)."""
        self._changed.set()

    @property
    def view(self) -> xv.RoutingView | None:
        return self._view

    @property
    def snapshot(self) -> Snapshot | None:
        """The last store snapshot applied (read-only: telemetry counts releases from it)."""
        return self._snap

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_store())
            tasks.create_task(self._follow_proxies())

    # ------------------------------------------------------------------ store -> cache

    async def _follow_store(self) -> None:
        revision = 0
        while True:
            try:
                snap = await self._store.snapshot()
                self._apply(snap)
                revision = snap.revision
                async for _ in self._store.watch(start_revision=revision + 1):
                    snap = await self._store.snapshot()
                    if snap.revision > revision:
                        self._apply(snap)
                        revision = snap.revision
            except Compacted:
                log.info("watch compacted at %d: re-reading", revision)
            except GraylaneError as exc:
                log.warning("etcd unreachable (%s): serving the last view, retrying", exc)
                await asyncio.sleep(_RETRY_SECONDS)
            except Exception:  # never end the loop: the replica keeps serving its last view
                log.exception("following the store failed; retrying")
                await asyncio.sleep(_RETRY_SECONDS)

    def _apply(self, snap: Snapshot) -> None:
        self._snap = snap
        if self._agents is not None:
            self._agents.publish(snap)
        view = views.build_view(snap)
        if view != self._view:
            self._view = view
            self._effective = effective_view(view)
            for key in sorted(self._keys | self._cache.requested_keys()):
                self._render_key(key)
        self.synced.set()
        self._changed.set()

    def _port_of(self, key: str) -> int:
        if key == DEFAULT_KEY or not key.isdigit():
            return self._default_port
        return int(key)

    def _render_key(self, key: str) -> None:
        if self._view is None:
            return
        self._keys.add(key)
        try:
            resources = render(self._view, listen_port=self._port_of(key), listen_address=self._listen_address)
            self._history.remember(resources, self._view)
            self._cache.set_snapshot(key, resources)
        except ValueError:
            # A view validation should have refused (or an inconsistent render): keep serving
            # the last good snapshot rather than push a broken one or stop the loop.
            log.exception("cannot render the view for %s; proxies keep their last configuration", key)

    # ------------------------------------------------------------------ proxies -> status

    async def _follow_proxies(self) -> None:
        seen = -1
        while True:
            waiter = asyncio.create_task(self._tracker.wait_for_change(seen))
            changed = asyncio.create_task(self._changed.wait())
            try:
                await asyncio.wait({waiter, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                changed.cancel()
            self._changed.clear()
            seen = self._tracker.seq
            try:
                await self.reconcile()
            except GraylaneError as exc:
                log.warning("cannot write release status (%s); retrying", exc)
                await asyncio.sleep(_RETRY_SECONDS)
                self._changed.set()
            except Exception:  # never end the loop: status is written again on the next pass
                log.exception("reconciling release status failed; retrying")
                await asyncio.sleep(_RETRY_SECONDS)
                self._changed.set()

    def proxies_current(self) -> bool:
        """Every connected proxy holds the routes rendered from the latest view (and there is one)."""
        proxies = [p for p in self._tracker.proxies().values() if p.connected]
        if not proxies:
            return False
        for p in proxies:
            snap = self._cache.snapshot(p.key)
            ack = p.acked.get(ROUTE)
            if snap is None or ack is None or ack.version != snap[ROUTE].version:
                return False
        return True

    async def wait_current(self, timeout: float = 15.0) -> None:
        """Poll until every connected proxy runs the latest view."""
        async with asyncio.timeout(timeout):
            while not self.proxies_current():
                await asyncio.sleep(0.02)

    def _carried(self, proxy: ProxyStatus) -> xv.RoutingView | None:
        ack = proxy.acked.get(ROUTE)
        return self._history.get(ROUTE, ack.version) if ack is not None else None

    async def reconcile(self) -> None:
        """One pass: NACKs first (they pause), then convergence of every live release."""
        snap, view, effective = self._snap, self._view, self._effective
        if snap is None or view is None or effective is None:
            return
        proxies = [p for p in self._tracker.proxies().values() if p.connected]
        await self._handle_nacks(snap, proxies)
        carried = [self._carried(p) for p in proxies]
        if self._agents is not None:
            carried += self._agents.carried()  # the proxies of every connected cluster
        targets = sorted({s[ROUTE].version for k in self._keys if (s := self._cache.snapshot(k)) is not None})
        target = ",".join(targets)
        live = [r for r in snap.releases if views.routed(r)]
        # This replica's count per live release, made once: published, and summed by the leader.
        counted = {
            r.name: (
                views.release_progress(r, intended=view, effective=effective, carried=carried),
                views.lane_fingerprint(view, r.spec.lane),
            )
            for r in live
        }
        if self._on_progress is not None:
            self._on_progress({name: ReplicaProgress(fp, p.proxies, p.converged) for name, (p, fp) in counted.items()})
        leading = self._is_leader is None or self._is_leader()
        for release in live:
            progress, fingerprint = counted[release.name]
            updated = await self._write_progress(release, view, progress, fingerprint, target) if leading else None
            await self._advance_timed_pause(updated or release)

    def _other_replicas(self, release: str, fingerprint: str) -> tuple[int, int]:
        """(proxies, converged) the other live replicas count for `release`; proxies counted
        against another value of its lane (a replica not caught up yet) are not converged."""
        proxies = converged = 0
        snap = self._snap
        for identity, progress in snap.replica_progress.items() if snap is not None else ():
            counted = progress.get(release)
            if identity == self._identity or counted is None:
                continue
            proxies += counted.proxies
            converged += counted.converged if counted.lane == fingerprint else 0
        return proxies, converged

    async def _advance_timed_pause(self, release: model.Release) -> None:
        """A batch with a duration pause moves on once reached and the duration has passed.

        The move is guarded by the revision it was decided on, so replicas racing to make
        it produce exactly one transition.
        """
        due = views.pause_due(release)
        if due is None:
            return
        wait = (due - datetime.now(UTC)).total_seconds()
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self._changed.set)
            return
        pause = release.spec.batches[release.status.batch].pause
        cause = Cause(
            actor=ACTOR,
            reason=f"batch {release.status.batch + 1} held {pause} after it was reached",
            details={"pause_seconds": f"{pause.total_seconds() if pause else 0:g}"},
        )
        with contextlib.suppress(Conflict, FailedPrecondition):
            await self._releases.act(release.name, Action.NEXT, cause, expected_revision=release.revision)

    async def _write_progress(
        self,
        counted_on: model.Release,
        view: xv.RoutingView,
        local: views.Progress,
        fingerprint: str,
        target: str,
    ) -> model.Release | None:
        """Write `counted_on`'s convergence: this replica's `local` count (made on that value
        of the release against `view`) plus what the other replicas publish."""

        def change(current: model.Release) -> StatusUpdate | None:
            if not views.routed(current):
                return None
            if views.lane_of(current) != views.lanes_by_name(view).get(current.spec.lane):
                # The view predates this value of the release (a batch just changed):
                # ACKs of the old batch must not count for the new one.
                return None
            if current.spec.lane != counted_on.spec.lane:
                return None  # counted for another lane: the next pass counts this one
            others = self._other_replicas(current.name, fingerprint)
            p = replace(local, proxies=local.proxies + others[0], converged=local.converged + others[1])
            newly = not current.status.reached and p.applied and p.proxies > 0 and p.converged == p.proxies
            status = replace(
                current.status,
                proxies=p.proxies,
                converged=p.converged,
                target_version=target,
                reached=current.status.reached or newly,
            )
            if not newly:
                return StatusUpdate(status)
            now = datetime.now(UTC)  # the pause counts from the instant the event records
            status = replace(
                status,
                batch_reached=now,
                reason=f"batch {current.status.batch} reached by {p.proxies} proxies",
            )
            return StatusUpdate(
                status,
                action="reached",
                at=now,
                cause=Cause(
                    actor=ACTOR,
                    reason="every proxy serving the release ACKed its current batch",
                    details={"proxies": str(p.proxies), "weight": str(current.weight())},
                ),
            )

        return await self._releases.update_status(counted_on.name, change)

    async def _handle_nacks(self, snap: Snapshot, proxies: list[ProxyStatus]) -> None:
        """Pause the releases whose lanes a rejected configuration introduced: for this
        replica's own proxies and for those the agents report from their clusters."""
        for proxy in proxies:
            nack = proxy.last_nack
            if nack is None or (proxy.node_id, nack.nonce) in self._handled_nacks:
                continue
            self._handled_nacks.add((proxy.node_id, nack.nonce))
            accepted_ack = proxy.acked.get(nack.type_url)
            record = model.Nack(
                node=proxy.node_id,
                type_url=nack.type_url,
                version=nack.version,
                message=nack.message,
                at=datetime.fromtimestamp(nack.at, UTC),
            )
            await self._hold_for_nack(
                snap,
                record,
                rejected=self._history.get(nack.type_url, nack.version),
                accepted=self._history.get(nack.type_url, accepted_ack.version) if accepted_ack else None,
            )
        for found in self._agents.nacks() if self._agents is not None else ():
            # An agent's proxy: named with its cluster; each NACK (by its time) handled once.
            node = f"{found.cluster}/{found.node_id}"
            key = (node, f"{found.nack.type_url}@{found.nack.version}@{found.nack.at.ToNanoseconds()}")
            if key in self._handled_nacks:
                continue
            self._handled_nacks.add(key)
            if found.rejected is None:
                # Not a view this replica sent (one from before a restart, say): blaming every
                # live lane for it would pause releases the NACK may have nothing to do with.
                log.warning("%s rejected a view this replica did not send: %s", node, found.nack.message)
                continue
            record = model.Nack(
                node=node,
                type_url=found.nack.type_url,
                version=found.nack.version,
                message=found.nack.message,
                at=found.nack.at.ToDatetime(tzinfo=UTC),
            )
            await self._hold_for_nack(snap, record, rejected=found.rejected, accepted=found.accepted)

    async def _hold_for_nack(
        self,
        snap: Snapshot,
        record: model.Nack,
        *,
        rejected: xv.RoutingView | None,
        accepted: xv.RoutingView | None,
    ) -> None:
        blamed = views.blame_nack(rejected, accepted)
        if rejected is None:
            # A configuration this replica did not render: blame every live lane.
            blamed = frozenset(r.spec.lane for r in snap.releases if views.routed(r))
        for release in snap.releases:
            if release.spec.lane in blamed and views.routed(release):
                await self._releases.hold_for_nack(release.name, record, cause=Cause(actor=ACTOR))
