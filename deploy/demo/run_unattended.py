"""`graylane demo --unattended`: two releases nobody touches, judged on live metrics.

Starts an embedded etcd, one control-plane replica (it elects itself leader and scrapes
its Envoy every second), a real Envoy and three versions of `checkout`. Traffic runs in
the background the whole time. Then:

1. `checkout-v2` is applied with an analysis (error rate and a comparison with base) and
   walks 10 -> 30 -> 60 -> 100 % on its own: every decision is printed with its numbers.
2. `checkout-v3` is applied the same way; once it reaches 30 %, v3 starts answering 10 %
   of its requests with 500. The analysis fails it and the leader rolls it back by itself;
   the evidence (rates, p-value, thresholds) is printed from the release's history.

Exit status 0 when the first release succeeded, the second was rolled back, and the base
versions never failed a request.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.stack import keep_serving, local_control_plane
from graylane.deploy.local.traffic import LoadResult, run_load
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import release_pb2 as pb

SERVICE = "checkout"
PHASES = {v: k for k, v in pb.Phase.items()}
ENDED = {pb.SUCCEEDED, pb.ROLLED_BACK, pb.FAILED, pb.PAUSED}


def _release(name: str, base: str, gray: str) -> pb.Release:
    spec = pb.ReleaseSpec(
        lane=name,
        entry=SERVICE,
        services=[pb.ServiceVersions(service=SERVICE, base_version=base, gray_version=gray)],
        batches=[pb.Batch(weight=w) for w in (10, 30, 60, 100)],
    )
    a = spec.analysis
    a.interval.FromTimedelta(timedelta(seconds=2))
    a.min_requests = 30
    a.max_error_rate = 0.02
    a.baseline = True
    a.failure_limit = 2
    return pb.Release(name=name, spec=spec)


def _evidence(details: dict[str, str]) -> str:
    def get(key: str) -> str:
        return details.get(f"{SERVICE}.{key}", "n/a")

    def share(key: str) -> str:  # a rate as a percentage ("0.0795" -> "8.0 %")
        try:
            return f"{float(get(key)) * 100:.1f} %"
        except ValueError:
            return get(key)

    def number(key: str, digits: int) -> str:
        try:
            return f"{float(get(key)):.{digits}g}"
        except ValueError:
            return get(key)

    return (
        f"gray {get('gray.requests')} req, {share('gray.error_rate')} errors, p50 {number('gray.p50_ms', 3)} ms | "
        f"base {get('base.requests')} req, {share('base.error_rate')} errors | "
        f"p(errors) {number('errors.p_value', 2)}, max error rate {share('spec.max_error_rate')}"
    )


async def _follow(
    store: EtcdStore, name: str, *, on_batch: dict[int, asyncio.Event] | None = None
) -> int:  # a pb.Phase value
    """Print every event of `name` as it is written, until the release ends."""
    printed = 0
    while True:
        events = await store.history(name)
        for e in events[printed:]:
            line = f"  #{e.sequence:<3} {e.action:<9} by {e.actor:<18} batch {e.to_batch + 1} ({e.weight}%)"
            if e.details.get("verdict"):
                line += f"  verdict {e.details['verdict']:<12} {_evidence(dict(e.details))}"
            elif e.reason:
                line += f"  {e.reason}"
            print(line, flush=True)
            if on_batch and e.action == "reached" and e.to_batch in on_batch:
                on_batch[e.to_batch].set()
        printed = len(events)
        release = await store.get_release(name)
        if release.status.phase.value in ENDED:
            return release.status.phase.value
        await asyncio.sleep(0.2)


async def run_unattended_demo(*, keep_running: bool = False) -> int:
    async with contextlib.AsyncExitStack() as stack:
        local = await stack.enter_async_context(local_control_plane(prefix="graylane-unattended-"))
        plane = local.plane
        client = await stack.enter_async_context(ReleaseClient.connect(local.api_target, actor="demo"))
        ups = {v: await stack.enter_async_context(Upstream(SERVICE, v)) for v in ("v1", "v2", "v3")}
        await client.put_service(pb.Service(name=SERVICE, stable_version="v1"))
        for version, up in ups.items():
            await client.put_version(
                pb.Version(service=SERVICE, name=version, endpoints=[pb.Endpoint(address="127.0.0.1", port=up.port)])
            )
        envoy = await stack.enter_async_context(EnvoyProcess(ads_port=plane.xds_port, node_id="demo-envoy"))
        print(f"etcd {local.etcd.endpoint} | API {local.api_target} | Envoy 127.0.0.1:{envoy.listen_port}")
        print(f"dashboard {local.dashboard_url}")
        async with asyncio.timeout(15):
            await plane.election.leading.wait()
        print(f"leader: {plane.election.identity}; traffic: 300 req/s through Envoy for the whole demo\n")

        stop = asyncio.Event()
        load = asyncio.create_task(
            run_load(
                envoy.listen_port, authority=SERVICE, count=60_000, max_seconds=150, rate=300, concurrency=16, stop=stop
            )
        )
        try:
            print("1. checkout-v2: v1 -> v2, healthy; analysis every 2 s, max error rate 2 %, compared with base")
            await client.apply_release(_release("checkout-v2", "v1", "v2"))
            first = await asyncio.wait_for(_follow(local.store, "checkout-v2"), 90)
            print(f"   -> {PHASES[first]}\n")

            print("2. checkout-v3: v2 -> v3; v3 starts failing 10 % of its requests once at 30 %")
            at_30 = {1: asyncio.Event()}
            await client.apply_release(_release("checkout-v3", "v2", "v3"))

            async def break_v3() -> None:
                await at_30[1].wait()
                ups["v3"].error_rate = 0.10
                print("   !! v3 now answers 10 % of its requests with 500", flush=True)

            breaker = asyncio.create_task(break_v3())
            second = await asyncio.wait_for(_follow(local.store, "checkout-v3", on_batch=at_30), 90)
            breaker.cancel()
            print(f"   -> {PHASES[second]}\n")
            await asyncio.sleep(1.0)  # a last second of traffic, all on base
        finally:
            stop.set()
            result: LoadResult = await load
        print(
            f"traffic: {result.sent} requests, {result.ok} answered 200; failed by version: "
            f"{dict(result.failed_versions) or 'none'}; connection errors: {dict(result.errors) or 'none'}"
        )
        ok = (
            first == pb.SUCCEEDED
            and second == pb.ROLLED_BACK
            and not result.errors
            and result.failed_versions["v1"] == 0
            and result.failed_versions["v2"] == 0
        )
        print(
            "demo " + ("passed" if ok else "FAILED") + ": v2 promoted on its own, v3 rolled back on its own, "
            "base never failed"
        )
        if keep_running:
            await keep_serving(local)
        return 0 if ok else 1
