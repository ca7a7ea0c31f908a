"""The live state: every key the control plane routes from, read at one revision and kept
current from the watch.

Owns: `Snapshot` (the live kinds at one revision, as domain values), `LiveState` (the same,
parsed once and kept by key, patched by watch events), the decoding of each live kind (a
record this version cannot read is skipped with an error, never fatal), and `LiveReads`,
the full read in one transaction (`live_state`, `snapshot`). History (`events/`) is never
part of it: it grows without bound and is read per release.

Must not import: graylane.xds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, cast

from etcd3.etcdrpc import kv_pb2, rpc_pb2
from graylane.controlplane.domain import model
from graylane.controlplane.errors import InvalidArgument, Unavailable
from graylane.controlplane.store._client import _PAGE, Commit, EtcdClient, _range_end, _Ranged
from graylane.controlplane.store._codec import _load, _releases
from graylane.controlplane.store.replicas import ReplicaFleet, ReplicaProgress
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import release_pb2 as pb

log = logging.getLogger(__name__)

# The kinds of keys the control plane routes from; `events/` is history, read per release.
_LIVE_KINDS = (
    "services",
    "versions",
    "releases",
    "progress",
    "replicas",
    "clusters",
    "knownclusters",
    "clusterendpoints",
)


class LiveSource(Protocol):
    """What a follower of the store uses: one full read, then the watch from its revision + 1
    (`Compacted` from the watch: read again), with this replica's own committed writes as
    soon as etcd answers them (`watch_with_commits`, see `LiveState.apply_committed`)."""

    async def snapshot(self, *, revision: int = 0) -> Snapshot: ...

    async def live_state(self, *, revision: int = 0) -> LiveState: ...

    def watch(self, *, start_revision: int, key: bytes | None = None) -> AsyncIterator[list[rpc_pb2.Event]]: ...

    def watch_with_commits(
        self, *, start_revision: int, key: bytes | None = None
    ) -> AsyncGenerator[list[rpc_pb2.Event] | Commit, None]: ...


@dataclass(frozen=True)
class Snapshot:
    """Everything the control plane routes from, read at one etcd revision."""

    revision: int
    services: tuple[model.Service, ...] = ()
    versions: tuple[model.Version, ...] = ()
    releases: tuple[model.Release, ...] = ()
    clusters: tuple[model.ClusterInfo, ...] = ()  # registered now (their agents' leases live)
    known_clusters: tuple[model.ClusterInfo, ...] = ()  # every cluster ever registered, as last registered
    # node id -> admin address of every proxy connected to any live replica
    replica_proxies: dict[str, str] = field(default_factory=dict, compare=False)
    # replica identity -> the node ids (as in replica_proxies) of its proxies
    replica_nodes: dict[str, frozenset[str]] = field(default_factory=dict, compare=False)
    cluster_endpoints: tuple[model.ClusterEndpoints, ...] = ()  # endpoints tagged with their cluster
    # replica identity -> release -> what that replica counts (see `ReplicaProgress`)
    replica_progress: dict[str, dict[str, ReplicaProgress]] = field(default_factory=dict, compare=False)
    # replica identity -> the proxies it counts (see `ReplicaFleet`)
    replica_fleet: dict[str, ReplicaFleet] = field(default_factory=dict, compare=False)
    by_name: dict[str, model.Release] = field(default_factory=dict, compare=False)


class LiveReads(EtcdClient):
    """The full reads of the live kinds."""

    async def _read_kinds(self, kinds: Sequence[str], *, revision: int = 0) -> _Ranged:
        """Every key of `kinds` at one revision: the first page of each in one transaction
        (one round trip, one revision), the rest paged at that revision. History
        (`events/`) is never among them: it grows without bound."""
        prefixes = [self._key(kind) + b"/" for kind in kinds]
        ops = [
            rpc_pb2.RequestOp(
                request_range=rpc_pb2.RangeRequest(key=p, range_end=_range_end(p), revision=revision, limit=_PAGE)
            )
            for p in prefixes
        ]
        try:
            resp = await self._txn([], ops)
        except Unavailable as exc:
            if "RESOURCE_EXHAUSTED" not in str(exc):
                raise
            # The first pages together are over the receive limit: read kind by kind.
            ranged = _Ranged(revision=revision)
            for p in prefixes:
                await self._page(ranged, p, p)
            return ranged
        ranged = _Ranged(revision=revision or resp.header.revision)
        for p, op in zip(prefixes, resp.responses, strict=True):
            page = op.response_range
            ranged.add(page)
            if page.more and page.kvs:
                await self._page(ranged, p, page.kvs[-1].key + b"\0")
        return ranged

    async def snapshot(self, *, revision: int = 0) -> Snapshot:
        """Everything the control plane routes from, in one consistent read (no history)."""
        return (await self.live_state(revision=revision)).snapshot()

    async def live_state(self, *, revision: int = 0) -> LiveState:
        """The live kinds read in one consistent read, parsed once and kept by key, so a
        follower can apply watch events to it (`LiveState.apply`) instead of re-reading."""
        self.full_reads += 1
        resp = await self._read_kinds(_LIVE_KINDS, revision=revision)
        state = LiveState(self._prefix, revision=resp.revision)
        for start in range(0, len(resp.kvs), _PAGE):
            # Decoded in slices of one page, yielding between them: at thousands of keys
            # decoding takes a good part of a second, and xDS and the API keep going.
            state.load(resp.kvs[start : start + _PAGE])
            await asyncio.sleep(0)
        return state


def _parse_or_skip(kind: str, rest: str, kv: kv_pb2.KeyValue) -> object:
    """`_parse`, except that a value this version cannot read (written by hand, or by an older
    Graylane under looser rules: a name ending in a newline, say) is skipped with an error
    naming its key, so one bad record never makes the whole store unreadable."""
    try:
        return _parse(kind, rest, kv)
    except Exception as exc:  # a decoding failure of any kind: skip the record, keep serving
        log.error("skipping unreadable %s record %r (revision %d): %s", kind, rest, kv.mod_revision, exc)
        return None


def _parse(kind: str, rest: str, kv: kv_pb2.KeyValue) -> object:
    """One stored value of a live kind as the domain value `Snapshot` holds (None: skip it).

    Values were validated when they were written: decoding trusts them (no size limits, no
    regex compiles), and clamps what an older version may have let in.
    """
    if kind == "services":
        return model.service_from_proto(_load(kv.value, pb.Service()), stored=True)  # type: ignore[arg-type]
    if kind == "versions":
        return model.version_from_proto(_load(kv.value, pb.Version()), stored=True)  # type: ignore[arg-type]
    if kind == "releases":
        return _releases.decode(kv)
    if kind == "progress":
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            value = json.loads(kv.value)
            # Before the fleet was published the value was the releases alone.
            counts = value["releases"] if {"releases", "clusters", "nodes"} <= value.keys() else value
            releases = {
                str(name): ReplicaProgress(str(lane), int(proxies), int(converged), *(int(n) for n in rest[:1]))
                for name, (lane, proxies, converged, *rest) in counts.items()
            }
            fleet = ReplicaFleet(
                clusters={str(c): int(n) for c, n in value.get("clusters", {}).items()},
                nodes=frozenset(str(n) for n in value.get("nodes", ())),
                left=bool(value.get("left", False)),
            )
            return releases, fleet
        return None
    if kind == "replicas":
        with contextlib.suppress(ValueError, AttributeError):
            return {str(k): str(v) for k, v in json.loads(kv.value).items()}
        return None
    if kind == "clusters":
        return model.hello_from_proto(_load(kv.value, apb.AgentHello()), stored=True)  # type: ignore[arg-type]
    if kind == "knownclusters":
        with contextlib.suppress(InvalidArgument):  # an unreadable record names no gateway
            return model.hello_from_proto(_load(kv.value, apb.AgentHello()), stored=True)  # type: ignore[arg-type]
        return None
    if kind == "clusterendpoints":
        return model.cluster_endpoints_from_proto(rest, _load(kv.value, apb.EndpointSnapshot()), stored=True)  # type: ignore[arg-type]
    return None


class LiveState:
    """The live kinds at one revision, parsed once and kept by key.

    Fed by a full read (`EtcdStore.live_state`), then by the watch's events in order
    (`apply`): only the changed keys are parsed, deleted keys dropped. A gap (compaction,
    lost watch) cannot be patched: the follower reads a new `LiveState`.

    A snapshot shares with the previous one the values (tuples, mappings) of every kind
    that did not change since, the very objects: a change costs what it changes, and
    readers may tell an unchanged kind by identity.

    Concurrency: owned by one task (the store follower); `snapshot()` values are immutable
    (the mappings in a snapshot are shared between snapshots: read them, never write).
    """

    def __init__(self, prefix: str, *, revision: int) -> None:
        self._prefix = prefix
        self.revision = revision
        self._kinds: dict[str, dict[str, object]] = {kind: {} for kind in _LIVE_KINDS}
        self._sorted: set[str] = set(_LIVE_KINDS)  # kinds whose dicts are in key order
        self._parts: dict[str, tuple[object, ...]] = {}  # kind -> what snapshots hold of it, until it changes
        # Releases whose values were replaced (same key, same name) since the releases' part
        # was made, and each release's place in it: the next part is patched, not remade.
        self._replaced: set[str] = set()
        self._release_at: dict[str, int] = {}
        self._snap: Snapshot | None = None

    def _split(self, key: bytes) -> tuple[str, str] | None:
        text = key.decode()
        if not text.startswith(self._prefix):
            return None
        kind, sep, rest = text[len(self._prefix) :].partition("/")
        return (kind, rest) if sep and kind in self._kinds else None

    def load(self, kvs: Iterable[kv_pb2.KeyValue]) -> None:
        for kv in kvs:
            where = self._split(kv.key)
            if where is not None:
                self._set(where[0], where[1], _parse_or_skip(where[0], where[1], kv))
        self._snap = None

    def _set(self, kind: str, rest: str, value: object) -> None:
        values = self._kinds[kind]
        if (
            kind == "releases"
            and kind in self._parts
            and isinstance(value, model.Release)
            and value.name == rest
            and rest in self._release_at
        ):
            # One release's new value (a NextBatch, a status write): the part is patched in
            # place of that release when the next snapshot is made (the key set is the same).
            self._replaced.add(rest)
            values[rest] = value
            return
        self._parts.pop(kind, None)
        if value is None:
            values.pop(rest, None)
            return
        if rest not in values:
            self._sorted.discard(kind)
        values[rest] = value

    def apply(self, events: Sequence[kv_pb2.Event]) -> dict[str, dict[str, tuple[object, object]]]:
        """Apply one watch batch; per changed kind, key -> (old value, new value) (None: absent).

        Keys outside the live kinds (history, the leader key) only move the revision. Events
        of a revision the state already holds (this replica's own write, applied from its
        transaction's answer by `apply_committed`) change nothing.
        """
        changed: dict[str, dict[str, tuple[object, object]]] = {}
        # (etcd never splits one revision's events between watch responses: a batch holds all
        # of a revision or none of it)
        held = self.revision
        for ev in events:
            kv = ev.kv
            if kv.mod_revision <= held:
                continue
            self.revision = max(self.revision, kv.mod_revision)
            where = self._split(kv.key)
            if where is None:
                continue
            kind, rest = where
            old = self._kinds[kind].get(rest)
            new = None if ev.type == kv_pb2.Event.DELETE else _parse_or_skip(kind, rest, kv)
            self._set(kind, rest, new)
            first = changed.setdefault(kind, {}).get(rest)
            changed[kind][rest] = (old if first is None else first[0], new)
        if changed:
            self._snap = None
        elif self._snap is not None and self._snap.revision != self.revision:
            self._snap = replace(self._snap, revision=self.revision)
        return changed

    def apply_committed(
        self, revision: int, puts: Sequence[kv_pb2.KeyValue]
    ) -> dict[str, dict[str, tuple[object, object]]] | None:
        """Apply a transaction of puts etcd committed at `revision` (this replica's own write,
        from its answer), as `apply` would its watch events, when `revision` is the next one
        after the state's: the state is then exactly etcd's at `revision`, and the watch's
        events for it are no-ops. None when the state is further behind (other changes come
        first: the watch brings them and this one in order)."""
        if revision != self.revision + 1:
            return None
        return self.apply([kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv) for kv in puts])

    def release(self, name: str) -> model.Release | None:
        """One release as last applied (no snapshot built)."""
        found = self._kinds["releases"].get(name)
        return found if isinstance(found, model.Release) else None

    def _values(self, kind: str) -> list[tuple[str, object]]:
        values = self._kinds[kind]
        if kind not in self._sorted:
            self._kinds[kind] = values = dict(sorted(values.items()))
            self._sorted.add(kind)
        return list(values.items())

    def _part(self, kind: str) -> tuple[object, ...]:
        """What a snapshot holds of `kind`, made once per change of the kind."""
        found = self._parts.get(kind)
        if found is not None:
            if kind == "releases" and self._replaced:
                found = self._patched_releases(found)
            return found
        items = self._values(kind)
        if kind == "releases":
            releases = tuple(v for _, v in items)
            by_name = {r.name: r for r in releases}  # type: ignore[attr-defined]
            # (a key whose value names another release is never patched: `_set` remakes the part)
            self._release_at = {name: i for i, (name, _) in enumerate(items) if by_name.get(name) is releases[i]}
            self._replaced.clear()
            found = (releases, by_name)
        elif kind == "replicas":
            replica_proxies: dict[str, str] = {}
            replica_nodes: dict[str, frozenset[str]] = {}
            for identity, proxies in items:
                replica_proxies.update(proxies)  # type: ignore[call-overload]
                replica_nodes[identity] = frozenset(proxies)  # type: ignore[call-overload]
            found = (replica_proxies, replica_nodes)
        elif kind == "clusterendpoints":
            cluster_endpoints: list[model.ClusterEndpoints] = []
            for _, each in items:
                cluster_endpoints += cast("tuple[model.ClusterEndpoints, ...]", each)
            found = (tuple(cluster_endpoints),)
        elif kind == "progress":
            found = ({i: p[0] for i, p in items}, {i: p[1] for i, p in items})  # type: ignore[index]
        else:
            found = (tuple(v for _, v in items),)
        self._parts[kind] = found
        return found

    def _patched_releases(self, part: tuple[object, ...]) -> tuple[object, ...]:
        """The releases' part with the values replaced since it was made put in their places:
        what `_part` would make from scratch, in C-speed copies (at 1,000 releases a remake
        cost 0.35-0.7 ms of the loop on every NextBatch and every status write)."""
        releases, by_name = cast("tuple[tuple[model.Release, ...], dict[str, model.Release]]", part)
        values = self._kinds["releases"]
        patched = list(releases)
        names = dict(by_name)
        for name in self._replaced:
            value = cast(model.Release, values[name])
            patched[self._release_at[name]] = value
            names[name] = value
        self._replaced.clear()
        found = (tuple(patched), names)
        self._parts["releases"] = found
        return found

    def snapshot(self) -> Snapshot:
        """The state as a `Snapshot` (kinds in key order, as a fresh read gives them)."""
        if self._snap is not None and self._snap.revision == self.revision:
            return self._snap
        releases, by_name = self._part("releases")
        replica_proxies, replica_nodes = self._part("replicas")
        replica_progress, replica_fleet = self._part("progress")
        self._snap = Snapshot(
            revision=self.revision,
            services=self._part("services")[0],  # type: ignore[arg-type]
            versions=self._part("versions")[0],  # type: ignore[arg-type]
            releases=releases,  # type: ignore[arg-type]
            clusters=self._part("clusters")[0],  # type: ignore[arg-type]
            known_clusters=self._part("knownclusters")[0],  # type: ignore[arg-type]
            cluster_endpoints=self._part("clusterendpoints")[0],  # type: ignore[arg-type]
            replica_proxies=replica_proxies,  # type: ignore[arg-type]
            replica_nodes=replica_nodes,  # type: ignore[arg-type]
            replica_progress=replica_progress,  # type: ignore[arg-type]
            replica_fleet=replica_fleet,  # type: ignore[arg-type]
            by_name=by_name,  # type: ignore[arg-type]
        )
        return self._snap
