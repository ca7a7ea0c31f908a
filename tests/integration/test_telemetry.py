"""Issue 6, own telemetry, end to end: a real control plane, etcd and Envoy, scraped on
`/metrics` with prometheus_client's text parser; traces sent to a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from graylane.controlplane.api.http import HttpServer
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.local.envoy import free_port
from graylane.controlplane.store import EtcdStore
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.integration.conftest import (
    STRICT_RUNTIME,
    api_stub,
    big_rule,
    first_batch_reached,
    lane_spec,
    poll_release,
    serving_replica,
)

Series = dict[str, list[Sample]]


async def scrape(port: int) -> tuple[str, Series]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
        content_type = response.headers["Content-Type"]
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(sample)
    return content_type, series


def value(series: Series, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    assert name in series, (name, sorted(series))
    return sum(s.value for s in series[name] if all(s.labels.get(k) == v for k, v in labels.items()))


async def scrape_open_metrics(port: int) -> Series:
    """A scrape the way Prometheus asks when it prefers OpenMetrics."""
    headers = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"}
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        text = await response.text()
    series: Series = {}
    for family in openmetrics_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(sample)
    return series


async def scrape_until(port: int, ready: Callable[[Series], bool], timeout: float = 10) -> Series:
    async with asyncio.timeout(timeout):
        while True:
            _, series = await scrape(port)
            if ready(series):
                return series
            await asyncio.sleep(0.05)


async def test_metrics_carry_proxies_pushes_ack_latency_nacks_and_releases(store: EtcdStore, envoy: Any) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, _ = await serving_replica(es, store, "checkout", "search", http_listen="127.0.0.1:0")
        assert plane.http_port > 0
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{plane.http_port}/healthz") as r:
            assert (r.status, await r.text()) == (200, "ok\n")
        # An Envoy with a stricter RE2 limit: it ACKs ordinary routes and NACKs the big regex.
        await envoy(ads_port=plane.xds_port, node_id="strict-envoy", runtime=STRICT_RUNTIME)

        await first_batch_reached(stub, lane_spec("search", "good"), name="good")
        rule = big_rule()
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="bad", spec=lane_spec("checkout", "bad", rules=[rule])))
        await stub.NextBatch(api.ActionRequest(name="bad"))
        await poll_release(stub, "bad", lambda r: r.status.phase == pb.PAUSED)

        # The gauges read the store snapshot the DataPlane holds: poll until it has the pause.
        series = await scrape_until(
            plane.http_port, lambda s: "graylane_releases" in s and value(s, "graylane_releases", phase="PAUSED") == 1
        )
        content_type, _ = await scrape(plane.http_port)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        open_metrics = await scrape_open_metrics(plane.http_port)
        assert value(open_metrics, "graylane_xds_pushes_total", type="Listener") > 0

        assert value(series, "graylane_proxies_connected") == 1
        assert value(series, "graylane_agents_connected") == 0
        for kind in ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration"):
            assert value(series, "graylane_xds_pushes_total", type=kind) > 0, kind
        assert value(series, "graylane_xds_push_ack_seconds_count") > 0
        ack_sum = value(series, "graylane_xds_push_ack_seconds_sum")
        assert 0 < ack_sum < 10 * value(series, "graylane_xds_push_ack_seconds_count")
        assert value(series, "graylane_xds_push_ack_seconds_bucket", le="+Inf") == value(
            series, "graylane_xds_push_ack_seconds_count"
        )
        assert value(series, "graylane_xds_nacks_total", type="RouteConfiguration") >= 1
        assert value(series, "graylane_releases", phase="PROGRESSING") == 1
        assert value(series, "graylane_releases", phase="PAUSED") == 1
        assert value(series, "graylane_releases", phase="FAILED") == 0
        assert value(series, "target_info", service_name="graylane-controlplane") == 1


async def test_graylane_serve_serves_metrics_and_health_on_http_listen(
    store: EtcdStore, etcd_endpoint: str, tmp_path: pathlib.Path
) -> None:
    http = free_port()
    argv = [
        str(pathlib.Path(sys.executable).parent / "graylane"), "serve", "--etcd", etcd_endpoint,
        "--etcd-prefix", store.prefix, "--listen", f"127.0.0.1:{free_port()}",
        "--xds-listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{http}",
    ]  # fmt: skip
    with (tmp_path / "serve.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async with asyncio.timeout(20), aiohttp.ClientSession() as session:
            while True:
                assert proc.returncode is None, (tmp_path / "serve.log").read_text()
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"http://127.0.0.1:{http}/healthz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.05)
        series = await scrape_until(http, lambda s: "graylane_releases" in s)
        assert value(series, "graylane_proxies_connected") == 0
        assert value(series, "graylane_releases") == 0  # every phase present, at 0
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_unary_calls_are_traced_to_an_otlp_receiver(store: EtcdStore) -> None:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    collector = HttpServer(listen="127.0.0.1:0")
    collector.add_route("POST", "/v1/traces", traces, name="traces")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with contextlib.AsyncExitStack() as es:
        await es.enter_async_context(collector)
        plane = await es.enter_async_context(
            ControlPlane(store, api_listen="127.0.0.1:0", otlp_endpoint=f"http://127.0.0.1:{collector.port}").running()
        )
        assert plane.telemetry.tracing
        stub = await api_stub(es, plane)
        traceparent = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
        await stub.PutService(
            api.PutServiceRequest(service=pb.Service(name="checkout", stable_version="v1")), metadata=traceparent
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetRelease(api.GetReleaseRequest(name="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        await plane.telemetry.flush()

    spans = {
        span.name: (span, resource.resource)
        for message in received
        for resource in message.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    }
    put, resource = spans["graylane.v1.ReleaseService/PutService"]
    assert put.trace_id.hex() == trace_id  # a child of the caller's trace
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "graylane-controlplane"
    attributes = {a.key: a.value for a in put.attributes}
    assert attributes["rpc.method"].string_value == "PutService"
    assert attributes["rpc.grpc.status_code"].int_value == 0
    get, _ = spans["graylane.v1.ReleaseService/GetRelease"]
    assert get.trace_id.hex() != trace_id
    code = {a.key: a.value.int_value for a in get.attributes}["rpc.grpc.status_code"]
    assert code == grpc.StatusCode.NOT_FOUND.value[0]
    assert get.status.code == get.status.STATUS_CODE_ERROR


async def test_http_server_routes_are_named_and_fixed_once_started() -> None:
    server = HttpServer(listen="127.0.0.1:0")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    server.add_route("GET", "/hello", hello, name="hello")
    assert server.url_for("hello") == "/hello"
    async with server:
        with pytest.raises(RuntimeError, match="already started"):
            server.add_route("GET", "/late", hello, name="late")
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/hello") as r:
            assert (r.status, await r.text()) == (200, "hi")
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/hello"):
            pass
