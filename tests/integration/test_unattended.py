"""Issue 6 acceptance: unattended progression judged on live metrics from a real Envoy.

A real etcd, a real control plane (the leader scrapes the Envoy's admin statistics every
second), a real Envoy and two upstreams that can be told to fail or slow down. Traffic
runs in the background for the whole release; the release is applied with an analysis
and nobody touches it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from graylane.controlplane.local.envoy import free_port
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import LoadResult, run_load
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api

from tests.integration.conftest import CheckoutStack, checkout_stack

SERVICE = "checkout"
FAST = {"leader_ttl_seconds": 2, "analysis_tick_seconds": 0.1}


class Stack(CheckoutStack):
    async def phase_reaches(self, phases: set[int], *, timeout: float) -> pb.Release:
        async with asyncio.timeout(timeout):
            while True:
                r = await self.stub.GetRelease(api.GetReleaseRequest(name="rel"))
                if r.status.phase in phases:
                    return r
                await asyncio.sleep(0.1)

    async def history(self) -> list[pb.Event]:
        return list((await self.stub.History(api.HistoryRequest(name="rel"))).events)


@contextlib.asynccontextmanager
async def stack(store: EtcdStore, envoy: Any) -> AsyncIterator[Stack]:
    async with contextlib.AsyncExitStack() as es:
        yield await checkout_stack(es, store, envoy, Stack, node_id="envoy-unattended", **FAST)


def analysed_spec(weights: tuple[int, ...], **analysis: Any) -> pb.ReleaseSpec:
    spec = pb.ReleaseSpec(
        lane="checkout-v2",
        entry=SERVICE,
        services=[pb.ServiceVersions(service=SERVICE, base_version="v1", gray_version="v2")],
        batches=[pb.Batch(weight=w) for w in weights],
    )
    spec.analysis.interval.FromTimedelta(timedelta(seconds=analysis.pop("interval", 1.0)))
    for key, value in analysis.items():
        setattr(spec.analysis, key, value)
    return spec


@contextlib.asynccontextmanager
async def background_load(port: int, *, rate: float = 300) -> AsyncIterator[Callable[[], LoadResult]]:
    """Steady traffic for the whole block (bounded: at most 90 s and 30,000 requests)."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_load(port, authority=SERVICE, count=30_000, max_seconds=90, rate=rate, concurrency=16, stop=stop)
    )
    result: LoadResult | None = None

    def outcome() -> LoadResult:
        assert result is not None
        return result

    try:
        yield outcome
    finally:
        stop.set()
        result = await task


def transitions(events: Sequence[Any]) -> list[tuple[str, int]]:
    return [(e.action, e.to_batch) for e in events if e.action in ("next", "rollback", "pause", "promote")]


async def test_a_healthy_gray_walks_every_batch_unattended(store: EtcdStore, envoy: Any) -> None:
    async with stack(store, envoy) as s, background_load(s.envoy.listen_port) as load:
        spec = analysed_spec((20, 50, 100), min_requests=20, max_error_rate=0.05, baseline=True)
        await s.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
        r = await s.phase_reaches({pb.SUCCEEDED, pb.ROLLED_BACK, pb.PAUSED, pb.FAILED}, timeout=60)
        assert r.status.phase == pb.SUCCEEDED, r.status.reason
    assert load().failed == 0, (load().statuses, load().errors)
    events = await store.history("rel")
    assert transitions(events) == [("next", 0), ("next", 1), ("next", 2), ("next", 2)]  # the last: success
    moves = [e for e in events if e.action == "next" and e.from_batch >= 0]
    assert len(moves) == 3
    for e in moves:  # each automatic move carries the numbers behind it
        assert e.actor == "graylane/analysis"
        assert int(e.details[f"{SERVICE}.gray.requests"]) >= 20
        assert e.details["verdict"] == "pass" and e.details["decision"] == "advance"
        assert e.details[f"{SERVICE}.spec.max_error_rate"] == "0.05"
    for e in moves[:2]:  # below 100 %, gray was also compared with base
        assert f"{SERVICE}.errors.p_value" in e.details and int(e.details[f"{SERVICE}.base.requests"]) >= 20


async def test_gray_failing_from_batch_two_is_rolled_back_without_harming_base(store: EtcdStore, envoy: Any) -> None:
    async with stack(store, envoy) as s, background_load(s.envoy.listen_port) as load:
        spec = analysed_spec(
            (20, 50, 100), interval=3, min_requests=30, max_error_rate=0.02, baseline=True, failure_limit=2
        )
        await s.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
        async with asyncio.timeout(30):  # batch 2 (index 1) reached: gray starts failing
            while not ((r := await s.stub.GetRelease(api.GetReleaseRequest(name="rel"))).status.batch == 1):
                await asyncio.sleep(0.05)
        s.v2.error_rate = 0.05
        r = await s.phase_reaches({pb.SUCCEEDED, pb.ROLLED_BACK, pb.PAUSED}, timeout=30)
        assert r.status.phase == pb.ROLLED_BACK, r.status.reason
        await asyncio.sleep(1.0)  # a second of traffic after the rollback, all on base
    result = load()
    assert result.errors == {}  # no connection-level failure at all
    assert result.failed_versions["v1"] == 0  # base never failed, before or after the switch
    assert result.failed_versions["v2"] > 0  # the gray really failed
    events = await store.history("rel")
    rollback = next(e for e in events if e.action == "rollback")
    assert rollback.actor == "graylane/analysis" and rollback.from_batch == 1
    analyses = [e for e in events if e.action == "analysis" and e.to_batch == 1]
    assert len(analyses) <= 1  # rolled back within failure_limit (2) checks of the batch
    assert float(rollback.details[f"{SERVICE}.gray.error_rate"]) > 0.02


# Base and the 2 % slower gray sit inside one latency bucket (60, 75] ms of the bootstraps: Envoy
# records whole milliseconds, so delays on a bucket bound (50 ms) would put base below it and gray
# above it, and the medians interpolated inside two buckets would differ by far more than 2 %.
@pytest.mark.parametrize(("gray_delay", "rolled_back"), [(0.195, True), (0.0663, False)], ids=["3x-slower", "2pct"])
async def test_latency_compared_with_base_by_significance_and_effect(
    store: EtcdStore, envoy: Any, gray_delay: float, rolled_back: bool
) -> None:
    async with stack(store, envoy) as s:
        s.v1.delay, s.v2.delay = 0.065, gray_delay
        async with background_load(s.envoy.listen_port, rate=250) as load:
            spec = analysed_spec((50, 100), interval=2, min_requests=50, baseline=True, failure_limit=1)
            await s.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
            r = await s.phase_reaches({pb.SUCCEEDED, pb.ROLLED_BACK, pb.PAUSED}, timeout=60)
        assert load().failed == 0
    assert r.status.phase == (pb.ROLLED_BACK if rolled_back else pb.SUCCEEDED), r.status.reason
    events = await store.history("rel")
    # The decision taken at the 50 % batch (the 100 % batch has no base left to compare with).
    decided = next(e for e in events if e.action in ("next", "rollback") and e.from_batch == 0)
    assert decided.actor == "graylane/analysis"
    assert f"{SERVICE}.latency.p_value" in decided.details and f"{SERVICE}.latency.effect" in decided.details


@pytest.mark.parametrize(("on_inconclusive", "phase"), [("pause", pb.PAUSED), ("fail", pb.ROLLED_BACK)])
async def test_no_traffic_is_inconclusive_and_never_promoted(
    store: EtcdStore, envoy: Any, on_inconclusive: str, phase: int
) -> None:
    async with stack(store, envoy) as s:
        spec = analysed_spec(
            (20, 100), min_requests=10, baseline=True, inconclusive_limit=3, on_inconclusive=on_inconclusive
        )
        await s.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
        r = await s.phase_reaches({pb.SUCCEEDED, pb.ROLLED_BACK, pb.PAUSED}, timeout=30)
    assert r.status.phase == phase and r.status.batch == 0
    events = await store.history("rel")
    inconclusive = [e for e in events if e.action == "analysis"]
    assert len(inconclusive) == 2 and all(e.details["verdict"] == "inconclusive" for e in inconclusive)
    assert all(e.details[f"{SERVICE}.gray.requests"] == "0" for e in inconclusive)


BIN = Path(sys.executable).parent


async def test_the_other_replica_takes_over_a_killed_leader_with_one_transition_per_step(
    store: EtcdStore, envoy: Any, etcd_endpoint: str, tmp_path: Path
) -> None:
    api_port, xds_port = free_port(), free_port()
    with (tmp_path / "leader.log").open("wb") as log:
        leader = await asyncio.create_subprocess_exec(
            str(BIN / "graylane"),
            "serve",
            "--etcd",
            etcd_endpoint,
            "--etcd-prefix",
            store.prefix,
            "--listen",
            f"127.0.0.1:{api_port}",
            "--xds-listen",
            f"127.0.0.1:{xds_port}",
            "--http-listen",
            "127.0.0.1:0",
            "--leader-ttl",
            "2",
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        async with asyncio.timeout(20):
            while await store.leader() is None:
                assert leader.returncode is None, (tmp_path / "leader.log").read_text()
                await asyncio.sleep(0.1)
        async with stack(store, envoy) as s, background_load(s.envoy.listen_port) as load:
            assert not s.plane.election.is_leader  # the subprocess leads; this replica serves the Envoy
            spec = analysed_spec((10, 20, 40, 60, 80, 100), interval=1, min_requests=10, max_error_rate=0.05)
            await s.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
            async with asyncio.timeout(40):  # mid-analysis: the leader has moved at least two batches
                while (await s.stub.GetRelease(api.GetReleaseRequest(name="rel"))).status.batch < 2:
                    await asyncio.sleep(0.05)
            os.killpg(leader.pid, signal.SIGKILL)
            await leader.wait()
            async with asyncio.timeout(10):  # within the lease TTL (2 s) plus a few ticks
                await s.plane.election.leading.wait()
            r = await s.phase_reaches({pb.SUCCEEDED, pb.ROLLED_BACK, pb.PAUSED}, timeout=60)
            assert r.status.phase == pb.SUCCEEDED, r.status.reason
        assert load().failed == 0
        events = await store.history("rel")
        assert [seq for seq in (e.sequence for e in events)] == list(range(len(events)))
        assert transitions(events) == [("next", b) for b in range(6)] + [("next", 5)]  # exactly one per step
    finally:
        if leader.returncode is None:
            os.killpg(leader.pid, signal.SIGKILL)
            await leader.wait()


class Hooks:
    """A real HTTP endpoint for the release's webhooks; each path answers what a test sets."""

    def __init__(self) -> None:
        self.answers: dict[str, int] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((request.path, await request.json()))
        return web.Response(status=self.answers.get(request.path, 200))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.asynccontextmanager
async def hook_server() -> AsyncIterator[Hooks]:
    hooks = Hooks()
    app = web.Application()
    app.router.add_post("/{name}", hooks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hooks.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield hooks
    finally:
        await runner.cleanup()


async def test_webhooks_gate_the_release_and_are_recorded(store: EtcdStore, envoy: Any) -> None:
    async with hook_server() as hooks, stack(store, envoy) as s, background_load(s.envoy.listen_port):
        hooks.answers = {"/pre": 503, "/confirm": 403}
        spec = analysed_spec((30, 100), min_requests=20, max_error_rate=0.05, baseline=True)
        for name, kind in (("pre", pb.PRE_ROLLOUT), ("confirm", pb.CONFIRM_BATCH), ("post", pb.POST_ROLLOUT)):
            hook = spec.analysis.webhooks.add(name=name, kind=kind, url=hooks.url(f"/{name}"), retries=0)
            hook.timeout.FromTimedelta(timedelta(seconds=2))
        await s.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))

        async def called(path: str, times: int) -> None:
            async with asyncio.timeout(20):
                while sum(p == path for p, _ in hooks.calls) < times:
                    await asyncio.sleep(0.05)

        await called("/pre", 2)  # refused twice (one attempt each): the release waits, it does not start
        async with asyncio.timeout(10):
            while not [e for e in await store.history("rel") if e.action == "webhook"]:
                await asyncio.sleep(0.05)
        assert (await s.stub.GetRelease(api.GetReleaseRequest(name="rel"))).status.phase == pb.PENDING
        hooks.answers["/pre"] = 200
        await called("/confirm", 2)  # analysis passes, but the gate says no: it stays at batch 0
        r = await s.stub.GetRelease(api.GetReleaseRequest(name="rel"))
        assert r.status.phase == pb.PROGRESSING and r.status.batch == 0
        hooks.answers["/confirm"] = 200
        r = await s.phase_reaches({pb.SUCCEEDED, pb.ROLLED_BACK, pb.PAUSED}, timeout=30)
        assert r.status.phase == pb.SUCCEEDED
        await called("/post", 1)
        events = await store.history("rel")
    assert hooks.calls[0][1]["release"] == "rel" and hooks.calls[0][1]["kind"] == "pre-rollout"
    waits = [e for e in events if e.action == "webhook" and "pre-rollout" in e.reason]
    assert waits and all(e.details["webhook.pre.status"] == "503" for e in waits), [e.action for e in events]
    refused = [e for e in events if e.action == "analysis" and "confirm-batch confirm refused" in e.reason]
    assert refused and refused[0].details["webhook.confirm.status"] == "403"
    async with asyncio.timeout(10):  # the post-rollout call is recorded once
        while not [e for e in await store.history("rel") if e.details.get("kind") == "post-rollout"]:
            await asyncio.sleep(0.05)
