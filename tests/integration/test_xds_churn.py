"""Stream churn against a real ADS server: no ghost proxy, no leftover per-key state.

Clients run in separate processes (grpc.aio, hand-built requests): 1,000 short-lived
streams with distinct listen ports, ended at random points in every way a client can end
(cancel before or after a response, close the channel, half-close, delta or SotW), plus a
process holding streams that is killed with SIGKILL. Afterwards the tracker holds exactly
the streams still open, the cache asks for exactly their keys, and the relay renders only
those keys; when the last client exits, nothing is left.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from graylane.agent.relay import Relay
from graylane.agent.wire import cluster_view
from graylane.xds import view as xv
from graylane.xds.cache import SnapshotCache
from graylane.xds.resources import CLUSTER
from graylane.xds.server import AdsServer
from graylane.xds.tracker import ProxyTracker

DEADLINE = 30.0
CHURN = 1000
LIVE = 10
HELD = 100
PORTS = 300  # distinct listen ports among the short-lived clients

VIEW = xv.RoutingView(
    services=(xv.ServiceRoute("checkout", "v1"),),
    endpoints=(xv.VersionEndpoints("checkout", "v1", (xv.Endpoint("127.0.0.1", 8081),)),),
)

CLIENT = r"""
import asyncio, random, sys
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
target, mode, count, live, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])


def node(name, port):
    n = base_pb2.Node(id=name)
    n.metadata.update({"listen_port": port})
    return n


async def churn_one(channel, i, rng):
    how = rng.choice(["cancel-early", "cancel-after", "ack-cancel", "close-channel", "half-close", "delta-cancel"])
    own = grpc.aio.insecure_channel(target) if how == "close-channel" else None
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(own or channel)
    first = node(f"churn-{i}", 20000 + i % %(ports)d)
    if how == "delta-cancel":
        call = stub.DeltaAggregatedResources()
        await call.write(discovery_pb2.DeltaDiscoveryRequest(node=first, type_url=CLUSTER))
    else:
        call = stub.StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(node=first, type_url=CLUSTER))
    try:
        if how == "cancel-early":
            call.cancel()
            return
        response = await call.read()
        if how == "ack-cancel":
            await call.write(discovery_pb2.DiscoveryRequest(
                type_url=CLUSTER, version_info=response.version_info, response_nonce=response.nonce))
        if how == "half-close":
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        elif how == "close-channel":
            await own.close()
        else:
            call.cancel()
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass
    finally:
        if own is not None:
            await own.close()


async def hold(channel, name, port):
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    call = stub.StreamAggregatedResources()
    await call.write(discovery_pb2.DiscoveryRequest(node=node(name, port), type_url=CLUSTER))
    await call.read()
    return call


async def main():
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        if mode == "churn":
            for start in range(0, count, 50):
                await asyncio.gather(*(churn_one(channel, i, rng) for i in range(start, min(count, start + 50))))
        calls = await asyncio.gather(*(hold(channel, f"{mode}-live-{j}", 30000 + j) for j in range(live)))
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        for call in calls:
            call.cancel()


asyncio.run(main())
""".replace("%(ports)d", str(PORTS))


@dataclass
class Server:
    cache: SnapshotCache
    tracker: ProxyTracker
    relay: Relay
    target: str


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    cache, tracker = SnapshotCache(), ProxyTracker()
    relay = Relay(cache, tracker)
    relay.apply(cluster_view(VIEW))
    grpc_server = grpc.aio.server()
    ads = AdsServer(cache, tracker=tracker)
    ads.add_to_server(grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield Server(cache, tracker, relay, f"127.0.0.1:{port}")
    finally:
        ads.close()
        await grpc_server.stop(grace=None)


async def client(target: str, mode: str, *, count: int, live: int, seed: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        target,
        mode,
        str(count),
        str(live),
        str(seed),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=tempfile.gettempdir(),  # not the checkout: its xds/ would shadow the xds-protos package
    )


async def ready(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    line = await process.stdout.readline()
    assert line == b"READY\n", f"client exited with {await process.wait()} before it was ready"


async def settle(server: Server, nodes: set[str]) -> None:
    """Wait until the tracker holds exactly the streams of `nodes` (the deadline fails the test)."""
    seq = 0
    try:
        async with asyncio.timeout(DEADLINE):
            while {p.node_id for p in server.tracker.proxies().values()} != nodes or len(
                server.tracker.proxies()
            ) != len(nodes):
                seq = await server.tracker.wait_for_change(seq)
    except TimeoutError:
        ghosts = sorted(p.node_id for p in server.tracker.proxies().values() if p.node_id not in nodes)
        pytest.fail(f"{len(ghosts)} ghost proxies after the churn: {ghosts[:20]}")


async def test_stream_churn_leaves_exactly_the_live_streams(server: Server) -> None:
    held = await client(server.target, "held", count=0, live=HELD, seed=1)
    churn = await client(server.target, "churn", count=CHURN, live=LIVE, seed=2)
    try:
        async with asyncio.timeout(DEADLINE):
            await ready(held)
            held.kill()  # SIGKILL while the churn runs: its streams end without a goodbye
            await held.wait()
            await ready(churn)
        live = {f"churn-live-{j}" for j in range(LIVE)}
        await settle(server, live)
        live_keys = {str(30000 + j) for j in range(LIVE)}
        assert server.cache.requested_keys() == live_keys
        assert server.cache.keys() == live_keys  # the relay dropped every key nobody asks for

        # One change now renders the live keys only.
        started = time.perf_counter()
        server.relay.apply(cluster_view(xv.RoutingView(services=VIEW.services, endpoints=())))
        elapsed = time.perf_counter() - started
        print(f"one view change after the churn: {elapsed * 1000:.1f} ms for {len(server.cache.keys())} keys")
        assert server.cache.keys() == live_keys

        assert churn.stdin is not None
        churn.stdin.write(b"\n")
        await churn.stdin.drain()
        async with asyncio.timeout(DEADLINE):
            assert await churn.wait() == 0
        await settle(server, set())
        assert server.cache.requested_keys() == frozenset() and server.cache.keys() == frozenset()
    finally:
        for process in (held, churn):
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.mark.parametrize("listen_port", ["99999", "-5", 0])
async def test_a_bad_listen_port_is_refused_and_renders_nothing(server: Server, listen_port: object) -> None:
    node = base_pb2.Node(id="bad-port")
    node.metadata.update({"listen_port": listen_port})
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))
        async with asyncio.timeout(DEADLINE):
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = await call.details()
    assert details.startswith(f"node.metadata.listen_port: {listen_port!r} is not a port"), details
    assert dict(server.tracker.proxies()) == {}
    assert server.cache.requested_keys() == frozenset() and server.cache.keys() == frozenset()
