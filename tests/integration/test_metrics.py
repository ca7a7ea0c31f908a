"""Issue 6, the metrics pipeline end to end: a real Envoy's admin stats -> the control plane's
windows -> GetMetrics / WatchMetrics / `graylane metrics`; and an agent's reports in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from graylane.agent.metrics import MetricsReporter
from graylane.controlplane.cli import base, commands, output
from graylane.controlplane.progression.metrics import MetricsCollector, report_from_samples
from graylane.controlplane.progression.windows import Histogram, Sample, SeriesKey, Windows
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import run_load
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import agent_pb2_grpc
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc

from tests.integration.conftest import api_stub, binomial_bound, control_plane, eventually, register

pytestmark = [pytest.mark.etcd, pytest.mark.envoy]

SERVICE = "checkout"
LANE = "checkout-v2"
REQUESTS = 1200
V2_ERROR_RATE = 0.10
V2_DELAY_S = 0.03


def release_spec() -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane=LANE,
        entry=SERVICE,
        services=[pb.ServiceVersions(service=SERVICE, base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in (50, 100)],
    )


def by_version(response: api.MetricsResponse) -> dict[str, api.SeriesWindow]:
    return {s.version: s for s in response.series}


async def test_windows_show_each_versions_errors_latency_and_share(store: EtcdStore, envoy: Any) -> None:
    async with contextlib.AsyncExitStack() as es:
        v1 = await es.enter_async_context(Upstream(SERVICE, "v1"))
        v2 = await es.enter_async_context(Upstream(SERVICE, "v2"))
        v2.error_rate, v2.delay = V2_ERROR_RATE, V2_DELAY_S
        plane = await es.enter_async_context(control_plane(store))
        stub = await api_stub(es, plane)
        await register(stub, SERVICE, v1, v2)
        proxy = await envoy(ads_port=plane.xds_port, node_id="envoy-metrics")
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=release_spec()))
        await stub.NextBatch(api.ActionRequest(name="rel", actor="test"))

        async def reached() -> bool:
            return bool((await stub.GetRelease(api.GetReleaseRequest(name="rel"))).status.reached)

        await eventually(reached, timeout=15, what="the 50 % batch to be reached")

        # The agent's reporter over the same proxies, into windows of its own, as an agent
        # would feed a control plane (filed under cluster "east").
        agent_windows = Windows(capacity=120, max_keys=16)
        agent_side = MetricsCollector([], agent_windows)
        reporter = MetricsReporter(plane.tracker, send=lambda r: agent_side.ingest_agent_report("east", r))
        reporter_task = asyncio.create_task(reporter.run())
        es.callback(reporter_task.cancel)

        # Both pipelines have read the Envoy once (their baselines) before any request.
        ticks = plane.metrics.ticks

        async def read_once() -> bool:
            return plane.metrics.ticks >= ticks + 2 and reporter.ticks >= 1

        await eventually(read_once, timeout=5, what="both pipelines to read the Envoy")
        load = await run_load(
            proxy.listen_port, authority=SERVICE, count=REQUESTS, rate=300, concurrency=8, max_seconds=20
        )
        assert load.sent == REQUESTS and not load.errors, load.errors
        sent_to = {v: load.versions[v] + load.failed_versions[v] for v in ("v1", "v2")}
        assert sum(sent_to.values()) == REQUESTS

        async def all_counted() -> bool:
            metrics = await stub.GetMetrics(api.GetMetricsRequest(name="rel"))
            seen = by_version(metrics)
            return (
                {v: s.requests for v, s in seen.items()} == sent_to
                and all(sum(s.bucket_counts) == s.requests for s in seen.values())  # histograms flushed
            )

        await eventually(all_counted, timeout=10, what="every request to show in the window")
        response = await stub.GetMetrics(api.GetMetricsRequest(name="rel"))
        assert response.leader in (True, False)
        assert (response.until.ToNanoseconds() - response.since.ToNanoseconds()) / 1e9 == pytest.approx(60.0)
        seen = by_version(response)
        base, gray = seen["v1"], seen["v2"]
        assert (base.service, base.lane, base.cluster) == (SERVICE, "", "")
        assert (gray.service, gray.lane, gray.cluster) == (SERVICE, LANE, "")

        # Errors: exactly the 500s the client saw; v2's rate near what it was told to fail.
        assert base.errors == 0 and base.error_rate == 0.0
        assert gray.errors == load.failed_versions["v2"] == load.statuses[500]
        assert abs(gray.error_rate - V2_ERROR_RATE) <= binomial_bound(gray.requests, V2_ERROR_RATE)
        # Shares: ~50 % each, and they add up.
        assert base.traffic_share + gray.traffic_share == pytest.approx(1.0)
        assert abs(gray.traffic_share - 0.5) <= binomial_bound(REQUESTS, 0.5)
        # Latency: v2 answers 30 ms later, so its median sits in a higher bucket.
        assert base.HasField("p50_ms") and gray.HasField("p50_ms")
        assert gray.p50_ms > base.p50_ms and gray.p50_ms >= 25.0, (base.p50_ms, gray.p50_ms)
        assert base.p50_ms <= base.p90_ms <= base.p99_ms
        assert len(gray.bucket_counts) == len(gray.bucket_bounds_ms) + 1
        assert base.throughput_rps > 0 and gray.throughput_rps > 0
        table = output.render_metrics(response)
        print(table)  # shown with -s
        assert table.splitlines()[0].split() == list(output.METRICS_HEADER)

        # The agent's reporter counted the same requests.
        def agent_total(version: str) -> int:
            keys = [k for k in agent_windows.keys() if k.version == version]
            assert all(k.cluster == "east" for k in keys)
            return agent_windows.window_many(keys, 0.0, math.inf).requests

        async def agent_counted() -> bool:
            return {v: agent_total(v) for v in ("v1", "v2")} == sent_to

        await eventually(agent_counted, timeout=5, what="the agent's reports to count every request")

        # WatchMetrics streams the same view, again and again.
        request = api.GetMetricsRequest(name="rel")
        request.every.FromMilliseconds(200)
        updates: list[api.MetricsResponse] = []
        call = stub.WatchMetrics(request)
        try:
            async with asyncio.timeout(5):
                async for update in call:
                    updates.append(update)
                    if len(updates) == 2:
                        break
        finally:
            call.cancel()
        assert len(updates) == 2
        assert updates[1].until.ToNanoseconds() > updates[0].until.ToNanoseconds()
        assert {s.version for s in updates[1].series} == {"v1", "v2"}

        # And `graylane metrics` prints it.
        out = await asyncio.to_thread(_cli_json, plane.api_port)
        assert {s["version"]: int(s["requests"]) for s in out["series"]} == sent_to


def _cli_json(port: int) -> Any:
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = commands.main(["--server", f"127.0.0.1:{port}", "metrics", "rel", "--window", "60s", "-o", "json"])
    assert code == base.EXIT_OK
    return json.loads(buffer.getvalue())


async def test_unknown_release_and_bad_window_are_refused(store: EtcdStore) -> None:
    async with control_plane(store) as plane, grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
        stub = api_grpc.ReleaseServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetMetrics(api.GetMetricsRequest(name="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        call = stub.WatchMetrics(api.GetMetricsRequest(name="nope"))
        with pytest.raises(grpc.aio.AioRpcError) as watched:
            await call.read()
        assert watched.value.code() == grpc.StatusCode.NOT_FOUND
        await stub.PutService(api.PutServiceRequest(service=pb.Service(name=SERVICE, stable_version="v1")))
        for version in ("v1", "v2"):
            await stub.PutVersion(api.PutVersionRequest(version=pb.Version(service=SERVICE, name=version)))
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=release_spec()))
        request = api.GetMetricsRequest(name="rel")
        request.window.FromSeconds(-5)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.GetMetrics(request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        empty = await stub.GetMetrics(api.GetMetricsRequest(name="rel"))
        assert list(empty.series) == []


async def test_an_agents_metrics_reach_the_windows_under_its_cluster(store: EtcdStore) -> None:
    async with control_plane(store) as plane, grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        outbox: asyncio.Queue[apb.AgentMessage] = asyncio.Queue()
        hello = apb.AgentHello(cluster="east", gateway_address="127.0.0.1:9000", agent_id="agent-east")
        outbox.put_nowait(apb.AgentMessage(hello=hello))
        latency = Histogram((1.0, 5.0), (3, 5, 2))
        sample = Sample(at=1.0, interval_s=1.0, requests=10, errors=2, latency=latency)
        report = report_from_samples({SeriesKey(SERVICE, "v2", LANE, ""): sample}, at=1.0, interval_s=1.0)
        outbox.put_nowait(apb.AgentMessage(metrics=report))

        async def requests() -> AsyncIterator[apb.AgentMessage]:
            while True:
                yield await outbox.get()

        call = stub.Connect(requests())
        try:
            first = await call.read()
            assert first.WhichOneof("kind") == "welcome"
            key = SeriesKey(SERVICE, "v2", LANE, "east")

            async def filed() -> bool:
                return key in plane.windows

            await eventually(filed, timeout=5, what="the agent's series")
            window = plane.windows.window(key, 0.0, math.inf)
            assert (window.requests, window.errors, window.latency) == (10, 2, latency)
        finally:
            call.cancel()
