"""Which proxies each replica serves, and how far they are, published in etcd for the leader.

Owns: writing, under a lease this replica keeps alive, `replicas/<identity>` (node id ->
admin address of every proxy connected to this replica), so the leader can read every
proxy's statistics wherever the proxy is connected, and `progress/<identity>` (per live
release: how many of the proxies this replica serves, its own and its agents', carry the
release's lane; and which proxies those are, as a count per agent cluster and the node ids
of its own streams), so the leader counts convergence over every replica and recognises a
gone replica's proxies where they reconnect; and `traffic/<identity>` (its own proxies'
request counters, handed over by `TrafficReader.publish`), so GetTraffic on any replica
sums them. A replica that dies takes its entries with it; one that stops on purpose
replaces its progress with a short-lived "left" record (its proxies are reconnecting
elsewhere) in the step that revokes its lease. Written when they
change; the lease is refreshed every `refresh_seconds`.

Concurrency: one asyncio loop; `run()` is cancellable and survives every etcd failure: a
lease that expired while the process stalled is replaced and the keys written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field

from graylane.controlplane.errors import GraylaneError, LeaseLost
from graylane.controlplane.reconcile.traffic import admin_addresses
from graylane.controlplane.store import ReplicaFleet, ReplicaProgress, ReplicaStore, ReplicaTraffic, TrafficCounts
from graylane.xds.tracker import ProxyTracker

log = logging.getLogger(__name__)

_LEASE_LOST_PAUSE_SECONDS = 0.1
_LEAVE_SECONDS = 2.0  # a clean stop spends at most this saying that it left
# The proxy list is written at most this often: while a fleet connects, streams open every
# millisecond, and each write lists (and encodes) every proxy of this replica.
_PROXIES_MIN_INTERVAL = 0.5


def _size(fleet: ReplicaFleet) -> int:
    return sum(fleet.clusters.values()) + len(fleet.nodes)


@dataclass(eq=False)
class ReplicaRegistry:
    store: ReplicaStore
    tracker: ProxyTracker
    _: KW_ONLY
    identity: str
    ttl_seconds: int = 5
    refresh_seconds: float = 1.0
    _progress: tuple[dict[str, ReplicaProgress], ReplicaFleet] = field(
        init=False, default_factory=lambda: ({}, ReplicaFleet())
    )
    _progress_changed: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _traffic: ReplicaTraffic | None = field(init=False, default=None)
    _lease: int = field(init=False, default=0)  # the lease last granted (revoked on a clean stop)

    def set_progress(self, progress: dict[str, ReplicaProgress], fleet: ReplicaFleet | None = None) -> None:
        """This replica's counts per live release and the proxies it counts (written by
        `run()` when they change)."""
        fleet = fleet or ReplicaFleet()
        if (progress, fleet) != self._progress:
            self._progress = (dict(progress), fleet)
            self._progress_changed.set()

    def set_traffic(self, counts: TrafficCounts, nodes: frozenset[str], at: float) -> None:
        """This replica's proxies' summed counters, the node ids they come from and when they
        were read (written by `run()`; the caller hands them over only when they changed, at
        most every few seconds, which bounds the writes)."""
        self._traffic = ReplicaTraffic(counts=counts, nodes=nodes, at=at)
        self._progress_changed.set()

    async def _leave(self, lease: int) -> None:
        """Stopping on purpose: say so (what it counted, marked `left`, under a lease of its
        own that outlives this one by a TTL, so the leader sees it) and revoke the lease."""
        fleet = self._progress[1]
        marker = await self.store.grant_lease(self.ttl_seconds)
        await self.store.put_replica_progress(
            self.identity, {}, marker, fleet=ReplicaFleet(clusters=fleet.clusters, nodes=fleet.nodes, left=True)
        )
        await self.store.revoke_lease(lease)
        log.info("%s left: its %d proxies reconnect to other replicas", self.identity, _size(fleet))

    async def run(self) -> None:
        try:
            await self._publish()
        finally:
            if self._lease:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_LEAVE_SECONDS):
                        await asyncio.shield(self._leave(self._lease))

    async def _publish(self) -> None:
        lease = 0
        seen = -1
        written: Mapping[str, str] | None = None
        written_progress: tuple[dict[str, ReplicaProgress], ReplicaFleet] | None = None
        written_traffic: ReplicaTraffic | None = None
        refreshed = 0.0
        proxies_written_at = -_PROXIES_MIN_INTERVAL
        loop = asyncio.get_running_loop()
        while True:
            pause = self.refresh_seconds
            try:
                if not lease or loop.time() - refreshed >= self.refresh_seconds:
                    if not lease or await self.store.keep_alive(lease) == 0:
                        lease = self._lease = await self.store.grant_lease(self.ttl_seconds)
                        written = written_progress = written_traffic = None
                    refreshed = loop.time()
                # The same mapping while no stream opened or ended (ACKs wake this loop too).
                wait = proxies_written_at + _PROXIES_MIN_INTERVAL - loop.time()
                if written is not None and wait > 0:
                    pause = min(pause, wait)  # look again once the interval is over
                else:
                    proxies = admin_addresses(self.tracker)
                    if proxies is not written and proxies != written:
                        await self.store.put_replica_proxies(self.identity, proxies, lease)
                        written = proxies
                    # Looked at now, written or not: the next look once the interval is over
                    # (an unchanged mapping, say a fleet whose proxies state no admin
                    # address, was looked at again on every tracker change).
                    proxies_written_at = loop.time()
                self._progress_changed.clear()
                progress = self._progress
                if progress != written_progress:
                    await self.store.put_replica_progress(self.identity, progress[0], lease, fleet=progress[1])
                    written_progress = progress
                traffic = self._traffic
                if traffic is not None and traffic is not written_traffic:
                    await self.store.put_replica_traffic(self.identity, traffic, lease)
                    written_traffic = traffic
            except LeaseLost as exc:
                # Expired while this process stalled: the next pass grants a new lease and
                # writes the keys again.
                log.warning("this replica's lease is gone (%s); registering again", exc)
                lease, written, written_progress, written_traffic = 0, None, None, None
                pause = min(self.refresh_seconds, _LEASE_LOST_PAUSE_SECONDS)
            except GraylaneError as exc:
                log.warning("cannot publish this replica's proxies: %s", exc)
                lease, written, written_progress, written_traffic = 0, None, None, None
            except Exception:
                log.exception("cannot publish this replica's proxies; retrying")
                lease, written, written_progress, written_traffic = 0, None, None, None
            waiter = asyncio.ensure_future(self.tracker.wait_for_change(seen))
            progressed = asyncio.ensure_future(self._progress_changed.wait())
            try:
                await asyncio.wait({waiter, progressed}, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                progressed.cancel()
            seen = self.tracker.seq
