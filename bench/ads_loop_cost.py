"""The ADS server's own work per stream per change, without gRPC: CPU per change of N streams.

`.venv/bin/python -P bench/ads_loop_cost.py [--streams 5000] [--changes 9] [--services 100] [--xds DIR]`

N streams (SotW, every 4th delta, as bench/run.py --scale's fleet) run the real stream loops
(`_Stream.run`, its request reader, the send slots, the tracker with telemetry's listener) on
one asyncio loop, with the serving process's collector settings (`CollectorTuning`). Each
stream's "network" is an in-process pipe: a response handed to `send` is answered at once
with the ACK a proxy would send (its nonce and version read from the bytes, the names
repeated), and every write suspends once, as grpc.aio's does. A change sets a snapshot with
the lane at a new weight (rendered beforehand); this measures the process's CPU from the
change to every stream holding the new routes ACKed (median over changes, ms), and per
stream (us). The fake proxies' own work (parsing each response, making its ACK) is in that
figure too: the same for both revisions compared.

What it leaves out is gRPC itself (each write's and read's batch, the kernel's sendmsg,
the completions): about half of a change's CPU at 10,000 streams in bench/run.py --scale.
So it isolates what this repository's code costs per stream, for before/after figures that
the full fleet's noise (+-30 % run to run on a shared machine) hides: `--xds` runs another
revision's `xds/` (see bench/xds_swap.py); the rest of the tree is this one. Bounded: each
change waits at most 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import pathlib
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from xds_swap import use_xds  # noqa: E402

if "--xds" in sys.argv:
    use_xds(sys.argv[sys.argv.index("--xds") + 1])

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from graylane.controlplane.app import CollectorTuning  # noqa: E402
from graylane.controlplane.telemetry import Telemetry  # noqa: E402
from graylane.xds import server as ads  # noqa: E402
from graylane.xds.cache import SnapshotCache  # noqa: E402
from graylane.xds.render import render  # noqa: E402
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources  # noqa: E402
from graylane.xds.tracker import ProxyTracker  # noqa: E402
from graylane.xds.view import Endpoint, Lane, RoutingView, ServiceRoute, VersionEndpoints  # noqa: E402


def snapshot(services: int, weight: int) -> Resources:
    routes = tuple(ServiceRoute(f"s{i}", "v1") for i in range(services))
    endpoints = [VersionEndpoints(f"s{i}", "v1", (Endpoint("127.0.0.1", 1000 + i),)) for i in range(services)]
    endpoints.append(VersionEndpoints("s0", "v2", (Endpoint("127.0.0.2", 1000),)))
    lanes = (Lane("g", "s0", weight, (("s0", "v2"),)),)
    return render(RoutingView(services=routes, endpoints=tuple(endpoints), lanes=lanes), listen_port=10000)


class Pipe:
    """One stream's requests: the first ones subscribe, then each response is ACKed."""

    def __init__(self, delta: bool, names: dict[str, list[str]], node: base_pb2.Node) -> None:
        self.delta = delta
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            if delta:
                request: Any = discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url, resource_names_subscribe=names.get(type_url, [])
                )
            else:
                request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names.get(type_url, []))
            if type_url == CLUSTER:
                request.node.CopyFrom(node)
            self._queue.put_nowait(request)
        self._names = names

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._requests()

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            yield await self._queue.get()

    async def send(self, body: bytes) -> None:
        if self.delta:
            response = discovery_pb2.DeltaDiscoveryResponse.FromString(body)
            ack: Any = discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce)
        else:
            sotw = discovery_pb2.DiscoveryResponse.FromString(body)
            ack = discovery_pb2.DiscoveryRequest(
                type_url=sotw.type_url,
                version_info=sotw.version_info,
                response_nonce=sotw.nonce,
                resource_names=self._names.get(sotw.type_url, []),
            )
        await asyncio.sleep(0)  # a write suspends its stream once, as grpc.aio's does
        self._queue.put_nowait(ack.SerializeToString())  # what arrives: bytes, parsed below


class Parsed:
    """The request iterator as the server gets it: each request parsed from its bytes."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._requests()

    async def _requests(self) -> AsyncIterator[Any]:
        kind = discovery_pb2.DeltaDiscoveryRequest if self._pipe.delta else discovery_pb2.DiscoveryRequest
        async for item in self._pipe:
            yield kind.FromString(item) if isinstance(item, bytes) else item


async def run(streams: int, changes: int, services: int) -> tuple[list[float], float]:
    cache = SnapshotCache(key_for_node=lambda node: "k")
    weight = 10
    cache.set_snapshot("k", snapshot(services, weight))
    tracker = ProxyTracker()
    telemetry = Telemetry()
    telemetry.observe_proxies(tracker)
    server = ads.AdsServer(cache, tracker=tracker)
    with CollectorTuning(tracker):  # the serving process's collector settings
        return await _fan_out(cache, tracker, telemetry, server, streams, changes, services, weight)


async def _fan_out(
    cache: SnapshotCache,
    tracker: ProxyTracker,
    telemetry: Telemetry,
    server: ads.AdsServer,
    streams: int,
    changes: int,
    services: int,
    weight: int,
) -> tuple[list[float], float]:
    target = cache.snapshot("k")
    assert target is not None
    names = {ENDPOINT: sorted(target[ENDPOINT].items), ROUTE: sorted(target[ROUTE].items)}
    tasks = []
    for i in range(streams):
        delta = i % 4 == 3
        pipe = Pipe(delta, names, base_pb2.Node(id=f"n{i}", cluster="c"))
        stream = (ads._DeltaStream if delta else ads._SotwStream)(cache, tracker, server._selections)
        stream.send_slots = server._send_slots
        tasks.append(asyncio.create_task(stream.run(Parsed(pipe), pipe.send)))

    # Counted from the tracker's events (reading every stream's status would cost more than
    # what is measured): streams whose routes ACK the version waited for.
    waited: dict[str, Any] = {"version": "", "count": 0, "done": None}

    def on_event(event: Any) -> None:
        if event.kind == "acked" and event.type_url == ROUTE and event.version == waited["version"]:
            waited["count"] += 1
            if waited["count"] == streams and waited["done"] is not None and not waited["done"].done():
                waited["done"].set_result(None)

    tracker.add_listener(on_event)

    async def all_acked(version: str) -> None:
        waited.update(version=version, count=0, done=asyncio.get_running_loop().create_future())
        async with asyncio.timeout(60):
            await waited["done"]

    await all_acked(target[ROUTE].version)  # (set before any stream opens, so none is missed)
    gc.collect()
    cpu_ms = []
    rendered = [snapshot(services, weight + 5 * (i + 1)) for i in range(changes)]  # not measured
    began = time.monotonic()
    for change in rendered:
        c0 = time.process_time()
        cache.set_snapshot("k", change)
        new = cache.snapshot("k")
        assert new is not None
        await all_acked(new[ROUTE].version)
        cpu_ms.append((time.process_time() - c0) * 1000)
    elapsed = time.monotonic() - began
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await telemetry.aclose()
    return cpu_ms, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--changes", type=int, default=9)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--xds", help="another revision's xds/ directory (see bench/xds_swap.py)")
    args = parser.parse_args()
    cpu_ms, elapsed = asyncio.run(run(args.streams, args.changes, args.services))
    med = statistics.median(cpu_ms)
    print(
        f"{args.streams} streams, {args.services} services: CPU per change median {med:.0f} ms "
        f"({1000 * med / args.streams:.1f} us per stream); each: {', '.join(f'{c:.0f}' for c in cpu_ms)} ms; "
        f"{elapsed:.1f} s"
    )


if __name__ == "__main__":
    main()
