"""The fleet benchmark over several replicas, each a `graylane serve` process on one etcd.

The layout users run: the bench process starts etcd and the replicas, fills etcd through
the API, deals the fleet's worker processes out round-robin between the fleet replicas
(worker w dials fleet replica w % n; the real Envoys likewise), moves the release on with
NextBatch and measures, per replica and for the whole fleet, each bounded in time:

* change: NextBatch -> each client first sees the new weight (p50 / p99), per replica and
  over every client; the real Envoys' RDS update accepted (their admin stats);
* CPU per change of each replica process (/proc), RSS now / peak, idle CPU (API probers
  paused; each replica's own loop-lag probe still runs, see `LAG_INTERVAL`);
* the event loop's longest lag, connect and changes apart, read from each replica's
  /metrics (`graylane_event_loop_lag_max_seconds`, reset by each read, and the loop
  thread's own CPU over it);
* API: GetRelease p50 / p99 from a prober process per API target throughout, and during
  the changes. With `api_replica`, one more replica that no proxy connects to serves the
  API (and makes the NextBatch calls): it is started first, so it is also the leader that
  writes every release's status;
* stream errors (ended or failed streams).

The bench process itself holds no replica: its own work (polling the workers) is not in
any replica's figures. bench/scale.py's `bench_fleet` is the one-process layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from fleet import FleetSpec, Prober, Sleeper, Worker
from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.local.etcd import EtcdProcess
from graylane.v1 import release_pb2 as pb
from scale import (
    RELEASE,
    _clock_text,
    _free_port,
    _statuses,
    add_services,
    pct,
    release_spec,
    sleeper_row,
    start_workers,
    wait_configured,
)

# The replicas' loop-lag probe period: the one-process bench's probe (10 ms), so a stall is
# read short by at most that. It costs each replica ~1.3 % of a core while idle (measured on
# an empty process), which the idle rows include.
LAG_INTERVAL = "10ms"

# GRAYLANE_BENCH_API_NICE=N (-20..19): the API replica's CPU group (its session's autogroup)
# gets that nice value, as an operator gives the replica that serves the API a CPU share of
# its own; unset, it competes for the cores like any program.
API_NICE = os.environ.get("GRAYLANE_BENCH_API_NICE", "")


def _end_with_parent() -> None:
    """In the replica's child process before exec: SIGTERM when the bench process dies, so a
    bench killed from outside (its exit stack never runs) leaves no replica behind."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class ServeReplica:
    """One `graylane serve` on the bench's etcd, in its own process group, logging to a file."""

    def __init__(self, name: str, etcd: str, log_path: pathlib.Path) -> None:
        self.name = name
        self.api_port, self.xds_port, self.http_port = _free_port(), _free_port(), _free_port()
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(pathlib.Path(sys.executable).parent / "graylane"),
                    "serve",
                    "--etcd",
                    etcd,
                    "--listen",
                    f"127.0.0.1:{self.api_port}",
                    "--xds-listen",
                    f"127.0.0.1:{self.xds_port}",
                    "--http-listen",
                    f"127.0.0.1:{self.http_port}",
                    "--loop-lag-interval",
                    LAG_INTERVAL,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_end_with_parent,
            )

    def set_group_nice(self, nice: str) -> None:
        """The replica's CPU group (its session's autogroup) at nice `nice`."""
        pathlib.Path(f"/proc/{self.proc.pid}/autogroup").write_text(nice)

    @property
    def api_target(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    async def ready(self, timeout: float = 30.0) -> None:
        """Until /healthz answers 200 (API and xDS listening, etcd reachable)."""
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"replica {self.name} exited {self.proc.returncode}: see {self.log_path}")
                with contextlib.suppress(OSError):
                    if await asyncio.to_thread(self._get, "/healthz") is not None:
                        return
                await asyncio.sleep(0.2)

    def _get(self, path: str) -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as resp:
            return resp.read().decode() if resp.status == 200 else None

    async def loop_lag(self) -> tuple[float, float]:
        """(longest lag, its loop-thread CPU) in ms since the previous call (the read resets it)."""
        found = {"graylane_event_loop_lag_max_seconds": float("nan"), "graylane_event_loop_lag_cpu_seconds": 0.0}
        with contextlib.suppress(OSError):
            text = await asyncio.to_thread(self._get, "/metrics") or ""
            for line in text.splitlines():
                name, _, number = line.partition(" ")
                if name in found:
                    found[name] = float(number)
        lag, cpu = found.values()
        return lag * 1000, cpu * 1000

    def is_leader(self) -> bool:
        with contextlib.suppress(OSError):
            return " is the leader" in self.log_path.read_text(errors="replace")
        return False

    def cpu_seconds(self) -> float:
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> tuple[float, float]:
        status = dict(
            line.split(":", 1) for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        )
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024

    async def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, 15.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5.0)


@dataclass
class ReplicaFigures:
    name: str
    role: str  # "fleet" (proxies connect to it) or "api" (the API's replica, no proxies)
    streams: int = 0
    envoys: int = 0
    leader: bool = False
    change_ms: list[list[float]] = field(default_factory=list)  # per change: its clients' latencies
    cpu_ms: list[float] = field(default_factory=list)  # per change
    idle_cpu_pct: float = float("nan")
    rss_mib: float = 0.0
    hwm_mib: float = 0.0
    lag_connect: tuple[float, float] = (float("nan"), 0.0)  # (wall ms, loop-thread CPU ms)
    lag_changes: tuple[float, float] = (float("nan"), 0.0)
    api_ms: list[float] = field(default_factory=list)  # GetRelease answered by this replica, whole run
    api_change_ms: list[float] = field(default_factory=list)  # of which ended during the changes
    api_errors: int = 0


@dataclass
class ReplicasResult:
    streams: int
    workers: int
    services: int
    envoys: int
    delta_every: int
    replicas: list[ReplicaFigures] = field(default_factory=list)
    connect_s: float = float("nan")
    configured: int = 0
    change_ms: list[list[float]] = field(default_factory=list)  # per change: every client's latency
    missing: list[int] = field(default_factory=list)
    envoy_ms: list[float] = field(default_factory=list)
    fleet_cpu_ms: list[float] = field(default_factory=list)  # per change: the fake clients' worker processes
    stream_errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    error_details: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    sleeper_change_ms: list[float] = field(default_factory=list)  # fleet.Sleeper, during the changes


def _process_cpu(pids: Iterable[int | None]) -> float:
    """User+system CPU seconds of these processes so far (0 for one that is gone)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, TypeError):
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _rds_accepted(envoy: EnvoyProcess) -> float:
    """The Envoy's count of accepted RDS updates (every route config), from its admin stats."""
    with contextlib.suppress(OSError, ValueError):
        status, body = await envoy.admin_get("/stats?filter=update_success")
        if status == 200:
            return sum(
                float(line.rsplit(":", 1)[1])
                for line in body.splitlines()
                if ".rds." in line and line.split(":", 1)[0].endswith("update_success")
            )
    return float("nan")


async def bench_replicas(
    *,
    streams: int,
    per_worker: int,
    services: int,
    envoys: int,
    changes: int,
    replicas: int,
    api_replica: bool = False,
    delta_every: int = 4,
    connect_rate: float = 1000.0,
    connect_timeout: float = 120.0,
    change_timeout: float = 20.0,
    idle_seconds: float = 5.0,
    budget: float = 300.0,
    worker: Callable[[FleetSpec], Any] = Worker,
) -> ReplicasResult:
    """`worker` makes one worker process of fake clients from its spec (fleet.Worker: Python;
    anything with the same `ask`/`stop` and a `process.pid`)."""
    started = time.monotonic()
    # Each fleet replica gets as many workers (and so streams) as the others.
    n_workers = -(-max(1, -(-streams // per_worker)) // replicas) * replicas
    per_worker = -(-streams // n_workers)
    res = ReplicasResult(streams, n_workers, services, envoys, delta_every)
    entry = "svc-0000"
    async with contextlib.AsyncExitStack() as stack:
        tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graylane-fleet-")))
        etcd = await stack.enter_async_context(EtcdProcess(data_dir=tmp / "etcd"))
        logs = pathlib.Path(tempfile.gettempdir())
        # The API's replica first: the first to campaign is the leader, and the leader's
        # status writes are then kept off the replicas that fan out.
        names = (["api"] if api_replica else []) + [f"r{r}" for r in range(replicas)]
        serving: list[ServeReplica] = []
        for name in names:
            replica = ServeReplica(name, etcd.endpoint, logs / f"graylane-bench-{name}.log")
            if name == "api" and API_NICE:
                replica.set_group_nice(API_NICE)
            stack.push_async_callback(replica.stop)
            serving.append(replica)
            await replica.ready()
        fleet = serving[1:] if api_replica else serving
        figures = {r.name: ReplicaFigures(r.name, "api" if r.name == "api" else "fleet") for r in serving}
        res.replicas = list(figures.values())
        api_targets = serving[:1] if api_replica else fleet  # who answers the probers
        client = await stack.enter_async_context(ReleaseClient.connect(serving[0].api_target, actor="bench"))
        await add_services(client, services)
        await client.apply_release(pb.Release(name=RELEASE, spec=release_spec(entry)))
        await client.act(Action.NEXT, RELEASE)

        real: list[EnvoyProcess] = []
        for i in range(envoys):
            home = fleet[i % len(fleet)]
            envoy = EnvoyProcess(
                ads_port=home.xds_port, node_id=f"fleet-envoy-{i}", protocol="sotw" if i % 2 == 0 else "delta"
            )
            real.append(await stack.enter_async_context(envoy))
            figures[home.name].envoys += 1

        t_connect = time.monotonic()
        workers = start_workers(
            worker,
            streams=streams,
            per_worker=per_worker,
            n_workers=n_workers,
            target_of=lambda w: f"127.0.0.1:{fleet[w % len(fleet)].xds_port}",
            delta_every=delta_every,
            entry=entry,
            connect_rate=connect_rate,
        )
        for w, started_worker in enumerate(workers):
            figures[fleet[w % len(fleet)].name].streams += started_worker.spec.count

        async def stop_workers() -> None:
            await asyncio.gather(*(w.stop() for w in workers))

        stack.push_async_callback(stop_workers)
        probers = {
            r.name: Prober(r.api_target, RELEASE, max_calls=100_000, max_seconds=budget + 60) for r in api_targets
        }
        changes_window = [0.0, 0.0]

        async def stop_probers() -> None:
            for name, prober in probers.items():
                calls = await prober.stop()
                mine = figures[name]
                mine.api_ms = [ms for _, ms, code in calls if code == "OK"]
                start, end = changes_window
                mine.api_change_ms = [ms for t, ms, code in calls if code == "OK" and start <= t <= end]
                mine.api_errors = sum(1 for *_, code in calls if code != "OK")

        stack.push_async_callback(stop_probers)
        sleeper = Sleeper(max_seconds=budget + 60)

        async def stop_sleeper() -> None:
            start, end = changes_window
            res.sleeper_change_ms = [ms for t, ms in await sleeper.stop() if start <= t <= end]

        stack.push_async_callback(stop_sleeper)

        await wait_configured(
            workers, res, t_connect=t_connect, connect_timeout=connect_timeout, started=started, budget=budget
        )
        print(f"  fleet {streams}: configured {res.configured} in {time.monotonic() - t_connect:.1f} s", flush=True)
        for replica in serving:  # the longest lag so far, and a fresh start for the changes'
            figures[replica.name].lag_connect = await replica.loop_lag()

        if res.configured >= streams:
            changes_window[0] = time.time()
            for _ in range(changes):
                if time.monotonic() - started > budget:
                    res.notes.append("stopped changes: time budget")
                    break
                before = await asyncio.gather(*(_rds_accepted(e) for e in real))
                cpu0 = [r.cpu_seconds() for r in serving]
                fleet_cpu0 = _process_cpu(w.process.pid for w in workers)
                t0 = time.time()
                try:
                    rel = await client.act(Action.NEXT, RELEASE)
                except grpc.aio.AioRpcError as exc:  # noted, not fatal: the run still reports
                    res.notes.append(f"NextBatch failed: {exc.code().name} {exc.details()}")
                    await asyncio.sleep(1.0)
                    continue
                weight = rel.status.weight
                envoy_done: dict[int, float] = {}
                change_deadline = time.monotonic() + change_timeout
                while time.monotonic() < change_deadline:
                    now = await asyncio.gather(*(_rds_accepted(e) for e in real))
                    for i, (b, n) in enumerate(zip(before, now, strict=True)):
                        if i not in envoy_done and n > b:
                            envoy_done[i] = time.time()
                    missing = await asyncio.gather(*(w.ask("missing", weight) for w in workers))
                    if not any(missing) and len(envoy_done) == len(real):
                        break
                    await asyncio.sleep(0.05)
                parts = await asyncio.gather(*(w.ask("seen", weight) for w in workers))
                cpu = [r.cpu_seconds() - c0 for r, c0 in zip(serving, cpu0, strict=True)]
                res.fleet_cpu_ms.append((_process_cpu(w.process.pid for w in workers) - fleet_cpu0) * 1000)
                for replica, spent in zip(serving, cpu, strict=True):
                    figures[replica.name].cpu_ms.append(spent * 1000)
                for r, replica in enumerate(fleet):
                    mine = [x for w, part in enumerate(parts) if w % len(fleet) == r for x in part]
                    figures[replica.name].change_ms.append([(x - t0) * 1000 for x in mine if x is not None])
                seen = [x for part in parts for x in part]
                lat = [(x - t0) * 1000 for x in seen if x is not None]
                res.change_ms.append(lat)
                res.missing.append(sum(1 for x in seen if x is None))
                res.envoy_ms += [(t - t0) * 1000 for t in envoy_done.values()]
                per = "; ".join(f"{r.name} p99 {pct(figures[r.name].change_ms[-1], 0.99):.0f} ms" for r in fleet)
                print(
                    f"  change to {weight} %: {len(lat)}/{streams} saw it, p50 {pct(lat, 0.5):.0f} ms "
                    f"p99 {pct(lat, 0.99):.0f} ms ({per}); CPU "
                    + ", ".join(f"{r.name} {c * 1000:.0f}" for r, c in zip(serving, cpu, strict=True))
                    + f" ms, fake clients {res.fleet_cpu_ms[-1]:.0f} ms (sent {_clock_text(t0)})",
                    flush=True,
                )
                await asyncio.sleep(0.5)
            changes_window[1] = time.time()
            for replica in serving:
                figures[replica.name].lag_changes = await replica.loop_lag()

            # Idle: the fleet connected, nothing changing, the API probers paused.
            for prober in probers.values():
                prober.pause(True)
            await asyncio.sleep(2.0)  # the last change's ACKs
            cpu0 = [r.cpu_seconds() for r in serving]
            t0m = time.monotonic()
            await asyncio.sleep(idle_seconds)
            for replica, c0 in zip(serving, cpu0, strict=True):
                figures[replica.name].idle_cpu_pct = 100 * (replica.cpu_seconds() - c0) / (time.monotonic() - t0m)
            for prober in probers.values():
                prober.pause(False)
        st = await _statuses(workers)
        res.stream_errors = sum(s["errors"] for s in st)
        for s in st:
            for k, v in s["error_codes"].items():
                res.error_codes[k] = res.error_codes.get(k, 0) + v
            for k, v in s.get("error_details", {}).items():
                res.error_details[k] = res.error_details.get(k, 0) + v
        res.error_details = dict(sorted(res.error_details.items(), key=lambda kv: -kv[1])[:5])
        for replica in serving:
            mine = figures[replica.name]
            mine.rss_mib, mine.hwm_mib = replica.rss_mib()
            mine.leader = replica.is_leader()
    res.elapsed_s = time.monotonic() - started
    return res


def _ms(values: Sequence[float]) -> str:
    return f"{pct(values, 0.5):.1f} / {pct(values, 0.99):.1f} / {max(values, default=float('nan')):.0f} ms"


def describe_replicas(res: ReplicasResult) -> list[tuple[str, str]]:
    """Rows (measurement, value) for RESULTS.md: the whole fleet first, then each replica."""

    def med(v: Sequence[float]) -> float:
        return pct(v, 0.5)

    p50s = [pct(per, 0.5) for per in res.change_ms if per]
    p99s = [pct(per, 0.99) for per in res.change_ms if per]
    worst = max((x for per in res.change_ms for x in per), default=float("nan"))
    fleet = [r for r in res.replicas if r.role == "fleet"]
    layout = ", ".join(
        f"{r.name}: {r.streams:,} streams + {r.envoys} Envoy{'s' if r.envoys != 1 else ''}"
        if r.role == "fleet"
        else f"{r.name}: API only, no proxies"
        for r in res.replicas
    )
    leaders = [r.name for r in res.replicas if r.leader] or ["unknown"]
    api = [x for r in res.replicas for x in r.api_change_ms]
    rows = [
        ("streams (fake ADS clients) / worker processes", f"{res.streams:,} / {res.workers}"),
        ("of which delta", f"every {res.delta_every}th" if res.delta_every else "none"),
        ("services", str(res.services)),
        ("replicas (`graylane serve` processes, one etcd)", f"{layout}; leader {', '.join(leaders)}"),
        ("all connected and configured", f"{res.connect_s:.1f} s ({res.configured:,}/{res.streams:,})"),
        (
            "weight change -> every client sees it, whole fleet: median over changes of p50 / p99",
            f"{med(p50s):.0f} ms / {med(p99s):.0f} ms ({len(res.change_ms)} changes; max {worst:.0f} ms)",
        ),
        ("clients that missed a change (sum)", str(sum(res.missing))),
        ("weight change -> real Envoy's RDS update accepted (median)", f"{med(res.envoy_ms):.0f} ms"),
        (
            "control-plane CPU per change, all replicas together (median)",
            f"{med([sum(c) for c in zip(*(r.cpu_ms for r in res.replicas), strict=True)]):.0f} ms",
        ),
        (
            "fake clients' CPU per change, all worker processes (median; the same 2 cores)",
            f"{med(res.fleet_cpu_ms):.0f} ms",
        ),
        ("API GetRelease p50 / p99 / max during the changes, every prober", f"{_ms(api)} ({len(api)} calls)"),
        (
            "a process doing nothing but sleep 10 ms at a time: how late it woke during the changes, p50 / p99 / max "
            "(the machine's scheduling: nothing of Graylane in it)",
            sleeper_row(res.sleeper_change_ms),
        ),
        ("stream errors (ended or failed streams)", f"{res.stream_errors} {res.error_codes or ''}".strip()),
    ]
    for r in res.replicas:
        if r.role == "fleet":
            p50 = med([pct(lat, 0.5) for lat in r.change_ms if lat])
            p99 = med([pct(lat, 0.99) for lat in r.change_ms if lat])
            rows.append((f"{r.name}: change p50 / p99 (median over changes)", f"{p50:.0f} / {p99:.0f} ms"))
        rows.append(
            (
                f"{r.name}: CPU per change (median) / idle / RSS now, peak",
                f"{med(r.cpu_ms):.0f} ms / {r.idle_cpu_pct:.1f} % of a core / {r.rss_mib:.0f}, {r.hwm_mib:.0f} MiB",
            )
        )
        rows.append(
            (
                f"{r.name}: event-loop lag max, connect / changes (wall; of it the loop thread's own CPU)",
                f"{r.lag_connect[0]:.0f} / {r.lag_changes[0]:.0f} ms "
                f"({r.lag_connect[1]:.0f} / {r.lag_changes[1]:.0f} ms CPU)",
            )
        )
        if r.api_ms or r.api_errors:
            rows.append(
                (
                    f"{r.name}: API GetRelease p50 / p99 / max during the changes; whole run",
                    f"{_ms(r.api_change_ms)} ({len(r.api_change_ms)} calls); {_ms(r.api_ms)} "
                    f"({len(r.api_ms)} calls, {r.api_errors} failed)",
                )
            )
    if res.error_details:
        causes = "; ".join(f"{k} x{v}" for k, v in res.error_details.items())
        rows.append(("stream error causes (code: status details, top 5)", causes))
    rows.append(("run time", f"{res.elapsed_s:.0f} s"))
    if fleet and not any(r.api_ms for r in fleet):
        rows.append(("note", "no prober called a fleet replica: the API was reached through the API replica only"))
    return rows


__all__ = ["ReplicaFigures", "ReplicasResult", "ServeReplica", "bench_replicas", "describe_replicas"]
