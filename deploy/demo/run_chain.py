"""`graylane demo`: a full-link gray lane on one machine, with real parts, bounded in time.

Starts an embedded etcd (data in a temporary folder), one control-plane replica (API and
xDS on free loopback ports) and the demo chain a -> b -> c -> d -> e of
`graylane.deploy.demo` (real HTTP services, b and c in v1 and v2; one sidecar Envoy per
calling service and an edge Envoy, all configured over ADS). Then it applies the release
of deploy/examples/full-link.yaml (lane `gray-bc`, entry b, b and c from v1 to v2, testers
by header) and steps it through every batch under bounded traffic: a share of testers
(`x-user: tester`) and plain users. Per step it prints the share of each path plain users
took and how many testers stayed in the lane. It ends with a rollback (everyone back on
v1), a restart and a promote (v2 of b and c becomes stable).

Owns the demo's script and its verdict; the chain, the services and the control plane
are the library's (graylane.deploy.demo, graylane.controlplane.local).

Exit status 0 when every request was answered 200 and took the path it should: a request
tagged with the lane at b takes the lane's whole path (b v2 *and* c v2), any other request
the stable path of the moment (so no plain request touches b v2 or c v2 before the promote).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.domain.manifest import load_manifest
from graylane.controlplane.reconcile.dataplane import DataPlane
from graylane.deploy.demo.chain import Chain, ChainAnswer
from graylane.deploy.local.stack import keep_serving, local_control_plane
from graylane.v1 import release_pb2 as pb
from graylane.xds import view as xv

REQUESTS_PER_STEP = 600
TESTER_EVERY = 6  # one request in six is a tester's: 100 of 600
STEP_SECONDS = 20.0
# Above Envoy's default initial_fetch_timeout (15 s). The promote adds base clusters (b|v2,
# c|v2) over EDS resources the proxies already hold for the lane's clusters; while the ADS
# server does not re-send an unchanged EDS resource after a CDS push, those clusters warm
# only when that timeout fires, and the promote reaches the proxies that late.
PROMOTE_SECONDS = 25.0
TESTER = "tester"
PHASES = {v: k for k, v in pb.Phase.items()}
LIVE = (pb.PROGRESSING, pb.PAUSED)


# Requests in flight at once, sized to the machine: on 2 busy cores, 16 at once made
# Envoys and upstreams answer later than the request timeout.
CONCURRENCY = max(2, min(16, 4 * (os.cpu_count() or 1)))


def slow_machine_note(slow: int, step_seconds: float) -> str:
    """Why some requests got no verdict: said as what it is, with the machine's load."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{slow} requests got no answer in time or were not sent within a step's {step_seconds:.0f} s: "
        f"this machine is slow right now (load average {load:.1f} on {cores} cores), which says nothing "
        "about routing; every answer that came back is judged above (run with --requests 200 on a busy machine)"
    )


@dataclass
class Step:
    """The traffic of one step and the verdict on each answer."""

    name: str
    phase: str
    weight: int
    converged: str
    sent: int = 0
    plain: Counter[str] = field(default_factory=Counter)  # path -> plain requests
    testers: int = 0
    testers_in_lane: int = 0
    failed: int = 0  # answered, but not 200 (or the connection failed)
    timed_out: int = 0  # no answer in time: the machine is slow, no routing verdict
    unsent: int = 0  # not started before the step's deadline
    wrong: int = 0  # answered, but off the path it should have taken
    examples: list[str] = field(default_factory=list)


def _example_release() -> pb.Release:
    text = (importlib.resources.files("graylane.deploy") / "examples" / "full-link.yaml").read_text()
    for obj in load_manifest(text, source="deploy/examples/full-link.yaml"):
        if isinstance(obj, pb.Release):
            return obj
    raise RuntimeError("deploy/examples/full-link.yaml holds no release")


def _lane_path(chain: Chain, release: pb.Release) -> str:
    gray = {sv.service: sv.gray_version for sv in release.spec.services}
    return ">".join(f"{s}:{gray.get(s, 'v1')}" for s in chain.services)


def _tagged_at_entry(answer: ChainAnswer, entry: str, lane: str) -> bool:
    """Whether the request reached the entry tagged with the lane (x-graylane or baggage)."""
    for hop in answer.hops:
        if hop.service == entry:
            return hop.lane == lane or hop.baggage_members().get("graylane") == lane
    return False


async def _until_reached(client: ReleaseClient, name: str, timeout: float = 15.0) -> pb.Release:
    async with asyncio.timeout(timeout):
        while True:
            r = await client.get_release(name)
            if r.status.reached or r.status.phase not in LIVE:
                return r
            await asyncio.sleep(0.05)


async def _until_view(dataplane: DataPlane, holds: Callable[[xv.RoutingView], bool], timeout: float = 15.0) -> float:
    """Seconds until the data plane renders a view where `holds` and every proxy ACKed it.

    Waiting on the view as well as the ACKs: right after an API call the data plane may
    not have read the change from etcd yet, and its proxies are then current on the old
    view.
    """
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not ((v := dataplane.view) is not None and holds(v) and dataplane.proxies_current()):
            await asyncio.sleep(0.02)
    return time.monotonic() - start


def _print_header(stable: str, lane: str) -> None:
    print(f"paths: stable = {stable}   lane = {lane}\n")
    print(
        f"{'step':<20} {'phase':<12} {'weight':>6} {'proxies':>7}   "
        f"{'plain: stable':>13} {'lane':>7} {'other':>6}   {'testers in lane':>15} {'failed':>6} {'wrong':>5}"
        f" {'slow':>5}"
    )


def _print_row(step: Step, stable: str, lane: str) -> None:
    total = sum(step.plain.values()) or 1
    other = total - step.plain[stable] - step.plain[lane] if step.plain else 0
    print(
        f"{step.name:<20} {step.phase:<12} {step.weight:>5}% {step.converged:>7}   "
        f"{step.plain[stable] / total:>13.1%} {step.plain[lane] / total:>7.1%} {other / total:>6.1%}   "
        f"{f'{step.testers_in_lane}/{step.testers}':>15} {step.failed:>6} {step.wrong:>5}"
        f" {step.timed_out + step.unsent:>5}",
        flush=True,
    )


async def run_demo(*, requests_per_step: int = REQUESTS_PER_STEP, keep_running: bool = False) -> int:
    release = _example_release()
    name, spec = release.name, release.spec
    versions = {sv.service: ("v1", sv.gray_version) for sv in spec.services}
    async with contextlib.AsyncExitStack() as stack:
        local = await stack.enter_async_context(local_control_plane(prefix="graylane-demo-"))
        plane = local.plane
        print(f"etcd {local.etcd.endpoint} | API {local.api_target} | xDS 127.0.0.1:{plane.xds_port}")
        print(f"dashboard {local.dashboard_url}")
        client = await stack.enter_async_context(ReleaseClient.connect(local.api_target, actor="demo"))
        chain = await stack.enter_async_context(Chain(xds_port=plane.xds_port, client=client, versions=versions))
        print(
            f"chain {' -> '.join(chain.services)}: "
            + ", ".join(f"{s} {'+'.join(chain.versions[s])}" for s in chain.services)
            + f"; {len(chain.envoys)} Envoys (edge on 127.0.0.1:{chain.edge_port})\n"
        )
        stable_path, lane_path = chain.stable_path(), _lane_path(chain, release)
        promoted = False
        steps: list[Step] = []
        sample = ChainAnswer(0)

        def headers_for(i: int) -> Mapping[str, str]:
            return {"x-user": TESTER if i % TESTER_EVERY == 0 else f"user-{i}"}

        async def measure(label: str, r: pb.Release) -> Step:
            conv = r.status.convergence
            step = Step(label, PHASES[r.status.phase], r.status.weight, f"{conv.converged}/{conv.proxies}")
            answers = await chain.run(
                requests_per_step, headers_for=headers_for, timeout=STEP_SECONDS, concurrency=CONCURRENCY
            )
            live = r.status.phase in LIVE
            step.sent = len(answers)
            step.unsent = requests_per_step - len(answers)
            for i, answer in enumerate(answers):
                tester = i % TESTER_EVERY == 0
                if answer.timed_out:
                    step.timed_out += 1
                    continue
                if not answer.ok:
                    step.failed += 1
                    if len(step.examples) < 3:
                        step.examples.append(f"{answer.status} {answer.path} {answer.error}")
                    continue
                in_lane = live and _tagged_at_entry(answer, spec.entry, spec.lane)
                expected = lane_path if in_lane else (lane_path if promoted else stable_path)
                if tester:
                    step.testers += 1
                    step.testers_in_lane += answer.path == lane_path
                    if live and not in_lane:
                        expected = lane_path  # a tester must be in the lane whenever it is live
                else:
                    step.plain[answer.path] += 1
                if answer.path != expected:
                    step.wrong += 1
                    if len(step.examples) < 3:
                        step.examples.append(f"expected {expected}, took {answer.path}")
            steps.append(step)
            _print_row(step, stable_path, lane_path)
            for example in step.examples:
                print(f"    ! {example}")
            return step

        _print_header(stable_path, lane_path)
        r = await client.apply_release(release, reason="demo: full-link lane through b and c")
        await measure("applied (pending)", r)
        for i in range(len(spec.batches)):
            await client.act(Action.NEXT, name, reason="demo: next batch")
            r = await _until_reached(client, name)
            await measure(f"batch {i + 1}", r)
            if i == 0:
                sample = await chain.request({"x-user": TESTER, "baggage": "tenant=acme"})

        r = await client.act(Action.ROLLBACK, name, reason="demo: take it back")
        took = await _until_view(plane.dataplane, lambda v: not v.lanes)
        back = await measure("rollback", r)
        on_v1 = back.failed == back.wrong == 0 and back.plain.keys() == {stable_path} and back.testers_in_lane == 0
        answered = " answered" if back.timed_out + back.unsent else ""
        print(
            f"    rollback reached every proxy in {took:.2f}s: "
            f"{f'all{answered} traffic, testers too, is back on v1' if on_v1 else 'NOT all traffic is on v1'}"
        )

        await client.act(Action.RESTART, name, reason="demo: try again")
        r = await _until_reached(client, name)
        await measure("restart (batch 1)", r)

        r = await client.act(Action.PROMOTE, name, reason="demo: ship it")
        gray = {sv.service: sv.gray_version for sv in spec.services}
        took = await _until_view(
            plane.dataplane,
            lambda v: not v.lanes and all(s.base_version == gray.get(s.name, s.base_version) for s in v.services),
            timeout=PROMOTE_SECONDS,
        )
        promoted = True
        await measure("promote", r)
        print(f"    promote reached every proxy in {took:.2f}s: b and c serve v2 to everyone")

        print(f"\na tester's request at batch 1 ({sample.status}), as each hop saw it:")
        for hop in sample.hops:
            print(f"  {hop.name:<6} lane={hop.lane or '-':<8} baggage={hop.baggage or '-':<32} trace={hop.trace_id}")

        history = await client.history(name)
        print(f"\nhistory of {name}: {len(history.events)} events")
        for e in history.events:
            print(
                f"  #{e.sequence:<3} {e.action:<9} by {e.actor:<20} {PHASES[e.from_phase]}->{PHASES[e.to_phase]} "
                f"batch {e.to_batch + 1} weight {e.weight}%  {e.reason}"
            )
        failed = sum(s.failed for s in steps)
        wrong = sum(s.wrong for s in steps)
        sent = sum(s.sent for s in steps)
        slow = sum(s.timed_out + s.unsent for s in steps)
        print(
            f"\n{sent} requests through the chain ({len(steps)} steps x {requests_per_step}): "
            f"{failed} failed, {wrong} off their path"
        )
        if slow:
            print(slow_machine_note(slow, STEP_SECONDS))
        # Timeouts say nothing about routing; a demo that could judge too little says so.
        judged = len(steps) * requests_per_step - slow
        if keep_running:
            await keep_serving(local)
        return 0 if failed == 0 and wrong == 0 and judged >= slow else 1
