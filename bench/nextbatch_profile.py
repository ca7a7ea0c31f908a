"""Where the milliseconds of one NextBatch go, stage by stage, at 1,000 services/releases.

The same set-up as bench/store_bench.py (embedded etcd, 1,000 services and releases created
through the API, 100 progressing, real Envoys), then NextBatch on one release, `steps`
times. Every stage of the path is timed by wrapping it in this process (nothing in the
product is changed): the API write, the watch batch and the kept state, the view build,
render, the snapshot cache, each stream's plan, selection, serialisation and send, the
RDS ACK, the convergence pass and its status write. Printed per stage: when it first
started after the NextBatch call (median over steps), how many calls per step, their sum
and the median call, and the thread it ran on; then one step's timeline.

    .venv/bin/python -P bench/nextbatch_profile.py [envoys=1] [steps=10]

Wall times on a shared machine: compare stages within one run, and runs at like load.

Switches (environment): GRAYLANE_PROFILE_ENVOY_TRACE=1 reads each Envoy's own log of its
xDS stream (config:trace, or the components in GRAYLANE_PROFILE_ENVOY_LOG) and prints per
step when each Envoy received the routes and sent its ACK (GRAYLANE_PROFILE_ENVOY_KEEP=DIR
keeps the logs); GRAYLANE_PROFILE_ENVOY_CONCURRENCY=N sets the Envoys' worker threads;
GRAYLANE_BENCH_ENVOY_ALL_STATS=1 drops the bootstraps' stats_matcher (bench/store_bench.py);
GRAYLANE_PROFILE_SET_SLICE=SECONDS sets the data plane's slice of loop time (0: a loop step
after the build and between keys, as before 2026-12-01 evening);
GRAYLANE_PROFILE_TXN_ON_LOOP=1 and GRAYLANE_PROFILE_SWITCH_INTERVAL=SECONDS as below;
GRAYLANE_PROFILE_GAP / _SETTLE (seconds before and after each step: 0.3 / 0.6; the bench's
own are 0.05 / 0), GRAYLANE_PROFILE_SLOWEST=N (timelines of the N slowest steps) and
GRAYLANE_PROFILE_START=1 (step a release not yet live, as the bench does: its first step
adds a cluster).

GRAYLANE_PROFILE_ALTERNATE=NAME[,NAME...] alternates variants step by step in this one
process (step i runs variant i % (names + 1), 0 the code as it is), so each is measured
under the same load and set-up; the marks are then printed per variant as well. Variants:
`aio_txn` (transactions on the loop's grpc.aio channel), `aio_unary` (every unary call
there), `blocking` (every unary call in the worker threads, whatever the store would pick),
`no_publish` (this replica's count not handed to the registry: no progress write).
GRAYLANE_PROFILE_CPROFILE=N runs cProfile on the loop's thread from each NextBatch call to the
last Envoy's ACK, and prints the N functions with the most own time over the steps (the
profiler's cost inflates every figure: read it for shares, not for wall time).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import datetime
import functools
import gc
import io
import os
import pathlib
import pstats
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import store_bench as sb  # noqa: E402
from graylane.controlplane.api.release_service import ReleaseServicer  # noqa: E402
from graylane.controlplane.app import ControlPlane  # noqa: E402
from graylane.controlplane.domain.machine import Action as Move  # noqa: E402
from graylane.controlplane.domain.machine import Cause  # noqa: E402
from graylane.controlplane.local.envoy import EnvoyProcess  # noqa: E402
from graylane.controlplane.local.etcd import EtcdProcess  # noqa: E402
from graylane.controlplane.reconcile import convergence, dataplane, views  # noqa: E402
from graylane.controlplane.store import LiveState, _client, _etcd, connect  # noqa: E402
from graylane.xds import (  # noqa: E402
    cache,
    local,  # noqa: E402
    server,
    tracker,
)
from graylane.xds.resources import ROUTE  # noqa: E402

STEPS = 10
# Seconds before each step and after it (the bench's own steps: 0.05 and 0; env
# GRAYLANE_PROFILE_GAP / GRAYLANE_PROFILE_SETTLE): with the bench's spacing, what a step
# leaves behind (grace writes, progress) falls into the next one.
GAP = float(os.environ.get("GRAYLANE_PROFILE_GAP", "0.3"))
SETTLE = float(os.environ.get("GRAYLANE_PROFILE_SETTLE", "0.6"))
LOG: list[tuple[float, float, str, str]] = []  # (start, end, stage, thread)
# Release writes during the steps: revision -> (issued, answer back on the loop), and when
# the store follower applied each revision from its watch: which comes first?
WRITES: dict[int, tuple[float, float]] = {}
WRITE_VARIANT: dict[int, str] = {}  # revision -> the variant of the step that wrote it
VARIANT = ["as is"]  # the variant of the step under way
APPLIED: dict[int, float] = {}
PLANE: list[Any] = []  # the control plane under test (variants reach into it)


def _record(stage: str, t0: float, t1: float) -> None:
    thread = "loop" if threading.current_thread() is threading.main_thread() else "worker"
    LOG.append((t0, t1, stage, thread))


def _time_sync(owner: Any, name: str, stage: str) -> None:
    original = getattr(owner, name, None)
    if original is None:  # not in this version of the code (the profile also runs on older trees)
        return

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _record(stage, t0, time.perf_counter())

    setattr(owner, name, timed)


def _time_async(owner: Any, name: str, stage: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            _record(stage, t0, time.perf_counter())

    setattr(owner, name, timed)


def instrument() -> None:
    """Wrap every stage of the path (class and module attributes, this process only)."""
    _time_async(_etcd.EtcdStore, "update_release", "etcd: release write (txn)")
    _time_async(ReleaseServicer, "NextBatch", "api: NextBatch handler (entered .. returned)")
    before = _client._before

    def before_timed(deadline: float, call: Callable[..., Any]) -> Any:
        # In the etcd worker thread: the blocking call itself, without the hops to and from the loop.
        method = getattr(getattr(call, "func", None), "_method", b"?")
        name = method.decode().rsplit("/", 1)[-1] if isinstance(method, bytes) else str(method)
        t0 = time.perf_counter()
        try:
            return before(deadline, call)
        finally:
            _record(f"etcd thread: {name} call (in the worker)", t0, time.perf_counter())

    _client._before = before_timed
    watch = ReleaseServicer._watch

    async def watch_timed(self: ReleaseServicer, name: str) -> AsyncIterator[Any]:
        async for release in watch(self, name):
            t = time.perf_counter()
            _record(f"api: Watch stream yields ({'reached' if release.status.reached else 'not reached'})", t, t)
            yield release

    ReleaseServicer._watch = watch_timed  # type: ignore[method-assign]
    started: list[float] = []

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            _record(f"gc: generation {info.get('generation')} pass", started[0], time.perf_counter())

    gc.callbacks.append(collected)
    _time_async(_etcd.EtcdStore, "get_release", "etcd: release read (API, GetRelease polls included)")
    _time_sync(LiveState, "snapshot", "store: LiveState.snapshot")
    _time_async(dataplane.DataPlane, "_apply", "dataplane: _apply (whole, awaits included)")
    _time_sync(dataplane.DataPlane, "_build", "dataplane: _build (view + render + effective)")
    _time_sync(views, "build_view_from", "views: build_view_from")
    _time_sync(views, "build_view", "views: build_view (from scratch)")
    _time_sync(dataplane, "render", "xds: render (one key)")
    _time_sync(dataplane, "effective_view", "xds: effective_view")
    _time_sync(local.ViewHistory, "remember", "xds.local: ViewHistory.remember (+ set versions)")
    _time_sync(cache.SnapshotCache, "set_snapshot", "xds: cache.set_snapshot (whole)")
    _time_sync(cache, "check_consistency", "xds: cache.check_consistency")
    _time_sync(cache._History, "remember", "xds: cache content history")
    _time_sync(server._Stream, "push", "xds: stream push (plan + selections + bodies)")
    _time_sync(server._Plans, "get", "xds: plan (_Plans.get)")
    _time_sync(server._Selections, "get", "xds: selection")
    _time_sync(server._Selection, "sotw_body", "xds: SotW body serialise")
    _time_async(convergence.Convergence, "reconcile", "reconcile (whole, status write included)")
    _time_sync(convergence.Convergence, "_refresh_facts", "reconcile: _refresh_facts")
    _time_async(convergence.Convergence, "_write_progress", "reconcile: _write_progress")
    acked = tracker.ProxyTracker.acked

    def acked_timed(self: tracker.ProxyTracker, stream: str, type_url: str, ack: tracker.TypeAck) -> None:
        t = time.perf_counter()
        acked(self, stream, type_url, ack)
        if type_url == ROUTE:
            _record("tracker: RDS ACK handled", t, t)

    tracker.ProxyTracker.acked = acked_timed  # type: ignore[method-assign]
    run = server._Stream.run

    async def run_timed(self: Any, requests: AsyncIterator[Any], send: Callable[[bytes], Awaitable[None]]) -> None:
        async def send_timed(data: bytes) -> None:
            t = time.perf_counter()
            await send(data)
            _record(f"grpc: send ({'>' if len(data) > 100_000 else '<='}100 kB)", t, time.perf_counter())
            if len(data) > 100_000:
                _record(f"grpc: send of {len(data) // 1000} kB", t, time.perf_counter())

        async def received() -> AsyncIterator[Any]:
            async for request in requests:
                t = time.perf_counter()
                kind = getattr(request, "type_url", "").rsplit(".", 1)[-1]
                if kind:  # (RouteConfiguration: the RDS ACK, or a request)
                    _record(f"grpc: {kind} request received", t, t)
                yield request

        await run(self, received(), send_timed)

    server._Stream.run = run_timed  # type: ignore[method-assign]
    apply = LiveState.apply
    update_release = _etcd.EtcdStore.update_release

    async def update_release_noted(self: _etcd.EtcdStore, release: Any, events: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        written = await update_release(self, release, events, **kwargs)
        WRITES[written.revision] = (t0, time.perf_counter())
        WRITE_VARIANT[written.revision] = VARIANT[0]
        return written

    _etcd.EtcdStore.update_release = update_release_noted  # type: ignore[method-assign]

    def apply_timed(self: LiveState, events: Any) -> dict[str, dict[str, tuple[object, object]]]:
        t = time.perf_counter()
        for ev in events:
            APPLIED.setdefault(ev.kv.mod_revision, t)
        changed = apply(self, events)
        _record("store: watch batch applied (" + ",".join(sorted(changed)) + ")", t, time.perf_counter())
        return changed

    LiveState.apply = apply_timed  # type: ignore[method-assign]
    watch_release = _etcd.EtcdStore.watch_release

    async def watch_release_timed(self: _etcd.EtcdStore, name: str, **kwargs: Any) -> AsyncIterator[Any]:
        async for release in watch_release(self, name, **kwargs):
            t = time.perf_counter()
            reached = release is not None and release.status.reached
            _record(f"store: watch_release yields ({'reached' if reached else 'not reached'})", t, t)
            yield release

    _etcd.EtcdStore.watch_release = watch_release_timed  # type: ignore[method-assign]


def etcd_server(endpoint: str) -> dict[str, float]:
    """etcd's own cumulative timings from its /metrics (started with ETCD_METRICS=extensive):
    gRPC handling of Txn and Range (sum, count), WAL fsync and backend commit (sum, count)."""
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        for wanted, label in (
            ('grpc_server_handling_seconds_sum{grpc_method="Txn"', "txn_s"),
            ('grpc_server_handling_seconds_count{grpc_method="Txn"', "txn_n"),
            ('grpc_server_handling_seconds_sum{grpc_method="Range"', "range_s"),
            ('grpc_server_handling_seconds_count{grpc_method="Range"', "range_n"),
            ("etcd_disk_wal_fsync_duration_seconds_sum", "wal_s"),
            ("etcd_disk_wal_fsync_duration_seconds_count", "wal_n"),
            ("etcd_disk_backend_commit_duration_seconds_sum", "commit_s"),
            ("etcd_disk_backend_commit_duration_seconds_count", "commit_n"),
        ):
            if name.startswith(wanted):
                out[label] = out.get(label, 0.0) + float(value)
    return out


def etcd_rows(before: dict[str, float], after: dict[str, float]) -> list[str]:
    def mean(kind: str) -> str:
        n = after.get(kind + "_n", 0) - before.get(kind + "_n", 0)
        s = after.get(kind + "_s", 0) - before.get(kind + "_s", 0)
        return f"{s / n * 1000:.3f} ms mean over {n:.0f}" if n else "none"

    return [
        f"  etcd's own time during the steps (its /metrics): Txn handled {mean('txn')}; Range {mean('range')}; "
        f"WAL fsync {mean('wal')}; backend commit {mean('commit')}"
    ]


async def etcd_floor(store: Any, count: int = 40) -> list[str]:
    """One release-sized put in a transaction, `count` times each way, the loop otherwise
    idle: from a plain thread (the call alone), through the store (the worker thread and
    the hop back to the loop), and on the loop's own grpc.aio channel."""
    from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

    key = (store.prefix + "bench-floor").encode()
    req = rpc_pb2.TxnRequest(success=[store._put(key, b"x" * 2048)])
    stub = rpc_pb2_grpc.KVStub(store._blocking.channel)

    def in_thread() -> list[float]:
        took = []
        for _ in range(count):
            t = time.perf_counter()
            stub.Txn(req, timeout=5)
            took.append((time.perf_counter() - t) * 1000)
        return took

    plain = await asyncio.to_thread(in_thread)
    hop, aio = [], []
    for _ in range(count):
        t = time.perf_counter()
        await store._txn([], list(req.success))
        hop.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        await store._kv.Txn(req, timeout=5)
        aio.append((time.perf_counter() - t) * 1000)
    return [
        f"  one put txn, loop idle, median of {count}: blocking stub in a thread {statistics.median(plain):.2f} ms; "
        f"the store's path (thread + hop to the loop) {statistics.median(hop):.2f} ms; the loop's grpc.aio channel "
        f"{statistics.median(aio):.2f} ms"
    ]


def _variants(store: Any) -> list[tuple[str, Callable[[], None], Callable[[], None]]]:
    """(name, switch on, switch off) for each variant GRAYLANE_PROFILE_ALTERNATE names."""
    blocking = store._blocking
    saved = dict(blocking.methods) if blocking is not None else {}
    policy = getattr(store, "_aio_when", None)

    def restore() -> None:
        if blocking is not None:
            blocking.methods.clear()
            blocking.methods.update(saved)
        if policy is not None:
            store._aio_when = policy

    def aio(*methods: object) -> Callable[[], None]:
        def on() -> None:
            for method in methods:
                if blocking is not None:
                    blocking.methods.pop(method, None)

        return on

    def always_blocking() -> None:
        if policy is not None:
            store._aio_when = None

    saved_publisher: list[Any] = []

    def no_publish() -> None:
        # This replica's count is not handed to the registry (no progress/<identity> write
        # beside the step's own transactions): what that write costs the path.
        passes = PLANE[0].dataplane._convergence
        saved_publisher[:] = [passes._publisher]
        passes._publisher = None

    def restore_publisher() -> None:
        if saved_publisher:
            PLANE[0].dataplane._convergence._publisher = saved_publisher.pop()
        restore()

    known = {
        "aio_txn": aio(store._kv.Txn),
        "aio_unary": aio(*saved),
        "blocking": always_blocking,
    }
    names = [n for n in os.environ.get("GRAYLANE_PROFILE_ALTERNATE", "").split(",") if n]
    known["no_publish"] = no_publish
    offs = {"no_publish": restore_publisher}
    return [("as is", lambda: None, restore)] + [(n, known[n], offs.get(n, restore)) for n in names]


def run_queue_wait_ms(pid: int | None, tid: int | None = None) -> float:
    """Milliseconds the threads of process `pid` (or its thread `tid`) have waited on a run
    queue so far, runnable but without a core (/proc/.../schedstat): what a shared machine
    adds to every step besides this code's own work."""
    tasks = [str(tid)] if tid is not None else os.listdir(f"/proc/{pid}/task")
    total = 0
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(pathlib.Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[1])
    return total / 1e6


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_ENVOY_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\] \[[^]]*\] (.*)$")


def envoy_trace(fleet: list[EnvoyProcess], t0s: list[float], wall_offset: float) -> list[str]:
    """From each Envoy's config:trace log: per step, when the RDS response arrived and when
    Envoy sent its ACK (ms after the client's NextBatch call; wall clock mapped onto this
    process's perf_counter)."""
    per_envoy: list[list[tuple[float, str]]] = []
    for envoy in fleet:
        text = (pathlib.Path(envoy._workdir.name) / "envoy.log").read_text(errors="replace") if envoy._workdir else ""
        if os.environ.get("GRAYLANE_PROFILE_ENVOY_KEEP"):
            pathlib.Path(os.environ["GRAYLANE_PROFILE_ENVOY_KEEP"], f"{envoy.node_id}.log").write_text(text)
        events = []
        for line in text.splitlines():
            m = _ENVOY_LINE.match(line)
            if not m or "RouteConfiguration" not in m.group(2):
                continue
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp() - wall_offset
            msg = m.group(2)
            kind = "recv" if msg.startswith("Received gRPC message") else ""
            kind = "send" if "Sending DiscoveryRequest" in msg else kind
            if kind:
                events.append((stamp, kind))
        per_envoy.append(events)
    lines = ["  Envoy's own log (config:trace), per step: RDS response received -> ACK sent, ms after the call:"]
    recv_to_ack = []
    for i, t0 in enumerate(t0s):
        parts = []
        for k, events in enumerate(per_envoy):
            recv = next((t for t, kind in events if kind == "recv" and t0 <= t < t0 + 0.5), None)
            ack = next((t for t, kind in events if kind == "send" and recv is not None and t >= recv), None)
            if recv is None or ack is None:
                parts.append(f"e{k} ?")
                continue
            recv_to_ack.append((ack - recv) * 1000)
            parts.append(f"e{k} {(recv - t0) * 1000:.1f}->{(ack - t0) * 1000:.1f}")
        lines.append(f"    step {i}: " + "; ".join(parts))
    if recv_to_ack:
        lines.append(
            f"  Envoy received -> ACK sent: p50 {statistics.median(recv_to_ack):.2f} ms, max {max(recv_to_ack):.2f} ms"
        )
    return lines


def report(
    envoys: int,
    steps: list[dict[str, list[tuple[float, float, str]]]],
    marks: list[dict[str, float]],
    race_revisions: list[int],
    variants: list[str] | None = None,
) -> str:
    races = [WRITES[r] for r in race_revisions]
    lines = [f"=== NextBatch at 1,000 services / releases ({sb.LIVE} live), {envoys} Envoy(s), {len(steps)} steps ==="]
    for key in (k for k in marks[0] if k not in ("t0", "cpu") and not k.startswith("wait")):
        lines.append(f"  {key:58s} at {statistics.median(m[key] for m in marks):8.2f} ms")
    lines.append(
        "  run-queue wait per step (runnable, no core; ms, median / max): "
        + "; ".join(
            f"{k[5:]} {statistics.median(m[k] for m in marks):.2f} / {max(m[k] for m in marks):.2f}"
            for k in marks[0]
            if k.startswith("wait")
        )
    )
    if variants and len(variants) > 1:
        lines.append("  per variant (alternated step by step), median ms [CPU of this process per step, median ms]:")
        for k, variant in enumerate(variants):
            mine = [m for i, m in enumerate(marks) if i % len(variants) == k]
            if not mine:
                continue
            cells = [
                f"{key.split(' (')[0]} {statistics.median(m[key] for m in mine):.2f}"
                for key in mine[0]
                if key not in ("t0", "cpu") and not key.startswith("wait")
            ]
            cpu = statistics.median(m["cpu"] for m in mine)
            answers = [(WRITES[r][1] - WRITES[r][0]) * 1000 for r in race_revisions if WRITE_VARIANT.get(r) == variant]
            if answers:
                cells.append(f"release write answered p50 {statistics.median(answers):.2f}")
            lines.append(f"    {variant:10s} ({len(mine)} steps): " + "; ".join(cells) + f" [{cpu:.2f}]")
    stages = {stage for step in steps for stage in step}
    ordered = sorted(stages, key=lambda s: statistics.median(step[s][0][0] for step in steps if s in step))
    lines.append(f"  {'stage':58s} {'first@':>8s} {'calls':>6s} {'sum ms':>8s} {'median':>8s} thread")
    for stage in ordered:
        firsts = [step[stage][0][0] for step in steps if stage in step]
        calls = [len(step.get(stage, ())) for step in steps]
        sums = [sum(d for _, d, _ in step.get(stage, ())) for step in steps]
        each = [d for step in steps for _, d, _ in step.get(stage, ())]
        threads = ",".join(sorted({t for step in steps for _, _, t in step.get(stage, ())}))
        lines.append(
            f"  {stage:58s} {statistics.median(firsts):8.2f} {statistics.median(calls):6.1f} "
            f"{statistics.median(sums):8.2f} {statistics.median(each):8.3f} {threads}"
        )
    answers = [(t1 - t0) * 1000 for t0, t1 in races]
    watched = [(APPLIED[r] - WRITES[r][0]) * 1000 for r in race_revisions]
    if races:
        first = sum(APPLIED[r] < WRITES[r][1] for r in race_revisions)
        lines.append(
            f"  release writes in the steps: {len(races)}; the follower applied the revision from its watch "
            f"before the answer reached the loop in {first}; answer p50 {statistics.median(answers):.2f} ms, "
            f"watch applied p50 {statistics.median(watched):.2f} ms after the write was issued"
        )
    last_acks = [m["the last Envoy's RDS ACK handled"] for m in marks]
    lines.append("  the last Envoy's RDS ACK per step, ms: " + " ".join(f"{a:.1f}" for a in last_acks))
    watched = [m["`reached` seen on a Watch stream (client process)"] for m in marks]
    lines.append("  `reached` on the Watch per step, ms: " + " ".join(f"{a:.1f}" for a in watched))
    lines.append(
        "  run-queue wait per step, loop / etcd / envoys, ms: "
        + " ".join(f"{m['wait loop']:.0f}/{m['wait etcd']:.0f}/{m['wait envoys']:.0f}" for m in marks)
    )
    shown_slow = int(os.environ.get("GRAYLANE_PROFILE_SLOWEST", "1"))
    slow = sorted(range(len(steps)), key=lambda i: -last_acks[i])[:shown_slow]
    shown = [("one step's", steps[len(steps) // 2])]
    shown += [(f"a slow step's (#{i}, ACK {last_acks[i]:.1f} ms)", steps[i]) for i in slow]
    for title, step in shown:
        lines.append(
            f"  {title} timeline (ms after the client's NextBatch call, duration ms; _write_progress calls left out):"
        )
        for start, took, stage in sorted((s, d, stage) for stage, xs in step.items() for s, d, _ in xs):
            if stage != "reconcile: _write_progress" and start < 400:
                lines.append(f"    {start:8.2f} {took:8.3f}  {stage}")
    return "\n".join(lines)


async def main(envoys: int, count: int) -> str:
    instrument()
    async with contextlib.AsyncExitStack() as stack:
        tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graylane-nextbatch-")))
        os.environ["ETCD_METRICS"] = "extensive"  # gRPC handling times per method, for etcd's own share
        etcd = await stack.enter_async_context(EtcdProcess(data_dir=tmp / "etcd"))
        store = await connect(etcd.endpoint)
        stack.push_async_callback(store.close)
        variants = _variants(store)
        if os.environ.get("GRAYLANE_PROFILE_TXN_ON_LOOP") and store._blocking is not None:
            # A/B: transactions on the loop's grpc.aio channel instead of a worker thread.
            store._blocking.methods.pop(store._kv.Txn, None)
        await sb.register(store, sb.RELEASES)
        names = [f"r-s{i:04d}" for i in range(sb.RELEASES)]
        plane = await stack.enter_async_context(
            ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0").running()
        )
        PLANE[:] = [plane]
        target = f"127.0.0.1:{plane.api_port}"
        await sb.create_all(target, sb.RELEASES)
        for name in names[: sb.LIVE]:
            await plane.releases.act(name, Move.NEXT, Cause(actor="bench"))
        concurrency = os.environ.get("GRAYLANE_PROFILE_ENVOY_CONCURRENCY")
        traced = bool(os.environ.get("GRAYLANE_PROFILE_ENVOY_TRACE"))
        # Envoy's own log of its xDS stream (config:trace), with microsecond wall-clock stamps:
        # when each response arrived and when its ACK left, read back after the steps.
        trace_args = [
            "--component-log-level",
            os.environ.get("GRAYLANE_PROFILE_ENVOY_LOG", "config:trace"),
            "--log-format",
            "[%Y-%m-%d %T.%f] [%n] %v",
        ]
        fleet = [
            await stack.enter_async_context(
                EnvoyProcess(
                    ads_port=plane.xds_port,
                    node_id=f"profile-{k}",
                    concurrency=int(concurrency) if concurrency else None,
                    extra_args=trace_args if traced else (),
                    log_level="info" if traced else "warn",
                )
            )
            for k in range(envoys)
        ]
        wall_offset = time.time() - time.perf_counter()
        client = await sb._Client.start(target)  # the pipeline, in its own process
        stack.push_async_callback(client.close)
        dp = plane.dataplane
        await dp.wait_current(timeout=60)
        # GRAYLANE_PROFILE_START=1: a release not yet live (as the bench's), whose first step
        # starts it and so adds its gray cluster (CDS, EDS, then RDS, in that order).
        name = names[-1] if os.environ.get("GRAYLANE_PROFILE_START") else names[sb.LIVE - 1]
        steps: list[dict[str, list[tuple[float, float, str]]]] = []
        marks: list[dict[str, float]] = []
        race_revisions: list[int] = []
        server_before: dict[str, float] | None = None
        envoy_cpu_before: tuple[float, list[float]] | None = None
        top = int(os.environ.get("GRAYLANE_PROFILE_CPROFILE", "0"))
        profiler = cProfile.Profile() if top else None
        while len(steps) < count:
            r = await client.ask(f"get {name}")
            if r["batch"] + 1 >= r["batches"]:
                await client.ask(f"act rollback {name}")
                await dp.wait_current(timeout=30)
                await client.ask(f"act restart {name}")
                await dp.wait_current(timeout=30)
                continue
            await asyncio.sleep(GAP)  # the previous step's writes and passes settle
            if server_before is None:
                server_before = await asyncio.to_thread(etcd_server, etcd.endpoint)
                envoy_cpu_before = (time.perf_counter(), [cpu_seconds(e.pid) for e in fleet])
            variant = variants[len(steps) % len(variants)]
            variant[1]()
            LOG.clear()
            earlier = set(WRITES)
            cpu0 = time.process_time()
            waits0 = [run_queue_wait_ms(os.getpid(), threading.get_native_id()), run_queue_wait_ms(etcd.pid)]
            waits0 += [run_queue_wait_ms(e.pid) for e in fleet]
            VARIANT[0] = variant[0]
            if profiler is not None:
                profiler.enable()
            out = await client.ask(f"next {name}")
            # (from the call to `reached` seen both ways: the path itself, not the settling after it)
            waits = [run_queue_wait_ms(os.getpid(), threading.get_native_id()), run_queue_wait_ms(etcd.pid)]
            waits = [a - b for a, b in zip(waits + [run_queue_wait_ms(e.pid) for e in fleet], waits0, strict=True)]
            await dp.wait_current(timeout=30)
            if profiler is not None:
                profiler.disable()
            await asyncio.sleep(SETTLE)  # what the step still causes (grace writes, progress)
            cpu = (time.process_time() - cpu0) * 1000
            variant[2]()
            t0 = out["t0"]
            step: dict[str, list[tuple[float, float, str]]] = {}
            for start, end, stage, thread in LOG:
                step.setdefault(stage, []).append(((start - t0) * 1000, (end - start) * 1000, thread))
            steps.append(step)
            race_revisions += [r for r in WRITES if r not in earlier and r in APPLIED]
            acks = [s for s, _, _ in step.get("tracker: RDS ACK handled", [])]
            sets = [s for s, _, _ in step.get("xds: cache.set_snapshot (whole)", [])]
            marks.append(
                {
                    "NextBatch call returned (client process)": (out["reply"] - t0) * 1000,
                    "the last Envoy's RDS ACK handled": max(acks) if acks else float("nan"),
                    "the last listen port's snapshot set": max(sets) if sets else float("nan"),
                    "`reached` seen on a Watch stream (client process)": (out["watch"] - t0) * 1000,
                    "`reached` seen in GetRelease (polled every 5 ms)": (out["poll"] - t0) * 1000,
                    "t0": t0,
                    "cpu": cpu,
                    "wait loop": waits[0],
                    "wait etcd": waits[1],
                    "wait envoys": sum(waits[2:]),
                }
            )
        if traced:
            extra_lines = envoy_trace(fleet, [m["t0"] for m in marks], wall_offset)
        else:
            extra_lines = []
        if profiler is not None:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
            extra_lines.append(f"  cProfile of the loop's thread over {len(steps)} steps (NextBatch call to the ACK):")
            extra_lines += ["    " + line for line in text.getvalue().splitlines() if line.strip()]
        if envoy_cpu_before is not None:
            took = time.perf_counter() - envoy_cpu_before[0]
            used = [cpu_seconds(e.pid) - b for e, b in zip(fleet, envoy_cpu_before[1], strict=True)]
            extra_lines.append(
                "  each Envoy's CPU over the steps (/proc), % of a core: "
                + " ".join(f"{100 * u / took:.1f}" for u in used)
            )
        server_after = await asyncio.to_thread(etcd_server, etcd.endpoint)
        extra = etcd_rows(server_before or {}, server_after) + await etcd_floor(store)
        return (
            report(envoys, steps, marks, race_revisions, [v[0] for v in variants])
            + "\n"
            + "\n".join(extra + extra_lines)
        )


if __name__ == "__main__":
    if os.environ.get("GRAYLANE_PROFILE_SET_SLICE"):  # A/B: the data plane's slice of loop time
        dataplane._SET_SLICE_SECONDS = float(os.environ["GRAYLANE_PROFILE_SET_SLICE"])
    if os.environ.get("GRAYLANE_PROFILE_SWITCH_INTERVAL"):  # A/B runs of the GIL's switch interval
        sys.setswitchinterval(float(os.environ["GRAYLANE_PROFILE_SWITCH_INTERVAL"]))
    args = [int(a) for a in sys.argv[1:3]]
    print(asyncio.run(main(args[0] if args else 1, args[1] if len(args) > 1 else STEPS)))
