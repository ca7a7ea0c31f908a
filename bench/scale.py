"""The fleet benchmark: one control plane (in this process), many ADS streams (bench/fleet.py's
workers: Python, Node with fleet_impl="node" (grpc-js), or C with "c").

Several replicas, each a `graylane serve` process: bench/replicas.py.

Measures, each bounded in time:
* connect: from the first worker starting to every fake client configured (CDS+EDS+LDS+RDS);
* change: NextBatch on one release -> each client first sees the new weight (p50 / p99 / max,
  wall clock across processes on one host), and the real Envoys ACK the new routes;
* control-plane CPU per change (this process's user+sys time from the call until every
  client has it), RSS (VmRSS, and VmHWM the peak), the event-loop lag probe's max;
* the fake clients' CPU per change (their worker processes' user+sys time over the same span,
  from /proc): on a shared machine it competes with the control plane's;
* API: GetRelease p50 / p99 / max from a separate process throughout;
* idle: control-plane CPU over a few seconds with the whole fleet connected and nothing changing
  (the API prober paused);
* stream errors: streams that ended or failed (each reconnects after 1 s).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import cProfile
import gc
import itertools
import os
import pathlib
import resource
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from fleet import PROBE_ID_METADATA, FleetSpec, NodeWorker, Prober, Sleeper, Worker, worker_class
from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.domain import model
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.deploy.local.stack import local_control_plane
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2_grpc as api_grpc
from graylane.xds import resources

RELEASE = "fleet"
LANE = "fleet-v2"
WEIGHTS = tuple(range(5, 101, 5))
FLEET_LISTEN_PORT = 15000
_TREE = str(pathlib.Path(__file__).resolve().parent.parent) + "/"  # graylane's own frames start with this
_COUNT_GC_OBJECTS = bool(os.environ.get("GRAYLANE_BENCH_GC_OBJECTS"))  # objects each slowest GC pass scanned


@dataclass
class FleetResult:
    streams: int
    workers: int
    services: int
    envoys: int
    delta_every: int
    connect_s: float = float("nan")
    configured: int = 0
    change_ms: list[list[float]] = field(default_factory=list)  # per change: every client's latency
    missing: list[int] = field(default_factory=list)  # per change: clients that never saw it
    envoy_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # control-plane CPU per change
    fleet_impl: str = "python"  # which fake clients ran: bench/fleet.py's Worker or NodeWorker
    fleet_cpu_ms: list[float] = field(default_factory=list)  # the fleet's worker processes' CPU per change
    idle_cpu_pct: float = float("nan")
    rss_mib: float = 0.0
    hwm_mib: float = 0.0
    lag_connect_ms: float = 0.0
    lag_change_ms: float = 0.0
    lag_max_ms: float = 0.0
    cpu_lag_connect_ms: float = 0.0  # the loop thread's own CPU over the latest tick (see LagProbe)
    cpu_lag_change_ms: float = 0.0
    cpu_lag_max_ms: float = 0.0
    api_ms: list[float] = field(default_factory=list)
    api_change_ms: list[float] = field(default_factory=list)  # calls that ended during the changes
    api_connect_ms: list[float] = field(default_factory=list)  # calls that ended while the fleet connected
    # How late a process that only sleeps 10 ms at a time woke during the changes (fleet.Sleeper).
    sleeper_change_ms: list[float] = field(default_factory=list)
    lag_change_p99_ms: float = float("nan")
    gc_total_ms: list[float] = field(default_factory=list)  # per generation, whole run
    gc_max_ms: list[float] = field(default_factory=list)
    gc_count: list[int] = field(default_factory=list)
    api_errors: int = 0
    stream_errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    error_details: dict[str, int] = field(default_factory=dict)  # "CODE: details" -> count
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


class LagProbe:
    """Sleeps `tick` seconds in the control plane's loop and records how late it wakes.

    Wall lag counts every cause: a step holding the loop, the collector, and the OS running
    other processes (on 2 cores, the fleet's 8 workers and the Envoys) instead of this one.
    The loop thread's own CPU time over the same late tick (`cpu_*`) is the part the
    process itself spent: what a step of ours, or the collector, held the loop for."""

    def __init__(self, tick: float = 0.01) -> None:
        self.tick = tick
        self.max_ms = 0.0
        self.phase_max_ms = 0.0
        self.cpu_max_ms = 0.0
        self.cpu_phase_max_ms = 0.0
        self.samples: list[float] = []  # this phase's lags
        self.last_tick = time.perf_counter()
        # Cleared while idle is measured: the probe's 100 wakes a second are ~1.4 % of a core.
        self.running = asyncio.Event()
        self.running.set()

    @property
    def paused(self) -> bool:
        return not self.running.is_set()

    async def run(self) -> None:
        while True:
            if self.paused:
                await self.running.wait()
                self.last_tick = time.perf_counter()  # a pause is not a stall
            t0, c0 = time.perf_counter(), time.thread_time()
            await asyncio.sleep(self.tick)
            self.last_tick = time.perf_counter()
            lag = (time.perf_counter() - t0 - self.tick) * 1000
            cpu = max(0.0, (time.thread_time() - c0 - self.tick) * 1000)
            self.max_ms = max(self.max_ms, lag)
            self.phase_max_ms = max(self.phase_max_ms, lag)
            self.cpu_max_ms = max(self.cpu_max_ms, cpu)
            self.cpu_phase_max_ms = max(self.cpu_phase_max_ms, cpu)
            self.samples.append(lag)

    def phase(self) -> float:
        out, self.phase_max_ms = self.phase_max_ms, 0.0
        self.samples = []
        return out

    def cpu_phase(self) -> float:
        out, self.cpu_phase_max_ms = self.cpu_phase_max_ms, 0.0
        return out


class LoopIterations:
    """Counts the loop's passes (one selector poll each) and times each pass's work, while installed.

    Diagnosis: a coroutine awaiting a gRPC call resumes only after the pass that reads the
    completion and the next one that runs it, so its latency is passes x pass length, which
    a timer probe (one wake) does not show.
    """

    def __init__(self) -> None:
        self.count = 0
        self.work_ms: list[float] = []  # per pass: from the poll's return to the next poll
        self.ready: list[int] = []  # per pass: handles ready after the poll
        self._returned = 0.0
        self._loop: Any = None
        self._select: Any = None

    def __enter__(self) -> LoopIterations:
        self._loop = asyncio.get_running_loop()
        selector = self._loop._selector
        self._select = selector.select

        def select(timeout: float | None = None) -> Any:
            now = time.perf_counter()
            if self._returned:
                self.work_ms.append((now - self._returned) * 1000)
            out = self._select(timeout)
            self._returned = time.perf_counter()
            self.count += 1
            self.ready.append(len(self._loop._ready) + len(out))
            return out

        selector.select = select
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop._selector.select = self._select

    def longest_since(self, first: int) -> float:
        return max(self.work_ms[max(0, first - 1) :], default=0.0)

    def describe(self) -> str:
        busy = [w for w in self.work_ms if w > 1.0]
        return (
            f"loop passes {self.count:,}: work per pass p50 {pct(self.work_ms, 0.5):.2f} / p99 "
            f"{pct(self.work_ms, 0.99):.1f} / max {max(self.work_ms, default=0):.0f} ms; busy passes (>1 ms) "
            f"{len(busy):,} p50 {pct(busy, 0.5):.1f} ms; ready handles p50 {pct(self.ready, 0.5):.0f} / p99 "
            f"{pct(self.ready, 0.99):.0f} / max {max(self.ready, default=0)}"
        )


class GcPauses:
    """Collector pauses in this process (the control plane's), by generation, while installed."""

    def __init__(self) -> None:
        self.total_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self.full: list[tuple[float, float]] = []  # (when it ended, monotonic; ms) of each full pass
        # per generation: the pass with the most CPU of the thread it ran on (wall can include
        # the OS running other processes): (CPU ms, wall ms, objects in the scanned generations
        # at its start (-1: not counted, see GRAYLANE_BENCH_GC_OBJECTS), objects it collected)
        self.worst_cpu: list[tuple[float, float, int, int]] = [(0.0, 0.0, 0, 0)] * 3
        self._t0 = 0.0
        self._c0 = 0.0
        self._scanned = 0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gen = info["generation"]
            # Counting costs a list of the scanned objects per pass (4 % of the loop's samples
            # at 10,000 streams): only when asked.
            self._scanned = -1
            if _COUNT_GC_OBJECTS:
                self._scanned = sum(len(gc.get_objects(generation=g)) for g in range(gen + 1))
            self._t0 = time.perf_counter()
            self._c0 = time.thread_time()
            return
        ms = (time.perf_counter() - self._t0) * 1000
        cpu = (time.thread_time() - self._c0) * 1000
        gen = info["generation"]
        if cpu > self.worst_cpu[gen][0]:
            self.worst_cpu[gen] = (cpu, ms, self._scanned, info.get("collected", 0))
        self.total_ms[gen] += ms
        self.count[gen] += 1
        self.max_ms[gen] = max(self.max_ms[gen], ms)
        if gen == 2:
            self.full.append((time.monotonic(), ms))


class StallSampler:
    """A thread that samples the loop thread's stack while the loop has not ticked for `after` s.

    The lag probe says how long the loop was held; this says what held it: each sample is
    the innermost frames of the loop thread (graylane code first), counted.
    """

    def __init__(self, probe: LagProbe, *, after: float = 0.04, every: float = 0.01) -> None:
        self.probe = probe
        self.after = after
        self.every = every
        self.samples: collections.Counter[str] = collections.Counter()
        self._thread_id = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-sampler", daemon=True)

    def __enter__(self) -> StallSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.every if not self.probe.paused else 0.5):
            if self.probe.paused or time.perf_counter() - self.probe.last_tick < self.after:
                continue
            frame = sys._current_frames().get(self._thread_id)
            stack = traceback.extract_stack(frame) if frame is not None else []
            ours = [f for f in stack if f.filename.startswith(_TREE) and "/bench/" not in f.filename]
            where = ours[-3:] if ours else stack[-3:]
            names = (f"{pathlib.Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where))
            self.samples[" < ".join(names)] += 1

    def top(self, n: int = 8) -> list[tuple[str, int]]:
        return self.samples.most_common(n)


class LongHandles:
    """The loop's longest single steps (GRAYLANE_BENCH_HANDLES): each callback or task step
    the loop runs (asyncio's Handle._run) timed in the loop thread's CPU, the longest kept
    with what ran. Tells one long step from a pass of many short ones (the lag probe sees
    both as a late wake). Costs a few us per step while installed."""

    def __init__(self, keep: int = 10, over_ms: float = 5.0) -> None:
        self.keep = keep
        self.over_ms = over_ms
        self.longest: list[tuple[float, float, str]] = []  # (CPU ms, wall ms, what), longest first
        self.count = 0
        self.over = 0  # steps over `over_ms` of CPU
        self.phases: list[tuple[str, int, int, list[tuple[float, float, str]]]] = []  # closed by `phase`
        self._saved: Any = None

    def __enter__(self) -> LongHandles:
        from asyncio import events

        self._saved = run = events.Handle._run
        me = self

        def timed(handle: Any) -> None:
            task = getattr(handle._callback, "__self__", None)
            # Where a task resumes is known only before its step (cheap: a few attribute reads).
            before = _where(task) if isinstance(task, asyncio.Task) else ""
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                run(handle)
            finally:
                cpu = (time.thread_time() - c0) * 1000
                me.count += 1
                if cpu > me.over_ms:
                    me.over += 1
                    if len(me.longest) < me.keep or cpu > me.longest[-1][0]:
                        what = _describe_callback(handle._callback, before)
                        me.longest.append((cpu, (time.perf_counter() - t0) * 1000, what))
                        me.longest.sort(key=lambda x: -x[0])
                        del me.longest[me.keep :]

        events.Handle._run = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from asyncio import events

        events.Handle._run = self._saved  # type: ignore[method-assign]

    def phase(self, name: str) -> None:
        """Close the steps counted since the last call under `name` (the bench's phases:
        setup, connect, changes), so that each is reported on its own."""
        self.phases.append((name, self.count, self.over, list(self.longest)))
        self.count = self.over = 0
        self.longest = []

    def describe(self) -> list[str]:
        out = []
        for name, count, over, longest in self.phases or [("whole run", self.count, self.over, self.longest)]:
            out.append(
                f"loop steps, {name}: {count:,}, over {self.over_ms:g} ms of CPU: {over:,}; longest (CPU / wall ms):"
            )
            out += [f"    {cpu:6.1f} / {wall:6.1f}  {what}" for cpu, wall, what in longest]
        return out


def _describe_callback(callback: Any, before: str = "") -> str:
    """A task step as its innermost coroutine frames where it resumed (`before`) and where it
    stopped next, else the callback's name."""
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        return f"task {task.get_coro().__qualname__}: {before} -> {_where(task)}"
    return getattr(callback, "__qualname__", repr(callback))


def _where(task: asyncio.Task[Any]) -> str:
    """The innermost frame outside asyncio the task's coroutine chain is suspended in."""
    coro: Any = task.get_coro()
    where = "done"
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        if "/asyncio/" not in frame.f_code.co_filename:  # asyncio's own frames say nothing
            where = f"{pathlib.Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return where


class FactsReads:
    """Each call of the convergence pass's read of changed streams (`_OwnProxies.refresh`):
    the loop thread's CPU of each, while installed (with GRAYLANE_BENCH_STALLS)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, bool]] = []  # (CPU ms, stopped short: streams left for the next slice)
        self._saved: Any = None

    def __enter__(self) -> FactsReads:
        from graylane.controlplane.reconcile import convergence

        cls = convergence._OwnProxies
        self._saved = refresh = cls.refresh
        calls = self.calls

        def timed(this: Any, **kwargs: Any) -> Any:
            c0 = time.thread_time()
            seq0 = this._seq
            out = refresh(this, **kwargs)
            if seq0 != this._seq or not kwargs.get("take_new", True):  # it read something
                calls.append(((time.thread_time() - c0) * 1000, bool(this.behind)))
            return out

        cls.refresh = timed
        return self

    def __exit__(self, *exc: object) -> None:
        from graylane.controlplane.reconcile import convergence

        convergence._OwnProxies.refresh = self._saved

    def describe(self) -> str:
        cpu = [c for c, _ in self.calls]
        sliced = sum(1 for _, short in self.calls if short)
        return (
            f"convergence facts reads: {len(cpu):,} calls, CPU p50 {pct(cpu, 0.5):.2f} / p99 {pct(cpu, 0.99):.1f} / "
            f"max {max(cpu, default=0):.1f} ms; {sliced:,} stopped short (slice)"
        )


class ApiTrace:
    """Where a GetRelease waits (GRAYLANE_BENCH_API_TRACE): server-side instants of each
    prober call, matched to the prober's send / receive instants by its call index.

    Instants (wall clock, one host): handler entered; the etcd read's thread starts and ends
    (the blocking channel's Range of the release key); handler resumed after the read;
    handler returned; the call done on the server (reply and status written). Patches the
    API servicer's class and the etcd client's thread hop for the process; `close` restores."""

    def __init__(self) -> None:
        from graylane.controlplane.api import release_service
        from graylane.controlplane.store import _client

        self.calls: dict[int, dict[str, float]] = {}
        self.reads: list[tuple[float, float]] = []  # (thread start, thread end) of the release's Range
        self.changes: list[float] = []  # each NextBatch's start (wall clock)
        self.release_key = b""  # set once the store exists
        self._patched: list[tuple[Any, str, Any]] = []
        servicer = release_service.ReleaseServicer
        get_release = servicer.GetRelease
        scoped = servicer._scoped_release
        calls = self.calls

        async def traced_get(this: Any, request: Any, context: Any) -> Any:
            marks: dict[str, float] = {"enter": time.time()}
            for key, value in context.invocation_metadata() or ():
                if key == PROBE_ID_METADATA:
                    calls[int(value)] = marks
                    context.add_done_callback(lambda _ctx: marks.__setitem__("done", time.time()))
            try:
                return await get_release(this, request, context)
            finally:
                marks["return"] = time.time()

        async def traced_scoped(this: Any, name: str) -> Any:
            marks_before = time.time()
            try:
                return await scoped(this, name)
            finally:
                for marks in calls.values():  # the call whose handler is in this read
                    if "read_end" not in marks and marks.get("enter", 0.0) <= marks_before:
                        marks["read_start"], marks["read_end"] = marks_before, time.time()

        caller = release_service.CallerInterceptor
        intercept = caller.intercept_service
        accepted: dict[int, float] = {}
        self.accepted = accepted

        async def traced_intercept(this: Any, continuation: Any, details: Any) -> Any:
            for key, value in details.invocation_metadata or ():
                if key == PROBE_ID_METADATA:
                    accepted[int(value)] = time.time()
            return await intercept(this, continuation, details)

        before = _client._before
        reads = self.reads

        def traced_before(deadline: float, call: Any) -> Any:
            start = time.time()
            try:
                return before(deadline, call)
            finally:
                args = getattr(call, "args", ())
                if (
                    args
                    and getattr(args[0], "key", None) == self.release_key
                    and not getattr(args[0], "range_end", b"")
                ):
                    reads.append((start, time.time()))

        for owner, name, value in (
            (caller, "intercept_service", traced_intercept),
            (servicer, "GetRelease", traced_get),
            (servicer, "_scoped_release", traced_scoped),
            (_client, "_before", traced_before),
        ):
            self._patched.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)

    def close(self) -> None:
        for owner, name, value in reversed(self._patched):
            setattr(owner, name, value)

    def report(self, prober_calls: Sequence[tuple[float, float, str]], window: Sequence[float]) -> list[str]:
        """Per segment p50 / p99 / max (ms) over the calls that ended in `window`, and the slowest calls."""
        segments = (
            "send->accepted",
            "accepted->enter",
            "enter->thread",
            "thread",
            "thread->resumed",
            "resumed->return",
            "return->done",
            "done->client",
        )
        rows: list[tuple[float, list[float]]] = []
        for index, (t_end, ms, code) in enumerate(prober_calls):
            marks = self.calls.get(index)
            if code != "OK" or marks is None or not window[0] <= t_end <= window[1] or "done" not in marks:
                continue
            t_send = t_end - ms / 1000
            read = next((r for r in self.reads if marks.get("read_start", 0) <= r[0] <= marks.get("read_end", 0)), None)
            thread_start, thread_end = read if read is not None else (marks["read_start"], marks["read_end"])
            instants = (
                t_send,
                self.accepted.get(index, marks["enter"]),
                marks["enter"],
                thread_start,
                thread_end,
                marks["read_end"],
                marks["return"],
                marks["done"],
                t_end,
            )
            since = max((t for t in self.changes if t <= t_send), default=t_send)
            rows.append((ms, [(b - a) * 1000 for a, b in itertools.pairwise(instants)] + [(t_send - since) * 1000]))
        out = [f"API trace, {len(rows)} calls during the changes (ms: p50 / p99 / max):"]
        for i, name in enumerate(segments):
            values = [parts[i] for _, parts in rows]
            top = max(values, default=float("nan"))
            out.append(f"    {name:16s} {pct(values, 0.5):8.1f} / {pct(values, 0.99):8.1f} / {top:8.1f}")
        out.append("  slowest calls: total = " + " + ".join(segments) + " (sent this long after a NextBatch began)")
        for ms, parts in sorted(rows, key=lambda r: -r[0])[:8]:
            out.append(f"    {ms:8.1f} = " + " + ".join(f"{x:.1f}" for x in parts[:-1]) + f" ({parts[-1]:.0f})")
        return out


_ETCD_COUNTERS = (
    "etcd_mvcc_put_total",
    "etcd_mvcc_txn_total",
    "etcd_mvcc_range_total",
    "etcd_disk_wal_fsync_duration_seconds_sum",
    "etcd_disk_wal_fsync_duration_seconds_count",
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_debugging_mvcc_watch_stream_total",
    "process_cpu_seconds_total",
)


def _etcd_counters(endpoint: str) -> dict[str, float]:
    """A few of etcd's own counters (its /metrics), summed over their labels."""
    import urllib.request

    found: dict[str, float] = {}
    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in _ETCD_COUNTERS:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def _tracked_types() -> collections.Counter[str]:
    """Objects the collector tracks, by type name."""
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def _clock_text(t: float) -> str:
    """A wall-clock instant as the control plane's log prints it (UTC, milliseconds)."""
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mib() -> tuple[float, float]:
    rss = hwm = 0.0
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def release_spec(entry: str) -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane=LANE,
        entry=entry,
        services=[pb.ServiceVersions(service=entry, base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in WEIGHTS],
    )


async def _statuses(workers: Sequence[Worker | NodeWorker]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(w.ask("status") for w in workers)))


async def add_services(client: ReleaseClient, services: int) -> None:
    """`services` services on v1 (16 registrations in flight); the first also has a v2."""
    sem = asyncio.Semaphore(16)

    async def add_service(i: int) -> None:
        name = f"svc-{i:04d}"
        async with sem:
            await client.put_service(pb.Service(name=name, stable_version="v1"))
            for v in ("v1", "v2") if i == 0 else ("v1",):
                port = 20000 + i % 20000
                await client.put_version(
                    pb.Version(service=name, name=v, endpoints=[pb.Endpoint(address="127.0.0.1", port=port)])
                )

    await asyncio.gather(*(add_service(i) for i in range(services)))


def start_workers(
    make_worker: Any,
    *,
    streams: int,
    per_worker: int,
    n_workers: int,
    target_of: Any,
    delta_every: int,
    entry: str,
    connect_rate: float,
) -> list[Any]:
    """The fleet's worker processes: worker w runs clients w * per_worker onwards and dials
    `target_of(w)` (host:port); together they start `connect_rate` clients a second."""
    workers = []
    for w in range(n_workers):
        first = w * per_worker
        spec = FleetSpec(
            target=target_of(w),
            first=first,
            count=min(per_worker, streams - first),
            delta_every=delta_every,
            entry=entry,
            lane_cluster_part=f"|{LANE}",
            connect_rate=connect_rate / n_workers,
            listen_port=FLEET_LISTEN_PORT,
        )
        workers.append(make_worker(spec))
    return workers


async def wait_configured(
    workers: Sequence[Any], res: Any, *, t_connect: float, connect_timeout: float, started: float, budget: float
) -> None:
    """Until every client has its routes (`res.configured`, `res.connect_s`), or the connect
    timeout or the bench's budget runs out (a note in `res.notes`)."""
    deadline = t_connect + connect_timeout
    while True:
        st = await _statuses(workers)
        res.configured = sum(s["configured"] for s in st)
        if res.configured >= res.streams:
            res.connect_s = time.monotonic() - t_connect
            return
        if st and any(s["errors"] for s in st):
            codes = [s.get("error_details") for s in st]
            print(f"  connect: {res.configured} configured, stream errors {codes}", flush=True)
        if time.monotonic() > deadline or time.monotonic() - started > budget:
            res.notes.append(
                f"connect phase stopped at {connect_timeout:.0f} s: {res.configured}/{res.streams} configured"
            )
            return
        await asyncio.sleep(0.5)


async def bench_fleet(
    *,
    streams: int,
    per_worker: int,
    services: int,
    envoys: int,
    changes: int,
    delta_every: int = 4,
    connect_rate: float = 1000.0,
    connect_timeout: float = 120.0,
    change_timeout: float = 20.0,
    idle_seconds: float = 5.0,
    budget: float = 300.0,
    fleet_impl: str = "python",
) -> FleetResult:
    started = time.monotonic()
    n_workers = max(1, -(-streams // per_worker))
    res = FleetResult(streams, n_workers, services, envoys, delta_every, fleet_impl=fleet_impl)
    make_worker = worker_class(fleet_impl)
    entry = "svc-0000"
    async with contextlib.AsyncExitStack() as stack:
        gc_pauses = stack.enter_context(GcPauses())
        if os.environ.get("GRAYLANE_BENCH_SEND_SLOTS"):
            # Experiment: the ADS server's bound on streams pushing at once (a huge number: no bound).
            from graylane.xds.server import AdsServer

            defaults = AdsServer.__init__.__kwdefaults__
            stack.callback(defaults.__setitem__, "send_slots", defaults["send_slots"])
            defaults["send_slots"] = int(os.environ["GRAYLANE_BENCH_SEND_SLOTS"])
            res.notes.append(f"GRAYLANE_BENCH_SEND_SLOTS: {defaults['send_slots']} streams push at once")
        if os.environ.get("GRAYLANE_BENCH_FACTS_SLICE"):
            # Experiment: how long of the loop a convergence pass reads changed streams at a
            # time (inf: all of them in one step, as before the slices).
            from graylane.controlplane.reconcile import convergence

            stack.callback(setattr, convergence, "_FACTS_SLICE_SECONDS", convergence._FACTS_SLICE_SECONDS)
            convergence._FACTS_SLICE_SECONDS = float(os.environ["GRAYLANE_BENCH_FACTS_SLICE"])
            res.notes.append(f"GRAYLANE_BENCH_FACTS_SLICE: {convergence._FACTS_SLICE_SECONDS} s per slice of streams")
        facts_reads = stack.enter_context(FactsReads()) if os.environ.get("GRAYLANE_BENCH_STALLS") else None
        long_handles = stack.enter_context(LongHandles()) if os.environ.get("GRAYLANE_BENCH_HANDLES") else None
        trace = None
        if os.environ.get("GRAYLANE_BENCH_API_TRACE"):
            trace = ApiTrace()  # before the API's servicer is made
            stack.callback(trace.close)
        local = await stack.enter_async_context(local_control_plane(prefix="graylane-fleet-"))
        if trace is not None:
            trace.release_key = local.store.release_key(RELEASE)
        plane = local.plane
        client = await stack.enter_async_context(ReleaseClient.connect(local.api_target, actor="bench"))
        await add_services(client, services)
        await client.apply_release(pb.Release(name=RELEASE, spec=release_spec(entry)))
        await client.act(Action.NEXT, RELEASE)

        probe = LagProbe()
        lag_task = asyncio.create_task(probe.run())
        stack.callback(lag_task.cancel)
        sampler = stack.enter_context(StallSampler(probe)) if os.environ.get("GRAYLANE_BENCH_STALLS") else None

        # The real Envoys first (each on its own snapshot key), then the fleet.
        real = []
        for i in range(envoys):
            real.append(
                await stack.enter_async_context(
                    EnvoyProcess(
                        ads_port=plane.xds_port, node_id=f"fleet-envoy-{i}", protocol="sotw" if i % 2 == 0 else "delta"
                    )
                )
            )
        probe.phase()
        probe.cpu_phase()
        if long_handles is not None:
            long_handles.phase("setup (services, release, real Envoys)")

        t_connect = time.monotonic()
        workers: list[Worker | NodeWorker] = start_workers(
            make_worker,
            streams=streams,
            per_worker=per_worker,
            n_workers=n_workers,
            target_of=lambda w: f"127.0.0.1:{plane.xds_port}",
            delta_every=delta_every,
            entry=entry,
            connect_rate=connect_rate,
        )

        async def stop_workers() -> None:
            await asyncio.gather(*(w.stop() for w in workers))

        stack.push_async_callback(stop_workers)
        prober = Prober(local.api_target, RELEASE, max_calls=100_000, max_seconds=budget + 60)

        changes_window = [0.0, 0.0]
        connect_window = [time.time(), 0.0]  # from the first worker started to all configured

        async def stop_prober() -> None:
            calls = await prober.stop()
            res.api_ms = [ms for _, ms, code in calls if code == "OK"]
            start, end = changes_window
            res.api_change_ms = [ms for t, ms, code in calls if code == "OK" and start <= t <= end]
            start, end = connect_window
            res.api_connect_ms = [ms for t, ms, code in calls if code == "OK" and start <= t <= end]
            res.api_errors = sum(1 for *_, code in calls if code != "OK")
            if trace is not None:
                print("\n".join(trace.report(calls, changes_window)), flush=True)

        stack.push_async_callback(stop_prober)
        sleeper = Sleeper(max_seconds=budget + 60)

        async def stop_sleeper() -> None:
            start, end = changes_window
            res.sleeper_change_ms = [ms for t, ms in await sleeper.stop() if start <= t <= end]

        stack.push_async_callback(stop_sleeper)

        # Connect: until every client has its routes.
        await wait_configured(
            workers, res, t_connect=t_connect, connect_timeout=connect_timeout, started=started, budget=budget
        )
        connect_window[1] = time.time()
        res.lag_connect_ms = probe.phase()
        res.cpu_lag_connect_ms = probe.cpu_phase()
        if long_handles is not None:
            long_handles.phase("connect")
        connected_at = time.monotonic()
        if os.environ.get("GRAYLANE_BENCH_GC_FREEZE"):
            # Experiment: what the collector costs once the connected fleet's objects are
            # out of its reach (gc.freeze moves every tracked object to the permanent generation).
            gc.collect()
            gc.freeze()
            res.notes.append(f"GRAYLANE_BENCH_GC_FREEZE: gc.freeze() after connect ({gc.get_freeze_count():,} objects)")
        print(f"  fleet {streams}: configured {res.configured} in {time.monotonic() - t_connect:.1f} s", flush=True)
        # Which kinds of tracked objects the changes leave behind (they make the collector's
        # full passes longer and more frequent): counted before and after the changes.
        gc_types = _tracked_types() if os.environ.get("GRAYLANE_BENCH_GC_TYPES") else None

        def envoy_route_versions() -> dict[str, str]:
            out = {e.node_id: "" for e in real}
            for node_id in out:  # the tracker is keyed by stream: look nodes up by id
                for p in plane.tracker.of_node(node_id):
                    ack = p.acked.get(resources.ROUTE)
                    out[node_id] = ack.version if ack else ""
            return out

        # Diagnosis of the API's latency: the same etcd read GetRelease makes, from inside the
        # control plane's loop (no API hop), timed during the changes.
        store_ms: list[tuple[float, float]] = []
        store_probe = None
        iterations = LoopIterations() if os.environ.get("GRAYLANE_BENCH_STORE_PROBE") else None
        store_reads: list[tuple[float, int, float]] = []  # (ms, loop passes, longest pass ms)
        if iterations is not None:
            stack.enter_context(iterations)

            async def probe_store() -> None:
                while True:
                    t = time.perf_counter()
                    first = iterations.count
                    with contextlib.suppress(Exception):
                        await local.store.get_release(RELEASE)
                    ms = (time.perf_counter() - t) * 1000
                    store_ms.append((time.time(), ms))
                    store_reads.append((ms, iterations.count - first, iterations.longest_since(first)))
                    await asyncio.sleep(0.02)

            store_probe = asyncio.create_task(probe_store())
            # The same read on a synchronous channel in a thread (its own completion queue):
            # tells the process's shared asyncio completion path from gRPC core and etcd.
            sync_stop = threading.Event()
            sync_ms: list[tuple[float, float]] = []

            def probe_sync() -> None:
                from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

                with grpc.insecure_channel(local.etcd.endpoint) as channel:
                    kv = rpc_pb2_grpc.KVStub(channel)
                    req = rpc_pb2.RangeRequest(key=local.store.release_key(RELEASE))
                    while not sync_stop.wait(0.02):
                        t = time.perf_counter()
                        with contextlib.suppress(grpc.RpcError):
                            kv.Range(req, timeout=10)
                        sync_ms.append((time.time(), (time.perf_counter() - t) * 1000))

            sync_thread = threading.Thread(target=probe_sync, daemon=True)
            sync_thread.start()
            stack.callback(sync_stop.set)

            # GetRelease served by a blocking gRPC server (its own completion queue, a thread
            # per call) whose handler runs the same read on the control plane's loop: does
            # the API's own hop through the asyncio server wait behind the fleet too?
            loop = asyncio.get_running_loop()

            class Bridged(api_grpc.ReleaseServiceServicer):  # type: ignore[misc]
                def GetRelease(self, request: Any, context: Any) -> pb.Release:  # noqa: N802
                    got = asyncio.run_coroutine_threadsafe(local.store.get_release(request.name), loop).result(10)
                    return model.release_to_proto(got)

            bridge = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
            api_grpc.add_ReleaseServiceServicer_to_server(Bridged(), bridge)
            bridge_port = bridge.add_insecure_port("127.0.0.1:0")
            bridge.start()
            stack.callback(bridge.stop, None)
            bridged_prober = Prober(f"127.0.0.1:{bridge_port}", RELEASE, max_calls=100_000, max_seconds=budget + 60)

            async def stop_bridged() -> None:
                calls = await bridged_prober.stop()
                start, end = changes_window
                inside = [ms for t, ms, code in calls if code == "OK" and start <= t <= end]
                print(
                    f"  GetRelease via a blocking server bridged to the loop, during the changes: "
                    f"p50 {pct(inside, 0.5):.1f} / p99 {pct(inside, 0.99):.1f} / max "
                    f"{max(inside, default=float('nan')):.0f} ms ({len(inside)} calls, "
                    f"{sum(1 for *_, code in calls if code != 'OK')} failed)",
                    flush=True,
                )

            stack.push_async_callback(stop_bridged)
            stack.callback(store_probe.cancel)
        etcd_before = _etcd_counters(local.etcd.endpoint) if store_probe is not None else {}
        threads_before = _thread_cpu() if store_probe is not None else {}

        # Changes: NextBatch, then wait for every client to see the new weight.
        profiler = cProfile.Profile() if os.environ.get("GRAYLANE_BENCH_PROFILE") else None
        if profiler is not None:
            profiler.enable()
        if res.configured >= streams:
            changes_window[0] = time.time()
            for _ in range(changes):
                if time.monotonic() - started > budget:
                    res.notes.append("stopped changes: time budget")
                    break
                before = envoy_route_versions()
                cpu0 = cpu_seconds()
                fleet_cpu0 = sum(w.cpu_seconds() for w in workers)
                t0 = time.time()
                if trace is not None:
                    trace.changes.append(t0)
                try:
                    rel = await client.act(Action.NEXT, RELEASE)
                except grpc.aio.AioRpcError as exc:  # noted, not fatal: the run still reports
                    res.notes.append(f"NextBatch failed: {exc.code().name} {exc.details()}")
                    print(f"  NextBatch failed: {exc.code().name} {exc.details()}", flush=True)
                    await asyncio.sleep(1.0)
                    continue
                weight = rel.status.weight
                envoy_done: dict[str, float] = {}
                change_deadline = time.monotonic() + change_timeout
                while time.monotonic() < change_deadline:
                    for node, version in envoy_route_versions().items():
                        if node not in envoy_done and version != before[node]:
                            envoy_done[node] = time.time()
                    # A count per worker while waiting (the lists of instants are read once at
                    # the end): this process is the control plane, and its CPU is what is measured.
                    missing = await asyncio.gather(*(w.ask("missing", weight) for w in workers))
                    if not any(missing) and len(envoy_done) == len(real):
                        break
                    await asyncio.sleep(0.05)
                parts = await asyncio.gather(*(w.ask("seen", weight) for w in workers))
                seen: list[float | None] = [x for part in parts for x in part]
                cpu = cpu_seconds() - cpu0
                res.fleet_cpu_ms.append((sum(w.cpu_seconds() for w in workers) - fleet_cpu0) * 1000)
                lat = [(x - t0) * 1000 for x in seen if x is not None]
                res.change_ms.append(lat)
                res.missing.append(sum(1 for x in seen if x is None))
                res.envoy_ms += [(t - t0) * 1000 for t in envoy_done.values()]
                res.cpu_ms.append(cpu * 1000)
                print(
                    f"  change to {weight} %: {len(lat)}/{streams} saw it, p50 {pct(lat, 0.5):.0f} ms "
                    f"p99 {pct(lat, 0.99):.0f} ms; CPU {cpu * 1000:.0f} ms, fleet's {res.fleet_cpu_ms[-1]:.0f} ms "
                    f"(sent {_clock_text(t0)})",
                    flush=True,
                )
                await asyncio.sleep(0.5)
            changes_window[1] = time.time()
            if store_probe is not None:
                inside = [ms for t, ms in store_ms if changes_window[0] <= t <= changes_window[1]]
                after_counts = _etcd_counters(local.etcd.endpoint)
                moved = {k: after_counts[k] - etcd_before.get(k, 0.0) for k in after_counts}
                print(f"  etcd during the changes: {moved}", flush=True)
                print(
                    f"  in-loop store.get_release during the changes: p50 {pct(inside, 0.5):.1f} / "
                    f"p99 {pct(inside, 0.99):.1f} / max {max(inside, default=float('nan')):.0f} ms ({len(inside)})",
                    flush=True,
                )
                sync_inside = [ms for t, ms in sync_ms if changes_window[0] <= t <= changes_window[1]]
                print(
                    f"  thread sync-channel etcd read during the changes: p50 {pct(sync_inside, 0.5):.1f} / "
                    f"p99 {pct(sync_inside, 0.99):.1f} / max {max(sync_inside, default=float('nan')):.0f} ms "
                    f"({len(sync_inside)})",
                    flush=True,
                )
                bridged_prober.pause(True)  # its figures are read when the stack closes
                assert iterations is not None
                slow = sorted(store_reads, reverse=True)[:8]
                print(
                    "  slowest in-loop reads (ms, loop passes during it, longest pass ms): "
                    + ", ".join(f"{ms:.0f}/{n}/{longest:.0f}" for ms, n, longest in slow),
                    flush=True,
                )
                print(f"  {iterations.describe()}", flush=True)
                threads = _thread_cpu()
                spent = collections.Counter()
                for tid, (name, cpu_s) in threads.items():
                    spent[name] += cpu_s - threads_before.get(tid, (name, 0.0))[1]
                print(
                    "  CPU by thread name during the changes: "
                    + ", ".join(f"{name} {cpu_s:.2f} s" for name, cpu_s in spent.most_common(8)),
                    flush=True,
                )
            res.lag_change_p99_ms = pct(probe.samples, 0.99)
            res.lag_change_ms = probe.phase()
            res.cpu_lag_change_ms = probe.cpu_phase()
            if sampler is not None:
                print("  loop held > 40 ms during connect+changes, samples (10 ms apart):", flush=True)
                for where, count in sampler.top(12):
                    print(f"    {count:5d}  {where}", flush=True)
            if facts_reads is not None:
                print("  " + facts_reads.describe(), flush=True)
            if long_handles is not None:
                long_handles.phase("changes")
                print("\n".join("  " + line for line in long_handles.describe()), flush=True)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(os.environ["GRAYLANE_BENCH_PROFILE"])
            if gc_types is not None:
                after = _tracked_types()
                grown = sorted(((after[k] - gc_types.get(k, 0), k) for k in after), reverse=True)[:12]
                total = f"{sum(gc_types.values()):,} -> {sum(after.values()):,}"
                print(f"  tracked objects {total}; grown most:", flush=True)
                for n, kind in grown:
                    print(f"    {n:+9,}  {kind}", flush=True)

            # Idle: the fleet connected, nothing changing.
            idle_profiler = cProfile.Profile() if os.environ.get("GRAYLANE_BENCH_IDLE_PROFILE") else None
            if idle_profiler is not None:
                idle_profiler.enable()
            # The API prober pauses: its ~50 GetRelease/s are load, not the fleet's idle cost.
            prober.pause(True)
            await asyncio.sleep(0.5)
            # The last change's ACKs may still be arriving (clients see a weight before the
            # control plane has read their ACKs): idle starts once the tracker is quiet for 1 s.
            quiet_deadline = time.monotonic() + 30.0
            while time.monotonic() < quiet_deadline:
                seq = plane.tracker.seq
                await asyncio.sleep(1.0)
                if plane.tracker.seq == seq:
                    break
            else:
                res.notes.append("idle measured while the tracker still changed (not quiet within 30 s)")
            probe.running.clear()  # the bench's own probes are not the fleet's idle cost
            cpu0 = cpu_seconds()
            t0 = time.monotonic()
            await asyncio.sleep(idle_seconds)
            res.idle_cpu_pct = 100 * (cpu_seconds() - cpu0) / (time.monotonic() - t0)
            probe.running.set()
            prober.pause(False)
            if idle_profiler is not None:
                idle_profiler.disable()
                idle_profiler.dump_stats(os.environ["GRAYLANE_BENCH_IDLE_PROFILE"])
        st = await _statuses(workers)
        res.stream_errors = sum(s["errors"] for s in st)
        codes: dict[str, int] = {}
        for s in st:
            for k, v in s["error_codes"].items():
                codes[k] = codes.get(k, 0) + v
        res.error_codes = codes
        details: dict[str, int] = {}
        for s in st:
            for k, v in s.get("error_details", {}).items():
                details[k] = details.get(k, 0) + v
        res.error_details = dict(sorted(details.items(), key=lambda kv: -kv[1])[:5])
        res.rss_mib, res.hwm_mib = rss_mib()
        res.lag_max_ms = probe.max_ms
        res.cpu_lag_max_ms = probe.cpu_max_ms
        res.gc_total_ms, res.gc_max_ms = list(gc_pauses.total_ms), list(gc_pauses.max_ms)
        res.gc_count = list(gc_pauses.count)
        res.notes.append(
            "GC pass with the most CPU per generation (CPU / wall ms, objects scanned, collected): "
            + "; ".join(f"{c:.0f} / {w:.0f} ms, {n:,}, {k:,}" for c, w, n, k in gc_pauses.worst_cpu)
        )
        during_connect = [ms for t, ms in gc_pauses.full if t <= connected_at]
        res.notes.append(
            f"full GC passes while connecting: {len(during_connect)} ({sum(during_connect):.0f} ms); "
            f"after: {len(gc_pauses.full) - len(during_connect)} "
            f"({sum(ms for t, ms in gc_pauses.full if t > connected_at):.0f} ms)"
        )
    res.elapsed_s = time.monotonic() - started
    return res


def _thread_cpu() -> dict[str, tuple[str, float]]:
    """This process's threads: id -> (name, user+system CPU seconds), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for task in pathlib.Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            name = python_names.get(int(task.name), name)  # e.g. gRPC's poller: "Thread-N (_poll_wrapper)"
            name = "etcd threads" if name.startswith("etcd") else name
            fields = stat[stat.rindex(")") + 2 :].split()
            out[task.name] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def sleeper_row(late: Sequence[float]) -> str:
    top = max(late, default=float("nan"))
    return f"{pct(late, 0.5):.1f} / {pct(late, 0.99):.1f} / {top:.0f} ms ({len(late)} wake-ups)"


def describe(res: FleetResult) -> list[tuple[str, str]]:
    """Rows (measurement, value) for RESULTS.md."""
    all_lat = [x for per in res.change_ms for x in per]
    worst = max(all_lat, default=float("nan"))
    api_max = max(res.api_ms, default=float("nan"))
    p50s = [pct(per, 0.5) for per in res.change_ms if per]
    p99s = [pct(per, 0.99) for per in res.change_ms if per]

    def med(v: Sequence[float]) -> float:
        return pct(v, 0.5)

    rows = [
        ("streams (fake ADS clients) / worker processes", f"{res.streams:,} / {res.workers} ({res.fleet_impl})"),
        ("of which delta", f"every {res.delta_every}th" if res.delta_every else "none"),
        ("real Envoys (own snapshot keys)", str(res.envoys)),
        ("services", str(res.services)),
        ("all connected and configured", f"{res.connect_s:.1f} s ({res.configured:,}/{res.streams:,})"),
        (
            "weight change -> every client sees it: median over changes of p50 / p99",
            f"{med(p50s):.0f} ms / {med(p99s):.0f} ms ({len(res.change_ms)} changes; max {worst:.0f} ms)",
        ),
        ("clients that missed a change (sum)", str(sum(res.missing))),
        ("weight change -> real Envoy ACKed (median)", f"{med(res.envoy_ms):.0f} ms"),
        ("control-plane CPU per change (median)", f"{med(res.cpu_ms):.0f} ms"),
        (
            f"fake clients' CPU per change (median; the {res.fleet_impl} fleet's worker processes, /proc)",
            f"{med(res.fleet_cpu_ms):.0f} ms",
        ),
        (
            "control-plane CPU idle (fleet connected, API prober and loop-lag probe paused)",
            f"{res.idle_cpu_pct:.1f} % of a core",
        ),
        ("control-plane RSS now / peak", f"{res.rss_mib:.0f} / {res.hwm_mib:.0f} MiB"),
        (
            "event-loop lag max: connect / changes / whole run (wall; of it the loop thread's own CPU)",
            f"{res.lag_connect_ms:.0f} / {res.lag_change_ms:.0f} / {res.lag_max_ms:.0f} ms "
            f"({res.cpu_lag_connect_ms:.0f} / {res.cpu_lag_change_ms:.0f} / {res.cpu_lag_max_ms:.0f} ms CPU)",
        ),
        ("event-loop lag p99 during the changes (10 ms probe)", f"{res.lag_change_p99_ms:.0f} ms"),
        (
            "API GetRelease p50 / p99 / max while the fleet connects",
            f"{pct(res.api_connect_ms, 0.5):.1f} / {pct(res.api_connect_ms, 0.99):.1f} / "
            f"{max(res.api_connect_ms, default=float('nan')):.0f} ms ({len(res.api_connect_ms)} calls)",
        ),
        (
            "API GetRelease p50 / p99 / max during the changes",
            f"{pct(res.api_change_ms, 0.5):.1f} / {pct(res.api_change_ms, 0.99):.1f} / "
            f"{max(res.api_change_ms, default=float('nan')):.0f} ms ({len(res.api_change_ms)} calls)",
        ),
        (
            "a process doing nothing but sleep 10 ms at a time: how late it woke during the changes, p50 / p99 / max "
            "(the machine's scheduling: nothing of Graylane in it)",
            sleeper_row(res.sleeper_change_ms),
        ),
        (
            "API GetRelease p50 / p99 / max (separate process, whole run)",
            f"{pct(res.api_ms, 0.5):.1f} / {pct(res.api_ms, 0.99):.1f} / {api_max:.0f} ms "
            f"({len(res.api_ms)} calls, {res.api_errors} failed)",
        ),
        (
            "garbage-collector pauses, whole run: count, total / longest, gen 0 / 1 / 2",
            "; ".join(
                f"{n:,} x, {t:.0f} / {m:.0f} ms"
                for n, t, m in zip(res.gc_count, res.gc_total_ms, res.gc_max_ms, strict=False)
            ),
        ),
        ("stream errors (ended or failed streams)", f"{res.stream_errors} {res.error_codes or ''}".strip()),
        ("run time", f"{res.elapsed_s:.0f} s"),
    ]
    if res.error_details:
        causes = "; ".join(f"{k} x{v}" for k, v in res.error_details.items())
        rows.insert(-1, ("stream error causes (code: status details, top 5)", causes))
    return rows


__all__ = ["FleetResult", "bench_fleet", "describe"]
