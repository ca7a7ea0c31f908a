"""Convergence: which proxies serve each live release's current target, written as its status.

Owns the counting pass of one replica: whenever a proxy ACKs or NACKs (the xDS tracker), an
agent reports, or the view changes, count per followed release the proxies carrying its
current target (this replica's own streams, grouped by the route version each ACKed, and
its agents' proxies), with the stale-proxy rule (a proxy that has not carried a target
`stale_seconds` after it appeared is declared gone); hand that count to the other replicas
(`progress.ProgressPublisher`), and, on the leader, add theirs (`progress.OtherReplicas`)
and write each release's convergence (`reached` once every proxy carries it) through
`Releases.update_status`. A NACK found on the way goes to the NACK policy (`nacks`) first.

Incremental: a release is counted again only when its value, the view or the proxy facts
changed since its last count, and written only when its numbers change (a count that only
grows is written at most every `PROGRESS_INTERVAL_SECONDS`). A batch just reached is written
first; count-only writes go on for `_WRITE_SLICE_SECONDS` of a pass, and the rest are the
next pass's, so a `reached` never waits behind a whole fleet's worth of count changes.

Concurrency: one asyncio loop; `reconcile` is one pass, run by `DataPlane`'s proxy
follower, which retries it on any error (nothing here ends a loop).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from graylane.controlplane.api.agent_service import AgentHub
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Cause
from graylane.controlplane.domain.releases import Releases, StatusUpdate
from graylane.controlplane.reconcile import views
from graylane.controlplane.reconcile.nacks import NackPolicy
from graylane.controlplane.reconcile.progress import (
    PROGRESS_INTERVAL_SECONDS,
    OtherReplicas,
    ProgressPublisher,
    n_proxies,
)
from graylane.controlplane.store import ReplicaFleet, ReplicaProgress, Snapshot
from graylane.xds import view as xv
from graylane.xds.local import LocalServing
from graylane.xds.resources import ROUTE
from graylane.xds.scope import Scope, parse_scoped_key, scoped_key
from graylane.xds.tracker import ProxyStatus, ProxyTracker


class Convergence:
    def __init__(
        self,
        releases: Releases,
        tracker: ProxyTracker,
        serving: LocalServing[xv.RoutingView],
        *,
        actor: str,
        wake: Callable[[], None],
        agents: AgentHub | None = None,
        identity: str = "",
        is_leader: Callable[[], bool] | None = None,
        on_progress: Callable[[dict[str, ReplicaProgress], ReplicaFleet], None] | None = None,
        stale_seconds: float,
    ) -> None:
        self._releases = releases
        self._tracker = tracker
        self._serving = serving  # the view in force, and the views behind proxies' ACKs
        self._actor = actor
        self._poke = wake  # run a pass again (a deadline came)
        self._agents = agents
        self._identity = identity
        # Several replicas: each publishes what it counts (`on_progress`), and the leader
        # alone writes status from its own count plus the others' (None: a lone replica).
        self._is_leader = is_leader
        self._publisher = ProgressPublisher(on_progress, agents) if on_progress is not None else None
        self._nacks = NackPolicy(releases, serving, actor=actor, agents=agents)
        # The store snapshot and the effective view last applied (set together with the
        # view in `serving`: a pass never counts a release against a view older than its value).
        self._snap: Snapshot | None = None
        self._effective: xv.RoutingView | None = None
        # Stale-proxy rule: a proxy that has not carried a release's target this long after
        # the target appeared (or the proxy connected) is declared gone for its convergence.
        self._stale_seconds = stale_seconds
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
        self._written: dict[
            str, tuple[float, str, views.Progress]
        ] = {}  # release -> (when, target, count) last written
        self._counts: dict[str, _Count] = {}
        # release -> (the count, its fingerprint, what was published of them)
        self._published: dict[str, tuple[views.Progress, str, ReplicaProgress]] = {}
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
        # Other replicas' counts (and those gone silent), merged into each release's.
        self._replicas = OtherReplicas(
            tracker, identity=identity, agents=agents, stale_seconds=stale_seconds, on_due=wake
        )

    def applied(self, snap: Snapshot, changed_releases: Iterable[str] | None) -> None:
        """`snap` is the store's state from now on (`changed_releases`: the releases the
        watch batch leading to it changed; None: a full read). Noted with the snapshot they
        lead to: a pass may run while the next view is built."""
        self._snap = snap
        if changed_releases is None:
            self._releases_changed = None
        elif self._releases_changed is not None:
            self._releases_changed.update(changed_releases)
        self._replicas.remember(snap)

    def installed(self, effective: xv.RoutingView) -> None:
        """The view just installed in `serving` has this effective view (set in the same
        loop step as the view and the snapshot it was built from)."""
        self._effective = effective

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
        if self._snap is None or self._serving.view is None or self._effective is None:
            return
        facts_seq = await self._refresh_facts()
        # Taken after the facts, which may yield: the three are set in one loop step.
        snap, view, effective = self._snap, self._serving.view, self._effective
        if snap is None or view is None or effective is None:
            return
        if self._nack_streams:
            found = (self._tracker.get(stream) for stream in sorted(self._nack_streams))
            await self._nacks.handle(snap, [p for p in found if p is not None], own=self._own)
            self._nack_streams.clear()  # kept when handling failed: looked at again next pass
        elif self._agents is not None and self._agents.sessions:
            await self._nacks.handle(snap, [], own=self._own)
        now = time.time()
        followed = self._followed_releases(snap)
        if followed.keys() != self._counted_names:
            names = self._counted_names = frozenset(followed)
            self._targets = {n: t for n, t in self._targets.items() if n in names}
            self._counts = {n: c for n, c in self._counts.items() if n in names}
            self._settled = {n: c for n, c in self._settled.items() if n in names}
            self._written = {n: w for n, w in self._written.items() if n in names}
            self._published = {n: m for n, m in self._published.items() if n in names}
        # Lanes every proxy's view carries as `view` has them: a release there is counted
        # whole without looking at it (None: some proxy carries no known view).
        uniform = self._uniform(view, effective, facts_seq)
        others = self._replicas.any_other(snap)
        leading = self._is_leader is None or self._is_leader()
        deadlines: list[float] = []
        # This replica's count per followed release, made once: published, and summed by the leader.
        counted: dict[str, tuple[views.Progress, str, float]] = {}
        due: list[tuple[bool, str, model.Release, views.Target, views.Progress]] = []
        for name, r in followed.items():
            kept = self._counts.get(name)
            # (the same value against the same view asks for the same target: a pass after an
            # ACK, the view unchanged, looks up no lane; 100 live releases cost ~0.3 ms a pass)
            want = (
                kept.want if kept is not None and kept.release is r and kept.view is view else views.target_in(view, r)
            )
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
            total = self._replicas.merged(name, progress, fp, since, now) if others else progress
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
        writes: list[tuple[bool, str, model.Release, views.Target, views.Progress, str, float | None]] = []
        for count_only, name, release, want, total in due:
            _, fingerprint, since = counted[name]
            fresh_until = since + _MOVE_GRACE_SECONDS if now < since + _MOVE_GRACE_SECONDS else None
            written = self._written.get(name)
            if written is not None and _converging(written, fingerprint, total, now):
                # Only more proxies carry it, not all yet: that count is written at most every
                # PROGRESS_INTERVAL_SECONDS (a fleet's ACKs moved it on every pass, and each
                # write is an etcd transaction every replica's watch reads back).
                deadlines.append(written[0] + PROGRESS_INTERVAL_SECONDS)
                continue
            writes.append((count_only, name, release, want, total, fingerprint, fresh_until))
        began = time.perf_counter()
        for i, (count_only, name, release, want, total, fingerprint, fresh_until) in enumerate(writes):
            if count_only and i and time.perf_counter() - began > _WRITE_SLICE_SECONDS:
                # The rest are counts only (a batch just reached is written first): left to
                # the next pass, run at once. Each write is an etcd round trip, and when a
                # proxy comes or goes every live release's count changes: 100 of them held
                # one pass 0.3-0.9 s, and a `reached` that an ACK made due meanwhile waited
                # for all of them; the next pass puts it first.
                self._poke()
                break
            updated, deferred = await self._write_progress(release, view, total, fingerprint, fresh=fresh_until)
            if deferred and fresh_until is not None:
                deadlines.append(fresh_until)
            elif updated is None:
                self._settled[name] = (release, want, total)
            else:
                self._written[name] = (now, fingerprint, total)
        # Published after this pass's status writes: another replica reads it only once it
        # leads, and the transaction would otherwise queue at etcd beside a `reached` write.
        if self._publisher is not None:
            mine = {}
            for name, (p, fp, _) in counted.items():
                # The same object while the count is (the publisher compares the dicts: by
                # identity first), made again only for releases counted anew.
                made = self._published.get(name)
                if made is None or made[0] is not p or made[1] != fp:
                    made = self._published[name] = (p, fp, ReplicaProgress(fp, p.proxies, p.converged, p.scoped_out))
                mine[name] = made[2]
            held_until = self._publisher.publish(mine, self._own.nodes(), now)
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

    async def _refresh_facts(self) -> int:
        """Bring the proxy facts (grouped by carried view) up to date: this replica's streams
        from what the tracker changed since the last pass, the views their route versions
        name, and the agents' proxies; return the facts' sequence (it moves on each change).

        The streams are read `_FACTS_SLICE_SECONDS` of the loop at a time: after a fan-out
        a pass finds up to every stream changed (10,000 at fleet size, ~25 ms of CPU), and
        the loop gets a step between slices. The pass counts once all the streams changed
        by its start are read (those changing meanwhile are the next pass's)."""
        moved, nacked = self._own.refresh(until=time.perf_counter() + _FACTS_SLICE_SECONDS)
        self._nack_streams.update(nacked)
        while self._own.behind:
            await asyncio.sleep(0)
            more, nacked = self._own.refresh(until=time.perf_counter() + _FACTS_SLICE_SECONDS, take_new=False)
            moved = moved or more
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

    def _wake_at(self, deadline: float | None, now: float) -> None:
        """Reconcile again when the first lagging proxy would be declared gone."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if deadline is not None:
            delay = max(0.0, deadline - now) + 0.01
            self._wake = asyncio.get_running_loop().call_later(delay, self._poke)

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
            status = replace(status, batch_reached=now, reason=f"{what} reached by {n_proxies(p.proxies)}")
            details = {"proxies": str(p.proxies), "weight": str(model.served_weight_of(current.spec, current.status))}
            if p.gone:
                details["gone"] = str(p.gone)
                details["gone_names"] = "; ".join(p.gone_names)
            return StatusUpdate(
                status,
                action="reached",
                at=now,
                cause=Cause(
                    actor=self._actor,
                    reason=f"every proxy serving the release ACKed {what}"
                    + (f" ({p.gone} declared gone: {'; '.join(p.gone_names)})" if p.gone else ""),
                    details=details,
                ),
            )

        written = await self._releases.update_status(counted_on.name, change)
        return written, deferred


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
        # Changed streams not read yet (a refresh ran out of time): `_left[_next:]`.
        self._left: list[str] = []
        self._next = 0

    def __contains__(self, stream: object) -> bool:
        return stream in self._proxies

    def __len__(self) -> int:
        return len(self._proxies)

    @property
    def behind(self) -> bool:
        """Whether a refresh stopped with changed streams left to read."""
        return self._next < len(self._left)

    def refresh(self, *, until: float = math.inf, take_new: bool = True) -> tuple[bool, list[str]]:
        """Take in the tracker's changes: whether any stream's facts changed, and the
        changed streams that hold a NACK.

        Stops once `time.perf_counter()` passes `until` (looked at every `_CLOCK_EVERY`
        streams), the rest left for the next call (`behind`); `take_new=False` reads only
        those, not what changed since. Reading a stream twice is harmless: each read takes
        its state now (an ended stream leaves)."""
        tracker = self._tracker
        if take_new and tracker.seq != self._seq:
            changed = tracker.changed_since(self._seq) if self._seq is not None else None
            if changed is None:  # first read, or too far behind: everything
                changed = [*tracker.proxies(), *self._proxies]
            self._seq = tracker.seq
            self._left = self._left[self._next :] + changed if self.behind else changed
            self._next = 0
        left, start = self._left, self._next
        end = len(left)
        moved = False
        nacked = []
        for i in range(start, len(left)):
            if i > start and (i - start) % _CLOCK_EVERY == 0 and time.perf_counter() > until:  # (one read at least)
                end = i
                break
            stream = left[i]
            # Read without building the stream's frozen status: only its first sight does.
            version = tracker.acked_version(stream, ROUTE)
            nack = tracker.last_nack(stream)
            if self._set(stream, version, nack.message if nack is not None else ""):
                moved = True
            if nack is not None:
                nacked.append(stream)
        if end == len(left):
            self._left, self._next = [], 0
        else:
            self._next = end
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
            node, facts = old[2], old[1]
            if facts.problem != problem:  # else the same facts, in a new group (one ACK per change)
                facts = views.ProxyFacts(name=facts.name, carried=None, since=facts.since, problem=problem)
        else:
            status = self._tracker.get(stream)
            assert status is not None  # open: it has a version
            node = status.node_id
            scope = parse_scoped_key(status.key)[1]
            version = scoped_key(version, scope)  # (not ACKed yet: "@scope", its own group)
            self._node_streams[node] += 1
            # `carried` is the group's (looked up by version on each read), not the member's.
            facts = views.ProxyFacts(name=_proxy_name(status), carried=None, since=status.connected_at, problem=problem)
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


# A pass goes on to another count-only status write only this long after its first write
# began (the rest wait for the next pass, which runs at once): the longest a `reached` that
# became due meanwhile waits, besides the write under way.
_WRITE_SLICE_SECONDS = 0.02

# A pass reads changed streams for this long of the loop at a time (`_refresh_facts`);
# the clock is looked at every `_CLOCK_EVERY` streams (~1 us of CPU each, a few per stream).
_FACTS_SLICE_SECONDS = 0.01
_CLOCK_EVERY = 64

# How long after a release's target moves its "0 of N converged" status is taken as said by
# the move itself (the names of the proxies yet to ACK are written after it, if still due).
_MOVE_GRACE_SECONDS = 0.5


def _converging(written: tuple[float, str, views.Progress], fingerprint: str, p: views.Progress, now: float) -> bool:
    """Whether `p` only adds converged proxies to the count last `written` (same target,
    proxies, gone and rejecting; not reached) within the write interval: a status that may
    wait, as it says less than the ACKs show, never more."""
    at, target, was = written
    return (
        now < at + PROGRESS_INTERVAL_SECONDS
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
