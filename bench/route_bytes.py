"""Bytes one ADS client is sent for one lane-weight change, through the real AdsServer.

One SotW client and one delta client (hand-built requests over grpc.aio on 127.0.0.1)
subscribe the way Envoy does: CDS and LDS wildcard, EDS for the clusters they hold, and
for a listener naming a route config (RDS) that name, for one using scoped routes SRDS
(wildcard) and then RDS for the route configs the scopes name. Once both ACKed the whole
snapshot of `make_view(n)` (bench/change_cost.py, section 1 of bench/run.py: n services, every 10th with a lane),
one lane's weight changes; the figure is the size of every DiscoveryResponse each client
receives until it ACKed the new snapshot again (serialised bytes, without gRPC framing).

    .venv/bin/python -P bench/route_bytes.py                      # this tree
    .venv/bin/python -P bench/route_bytes.py --xds /tmp/old/xds   # another tree's xds/

`--xds` measures another revision's `xds/` package (e.g. `git archive <commit> xds | tar
-x -C /tmp/old`) against the same views: before / after figures from one script.
Bounded: one change per size, every wait under a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import pathlib
import sys
import time
from typing import Any

DEADLINE = 120.0

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from xds_swap import use_xds  # noqa: E402

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"


@dataclasses.dataclass
class Received:
    counting: bool = False
    bytes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    resources: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def add(self, type_url: str, size: int, count: int) -> None:
        if self.counting:
            self.bytes[type_url.rsplit(".", 1)[-1]] += size
            self.resources[type_url.rsplit(".", 1)[-1]] += count


def listener_routes(any_msg: Any) -> tuple[str | None, bool]:
    """(RDS name, uses SRDS) of a Listener's HTTP connection manager."""
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

    listener = listener_pb2.Listener()
    any_msg.Unpack(listener)
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    if hcm.HasField("rds"):
        return hcm.rds.route_config_name, False
    return None, hcm.HasField("scoped_routes")


async def sotw_client(stub: Any, node: Any, received: Received) -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.route.v3 import scoped_route_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    req = discovery_pb2.DiscoveryRequest
    call = stub.StreamAggregatedResources()
    await call.write(req(node=node, type_url=CLUSTER))
    await call.write(req(type_url=LISTENER))
    last: dict[str, tuple[str, str]] = {}
    names: dict[str, tuple[str, ...]] = {}

    async def subscribe(type_url: str, wanted: tuple[str, ...]) -> None:
        if names.get(type_url) != wanted:
            names[type_url] = wanted
            version, nonce = last.get(type_url, ("", ""))
            await call.write(req(type_url=type_url, version_info=version, response_nonce=nonce, resource_names=wanted))

    try:
        while (resp := await call.read()) is not None and resp is not _EOF():
            received.add(resp.type_url, resp.ByteSize(), len(resp.resources))
            last[resp.type_url] = (resp.version_info, resp.nonce)
            ack = req(
                type_url=resp.type_url,
                version_info=resp.version_info,
                response_nonce=resp.nonce,
                resource_names=names.get(resp.type_url, ()),
            )
            await call.write(ack)
            if resp.type_url == CLUSTER:
                clusters = []
                for any_msg in resp.resources:
                    cluster = cluster_pb2.Cluster()
                    any_msg.Unpack(cluster)
                    clusters.append(cluster.eds_cluster_config.service_name or cluster.name)
                await subscribe(ENDPOINT, tuple(sorted(clusters)))
            elif resp.type_url == LISTENER:
                rds, scoped = listener_routes(resp.resources[0])
                if rds is not None:
                    await subscribe(ROUTE, (rds,))
                elif scoped and SCOPED_ROUTE not in names:
                    names[SCOPED_ROUTE] = ()
                    await call.write(req(type_url=SCOPED_ROUTE))
            elif resp.type_url == SCOPED_ROUTE:
                routes = []
                for any_msg in resp.resources:
                    scope = scoped_route_pb2.ScopedRouteConfiguration()
                    any_msg.Unpack(scope)
                    routes.append(scope.route_configuration_name)
                await subscribe(ROUTE, tuple(sorted(routes)))
    finally:
        call.cancel()


async def delta_client(stub: Any, node: Any, received: Received) -> None:
    from envoy.config.route.v3 import scoped_route_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    req = discovery_pb2.DeltaDiscoveryRequest
    call = stub.DeltaAggregatedResources()
    await call.write(req(node=node, type_url=CLUSTER))
    await call.write(req(type_url=LISTENER))
    clusters: set[str] = set()
    scopes: dict[str, str] = {}
    routes_started = False
    try:
        while (resp := await call.read()) is not None and resp is not _EOF():
            received.add(resp.type_url, resp.ByteSize(), len(resp.resources))
            await call.write(req(type_url=resp.type_url, response_nonce=resp.nonce))
            if resp.type_url == CLUSTER:
                added = sorted({r.name for r in resp.resources} - clusters)
                gone = sorted(set(resp.removed_resources) & clusters)
                clusters.update(added)
                clusters.difference_update(gone)
                await call.write(
                    req(type_url=ENDPOINT, resource_names_subscribe=added, resource_names_unsubscribe=gone)
                )
            elif resp.type_url == LISTENER and not routes_started:
                routes_started = True
                rds, scoped = listener_routes(resp.resources[0].resource)
                if rds is not None:
                    await call.write(req(type_url=ROUTE, resource_names_subscribe=[rds]))
                elif scoped:
                    await call.write(req(type_url=SCOPED_ROUTE))
            elif resp.type_url == SCOPED_ROUTE:
                before = set(scopes.values())
                for r in resp.resources:
                    scope = scoped_route_pb2.ScopedRouteConfiguration()
                    r.resource.Unpack(scope)
                    scopes[r.name] = scope.route_configuration_name
                for name in resp.removed_resources:
                    scopes.pop(name, None)
                after = set(scopes.values())
                await call.write(
                    req(
                        type_url=ROUTE,
                        resource_names_subscribe=sorted(after - before),
                        resource_names_unsubscribe=sorted(before - after),
                    )
                )
    finally:
        call.cancel()


def _EOF() -> Any:  # noqa: N802
    import grpc

    return grpc.aio.EOF


async def measure(n: int) -> dict[str, Any]:
    import grpc
    from change_cost import make_view  # after --xds chose the package it imports
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc
    from graylane.xds import resources
    from graylane.xds.cache import DEFAULT_KEY, SnapshotCache
    from graylane.xds.render import render
    from graylane.xds.server import AdsServer

    view = make_view(n)
    cache = SnapshotCache()
    cache.set_snapshot(DEFAULT_KEY, render(view, listen_port=10000))
    ads = AdsServer(cache)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    ads.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out: dict[str, Any] = {"services": n}
    try:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            received = {"sotw": Received(), "delta": Received()}
            tasks = [
                asyncio.create_task(sotw_client(stub, base_pb2.Node(id="sotw"), received["sotw"])),
                asyncio.create_task(delta_client(stub, base_pb2.Node(id="delta"), received["delta"])),
            ]

            async def converged() -> None:
                target = cache.snapshot(DEFAULT_KEY)
                assert target is not None
                types_ = [t for t in resources.PUSH_ORDER if len(target[t])]
                async with asyncio.timeout(DEADLINE):
                    while True:
                        proxies = [p for p in ads.tracker.proxies().values() if p.connected]
                        if len(proxies) == 2 and all(
                            t in p.acked and dict(p.acked[t].resources) == dict(target[t].versions)
                            for p in proxies
                            for t in types_
                        ):
                            return
                        await asyncio.sleep(0.01)

            await converged()
            for r in received.values():
                r.counting = True
            lanes = list(view.lanes)
            lanes[0] = dataclasses.replace(lanes[0], weight=lanes[0].weight + 10)
            started = time.perf_counter()
            cache.set_snapshot(DEFAULT_KEY, render(dataclasses.replace(view, lanes=tuple(lanes)), listen_port=10000))
            await converged()
            out["seconds"] = time.perf_counter() - started
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for protocol, r in received.items():
                out[protocol] = {"bytes": dict(r.bytes), "resources": dict(r.resources)}
    finally:
        ads.close()
        await server.stop(grace=None)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--xds", default="", help="measure this xds/ package directory instead of the tree's")
    args = parser.parse_args()
    if args.xds:
        use_xds(args.xds)
    for n in args.services:
        result = await measure(n)
        for protocol in ("sotw", "delta"):
            got = result[protocol]
            total = sum(got["bytes"].values())
            detail = ", ".join(f"{t} {b:,} B ({got['resources'][t]})" for t, b in sorted(got["bytes"].items()))
            print(f"{n:>6} services {protocol:>5}: {total:>10,} bytes for one weight change  [{detail}]", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
