"""DataPlane: keeps Envoy configuration in step with etcd, and release status in step with Envoy.

Owns two loops of one control-plane replica:
* follow the store: watch the key prefix from a revision and apply each batch of changes
  to the kept state (one consistent snapshot per revision), build the routing view from
  the previous one, render what changed for every proxy group (by the proxy's listen
  port) and set it in the xDS snapshot cache. After a compaction or a lost watch it
  re-reads the whole prefix and continues, so no change is missed.
* follow the proxies: whenever a proxy ACKs or NACKs (the xDS tracker), an agent reports,
  or the view changes, count per live release the proxies carrying its current batch (this
  replica's and its agents'), publish that count for the other replicas, and, on the
  leader, write each live release's convergence over every replica (`reached` once all
  proxies carry it); pause a release whose change a proxy rejected, naming the proxy and
  Envoy's message.

Serving the view to this replica's own proxies (render per proxy group, snapshots, and the
bounded history that names the view behind each ACK or NACK) is `graylane.xds.local.
LocalServing`'s, the component an agent's relay uses too; what a NACK does (pause the lanes
it blames) is the policy kept here. It moves no release forward: a batch whose duration
pause is over is moved by the leader's tick (`graylane.controlplane.progression.analyzer`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from graylane.controlplane.api.agent_service import AgentHub
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Cause
from graylane.controlplane.domain.releases import Releases, StatusUpdate
from graylane.controlplane.errors import GraylaneError
from graylane.controlplane.reconcile import views
from graylane.controlplane.store import Compacted, LiveSource, ReplicaFleet, ReplicaProgress, Snapshot
from graylane.xds import view as xv
from graylane.xds.cache import SnapshotCache
from graylane.xds.local import LocalServing
from graylane.xds.resources import ROUTE, Resources
from graylane.xds.scope import Scope, parse_scoped_key, scoped_key
from graylane.xds.tracker import PUSHED, ProxyEvent, ProxyStatus, ProxyTracker

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
        self._cache = cache
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
        self._effective: xv.RoutingView | None = None
        self._changed = asyncio.Event()
        # (stream, nonce) of every NACK handled, for streams still open (agents: (cluster, ...)).
        self._handled_nacks: set[tuple[str, str]] = set()
        # Stale-proxy rule: a proxy that has not carried a release's target this long after
        # the target appeared (or the proxy connected) is declared gone for its convergence.
        self._stale_seconds = stale_proxy_seconds
        self._targets: dict[str, tuple[str, float]] = {}  # release -> (target fingerprint, first seen)
        self._wake: asyncio.TimerHandle | None = None
        # Incremental convergence: the proxy facts as last built (and what they were built
        # from), each release's last count, and the (release, view, numbers) last found written.
        self._own = _OwnProxies(tracker)
        self._agent_facts: list[views.ProxyFacts] = []
        self._carried_marks: tuple[object, ...] = ()
        self._groups: views.ProxyGroups = ()
        self._facts_seq = 0
        self._nack_streams: set[str] = set()  # own streams holding a NACK not yet looked at
        self._progress_sent: tuple[dict[str, ReplicaProgress], ReplicaFleet, float] | None = None
        self._written: dict[
            str, tuple[float, str, views.Progress]
        ] = {}  # release -> (when, target, count) last written
        self._fleet_sent: ReplicaFleet | None = None
        self._counts: dict[str, _Count] = {}
        # release -> (the value, its target and the numbers) last looked at with nothing to write
        self._settled: dict[str, tuple[model.Release, views.Target, views.Progress]] = {}
        self._counted_names: frozenset[str] = frozenset()
        # The followed releases by name, the releases tuple they were taken from, and the
        # names of releases changed by watch batches since (None: unknown, all looked at).
        self._followed: dict[str, model.Release] = {}
        self._followed_from: tuple[model.Release, ...] | None = None
        self._releases_changed: set[str] | None = None
        # (view, effective view, facts sequence) -> what `_uniform` found for them
        self._uniform_for: tuple[xv.RoutingView, xv.RoutingView, int, _Uniform | None] | None = None
        # Other replicas' progress (and fleets) as last read, and those that went silent or
        # left since (with when).
        self._published: dict[str, dict[str, ReplicaProgress]] = {}
        self._published_fleet: dict[str, ReplicaFleet] = {}
        self._seen_alive = 0.0  # when the replicas in `_published` were last seen publishing
        self._silent: dict[str, _Silent] = {}
        self._published_nodes: dict[str, frozenset[str]] = {}
        self._silence_timer: asyncio.TimerHandle | None = None
        self.synced = asyncio.Event()  # set once the first snapshot is in the cache
        self._agents = agents
        if agents is not None:
            agents.on_report(self._changed.set)
        # Several replicas: each publishes what it counts (`on_progress`), and the leader
        # alone writes status from its own count plus the others' (None: a lone replica).
        self._identity = identity
        self._on_shared_metrics: Callable[[str, bytes], object] | None = None
        self._is_leader = is_leader
        self._on_progress = on_progress

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
                async for events in self._store.watch(start_revision=revision + 1):
                    self._file_shared_metrics(events)
                    changed = state.apply(events)
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
        keys = sorted(self._cache.requested_keys())
        built: _Build | None = None
        if self._serving.view is None or changed is None or _may_change_view(changed):
            names = frozenset(self._unbuilt) if self._unbuilt is not None else None
            small = self._built is not None and changed is not None and _changed_keys(changed) <= _SMALL_CHANGE
            cheap = not keys or self._key_cost * len(keys) <= _ON_LOOP_SECONDS  # (no key: nothing to render)
            if len(snap.services) < _OFF_LOOP_SERVICES or (small and cheap):
                built = self._build(snap, self._built, names, keys)
                await asyncio.sleep(0)  # the build and the first key's snapshot in two loop steps
            else:
                built = await asyncio.to_thread(self._build, snap, self._built, names, keys)
            self._unbuilt = set()
            if small and built.rendered is not None and keys:  # one that rendered nothing says nothing of render
                self._key_cost = built.cost / len(keys)
        self._snap = snap
        # Noted with the snapshot they lead to (a pass may run while this one is built).
        if changed is None:
            self._releases_changed = None
        elif self._releases_changed is not None:
            self._releases_changed.update(changed.get("releases", ()))
        self._remember_silent(snap)
        if self._agents is not None and (built is not None or not self._agents.settled):
            self._agents.publish(snap)
        if built is not None:
            self._built = built.built
            if built.rendered is not None:
                view = built.built.view
                self._effective = built.effective
                self._serving.install(view, view)
                for i, (key, resources) in enumerate(built.rendered.items()):
                    if i:
                        await asyncio.sleep(0)  # one key's snapshot per loop step: each is tens of ms at scale
                    self._serving.set_rendered(key, view, resources)
                # Keys first asked for while the view was being built were rendered from the
                # previous one: render them again from this one.
                for key in sorted(self._cache.requested_keys() - built.rendered.keys()):
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
                    await self.reconcile()
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

    def _agent_proxy_facts(self) -> list[views.ProxyFacts]:
        """The agents' proxies, as their agents last reported them."""
        facts = []
        for session in self._agents.sessions.values() if self._agents is not None else ():
            for node_id, version in sorted(session.proxies.items()):
                nack = session.nacks.get(node_id)
                facts.append(
                    views.ProxyFacts(
                        name=f"{node_id} (cluster {session.info.name})",
                        carried=session.views.get(version),
                        problem=nack.last_nack.message if nack is not None else "",
                        scope=session.scopes.get(node_id),
                    )
                )
        return facts

    def _target_since(self, release: model.Release, fingerprint: str, now: float) -> float:
        """When this replica first saw `release` ask for its current target."""
        seen = self._targets.get(release.name)
        if seen is None or seen[0] != fingerprint:
            seen = (fingerprint, now)
            self._targets[release.name] = seen
        return seen[1]

    async def reconcile(self) -> None:
        """One pass: NACKs first (they pause), then convergence of every followed release.

        Incremental: a release is counted again only when its value, the view or the proxy
        facts changed since its last count (or a lagging proxy's stale deadline passed), and
        its status is looked at again only when its count or its value changed."""
        snap, view, effective = self._snap, self._serving.view, self._effective
        if snap is None or view is None or effective is None:
            return
        facts_seq = self._refresh_facts()
        if self._nack_streams:
            found = (self._tracker.get(stream) for stream in sorted(self._nack_streams))
            await self._handle_nacks(snap, [p for p in found if p is not None])
            self._nack_streams.clear()  # kept when handling failed: looked at again next pass
        elif self._agents is not None and self._agents.sessions:
            await self._handle_nacks(snap, [])
        now = time.time()
        followed = self._followed_releases(snap)
        if followed.keys() != self._counted_names:
            names = self._counted_names = frozenset(followed)
            self._targets = {n: t for n, t in self._targets.items() if n in names}
            self._counts = {n: c for n, c in self._counts.items() if n in names}
            self._settled = {n: c for n, c in self._settled.items() if n in names}
            self._written = {n: w for n, w in self._written.items() if n in names}
        # Lanes every proxy's view carries as `view` has them: a release there is counted
        # whole without looking at it (None: some proxy carries no known view).
        uniform = self._uniform(view, effective, facts_seq)
        others = bool(self._silent) or any(i != self._identity for i in snap.replica_progress)
        leading = self._is_leader is None or self._is_leader()
        deadlines: list[float] = []
        # This replica's count per followed release, made once: published, and summed by the leader.
        counted: dict[str, tuple[views.Progress, str, float]] = {}
        due: list[tuple[bool, str, model.Release, views.Target, views.Progress]] = []
        for name, r in followed.items():
            want = views.target_in(view, r)
            kept = self._counts.get(name)
            if kept is not None and kept.want == want:
                fp, since = kept.fingerprint, kept.since
            else:
                fp = views.fingerprint(want)
                since = self._target_since(r, fp, now)
            if (
                kept is not None
                and kept.release is r
                and kept.view is view
                and kept.effective is effective
                and kept.facts_seq == facts_seq
                and (kept.progress.next_deadline is None or now < kept.progress.next_deadline)
            ):
                progress = kept.progress
            else:
                if (
                    uniform is not None
                    and r.status.phase is not model.Phase.SUCCEEDED  # its target reads the services too
                    and r.spec.lane not in uniform[1]
                ):
                    progress = uniform[0]
                else:
                    progress = views.grouped_progress(
                        r,
                        intended=view,
                        effective=effective,
                        groups=self._groups,
                        target_since=since,
                        now=now,
                        stale_seconds=self._stale_seconds,
                    )
                self._counts[name] = _Count(r, view, effective, facts_seq, progress, fp, since, want)
            counted[name] = (progress, fp, since)
            total = self._with_other_replicas(name, progress, fp, since, now) if others else progress
            if total.next_deadline is not None:
                deadlines.append(total.next_deadline)
            settled = self._settled.get(name)
            # Looked at with these very numbers, for this target, already: nothing to write.
            if settled is not None and settled[0] is r and settled[1] == want and settled[2] == total:
                continue
            if leading:
                due.append((not (total.reached and not r.status.reached), name, r, want, total))
        # A release whose count changed is written first (a batch just reached leads).
        due.sort(key=lambda d: (d[0], d[1]))
        writes: list[tuple[str, model.Release, views.Target, views.Progress, str, float | None]] = []
        for _, name, release, want, total in due:
            _, fingerprint, since = counted[name]
            fresh_until = since + _MOVE_GRACE_SECONDS if now < since + _MOVE_GRACE_SECONDS else None
            written = self._written.get(name)
            if written is not None and _converging(written, fingerprint, total, now):
                # Only more proxies carry it, not all yet: that count is written at most every
                # _PROGRESS_INTERVAL_SECONDS (a fleet's ACKs moved it on every pass, and each
                # write is an etcd transaction every replica's watch reads back).
                deadlines.append(written[0] + _PROGRESS_INTERVAL_SECONDS)
                continue
            writes.append((name, release, want, total, fingerprint, fresh_until))
        for name, release, want, total, fingerprint, fresh_until in writes:
            updated, deferred = await self._write_progress(release, view, total, fingerprint, fresh=fresh_until)
            if deferred and fresh_until is not None:
                deadlines.append(fresh_until)
            elif updated is None:
                self._settled[name] = (release, want, total)
            else:
                self._written[name] = (now, fingerprint, total)
        # Published after this pass's status writes: another replica reads it only once it
        # leads, and the transaction would otherwise queue at etcd beside a `reached` write.
        if self._on_progress is not None:
            mine = {
                name: ReplicaProgress(fp, p.proxies, p.converged, p.scoped_out) for name, (p, fp, _) in counted.items()
            }
            held_until = self._publish_progress(mine, self._fleet(), now)
            if held_until is not None:
                deadlines.append(held_until)
        self._wake_at(min(deadlines) if deadlines else None, now)

    def _followed_releases(self, snap: Snapshot) -> dict[str, model.Release]:
        """`snap`'s followed releases by name, kept from the last pass: only the releases
        watch batches changed since are looked at again (a pass at 1,000 releases asked
        each one otherwise)."""
        if snap.releases is self._followed_from:
            return self._followed
        if snap is not self._snap:
            # Older than the changes noted (they lead to `self._snap`): filtered whole, and
            # the notes kept for the pass that counts `self._snap`.
            return {r.name: r for r in snap.releases if views.followed(r)}
        changed = self._releases_changed
        if changed is None or self._followed_from is None or len(snap.by_name) != len(snap.releases):
            followed = {r.name: r for r in snap.releases if views.followed(r)}
        else:
            followed = dict(self._followed)
            for name in changed:
                r = snap.by_name.get(name)
                if r is not None and views.followed(r):
                    followed[name] = r
                else:
                    followed.pop(name, None)
        self._followed, self._followed_from, self._releases_changed = followed, snap.releases, set()
        return followed

    def _uniform(self, view: xv.RoutingView, effective: xv.RoutingView, facts_seq: int) -> _Uniform | None:
        """The count of a release whose lane every proxy's view has as `view` has it (and
        `effective` too): every proxy, all converged; and the lane names for which that
        does not hold. None when some proxy carries no known view (nothing is uniform)."""
        kept = self._uniform_for
        if kept is not None and kept[0] is view and kept[1] is effective and kept[2] == facts_seq:
            return kept[3]
        found: _Uniform | None
        proxies = 0
        differ = _lanes_differ(view, effective)
        for group in self._groups:
            if not len(group):
                continue
            if group.carried is None or group.scope is not None:
                # (a scoped group does not carry every release: each is counted apart)
                found = None
                break
            proxies += len(group)
            differ |= _lanes_differ(view, group.carried)
        else:
            found = (views.Progress(proxies=proxies, converged=proxies, applied=True), frozenset(differ))
        self._uniform_for = (view, effective, facts_seq, found)
        return found

    def _refresh_facts(self) -> int:
        """Bring the proxy facts (grouped by carried view) up to date: this replica's streams
        from what the tracker changed since the last pass, the views their route versions
        name, and the agents' proxies; return the facts' sequence (it moves on each change)."""
        moved, nacked = self._own.refresh()
        self._nack_streams.update(nacked)
        own = self._own.groups(self._carried)
        agent_facts = self._agent_proxy_facts() if self._agents is not None else []
        # Tuple equality tests identity first: one view object per rendered configuration.
        marks = tuple(g.carried for g in own)
        if moved or marks != self._carried_marks or agent_facts != self._agent_facts or self._facts_seq == 0:
            self._carried_marks = marks
            self._agent_facts = agent_facts
            self._groups = (*own, *views.group_by_carried(agent_facts))
            self._facts_seq += 1
        return self._facts_seq

    def _carried(self, version: str, part: Mapping[str, str]) -> xv.RoutingView | None:
        """The view a proxy's ACKed route `version` (holding `part`) was rendered from
        (`LocalServing.view_of`). A scoped proxy's group names its scope too
        (`scoped_key(version, scope)`)."""
        version, scope = parse_scoped_key(version)
        return self._serving.view_of(ROUTE, version, part, scope=scope)

    def _publish_progress(self, progress: dict[str, ReplicaProgress], fleet: ReplicaFleet, now: float) -> float | None:
        """Hand this replica's count to `on_progress` (it writes it to etcd for the leader):
        at once when anything but a converged count moved, or when a release became fully
        converged here; a count that only grew towards it at most every
        `_PROGRESS_INTERVAL_SECONDS` (a fleet's ACKs move it on every pass, and each write
        carries every node id). Returns when to publish what was held back (None: nothing).

        Held back, the published count is behind in the safe direction only: fewer
        converged of the same proxies and targets, so no replica reads more than ACKs show."""
        assert self._on_progress is not None
        last = self._progress_sent
        if last is not None and last[0] == progress and last[1] is fleet:
            return None
        due = last[2] + _PROGRESS_INTERVAL_SECONDS if last is not None else now
        if last is not None and now < due and _only_grew(last[0], progress) and last[1] is fleet:
            return due
        self._on_progress(progress, fleet)
        self._progress_sent = (progress, fleet, now)
        return None

    def _wake_at(self, deadline: float | None, now: float) -> None:
        """Reconcile again when the first lagging proxy would be declared gone."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if deadline is not None:
            delay = max(0.0, deadline - now) + 0.01
            self._wake = asyncio.get_running_loop().call_later(delay, self._changed.set)

    def _fleet(self) -> ReplicaFleet:
        """The proxies this replica counts, as published for the others: node ids of its own
        streams, and a count per agent cluster (agents' proxies reconnect with their agent)."""
        clusters = {}
        if self._agents is not None:
            clusters = {name: len(session.proxies) for name, session in self._agents.sessions.items()}
        nodes = self._own.nodes()
        kept = self._fleet_sent
        if kept is not None and kept.nodes is nodes and kept.clusters == clusters:
            return kept  # the same object while nothing changed: compared by identity downstream
        self._fleet_sent = ReplicaFleet(clusters=clusters, nodes=nodes)
        return self._fleet_sent

    def _remember_silent(self, snap: Snapshot) -> None:
        """Replicas whose progress vanished (their lease expired: killed, stalled, cut off)
        stay in the fleet, as last published, until the stale-proxy timeout declares their
        proxies gone or they are seen reconnected elsewhere; one that comes back is counted
        from what it publishes again. A replica that left on purpose (its "left" record) is
        remembered the same way at once, without a warning: its proxies are reconnecting."""
        now = time.time()
        current = {i: p for i, p in snap.replica_progress.items() if not _left(snap, i)}
        for identity, progress in self._published.items():
            if identity in current or identity == self._identity or identity in self._silent:
                continue
            fleet = self._published_fleet.get(identity, ReplicaFleet())
            # Its `replicas/` key (node ids of proxies with an admin address) went with it too.
            nodes = fleet.nodes | {n.partition("@")[0] for n in self._published_nodes.get(identity, ())}
            left = _left(snap, identity)
            if left:
                log.info("replica %s left; its %d proxies count until they reconnect", identity, _size(fleet))
            else:
                log.warning(
                    "replica %s went silent (%d proxies: %s); they count as not converged for %gs"
                    " unless they reconnect",
                    identity,
                    _size(fleet),
                    ", ".join(sorted(nodes)[: views.NAMES_SHOWN]) or "agents' only",
                    self._stale_seconds,
                )
            already = self._connected_elsewhere(self._published_fleet, exclude=identity, before=self._seen_alive)
            self._silent[identity] = _Silent(progress, now, frozenset(nodes), dict(fleet.clusters), left, already)
        # Declared gone a stale period after they went (named as gone), forgotten after two.
        for identity in list(self._silent):
            if identity in current or now - self._silent[identity].at >= 2 * self._stale_seconds:
                del self._silent[identity]
        self._published = dict(current)
        self._seen_alive = now
        self._published_fleet = {i: f for i, f in snap.replica_fleet.items() if i in current}
        self._published_nodes = dict(snap.replica_nodes)
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None
        if self._silent:
            first = min(silent.at for silent in self._silent.values())
            delay = first + 2 * self._stale_seconds - now + 0.01
            self._silence_timer = asyncio.get_running_loop().call_later(delay, self._on_silence_due)

    def _on_silence_due(self) -> None:
        if self._snap is not None:
            self._remember_silent(self._snap)
        self._changed.set()

    def _with_other_replicas(
        self, release: str, local: views.Progress, fingerprint: str, since: float, now: float
    ) -> views.Progress:
        """`local` plus what the other replicas publish for `release`, and what silent ones
        last published. Proxies counted against another value of the target (a replica not
        caught up, or gone quiet) are lagging until the stale-proxy timeout, then gone."""
        snap = self._snap
        sources: list[tuple[str, ReplicaProgress, float]] = []  # (name, count, when it went quiet)
        for identity, progress in snap.replica_progress.items() if snap is not None else ():
            assert snap is not None
            if identity == self._identity or _left(snap, identity):
                continue
            counted = progress.get(release)
            if counted is None:
                # It has not counted this release yet (a new one, or it is behind): its
                # proxies are there all the same, and none is known to carry the release.
                size = _size(snap.replica_fleet.get(identity, ReplicaFleet()))
                if size == 0:
                    continue
                counted = ReplicaProgress("-", size, 0)
            sources.append((f"replica {identity}", counted, since))
        # A silent replica's proxies that reconnected (here or to a live replica) count there.
        for identity, silent, nodes, count in self._not_reconnected():
            counted = silent.progress.get(release)
            if counted is None:
                continue
            counted = replace(counted, proxies=min(count, counted.proxies), converged=min(count, counted.converged))
            names = f": {', '.join(nodes[: views.NAMES_SHOWN])}" if nodes else ""
            how = "left" if silent.left else "silent"
            sources.append((f"replica {identity} ({how} {now - silent.at:.0f}s ago{names})", counted, silent.at))
        proxies, converged, gone = local.proxies, local.converged, local.gone
        scoped_out = local.scoped_out
        lagging, gone_names = list(local.lagging), list(local.gone_names)
        deadline = local.next_deadline
        for name, counted, quiet in sources:
            due = min(since, quiet) + self._stale_seconds
            carrying = counted.converged if counted.lane == fingerprint else 0
            scoped_out += counted.scoped_out if counted.lane == fingerprint else 0
            behind = counted.proxies - carrying
            proxies += carrying
            converged += carrying
            if behind <= 0:
                continue
            if now >= due:
                gone += behind
                if len(gone_names) < views.NAMES_SHOWN:
                    gone_names.append(f"{_proxies(behind)} of {name}: not ACKed within {self._stale_seconds:g}s")
                continue
            proxies += behind
            deadline = due if deadline is None else min(deadline, due)
            if len(lagging) < views.NAMES_SHOWN:
                lagging.append(f"{_proxies(behind)} of {name}: not carrying it yet")
        return replace(
            local,
            proxies=proxies,
            converged=converged,
            lagging=tuple(lagging),
            gone=gone,
            gone_names=tuple(gone_names),
            next_deadline=deadline,
            scoped_out=scoped_out,
        )

    def _not_reconnected(self) -> list[tuple[str, _Silent, list[str], int]]:
        """Per silent (or left) replica: the node ids of its own proxies not connected again
        anywhere, and how many of its proxies (those and its agents') are not seen again.

        An agent cluster's proxies count as reconnected up to the number that cluster now
        reports here or at a live replica, each reconnected proxy used once."""
        if not self._silent:
            return []
        snap = self._snap
        live = [
            f
            for i, f in (snap.replica_fleet.items() if snap is not None else ())
            if i in self._published and i != self._identity
        ]
        connected = self._connected_elsewhere(
            {i: f for i, f in (snap.replica_fleet.items() if snap is not None else ()) if i in self._published},
            exclude=self._identity,
        )
        reported: dict[str, int] = {}
        for fleet in live:
            for name, count in fleet.clusters.items():
                reported[name] = reported.get(name, 0) + count
        for name, session in self._agents.sessions.items() if self._agents is not None else ():
            reported[name] = reported.get(name, 0) + len(session.proxies)
        found = []
        used: Counter[str] = Counter()
        for identity, silent in sorted(self._silent.items()):
            # A proxy is one stream: a silent replica's node counts as reconnected only for a
            # stream beyond those that already shared its node id, each such stream used once.
            nodes = []
            for node in sorted(silent.nodes):
                if connected[node] - silent.already[node] - used[node] > 0:
                    used[node] += 1
                else:
                    nodes.append(node)
            count = len(nodes)
            for name, was in sorted(silent.clusters.items()):
                back = min(was, reported.get(name, 0))
                reported[name] = reported.get(name, 0) - back
                count += was - back
                if was > back and len(nodes) < views.NAMES_SHOWN:
                    nodes.append(f"{was - back} of cluster {name}")
            found.append((identity, silent, nodes, count))
        return found

    def _connected_elsewhere(
        self, fleets: dict[str, ReplicaFleet], *, exclude: str, before: float | None = None
    ) -> Counter[str]:
        """Open streams per node id: this replica's own (those connected before `before`, when
        given) and one per node id each other replica in `fleets` publishes."""
        found: Counter[str] = Counter(
            p.node_id for p in self._tracker.proxies().values() if before is None or p.connected_at < before
        )
        for identity, fleet in fleets.items():
            if identity not in (exclude, self._identity):
                found.update(fleet.nodes)
        return found

    async def _write_progress(
        self,
        counted_on: model.Release,
        view: xv.RoutingView,
        p: views.Progress,
        fingerprint: str,
        *,
        fresh: float | None = None,
    ) -> tuple[model.Release | None, bool]:
        """Write `counted_on`'s convergence (`p`: every replica's count, made on that value of
        the release against `view`). Written only when this release's own numbers change.

        `fresh` (until when the target just moved): right after a move, "0 of the same N
        proxies, none rejecting" is what the move itself wrote (converged 0, not reached), so
        the names of the proxies yet to ACK wait until then, and the ACKs usually come first:
        the `reached` write is then the first one after the move. Returns the release written
        (or None) and whether a write was put off that way."""
        deferred = False

        def change(current: model.Release) -> StatusUpdate | None:
            if not views.followed(current):
                return None
            if views.target_of(current) != views.target_in(view, current):
                # The view predates this value of the release (a batch just changed):
                # ACKs of the old target must not count for the new one.
                return None
            if current.spec.lane != counted_on.spec.lane:
                return None  # counted for another lane: the next pass counts this one
            nonlocal deferred
            held = model.held(current.status)
            newly = not current.status.reached and not held and p.reached
            if not newly and fresh is not None and _implied_by_move(current.status, p):
                deferred = True
                return None
            status = replace(
                current.status,
                proxies=p.proxies,
                converged=p.converged,
                target_version=fingerprint,
                lagging=p.lagging,
                gone=p.gone,
                gone_names=p.gone_names,
                reached=current.status.reached or newly,
            )
            if not newly:
                return StatusUpdate(status)
            now = datetime.now(UTC)  # the pause counts from the instant the event records
            what = _target_words(current)
            status = replace(status, batch_reached=now, reason=f"{what} reached by {_proxies(p.proxies)}")
            details = {"proxies": str(p.proxies), "weight": str(model.served_weight_of(current.spec, current.status))}
            if p.gone:
                details["gone"] = str(p.gone)
                details["gone_names"] = "; ".join(p.gone_names)
            return StatusUpdate(
                status,
                action="reached",
                at=now,
                cause=Cause(
                    actor=ACTOR,
                    reason=f"every proxy serving the release ACKed {what}"
                    + (f" ({p.gone} declared gone: {'; '.join(p.gone_names)})" if p.gone else ""),
                    details=details,
                ),
            )

        written = await self._releases.update_status(counted_on.name, change)
        return written, deferred

    def _prune_handled(self) -> None:
        """Keep the handled-NACK keys of live streams and reporting agents only."""
        agents = {f"agent:{name}" for name in self._agents.sessions} if self._agents is not None else set()
        self._handled_nacks = {k for k in self._handled_nacks if k[0] in self._own or k[0] in agents}

    async def _handle_nacks(self, snap: Snapshot, proxies: list[ProxyStatus]) -> None:
        """Pause the releases whose lanes a rejected configuration introduced: for this
        replica's own proxies (`proxies`: those changed since they were last looked at) and
        for those the agents report from their clusters.

        A NACK counts as handled once its pause is written: a write that failed (etcd
        unreachable) raises out of the pass, and the next pass looks at it again (a pause
        already written is not written twice: `Releases.hold_for_nack` is idempotent)."""
        self._prune_handled()
        for proxy in proxies:
            nack = proxy.last_nack
            if nack is None or (proxy.stream, nack.nonce) in self._handled_nacks:
                continue
            record = model.Nack(
                node=proxy.node_id,
                type_url=nack.type_url,
                version=nack.version,
                message=nack.message,
                at=datetime.fromtimestamp(nack.at, UTC),
                stream=proxy.stream,
                cluster=proxy.cluster,
            )
            judged = self._serving.rejection(proxy)
            assert judged is not None  # (it holds a NACK)
            await self._hold_for_nack(
                snap, record, rejected=judged.rejected, accepted=judged.accepted, only=judged.services
            )
            self._handled_nacks.add((proxy.stream, nack.nonce))
        for found in self._agents.nacks() if self._agents is not None else ():
            # An agent's proxy: named with its cluster; each NACK (by its time) handled once.
            node = f"{found.cluster}/{found.node_id}"
            key = (
                f"agent:{found.cluster}",
                f"{found.node_id}@{found.nack.type_url}@{found.nack.version}@{found.nack.at.ToNanoseconds()}",  # noqa: E501
            )
            if key in self._handled_nacks:
                continue
            record = model.Nack(
                node=node,
                type_url=found.nack.type_url,
                version=found.nack.version,
                message=found.nack.message,
                at=found.nack.at.ToDatetime(tzinfo=UTC),
                cluster=found.cluster,
            )
            await self._hold_for_nack(snap, record, rejected=found.rejected, accepted=found.accepted, only=found.scope)
            self._handled_nacks.add(key)

    async def _hold_for_nack(
        self,
        snap: Snapshot,
        record: model.Nack,
        *,
        rejected: xv.RoutingView | None,
        accepted: xv.RoutingView | None,
        only: frozenset[str] | None = None,
    ) -> None:
        """Pause what the rejected configuration changed against the proxy's accepted one,
        held at the value the proxy accepted, so every proxy is served that value.

        A proxy that never accepted a configuration of that type (or rejected one this
        replica did not render) blames nothing: it cannot tell which lane it objects to, so
        it is shown as lagging with Envoy's message until the stale-proxy rule drops it.
        """
        if rejected is None or accepted is None:
            log.warning(
                "%s rejected %s %s with nothing accepted before to compare: shown as lagging, no release paused: %s",
                record.node,
                record.type_url,
                record.version,
                record.message,
            )
            return
        blamed = views.blame_nack(rejected, accepted)
        if only is not None:  # lanes that enter at or have a version of those services
            touching = (
                lane.name
                for lane in rejected.lanes
                if lane.entry in only or any(service in only for service, _version in lane.versions)
            )
            blamed &= frozenset(touching)
        for release in snap.releases:
            if release.spec.lane in blamed and views.routed(release):
                lane = views.lanes_by_name(accepted).get(release.spec.lane)
                await self._releases.hold_for_nack(
                    release.name,
                    record,
                    held_batch=views.accepted_batch(release, accepted),
                    held_lane=views.held_lane_from(lane) if lane is not None else None,
                    cause=Cause(actor=ACTOR),
                )


class _OwnProxies:
    """This replica's own streams as convergence counts them, grouped by the route version
    each ACKed, kept up to date from the streams the tracker changed since the last read.

    A pass then costs what changed (at 10,000 streams, rebuilding every proxy's facts on
    every pass held the loop for most of each change); a group's view is looked up by its
    version on each read, so a view remembered or forgotten since is seen at once.
    """

    def __init__(self, tracker: ProxyTracker) -> None:
        self._tracker = tracker
        self._seq: int | None = None  # the tracker's sequence last read (None: never)
        # stream -> (group, facts, node, scope or None); a group is the route version ACKed,
        # with the scope for a scoped proxy (`scoped_key(version, scope)`)
        self._proxies: dict[str, tuple[str, views.ProxyFacts, str, Scope | None]] = {}
        self._groups: dict[str, views.ProxyGroup] = {}  # group ("": none ACKed) -> its streams
        # route version -> the content versions it holds (what a proxyless client's part is)
        self._parts: dict[str, Mapping[str, str]] = {}
        self._nodes: tuple[int, frozenset[str]] | None = None  # (tracker membership, node ids)
        self._node_streams: Counter[str] = Counter()  # node id -> its streams here

    def __contains__(self, stream: object) -> bool:
        return stream in self._proxies

    def __len__(self) -> int:
        return len(self._proxies)

    def refresh(self) -> tuple[bool, list[str]]:
        """Take in the tracker's changes: whether any stream's facts changed, and the
        changed streams that hold a NACK."""
        tracker = self._tracker
        seq = tracker.seq
        if seq == self._seq:
            return False, []
        changed = tracker.changed_since(self._seq) if self._seq is not None else None
        if changed is None:  # first read, or too far behind: everything
            changed = [*tracker.proxies(), *self._proxies]
        self._seq = seq
        moved = False
        nacked = []
        for stream in changed:
            # Read without building the stream's frozen status: only its first sight does.
            version = tracker.acked_version(stream, ROUTE)
            nack = tracker.last_nack(stream)
            if self._set(stream, version, nack.message if nack is not None else ""):
                moved = True
            if nack is not None:
                nacked.append(stream)
        return moved, nacked

    def _set(self, stream: str, version: str | None, problem: str) -> bool:
        """Stream `stream` now holds route `version` (None: it ended) with NACK message `problem`."""
        old = self._proxies.get(stream)
        if version is None:
            if old is None:
                return False
            del self._proxies[stream]
            self._leave(old[0], stream)
            self._node_streams[old[2]] -= 1
            if not self._node_streams[old[2]]:
                del self._node_streams[old[2]]
            return True
        if old is not None:
            scope = old[3]
            version = scoped_key(version, scope)  # (not ACKed yet: "@scope", its own group)
            if old[0] == version and old[1].problem == problem:
                return False
            self._leave(old[0], stream)
            name, since, node = old[1].name, old[1].since, old[2]
        else:
            status = self._tracker.get(stream)
            assert status is not None  # open: it has a version
            name, since, node = _proxy_name(status), status.connected_at, status.node_id
            scope = parse_scoped_key(status.key)[1]
            version = scoped_key(version, scope)  # (not ACKed yet: "@scope", its own group)
            self._node_streams[node] += 1
        # `carried` is the group's (looked up by version on each read), not the member's.
        facts = views.ProxyFacts(name=name, carried=None, since=since, problem=problem)
        group = self._groups.get(version)
        if group is None:
            group = self._groups[version] = views.ProxyGroup(scope=scope)
            self._parts[version] = self._tracker.acked_resources(stream, ROUTE)
        group.add(stream, facts)
        self._proxies[stream] = (version, facts, node, scope)
        return True

    def _leave(self, version: str, stream: str) -> None:
        group = self._groups[version]
        group.remove(stream)
        if not len(group):
            del self._groups[version]
            self._parts.pop(version, None)

    def groups(self, carried: Callable[[str, Mapping[str, str]], xv.RoutingView | None]) -> list[views.ProxyGroup]:
        """The groups, each with the view its route version names now (`carried(version,
        the content versions it holds)`)."""
        found = []
        for version, group in self._groups.items():
            group.carried = carried(version, self._parts.get(version, {})) if version else None
            found.append(group)
        return found

    def nodes(self) -> frozenset[str]:
        """The node ids of the streams as last refreshed (made again only when one opened or ended)."""
        membership = self._tracker.membership
        if self._nodes is None or self._nodes[0] != membership:
            self._nodes = (membership, frozenset(self._node_streams))
        return self._nodes[1]


# How long after a release's target moves its "0 of N converged" status is taken as said by
# the move itself (the names of the proxies yet to ACK are written after it, if still due).
_MOVE_GRACE_SECONDS = 0.5


# A count that only grew (more proxies converged, not all yet) is published at most this often.
_PROGRESS_INTERVAL_SECONDS = 0.25


def _only_grew(before: dict[str, ReplicaProgress], after: dict[str, ReplicaProgress]) -> bool:
    """Whether `after` differs from `before` only by converged counts that grew and are
    still short of their proxies (the same releases, targets and proxy counts)."""
    if before.keys() != after.keys():
        return False
    for name, now in after.items():
        was = before[name]
        if (
            now.lane != was.lane
            or (now.proxies, now.scoped_out) != (was.proxies, was.scoped_out)
            or now.converged < was.converged
        ):
            return False
        if now.converged != was.converged and now.converged >= now.proxies:
            return False
    return True


def _converging(written: tuple[float, str, views.Progress], fingerprint: str, p: views.Progress, now: float) -> bool:
    """Whether `p` only adds converged proxies to the count last `written` (same target,
    proxies, gone and rejecting; not reached) within the write interval: a status that may
    wait, as it says less than the ACKs show, never more."""
    at, target, was = written
    return (
        now < at + _PROGRESS_INTERVAL_SECONDS
        and target == fingerprint
        and not p.reached
        and p.converged >= was.converged
        and (p.proxies, p.gone, p.rejecting) == (was.proxies, was.gone, was.rejecting)
    )


def _implied_by_move(status: model.ReleaseStatus, p: views.Progress) -> bool:
    """Whether `p` says nothing the status a move wrote does not: none converged of the same
    number of proxies, none gone, none rejecting."""
    return (
        not status.reached
        and status.converged == 0
        and status.gone == 0
        and p.converged == 0
        and p.gone == 0
        and p.rejecting == 0
        and p.proxies == status.proxies
    )


@dataclass(frozen=True, slots=True)
class _Count:
    """One release's count, and the values it was made from (a pass reuses it while they
    are the same objects and no lagging proxy's stale deadline has passed)."""

    release: model.Release
    view: xv.RoutingView
    effective: xv.RoutingView
    facts_seq: int
    progress: views.Progress
    fingerprint: str
    since: float
    want: views.Target  # the target `fingerprint` digests


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


# (the count of a release every proxy carries as intended, lane names it does not hold for)
_Uniform = tuple[views.Progress, frozenset[str]]


def _lanes_differ(a: xv.RoutingView, b: xv.RoutingView) -> set[str]:
    """Names of the lanes that differ between two views (the views share every unchanged
    `Lane` object, so most compare by identity)."""
    if a is b or a.lanes is b.lanes:
        return set()
    in_a, in_b = views.lanes_by_name(a), views.lanes_by_name(b)
    differ = {name for name, lane in in_a.items() if (other := in_b.get(name)) is not lane and other != lane}
    differ.update(in_b.keys() - in_a.keys())
    return differ


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
    """What `views.build_view` reads of one release: its served lane and its placement."""
    if not isinstance(release, model.Release):
        return None
    lane = views.served_lane(release)
    if lane is None:
        return None
    return (lane, release.spec.gray_clusters, release.spec.services)


@dataclass(frozen=True, slots=True)
class _Silent:
    """A replica whose published progress vanished (or that left): what it last published,
    when it went, the node ids of its own proxies, its agents' proxies per cluster, and
    whether it said it left."""

    progress: dict[str, ReplicaProgress]
    at: float
    nodes: frozenset[str]
    clusters: dict[str, int]
    left: bool = False
    # Streams per node id connected elsewhere (here or at live replicas) while it was still
    # alive: those are other proxies that happen to share a node id, never its reconnections.
    already: Counter[str] = field(default_factory=Counter)


def _left(snap: Snapshot, identity: str) -> bool:
    fleet = snap.replica_fleet.get(identity)
    return fleet is not None and fleet.left


def _size(fleet: ReplicaFleet) -> int:
    return sum(fleet.clusters.values()) + len(fleet.nodes)


def _proxy_name(p: ProxyStatus) -> str:
    return f"{p.node_id} (cluster {p.cluster or '-'}, stream {p.stream})"


def _target_words(release: model.Release) -> str:
    phase = release.status.phase
    if phase is model.Phase.ROLLED_BACK:
        return "the rollback (lane drained: no request admitted)"
    if phase is model.Phase.SUCCEEDED:
        return "the promotion (gray version stable, lane removed)"
    if phase is model.Phase.FAILED:
        return "the failure (lane drained: no request admitted)"
    # 1-based over the count, as `graylane status` shows it (the API's `batch` is 0-based).
    return f"batch {release.status.batch + 1}/{len(release.spec.batches)}"


def _proxies(n: int) -> str:
    return f"{n} proxy" if n == 1 else f"{n} proxies"
