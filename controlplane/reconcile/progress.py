"""What the replicas count of their proxies: this replica's count published, the others' merged in.

Owns: handing this replica's count per followed release (and the fleet it counted: node
ids of its own streams, proxies per agent cluster) to the writer of `progress/<identity>`
(`ReplicaRegistry`), held back while it only grows; and, on every replica, merging what
the other replicas publish into a release's count, keeping a replica that went silent (its
lease expired) or left on purpose in the fleet, as it last published, until its proxies
are seen reconnected or the stale-proxy timeout declares them gone.

Concurrency: one asyncio loop (the replica's); a timer wakes the convergence pass when a
silent replica is to be forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field, replace

from graylane.controlplane.api.agent_service import AgentHub
from graylane.controlplane.reconcile import views
from graylane.controlplane.store import ReplicaFleet, ReplicaProgress, Snapshot
from graylane.xds.tracker import ProxyTracker

log = logging.getLogger(__name__)


# A count that only grew (more proxies converged, not all yet) is published, and written as a
# release's status (`convergence`), at most this often.
PROGRESS_INTERVAL_SECONDS = 0.25
# ...and this replica's own record, which lists every node id it serves, at most every
# PROGRESS_INTERVAL_SECONDS or this long per node, whichever is longer (1 s at 10,000
# streams): each write is encoded here and decoded again by every replica's watch, ~1 ms
# per 1,000 nodes each way, and a growing count is all it would carry.
_PUBLISH_SECONDS_PER_NODE = 0.0001


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


class ProgressPublisher:
    """This replica's count, handed to `on_progress` (it writes `progress/<identity>`)."""

    def __init__(
        self, on_progress: Callable[[dict[str, ReplicaProgress], ReplicaFleet], None], agents: AgentHub | None
    ) -> None:
        self._on_progress = on_progress
        self._agents = agents
        self._sent: tuple[dict[str, ReplicaProgress], ReplicaFleet, float] | None = None
        self._fleet_kept: ReplicaFleet | None = None

    def publish(self, progress: dict[str, ReplicaProgress], nodes: frozenset[str], now: float) -> float | None:
        """Hand this replica's count to `on_progress` (it writes it to etcd for the leader):
        at once when anything but a converged count moved, or when a release became fully
        converged here; a count that only grew towards it at most every
        `PROGRESS_INTERVAL_SECONDS`, longer for a large fleet (a fleet's ACKs move it on
        every pass, and each write carries every node id: `_PUBLISH_SECONDS_PER_NODE`).
        Returns when to publish what was held back (None: nothing).

        Held back, the published count is behind in the safe direction only: fewer
        converged of the same proxies and targets, so no replica reads more than ACKs show."""
        fleet = self._fleet(nodes)
        last = self._sent
        if last is not None and last[0] == progress and last[1] is fleet:
            return None
        interval = max(PROGRESS_INTERVAL_SECONDS, len(nodes) * _PUBLISH_SECONDS_PER_NODE)
        due = last[2] + interval if last is not None else now
        if last is not None and now < due and _only_grew(last[0], progress) and last[1] is fleet:
            return due
        self._on_progress(progress, fleet)
        self._sent = (progress, fleet, now)
        return None

    def _fleet(self, nodes: frozenset[str]) -> ReplicaFleet:
        """The proxies this replica counts, as published for the others: node ids of its own
        streams, and a count per agent cluster (agents' proxies reconnect with their agent)."""
        clusters = {}
        if self._agents is not None:
            clusters = {name: len(session.proxies) for name, session in self._agents.sessions.items()}
        kept = self._fleet_kept
        if kept is not None and kept.nodes is nodes and kept.clusters == clusters:
            return kept  # the same object while nothing changed: compared by identity downstream
        self._fleet_kept = ReplicaFleet(clusters=clusters, nodes=nodes)
        return self._fleet_kept


@dataclass(eq=False)
class OtherReplicas:
    """The other replicas' counts as last read from the store, and those gone silent."""

    tracker: ProxyTracker
    _: KW_ONLY
    identity: str
    agents: AgentHub | None
    stale_seconds: float
    on_due: Callable[[], None]  # a silent replica's time is up: count again
    _snap: Snapshot | None = field(init=False, default=None)  # the last snapshot remembered
    # Other replicas' progress (and fleets) as last read, and those that went silent or
    # left since (with when).
    _published: dict[str, dict[str, ReplicaProgress]] = field(init=False, default_factory=dict)
    _published_fleet: dict[str, ReplicaFleet] = field(init=False, default_factory=dict)
    _seen_alive: float = field(init=False, default=0.0)  # when the replicas in `_published` were last seen publishing
    _silent: dict[str, _Silent] = field(init=False, default_factory=dict)
    _published_nodes: dict[str, frozenset[str]] = field(init=False, default_factory=dict)
    _silence_timer: asyncio.TimerHandle | None = field(init=False, default=None)

    def any_other(self, snap: Snapshot) -> bool:
        """Whether any other replica publishes a count, or one gone silent is still kept."""
        return bool(self._silent) or any(i != self.identity for i in snap.replica_progress)

    def remember(self, snap: Snapshot) -> None:
        """Replicas whose progress vanished (their lease expired: killed, stalled, cut off)
        stay in the fleet, as last published, until the stale-proxy timeout declares their
        proxies gone or they are seen reconnected elsewhere; one that comes back is counted
        from what it publishes again. A replica that left on purpose (its "left" record) is
        remembered the same way at once, without a warning: its proxies are reconnecting."""
        self._snap = snap
        now = time.time()
        current = {i: p for i, p in snap.replica_progress.items() if not _left(snap, i)}
        for identity, progress in self._published.items():
            if identity in current or identity == self.identity or identity in self._silent:
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
                    self.stale_seconds,
                )
            already = self._connected_elsewhere(self._published_fleet, exclude=identity, before=self._seen_alive)
            self._silent[identity] = _Silent(progress, now, frozenset(nodes), dict(fleet.clusters), left, already)
        # Declared gone a stale period after they went (named as gone), forgotten after two.
        for identity in list(self._silent):
            if identity in current or now - self._silent[identity].at >= 2 * self.stale_seconds:
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
            delay = first + 2 * self.stale_seconds - now + 0.01
            self._silence_timer = asyncio.get_running_loop().call_later(delay, self._on_silence_due)

    def _on_silence_due(self) -> None:
        if self._snap is not None:
            self.remember(self._snap)
        self.on_due()

    def merged(self, release: str, local: views.Progress, fingerprint: str, since: float, now: float) -> views.Progress:
        """`local` plus what the other replicas publish for `release`, and what silent ones
        last published. Proxies counted against another value of the target (a replica not
        caught up, or gone quiet) are lagging until the stale-proxy timeout, then gone."""
        snap = self._snap
        sources: list[tuple[str, ReplicaProgress, float]] = []  # (name, count, when it went quiet)
        for identity, progress in snap.replica_progress.items() if snap is not None else ():
            assert snap is not None
            if identity == self.identity or _left(snap, identity):
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
            due = min(since, quiet) + self.stale_seconds
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
                    gone_names.append(f"{n_proxies(behind)} of {name}: not ACKed within {self.stale_seconds:g}s")
                continue
            proxies += behind
            deadline = due if deadline is None else min(deadline, due)
            if len(lagging) < views.NAMES_SHOWN:
                lagging.append(f"{n_proxies(behind)} of {name}: not carrying it yet")
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
            if i in self._published and i != self.identity
        ]
        connected = self._connected_elsewhere(
            {i: f for i, f in (snap.replica_fleet.items() if snap is not None else ()) if i in self._published},
            exclude=self.identity,
        )
        reported: dict[str, int] = {}
        for fleet in live:
            for name, count in fleet.clusters.items():
                reported[name] = reported.get(name, 0) + count
        for name, session in self.agents.sessions.items() if self.agents is not None else ():
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
            p.node_id for p in self.tracker.proxies().values() if before is None or p.connected_at < before
        )
        for identity, fleet in fleets.items():
            if identity not in (exclude, self.identity):
                found.update(fleet.nodes)
        return found


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


def n_proxies(n: int) -> str:
    return f"{n} proxy" if n == 1 else f"{n} proxies"
