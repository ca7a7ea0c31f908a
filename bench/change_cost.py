"""The control-plane cost of one release's change, stage by stage, at 1,000 and 10,000 services.

`.venv/bin/python -P bench/change_cost.py [--services 1000 10000] [--reps 7] [--change new-lane] [--xds DIR]
[--streams K]`

For a view of n services and n/10 live lanes (`make_view`, section 1 of bench/run.py), one
lane's weight changes (or, with `--change new-lane`, a release starts: a new version with
endpoints and a lane entering at it), and this measures (median over reps, ms):

* render: `Renderer.render` (incremental, from the previous view) where `graylane.xds.render`
  has one, else the pure `render` (what the control plane ran before);
* set_snapshot: `SnapshotCache.set_snapshot` of the new render over the previous one;
* push: one SotW and one delta stream that hold (ACKed) exactly the previous render, through
  the real ADS server's stream objects: plan + selections + the response bodies;
* ack: the same streams handling the ACK of those responses (and re-planning); the requests
  are parsed from their bytes first, as the server's streams get them (not counted);
* with `--streams K` (K > 1), K streams per protocol in one state: the push + ACK of each
  stream after the first of its protocol (µs, median), i.e. what one more proxy costs;
  with `--reconnected` those streams open as proxies reconnecting with the versions they
  hold (a replica restarted), and "reconnect ms" is what opening one cost.

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

from xds_swap import use_xds  # noqa: E402

# `--xds DIR`: measure another revision's xds/ (`git archive <commit> xds | tar -x -C DIR/..`),
# before / after from one script. Read before anything imports graylane.xds.
if __name__ == "__main__" and "--xds" in sys.argv:
    use_xds(sys.argv[sys.argv.index("--xds") + 1])

from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from graylane.xds import render as xds_render  # noqa: E402
from graylane.xds import resources  # noqa: E402
from graylane.xds import server as xds_server  # noqa: E402
from graylane.xds import view as xv  # noqa: E402
from graylane.xds.cache import SnapshotCache  # noqa: E402
from graylane.xds.tracker import ProxyTracker  # noqa: E402

WILDCARD = xds_server.WILDCARD_TYPES


def make_view(n: int) -> xv.RoutingView:
    """n services on v1 (two endpoints each); every 10th also has a v2 and its own lane
    (entry = that service, header rule x-canary: always, weight 20)."""
    services = []
    endpoints = []
    lanes = []
    rule = xv.Rule((xv.Condition(xv.MatchKind.HEADER, "x-canary", xv.MatchOp.EXACT, "always"),))
    for i in range(n):
        name = f"svc-{i:04d}"
        services.append(xv.ServiceRoute(name=name, base_version="v1"))
        port = 20000 + (i % 20000)
        endpoints.append(
            xv.VersionEndpoints(name, "v1", (xv.Endpoint("127.0.0.1", port), xv.Endpoint("127.0.0.2", port)))
        )
        if i % 10 == 0:
            endpoints.append(xv.VersionEndpoints(name, "v2", (xv.Endpoint("127.0.0.3", port),)))
            lanes.append(xv.Lane(name=f"{name}-v2", entry=name, weight=20, versions=((name, "v2"),), rules=(rule,)))
    lanes.sort(key=lambda lane: lane.name)
    return xv.RoutingView(services=tuple(services), endpoints=tuple(endpoints), lanes=tuple(lanes))


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class _Streams:
    """SotW and delta streams (`per` of each), driven by hand (no grpc), in sync with the
    cache and sharing one `_Selections`, as a server's streams do."""

    def __init__(self, cache: SnapshotCache, per: int = 1) -> None:
        self.cache = cache
        self.tracker = ProxyTracker()
        selections = xds_server._Selections()
        sotw = [xds_server._SotwStream(cache, self.tracker, selections) for _ in range(per)]
        delta = [xds_server._DeltaStream(cache, self.tracker, selections) for _ in range(per)]
        # The first of each protocol pays what streams in one state share (plan, selections,
        # bodies); the others pay what each stream costs on its own.
        self.streams: list[Any] = [sotw[0], delta[0], *sotw[1:], *delta[1:]]
        self.sotw, self.delta = sotw[0], delta[0]
        for i, stream in enumerate(self.streams):
            stream.key = "default"
            stream.stream_id = f"bench-{stream.protocol}-{i}"

    def subscribe(self) -> None:
        target = self.cache.snapshot("default")
        assert target is not None
        for stream in self.streams:
            for t in resources.PUSH_ORDER:
                names = [] if t in WILDCARD else sorted(target[t].items)
                if stream.protocol == "sotw":
                    stream.handle(discovery_pb2.DiscoveryRequest(type_url=t, resource_names=names))
                else:
                    stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=t, resource_names_subscribe=names))

    def reconnect(self) -> float:
        """The streams after the first SotW / delta pair open as proxies reconnecting with
        what the first pair holds (SotW: each type's version_info; delta: the initial
        resource versions), as after a replica restart; the seconds that took, per stream."""
        spent = 0.0
        for stream in self.streams[2:]:
            peer = self.sotw if stream.protocol == "sotw" else self.delta
            requests: list[Any] = []
            for t in resources.PUSH_ORDER:
                st = peer.types[t]
                names = [] if st.wildcard else sorted(st.names)
                if stream.protocol == "sotw":
                    requests.append(
                        discovery_pb2.DiscoveryRequest(type_url=t, version_info=st.sotw_version, resource_names=names)
                    )
                else:
                    requests.append(
                        discovery_pb2.DeltaDiscoveryRequest(
                            type_url=t, resource_names_subscribe=names, initial_resource_versions=st.acked_versions
                        )
                    )
            spent += self.deliver(stream, requests)
        return spent / max(1, len(self.streams) - 2)

    def push(self) -> list[tuple[Any, list[bytes]]]:
        return [(stream, stream.push()) for stream in self.streams]

    def push_each(self) -> tuple[list[tuple[Any, list[bytes]]], list[float]]:
        """Each stream's push, and the seconds each took."""
        pushed, spent = [], []
        for stream in self.streams:
            t0 = time.perf_counter()
            bodies = stream.push()
            spent.append(time.perf_counter() - t0)
            pushed.append((stream, bodies))
        return pushed, spent

    @staticmethod
    def wanted(stream: Any, type_url: str) -> list[str]:
        """The EDS / RDS names a proxy asks for, as Envoy does: one per cluster it was sent,
        one per scope it was sent (the scope and its route config share the name)."""
        source = resources.CLUSTER if type_url == resources.ENDPOINT else resources.SCOPED_ROUTE
        return sorted(set(stream.types[source].sent) | stream.types[type_url].names)

    def ack(self, pushed: list[tuple[Any, list[bytes]]]) -> float:
        """ACK every response (and what the streams send after the ACKs); the seconds the
        streams spent handling them (building the requests is the proxy's work: not counted)."""
        return sum(self.ack_each(pushed))

    def ack_each(self, pushed: list[tuple[Any, list[bytes]]]) -> list[float]:
        """`ack`, the seconds per stream."""
        out = []
        for stream, bodies in pushed:
            requests: list[Any] = []
            sotw = stream.protocol == "sotw"
            for body in bodies:
                if sotw:
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
                if sotw:
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
            out.append(self.deliver(stream, requests))
        return out

    def deliver(self, stream: Any, requests: list[Any]) -> float:
        """`stream` handles `requests` and sends what follows them (make-before-break
        releases), which is ACKed in turn: the seconds the stream spent. The requests are
        parsed from their bytes first, as a server reads them (not counted either)."""
        requests = [type(request).FromString(request.SerializeToString()) for request in requests]
        t0 = time.perf_counter()
        for request in requests:
            stream.handle(request)
        more = stream.push()
        spent = time.perf_counter() - t0
        return spent + self.ack([(stream, more)]) if more else spent


def bump(view: xv.RoutingView, step: int) -> xv.RoutingView:
    """`view` with one lane's weight changed (every other object shared)."""
    lanes = list(view.lanes)
    lanes[0] = dataclasses.replace(lanes[0], weight=(lanes[0].weight + step) % 90 + 1)
    return dataclasses.replace(view, lanes=tuple(lanes))


def add_lane(view: xv.RoutingView, step: int) -> xv.RoutingView:
    """`view` with a new release: a new version (endpoints: new clusters) of one service that
    has no lane yet, and a lane entering there at 10 % (routes wait for the new clusters)."""
    service = view.services[(step * 10 + 1) % len(view.services)].name
    version = f"v9-{step}"
    endpoints = (*view.endpoints, xv.VersionEndpoints(service, version, (xv.Endpoint("127.0.0.9", 9000 + step),)))
    lane = xv.Lane(name=f"{service}-{version}", entry=service, weight=10, versions=((service, version),))
    lanes = tuple(sorted((*view.lanes, lane), key=lambda item: item.name))
    return dataclasses.replace(view, endpoints=endpoints, lanes=lanes)


CHANGES: dict[str, Callable[[xv.RoutingView, int], xv.RoutingView]] = {"weight": bump, "new-lane": add_lane}


def measure(
    n: int,
    reps: int,
    *,
    full_reps: int | None = None,
    change: str = "weight",
    streams_per: int = 1,
    reconnected: bool = False,
) -> dict[str, float]:
    """Stage medians (ms) for one change (CHANGES) at n services; `full_reps` full renders
    too (default reps // 2; 0: none). With `streams_per` > 1, also the push + ACK of each
    further SotW / delta stream in the same state (µs, median): what each stream costs on
    its own, once the first of its state paid for what they share. `reconnected`: those
    further streams open as reconnecting proxies (`_Streams.reconnect`; "reconnect" is the
    ms each took)."""
    view = make_view(n)
    try:
        from graylane.xds.renderer import Renderer
    except ImportError:  # a revision before the incremental renderer
        Renderer = None  # type: ignore[assignment,misc]  # noqa: N806
    if Renderer is not None:
        renderer = Renderer(listen_port=10000)
        do_render: Callable[[xv.RoutingView], resources.Resources] = renderer.render
    else:

        def do_render(v: xv.RoutingView) -> resources.Resources:
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
    streams = _Streams(cache, per=streams_per)
    reconnect_s = 0.0
    if reconnected:
        streams.streams[2:], later = [], streams.streams[2:]
        streams.subscribe()
        streams.ack(streams.push())
        streams.streams[2:] = later
        reconnect_s = streams.reconnect()
    else:
        streams.subscribe()
        streams.ack(streams.push())
    stages: dict[str, list[float]] = {"render": [], "set_snapshot": [], "push": [], "ack": []}
    extra: dict[str, list[float]] = {"sotw": [], "delta": []}
    for step in range(1, reps + 1):
        view = CHANGES[change](view, step)
        gc.collect()
        t0 = time.perf_counter()
        target = do_render(view)
        stages["render"].append(_ms(t0))
        t0 = time.perf_counter()
        cache.set_snapshot("default", target)
        stages["set_snapshot"].append(_ms(t0))
        pushed, push_spent = streams.push_each()
        sizes = [len(b) for _, bodies in pushed[:2] for b in bodies]
        ack_spent = streams.ack_each(pushed)
        # The first SotW and delta streams (shared work included), as before.
        stages["push"].append(sum(push_spent[:2]) * 1000)
        stages["ack"].append(sum(ack_spent[:2]) * 1000)
        for i, (stream, _) in enumerate(pushed[2:], start=2):
            extra[stream.protocol].append((push_spent[i] + ack_spent[i]) * 1e6)
    out = {k: statistics.median(v) for k, v in stages.items()}
    out["full_render"] = statistics.median(full) if full else float("nan")
    out["total"] = out["render"] + out["set_snapshot"] + out["push"] + out["ack"]
    out["bytes"] = float(sum(sizes))
    for protocol, values in extra.items():
        out[f"extra_{protocol}"] = statistics.median(values) if values else float("nan")
    if reconnected:
        out["reconnect"] = reconnect_s * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--change", choices=sorted(CHANGES), default="weight")
    parser.add_argument("--xds", help="another revision's xds/ directory (see the module docstring)")
    parser.add_argument(
        "--streams", type=int, default=1, help="streams per protocol (> 1: the cost of each further stream too)"
    )
    parser.add_argument(
        "--reconnected", action="store_true", help="the further streams reconnect presenting their versions"
    )
    args = parser.parse_args()
    per = args.streams > 1
    head = "| services | full render ms | render ms | set_snapshot ms | push ms | ack ms | total ms | bytes |"
    head += (" +SotW stream µs | +delta stream µs |" if per else "") + (" reconnect ms |" if args.reconnected else "")
    print(head)
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if per else "") + ("---|" if args.reconnected else ""))
    for n in args.services:
        r = measure(n, args.reps, change=args.change, streams_per=args.streams, reconnected=args.reconnected)
        row = (
            f"| {n} | {r['full_render']:.1f} | {r['render']:.2f} | {r['set_snapshot']:.2f} | {r['push']:.2f} | "
            f"{r['ack']:.2f} | {r['total']:.2f} | {int(r['bytes'])} |"
        )
        if per:
            row += f" {r['extra_sotw']:.0f} | {r['extra_delta']:.0f} |"
        if args.reconnected:
            row += f" {r['reconnect']:.1f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
