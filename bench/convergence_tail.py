"""What the convergence pass's slow passes wait for, with timestamps (issue 12, section 7's tail).

The set-up of bench/store_bench.py's tmpfs rows (embedded etcd with its data in /dev/shm,
1,000 services and releases created through the API, 100 progressing), then its NextBatch
steps (`store_bench.bench_reached`) with 1 and then 5 real Envoys; then NextBatch steps
at the moment a second Envoy ACKed its routes, and at the moment it left (each time every
live release's count changes and is written: ROUNDS of each). Every convergence pass
and every status write it makes is timed (wrapped in this process; nothing in the product
changes), with the bench's own marks (an Envoy starting, each API call of the client), and
each slow pass is printed with what it did: its writes (how many, how long each took,
which fields each changed) and what ran meanwhile.

    .venv/bin/python -P bench/convergence_tail.py [slow_ms=50]

GRAYLANE_BENCH_WRITE_SLICE=inf gives the passes as before 9a6f780 (bench/store_bench.py).
Run it under the bench lock: `flock /tmp/graylane-bench.lock .venv/bin/python -P bench/convergence_tail.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import statistics
import sys
import time
from collections import Counter
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import store_bench as sb  # noqa: E402
from graylane.controlplane.app import ControlPlane  # noqa: E402
from graylane.controlplane.domain import model  # noqa: E402
from graylane.controlplane.domain.machine import Action as Move  # noqa: E402
from graylane.controlplane.domain.machine import Cause  # noqa: E402
from graylane.controlplane.domain.releases import Releases  # noqa: E402
from graylane.controlplane.local.envoy import EnvoyProcess  # noqa: E402
from graylane.controlplane.reconcile import convergence  # noqa: E402

T0 = time.perf_counter()
# store_bench.bench_reached's runs, by their Envoys (GRAYLANE_TAIL_ENVOYS=1,5; empty: none)
ENVOYS = tuple(int(n) for n in os.environ.get("GRAYLANE_TAIL_ENVOYS", "1,5").split(",") if n)
ROUNDS = 8  # NextBatch steps at a joining and at a leaving Envoy
MARKS: list[tuple[float, str]] = []  # (instant, what the bench did)
PASSES: list[dict[str, Any]] = []  # one per convergence pass
_current: list[dict[str, Any]] = []  # the pass running now (passes never overlap: one task runs them)


def ms(t: float) -> float:
    return (t - T0) * 1000


def _fields(before: model.ReleaseStatus, after: model.ReleaseStatus) -> str:
    names = ("proxies", "converged", "reached", "target_version", "lagging", "gone")
    return ",".join(n for n in names if getattr(before, n) != getattr(after, n)) or "-"


def instrument() -> None:
    reconcile = convergence.Convergence.reconcile

    async def reconcile_timed(self: convergence.Convergence) -> None:
        entry: dict[str, Any] = {"t0": time.perf_counter(), "writes": []}
        _current[:] = [entry]
        cpu0 = time.thread_time()
        try:
            await reconcile(self)
        finally:
            entry["t1"] = time.perf_counter()
            entry["cpu"] = time.thread_time() - cpu0  # the loop thread's CPU meanwhile (other tasks' too)
            _current.clear()
            PASSES.append(entry)

    convergence.Convergence.reconcile = reconcile_timed  # type: ignore[method-assign]
    update_status = Releases.update_status

    async def update_status_timed(self: Releases, name: str, change: Any) -> Any:
        t0 = time.perf_counter()
        before = self._latest(name)
        written = await update_status(self, name, change)
        what = _fields(before.status, written.status) if written is not None and before is not None else "none"
        if _current:
            _current[0]["writes"].append((t0, time.perf_counter(), name, written is not None, what))
        return written

    Releases.update_status = update_status_timed  # type: ignore[method-assign]
    enter = EnvoyProcess.__aenter__

    async def enter_marked(self: EnvoyProcess) -> EnvoyProcess:
        MARKS.append((time.perf_counter(), f"Envoy {self.node_id} starting"))
        out = await enter(self)
        MARKS.append((time.perf_counter(), f"Envoy {self.node_id} ready"))
        return out

    EnvoyProcess.__aenter__ = enter_marked  # type: ignore[method-assign]
    ask = sb._Client.ask

    async def ask_marked(self: sb._Client, line: str) -> dict[str, Any]:
        MARKS.append((time.perf_counter(), f"client: {line}"))
        answer = await ask(self, line)
        MARKS.append((time.perf_counter(), f"client answered: {line}"))
        return answer

    sb._Client.ask = ask_marked  # type: ignore[method-assign]


def describe(p: dict[str, Any]) -> list[str]:
    writes = p["writes"]
    done = [w for w in writes if w[3]]
    took = [(w[1] - w[0]) * 1000 for w in writes]
    kinds = Counter(w[4] for w in done)
    wall, cpu = (p["t1"] - p["t0"]) * 1000, p["cpu"] * 1000
    each = statistics.median(took) if took else 0.0
    lines = [
        f"  pass at {ms(p['t0']):10.1f} ms: {wall:7.1f} ms wall, loop CPU {cpu:.1f} ms; {len(writes)} "
        f"update_status calls ({len(done)} written; each p50 {each:.2f} ms, sum {sum(took):.1f} ms); "
        f"fields changed: {dict(kinds)}"
    ]
    if writes:
        gap, tail = (writes[0][0] - p["t0"]) * 1000, (p["t1"] - writes[-1][1]) * 1000
        lines.append(f"    first write {gap:.1f} ms after the pass began; last ended {tail:.1f} ms before its end")
    for t, what in MARKS:
        if p["t0"] - 0.05 <= t <= p["t1"]:
            lines.append(f"    mark {ms(t):10.1f} ms: {what}")
    return lines


def _bulk_spans() -> list[tuple[float, int]]:
    """Runs of status writes that follow one another within 100 ms (a proxy came or went:
    every live release's count changed), with at least 50 writes: from the first write's
    start to the last one's end, over however many passes."""
    writes = sorted(w for p in PASSES for w in p["writes"])
    spans: list[tuple[float, int]] = []
    run: list[tuple[float, float]] = []
    for w in writes:
        if run and w[0] - run[-1][1] > 0.1:
            if len(run) >= 50:
                spans.append(((run[-1][1] - run[0][0]) * 1000, len(run)))
            run = []
        run.append((w[0], w[1]))
    if len(run) >= 50:
        spans.append(((run[-1][1] - run[0][0]) * 1000, len(run)))
    return spans


async def next_during_bulk(plane: ControlPlane, name: str, rounds: int) -> dict[str, list[float]]:
    """NextBatch (in-process, `Releases.act`, as the API handler calls it) on `name` at the
    moment a second Envoy has ACKed the routes, and again at the moment its stream closes:
    each time every live release's count changes and is written. To `reached` in the
    follower's state, ms."""
    out: dict[str, list[float]] = {"ack": [], "leave": []}
    cause = Cause(actor="bench")

    async def step() -> float:
        r = plane.releases._latest(name)
        assert r is not None
        if r.status.batch + 1 >= len(r.spec.batches):
            back = Move.RESTART if r.status.phase is model.Phase.ROLLED_BACK else Move.ROLLBACK
            await plane.releases.act(name, back, cause)
            await sb.until(lambda: (x := plane.releases._latest(name)) is not None and x.status.reached, 30)
            r = plane.releases._latest(name)
            assert r is not None
        batch = r.status.batch + 1
        t0 = time.perf_counter()
        await plane.releases.act(name, Move.NEXT, cause)

        def reached() -> bool:
            x = plane.releases._latest(name)
            return x is not None and x.status.batch == batch and x.status.reached

        await sb.until(reached, 30, poll=0.0005)
        return (time.perf_counter() - t0) * 1000

    def streams() -> int:
        return sum(1 for p in plane.tracker.proxies().values() if p.connected)

    async with EnvoyProcess(ads_port=plane.xds_port, node_id="base", node_cluster="local"):
        await plane.dataplane.wait_current(timeout=30)
        await asyncio.sleep(1.5)  # the base Envoy's own writes are done
        for k in range(rounds):
            async with EnvoyProcess(ads_port=plane.xds_port, node_id=f"join-{k}", node_cluster="local"):
                # Its routes ACKed: every live release's count gains a converged proxy.
                await plane.dataplane.wait_current(timeout=30)
                out["ack"].append(await step())
                await asyncio.sleep(1.5)  # the join's writes are done
            await sb.until(lambda: streams() == 1, 30, poll=0.0005)
            out["leave"].append(await step())
            await asyncio.sleep(1.5)
    return out


async def run(slow_ms: float) -> str:
    instrument()
    out: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        _, _, store = await sb.fresh_store(stack, under=sb.TMPFS)
        await sb.register(store, sb.RELEASES)
        names = [f"r-s{i:04d}" for i in range(sb.RELEASES)]
        async with ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0").running() as plane:
            await sb.create_all(f"127.0.0.1:{plane.api_port}", sb.RELEASES)
            for name in names[: sb.LIVE]:
                await plane.releases.act(name, Move.NEXT, Cause(actor="bench"))
            await asyncio.sleep(1.0)
            for envoys in ENVOYS:
                PASSES.clear()
                MARKS.clear()
                MARKS.append((time.perf_counter(), f"bench_reached with {envoys} Envoy(s) begins"))
                r = await sb.bench_reached(plane, envoys, names[-1])
                MARKS.append((time.perf_counter(), "bench_reached ends"))
                walls = [(p["t1"] - p["t0"]) * 1000 for p in PASSES]
                out.append(
                    f"== {envoys} Envoy(s): {len(PASSES)} passes, p50 {statistics.median(walls):.2f} ms, "
                    f"max {max(walls):.1f} ms; reached on a Watch p50 {sb.med(r['watched']):.1f} / "
                    f"p99 {sb.p99(r['watched']):.1f} ms; every Envoy ACKed p50 {sb.med(r['acked']):.1f} / "
                    f"p99 {sb.p99(r['acked']):.1f} ms"
                )
                out.append(
                    "  per step, NextBatch -> reached on a Watch, ms: " + " ".join(f"{w:.0f}" for w in r["watched"])
                )
                asked: dict[str, float] = {}
                gets = []
                for t, what in MARKS:
                    if what.startswith("client: get"):
                        asked[what] = t
                    elif what.startswith("client answered: get") and what.replace(" answered", "") in asked:
                        gets.append((t - asked.pop(what.replace(" answered", ""))) * 1000)
                out.append("  the client's GetRelease before each step, ms: " + " ".join(f"{g:.0f}" for g in gets))
                spans = _bulk_spans()
                if spans:
                    out.append(
                        "  count-only bulks (>= 50 writes within 2 s): first write -> last, ms: "
                        + " ".join(f"{a:.0f} ({n} writes)" for a, n in spans)
                    )
                for p in PASSES:
                    if (p["t1"] - p["t0"]) * 1000 >= slow_ms:
                        out += describe(p)
            PASSES.clear()
            MARKS.clear()
            during = await next_during_bulk(plane, names[-2], ROUNDS)
            walls = [(p["t1"] - p["t0"]) * 1000 for p in PASSES]
            for what, took in during.items():
                out.append(
                    f"== NextBatch at a 2nd Envoy's {what} (count-only writes of every live release due): "
                    f"-> reached in the follower's state, ms: "
                    + " ".join(f"{t:.0f}" for t in took)
                    + f" (median {statistics.median(took):.1f})"
                )
            out.append(
                f"  passes meanwhile: {len(walls)}, p50 {statistics.median(walls):.2f} ms, max {max(walls):.1f} ms"
            )
            for p in PASSES:
                if (p["t1"] - p["t0"]) * 1000 >= slow_ms:
                    out += describe(p)
            spans = _bulk_spans()
            out.append("  bulks, first write -> last, ms: " + " ".join(f"{a:.0f} ({n} writes)" for a, n in spans))
    return "\n".join(out)


if __name__ == "__main__":
    slow = float(sys.argv[1]) if len(sys.argv) > 1 else 50.0
    print(os.getloadavg(), flush=True)
    print(asyncio.run(run(slow)))
    print(os.getloadavg(), flush=True)
