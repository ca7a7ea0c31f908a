"""Which proxies each replica serves, published in etcd for the leader.

Owns: writing `replicas/<identity>` (node id -> admin address of every proxy connected to
this replica) under a lease this replica keeps alive, so the leader can read every proxy's
statistics wherever the proxy is connected, and a replica that dies takes its entry with
it. Written when the set changes and refreshed every `refresh_seconds`.

Concurrency: one asyncio loop; `run()` is cancellable.
"""

from __future__ import annotations

import asyncio
import logging

from graylane.controlplane.errors import Unavailable
from graylane.controlplane.store import EtcdStore
from graylane.controlplane.traffic import admin_addresses
from graylane.xds.tracker import ProxyTracker

log = logging.getLogger(__name__)


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

    async def run(self) -> None:
        lease = 0
        seen = -1
        written: dict[str, str] | None = None
        while True:
            try:
                if not lease or await self._store.keep_alive(lease) == 0:
                    lease = await self._store.grant_lease(self._ttl)
                    written = None
                proxies = admin_addresses(self._tracker)
                if proxies != written:
                    await self._store.put_replica_proxies(self.identity, proxies, lease)
                    written = proxies
            except Unavailable as exc:
                log.warning("cannot publish this replica's proxies: %s", exc)
                lease, written = 0, None
            waiter = asyncio.ensure_future(self._tracker.wait_for_change(seen))
            try:
                await asyncio.wait({waiter}, timeout=self._refresh)
            finally:
                waiter.cancel()
            seen = self._tracker.seq
