"""Release operations: validated intent in, one guarded etcd transaction out.

Owns: the rules that tie a release to the registry (its services and versions must be
registered, its base must be the service's stable version, one live release per lane),
applying state-machine moves with their events, and finishing a release (a success makes
the gray versions stable in the same transaction).

Concurrency: every write is guarded by the release's mod_revision. A caller that gave no
expected revision is retried on a concurrent change (the convergence writer touches
status often); a caller that gave one gets `Conflict` (ABORTED).

Must not import: etcd (use `controlplane.store`), graylane.xds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

from graylane.controlplane.domain import machine, model
from graylane.controlplane.domain.machine import Action, Cause
from graylane.controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from graylane.controlplane.store import LiveState, ReleaseStore, Snapshot

log = logging.getLogger(__name__)

_RETRIES = 8
# How long a create waits for the store follower to reach the revision it read before it
# reads every release itself.
_FOLLOWER_WAIT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    status: model.ReleaseStatus
    action: str | None = None  # record an event with this action
    cause: Cause = Cause(actor="graylane")
    at: datetime | None = None  # the event's time, when the status carries the same instant


# Computes a release's new status from its fresh value; None means nothing to write.
StatusChange = Callable[[model.Release], StatusUpdate | None]


def _now() -> datetime:
    return datetime.now(UTC)


def check_against_registry(name: str, spec: model.ReleaseSpec, snap: Snapshot) -> None:
    """Refuse a spec that names unknown services/versions or collides with a live lane."""
    services = {s.name: s for s in snap.services}
    versions = {(v.service, v.name) for v in snap.versions}
    if spec.entry not in services:
        raise InvalidArgument("spec.entry", f"service {spec.entry!r} is not registered")
    for i, sv in enumerate(spec.services):
        where = f"spec.services[{i}]"
        svc = services.get(sv.service)
        if svc is None:
            raise InvalidArgument(f"{where}.service", f"service {sv.service!r} is not registered")
        if sv.base_version != svc.stable_version:
            raise InvalidArgument(
                f"{where}.base_version",
                f"{sv.base_version!r} is not {sv.service!r}'s stable version {svc.stable_version!r}",
            )
        if (sv.service, sv.gray_version) not in versions:
            raise InvalidArgument(
                f"{where}.gray_version",
                f"version {sv.gray_version!r} of {sv.service!r} is not registered",
            )
    shared_entry = 0
    for other in snap.releases:
        if other.name == name:
            continue
        if other.status.phase.terminal:
            if model.draining(other.status) and other.spec.lane == spec.lane:
                raise InvalidArgument(
                    "spec.lane",
                    f"lane {spec.lane!r} is still draining from rolled-back release {other.name!r}: "
                    "it is free once every proxy has stopped admitting to it (`graylane status` says reached)",
                )
            continue
        if other.spec.lane == spec.lane:
            raise InvalidArgument("spec.lane", f"lane {spec.lane!r} is used by release {other.name!r}")
        if other.spec.entry == spec.entry:
            shared_entry += max(b.weight for b in other.spec.batches)
            if other.spec.cohort != spec.cohort:
                # One weighted split per entry service, so one key decides it.
                raise InvalidArgument(
                    "spec.cohort",
                    f"live release {other.name!r} also enters at {spec.entry!r} with another cohort key",
                )
    # Lanes that enter at one service split its unmatched traffic between them.
    if shared_entry + max(b.weight for b in spec.batches) > 100:
        raise InvalidArgument(
            "spec.entry",
            f"live releases entering at {spec.entry!r} would ask for more than 100 % of its traffic",
        )


class RegistryStore(ReleaseStore, Protocol):
    """What `Releases` uses of the store: the releases, and the registry (services and
    versions, at one revision) a release is checked against."""

    async def snapshot(self, *, revision: int = 0) -> Snapshot: ...

    async def get_service(self, name: str) -> model.Service | None: ...


class Releases:
    """The operations the API exposes, over one store."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        # The store follower's state (None: no follower runs), and a wake-up for callers
        # waiting for it to reach a revision.
        self._live: LiveState | None = None
        self._advanced = asyncio.Event()
        # Status writes of this replica the follower has not applied yet: a later write
        # starts from them, not from the older value the follower still holds (which
        # would cost a refused transaction and a read each time).
        self._written: dict[str, model.Release] = {}

    def follow(self, state: LiveState | None) -> None:
        """The store follower's live state from now on (None: it stopped following)."""
        self._live = state
        self.followed(state)

    def followed(self, state: LiveState | None) -> None:
        """The follower applied changes up to `state.revision`."""
        if self._written:
            seen = state.revision if state is not None else None
            self._written = {n: r for n, r in self._written.items() if seen is not None and r.revision > seen}
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def _checked(self, name: str, spec: model.ReleaseSpec) -> tuple[Snapshot, int]:
        """Check `spec` against the registry at one revision R, and against every live
        release as the store follower knows them at R or later (the same check as a whole
        snapshot read at R, without reading and parsing every release per call). Without a
        follower, or when it lags by more than a second, the whole live state is read."""
        registry, claimed = await self._store.registry_for(name, spec)
        live = await self._live_at(registry.revision)
        if live is None:
            snap = await self._store.snapshot()
            check_against_registry(name, spec, snap)
            return snap, claimed
        fresh = registry.by_name.get(name)
        others = tuple(r for r in live.releases if r.name != name)
        check_against_registry(name, spec, replace(registry, releases=others + ((fresh,) if fresh is not None else ())))
        return registry, claimed

    async def _live_at(self, revision: int) -> Snapshot | None:
        try:
            async with asyncio.timeout(_FOLLOWER_WAIT_SECONDS):
                while (live := self._live) is not None and live.revision < revision:
                    await self._advanced.wait()
        except TimeoutError:
            return None
        return live.snapshot() if live is not None else None

    async def create(self, name: str, spec: model.ReleaseSpec, cause: Cause) -> model.Release:
        model.check_name("name", name)
        for _ in range(_RETRIES):
            _, claimed = await self._checked(name, spec)
            try:
                return await self._create_checked(name, spec, cause, claimed)
            except Conflict:
                continue  # the lane was claimed since the check: check again
        raise Conflict(f"lane {spec.lane!r} kept changing; try again")

    async def _create_checked(
        self, name: str, spec: model.ReleaseSpec, cause: Cause, lane_claimed: int
    ) -> model.Release:
        now = _now()
        release = model.Release(
            name=name,
            spec=spec,
            status=model.ReleaseStatus(reason=f"created by {cause.actor}"),
            created=now,
        )
        after, event = machine.record(release, release.status, action="create", cause=cause, now=now)
        return await self._store.create_release(after, event, lane_claimed=lane_claimed)

    async def apply(self, name: str, spec: model.ReleaseSpec, cause: Cause, *, restart: bool = False) -> model.Release:
        """Create the release, or replace its spec. Applying the spec it has changes nothing,
        finished or not; a finished release starts over as PENDING only with `restart` (a
        pipeline re-applying its file must not start a rollout again)."""
        model.check_name("name", name)
        with contextlib.suppress(NotFound):
            existing = await self._store.get_release(name)
            if existing.spec == spec and not (restart and existing.status.phase.terminal):
                # Nothing to change: apply is idempotent, before any check (after a promote the
                # file's base version is no longer stable, and that is no reason to refuse).
                return existing
        for _ in range(_RETRIES):
            snap, claimed = await self._checked(name, spec)
            current = snap.by_name.get(name)
            try:
                if current is None:
                    return await self._create_checked(name, spec, cause, claimed)
                if current.spec == spec and not (restart and current.status.phase.terminal):
                    return current
                phase = current.status.phase
                if phase.terminal and not restart:
                    raise FailedPrecondition(
                        f"release {name!r} is {phase.name}: applying a changed spec starts it over from the "
                        "first batch; say so with restart (graylane apply --restart)"
                    )
                after, events = self._respec(current, spec, cause)
                return await self._store.update_release(after, events, lane_claimed=claimed)
            except (Conflict, NotFound, AlreadyExists):
                continue  # changed, deleted, created or its lane claimed since the check: decide again
        raise Conflict(f"release {name!r} kept changing; try again")

    @staticmethod
    def _respec(
        current: model.Release, spec: model.ReleaseSpec, cause: Cause
    ) -> tuple[model.Release, list[model.Event]]:
        now = _now()
        st = current.status
        if st.phase.terminal:
            status = model.ReleaseStatus(events=st.events, generation=st.generation + 1)
        else:
            batch = min(st.batch, len(spec.batches) - 1)
            status = replace(st, batch=batch, generation=st.generation + 1, reached=False)
        status = replace(status, reason=f"spec applied by {cause.actor}")
        after, event = machine.record(replace(current, spec=spec), status, action="apply", cause=cause, now=now)
        return after, [event]

    async def act(self, name: str, action: Action, cause: Cause, *, expected_revision: int = 0) -> model.Release:
        # First from the latest value this replica knows (no read on the NextBatch path);
        # the write is guarded by its revision, and a move the table forbids on it is
        # decided again on a fresh read, so a follower behind costs a read, never a wrong
        # answer.
        hint = self._latest(name)
        for _ in range(_RETRIES):
            if hint is not None and (not expected_revision or hint.revision == expected_revision):
                current, hinted = hint, True
            else:
                current, hinted = await self._store.get_release(name), False
            hint = None
            if expected_revision and current.revision != expected_revision:
                raise Conflict(
                    f"release {name!r} is at revision {current.revision}, not the expected {expected_revision}"
                )
            try:
                after, event = machine.transition(current, action, cause=cause, now=_now())
            except FailedPrecondition:
                if hinted:
                    continue
                raise
            stable = await self._stable_updates(after)
            try:
                written = await self._store.update_release(after, [event], services=stable)
            except Conflict:
                if expected_revision:
                    raise
                continue
            except NotFound:
                if hinted:
                    continue  # deleted since the follower saw it: the fresh read says so
                raise
            if self._live is not None:
                self._written[name] = written  # the next act or status write starts from it
            return written
        raise Conflict(f"release {name!r} kept changing; try again")

    def _latest(self, name: str) -> model.Release | None:
        """The newest value of `name` this replica knows without a read: the store
        follower's, or its own status write the follower has not applied yet (None: none)."""
        hint = self._live.release(name) if self._live is not None else None
        mine = self._written.get(name)
        if mine is not None and (hint is None or mine.revision > hint.revision):
            hint = mine
        return hint

    async def _stable_updates(self, release: model.Release) -> list[model.Service]:
        """On success the gray versions become the services' stable versions."""
        if release.status.phase is not model.Phase.SUCCEEDED:
            return []
        out = []
        for sv in release.spec.services:
            svc = await self._store.get_service(sv.service)
            if svc is None:
                raise FailedPrecondition(f"service {sv.service!r} is no longer registered")
            out.append(replace(svc, stable_version=sv.gray_version))
        return out

    async def note(self, name: str, action: str, cause: Cause, *, expected_revision: int) -> model.Release:
        """Append an event (an analysis, a webhook call) without moving the release.

        Guarded like a transition: Conflict if the release changed since it was read, so a
        note about a batch never lands after the batch moved on; NotFound once it is deleted.
        """
        current = await self._store.get_release(name)
        if current.revision != expected_revision:
            raise Conflict(f"release {name!r} is at revision {current.revision}, not the expected {expected_revision}")
        after, event = machine.record(current, current.status, action=action, cause=cause, now=_now())
        return await self._store.update_release(after, [event])

    async def update_status(self, name: str, change: StatusChange) -> model.Release | None:
        """Write a status-only change (convergence) computed from the fresh value.

        `change` returns the new status and, when the change is worth recording (a batch
        reached), the event's action and cause; or None when there is nothing to write.
        """
        # First from the store follower's state (no read when nothing changes, the common
        # case of a convergence pass); the write is guarded by that value's revision, so a
        # stale one only costs a Conflict and a fresh read.
        hint = self._latest(name)
        for _ in range(_RETRIES):
            if hint is not None:
                current, hint = hint, None
            else:
                try:
                    current = await self._store.get_release(name)
                except NotFound:
                    return None
            update = change(current)
            if update is None or update.status == current.status:
                return None
            if update.action is None:
                after, events = replace(current, status=update.status), []
            else:
                after, event = machine.record(
                    current, update.status, action=update.action, cause=update.cause, now=update.at or _now()
                )
                events = [event]
            try:
                written = await self._store.update_release(after, events)
            except Conflict:
                continue
            except NotFound:
                return None  # deleted meanwhile: no status to write
            if self._live is not None:
                self._written[name] = written
            return written
        log.warning("status of %s kept changing; giving up this round", name)
        return None

    async def hold_for_nack(
        self, name: str, nack: model.Nack, *, held_batch: int, cause: Cause, held_lane: model.HeldLane | None = None
    ) -> model.Release | None:
        """A proxy rejected config this release introduced: pause it, hold it at `held_lane`
        (the lane the proxy last accepted; None: no lane; `held_batch` the batch it matches,
        -1: none) and say who and why."""
        reason = f"proxy {nack.node} rejected the configuration: {nack.message}"
        details = {"node": nack.node, "type_url": nack.type_url, "version": nack.version}
        cause = replace(cause, reason=reason, details={**details, "held_batch": str(held_batch)})
        for _ in range(_RETRIES):
            try:
                current = await self._store.get_release(name)
            except NotFound:
                return None
            if current.status.phase is model.Phase.PROGRESSING:
                after, event = machine.transition(current, Action.PAUSE, cause=cause, now=_now())
            elif current.status.phase is model.Phase.PAUSED and current.status.last_nack is None:
                after, event = machine.record(current, current.status, action="nack", cause=cause, now=_now())
            else:
                return None
            # Held at what the proxies accepted: not the batch asked for, so not reached.
            held = replace(after.status, last_nack=nack, reason=reason, held_batch=held_batch, held_lane=held_lane)
            # The target changed: no proxy is known to carry it until counted again.
            held = replace(held, converged=0, target_version="", lagging=())
            after = replace(after, status=replace(held, reached=False, batch_reached=None))
            try:
                return await self._store.update_release(after, [event])
            except Conflict:
                continue
            except NotFound:
                return None  # deleted meanwhile: nothing left to pause
        return None
