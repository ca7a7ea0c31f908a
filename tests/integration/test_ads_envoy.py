"""The ADS server against a real Envoy, over both state-of-the-world and delta xDS.

Each test starts our grpc.aio AdsServer on 127.0.0.1, one real Envoy (deploy/envoy
bootstraps), and real HTTP upstreams, then checks what Envoy does: it ACKs, serves, moves
to a new version without failing a request, keeps serving while the control plane is away
and is not re-sent what it has, and NACKs a config it rejects.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import pytest
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.type.matcher.v3 import regex_pb2
from graylane.controlplane.local.envoy import DELTA, SOTW, EnvoyProcess, free_port
from graylane.xds import view as xv
from graylane.xds.cache import SnapshotCache
from graylane.xds.render import render
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, Resources
from graylane.xds.server import AdsServer
from graylane.xds.tracker import ProxyStatus, ProxyTracker, Push

if TYPE_CHECKING:
    from tests.integration.conftest import HttpGet, MakeUpstream, StartEnvoy, Upstream

pytestmark = pytest.mark.envoy

SERVICE = "a"
V1 = xv.cluster_name(SERVICE, "v1")
V2 = xv.cluster_name(SERVICE, "v2")
V2_GRAY = xv.cluster_name(SERVICE, "v2", "gray")  # the lane's own cluster for v2
DEADLINE = 10.0


@dataclass
class Ads:
    """One control-plane replica: cache, tracker and grpc.aio server on a fixed port."""

    view: xv.RoutingView
    port: int = field(default_factory=free_port)
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    tracker: ProxyTracker = field(default_factory=ProxyTracker)
    _server: grpc.aio.Server | None = None

    def __post_init__(self) -> None:
        # Render on demand for each proxy's key (its listen_port), as the control plane will.
        self.cache.on_key_requested(lambda key: self.cache.set_snapshot(key, self.render(key)))

    def render(self, key: str) -> Resources:
        return render(self.view, listen_port=int(key))

    def apply(self, view: xv.RoutingView) -> None:
        self.view = view
        for key in self.cache.requested_keys():
            self.cache.set_snapshot(key, self.render(key))

    async def start(self) -> None:
        self._server = grpc.aio.server()
        AdsServer(self.cache, tracker=self.tracker).add_to_server(self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    async def wait_for(
        self, node_id: str, predicate: Callable[[ProxyStatus], bool], timeout: float = DEADLINE
    ) -> ProxyStatus:
        seq = 0
        async with asyncio.timeout(timeout):
            while True:
                status = self.by_node(node_id)
                if status is not None and predicate(status):
                    return status
                seq = await self.tracker.wait_for_change(seq)

    def by_node(self, node_id: str) -> ProxyStatus | None:
        """The open stream of `node_id` (the tracker is keyed by stream)."""
        return next(iter(self.tracker.of_node(node_id)), None)

    async def converged(self, envoy: EnvoyProcess) -> ProxyStatus:
        """Wait until the proxy ACKed, resource by resource, the whole current snapshot."""
        target = self.cache.snapshot(str(envoy.listen_port))
        assert target is not None

        def acked_all(status: ProxyStatus) -> bool:
            return all(t in status.acked and status.acked[t].resources == dict(target[t].versions) for t in PUSH_ORDER)

        return await self.wait_for(envoy.node_id, acked_all)


def view_of(
    upstreams: dict[str, list[Upstream]], *, base: str = "v1", gray: str | None = None, weight: int = 0
) -> xv.RoutingView:
    endpoints = tuple(
        xv.VersionEndpoints(SERVICE, version, tuple(xv.Endpoint("127.0.0.1", u.port) for u in ups))
        for version, ups in sorted(upstreams.items())
    )
    lanes = (xv.Lane("gray", SERVICE, weight, ((SERVICE, gray),)),) if gray else ()
    return xv.RoutingView(services=(xv.ServiceRoute(SERVICE, base),), endpoints=endpoints, lanes=lanes)


@pytest.fixture
async def v1(upstream: MakeUpstream) -> Upstream:
    return await upstream(SERVICE, "v1")


@pytest.fixture
async def ads(v1: Upstream) -> AsyncIterator[Ads]:
    replica = Ads(view_of({"v1": [v1]}))
    await replica.start()
    yield replica
    await replica.stop()


@pytest.fixture(params=[SOTW, DELTA])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start_envoy(envoy: StartEnvoy, ads: Ads, protocol: str) -> EnvoyProcess:
    proxy = await envoy(ads_port=ads.port, protocol=protocol, node_id=f"envoy-{protocol}")
    await ads.converged(proxy)
    return proxy


async def served_version(http_get: HttpGet, proxy: EnvoyProcess) -> str:
    result = await http_get(proxy.listen_port, SERVICE)
    assert result.status == 200, result
    return str(result.json()["version"])


@dataclass
class Load:
    """A bounded concurrent request loop through Envoy: counts versions and failures."""

    versions: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _answered: asyncio.Event = field(default_factory=asyncio.Event)  # set after each request

    async def run(
        self, http_get: HttpGet, port: int, *, workers: int = 4, max_requests: int = 4000, timeout: float = 20.0
    ) -> None:
        budget = iter(range(max_requests))

        async def worker() -> None:
            while not self.stop.is_set() and next(budget, None) is not None:
                try:
                    result = await http_get(port, SERVICE, timeout=2.0)
                except (OSError, TimeoutError) as exc:
                    self.failures.append(repr(exc))
                else:
                    if result.status != 200:
                        self.failures.append(f"{result.status} {result.body!r}")
                    else:
                        self.versions[result.json()["version"]] += 1
                self._answered.set()

        async with asyncio.timeout(timeout):
            await asyncio.gather(*(worker() for _ in range(workers)))

    async def until(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._answered.clear()
                await self._answered.wait()


def index_of(pushes: tuple[Push, ...], start: int, match: Callable[[Push], bool]) -> int:
    for i in range(start, len(pushes)):
        if match(pushes[i]):
            return i
    raise AssertionError(f"no matching push after {start}: {pushes[start:]}")


# --------------------------------------------------------------------------------- tests


async def test_envoy_connects_acks_every_type_and_serves(
    ads: Ads, envoy: StartEnvoy, http_get: HttpGet, protocol: str
) -> None:
    proxy = await start_envoy(envoy, ads, protocol)
    status = ads.by_node(proxy.node_id)
    assert status is not None and status.connected and status.protocol == protocol
    assert status.key == str(proxy.listen_port)
    assert status.metadata == {
        "listen_port": str(proxy.listen_port),
        "admin_address": f"127.0.0.1:{proxy.admin_port}",
    }
    assert set(status.acked) == set(PUSH_ORDER)
    assert status.last_nack is None
    assert await served_version(http_get, proxy) == "v1"


async def test_new_version_and_removal_fail_no_request(
    ads: Ads,
    envoy: StartEnvoy,
    http_get: HttpGet,
    upstream: MakeUpstream,
    v1: Upstream,
    protocol: str,
) -> None:
    proxy = await start_envoy(envoy, ads, protocol)
    v2 = await upstream(SERVICE, "v2")
    both = {"v1": [v1], "v2": [v2]}
    load = Load()
    runner = asyncio.create_task(load.run(http_get, proxy.listen_port))
    try:
        await load.until(lambda: load.versions["v1"] >= 20)
        # A new cluster together with a route to it (all untagged traffic to the lane).
        before = len(ads.by_node(proxy.node_id).pushes)  # type: ignore[union-attr]
        ads.apply(view_of(both, gray="v2", weight=100))
        await ads.converged(proxy)
        await load.until(lambda: load.versions["v2"] >= 20)
        # Then the old version goes: the route moves to v2 before cluster v1 is removed.
        middle = len(ads.by_node(proxy.node_id).pushes)  # type: ignore[union-attr]
        ads.apply(view_of({"v2": [v2]}, base="v2"))
        status = await ads.converged(proxy)
        settled = sum(load.versions.values())
        await load.until(lambda: sum(load.versions.values()) >= settled + 40)
    finally:
        load.stop.set()
        await runner
    assert load.failures == []
    assert V1 not in status.acked[CLUSTER].resources

    pushes = status.pushes
    cds = index_of(pushes, before, lambda p: p.type_url == CLUSTER and V2_GRAY in p.resources)
    eds = index_of(pushes, before, lambda p: p.type_url == ENDPOINT and V2_GRAY in p.resources)
    rds = index_of(pushes, before, lambda p: p.type_url == ROUTE)
    assert cds < eds < rds  # make before ...
    rds = index_of(pushes, middle, lambda p: p.type_url == ROUTE)
    gone = index_of(
        pushes,
        middle,
        lambda p: p.type_url == CLUSTER and (V1 in p.removed or (protocol == SOTW and V1 not in p.resources)),
    )
    assert rds < gone  # ... break


async def test_delta_sends_only_the_changed_resources(
    ads: Ads, envoy: StartEnvoy, http_get: HttpGet, upstream: MakeUpstream, v1: Upstream
) -> None:
    proxy = await start_envoy(envoy, ads, DELTA)
    before = len(ads.by_node(proxy.node_id).pushes)  # type: ignore[union-attr]
    second_v1 = await upstream(SERVICE, "v1")
    ads.apply(view_of({"v1": [v1, second_v1]}))  # one more endpoint: only EDS a|v1 changes
    status = await ads.converged(proxy)
    assert [(p.type_url, p.resources, p.removed) for p in status.pushes[before:]] == [(ENDPOINT, (V1,), ())]
    async with asyncio.timeout(DEADLINE):
        while second_v1.requests == 0:  # round robin reaches the new endpoint
            assert await served_version(http_get, proxy) == "v1"


async def test_ads_restart_keeps_serving_and_resends_nothing(
    ads: Ads, envoy: StartEnvoy, http_get: HttpGet, protocol: str
) -> None:
    proxy = await start_envoy(envoy, ads, protocol)
    await ads.stop()
    seq = 0
    async with asyncio.timeout(DEADLINE):  # the stream ended: the proxy is gone from the tracker
        while ads.by_node(proxy.node_id) is not None:
            seq = await ads.tracker.wait_for_change(seq)
    for _ in range(5):  # the control plane is away: Envoy serves its last config
        assert await served_version(http_get, proxy) == "v1"

    # Another replica (empty history, fresh tracker) on the same address, same content.
    replica = Ads(ads.view, port=ads.port)
    key = str(proxy.listen_port)
    replica.cache.set_snapshot(key, replica.render(key))
    await replica.start()
    try:
        status = await replica.converged(proxy)
        assert status.connected
        assert status.pushes == ()  # Envoy presented what it has: nothing is re-sent
        assert await served_version(http_get, proxy) == "v1"
    finally:
        await replica.stop()


def with_oversized_regex(resources: Resources) -> Resources:
    """The same snapshot, plus a route whose RE2 program (404) exceeds Envoy's limit (100)."""
    rc = route_pb2.RouteConfiguration()
    rc.CopyFrom(resources[ROUTE].items[xv.route_config_name(SERVICE)])
    bad = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(
            prefix="/",
            headers=[
                route_components_pb2.HeaderMatcher(
                    name="x-too-big",
                    string_match={"safe_regex": regex_pb2.RegexMatcher(regex="(?:abcdefgh){50}")},
                )
            ],
        ),
        route=route_components_pb2.RouteAction(cluster=V1),
    )
    rc.virtual_hosts[0].routes.insert(0, bad)
    items = {t: dict(resources[t].items) for t in PUSH_ORDER}
    items[ROUTE][xv.route_config_name(SERVICE)] = rc
    return Resources.of(items)


async def test_a_rejected_config_is_recorded_as_a_nack(
    ads: Ads, envoy: StartEnvoy, http_get: HttpGet, protocol: str
) -> None:
    proxy = await start_envoy(envoy, ads, protocol)
    key = str(proxy.listen_port)
    good = ads.cache.snapshot(key)
    assert good is not None
    ads.cache.set_snapshot(key, with_oversized_regex(good))
    status = await ads.wait_for(proxy.node_id, lambda s: s.last_nack is not None)
    nack = status.last_nack
    assert nack is not None and nack.type_url == ROUTE
    assert "program size" in nack.message, nack.message
    assert status.node_id == proxy.node_id
    # Envoy keeps the config it had; the tracker still shows the good route as ACKed.
    assert status.acked[ROUTE].resources == dict(good[ROUTE].versions)
    assert status.acked[LISTENER].resources == dict(good[LISTENER].versions)
    assert await served_version(http_get, proxy) == "v1"


# ------------------------------------------------------------- routes split per service


def services_view(upstreams: dict[str, Upstream], *, weight: int = 0, gray: Upstream | None = None) -> xv.RoutingView:
    """One base version per service; with `gray`, a lane at service a (a's v2) at `weight`."""
    endpoints = [
        xv.VersionEndpoints(name, "v1", (xv.Endpoint("127.0.0.1", u.port),)) for name, u in sorted(upstreams.items())
    ]
    lanes: tuple[xv.Lane, ...] = ()
    if gray is not None:
        endpoints.append(xv.VersionEndpoints(SERVICE, "v2", (xv.Endpoint("127.0.0.1", gray.port),)))
        lanes = (xv.Lane("gray", SERVICE, weight, ((SERVICE, "v2"),)),)
    return xv.RoutingView(
        services=tuple(xv.ServiceRoute(name, "v1") for name in sorted(upstreams)),
        endpoints=tuple(endpoints),
        lanes=lanes,
    )


async def test_a_weight_change_sends_exactly_one_route_config(
    ads: Ads, envoy: StartEnvoy, http_get: HttpGet, upstream: MakeUpstream, v1: Upstream, protocol: str
) -> None:
    ups = {SERVICE: v1, **{name: await upstream(name, "v1") for name in ("b", "c", "d")}}
    gray = await upstream(SERVICE, "v2")
    ads.apply(services_view(ups, weight=10, gray=gray))
    proxy = await start_envoy(envoy, ads, protocol)
    before = len(ads.by_node(proxy.node_id).pushes)  # type: ignore[union-attr]

    ads.apply(services_view(ups, weight=20, gray=gray))
    status = await ads.converged(proxy)
    changes = [(p.type_url, p.resources, p.removed) for p in status.pushes[before:]]
    assert changes == [(ROUTE, (xv.route_config_name(SERVICE),), ())]
    # The other services' route configs, absent from that response, are still served: a
    # SotW RDS response without a subscribed route config leaves it as it is.
    for name in ("b", "c", "d"):
        result = await http_get(proxy.listen_port, name)
        assert result.status == 200 and result.json()["service"] == name, result
    status, body = await proxy.admin_get("/config_dump?resource=dynamic_route_configs")
    assert status == 200
    held = sorted(c["route_config"]["name"] for c in json.loads(body)["configs"])
    assert held == [xv.route_config_name(n) for n in sorted(ups)]
    assert await ads.wait_for(proxy.node_id, lambda s: s.last_nack is None)


async def test_services_added_and_removed_fail_no_request_to_the_others(
    ads: Ads, envoy: StartEnvoy, http_get: HttpGet, upstream: MakeUpstream, v1: Upstream, protocol: str
) -> None:
    ups = {SERVICE: v1, "b": await upstream("b", "v1"), "c": await upstream("c", "v1")}
    ads.apply(services_view(ups))
    proxy = await start_envoy(envoy, ads, protocol)
    failures: list[str] = []
    answered: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def load(name: str) -> None:
        for _ in range(3000):  # bounded in count (and by the test's deadlines in time)
            if stop.is_set():
                return
            try:
                result = await http_get(proxy.listen_port, name, timeout=2.0)
            except (OSError, TimeoutError) as exc:
                failures.append(f"{name}: {exc!r}")
                continue
            if result.status != 200 or result.json()["service"] != name:
                failures.append(f"{name}: {result.status} {result.body[:100]!r}")
            answered[name] += 1

    async def until(predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not predicate():
                await asyncio.sleep(0.01)

    workers = [asyncio.create_task(load(name)) for name in (SERVICE, "b") for _ in range(2)]
    try:
        await until(lambda: min(answered[SERVICE], answered["b"]) >= 20)
        # d comes, c goes, in one change.
        ups["d"] = await upstream("d", "v1")
        del ups["c"]
        ads.apply(services_view(ups))
        status = await ads.converged(proxy)
        mark = answered.copy()
        await until(lambda: all(answered[n] >= mark[n] + 20 for n in (SERVICE, "b")))
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert (await http_get(proxy.listen_port, "d")).json()["service"] == "d"
    assert (await http_get(proxy.listen_port, "c")).status == 404  # its scope is gone
    assert "c|v1" not in status.acked[CLUSTER].resources
    assert sorted(status.acked[ROUTE].resources) == [xv.route_config_name(n) for n in (SERVICE, "b", "d")]
