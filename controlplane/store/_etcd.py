"""EtcdStore: releases, services, versions and events in etcd v3, spoken natively on grpc.aio.

Owns: the key layout under the prefix (default `/graylane/v1/`), serialisation (proto
JSON, so `etcdctl get` stays readable), guarded transactions, watches that resume from a
revision, and the refusal of etcd versions with the 3.5.0-3.5.2 data-inconsistency bug.

Key layout (below the prefix):
    services/<name>                      Service
    versions/<service>/<version>         Version
    releases/<name>                      Release (spec + status)
    events/<release>/<sequence:016d>     Event, appended in the same txn as the change
    clusters/<name>                      AgentHello of the cluster's agent, under its lease
    clusterendpoints/<name>              EndpointSnapshot the agent reported, under its lease
    knownclusters/<name>                 AgentHello last registered for the cluster (no lease: kept)
    leader                               identity of the replica that advances releases, under its lease
    lanes/<lane>                         name of the release that last claimed the lane (a create or an
                                         apply writes it, guarded by the value it checked against)
    tombstones/<release>/<generation>    a deleted release: its last state, who deleted it, why (JSON);
                                         generation is the create_revision of its release key
    tombstoneevents/<release>/<generation>/<sequence>  its events, kept by the delete
    bootstrapped                         id of the first admin token `serve --auth` made (once per installation)
    tokens/<id>                          an API token record (JSON; the SHA-256 of its secret, never the secret)
    replicas/<identity>                  {node id: admin address} of the proxies on that replica, under its lease
    progress/<identity>                  {release: [lane fingerprint, proxies, converged(, scoped out)]} as that replica
                                         counts its own proxies and its agents', under its lease

An agent's keys live on an etcd lease kept alive by the replica holding the agent's
stream: when the agent (or that replica) dies, its cluster and endpoints expire with it.

Every release change is one transaction guarded by the release's mod_revision that also
writes its event (and, on success, the services' new stable versions), so a failed or
conflicting call changes nothing.

Concurrency: one grpc.aio channel per store; all methods are coroutines safe to call
concurrently from one event loop. Must not import: graylane.xds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC
from typing import Any, TypeVar, cast

import grpc
from etcd3.etcdrpc import kv_pb2, rpc_pb2, rpc_pb2_grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from graylane.controlplane import auth, model
from graylane.controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    LeaseLost,
    NotFound,
    Unavailable,
    UnsupportedEtcd,
)
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import release_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/graylane/v1/"
# Shorter than the CLI's deadline (15 s), so a caller sees UNAVAILABLE "etcd unavailable"
# from the server rather than its own DEADLINE_EXCEEDED.
_CALL_TIMEOUT = 5.0
# Keys per page of a range; cut while a page is over the receive limit (events may be large).
_PAGE = 256
_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
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
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # A reply may hold large values (events with long reasons); etcd refuses any single
    # value above its request limit (1.5 MiB by default), and ranges are paged.
    ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES),
    # gRPC's default reconnect backoff grows to 120 s (seen: 9-16 s to notice etcd is
    # back); etcd members are near, so retry every second at most.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
T = TypeVar("T")
# Threads for blocking etcd calls (`_Blocking`): enough for the API's writes in flight.
_BLOCKING_THREADS = 16
_LEASE_THREADS = 4
# etcd 3.5.0-3.5.2 can lose a committed transaction after a crash (fixed in 3.5.3).
_BAD_VERSIONS = {(3, 5, 0), (3, 5, 1), (3, 5, 2)}


def refuse_version(version: str) -> None:
    """Raise UnsupportedEtcd for etcd 3.5.0-3.5.2 (a crash can lose a committed transaction)."""
    nums = tuple(int(x) for x in re.findall(r"\d+", version)[:3])
    if nums in _BAD_VERSIONS:
        raise UnsupportedEtcd(
            f"etcd {version} is affected by the 3.5.0-3.5.2 data-inconsistency bug "
            "(a crash can lose a committed transaction); use 3.4.x or 3.5.3 and later"
        )


class Compacted(Exception):
    """A watch asked for a revision etcd has compacted away; re-read and continue."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class ReplicaProgress:
    """How many of one replica's proxies carry a release's lane, and which lane it counted
    against (a fingerprint: counts made against another value of the lane are stale)."""

    lane: str
    proxies: int
    converged: int
    # Proxies whose scope holds none of the release's services (left out of `proxies`);
    # written only when some are, so replicas that predate it read every other count.
    scoped_out: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaFleet:
    """Which proxies one replica counts, enough to recognise them once they reconnect
    elsewhere: its agents' proxies as a count per cluster, and the node ids of its own
    streams. `left`: the replica stopped on purpose (its proxies are reconnecting)."""

    clusters: Mapping[str, int] = field(default_factory=dict)
    nodes: frozenset[str] = frozenset()
    left: bool = False


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


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's prefix range)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _dump(message: Message) -> bytes:
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


def _load(data: bytes, message: Message) -> Message:
    json_format.Parse(data, message, ignore_unknown_fields=True)
    return message


def _target(endpoints: str) -> str:
    """A gRPC target for `host:port[,host:port]`; IP literals fail over in order."""
    parts = [p.strip() for p in endpoints.split(",") if p.strip()]
    if not parts:
        raise ValueError("no etcd endpoint given")
    if len(parts) > 1 and all(re.match(r"^\d+\.\d+\.\d+\.\d+:\d+$", p) for p in parts):
        return "ipv4:" + ",".join(parts)
    if len(parts) > 1:
        log.warning("several etcd endpoints with host names: using %s only", parts[0])
    return parts[0]


_LEASE_GONE = "requested lease not found"


def _unavailable(exc: grpc.RpcError) -> Unavailable:
    """Every etcd failure as a GraylaneError: a control plane degrades on them, never exits.

    UNAVAILABLE / DEADLINE_EXCEEDED: etcd out of reach. UNKNOWN is how etcd answers while it
    has no quorum or elects a leader ("context deadline exceeded", "etcdserver: request
    timed out", "leader changed", "no leader"): transient too. NOT_FOUND "requested lease
    not found" is an expired lease (`LeaseLost`: its holder grants a new one). Anything
    else (a request etcd refuses, "database space exceeded") leaves the store unusable for
    that call all the same: Unavailable, with etcd's code and words, and logged.
    """
    call = cast(grpc.Call, exc)  # both the asyncio and the blocking errors carry the status
    code, details = call.code(), call.details() or ""
    if code == grpc.StatusCode.NOT_FOUND and _LEASE_GONE in details:
        return LeaseLost(f"etcd lease expired: {details}")
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN):
        log.warning("etcd refused a request: %s: %s", code.name, details)
    return Unavailable(f"etcd unavailable: {code.name}: {details}")


class _Blocking:
    """Unary etcd calls (and lease keep-alives) on a blocking channel, run in a few threads.

    Every grpc.aio completion of the process comes to the loop through one completion
    queue and one poller thread, in order: a change fanned out to thousands of ADS streams
    queues thousands of completions there, and an etcd reply waited behind them (measured at
    3,000 streams: p99 0.7-1.5 s on the asyncio channel, 36 ms on a blocking one in a thread
    during the same changes, 81 ms at most from another process). A blocking call has its
    own completion queue; its result reaches the loop by the loop's own wake-up, so etcd
    reads, writes and lease keep-alives no longer wait for the fleet. The call is still
    issued from the loop: a stalled loop stops refreshing leases as before.
    """

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        options = list(CHANNEL_OPTIONS)
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=_BLOCKING_THREADS, thread_name_prefix="etcd")
        # Keep-alives on threads of their own: calls hung on an etcd without quorum must not
        # hold a lease's refresh back until it expires.
        self.lease_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=_LEASE_THREADS, thread_name_prefix="etcd-lease"
        )
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        # aio stub method -> the same method on the blocking channel
        self.methods: dict[object, Any] = {}

    def adopt(self, aio_stub: object, blocking_stub: object) -> None:
        for name, method in vars(aio_stub).items():
            self.methods[method] = getattr(blocking_stub, name)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.lease_pool.shutdown(wait=False, cancel_futures=True)
        self.channel.close()


class EtcdStore:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        prefix: str = DEFAULT_PREFIX,
        blocking_target: str = "",
        blocking_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not prefix.endswith("/"):
            prefix += "/"
        self._channel = channel
        self._prefix = prefix
        self._kv = rpc_pb2_grpc.KVStub(channel)
        self._watch = rpc_pb2_grpc.WatchStub(channel)
        self._maintenance = rpc_pb2_grpc.MaintenanceStub(channel)
        self._lease = rpc_pb2_grpc.LeaseStub(channel)
        self._blocking: _Blocking | None = None
        if blocking_target:
            self._blocking = _Blocking(blocking_target, blocking_credentials)
            self._blocking.adopt(self._kv, rpc_pb2_grpc.KVStub(self._blocking.channel))
            self._blocking.adopt(self._maintenance, rpc_pb2_grpc.MaintenanceStub(self._blocking.channel))
            self._blocking.adopt(self._lease, self._blocking.lease)
        self.full_reads = 0  # reads of every live key (snapshot, live_state): counted for the bench

    @property
    def prefix(self) -> str:
        return self._prefix

    async def close(self) -> None:
        if self._blocking is not None:
            self._blocking.close()
        await self._channel.close()

    # ----------------------------------------------------------------- keys

    def _key(self, *parts: str) -> bytes:
        return (self._prefix + "/".join(parts)).encode()

    def release_key(self, name: str) -> bytes:
        return self._key("releases", name)

    def _event_key(self, release: str, sequence: int) -> bytes:
        return self._key("events", release, f"{sequence:016d}")

    # ----------------------------------------------------------------- low level

    async def _call(self, method: object, request: Message) -> object:
        try:
            return await self._unary(method, request, _CALL_TIMEOUT)
        except grpc.RpcError as exc:
            raise _unavailable(exc) from exc

    async def _unary(self, method: object, request: Message, timeout: float) -> Any:
        """`method(request)` on the blocking channel in a thread when there is one, else on the loop's."""
        blocking = self._blocking.methods.get(method) if self._blocking is not None else None
        if blocking is None or self._blocking is None:
            return await method(request, timeout=timeout)  # type: ignore[operator]
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        return await loop.run_in_executor(self._blocking.pool, _before, deadline, functools.partial(blocking, request))

    async def server_version(self) -> str:
        status = await self._call(self._maintenance.Status, rpc_pb2.StatusRequest())
        return str(status.version)  # type: ignore[attr-defined]

    async def check_version(self) -> str:
        version = await self.server_version()
        refuse_version(version)
        return version

    async def probe(self, *, timeout: float) -> None:
        """One linearizable read (it needs an etcd quorum); Unavailable when it fails."""
        req = rpc_pb2.RangeRequest(key=self._key("leader"), count_only=True)
        try:
            await self._unary(self._kv.Range, req, timeout)
        except grpc.RpcError as exc:
            raise _unavailable(exc) from exc

    async def _range(self, prefix: bytes, *, revision: int = 0) -> _Ranged:
        """Every key under `prefix` at one revision (`revision` 0: the current one), paged."""
        ranged = _Ranged(revision=revision)
        await self._page(ranged, prefix, prefix)
        return ranged

    async def _page(self, into: _Ranged, prefix: bytes, start: bytes) -> None:
        """Append the keys from `start` to the end of `prefix`, page by page, at `into.revision`
        (fixed by the first page when it is 0). A page over the receive limit is cut to a quarter."""
        end = _range_end(prefix)
        limit = _PAGE
        while True:
            req = rpc_pb2.RangeRequest(key=start, range_end=end, revision=into.revision, limit=limit)
            try:
                resp = await self._unary(self._kv.Range, req, _CALL_TIMEOUT)
            except grpc.RpcError as exc:
                if cast(grpc.Call, exc).code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1:
                    limit = max(1, limit // 4)
                    continue
                raise _unavailable(exc) from exc
            into.add(resp)
            if not resp.more or not resp.kvs:
                return
            start = resp.kvs[-1].key + b"\0"

    async def _get(self, key: bytes) -> kv_pb2.KeyValue | None:
        resp = await self._call(self._kv.Range, rpc_pb2.RangeRequest(key=key))
        kvs = resp.kvs  # type: ignore[attr-defined]
        return kvs[0] if kvs else None

    async def _txn(
        self, compare: Sequence[rpc_pb2.Compare], success: Sequence[rpc_pb2.RequestOp]
    ) -> rpc_pb2.TxnResponse:
        req = rpc_pb2.TxnRequest(compare=list(compare), success=list(success))
        return await self._call(self._kv.Txn, req)

    @staticmethod
    def _put(key: bytes, value: bytes, *, lease: int = 0) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))

    @staticmethod
    def _delete_prefix(prefix: bytes) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(
            request_delete_range=rpc_pb2.DeleteRangeRequest(key=prefix, range_end=_range_end(prefix))
        )

    # ----------------------------------------------------------------- reads

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

    def _lane_claim(self, release: model.Release, claimed: int) -> tuple[rpc_pb2.Compare, rpc_pb2.RequestOp]:
        """Guard: the lane's claim is as the caller checked it (at mod_revision `claimed`, 0:
        absent); and the write that claims it for `release`. Two writers that checked the
        lane free against the same state cannot both claim it."""
        key = self._key("lanes", release.spec.lane)
        if claimed:
            same = rpc_pb2.Compare(
                key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=claimed
            )
        else:
            same = rpc_pb2.Compare(
                key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
            )
        return same, self._put(key, release.name.encode())

    def _split_key(self, key: bytes) -> tuple[str, str] | None:
        text = key.decode()
        if not text.startswith(self._prefix):
            return None
        kind, sep, rest = text[len(self._prefix) :].partition("/")
        return (kind, rest) if sep else None

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

    async def get_service(self, name: str) -> model.Service | None:
        return (await self.get_service_at(name))[0]

    async def get_service_at(self, name: str) -> tuple[model.Service | None, int]:
        """The service and the revision it was last written at (0: not registered), for a
        `put_service(..., if_revision=...)` that must not overwrite a concurrent change."""
        kv = await self._get(self._key("services", name))
        if kv is None:
            return None, 0
        return model.service_from_proto(_load(kv.value, pb.Service()), stored=True), int(kv.mod_revision)  # type: ignore[arg-type]

    async def list_services(self) -> list[model.Service]:
        resp = await self._range(self._key("services") + b"/")
        return [model.service_from_proto(_load(kv.value, pb.Service()), stored=True) for kv in resp.kvs]  # type: ignore[arg-type]

    async def list_versions(self, service: str = "") -> list[model.Version]:
        prefix = self._key("versions", service) + b"/" if service else self._key("versions") + b"/"
        resp = await self._range(prefix)
        return [model.version_from_proto(_load(kv.value, pb.Version()), stored=True) for kv in resp.kvs]  # type: ignore[arg-type]

    # ----------------------------------------------------------------- writes

    async def put_service(self, service: model.Service, *, if_revision: int | None = None) -> None:
        """Write `service`; with `if_revision`, only if the key is still at that revision (0:
        still absent), else Conflict and nothing written: a check made on the value read
        (PutService's stable-version guard) holds for the value replaced."""
        key = self._key("services", service.name)
        compare = (
            []
            if if_revision is None
            else [
                rpc_pb2.Compare(
                    key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=if_revision
                )
            ]
        )
        resp = await self._txn(compare, [self._put(key, _dump(model.service_to_proto(service)))])
        if not resp.succeeded:
            raise Conflict(
                f"service {service.name!r} was changed by another request meanwhile; read it again and retry"
            )

    async def put_version(self, version: model.Version) -> None:
        key = self._key("versions", version.service, version.name)
        await self._txn([], [self._put(key, _dump(model.version_to_proto(version)))])

    # ----------------------------------------------------------------- agents

    async def grant_lease(self, ttl_seconds: int) -> int:
        resp = await self._call(self._lease.LeaseGrant, rpc_pb2.LeaseGrantRequest(TTL=ttl_seconds))
        return int(resp.ID)  # type: ignore[attr-defined]

    async def keep_alive(self, lease: int) -> int:
        """Refresh `lease`; its remaining TTL in seconds, 0 when it has already expired."""
        if self._blocking is not None:
            loop = asyncio.get_running_loop()
            try:
                deadline = time.monotonic() + _CALL_TIMEOUT
                return await loop.run_in_executor(
                    self._blocking.lease_pool, _keep_alive_blocking, self._blocking.lease, lease, deadline
                )
            except grpc.RpcError as exc:
                raise _unavailable(exc) from exc
        call = self._lease.LeaseKeepAlive()
        try:
            async with asyncio.timeout(_CALL_TIMEOUT):
                await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease))
                resp = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        except TimeoutError as exc:
            raise Unavailable("etcd did not answer a lease keep-alive in time") from exc
        finally:
            call.cancel()
        return int(resp.TTL) if resp is not grpc.aio.EOF else 0

    async def revoke_lease(self, lease: int) -> None:
        try:
            await self._call(self._lease.LeaseRevoke, rpc_pb2.LeaseRevokeRequest(ID=lease))
        except LeaseLost:
            pass  # already expired: nothing is attached to it any more

    async def put_agent_metrics(self, cluster: str, origin: str, report: bytes, lease: int) -> None:
        """Share one agent metrics report (serialised `MetricsReport`) with the other replicas:
        written over the cluster's last one under the agent's lease; each write reaches every
        replica's watch as an event (`agent_metrics_in`), so none is lost to the overwrite.
        `origin` is the writing replica, which has filed the report already."""
        value = origin.encode() + b"\n" + report
        await self._txn([], [self._put(self._key("agentmetrics", cluster), value, lease=lease)])

    def agent_metrics_in(self, events: Sequence[kv_pb2.Event]) -> list[tuple[str, str, bytes]]:
        """(cluster, origin replica, serialised MetricsReport) of each shared report in a watch batch."""
        prefix = self._key("agentmetrics") + b"/"
        out = []
        for ev in events:
            if ev.type == kv_pb2.Event.PUT and ev.kv.key.startswith(prefix):
                origin, _, report = ev.kv.value.partition(b"\n")
                out.append((ev.kv.key[len(prefix) :].decode(), origin.decode(), report))
        return out

    async def register_cluster(self, info: model.ClusterInfo, lease: int) -> None:
        """Claim `info.name` for this agent under `lease`.

        A cluster name belongs to one agent (its `agent_id`) while that agent's lease lives;
        the same agent may claim it again (after its own restart, or a replica's), any other
        agent is refused with AlreadyExists.
        """
        key = self._key("clusters", info.name)
        value = _dump(model.cluster_to_proto(info))
        # The lasting record that the cluster exists, so a replica that starts after the
        # leases expired still knows which clusters to wait for (see `known_clusters`).
        known = self._put(self._key("knownclusters", info.name), value)
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        resp = await self._txn([absent], [self._put(key, value, lease=lease), known])
        if resp.succeeded:
            return
        current = await self._get(key)
        if current is not None:
            holder = _load(current.value, apb.AgentHello())
            if holder.agent_id != info.agent_id:  # type: ignore[attr-defined]
                raise AlreadyExists(
                    f"cluster {info.name!r} is served by another agent ({holder.agent_id}); "  # type: ignore[attr-defined]
                    "stop it first, or give this agent another cluster name"
                )
            same = rpc_pb2.Compare(
                key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=current.mod_revision
            )
        else:
            same = absent  # expired in between: claim it afresh
        if not (await self._txn([same], [self._put(key, value, lease=lease), known])).succeeded:
            raise Conflict(f"cluster {info.name!r} was claimed concurrently; reconnect")

    async def known_clusters(self) -> frozenset[str]:
        """Every cluster an agent has ever registered under this prefix (no lease: it outlives them)."""
        prefix = self._key("knownclusters", "")
        resp = await self._range(prefix)
        return frozenset(kv.key[len(prefix) :].decode() for kv in resp.kvs)

    async def forget_cluster(self, name: str) -> None:
        """Drop a known cluster whose agent is not connected (starting replicas stop waiting for it)."""
        live = self._key("clusters", name)
        known = self._key("knownclusters", name)
        absent = rpc_pb2.Compare(
            key=live, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        present = rpc_pb2.Compare(
            key=known, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.GREATER, create_revision=0
        )
        delete = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=known))
        if (await self._txn([absent, present], [delete])).succeeded:
            return
        if await self._get(live) is not None:
            raise FailedPrecondition(f"cluster {name!r} has a connected agent; stop the agent first")
        raise NotFound(f"cluster {name!r} is not known")

    async def put_cluster_endpoints(self, cluster: str, items: Sequence[model.ClusterEndpoints], lease: int) -> int:
        """Replace the cluster's endpoints under `lease`; the etcd revision that holds them."""
        key = self._key("clusterendpoints", cluster)
        resp = await self._txn([], [self._put(key, _dump(model.cluster_endpoints_to_proto(items)), lease=lease)])
        return int(resp.header.revision)

    # ----------------------------------------------------------------- replicas

    async def put_replica_proxies(self, identity: str, proxies: Mapping[str, str], lease: int) -> None:
        """The proxies connected to one replica (node id -> admin address), under its lease."""
        value = json.dumps(dict(sorted(proxies.items()))).encode()
        await self._txn([], [self._put(self._key("replicas", identity), value, lease=lease)])

    async def put_replica_progress(
        self, identity: str, progress: Mapping[str, ReplicaProgress], lease: int, *, fleet: ReplicaFleet | None = None
    ) -> None:
        """What one replica counts per live release (see `ReplicaProgress`) and which proxies
        (see `ReplicaFleet`), under its lease."""
        fleet = fleet or ReplicaFleet()
        value = json.dumps(
            {
                "releases": {
                    name: [p.lane, p.proxies, p.converged] + ([p.scoped_out] if p.scoped_out else [])
                    for name, p in sorted(progress.items())
                },
                "clusters": dict(sorted(fleet.clusters.items())),
                "nodes": sorted(fleet.nodes),
                "left": fleet.left,
            }
        )
        await self._txn([], [self._put(self._key("progress", identity), value.encode(), lease=lease)])

    # ----------------------------------------------------------------- leader

    async def campaign(self, identity: str, lease: int) -> str:
        """Try to become the leader under `lease`; the leader's identity afterwards.

        One key, `leader`, created only if absent and bound to the winner's lease: it
        disappears when the leader resigns (revokes) or stops refreshing its lease.
        """
        key = self._key("leader")
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        resp = await self._txn([absent], [self._put(key, identity.encode(), lease=lease)])
        if resp.succeeded:
            return identity
        return await self.leader() or ""

    async def leader(self) -> str | None:
        current = await self._get(self._key("leader"))
        return current.value.decode() if current is not None else None

    async def create_release(
        self, release: model.Release, event: model.Event, *, lane_claimed: int | None = None
    ) -> model.Release:
        """Create `release` with its event. With `lane_claimed` (from `registry_for`) the
        lane is claimed in the same txn: Conflict when another writer claimed it since."""
        key = self.release_key(release.name)
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        compare = [absent]
        ops = [
            self._put(key, _dump(model.release_to_proto(release))),
            self._put(self._event_key(release.name, event.sequence), _dump(model.event_to_proto(event))),
        ]
        if lane_claimed is not None:
            guard, claim = self._lane_claim(release, lane_claimed)
            compare.append(guard)
            ops.append(claim)
        resp = await self._txn(compare, ops)
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
        compare = [guard]
        ops = [self._put(key, _dump(model.release_to_proto(release)))]
        ops += [self._put(self._event_key(e.release, e.sequence), _dump(model.event_to_proto(e))) for e in events]
        ops += [self._put(self._key("services", s.name), _dump(model.service_to_proto(s))) for s in services]
        if lane_claimed is not None:
            lane_guard, claim = self._lane_claim(release, lane_claimed)
            compare.append(lane_guard)
            ops.append(claim)
        resp = await self._txn(compare, ops)
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

    # ----------------------------------------------------------------- tokens

    async def create_token(self, record: auth.TokenRecord) -> None:
        """Store a token record; ALREADY_EXISTS if its id or its name is taken."""
        key = self._key("tokens", record.token_id)
        if any(r.name == record.name for r in await self.list_tokens()):
            raise AlreadyExists(f"a token named {record.name!r} exists (revoke it first)")
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        resp = await self._txn([absent], [self._put(key, json.dumps(record.to_json()).encode())])
        if not resp.succeeded:
            raise AlreadyExists(f"token id {record.token_id} exists")

    async def create_bootstrap_token(self, record: auth.TokenRecord) -> bool:
        """Store the installation's first admin token, unless one was ever made (False)."""
        marker = self._key("bootstrapped")
        absent = rpc_pb2.Compare(
            key=marker, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        put_record = self._put(self._key("tokens", record.token_id), json.dumps(record.to_json()).encode())
        resp = await self._txn([absent], [put_record, self._put(marker, record.token_id.encode())])
        return bool(resp.succeeded)

    async def get_token(self, token_id: str) -> auth.TokenRecord | None:
        kv = await self._get(self._key("tokens", token_id))
        return _token_or_none(kv.value) if kv is not None else None

    async def list_tokens(self) -> list[auth.TokenRecord]:
        resp = await self._range(self._key("tokens") + b"/")
        return [r for kv in resp.kvs if (r := _token_or_none(kv.value)) is not None]

    async def delete_token(self, token_id: str) -> None:
        resp = await self._call(self._kv.DeleteRange, rpc_pb2.DeleteRangeRequest(key=self._key("tokens", token_id)))
        if not resp.deleted:  # type: ignore[attr-defined]
            raise NotFound(f"no token with id {token_id!r}")

    # ----------------------------------------------------------------- watches

    async def watch(self, *, start_revision: int, key: bytes | None = None) -> AsyncIterator[list[rpc_pb2.Event]]:
        """Yield each batch of changes under the prefix (or one key) from `start_revision`.

        Raises `Compacted` when etcd no longer has that revision: the caller re-reads with
        `snapshot()` and watches again from the snapshot's revision + 1.
        """
        if key is None:
            prefix = self._prefix.encode()
            create = rpc_pb2.WatchCreateRequest(key=prefix, range_end=_range_end(prefix), start_revision=start_revision)
        else:
            create = rpc_pb2.WatchCreateRequest(key=key, start_revision=start_revision)
        requests: asyncio.Queue[rpc_pb2.WatchRequest | None] = asyncio.Queue()
        requests.put_nowait(rpc_pb2.WatchRequest(create_request=create))

        async def outgoing() -> AsyncIterator[rpc_pb2.WatchRequest]:
            while (item := await requests.get()) is not None:
                yield item

        call = self._watch.Watch(outgoing())
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise Unavailable(f"etcd cancelled the watch: {resp.cancel_reason}")
                if resp.events:
                    yield list(resp.events)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        finally:
            requests.put_nowait(None)
            call.cancel()

    async def watch_release(self, name: str, *, start_revision: int) -> AsyncIterator[model.Release | None]:
        """Each new value of one release (None once it is deleted)."""
        async for events in self.watch(start_revision=start_revision, key=self.release_key(name)):
            for ev in events:
                if ev.type == kv_pb2.Event.DELETE:
                    yield None
                else:
                    yield _releases.decode(ev.kv)


class _ReleaseCache:
    """Decoded releases by their exact stored bytes and mod_revision, newest kept (bounded).

    The follower decodes every release write as it arrives; readers of the same value
    (GetRelease, a transition's read) then reuse it instead of parsing the JSON again.
    Release values are immutable, so sharing them is safe.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: dict[tuple[bytes, int], model.Release] = {}

    def clear(self) -> None:
        self._items.clear()

    def decode(self, kv: kv_pb2.KeyValue) -> model.Release:
        key = (kv.value, kv.mod_revision)
        found = self._items.get(key)
        if found is None:
            found = model.release_from_proto(_load(kv.value, pb.Release()), revision=kv.mod_revision)  # type: ignore[arg-type]
            if len(self._items) >= self._size:
                del self._items[next(iter(self._items))]
            self._items[key] = found
        return found


_releases = _ReleaseCache()


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
        return model.hello_from_proto(_load(kv.value, apb.AgentHello()))  # type: ignore[arg-type]
    if kind == "knownclusters":
        with contextlib.suppress(InvalidArgument):  # an unreadable record names no gateway
            return model.hello_from_proto(_load(kv.value, apb.AgentHello()))  # type: ignore[arg-type]
        return None
    if kind == "clusterendpoints":
        return model.cluster_endpoints_from_proto(rest, _load(kv.value, apb.EndpointSnapshot()))  # type: ignore[arg-type]
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
        self._parts.pop(kind, None)
        if value is None:
            values.pop(rest, None)
            return
        if rest not in values:
            self._sorted.discard(kind)
        values[rest] = value

    def apply(self, events: Sequence[kv_pb2.Event]) -> dict[str, dict[str, tuple[object, object]]]:
        """Apply one watch batch; per changed kind, key -> (old value, new value) (None: absent).

        Keys outside the live kinds (history, the leader key) only move the revision.
        """
        changed: dict[str, dict[str, tuple[object, object]]] = {}
        for ev in events:
            kv = ev.kv
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
        elif self._snap is not None:
            self._snap = replace(self._snap, revision=self.revision)
        return changed

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
            return found
        items = self._values(kind)
        if kind == "releases":
            releases = tuple(v for _, v in items)
            found = (releases, {r.name: r for r in releases})  # type: ignore[attr-defined]
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


def _token_or_none(value: bytes) -> auth.TokenRecord | None:
    try:
        return auth.TokenRecord.from_json(json.loads(value))
    except (ValueError, KeyError, TypeError) as exc:
        log.error("skipping an unreadable token record: %s", exc)
        return None


@dataclass
class _Ranged:
    """Keys read at one revision, possibly over several pages."""

    revision: int
    kvs: list[kv_pb2.KeyValue] = field(default_factory=list)

    def add(self, resp: rpc_pb2.RangeResponse) -> None:
        if not self.revision:
            self.revision = resp.header.revision
        self.kvs.extend(resp.kvs)


def _at(release: model.Release, revision: int) -> model.Release:
    return replace(release, revision=revision)


def _event_from_proto(e: pb.Event) -> model.Event:
    return model.Event(
        release=e.release,
        sequence=e.sequence,
        at=e.at.ToDatetime(tzinfo=UTC),
        action=e.action,
        actor=e.actor,
        reason=e.reason,
        from_phase=model.Phase(e.from_phase) if e.from_phase else model.Phase.PENDING,
        to_phase=model.Phase(e.to_phase) if e.to_phase else model.Phase.PENDING,
        from_batch=e.from_batch,
        to_batch=e.to_batch,
        weight=e.weight,
        details=dict(e.details),
    )


class _QueuedTooLong(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A blocking call whose deadline passed while it waited for a thread (never sent)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "waited for a thread past the call's deadline"


def _before(deadline: float, call: Callable[..., T]) -> T:
    """`call(timeout=...)` with what is left of `deadline` (the time queued for a thread counts)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _QueuedTooLong()
    return call(timeout=left)


def _keep_alive_blocking(stub: rpc_pb2_grpc.LeaseStub, lease: int, deadline: float) -> int:
    """One keep-alive on a blocking LeaseKeepAlive stream: the TTL etcd answers, 0 if it ends first.

    The request side stays open until the answer is read (etcd ends the stream on a
    half-close, possibly before answering)."""
    answered = threading.Event()
    left = deadline - time.monotonic()
    if left <= 0:
        raise _QueuedTooLong()

    def requests() -> Iterable[rpc_pb2.LeaseKeepAliveRequest]:
        yield rpc_pb2.LeaseKeepAliveRequest(ID=lease)
        answered.wait(left)

    responses = stub.LeaseKeepAlive(requests(), timeout=left)
    try:
        resp = next(responses, None)
    finally:
        answered.set()
        responses.cancel()
    return int(resp.TTL) if resp is not None else 0


async def connect(
    endpoints: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout: float = 10.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> EtcdStore:
    """Open a store and check the server: reachable in `timeout`, and not a refused version.

    `credentials`: TLS to etcd (an etcd serving https, and requiring client certificates
    when it runs with --client-cert-auth); None: plain text."""
    target = _target(endpoints)
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=list(CHANNEL_OPTIONS))
    store = EtcdStore(channel, prefix=prefix, blocking_target=target, blocking_credentials=credentials)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await store.check_version()
                    break
                except Unavailable:
                    await asyncio.sleep(0.2)
    except TimeoutError as exc:
        await store.close()
        raise Unavailable(f"etcd at {endpoints} did not answer within {timeout:.0f}s") from exc
    except BaseException:
        await store.close()
        raise
    return store
