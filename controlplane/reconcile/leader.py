"""Leader election over an etcd lease: which replica advances releases on its own.

Owns: campaigning for the `leader` key (created only if absent, bound to this replica's
lease), keeping the lease alive while leading, noticing a lost lease (then following
again), and resigning on a clean stop (revoking the lease, so another replica takes over
at once instead of after the TTL). Every replica serves the API and xDS; only the leader
runs automated analysis and progression. A leader killed outright is replaced within the
lease TTL.

Concurrency: one asyncio loop; `run()` is the only loop and is cancellable. `is_leader`
may be read at any time; code that acts as leader also guards each write with the
release's revision, so a leader that lost its lease a moment ago cannot double a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from graylane.controlplane.errors import GraylaneError, LeaseLost
from graylane.controlplane.store import LeaderStore

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 5
_RETRY_SECONDS = 1.0
_MAX_RETRY_SECONDS = 10.0


class LeaderElection:
    def __init__(self, store: LeaderStore, *, identity: str = "", ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        self._store = store
        self.identity = identity or f"replica-{uuid.uuid4().hex[:12]}"
        self.ttl_seconds = ttl_seconds
        self.leading = asyncio.Event()
        self.leader = ""  # the current leader's identity as last seen ("" unknown)
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever this replica gains or loses the leadership."""
        self._listeners.append(listener)

    def _set_leading(self, leading: bool) -> None:
        if leading == self.leading.is_set():
            return
        if leading:
            self.leading.set()
        else:
            self.leading.clear()
        for listener in self._listeners:
            listener()

    @property
    def is_leader(self) -> bool:
        return self.leading.is_set()

    async def run(self) -> None:
        """Campaign, lead, follow, until cancelled. No etcd failure ends it: a lost lease
        (expired during a stall) is replaced by a new one, etcd out of reach is retried, and
        anything unexpected is logged and retried with a growing pause."""
        lease = 0
        failures = 0
        try:
            while True:
                try:
                    lease = await self._store.grant_lease(self.ttl_seconds)
                    while True:
                        self.leader = await self._store.campaign(self.identity, lease)
                        failures = 0
                        if self.leader == self.identity:
                            await self._lead(lease)
                            break  # lease lost: campaign on a fresh one
                        self._set_leading(False)
                        # Follow: keep our own lease alive so the next campaign can use it.
                        await asyncio.sleep(self.ttl_seconds / 3)
                        if await self._store.keep_alive(lease) == 0:
                            break
                    continue
                except LeaseLost as exc:
                    self._set_leading(False)
                    log.warning("leader election: %s; campaigning on a new lease", exc)
                    continue
                except GraylaneError as exc:
                    log.warning("leader election: %s; retrying", exc)
                except Exception:
                    log.exception("leader election failed; retrying")
                self._set_leading(False)
                failures += 1
                await asyncio.sleep(min(_RETRY_SECONDS * failures, _MAX_RETRY_SECONDS))
        finally:
            self._set_leading(False)
            if lease and self.leader == self.identity:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._store.revoke_lease(lease))
                log.info("%s resigned the leadership", self.identity)

    async def _lead(self, lease: int) -> None:
        self._set_leading(True)
        log.info("%s is the leader", self.identity)
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        try:
            while True:
                await asyncio.sleep(self.ttl_seconds / 3)
                if loop.time() - refreshed >= self.ttl_seconds:
                    # Stalled past the TTL (a paused process, a blocked loop): the lease may be
                    # gone and another replica leading already. Stop acting as leader first.
                    self._set_leading(False)
                if await self._store.keep_alive(lease) == 0:
                    log.warning("%s lost its leader lease", self.identity)
                    return
                refreshed = loop.time()
                self._set_leading(True)
        finally:
            self._set_leading(False)
