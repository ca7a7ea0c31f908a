"""DataPlane: keeps Envoy configuration in step with etcd, and release status in step with Envoy.

The coordinator of one control-plane replica's two loops:
* follow the store (owned here): watch the key prefix from a revision and apply each batch
  of changes to the kept state (one consistent snapshot per revision), build the routing
  view from the previous one, render what changed for every proxy group (by the proxy's
  listen port) and set it in the xDS snapshot cache. After a compaction or a lost watch it
  re-reads the whole prefix and continues, so no change is missed.
* follow the proxies: whenever a proxy ACKs or NACKs (the xDS tracker), an agent reports,
  the view changes or a deadline comes, run one pass of `convergence.Convergence` (count
  per live release the proxies carrying its current target, publish that count, and on
  the leader write each release's convergence over every replica), retried on any error.

Who does what below it: `convergence` counts and writes status; `progress` publishes this
replica's count and merges the other replicas'; `nacks` is the NACK policy (pause the lanes
a rejection blames). Serving the view to this replica's own proxies (render per proxy group,
snapshots, and the bounded history that names the view behind each ACK or NACK) is
`graylane.xds.local.LocalServing`'s, the component an agent's relay uses too. Nothing here
moves a release forward: a batch whose duration pause is over is moved by the leader's tick
(`graylane.controlplane.progression.analyzer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from graylane.controlplane.api.agent_service import AgentHub
from graylane.controlplane.domain import model
from graylane.controlplane.domain.releases import Releases
from graylane.controlplane.errors import GraylaneError
from graylane.controlplane.reconcile import views
from graylane.controlplane.reconcile.convergence import Convergence
from graylane.controlplane.store import Commit, Compacted, LiveSource, ReplicaFleet, ReplicaProgress, Snapshot
from graylane.xds import view as xv
from graylane.xds.cache import SnapshotCache
from graylane.xds.local import LocalServing
from graylane.xds.resources import ROUTE, Resources
from graylane.xds.tracker import PUSHED, ProxyEvent, ProxyTracker

log = logging.getLogger(__name__)

ACTOR = "graylane/dataplane"
_RETRY_SECONDS = 1.0
# From this many services on, a full view build and render goes to a worker thread (below it
# the hop costs more than the work: tens of milliseconds at 1,000 services, well under 1 ms
# at 10).
_OFF_LOOP_SERVICES = 200
# A small change (this many changed keys at most) is built and rendered on the loop while
# the last small one, per watched key, times the keys watched now comes to at most
# _ON_LOOP_SECONDS of CPU: the hop to a thread, and the GIL shared with the loop meanwhile,
# cost more than such work (measured at 1,000 services: 34 ms off the loop for 17 ms of
# work, the loop slowed as well). Each listen port is rendered apart: per key, so a fleet
# with more ports goes to the thread.
_SMALL_CHANGE = 16
_ON_LOOP_SECONDS = 0.025
DEFAULT_STALE_PROXY_SECONDS = 30.0
# Rendered keys' snapshots set in one loop step, up to this long (see `_apply`).
_SET_SLICE_SECONDS = 0.005


class FollowedStore(LiveSource, Protocol):
    """What the store follower reads: the live state and its watch, and the agents'
    metrics reports other replicas shared in a watch batch."""

    def agent_metrics_in(self, events: Sequence[Any]) -> list[tuple[str, str, bytes]]: ...


class DataPlane:
    def __init__(
        self,
        releases: Releases,
        cache: SnapshotCache,
        tracker: ProxyTracker,
        *,
        store: FollowedStore,
        listen_address: str = "127.0.0.1",
        default_listen_port: int = xv.DEFAULT_LISTEN_PORT,
        agents: AgentHub | None = None,
        identity: str = "",
        is_leader: Callable[[], bool] | None = None,
        on_progress: Callable[[dict[str, ReplicaProgress], ReplicaFleet], None] | None = None,
        stale_proxy_seconds: float = DEFAULT_STALE_PROXY_SECONDS,
    ) -> None:
        self._releases = releases
        self._store = store
        self._tracker = tracker
        # The view in force, rendered per proxy group, and the views behind what proxies ACK
        # or NACK (tagged by the view itself: convergence compares views by identity).
        self._serving: LocalServing[xv.RoutingView] = LocalServing(
            cache, listen_address=listen_address, default_listen_port=default_listen_port
        )
        self._snap: Snapshot | None = None
        self._built: views.BuiltView | None = None  # what `_view` was built from
        # Releases changed since the last build (None: unknown, every one compared by identity).
        self._unbuilt: set[str] | None = None
        self._key_cost = math.inf  # CPU seconds per key the last small change's build and render took
        self._changed = asyncio.Event()
        # Counting which proxies serve each release, and writing it (with the NACK policy
        # and the other replicas' counts).
        self._convergence = Convergence(
            releases,
            tracker,
            self._serving,
            actor=ACTOR,
            wake=self._changed.set,
            agents=agents,
            identity=identity,
            is_leader=is_leader,
            on_progress=on_progress,
            stale_seconds=stale_proxy_seconds,
        )
        self.synced = asyncio.Event()  # set once the first snapshot is in the cache
        self._agents = agents
        if agents is not None:
            agents.on_report(self._changed.set)
        self._identity = identity
        self._on_shared_metrics: Callable[[str, bytes], object] | None = None

    def poke(self) -> None:
        """Reconcile again (leadership changed, say)."""
        self._changed.set()

    @property
    def view(self) -> xv.RoutingView | None:
        return self._serving.view

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
        """Read the live state once, then apply the watch's changes to it key by key; after
        a compaction or a lost watch, read it afresh (nothing between is lost: the new read
        is at a revision after every change the old watch missed)."""
        revision = 0
        while True:
            try:
                state = await self._store.live_state()
                self._releases.follow(state)
                await self._apply(state.snapshot(), changed=None)
                # What the full read decoded lives as long as the process follows it: moved
                # out of the collector's scans, whose full passes otherwise held the loop
                # 100+ ms at 1,000 releases (values, not cycles: freed by refcount as ever).
                gc.freeze()
                revision = state.revision
                changes = self._store.watch_with_commits(start_revision=revision + 1)
                async with contextlib.aclosing(changes):
                    async for item in changes:
                        if isinstance(item, Commit):
                            # This replica's own write, from etcd's answer: applied now when it
                            # is the next revision (its watch events are then no-ops), so the
                            # push does not wait for the watch's return trip.
                            found = state.apply_committed(item.revision, item.puts)
                            if found is None:
                                continue
                            changed = found
                        else:
                            self._file_shared_metrics(item)
                            changed = state.apply(item)
                        revision = state.revision
                        if changed:
                            await self._apply(state.snapshot(), changed=changed)
                        self._releases.followed(state)
            except Compacted:
                log.info("watch compacted at %d: re-reading", revision)
            except GraylaneError as exc:
                log.warning("etcd unreachable (%s): serving the last view, retrying", exc)
                await asyncio.sleep(_RETRY_SECONDS)
            except Exception:  # never end the loop: the replica keeps serving its last view
                log.exception("following the store failed; retrying")
                await asyncio.sleep(_RETRY_SECONDS)
            finally:
                self._releases.follow(None)

    def on_shared_metrics(self, callback: Callable[[str, bytes], object]) -> None:
        """`callback(cluster, serialised MetricsReport)` for each agent report another replica
        shared through etcd (`AgentHub.metrics_reported`); this replica's own are skipped."""
        self._on_shared_metrics = callback

    def _file_shared_metrics(self, events: Sequence[Any]) -> None:  # one etcd watch batch
        if self._on_shared_metrics is None:
            return
        for cluster, origin, report in self._store.agent_metrics_in(events):
            if origin != self._identity:
                try:
                    self._on_shared_metrics(cluster, report)
                except Exception:  # one bad record never stops the follower
                    log.exception("a metrics report shared for cluster %s could not be filed", cluster)

    async def _apply(self, snap: Snapshot, *, changed: _Changed | None) -> None:
        """Build the view of `snap` and render it for every watched key, then set both.

        `changed`: what the watch batch changed since the last snapshot applied (None: a
        full read). The view is built from the previous one and the releases changed since
        it was built, and only when the batch can change it. Building and rendering are
        pure over immutable values; a full build past `_OFF_LOOP_SERVICES` services, or a
        big or costly change, runs in a worker thread so the loop keeps answering (ACKs,
        the API) meanwhile. The store follower awaits each apply before the next watch
        batch, so results land in store order; the snapshot, view and renders are set
        together, so a convergence pass never counts a release against a view older than
        its value."""
        if changed is None:
            self._unbuilt = None
        elif self._unbuilt is not None:
            self._unbuilt.update(changed.get("releases", ()))
        keys = sorted(self._serving.cache.requested_keys())
        built: _Build | None = None
        sliced = time.perf_counter()
        if self._serving.view is None or changed is None or _may_change_view(changed):
            names = frozenset(self._unbuilt) if self._unbuilt is not None else None
            small = self._built is not None and changed is not None and _changed_keys(changed) <= _SMALL_CHANGE
            cheap = not keys or self._key_cost * len(keys) <= _ON_LOOP_SECONDS  # (no key: nothing to render)
            if len(snap.services) < _OFF_LOOP_SERVICES or (small and cheap):
                built = self._build(snap, self._built, names, keys)
                # A build that took a slice already lets the loop step before the snapshots
                # are set; a small one (0.5-2 ms for a NextBatch at 1,000 services) goes on to
                # set them, and so to the push, in the same step: a yield here let whatever
                # was ready meanwhile (API replies, Watch writes) run ahead of the push.
                if time.perf_counter() - sliced > _SET_SLICE_SECONDS:
                    await asyncio.sleep(0)
                    sliced = time.perf_counter()
            else:
                built = await asyncio.to_thread(self._build, snap, self._built, names, keys)
                sliced = time.perf_counter()
            self._unbuilt = set()
            if small and built.rendered is not None and keys:  # one that rendered nothing says nothing of render
                self._key_cost = built.cost / len(keys)
        self._snap = snap
        self._convergence.applied(snap, changed.get("releases", {}).keys() if changed is not None else None)
        if self._agents is not None and (built is not None or not self._agents.settled):
            self._agents.publish(snap)
        if built is not None:
            self._built = built.built
            if built.rendered is not None:
                view = built.built.view
                assert built.effective is not None  # (rendered: a new view)
                self._convergence.installed(built.effective)
                self._serving.install(view, view)
                # Keys' snapshots are set back to back for up to _SET_SLICE_SECONDS of the
                # loop, then the loop gets a step: at scale each is tens of ms; with a few
                # listen ports each is a fraction of a millisecond, and a step between them
                # let other work in before the next group's push (5 ports: the last push
                # 6 ms after the first).
                for key, resources in built.rendered.items():
                    if time.perf_counter() - sliced > _SET_SLICE_SECONDS:
                        await asyncio.sleep(0)
                        sliced = time.perf_counter()
                    self._serving.set_rendered(key, view, resources)
                # Keys first asked for while the view was being built were rendered from the
                # previous one: render them again from this one.
                for key in sorted(self._serving.cache.requested_keys() - built.rendered.keys()):
                    self._serving.render_key(key)
        self.synced.set()
        if changed is None or not _only_own_count(changed, self._identity):
            # This replica's own published count is never read back by its own passes.
            self._changed.set()

    def _build(
        self, snap: Snapshot, previous: views.BuiltView | None, changed: frozenset[str] | None, keys: list[str]
    ) -> _Build:
        """Pure: `snap`'s view built from `previous` (see `views.build_view_from`), and, when
        it is not `previous`'s view, its effective view and its render per key. Touches no
        state of this object: it may run in a worker thread."""
        began = time.thread_time()
        built = views.build_view_from(previous, snap, changed=changed)
        view = built.view
        if previous is not None and view is previous.view:
            return _Build(built, None, None, time.thread_time() - began)
        rendered: dict[str, Resources | ValueError] = {}
        for key in keys:
            try:
                rendered[key] = self._serving.render(view, key)
            except ValueError as exc:
                rendered[key] = exc
        return _Build(built, self._serving.effective_view(view), rendered, time.thread_time() - began)

    def kept_keys(self) -> frozenset[str]:
        """Cache keys this replica keeps per-key state for (their views' history)."""
        return self._serving.kept_keys()

    # ------------------------------------------------------------------ proxies -> status

    async def _follow_proxies(self) -> None:
        # Woken straight from the tracker's events (no task per wait): an ACK starts the
        # pass that may write `reached` in the next loop step.
        remove = self._tracker.add_listener(self._on_proxy_event)
        self._changed.set()
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                try:
                    await self._convergence.reconcile()
                except GraylaneError as exc:
                    log.warning("cannot write release status (%s); retrying", exc)
                    await asyncio.sleep(_RETRY_SECONDS)
                    self._changed.set()
                except Exception:  # never end the loop: status is written again on the next pass
                    log.exception("reconciling release status failed; retrying")
                    await asyncio.sleep(_RETRY_SECONDS)
                    self._changed.set()
        finally:
            remove()

    def _on_proxy_event(self, event: ProxyEvent) -> None:
        """A stream opened, ended, ACKed or NACKed (a push alone changes no count)."""
        if event.kind != PUSHED:
            self._changed.set()

    def proxies_current(self) -> bool:
        """Every connected proxy holds the routes rendered from the latest view (and there is one)."""
        proxies = [p for p in self._tracker.proxies().values() if p.connected]
        if not proxies:
            return False
        for p in proxies:
            snap = self._serving.cache.snapshot(p.key)
            ack = p.acked.get(ROUTE)
            if snap is None or ack is None or ack.version != snap[ROUTE].version:
                return False
        return True

    async def wait_current(self, timeout: float = 15.0) -> None:
        """Poll until every connected proxy runs the latest view."""
        async with asyncio.timeout(timeout):
            while not self.proxies_current():
                await asyncio.sleep(0.02)


# Kinds whose values never reach a routing view (what proxies and replicas count).
_COUNTING_KINDS = frozenset({"progress", "replicas"})
# What a watch batch changed: kind -> key -> (old value, new value) (None: absent).
_Changed = dict[str, dict[str, tuple[object, object]]]


@dataclass(frozen=True, slots=True)
class _Build:
    """A view build: the view (and what it was built from); its effective view and render
    per key, None when the view is the previous one; the CPU seconds it took."""

    built: views.BuiltView
    effective: xv.RoutingView | None
    rendered: dict[str, Resources | ValueError] | None
    cost: float


def _only_own_count(changed: _Changed, identity: str) -> bool:
    """Whether a watch batch changed nothing but this replica's own published count."""
    return changed.keys() == {"progress"} and changed["progress"].keys() == {identity}


def _changed_keys(changed: _Changed) -> int:
    """Changed keys of the kinds a view is built from."""
    return sum(len(keys) for kind, keys in changed.items() if kind not in _COUNTING_KINDS)


def _may_change_view(changed: _Changed) -> bool:
    """Whether a watch batch (kind -> key -> (old, new)) can change the routing view: not
    when only counts changed, or only releases' status fields the view does not read."""
    for kind, keys in changed.items():
        if kind in _COUNTING_KINDS:
            continue
        if kind != "releases":
            return True
        for old, new in keys.values():
            if _routing_of(old) != _routing_of(new):
                return True
    return False


def _routing_of(release: object) -> object:
    """What `views.build_view` reads of one release: its served lane (or the lane staged
    for it, `views.staged_lane`) and its placement."""
    if not isinstance(release, model.Release):
        return None
    lane = views.served_lane(release)
    if lane is None:
        staged = views.staged_lane(release)
        if staged is None:
            return None
        return (None, staged, release.spec.gray_clusters, release.spec.services)
    return (lane, release.spec.gray_clusters, release.spec.services)
