"""The control-plane cost of one release's change, stage by stage, at 1,000 and 10,000 services.

`.venv/bin/python -P bench/change_cost.py [--services 1000 10000] [--reps 7] [--change new-lane] [--xds DIR]`

For a view of n services and n/10 live lanes (`make_view`, section 1 of bench/run.py), one
lane's weight changes (or, with `--change new-lane`, a release starts: a new version with
endpoints and a lane entering at it), and this measures (median over reps, ms):

* render: `Renderer.render` (incremental, from the previous view) where `graylane.xds.render`
  has one, else the pure `render` (what the control plane ran before);
* set_snapshot: `SnapshotCache.set_snapshot` of the new render over the previous one;
* push: one SotW and one delta stream that hold (ACKed) exactly the previous render, through
  the real ADS server's stream objects: plan + selections + the response bodies;
* ack: the same streams handling the ACK of those responses (and re-planning).

Also the full render (`render` of the whole view, nothing reused). Bounded: reps per size.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def _use_xds(directory: str) -> None:
    """Make `graylane.xds` the package in `directory` (as bench/route_bytes.py --xds)."""
    import types

    import graylane

    module = types.ModuleType("graylane.xds")
    module.__path__ = [str(pathlib.Path(directory).resolve())]
    sys.modules["graylane.xds"] = module
    graylane.xds = module  # type: ignore[attr-defined]


# `--xds DIR`: measure another revision's xds/ (`git archive <commit> xds | tar -x -C DIR/..`),
# before / after from one script. Read before anything imports graylane.xds.
if __name__ == "__main__" and "--xds" in sys.argv:
    _use_xds(sys.argv[sys.argv.index("--xds") + 1])

from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from graylane.xds import render as xds_render  # noqa: E402
from graylane.xds import resources  # noqa: E402
from graylane.xds import server as xds_server  # noqa: E402
from graylane.xds.cache import SnapshotCache  # noqa: E402
from graylane.xds.tracker import ProxyTracker  # noqa: E402
from graylane.xds.view import (  # noqa: E402
    Condition,
    Endpoint,
    Lane,
    MatchKind,
    MatchOp,
    RoutingView,
    Rule,
    ServiceRoute,
    VersionEndpoints,
)

WILDCARD = xds_server.WILDCARD_TYPES


def make_view(n: int) -> RoutingView:
    """n services on v1 (two endpoints each); every 10th also has a v2 and its own lane
    (entry = that service, header rule x-canary: always, weight 20)."""
    services = []
    endpoints = []
    lanes = []
    rule = Rule((Condition(MatchKind.HEADER, "x-canary", MatchOp.EXACT, "always"),))
    for i in range(n):
        name = f"svc-{i:04d}"
        services.append(ServiceRoute(name=name, base_version="v1"))
        port = 20000 + (i % 20000)
        endpoints.append(VersionEndpoints(name, "v1", (Endpoint("127.0.0.1", port), Endpoint("127.0.0.2", port))))
        if i % 10 == 0:
            endpoints.append(VersionEndpoints(name, "v2", (Endpoint("127.0.0.3", port),)))
            lanes.append(Lane(name=f"{name}-v2", entry=name, weight=20, versions=((name, "v2"),), rules=(rule,)))
    lanes.sort(key=lambda lane: lane.name)
    return RoutingView(services=tuple(services), endpoints=tuple(endpoints), lanes=tuple(lanes))


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class _Streams:
    """One SotW and one delta stream, driven by hand (no grpc), in sync with the cache."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.tracker = ProxyTracker()
        selections = xds_server._Selections()
        self.sotw = xds_server._SotwStream(cache, self.tracker, selections)
        self.delta = xds_server._DeltaStream(cache, self.tracker, selections)
        for stream in (self.sotw, self.delta):
            stream.key = "default"
            stream.stream_id = f"bench-{stream.protocol}"

    def subscribe(self) -> None:
        target = self.cache.snapshot("default")
        assert target is not None
        for t in resources.PUSH_ORDER:
            names = [] if t in WILDCARD else sorted(target[t].items)
            self.sotw.handle(discovery_pb2.DiscoveryRequest(type_url=t, resource_names=names))
            self.delta.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=t, resource_names_subscribe=names))

    def push(self) -> list[tuple[Any, list[bytes]]]:
        return [(self.sotw, self.sotw.push()), (self.delta, self.delta.push())]

    @staticmethod
    def wanted(stream: Any, type_url: str) -> list[str]:
        """The EDS / RDS names a proxy asks for, as Envoy does: one per cluster it was sent,
        one per scope it was sent (the scope and its route config share the name)."""
        source = resources.CLUSTER if type_url == resources.ENDPOINT else resources.SCOPED_ROUTE
        return sorted(set(stream.types[source].sent) | stream.types[type_url].names)

    def ack(self, pushed: list[tuple[Any, list[bytes]]]) -> float:
        """ACK every response (and what the streams send after the ACKs); the seconds the
        streams spent handling them (building the requests is the proxy's work: not counted)."""
        spent = 0.0
        for stream, bodies in pushed:
            requests: list[Any] = []
            for body in bodies:
                if stream is self.sotw:
                    resp = discovery_pb2.DiscoveryResponse.FromString(body)
                    names = [] if resp.type_url in WILDCARD else self.wanted(stream, resp.type_url)
                    requests.append(
                        discovery_pb2.DiscoveryRequest(
                            type_url=resp.type_url,
                            version_info=resp.version_info,
                            response_nonce=resp.nonce,
                            resource_names=names,
                        )
                    )
                else:
                    dresp = discovery_pb2.DeltaDiscoveryResponse.FromString(body)
                    st = stream.types[dresp.type_url]
                    new = [] if st.wildcard else sorted(set(self.wanted(stream, dresp.type_url)) - st.names)
                    requests.append(
                        discovery_pb2.DeltaDiscoveryRequest(
                            type_url=dresp.type_url, response_nonce=dresp.nonce, resource_names_subscribe=new
                        )
                    )
            # Like Envoy: new clusters (scopes) it was sent make it ask for their endpoints
            # (route configs) even when no EDS (RDS) response came in this round.
            answered = {request.type_url for request in requests}
            for type_url in (resources.ENDPOINT, resources.ROUTE):
                st = stream.types[type_url]
                names = self.wanted(stream, type_url)
                if type_url in answered or set(names) == st.names:
                    continue
                if stream is self.sotw:
                    requests.append(
                        discovery_pb2.DiscoveryRequest(
                            type_url=type_url,
                            version_info=st.sotw_version,
                            response_nonce=st.latest_nonce,
                            resource_names=names,
                        )
                    )
                else:
                    requests.append(
                        discovery_pb2.DeltaDiscoveryRequest(
                            type_url=type_url, resource_names_subscribe=sorted(set(names) - st.names)
                        )
                    )
            t0 = time.perf_counter()
            for request in requests:
                stream.handle(request)
            # ...and what the stream sends after the ACKs (make-before-break releases).
            more = stream.push()
            spent += time.perf_counter() - t0
            if more:
                spent += self.ack([(stream, more)])
        return spent


def bump(view: RoutingView, step: int) -> RoutingView:
    """`view` with one lane's weight changed (every other object shared)."""
    lanes = list(view.lanes)
    lanes[0] = dataclasses.replace(lanes[0], weight=(lanes[0].weight + step) % 90 + 1)
    return dataclasses.replace(view, lanes=tuple(lanes))


def add_lane(view: RoutingView, step: int) -> RoutingView:
    """`view` with a new release: a new version (endpoints: new clusters) of one service that
    has no lane yet, and a lane entering there at 10 % (routes wait for the new clusters)."""
    service = view.services[(step * 10 + 1) % len(view.services)].name
    version = f"v9-{step}"
    endpoints = (*view.endpoints, VersionEndpoints(service, version, (Endpoint("127.0.0.9", 9000 + step),)))
    lane = Lane(name=f"{service}-{version}", entry=service, weight=10, versions=((service, version),))
    lanes = tuple(sorted((*view.lanes, lane), key=lambda item: item.name))
    return dataclasses.replace(view, endpoints=endpoints, lanes=lanes)


CHANGES: dict[str, Callable[[RoutingView, int], RoutingView]] = {"weight": bump, "new-lane": add_lane}


def measure(n: int, reps: int, *, full_reps: int | None = None, change: str = "weight") -> dict[str, float]:
    """Stage medians (ms) for one change (CHANGES) at n services; `full_reps` full renders
    too (default reps // 2; 0: none)."""
    view = make_view(n)
    try:
        from graylane.xds.renderer import Renderer
    except ImportError:  # a revision before the incremental renderer
        Renderer = None  # type: ignore[assignment,misc]  # noqa: N806
    if Renderer is not None:
        renderer = Renderer(listen_port=10000)
        do_render: Callable[[RoutingView], resources.Resources] = renderer.render
    else:

        def do_render(v: RoutingView) -> resources.Resources:
            return xds_render.render(v, listen_port=10000)

    full: list[float] = []
    for _ in range(max(1, reps // 2) if full_reps is None else full_reps):
        xds_render.forget_reused()
        gc.collect()
        t0 = time.perf_counter()
        xds_render.render(view, listen_port=10000)
        full.append(_ms(t0))
    cache = SnapshotCache()
    cache.set_snapshot("default", do_render(view))
    streams = _Streams(cache)
    streams.subscribe()
    streams.ack(streams.push())
    stages: dict[str, list[float]] = {"render": [], "set_snapshot": [], "push": [], "ack": []}
    for step in range(1, reps + 1):
        view = CHANGES[change](view, step)
        gc.collect()
        t0 = time.perf_counter()
        target = do_render(view)
        stages["render"].append(_ms(t0))
        t0 = time.perf_counter()
        cache.set_snapshot("default", target)
        stages["set_snapshot"].append(_ms(t0))
        t0 = time.perf_counter()
        pushed = streams.push()
        stages["push"].append(_ms(t0))
        sizes = [len(b) for _, bodies in pushed for b in bodies]
        stages["ack"].append(streams.ack(pushed) * 1000)
    out = {k: statistics.median(v) for k, v in stages.items()}
    out["full_render"] = statistics.median(full) if full else float("nan")
    out["total"] = out["render"] + out["set_snapshot"] + out["push"] + out["ack"]
    out["bytes"] = float(sum(sizes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--change", choices=sorted(CHANGES), default="weight")
    parser.add_argument("--xds", help="another revision's xds/ directory (see the module docstring)")
    args = parser.parse_args()
    print("| services | full render ms | render ms | set_snapshot ms | push ms | ack ms | total ms | bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.services:
        r = measure(n, args.reps, change=args.change)
        print(
            f"| {n} | {r['full_render']:.1f} | {r['render']:.2f} | {r['set_snapshot']:.2f} | {r['push']:.2f} | "
            f"{r['ack']:.2f} | {r['total']:.2f} | {int(r['bytes'])} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
