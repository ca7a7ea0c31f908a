"""Another gRPC server of the process stays live while a change fans out to many ADS streams.

The API and the ADS server share the process's one grpc.aio completion queue and loop: a
fan-out queues every stream's write and ACK there, and without a bound on the streams
pushing at once a call to the other server waits out the whole fan-out (issue 12). Here a
real AdsServer serves 2,000 SotW streams of a client process (10 per connection, each
ACKing every response) and a health server on another port of the same process stands in
for the API; while each of a few cluster changes reaches every stream, health checks are
called one after another. The check: calls keep being answered during the fan-out (each
waits for a share of it, not for all of it).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from graylane.xds.cache import DEFAULT_KEY, SnapshotCache
from graylane.xds.render import render
from graylane.xds.resources import CLUSTER, Resources
from graylane.xds.server import AdsServer
from graylane.xds.tracker import ProxyTracker
from graylane.xds.view import Endpoint, RoutingView, ServiceRoute, VersionEndpoints
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

STREAMS = 2000
PER_CONNECTION = 10
CHANGES = 3
DEADLINE = 60.0

CLIENT = r"""
import asyncio, sys
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
target, streams, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


async def stream(stub, i, first):
    call = stub.StreamAggregatedResources()
    await call.write(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=f"fan-{i}"), type_url=CLUSTER))
    while (response := await call.read()) is not grpc.aio.EOF:
        await call.write(discovery_pb2.DiscoveryRequest(
            type_url=CLUSTER, version_info=response.version_info, response_nonce=response.nonce))
        if not first.done():
            first.set_result(None)


async def main():
    channels = [grpc.aio.insecure_channel(target) for _ in range(-(-streams // per))]
    firsts = [asyncio.get_running_loop().create_future() for _ in range(streams)]
    tasks = [
        asyncio.create_task(stream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channels[i // per]), i, firsts[i]))
        for i in range(streams)
    ]
    await asyncio.gather(*firsts)
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


asyncio.run(main())
"""


def snapshot(services: int) -> Resources:
    names = [f"svc-{i}" for i in range(services)]
    view = RoutingView(
        services=tuple(ServiceRoute(name, "v1") for name in names),
        endpoints=tuple(
            VersionEndpoints(name, "v1", (Endpoint("127.0.0.1", 20000 + i),)) for i, name in enumerate(names)
        ),
    )
    return render(view, listen_port=10000)


def _all_acked(tracker: ProxyTracker, version: str) -> bool:
    streams = tracker.proxies()
    return len(streams) == STREAMS and all(tracker.acked_version(s, CLUSTER) == version for s in streams)


async def _stop_client(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def servers() -> AsyncIterator[tuple[SnapshotCache, ProxyTracker, str, str]]:
    cache, tracker = SnapshotCache(), ProxyTracker()
    cache.set_snapshot(DEFAULT_KEY, snapshot(10))
    ads_server = grpc.aio.server(options=[("grpc.server.max_pending_requests", 100_000)])
    AdsServer(cache, tracker=tracker).add_to_server(ads_server)
    ads_port = ads_server.add_insecure_port("127.0.0.1:0")
    api_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), api_server)
    api_port = api_server.add_insecure_port("127.0.0.1:0")
    await ads_server.start()
    await api_server.start()
    try:
        yield cache, tracker, f"127.0.0.1:{ads_port}", f"127.0.0.1:{api_port}"
    finally:
        await api_server.stop(None)
        await ads_server.stop(None)


async def test_other_calls_are_answered_while_a_change_fans_out(
    servers: tuple[SnapshotCache, ProxyTracker, str, str],
) -> None:
    cache, tracker, ads_target, api_target = servers
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-c", CLIENT, ads_target, str(STREAMS), str(PER_CONNECTION),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(DEADLINE):
            assert (await proc.stdout.readline()).strip() == b"READY"
        async with grpc.aio.insecure_channel(api_target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            await check(health_pb2.HealthCheckRequest())  # the connection is up before timing starts
            for change in range(CHANGES):
                target = snapshot(11 + change)
                version = target[CLUSTER].version
                answered: list[float] = []
                began = time.monotonic()
                cache.set_snapshot(DEFAULT_KEY, target)

                async with asyncio.timeout(DEADLINE):
                    while not _all_acked(tracker, version):
                        t = time.monotonic()
                        await check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
                        answered.append(time.monotonic() - t)
                fan_out = time.monotonic() - began
                # Unbounded, the first call waits out (nearly) the whole fan-out and is the only one.
                assert len(answered) >= 3, (change, fan_out, answered)
                assert statistics.median(answered) <= fan_out / 3, (change, fan_out, answered)
    finally:
        await _stop_client(proc)
