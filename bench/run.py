"""Graylane benchmarks: `make bench` (runs `.venv/bin/python -P bench/run.py`).

Three measurements, each bounded in count and in time, loopback only:

1. render cost of `graylane.xds.render.render` for views of 10, 100 and 1000 services;
2. end to end over a real etcd, the control plane in-process and one real Envoy:
   NextBatch -> `status.reached`, and Rollback -> every proxy ACKed the new routes;
3. data-plane throughput through Envoy at a 50 % batch, and directly to the upstream.

Prints markdown tables and writes them to bench/RESULTS.md (overwritten). The machine is
shared and noisy, so every number is a median (with p90) over repeated runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import logging
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/fleet.py, bench/scale.py

import fleet  # noqa: E402
from change_cost import make_view  # noqa: E402
from change_cost import measure as measure_change  # noqa: E402
from fleet import FLEET_IMPLS, worker_class  # noqa: E402
from floor import TITLE as FLOOR_TITLE  # noqa: E402
from floor import floor_section  # noqa: E402
from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.deploy.local.stack import local_control_plane
from graylane.deploy.local.traffic import LoadResult, run_load
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import release_pb2 as pb
from graylane.xds import plan as xds_plan
from graylane.xds import resources
from graylane.xds.render import forget_reused, render
from replicas import API_NICE, LAG_INTERVAL, bench_replicas, describe_replicas  # noqa: E402
from scale import bench_fleet, describe, pct  # noqa: E402
from scraper import scrape_cpu  # noqa: E402
from store_bench import main as store_bench  # noqa: E402
from tls_bench import TITLE as TLS_TITLE  # noqa: E402
from tls_bench import run as tls_bench  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"
SERVICE = "checkout"
RELEASE = "bench"
WEIGHTS = tuple(range(5, 101, 5))  # 20 batches: 5, 10, ..., 100

# Bounds. Every loop below stops at its count or its time budget, whichever comes first.
RENDER_PLAN = (  # (services, max reps, max seconds)
    (10, 300, 3.0),
    (100, 100, 6.0),
    (1000, 30, 20.0),
    (3000, 7, 15.0),
    (10000, 5, 25.0),
)
PLAN_REPS = 5
CHANGE_REPS = 7
RENDER_MIN_REPS = 3
E2E_BUDGET_SECONDS = 60.0  # the latency loops (after setup)
ROLLBACK_CYCLES = 30  # rollback -> restart -> next cycles after the first pass
WAIT_TIMEOUT = 15.0  # any single wait for reached / ACK
REACHED_POLL = 0.005
ACK_POLL = 0.002
LOAD_COUNT = 5000
LOAD_MAX_SECONDS = 20.0
LOAD_CONCURRENCY = 16
LOAD_ROUNDS = 5  # alternating Envoy / direct rounds
LOAD_BUDGET_SECONDS = 60.0


# --------------------------------------------------------------------------- helpers


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- 1. render


def bench_render() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for n, max_reps, max_seconds in RENDER_PLAN:
        view = make_view(n)
        res = render(view, listen_port=10000)  # warm-up, and the sizes
        # Routes are split per service (one RouteConfiguration each, behind SRDS scopes).
        routes: list[Any] = list(res[resources.ROUTE].items.values())
        route_bytes = sum(len(resources.encoded(rc).packed.value) for rc in routes)
        weighted = sum(
            1 for rc in routes for vh in rc.virtual_hosts for r in vh.routes if r.route.HasField("weighted_clusters")
        )
        # What one lane's weight change re-sends of RDS (SotW and delta): the changed route configs.
        bumped = list(view.lanes)
        bumped[0] = dataclasses.replace(bumped[0], weight=bumped[0].weight + 10)
        after = render(dataclasses.replace(view, lanes=tuple(bumped)), listen_port=10000)[resources.ROUTE]
        change_route_bytes = sum(
            len(resources.encoded(after.items[name]).packed.value)
            for name in after
            if res[resources.ROUTE].versions.get(name) != after.versions[name]
        )
        times: list[float] = []
        deadline = time.perf_counter() + max_seconds
        changed: list[float] = []
        while len(times) < max_reps and (len(times) < RENDER_MIN_REPS or time.perf_counter() < deadline):
            forget_reused()  # a full render: nothing reused from the previous one
            gc.collect()
            # What lived before the render is out of the collector's scans, as the control
            # plane's collector tuning (graylane.controlplane.app.CollectorTuning) keeps it
            # after each full pass: the bench's own leftovers (the encoding memo full of
            # earlier renders) would otherwise be scanned over and over, which a serving
            # process does not do.
            gc.freeze()
            t0 = time.perf_counter()
            render(view, listen_port=10000)
            times.append((time.perf_counter() - t0) * 1000)
            gc.unfreeze()
            # The same view with one lane's weight changed: what a NextBatch re-renders.
            lanes = list(view.lanes)
            lanes[0] = dataclasses.replace(lanes[0], weight=lanes[0].weight % 90 + len(times))
            gc.collect()
            t0 = time.perf_counter()
            render(dataclasses.replace(view, lanes=tuple(lanes)), listen_port=10000)
            changed.append((time.perf_counter() - t0) * 1000)
        # plan(): a stream's first plan in a state (computed, then shared), and the next
        # stream in the same state (the shared plan); acked = sent = the previous render.
        held = {t: dict(res[t].items) for t in resources.PUSH_ORDER}
        computed: list[float] = []
        shared: list[float] = []
        for _ in range(PLAN_REPS):
            target = render(view, listen_port=10000)
            t0 = time.perf_counter()
            xds_plan.plan(target, acked=held, sent=held)
            computed.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            xds_plan.plan(target, acked=held, sent=held)
            shared.append((time.perf_counter() - t0) * 1000)
        # The incremental path the control plane runs (bench/change_cost.py): Renderer,
        # set_snapshot, and one SotW plus one delta stream in sync (plan, selections, bodies).
        stages = measure_change(n, reps=CHANGE_REPS, full_reps=0)
        row = {
            "inc_render_ms": stages["render"],
            "inc_snapshot_ms": stages["set_snapshot"],
            "inc_push_ms": stages["push"],
            "inc_ack_ms": stages["ack"],
            "plan_ms": med(computed),
            "plan_shared_ms": med(shared),
            "services": n,
            "lanes": len(view.lanes),
            "clusters": len(res[resources.CLUSTER]),
            "weighted_routes": weighted,
            "reps": len(times),
            "median_ms": med(times),
            "change_ms": med(changed),
            "p90_ms": pct(times, 0.9),
            "route_bytes": route_bytes,
            "change_route_bytes": change_route_bytes,
        }
        print(f"  render {n:>5} services: {row['median_ms']:.2f} ms median over {len(times)}", flush=True)
        out.append(row)
    return out


# --------------------------------------------------------------------------- 2 + 3. end to end


def release_spec() -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane="checkout-v2",
        entry=SERVICE,
        services=[pb.ServiceVersions(service=SERVICE, base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        match=[pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-canary", op=pb.EXACT, value="always")])],
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in WEIGHTS],
    )


async def until(pred: Callable[[], bool], poll: float, timeout: float = WAIT_TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(poll)


async def bench_e2e() -> dict[str, object]:
    samples: dict[str, list[float]] = {"next": [], "first": [], "rb_snap": [], "rb_ack": []}
    async with contextlib.AsyncExitStack() as stack:
        local = await stack.enter_async_context(local_control_plane(prefix="graylane-bench-"))
        plane = local.plane
        v1 = await stack.enter_async_context(Upstream(SERVICE, "v1"))
        v2 = await stack.enter_async_context(Upstream(SERVICE, "v2"))
        client = await stack.enter_async_context(ReleaseClient.connect(f"127.0.0.1:{plane.api_port}", actor="bench"))
        await client.put_service(pb.Service(name=SERVICE, stable_version="v1"))
        for name, up in (("v1", v1), ("v2", v2)):
            await client.put_version(
                pb.Version(service=SERVICE, name=name, endpoints=[pb.Endpoint(address="127.0.0.1", port=up.port)])
            )
        envoy = await stack.enter_async_context(EnvoyProcess(ads_port=plane.xds_port, node_id="bench-envoy"))
        await plane.dataplane.wait_current()
        await client.apply_release(pb.Release(name=RELEASE, spec=release_spec()))
        print(
            f"  etcd {local.etcd.endpoint}, API :{plane.api_port}, xDS :{plane.xds_port}, envoy :{envoy.listen_port}",
            flush=True,
        )

        async def step(action: Action, bucket: str) -> pb.Release:
            """Act, then time from the call returning to `status.reached` (GetRelease every 5 ms)."""
            r = await client.act(action, RELEASE)
            t0 = time.perf_counter()
            async with asyncio.timeout(WAIT_TIMEOUT):
                while not (r := await client.get_release(RELEASE)).status.reached:
                    await asyncio.sleep(REACHED_POLL)
            samples[bucket].append((time.perf_counter() - t0) * 1000)
            return r

        def route_versions() -> dict[str, str]:
            out = {}
            for p in plane.tracker.proxies().values():
                snap = plane.cache.snapshot(p.key)
                if p.connected and snap is not None:
                    out[p.key] = snap[resources.ROUTE].version
            return out

        async def rollback() -> None:
            """Time from Rollback returning to a new route snapshot, and to every proxy's ACK of it."""
            before = route_versions()

            def rendered() -> bool:
                now = route_versions()
                return bool(now) and all(now.get(k) != v for k, v in before.items())

            await client.act(Action.ROLLBACK, RELEASE)
            t0 = time.perf_counter()
            await until(rendered, ACK_POLL)
            samples["rb_snap"].append((time.perf_counter() - t0) * 1000)
            await until(lambda: rendered() and plane.dataplane.proxies_current(), ACK_POLL)
            samples["rb_ack"].append((time.perf_counter() - t0) * 1000)

        deadline = time.monotonic() + E2E_BUDGET_SECONDS
        # Pass 1: the 20 batches. Batch 1 also adds the v2 cluster (CDS + EDS + RDS).
        await step(Action.NEXT, "first")
        for _ in WEIGHTS[1:]:
            if time.monotonic() > deadline:
                break
            await step(Action.NEXT, "next")
        # Then: rollback, restart (re-adds the v2 cluster), one more weight change.
        for _ in range(ROLLBACK_CYCLES):
            if time.monotonic() > deadline:
                break
            await rollback()
            await step(Action.RESTART, "first")
            await step(Action.NEXT, "next")

        # 3. Throughput at the 50 % batch.
        await rollback()
        await step(Action.RESTART, "first")
        while (await client.get_release(RELEASE)).status.weight < 50:
            await step(Action.NEXT, "next")
        weight = (await client.get_release(RELEASE)).status.weight
        via_envoy: list[LoadResult] = []
        direct: list[LoadResult] = []
        load_deadline = time.monotonic() + LOAD_BUDGET_SECONDS
        for i in range(LOAD_ROUNDS):
            if i and time.monotonic() > load_deadline:
                break
            via_envoy.append(
                await run_load(
                    envoy.listen_port,
                    authority=SERVICE,
                    count=LOAD_COUNT,
                    max_seconds=LOAD_MAX_SECONDS,
                    concurrency=LOAD_CONCURRENCY,
                )
            )
            direct.append(
                await run_load(
                    v1.port,
                    authority=SERVICE,
                    count=LOAD_COUNT,
                    max_seconds=LOAD_MAX_SECONDS,
                    concurrency=LOAD_CONCURRENCY,
                )
            )
            print(
                f"  load round {i + 1}: envoy {via_envoy[-1].rate:,.0f} rps, direct {direct[-1].rate:,.0f} rps",
                flush=True,
            )
    return {"samples": samples, "weight": weight, "envoy": via_envoy, "direct": direct}


# --------------------------------------------------------------------------- report


def report(render_rows: list[dict[str, object]], e2e: dict[str, object], started: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Graylane benchmarks",
        "",
        f"- date: {now}",
        f"- machine: {platform.platform()}; CPU: {cpu_model()}; os.cpu_count() = {os.cpu_count()}",
        f"- Python {platform.python_version()}; shared, noisy machine: medians and p90 over repeated runs",
        "",
        render_section(render_rows),
    ]
    s = e2e["samples"]
    assert isinstance(s, dict)
    return _report_rest(parts, s, e2e, started)


def render_section(render_rows: list[dict[str, object]]) -> str:
    parts = [
        "## 1. Render cost",
        "",
        "`render(view, listen_port=10000)`: n services on v1 (2 endpoints each); every 10th service has a v2 "
        "and its own lane (header rule + weight 20). Time per full render (nothing reused; includes serialising "
        "and hashing every resource once), and per render of the same view with one lane's weight changed "
        "(unchanged clusters, endpoint sets and virtual hosts reused from the previous render); "
        "size of all the serialized RouteConfigurations (one per service, behind SRDS scopes) and of those "
        "one lane's weight change re-sends (bench/route_bytes.py measures the same through the ADS server). "
        "`plan` is `graylane.xds.plan.plan` for a "
        "stream holding the previous render (median of 5): computed once per distinct (target, ACKed, sent) "
        "state, and then shared by every stream in that state. "
        "The last four columns are the path the control plane runs for one lane's weight change "
        "(bench/change_cost.py, median of 7): `Renderer.render` from the previous view "
        "(`graylane.xds.renderer`: only the touched services), `SnapshotCache.set_snapshot` (derived snapshot: "
        "O(changes) check and history), then one SotW and one delta stream in sync with the previous snapshot "
        "through the real ADS server's stream objects: plan + selections + response bodies, and the handling "
        "of the proxies' ACKs (re-plan included).",
        "",
    ]
    parts.append(
        table(
            [
                "services",
                "lanes",
                "clusters",
                "runs",
                "full render median ms",
                "p90 ms",
                "one lane changed ms (pure render)",
                "RouteConfiguration bytes (all)",
                "re-sent per weight change",
                "plan ms (computed)",
                "plan ms (shared)",
                "incremental: render ms",
                "set_snapshot ms",
                "plan+selections+bodies ms (2 streams)",
                "ACKs ms (2 streams)",
            ],
            [
                [
                    str(r["services"]),
                    str(r["lanes"]),
                    str(r["clusters"]),
                    str(r["reps"]),
                    f"{r['median_ms']:.2f}",
                    f"{r['p90_ms']:.2f}",
                    f"{r['change_ms']:.2f}",
                    f"{r['route_bytes']:,}",
                    f"{r.get('change_route_bytes', 0):,}",
                    f"{r['plan_ms']:.2f}",
                    f"{r['plan_shared_ms']:.3f}",
                    f"{r['inc_render_ms']:.2f}",
                    f"{r['inc_snapshot_ms']:.2f}",
                    f"{r['inc_push_ms']:.2f}",
                    f"{r['inc_ack_ms']:.2f}",
                ]
                for r in render_rows
            ],
        )
    )
    parts.append("")
    return "\n".join(parts)


def _report_rest(parts: list[str], s: dict[str, list[float]], e2e: dict[str, object], started: float) -> str:

    def lat_row(label: str, vals: list[float]) -> list[str]:
        stats = (med(vals), pct(vals, 0.9), min(vals), max(vals))
        return [label, str(len(vals)), *(f"{x:.1f}" for x in stats)]

    parts += [
        "",
        "## 2. Control-plane latency, end to end",
        "",
        "Embedded etcd, the control plane in-process, one real Envoy (ADS SotW), loopback. "
        "`NextBatch -> reached`: from the NextBatch RPC returning to GetRelease (polled every 5 ms) "
        "showing `status.reached` (Envoy ACKed the new routes and the control plane wrote that to etcd). "
        "`Rollback -> ACK`: from the Rollback RPC returning to `plane.dataplane.proxies_current()` "
        "(polled every 2 ms) for a route snapshot newer than the one before the call; "
        "`-> snapshot` is the part until that snapshot exists.",
        "",
    ]
    parts.append(
        table(
            ["measurement", "n", "median ms", "p90 ms", "min ms", "max ms"],
            [
                lat_row("NextBatch -> reached (weight change, RDS only)", s["next"]),
                lat_row("first batch / Restart -> reached (adds v2 cluster: CDS+EDS+RDS)", s["first"]),
                lat_row("Rollback -> new route snapshot in the cache", s["rb_snap"]),
                lat_row("Rollback -> every proxy ACKed it", s["rb_ack"]),
            ],
        )
    )
    env = e2e["envoy"]
    dire = e2e["direct"]
    assert isinstance(env, list) and isinstance(dire, list)
    env_rps = med([r.rate for r in env])
    dir_rps = med([r.rate for r in dire])
    shares = [r.share("v2") for r in env]
    failed = sum(r.failed for r in env) + sum(r.failed for r in dire)
    parts += [
        "",
        "## 3. Data-plane throughput (sanity check, not an Envoy benchmark)",
        "",
        f"`run_load(count={LOAD_COUNT}, concurrency={LOAD_CONCURRENCY}, max_seconds={LOAD_MAX_SECONDS:g})`, "
        f"HTTP/1.1 keep-alive, batch weight {e2e['weight']} %, {len(env)} alternating rounds. The load generator, "
        "both upstreams and the control plane share one Python asyncio loop, and Envoy shares the 2 cores: "
        "this measures our Python load generator + Python upstream (+ Envoy), not Envoy's capacity.",
        "",
    ]

    def load_row(label: str, runs: list[LoadResult]) -> list[str]:
        rates = [r.rate for r in runs]
        return [
            label,
            str(len(runs)),
            f"{med(rates):,.0f}",
            f"{min(rates):,.0f}",
            f"{max(rates):,.0f}",
            str(sum(r.failed for r in runs)),
        ]

    parts.append(
        table(
            ["path", "rounds", "median req/s", "min req/s", "max req/s", "failed"],
            [
                load_row(f"through Envoy ({SERVICE}, {e2e['weight']} % batch)", env),
                load_row("direct to the v1 upstream", dire),
            ],
        )
    )
    parts += [
        "",
        f"Envoy / direct = {env_rps / dir_rps:.2f}. v2 share through Envoy per round: "
        + ", ".join(f"{x:.1%}" for x in shares)
        + f" (expected ~50 %). Failed requests in all rounds: {failed}.",
        "",
        f"Whole run: {time.monotonic() - started:.0f} s.",
        "",
    ]
    return "\n".join(parts)


# Fleet sizes: (streams, streams per worker process, services, real Envoys, weight changes,
# connect timeout s, whole-fleet budget s).
FLEET_DEFAULT = (1000, 500, 100, 2, 5, 90.0, 240.0)
FLEET_SCALE = (10_000, 1250, 100, 2, 5, 300.0, 600.0)


# The fleet sections' fake clients unless --fleet-impl says otherwise: the C worker costs the
# fewest of the 2 cores per change (--scale, 10,000 streams, alternated runs: 280-340 ms of
# worker CPU per change, 370-470 without its 2 ms event batching, against 1,710-1,980 ms for
# the grpc-js worker and 1,140 for the Node http2 one).
DEFAULT_FLEET = "c"

FLEET_SOURCES = {
    "c": "the C fleet, bench/fleet_c/worker.c (libnghttp2, epoll, gRPC framing and protobuf by hand) driven by "
    "bench/fleet.py",
    "node": "the Node fleet, bench/fleet_node/worker.js (@grpc/grpc-js) driven by bench/fleet.py",
    "python": "the Python fleet, bench/fleet.py (grpc.aio)",
}


def fleet_source(impl: str) -> str:
    """The fleet as the section headers name it, with its scheduling weight when lowered."""
    if fleet.FLEET_NICE and fleet.OWN_SESSIONS:
        return f"{FLEET_SOURCES[impl]}; each worker's CPU group at nice {fleet.FLEET_NICE} (GRAYLANE_BENCH_FLEET_NICE)"
    return FLEET_SOURCES[impl]


def fleet_section(title: str, command: str, rows: list[tuple[str, str]], fleet_impl: str) -> str:
    return "\n".join(
        [
            f"## {title}",
            "",
            f"`{command}`: fake ADS clients in worker processes ({fleet_source(fleet_impl)}; 10 streams per "
            "HTTP/2 connection; SotW, every 4th delta; each ACKs every response and records the "
            "wall-clock instant it first sees the lane's weight), 2 real Envoys (one SotW, one delta), "
            "one control plane in the bench process with embedded etcd, loopback. The machine is "
            "shared with other engineers' runs: noisy.",
            "",
            table(["measurement", "value"], [list(r) for r in rows]),
            "",
        ]
    )


def replace_section(text: str, title: str, section: str) -> str:
    """`text` with its `## title` section replaced by `section` (appended if absent)."""
    head = f"## {title}"
    start = text.find(head)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(head))
    return text[:start] + section + ("" if end < 0 else text[end + 1 :])


async def run_fleet(
    size: tuple[int, int, int, int, int, float, float],
    title: str,
    command: str,
    *,
    fleet_impl: str = DEFAULT_FLEET,
) -> str:
    streams, per_worker, services, envoys, changes, connect_timeout, budget = size
    print(f"fleet: {streams} streams over {-(-streams // per_worker)} {fleet_impl} processes", flush=True)
    result = await bench_fleet(
        streams=streams,
        per_worker=per_worker,
        services=services,
        envoys=envoys,
        changes=changes,
        connect_timeout=connect_timeout,
        budget=budget,
        fleet_impl=fleet_impl,
    )
    rows = describe(result)
    rows += [("note", n) for n in result.notes]
    return fleet_section(title, command, rows, fleet_impl)


def _tree() -> str:
    """The commit measured, marked when the tree has changes beyond it."""
    import subprocess

    here = pathlib.Path(__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
    # RESULTS.md itself is what runs rewrite: not a change to the code measured.
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!bench/RESULTS.md"], cwd=here.parent)
    return head.stdout.strip() + (" with uncommitted changes" if dirty.returncode else "")


def _load() -> str:
    return pathlib.Path("/proc/loadavg").read_text().split()[0]


async def run_replicas(
    size: tuple[int, int, int, int, int, float, float],
    title: str,
    command: str,
    *,
    replicas: int,
    api_replica: bool,
    fleet_impl: str = DEFAULT_FLEET,
) -> str:
    streams, per_worker, services, envoys, changes, connect_timeout, budget = size
    tree, load_before, began = _tree(), _load(), datetime.datetime.now(datetime.UTC).strftime("%H:%M")
    extra = " and an API replica" if api_replica else ""
    print(f"fleet: {streams} streams over {replicas} replicas{extra}", flush=True)
    result = await bench_replicas(
        streams=streams,
        per_worker=per_worker,
        services=services,
        envoys=envoys,
        changes=changes,
        connect_timeout=connect_timeout,
        budget=budget,
        replicas=replicas,
        api_replica=api_replica,
        worker=worker_class(fleet_impl),
    )
    rows = describe_replicas(result) + [("note", n) for n in result.notes]
    layout = (
        f"{replicas} `graylane serve` replicas on one etcd, none in the bench process, the fleet's worker processes "
        f"dealt out round-robin between them (worker w dials replica w % {replicas}; the real Envoys likewise)"
        + (
            ", and one more replica that no proxy connects to: the API's (the probers and the NextBatch calls go "
            "to it; started first, it is the leader)"
            + (f"; its CPU group at nice {API_NICE} (GRAYLANE_BENCH_API_NICE)" if API_NICE else "")
            if api_replica
            else "; an API prober process per replica, the NextBatch calls to r0"
        )
    )
    return "\n".join(
        [
            f"## {title}",
            "",
            f"`{command}` at {tree}, {datetime.date.today()} {began}-"
            f"{datetime.datetime.now(datetime.UTC).strftime('%H:%M')} UTC (load average {load_before} -> {_load()}), "
            f"2 cores: fake ADS clients in worker processes ({fleet_source(fleet_impl)}; "
            "10 streams per HTTP/2 connection; SotW, every 4th delta; each ACKs every response and records the "
            "wall-clock instant it first sees the lane's weight), "
            f"{envoys} real Envoys (one SotW, one delta), {layout}. Event-loop lag from each replica's /metrics "
            f"(graylane_event_loop_lag_max_seconds; `--loop-lag-interval {LAG_INTERVAL}`, so a stall reads short by "
            "up to that); CPU and RSS from /proc. bench/replicas.py. The machine is shared with other engineers' "
            "runs: noisy.",
            "",
            table(["measurement", "value"], [list(r) for r in rows]),
            "",
        ]
    )


NOTES_TITLE = "Notes"  # a hand-written section of RESULTS.md, kept by every run
FAULTS_TITLE = "Fault suite (make chaos)"  # written from `make chaos` runs, kept by every run
SCRAPER_TARGETS = 1000
SCRAPER_SECONDS = 20.0


async def bench_scraper() -> str:
    rows = []
    for bounded in (False, True):
        r = await scrape_cpu(targets=SCRAPER_TARGETS, seconds=SCRAPER_SECONDS, bounded=bounded)
        label = "bounded: 32 at once, backoff 1 s doubling to 60 s" if bounded else "unbounded, no backoff (before)"
        print(f"  scraper {label}: {r['cpu_pct']:.1f} % CPU", flush=True)
        rows.append([label, f"{r['cpu_pct']:.1f} %", f"{r['requests']:,.0f}", f"{r['ticks']:.0f}"])
    return "\n".join(
        [
            "## 6. Stats scraper with dead admin endpoints",
            "",
            f"`EnvoyStatsScraper.read_all` every 1 s over {SCRAPER_TARGETS:,} admin addresses on loopback ports "
            f"nothing listens on (connection refused), for {SCRAPER_SECONDS:g} s (bench/scraper.py); CPU of the "
            "process over wall time. The control plane's log gets one summary line when the set of dead admins "
            "changes (a count and five names), not a line naming all of them.",
            "",
            table(["setting", "CPU (share of one core)", "requests sent", "ticks"], rows),
            "",
        ]
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", action="store_true", help="only the 10,000-stream fleet (bounded in time)")
    parser.add_argument("--fleet-only", action="store_true", help="only the default fleet")
    parser.add_argument("--render-only", action="store_true", help="only the render and plan costs")
    parser.add_argument("--streams", type=int, default=0, help="fleet size override")
    parser.add_argument(
        "--per-worker", type=int, default=0, help="fake clients per fleet worker process (override of the default)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="with --scale or --fleet-only: this many `graylane serve` replicas on one etcd (none in the bench "
        "process), the fleet dealt out between them (bench/replicas.py)",
    )
    parser.add_argument(
        "--api-replica",
        action="store_true",
        help="with --replicas: one more replica that no proxy connects to serves the API (and is the leader)",
    )
    parser.add_argument(
        "--fleet-impl",
        choices=FLEET_IMPLS,
        default=DEFAULT_FLEET,
        help="the fake ADS clients of the fleet sections: c (bench/fleet_c, libnghttp2; the cheapest), "
        "node (bench/fleet_node/worker.js, grpc-js) or "
        "python (bench/fleet.py's grpc.aio workers)",
    )
    parser.add_argument("--store-only", action="store_true", help="only the store/API section (bench/store_bench.py)")
    parser.add_argument(
        "--floor-only", action="store_true", help="only the NextBatch path's floor (bench/floor.py, section 7b)"
    )
    parser.add_argument("--e2e-only", action="store_true", help="only section 2's latencies, printed (nothing written)")
    parser.add_argument(
        "--tls", action="store_true", help="only the TLS overhead on NextBatch -> ACKed (bench/tls_bench.py)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    logging.basicConfig(level=logging.WARNING)
    fleet_size = FLEET_SCALE if args.scale else FLEET_DEFAULT
    if args.streams:
        fleet_size = (args.streams, *fleet_size[1:])
    if args.per_worker:
        fleet_size = (fleet_size[0], args.per_worker, *fleet_size[2:])
    elif args.fleet_impl in ("c", "node"):
        # One worker per core (C or Node): its single thread handles a few thousand streams, and fewer,
        # busier processes spend less of their CPU on being woken and scheduled (10,000 streams:
        # 1,960 ms of worker CPU per change over 2 processes against 2,570-2,970 over 8).
        per_core = -(-fleet_size[0] // (os.cpu_count() or 1))
        fleet_size = (fleet_size[0], max(fleet_size[1], per_core), *fleet_size[2:])
    title = "5. Fleet at scale" if args.scale else "4. Fleet"
    command = "bench/run.py --scale" if args.scale else "bench/run.py --fleet-only" if args.fleet_only else "make bench"
    if args.replicas > 1 or args.api_replica:
        part = "5" if args.scale else "4"
        at_scale = " at scale" if args.scale else ""
        over = "one replica" if args.replicas == 1 else f"{args.replicas} replicas"
        title = f"{part}b. Fleet{at_scale} over {over}"
        command += f" --replicas {args.replicas}"
        if args.api_replica:
            title = f"{part}c. Fleet{at_scale} over {over} and an API replica"
            command += " --api-replica"
    if args.fleet_impl != DEFAULT_FLEET:
        command += f" --fleet-impl {args.fleet_impl}"
    if args.render_only:
        section = render_section(bench_render())
        print(section)
        RESULTS.write_text(replace_section(RESULTS.read_text(), "1. Render cost", section))
        return 0
    if args.e2e_only:
        samples = (await bench_e2e())["samples"]
        assert isinstance(samples, dict)
        for bucket, values in samples.items():
            ordered = sorted(values)
            if ordered:
                print(f"{bucket}: p50 {statistics.median(ordered):.1f} ms, max {ordered[-1]:.1f} ms ({len(ordered)})")
        return 0
    if args.tls:
        section = await tls_bench()
        print(section)
        RESULTS.write_text(replace_section(RESULTS.read_text(), TLS_TITLE, section))
        return 0
    if args.floor_only:
        section = await floor_section(_tree(), "bench/run.py --floor-only")
        print(section)
        RESULTS.write_text(replace_section(RESULTS.read_text(), FLOOR_TITLE, section))
        return 0
    if args.store_only:
        section = await store_bench()
        print(section)
        RESULTS.write_text(replace_section(RESULTS.read_text(), "7. Store and API at 1,000 releases", section))
        return 0
    if args.scale or args.fleet_only:
        command += f" --streams {args.streams}" if args.streams else ""
        command += f" --per-worker {args.per_worker}" if args.per_worker else ""
        if args.replicas > 1 or args.api_replica:
            section = await run_replicas(
                fleet_size,
                title,
                command,
                replicas=args.replicas,
                api_replica=args.api_replica,
                fleet_impl=args.fleet_impl,
            )
        else:
            section = await run_fleet(fleet_size, title, command, fleet_impl=args.fleet_impl)
        print(section)
        old = RESULTS.read_text() if RESULTS.exists() else "# Graylane benchmarks\n"
        RESULTS.write_text(replace_section(old, title, section))
        print(f"written to {RESULTS}")
        return 0
    print("1. render", flush=True)
    render_rows = bench_render()
    print("2+3. end to end (etcd, control plane, envoy)", flush=True)
    e2e = await bench_e2e()
    print("4. fleet", flush=True)
    section = await run_fleet(fleet_size, title, command, fleet_impl=args.fleet_impl)
    print("6. stats scraper", flush=True)
    scraper_text = await bench_scraper()
    print("7. store and API at 1,000 releases", flush=True)
    store_text = await store_bench()
    print("7b. the NextBatch path's floor", flush=True)
    floor_text = await floor_section(_tree(), "make bench")
    text = (
        report(render_rows, e2e, started) + "\n" + section + "\n" + scraper_text + "\n" + store_text + "\n" + floor_text
    )
    old = RESULTS.read_text() if RESULTS.exists() else ""
    scale_title = "5. Fleet at scale"
    # The last --scale run, the fault suite's results and the hand-written notes.
    replica_heads = ("## 4b. ", "## 5b. ", "## 4c. ", "## 5c. ")
    replica_titles = [line[3:] for line in old.splitlines() if line.startswith(replica_heads)]
    for kept in (scale_title, *replica_titles, TLS_TITLE, FAULTS_TITLE, NOTES_TITLE):
        if f"## {kept}" in old:
            start = old.find(f"## {kept}")
            end = old.find("\n## ", start + 3)
            text = replace_section(text, kept, old[start:] if end < 0 else old[start : end + 1])
    print()
    print(text)
    RESULTS.write_text(text)
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
