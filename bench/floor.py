"""The NextBatch path's floor on this machine: the parts that are not Graylane, each timed alone.

`NextBatch -> every Envoy ACKed` (bench/store_bench.py) runs from the client's call to the
control plane's reading of the last ACK. Its path crosses three things Graylane does not
make, one after the other: the client's gRPC call reaching the server, etcd committing the
transaction and announcing it on the watch, and Envoy taking the new routes and ACKing
them. `NextBatch -> reached` on a Watch adds a second etcd transaction (the status) and
the Watch's message back to the client. Here each is measured with nothing of Graylane in
it, in the same shapes the path uses:

1. gRPC, one way: a grpc.aio client in another process calls a grpc.aio server (a unary
   call, as the NextBatch), and the server streams messages to a client in another process
   (as the Watch); the wall-clock instants of sending and arriving are compared.
2. etcd: a transaction putting a release-sized value (2 KiB), from the call to the first of
   its answer and its watch event (the control plane acts on whichever comes first), on a
   grpc.aio channel, etcd's data on the same disk as the benches' (a temporary directory).
3. Envoy: a minimal state-of-the-world ADS server written here (no cache, no plan, no
   tracker) serves one real Envoy, then five, the resources of 1,000 services
   (bench/change_cost's view, as the store bench's scale), then changes one lane's weight
   and sends that service's RouteConfiguration: from the send to the (last) ACK read on the
   server.

The sum of the medians is the least `NextBatch -> ACKed` and `-> reached` could take here
if Graylane's own steps took no time at all.

    .venv/bin/python -P bench/floor.py [samples=60]
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import grpc  # noqa: E402
from change_cost import make_view  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc  # noqa: E402
from graylane.controlplane.local.envoy import EnvoyProcess  # noqa: E402
from graylane.controlplane.local.etcd import EtcdProcess  # noqa: E402
from graylane.xds import resources  # noqa: E402
from graylane.xds.render import render  # noqa: E402

SAMPLES = 60
GAP = 0.02  # seconds between samples: each one starts from an idle path, as a NextBatch does
TIMEOUT = 10.0
_METHOD = "/graylane.bench.Floor/Call"
_STREAM = "/graylane.bench.Floor/Stream"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --------------------------------------------------------------------------- 1. gRPC


def _client_main(target: str, samples: int, conn: Any) -> None:
    """In its own process: `samples` unary calls carrying their send instant, then one
    server stream whose messages carry theirs; sends back the stream's one-way times."""

    async def run() -> list[float]:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary(_METHOD)
            for _ in range(samples):
                await call(json.dumps(time.time()).encode(), timeout=TIMEOUT)
                await asyncio.sleep(GAP)
            stream = channel.unary_stream(_STREAM)
            arrived: list[float] = []
            async for message in stream(str(samples).encode(), timeout=TIMEOUT + samples * GAP * 2):
                arrived.append((time.time() - json.loads(message)) * 1000)
            return arrived

    conn.send(asyncio.run(run()))


async def grpc_one_way(samples: int) -> tuple[list[float], list[float]]:
    """(client -> server, server -> client) one-way times in ms."""
    inbound: list[float] = []

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        inbound.append((time.time() - json.loads(request)) * 1000)
        return b""

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(int(request)):
            await asyncio.sleep(GAP)
            yield json.dumps(time.time()).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "graylane.bench.Floor",
                {
                    "Call": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_client_main, args=(f"127.0.0.1:{port}", samples, child), daemon=True)
        process.start()
        loop = asyncio.get_running_loop()
        try:
            ready = await asyncio.wait_for(loop.run_in_executor(None, parent.poll, 120.0), 125.0)
            outbound: list[float] = parent.recv() if ready else []
        finally:
            await loop.run_in_executor(None, process.join, 5.0)
            if process.is_alive():
                process.kill()
    finally:
        await server.stop(None)
    # The first call of a channel also connects: the path's client has its channel open.
    return inbound[1:], outbound


# --------------------------------------------------------------------------- 2. etcd


async def etcd_commit(samples: int, data_dir: pathlib.Path) -> list[float]:
    """ms from a put transaction's call to the first of its answer and its watch event."""
    async with EtcdProcess(data_dir=data_dir) as etcd, grpc.aio.insecure_channel(etcd.endpoint) as channel:
        kv = rpc_pb2_grpc.KVStub(channel)
        key = b"/graylane-floor/releases/r"
        events: asyncio.Queue[int] = asyncio.Queue()
        requests: asyncio.Queue[rpc_pb2.WatchRequest] = asyncio.Queue()
        await requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key)))

        async def outgoing() -> AsyncIterator[rpc_pb2.WatchRequest]:
            while True:
                yield await requests.get()

        watch = rpc_pb2_grpc.WatchStub(channel).Watch(outgoing())

        created = asyncio.Event()

        async def read_watch() -> None:
            async for resp in watch:
                if resp.created:
                    created.set()
                for event in resp.events:
                    events.put_nowait(event.kv.mod_revision)

        reader = asyncio.create_task(read_watch())
        try:
            await asyncio.wait_for(created.wait(), TIMEOUT)  # a put before this would not be seen
            value = b"x" * 2048
            took: list[float] = []
            await kv.Txn(rpc_pb2.TxnRequest(success=[_put(key, value)]), timeout=TIMEOUT)  # warm
            await asyncio.wait_for(events.get(), TIMEOUT)
            for _ in range(samples):
                await asyncio.sleep(GAP)
                t0 = time.perf_counter()
                answer = asyncio.ensure_future(kv.Txn(rpc_pb2.TxnRequest(success=[_put(key, value)]), timeout=TIMEOUT))
                event = asyncio.ensure_future(events.get())
                await asyncio.wait((answer, event), timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
                took.append((time.perf_counter() - t0) * 1000)
                await asyncio.wait_for(asyncio.gather(answer, event), TIMEOUT)
            return took
        finally:
            reader.cancel()
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def _put(key: bytes, value: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value))


# --------------------------------------------------------------------------- 3. Envoy


class _Proxy:
    """One Envoy's stream: what it asked for, the nonce last sent per type, its outbox."""

    def __init__(self, res: resources.Resources) -> None:
        self.res = res
        self.sent: dict[str, str] = {}  # type -> nonce of the last response
        self.names: dict[str, list[str]] = {}  # type -> the names it asked for
        self.outbox: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue()


class _MinimalAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """State of the world: answers each type with what it has for the proxy (the names
    asked for, or all), and notes when a route push is ACKed. Nothing else."""

    def __init__(self, configs: dict[str, resources.Resources]) -> None:
        self.configs = configs  # node id -> its resources (the listener's port differs)
        self.proxies: dict[str, _Proxy] = {}
        self.nonces = itertools.count(1)
        self.versions: dict[str, int] = {}
        self.acked: asyncio.Queue[tuple[str, float]] = asyncio.Queue()  # (nonce, when read)

    def response(self, proxy: _Proxy, type_url: str, only: set[str] | None = None) -> discovery_pb2.DiscoveryResponse:
        """The names the proxy asked for of `type_url` (all when it named none), or of them
        the ones in `only`: for routes and endpoints a response need not repeat the rest."""
        typed = proxy.res.by_type.get(type_url)
        items = typed.items if typed is not None else {}
        names = [n for n in proxy.names.get(type_url) or sorted(items) if only is None or n in only]
        nonce = str(next(self.nonces))
        proxy.sent[type_url] = nonce
        return discovery_pb2.DiscoveryResponse(
            version_info=str(self.versions.setdefault(type_url, 1)),
            type_url=type_url,
            nonce=nonce,
            resources=[resources.encoded(items[n]).packed for n in names if n in items],
        )

    def push_routes(self, routes: resources.TypedResources) -> set[str]:
        """Send every proxy the route configs that differ in `routes`; the nonces to wait for."""
        self.versions[resources.ROUTE] = self.versions.get(resources.ROUTE, 1) + 1
        nonces = set()
        for proxy in self.proxies.values():
            before = proxy.res[resources.ROUTE].versions
            proxy.res = dataclasses.replace(proxy.res, by_type={**proxy.res.by_type, resources.ROUTE: routes})
            changed = {n for n, v in routes.versions.items() if before.get(n) != v}
            response = self.response(proxy, resources.ROUTE, only=changed)
            assert len(response.resources) == 1, "one lane's weight changes one service's routes"
            proxy.outbox.put_nowait(response)
            nonces.add(response.nonce)
        return nonces

    async def StreamAggregatedResources(  # noqa: N802 - the service's method name
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        first = await anext(aiter(request_iterator))
        proxy = self.proxies[first.node.id] = _Proxy(self.configs[first.node.id])

        def take(request: discovery_pb2.DiscoveryRequest) -> None:
            type_url = request.type_url
            if request.response_nonce and request.response_nonce == proxy.sent.get(type_url):
                if not request.HasField("error_detail"):
                    self.acked.put_nowait((request.response_nonce, time.perf_counter()))
                if list(request.resource_names) == proxy.names.get(type_url, []):
                    return
            proxy.names[type_url] = list(request.resource_names)
            proxy.outbox.put_nowait(self.response(proxy, type_url))

        async def read() -> None:
            async for request in request_iterator:
                take(request)

        take(first)
        reader = asyncio.create_task(read())
        getting: asyncio.Future[discovery_pb2.DiscoveryResponse] | None = None
        try:
            while True:
                getting = asyncio.ensure_future(proxy.outbox.get())
                await asyncio.wait((getting, reader), return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    reader.result()  # the reader's error, if it failed
                    return
                yield getting.result()
        finally:
            reader.cancel()
            if getting is not None:
                getting.cancel()


async def envoy_route_ack(samples: int, envoys: int = 1) -> list[float]:
    """ms from sending one changed RouteConfiguration to `envoys` Envoys to reading the last ACK."""
    view = make_view(1000)
    ads = _MinimalAds({})
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for k in range(envoys):
                envoy = EnvoyProcess(ads_port=port, node_id=f"floor-{k}")
                ads.configs[envoy.node_id] = render(view, listen_port=envoy.listen_port)
                await stack.enter_async_context(envoy)
            took: list[float] = []
            lanes = list(view.lanes)
            for i in range(samples + 1):
                await asyncio.sleep(GAP)
                lanes[0] = dataclasses.replace(lanes[0], weight=10 + i % 80)
                routes = render(dataclasses.replace(view, lanes=tuple(lanes)), listen_port=0)[resources.ROUTE]
                t0 = time.perf_counter()
                waiting = ads.push_routes(routes)
                last = t0
                while waiting:
                    acked, at = await asyncio.wait_for(ads.acked.get(), TIMEOUT)
                    if acked in waiting:
                        waiting.discard(acked)
                        last = at
                if i:  # the first push also warms Envoy's route path
                    took.append((last - t0) * 1000)
            return took
    finally:
        await server.stop(None)


# --------------------------------------------------------------------------- report


async def measure(samples: int = SAMPLES) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="graylane-floor-") as tmp:
        inbound, outbound = await grpc_one_way(samples)
        commit = await etcd_commit(samples, pathlib.Path(tmp) / "etcd")
        ack = await envoy_route_ack(samples)
        ack5 = await envoy_route_ack(samples, envoys=5)
    return {"call": inbound, "commit": commit, "envoy": ack, "envoy5": ack5, "watch": outbound}


def section(parts: dict[str, list[float]], *, acked_goal: float = 5.0, reached_goal: float = 10.0) -> list[str]:
    """Markdown rows: each part's p50 / p90 / p99, and the sums of medians against the goals."""
    names = {
        "call": "the client's unary call reaching the server (gRPC, one way, another process)",
        "commit": "etcd: a 2 KiB put transaction, call -> its answer or watch event (the first)",
        "envoy": "Envoy: one changed RouteConfiguration (1,000 services) sent -> its ACK read",
        "envoy5": "5 Envoys: the same sent to each -> the last ACK read",
        "watch": "a server-stream message reaching the client (gRPC, one way: the Watch's yield)",
    }
    med = {k: statistics.median(v) if v else float("nan") for k, v in parts.items()}
    rows = [
        "| part of the path (nothing of Graylane in it) | p50 ms | p90 ms | p99 ms | samples |",
        "|---|---|---|---|---|",
    ]
    for key, label in names.items():
        values = parts[key]
        rows.append(
            f"| {label} | {med[key]:.2f} | {_pct(values, 0.9):.2f} | {_pct(values, 0.99):.2f} | {len(values)} |"
        )
    for envoy, count in (("envoy", "1 Envoy"), ("envoy5", "5 Envoys")):
        acked = med["call"] + med["commit"] + med[envoy]
        reached = acked + med["commit"] + med["watch"]
        rows.append(
            f"| **floor of NextBatch -> every Envoy ACKed, {count}** (call + commit + Envoy) | **{acked:.2f}** | | | "
            f"goal p50 <= {acked_goal:g} ms |"
        )
        rows.append(
            f"| **floor of NextBatch -> `reached` on a Watch, {count}** (+ a second commit + the Watch's message) | "
            f"**{reached:.2f}** | | | goal p50 <= {reached_goal:g} ms |"
        )
    return rows


TITLE = "7b. The NextBatch path's floor on this machine"


async def floor_section(tree: str, command: str, samples: int = SAMPLES) -> str:
    """Section 7b of bench/RESULTS.md: the parts measured alone, and their sums."""
    started = time.monotonic()
    load = os.getloadavg()[0]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    parts = await measure(samples)
    return "\n".join(
        [
            f"## {TITLE}",
            "",
            f"`{command}` (bench/floor.py) at {tree}, {when} UTC, {os.cpu_count()} cores, load average {load:.2f} -> "
            f"{os.getloadavg()[0]:.2f}, {time.monotonic() - started:.0f} s. The parts of `NextBatch -> every Envoy "
            "ACKed` and `-> reached` (section 7) that Graylane does not make, each timed alone with nothing of "
            "Graylane in its path: a grpc.aio call and a server-stream message between two processes; an etcd put "
            "transaction (data on this disk) to its answer or watch event; one real Envoy (the bootstraps of "
            "deploy/envoy/), then five, fed the resources of 1,000 services by a minimal state-of-the-world ADS "
            "server written in the bench, one changed RouteConfiguration sent to the (last) ACK read. A sum of "
            "medians is the least the path could take here if Graylane's own steps took no time; the p99 column is "
            "each part's own tail.",
            "",
            *section(parts),
            "",
        ]
    )


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else SAMPLES
    started = time.monotonic()
    load = os.getloadavg()[0]
    parts = asyncio.run(measure(samples))
    print("\n".join(section(parts)))
    print(f"\n{time.monotonic() - started:.0f} s; load average {load:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
