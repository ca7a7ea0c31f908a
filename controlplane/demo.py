"""`graylane demo`: the whole product on one machine, with real parts, bounded in time.

Starts an embedded etcd (data in a temporary folder), one control-plane replica (API and
xDS on free loopback ports), two versions of the `checkout` service (real HTTP servers),
and a real Envoy that takes its configuration from the control plane over ADS. Then it
applies the example release from deploy/examples/release.yaml (endpoints pointed at the
live servers), steps it through every batch under bounded traffic and prints, per step,
the weight asked for, the proxies that ACKed it and the share each version really served.
It ends with a header-rule preview, a rollback, a restart and a promote.

Exit status 0 when every request of the demo was answered 200, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
from dataclasses import dataclass

from graylane.controlplane.client import Action, ReleaseClient
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.local.stack import local_control_plane
from graylane.controlplane.local.traffic import LoadResult, run_load
from graylane.controlplane.local.upstream import Upstream
from graylane.controlplane.manifest import load_manifest
from graylane.v1 import release_pb2 as pb

REQUESTS_PER_STEP = 1000
STEP_SECONDS = 20.0
PHASES = {v: k for k, v in pb.Phase.items()}


@dataclass
class Row:
    step: str
    phase: str
    weight: int
    converged: str
    result: LoadResult
    headers: str = ""


def _example_release() -> pb.Release:
    text = (importlib.resources.files("graylane.deploy") / "examples" / "release.yaml").read_text()
    for obj in load_manifest(text, source="deploy/examples/release.yaml"):
        if isinstance(obj, pb.Release):
            return obj
    raise RuntimeError("deploy/examples/release.yaml holds no release")


async def _until_reached(client: ReleaseClient, name: str, timeout: float = 15.0) -> pb.Release:
    async with asyncio.timeout(timeout):
        while True:
            r = await client.get_release(name)
            if r.status.reached or r.status.phase not in (pb.PROGRESSING, pb.PAUSED):
                return r
            await asyncio.sleep(0.05)


def _print_header() -> None:
    print(f"{'step':<24} {'phase':<12} {'weight':>6} {'proxies':>8} {'v1':>7} {'v2':>7} {'sent':>6} {'failed':>6}  rps")


def _print_row(row: Row) -> None:
    r = row.result
    print(
        f"{row.step:<24} {row.phase:<12} {row.weight:>5}% {row.converged:>8} "
        f"{r.share('v1'):>7.1%} {r.share('v2'):>7.1%} {r.sent:>6} {r.failed:>6}  {r.rate:,.0f}",
        flush=True,
    )


async def run_demo(*, requests_per_step: int = REQUESTS_PER_STEP) -> int:
    release = _example_release()
    name = release.name
    service = release.spec.entry
    async with contextlib.AsyncExitStack() as stack:
        local = await stack.enter_async_context(local_control_plane(prefix="graylane-demo-"))
        etcd, plane = local.etcd, local.plane
        print(f"etcd {etcd.endpoint} | API 127.0.0.1:{plane.api_port} | xDS 127.0.0.1:{plane.xds_port}")

        upstreams = {v: await stack.enter_async_context(Upstream(service, v)) for v in ("v1", "v2")}
        client = await stack.enter_async_context(ReleaseClient.connect(f"127.0.0.1:{plane.api_port}", actor="demo"))
        await client.put_service(pb.Service(name=service, stable_version="v1"))
        for v, up in upstreams.items():
            await client.put_version(
                pb.Version(service=service, name=v, endpoints=[pb.Endpoint(address="127.0.0.1", port=up.port)])
            )
        envoy = await stack.enter_async_context(EnvoyProcess(ads_port=plane.xds_port, node_id="demo-envoy"))
        print(
            f"envoy listening on 127.0.0.1:{envoy.listen_port} (admin {envoy.admin_port}), "
            f"{service} v1 on {upstreams['v1'].port}, v2 on {upstreams['v2'].port}\n"
        )

        rows: list[Row] = []

        async def measure(step: str, r: pb.Release, headers: dict[str, str] | None = None) -> None:
            result = await run_load(
                envoy.listen_port,
                authority=service,
                count=requests_per_step,
                max_seconds=STEP_SECONDS,
                concurrency=8,
                headers=headers or {},
            )
            conv = r.status.convergence
            row = Row(step, PHASES[r.status.phase], r.status.weight, f"{conv.converged}/{conv.proxies}", result)
            rows.append(row)
            _print_row(row)

        _print_header()
        r = await client.apply_release(release)
        await measure("applied (pending)", r)
        for i in range(len(release.spec.batches)):
            r = await client.act(Action.NEXT, name, reason="demo: next batch")
            r = await _until_reached(client, name)
            await measure(f"batch {i + 1}", r)
            if i == 0:
                await measure("  rule x-canary: always", r, {"x-canary": "always"})
        r = await client.act(Action.ROLLBACK, name, reason="demo: take it back")
        await plane.dataplane.wait_current()
        await measure("rollback", r)
        r = await client.act(Action.RESTART, name, reason="demo: try again")
        r = await _until_reached(client, name)
        await measure("restart (batch 1)", r)
        r = await client.act(Action.PROMOTE, name, reason="demo: ship it")
        await plane.dataplane.wait_current()  # the promote moved stable to v2: wait for the proxy's ACK
        await measure("promote", r)

        history = await client.history(name)
        print(f"\nhistory of {name}: {len(history.events)} events")
        for e in history.events:
            print(
                f"  #{e.sequence:<3} {e.action:<9} by {e.actor:<20} {PHASES[e.from_phase]}->{PHASES[e.to_phase]} "
                f"batch {e.to_batch + 1} weight {e.weight}%  {e.reason}"
            )
        failed = sum(row.result.failed for row in rows)
        sent = sum(row.result.sent for row in rows)
        print(f"\n{sent} requests through Envoy, {failed} failed")
        return 0 if failed == 0 else 1
