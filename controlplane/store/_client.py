"""The connection every record kind of the store shares: calls, transactions, paged ranges,
leases and watches on etcd v3, spoken natively on grpc.aio.

Owns: the channels (the loop's grpc.aio one, and a blocking one whose calls run in a few
threads, `_Blocking`), the call deadline, the translation of every etcd failure into
`Unavailable` or `LeaseLost` (one seam: `_unavailable`), ranges read page by page at one
revision, transactions (and telling listeners of this client's own committed puts at
once, `on_committed`), leases, watches that resume from a revision, and the refusal of
etcd versions with the 3.5.0-3.5.2 data-inconsistency bug. It knows a key only as
`prefix + kind/...`; what each kind holds and how its writes are guarded belongs to the
record modules built on `EtcdClient` (releases, inventory, agents, replicas, tokens, live).

Concurrency: one grpc.aio channel per client; all methods are coroutines safe to call
concurrently from one event loop. Must not import: graylane.xds.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import grpc
from etcd3.etcdrpc import kv_pb2, rpc_pb2, rpc_pb2_grpc
from google.protobuf.message import Message
from graylane.controlplane.errors import LeaseLost, Unavailable, UnsupportedEtcd

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/graylane/v1/"
# Shorter than the CLI's deadline (15 s), so a caller sees UNAVAILABLE "etcd unavailable"
# from the server rather than its own DEADLINE_EXCEEDED.
_CALL_TIMEOUT = 5.0
# Keys per page of a range; cut while a page is over the receive limit (events may be large).
_PAGE = 256
_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
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


class LeaseHolder(Protocol):
    """What a holder of etcd leases uses (the leader, replicas, the agents' hub): keys it
    writes under a lease vanish when it stops refreshing it."""

    async def grant_lease(self, ttl_seconds: int) -> int: ...

    async def keep_alive(self, lease: int) -> int: ...

    async def revoke_lease(self, lease: int) -> None: ...


def refuse_version(version: str) -> None:
    """Raise UnsupportedEtcd for etcd 3.5.0-3.5.2 (a crash can lose a committed transaction)."""
    nums = tuple(int(x) for x in re.findall(r"\d+", version)[:3])
    if nums in _BAD_VERSIONS:
        raise UnsupportedEtcd(
            f"etcd {version} is affected by the 3.5.0-3.5.2 data-inconsistency bug "
            "(a crash can lose a committed transaction); use 3.4.x or 3.5.3 and later"
        )


# `callback(revision, puts, guards)`: see `EtcdClient.on_committed`.
Committed = Callable[[int, Sequence[kv_pb2.KeyValue], Mapping[bytes, int]], None]


@dataclass(frozen=True, slots=True)
class Commit:
    """A transaction of puts this client had etcd commit, as its answer told it (see
    `EtcdClient.on_committed`): the revision, the puts, the guards it required."""

    revision: int
    puts: Sequence[kv_pb2.KeyValue]
    guards: Mapping[bytes, int]


class Compacted(Exception):
    """A watch asked for a revision etcd has compacted away; re-read and continue."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's prefix range)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


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

    The hop has its own price while the process serves few streams and nothing queues at
    the completion queue: the worker waits for the GIL the loop holds to start the call and
    again to finish it, and its answer is put among the loop's ready callbacks at once,
    ahead of work already woken (a push). So the owner may name when calls go on the loop's
    channel instead (`EtcdClient.unary_on_loop_while`): while the fleet is small. Measured
    (bench/nextbatch_profile.py, 1,000 releases, calls alternated step by step between the
    two paths, 4 runs of 6-20 steps a path, load 2.5-4 on 2 cores): this process's CPU per
    step 3-14 % lower on the loop's channel in each run; NextBatch -> ACK lower in 3 runs and
    higher in 1, `reached` lower in 2, even in 1, higher in 1 (the machine's noise is larger).
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


class EtcdClient:
    """The shared core: one prefix, one channel (and its blocking twin), and the calls every
    record kind is read and written with. The record classes extend it; `EtcdStore` joins
    them over one instance, so they share its channels and threads."""

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
        self._committed: list[Committed] = []
        # Unary calls go on the loop's channel while this says so (see `_Blocking`).
        self._aio_when: Callable[[], bool] | None = None

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

    # ----------------------------------------------------------------- low level

    async def _call(self, method: object, request: Message) -> object:
        try:
            return await self._unary(method, request, _CALL_TIMEOUT)
        except grpc.RpcError as exc:
            raise _unavailable(exc) from exc

    def unary_on_loop_while(self, predicate: Callable[[], bool] | None) -> None:
        """Send unary calls (not lease keep-alives) on the loop's grpc.aio channel while
        `predicate()` is true, asked before each call; on the blocking channel in a thread
        otherwise (None: always, as without this). For an owner that knows when nothing
        crowds the completion queue: a process serving a handful of streams, where the
        thread's hops cost more than they save (see `_Blocking`). Either channel answers
        alike, with the same errors; the deadline is the same."""
        self._aio_when = predicate

    async def _unary(self, method: object, request: Message, timeout: float) -> Any:
        """`method(request)` on the blocking channel in a thread when there is one and the
        owner's predicate (`unary_on_loop_while`) does not send it on the loop's; else on the loop's."""
        blocking = self._blocking.methods.get(method) if self._blocking is not None else None
        if blocking is None or self._blocking is None or (self._aio_when is not None and self._aio_when()):
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
        resp: rpc_pb2.TxnResponse = await self._call(self._kv.Txn, req)
        if self._committed and resp.succeeded and success and all(op.HasField("request_put") for op in success):
            self._tell_committed(int(resp.header.revision), success, compare)
        return resp

    def on_committed(self, callback: Committed) -> Callable[[], None]:
        """Call `callback(revision, puts, guards)` for each transaction of this client that
        etcd committed and that only puts keys, as soon as its answer is back (before the
        watch brings the same revision): `puts` as the watch would show them (key, value,
        lease, `mod_revision` the transaction's revision; create_revision and version are
        not known, 0), `guards` the key -> mod_revision the transaction required (0: the
        key absent). A failed transaction, or one that reads or deletes, tells nothing.
        Called on the loop, in the writer's task: a callback must be quick and not raise.
        Returns the function that removes it."""
        self._committed.append(callback)

        def remove() -> None:
            if callback in self._committed:
                self._committed.remove(callback)

        return remove

    def _tell_committed(
        self, revision: int, success: Sequence[rpc_pb2.RequestOp], compare: Sequence[rpc_pb2.Compare]
    ) -> None:
        puts = [
            kv_pb2.KeyValue(
                key=op.request_put.key, value=op.request_put.value, lease=op.request_put.lease, mod_revision=revision
            )
            for op in success
        ]
        guards: dict[bytes, int] = {}
        for c in compare:
            if c.result != rpc_pb2.Compare.EQUAL:
                continue
            if c.target == rpc_pb2.Compare.MOD:
                guards[c.key] = int(c.mod_revision)
            elif c.target == rpc_pb2.Compare.CREATE and c.create_revision == 0:
                guards[c.key] = 0
        for callback in list(self._committed):
            try:
                callback(revision, puts, guards)
            except Exception:  # a listener's failure is never the writer's: the watch still brings it
                log.exception("a listener of committed writes failed")

    @staticmethod
    def _put(key: bytes, value: bytes, *, lease: int = 0) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))

    @staticmethod
    def _delete_prefix(prefix: bytes) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(
            request_delete_range=rpc_pb2.DeleteRangeRequest(key=prefix, range_end=_range_end(prefix))
        )

    def _split_key(self, key: bytes) -> tuple[str, str] | None:
        text = key.decode()
        if not text.startswith(self._prefix):
            return None
        kind, sep, rest = text[len(self._prefix) :].partition("/")
        return (kind, rest) if sep else None

    # ----------------------------------------------------------------- leases

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

    async def watch_with_commits(
        self, *, start_revision: int, key: bytes | None = None
    ) -> AsyncGenerator[list[rpc_pb2.Event] | Commit, None]:
        """`watch`'s batches, and between them this client's own committed writes (of `key`
        only, when given) as soon as their answers are back, in the order both reach the
        loop: a commit usually comes before the watch brings its revision, sometimes after.
        Ends when the watch ends; raises what it raises. Close it (`contextlib.aclosing`)
        to stop the watch at once."""
        inbox: collections.deque[list[rpc_pb2.Event] | Commit] = collections.deque()
        wake = asyncio.Event()

        def committed(revision: int, puts: Sequence[kv_pb2.KeyValue], guards: Mapping[bytes, int]) -> None:
            if key is None or any(kv.key == key for kv in puts):
                inbox.append(Commit(revision, puts, guards))
                wake.set()

        async def read() -> None:
            async for events in self.watch(start_revision=start_revision, key=key):
                inbox.append(events)
                wake.set()

        remove = self.on_committed(committed)
        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: wake.set())
        try:
            while True:
                while inbox:
                    yield inbox.popleft()
                if reader.done():
                    reader.result()  # the watch's error, if it ended on one
                    return
                await wake.wait()
                wake.clear()
        finally:
            remove()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@dataclass
class _Ranged:
    """Keys read at one revision, possibly over several pages."""

    revision: int
    kvs: list[kv_pb2.KeyValue] = field(default_factory=list)

    def add(self, resp: rpc_pb2.RangeResponse) -> None:
        if not self.revision:
            self.revision = resp.header.revision
        self.kvs.extend(resp.kvs)


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
