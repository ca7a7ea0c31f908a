"""Releases, their history and their tombstones in etcd.

Keys (below the prefix):
    releases/<name>                      Release (spec + status)
    events/<release>/<sequence:016d>     Event, appended in the same txn as the change
    lanes/<lane>                         name of the release that last claimed the lane (a create or an
                                         apply writes it, guarded by the value it checked against)
    tombstones/<release>/<generation>    a deleted release: its last state, who deleted it, why (JSON);
                                         generation is the create_revision of its release key
    tombstoneevents/<release>/<generation>/<sequence>  its events, kept by the delete

Every release change is one transaction guarded by the release's mod_revision that also
writes its event (and, on success, the services' new stable versions), so a failed or
conflicting call changes nothing. Must not import: graylane.xds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from etcd3.etcdrpc import kv_pb2, rpc_pb2
from google.protobuf import json_format
from graylane.controlplane.domain import model
from graylane.controlplane.errors import AlreadyExists, Conflict, NotFound
from graylane.controlplane.store._client import _PAGE, Commit, EtcdClient
from graylane.controlplane.store._codec import _at, _dump, _event_from_proto, _load, _releases
from graylane.controlplane.store.live import Snapshot, _parse_or_skip
from graylane.v1 import release_pb2 as pb

log = logging.getLogger(__name__)

_TOMBSTONE_OPS = 100
_TOMBSTONE_BYTES = 512 * 1024
_TOMBSTONE_RETRIES = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class Tombstone:
    """What a delete keeps of a release: its last state (`final`, proto JSON), who deleted
    it and why, and how many events its history holds."""

    release: str
    generation: int
    deleted_at: str
    deleted_by: str
    reason: str
    events: int
    phase: str
    final: str

    def to_json(self) -> dict[str, object]:
        return {
            "release": self.release,
            "generation": self.generation,
            "deleted_at": self.deleted_at,
            "deleted_by": self.deleted_by,
            "reason": self.reason,
            "events": self.events,
            "phase": self.phase,
            "final": self.final,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Tombstone:
        return cls(
            release=str(value["release"]),
            generation=int(value["generation"]),
            deleted_at=str(value.get("deleted_at", "")),
            deleted_by=str(value.get("deleted_by", "")),
            reason=str(value.get("reason", "")),
            events=int(value.get("events", 0)),
            phase=str(value.get("phase", "")),
            final=str(value.get("final", "")),
        )


class ReleaseStore(Protocol):
    """What the release service and the API use of releases, their history and tombstones."""

    async def registry_for(self, name: str, spec: model.ReleaseSpec) -> tuple[Snapshot, int]: ...

    async def get_release(self, name: str) -> model.Release: ...

    async def get_release_at(self, name: str) -> tuple[model.Release, int]: ...

    async def list_releases(self) -> list[model.Release]: ...

    async def history(self, name: str) -> list[model.Event]: ...

    async def create_release(
        self, release: model.Release, event: model.Event, *, lane_claimed: int | None = None
    ) -> model.Release: ...

    async def update_release(
        self,
        release: model.Release,
        events: Iterable[model.Event],
        *,
        services: Iterable[model.Service] = (),
        lane_claimed: int | None = None,
    ) -> model.Release: ...

    async def delete_release(self, name: str, *, actor: str = "", reason: str = "", at: str = "") -> Tombstone: ...

    async def list_tombstones(self, name: str = "") -> list[Tombstone]: ...

    async def tombstone_history(self, name: str, generation: int = 0) -> tuple[Tombstone, list[model.Event]]: ...

    def watch_release(
        self, name: str, *, start_revision: int, after: int = 0
    ) -> AsyncIterator[model.Release | None]: ...


class ReleaseRecords(EtcdClient):
    """Releases, events, lane claims and tombstones."""

    def release_key(self, name: str) -> bytes:
        return self._key("releases", name)

    def _event_key(self, release: str, sequence: int) -> bytes:
        return self._key("events", release, f"{sequence:016d}")

    async def registry_for(self, name: str, spec: model.ReleaseSpec) -> tuple[Snapshot, int]:
        """What a release spec is checked against in the registry, in one read: its services,
        its gray versions and the release `name` itself (in `releases` when it exists); and
        the mod_revision of the lane's claim (0: never claimed), for `create_release` and
        `update_release` to guard on. Other releases are not read: callers check lanes
        against a follower's state (or a full read) at this revision or later."""
        keys = [self._key("services", n) for n in sorted({spec.entry, *(s.service for s in spec.services)})]
        keys += [self._key("versions", s.service, s.gray_version) for s in spec.services]
        keys.append(self.release_key(name))
        keys.append(self._key("lanes", spec.lane))
        ops = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=k)) for k in keys]
        resp = await self._txn([], ops)
        claim = resp.responses[-1].response_range.kvs
        claimed = int(claim[0].mod_revision) if claim else 0
        services: list[model.Service] = []
        versions: list[model.Version] = []
        releases: list[model.Release] = []
        for op in resp.responses:
            for kv in op.response_range.kvs:
                where = self._split_key(kv.key)
                if where is None:
                    continue
                value = _parse_or_skip(where[0], where[1], kv)
                if isinstance(value, model.Service):
                    services.append(value)
                elif isinstance(value, model.Version):
                    versions.append(value)
                elif isinstance(value, model.Release):
                    releases.append(value)
        snap = Snapshot(
            revision=int(resp.header.revision),
            services=tuple(services),
            versions=tuple(versions),
            releases=tuple(releases),
            by_name={r.name: r for r in releases},
        )
        return snap, claimed

    def _lane_claim(
        self, release: model.Release, claimed: int | None
    ) -> tuple[list[rpc_pb2.Compare], list[rpc_pb2.RequestOp]]:
        """Guard: the lane's claim is as the caller checked it (at mod_revision `claimed`, 0:
        absent); and the write that claims it for `release`. Two writers that checked the
        lane free against the same state cannot both claim it. `claimed` None: no claim, no
        guard (the txn leaves the lane alone)."""
        if claimed is None:
            return [], []
        key = self._key("lanes", release.spec.lane)
        if claimed:
            same = rpc_pb2.Compare(
                key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=claimed
            )
        else:
            same = rpc_pb2.Compare(
                key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
            )
        return [same], [self._put(key, release.name.encode())]

    async def get_release(self, name: str) -> model.Release:
        return (await self.get_release_at(name))[0]

    async def get_release_at(self, name: str) -> tuple[model.Release, int]:
        """The release and the store's revision it was read at (a watch from that revision + 1
        misses nothing and starts in step with etcd: one from the release's own, older
        revision would first wait for etcd's catch-up pass of lagging watchers, up to 100 ms)."""
        resp = await self._call(self._kv.Range, rpc_pb2.RangeRequest(key=self.release_key(name)))
        kvs = resp.kvs  # type: ignore[attr-defined]
        if not kvs:
            raise NotFound(f"release {name!r} not found")
        return _releases.decode(kvs[0]), int(resp.header.revision)  # type: ignore[attr-defined]

    async def list_releases(self) -> list[model.Release]:
        resp = await self._range(self._key("releases") + b"/")
        return [_releases.decode(kv) for kv in resp.kvs]

    async def history(self, name: str) -> list[model.Event]:
        """The release's events in order, however many (read in pages at one revision)."""
        found = await self._call(self._kv.Range, rpc_pb2.RangeRequest(key=self.release_key(name)))
        if not found.kvs:  # type: ignore[attr-defined]
            raise NotFound(f"release {name!r} not found")
        revision = int(found.header.revision)  # type: ignore[attr-defined]
        resp = await self._range(self._key("events", name) + b"/", revision=revision)
        out = []
        for i, kv in enumerate(resp.kvs, start=1):
            e = _load(kv.value, pb.Event())
            out.append(_event_from_proto(e))  # type: ignore[arg-type]
            if i % _PAGE == 0:
                await asyncio.sleep(0)  # a long history parses in slices: xDS and the API keep going
        return out

    async def create_release(
        self, release: model.Release, event: model.Event, *, lane_claimed: int | None = None
    ) -> model.Release:
        """Create `release` with its event. With `lane_claimed` (from `registry_for`) the
        lane is claimed in the same txn: Conflict when another writer claimed it since."""
        key = self.release_key(release.name)
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        ops = [
            self._put(key, _releases.encode(release)),
            self._put(self._event_key(release.name, event.sequence), _dump(model.event_to_proto(event))),
        ]
        lane_guards, claims = self._lane_claim(release, lane_claimed)
        resp = await self._txn([absent, *lane_guards], ops + claims)
        if not resp.succeeded:
            if lane_claimed is not None and await self._get(key) is None:
                raise Conflict(f"lane {release.spec.lane!r} was claimed concurrently; check again")
            raise AlreadyExists(f"release {release.name!r} already exists")
        return _at(release, resp.header.revision)

    async def update_release(
        self,
        release: model.Release,
        events: Iterable[model.Event],
        *,
        services: Iterable[model.Service] = (),
        lane_claimed: int | None = None,
    ) -> model.Release:
        """Write `release` if it is still at `release.revision`, with its events, in one txn
        (claiming its lane as `create_release` does, when `lane_claimed` is given)."""
        key = self.release_key(release.name)
        guard = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=release.revision
        )
        ops = [self._put(key, _releases.encode(release))]
        ops += [self._put(self._event_key(e.release, e.sequence), _dump(model.event_to_proto(e))) for e in events]
        ops += [self._put(self._key("services", s.name), _dump(model.service_to_proto(s))) for s in services]
        lane_guards, claims = self._lane_claim(release, lane_claimed)
        resp = await self._txn([guard, *lane_guards], ops + claims)
        if not resp.succeeded:
            current = await self._get(key)
            if current is None:
                raise NotFound(f"release {release.name!r} not found")
            raise Conflict(
                f"release {release.name!r} changed concurrently (revision {current.mod_revision}, "
                f"expected {release.revision}); read it again and retry"
            )
        return _at(release, resp.header.revision)

    async def delete_release(self, name: str, *, actor: str = "", reason: str = "", at: str = "") -> Tombstone:
        """Delete the release and keep its history under a tombstone (`graylane tombstones`).

        The events are copied first, in transactions of at most `_TOMBSTONE_OPS` keys and
        `_TOMBSTONE_BYTES` (below etcd's default limits of 128 operations and 1.5 MiB per
        request; an event is at most a few KiB), under the generation's
        `create_revision`; events never change once written, so a copy that is repeated or
        left half done by a crash is harmless and invisible (nothing lists it without its
        header). One transaction, guarded by the release's `mod_revision`, then deletes the
        release and its live events and writes the header: readers see the release, or its
        tombstone, never neither. A change in between fails the guard: copy again, retry.
        """
        for _ in range(_TOMBSTONE_RETRIES):
            kv = await self._get(self.release_key(name))
            if kv is None:
                raise NotFound(f"release {name!r} not found")
            release = _releases.decode(kv)
            events = await self._range(self._key("events", name) + b"/", revision=kv.mod_revision)
            generation = int(kv.create_revision)
            copies = [
                self._put(self._tombstone_event_key(name, generation, e.key.rsplit(b"/", 1)[-1].decode()), e.value)
                for e in events.kvs
            ]
            batch: list[rpc_pb2.RequestOp] = []
            size = 0
            for op in copies:
                if batch and (len(batch) >= _TOMBSTONE_OPS or size + op.ByteSize() > _TOMBSTONE_BYTES):
                    await self._txn([], batch)
                    batch, size = [], 0
                batch.append(op)
                size += op.ByteSize()
            if batch:
                await self._txn([], batch)
            tomb = Tombstone(
                release=name,
                generation=generation,
                deleted_at=at,
                deleted_by=actor,
                reason=reason,
                events=len(events.kvs),
                phase=release.status.phase.name,
                final=json_format.MessageToJson(model.release_to_proto(release), indent=None),
            )
            guard = rpc_pb2.Compare(
                key=kv.key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=kv.mod_revision
            )
            resp = await self._txn(
                [guard],
                [
                    rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=kv.key)),
                    self._delete_prefix(self._key("events", name) + b"/"),
                    self._put(self._tombstone_key(name, generation), json.dumps(tomb.to_json()).encode()),
                ],
            )
            if resp.succeeded:
                return tomb
        raise Conflict(f"release {name!r} kept changing while it was being deleted; try again")

    def _tombstone_key(self, name: str, generation: int) -> bytes:
        return self._key("tombstones", name, f"{generation:016d}")

    def _tombstone_event_key(self, name: str, generation: int, sequence: str) -> bytes:
        return self._key("tombstoneevents", name, f"{generation:016d}", sequence)

    async def list_tombstones(self, name: str = "") -> list[Tombstone]:
        """Deleted releases (of one name, or all), oldest generation first per name."""
        prefix = self._key("tombstones", name) + b"/" if name else self._key("tombstones") + b"/"
        resp = await self._range(prefix)
        out = []
        for kv in resp.kvs:
            try:
                out.append(Tombstone.from_json(json.loads(kv.value)))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("skipping unreadable tombstone %r: %s", kv.key, exc)
        return out

    async def tombstone_history(self, name: str, generation: int = 0) -> tuple[Tombstone, list[model.Event]]:
        """The history a delete kept (generation 0: the latest deleted one of that name)."""
        tombs = await self.list_tombstones(name)
        tombs = [t for t in tombs if t.release == name and (not generation or t.generation == generation)]
        if not tombs:
            raise NotFound(f"no deleted release {name!r}" + (f" of generation {generation}" if generation else ""))
        tomb = tombs[-1]
        resp = await self._range(self._key("tombstoneevents", name, f"{tomb.generation:016d}") + b"/")
        events = [_event_from_proto(_load(kv.value, pb.Event())) for kv in resp.kvs]  # type: ignore[arg-type]
        return tomb, events[: tomb.events]

    async def watch_release(
        self, name: str, *, start_revision: int, after: int = 0
    ) -> AsyncIterator[model.Release | None]:
        """Each new value of one release (None once it is deleted).

        `after`: the mod_revision of the value the caller holds (0: none). This replica's own
        write of the release is yielded as soon as etcd answers it, before the watch's return
        trip, when it was guarded on the value last yielded (so no value comes between them);
        the watch then skips it. Every other change comes from the watch, in order."""
        last = after
        key = self.release_key(name)
        changes = self.watch_with_commits(start_revision=start_revision, key=key)
        async with contextlib.aclosing(changes):
            async for item in changes:
                if isinstance(item, Commit):
                    if not last or item.guards.get(key) != last:
                        continue  # not known to follow the value last yielded: the watch brings it
                    kvs = [kv for kv in item.puts if kv.key == key]
                    events = [kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv) for kv in kvs]
                else:
                    events = item
                for ev in events:
                    if ev.kv.mod_revision <= last:
                        continue  # yielded already, from this replica's own write
                    last = ev.kv.mod_revision
                    if ev.type == kv_pb2.Event.DELETE:
                        yield None
                    else:
                        yield _releases.decode(ev.kv)
