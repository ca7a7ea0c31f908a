"""Which proxies each replica serves, and how far they are, published in etcd for the leader.

Owns: writing, under a lease this replica keeps alive, `replicas/<identity>` (node id ->
admin address of every proxy connected to this replica), so the leader can read every
proxy's statistics wherever the proxy is connected, and `progress/<identity>` (per live
release: how many of the proxies this replica serves, its own and its agents', carry the
release's lane), so the leader counts convergence over every replica. A replica that dies
takes its entries with it. Written when they change; the lease is refreshed every
`refresh_seconds`.

Concurrency: one asyncio loop; `run()` is cancellable and survives every etcd failure: a
lease that expired while the process stalled is replaced and the keys written again.
"""

from __future__ import annotations

import asyncio
import logging

from graylane.controlplane.errors import GraylaneError, LeaseLost
from graylane.controlplane.store import EtcdStore, ReplicaProgress
from graylane.controlplane.traffic import admin_addresses
from graylane.xds.tracker import ProxyTracker

log = logging.getLogger(__name__)

_LEASE_LOST_PAUSE_SECONDS = 0.1


class ReplicaRegistry:
    def __init__(
        self,
        store: EtcdStore,
        tracker: ProxyTracker,
        *,
        identity: str,
        ttl_seconds: int = 5,
        refresh_seconds: float = 1.0,
    ) -> None:
        self._store = store
        self._tracker = tracker
        self.identity = identity
        self._ttl = ttl_seconds
        self._refresh = refresh_seconds
        self._progress: dict[str, ReplicaProgress] = {}
        self._progress_changed = asyncio.Event()

    def set_progress(self, progress: dict[str, ReplicaProgress]) -> None:
        """This replica's counts per live release (written by `run()` when they change)."""
        if progress != self._progress:
            self._progress = dict(progress)
            self._progress_changed.set()

    async def run(self) -> None:
        lease = 0
        seen = -1
        written: dict[str, str] | None = None
        written_progress: dict[str, ReplicaProgress] | None = None
        refreshed = 0.0
        loop = asyncio.get_running_loop()
        while True:
            pause = self._refresh
            try:
                if not lease or loop.time() - refreshed >= self._refresh:
                    if not lease or await self._store.keep_alive(lease) == 0:
                        lease = await self._store.grant_lease(self._ttl)
                        written = written_progress = None
                    refreshed = loop.time()
                proxies = admin_addresses(self._tracker)
                if proxies != written:
                    await self._store.put_replica_proxies(self.identity, proxies, lease)
                    written = proxies
                self._progress_changed.clear()
                progress = self._progress
                if progress != written_progress:
                    await self._store.put_replica_progress(self.identity, progress, lease)
                    written_progress = progress
            except LeaseLost as exc:
                # Expired while this process stalled: the next pass grants a new lease and
                # writes the keys again.
                log.warning("this replica's lease is gone (%s); registering again", exc)
                lease, written, written_progress = 0, None, None
                pause = min(self._refresh, _LEASE_LOST_PAUSE_SECONDS)
            except GraylaneError as exc:
                log.warning("cannot publish this replica's proxies: %s", exc)
                lease, written, written_progress = 0, None, None
            except Exception:
                log.exception("cannot publish this replica's proxies; retrying")
                lease, written, written_progress = 0, None, None
            waiter = asyncio.ensure_future(self._tracker.wait_for_change(seen))
            progressed = asyncio.ensure_future(self._progress_changed.wait())
            try:
                await asyncio.wait({waiter, progressed}, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                progressed.cancel()
            seen = self._tracker.seq
