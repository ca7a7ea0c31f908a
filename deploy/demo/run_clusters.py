"""`graylane demo --clusters 2`: gray in one cluster, production in another, one release.

Starts its own etcd (data in a temporary folder) and the two-cluster layout of
`graylane.deploy.demo.clusters`: a `graylane serve` subprocess, and per cluster a
`graylane agent` subprocess with a sidecar and a gateway Envoy — east runs checkout v1
(production), west runs checkout v2 (gray). Then it applies a release that places the gray
version in west (batches 10/50/100 %, manual; rule `x-canary: always`), and walks the
batches under bounded traffic from east's sidecar, printing per step the share that west's
v2 served through west's gateway. It shows a rule request going to west, kills the control
plane with SIGKILL and shows both clusters keep serving, restarts it and promotes v2.

Owns the demo's script and its verdict; the layout is the library's. Exit status 0 iff
every request was answered 200.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from graylane.controlplane.api.client import Action
from graylane.controlplane.local.etcd import EtcdProcess
from graylane.deploy.demo.clusters import (
    LANE,
    RULE_HEADER,
    SERVICE,
    Cluster,
    TwoClusters,
    envoy_counter,
    gray_in_west_release,
    poll,
)
from graylane.deploy.local.traffic import LoadResult
from graylane.v1 import release_pb2 as pb

REQUESTS_PER_STEP = 1000
# Long enough to ride out a control-plane restart (about 3 s here) without the agents'
# registrations expiring; the integration tests use 3 s to watch expiry quickly.
LEASE_TTL_SECONDS = 10
_STEP_SECONDS = 20.0


@dataclass
class Row:
    step: str
    weight: str
    proxies: str
    cluster: str
    result: LoadResult
    via_gateway: int  # requests west's gateway passed to west's v2 during the step


def _header() -> None:
    print(
        "v2 (west): share answered by west's v2; via west gw: requests west's gateway passed to it "
        "(east's callers reach west only through it)\n"
    )
    print(
        f"{'step':<30} {'weight':>6} {'proxies':>7} {'from':>5} {'requests':>8} "
        f"{'v2 (west)':>10} {'via west gw':>11} {'v1 (east)':>10} {'failed':>6}"
    )


def _print(row: Row) -> None:
    r = row.result
    print(
        f"{row.step:<30} {row.weight:>6} {row.proxies:>7} {row.cluster:>5} {r.sent:>8} "
        f"{r.share('v2'):>10.1%} {row.via_gateway:>11} {r.share('v1'):>10.1%} {r.failed:>6}",
        flush=True,
    )


async def run_two_cluster_demo(*, requests_per_step: int = REQUESTS_PER_STEP) -> int:
    started = time.monotonic()
    rows: list[Row] = []
    probes: list[LoadResult] = []  # the polls for the promote count in the verdict too
    with tempfile.TemporaryDirectory(prefix="graylane-demo-clusters-") as tmp:
        async with (
            EtcdProcess(data_dir=Path(tmp) / "etcd") as etcd,
            TwoClusters(
                etcd_endpoint=etcd.endpoint,
                workdir=Path(tmp) / "layout",
                lease_ttl_seconds=LEASE_TTL_SECONDS,
                actor="demo",
            ) as layout,
        ):
            east, west = layout.east, layout.west
            if west.gateway is None:
                raise RuntimeError("west has no gateway Envoy")
            gateway = west.gateway

            async def step(label: str, cluster: Cluster, release: pb.Release | None, **load: object) -> Row:
                before = await envoy_counter(gateway, "cluster.checkout|v2.upstream_rq_total")
                result = await layout.load(cluster, count=requests_per_step, max_seconds=_STEP_SECONDS, **load)
                after = await envoy_counter(gateway, "cluster.checkout|v2.upstream_rq_total")
                conv = release.status.convergence if release is not None else None
                row = Row(
                    step=label,
                    weight=f"{release.status.weight}%" if release is not None else "-",
                    proxies=f"{conv.converged}/{conv.proxies}" if conv is not None else "-",
                    cluster=cluster.name,
                    result=result,
                    via_gateway=after - before,
                )
                rows.append(row)
                _print(row)
                return row

            print(
                f"etcd {etcd.endpoint} | control plane {layout.serve.target} (pid {layout.serve.pid})\n"
                f"east: checkout v1 (production), agent pid {east.agent.pid}, gateway {east.gateway_address}\n"
                f"west: checkout v2 (gray),       agent pid {west.agent.pid}, gateway {west.gateway_address}\n"
                f"release {LANE}: gray v2 placed in west; batches 10/50/100 % (manual); "
                f"rule {', '.join(f'{k}: {v}' for k, v in RULE_HEADER.items())}\n"
                f"traffic: {requests_per_step} requests per step to {SERVICE} through a sidecar Envoy\n"
            )
            _header()
            await layout.client.apply_release(gray_in_west_release(), reason="demo: gray in west")
            release = await layout.client.get_release(LANE)
            await step("before the first batch", east, release)
            for batch in range(len(release.spec.batches)):
                await layout.client.act(Action.NEXT, LANE, reason="demo: next batch")
                release = await layout.until_reached(LANE)
                await step(f"batch {batch + 1}", east, release)
                if batch == 0:
                    await step("  rule x-canary: always", east, release, headers=RULE_HEADER)
                    await step("  west's own callers", west, release)

            print(f"\nkill -9 the control plane (pid {layout.serve.pid})")
            marks = layout.log_marks()
            await layout.serve.kill()
            await step("control plane down", east, None)
            await step("control plane down", west, None)
            restart_at = time.monotonic()
            await layout.serve.restart()
            await layout.wait_connected(marks)
            print(
                f"control plane back (pid {layout.serve.pid}), agents reconnected in "
                f"{time.monotonic() - restart_at:.1f}s\n"
            )

            release = await layout.client.act(Action.PROMOTE, LANE, reason="demo: ship it")

            async def promoted() -> bool | None:
                sample = await layout.load(east, count=50, max_seconds=5)
                probes.append(sample)
                return True if sample.versions["v2"] == sample.sent == 50 else None

            await poll(promoted, timeout=20, what="v2 stable everywhere", interval=0.1)
            service = next(s for s in (await layout.client.list_services()).services if s.name == SERVICE)
            await step(f"promoted: stable {service.stable_version}", east, None)
            await step(f"promoted: stable {service.stable_version}", west, None)

    results = [r.result for r in rows] + probes
    sent = sum(r.sent for r in results)
    failed = sum(r.failed for r in results)
    print(
        f"\n{sent} requests ({len(rows)} steps, {len(probes)} probes while the promote spread): "
        f"{failed} not answered 200 ({time.monotonic() - started:.0f}s in all)"
    )
    return 0 if failed == 0 else 1


def main() -> int:
    return asyncio.run(run_two_cluster_demo())
