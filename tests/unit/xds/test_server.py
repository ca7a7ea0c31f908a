"""ADS protocol edge cases: the real AdsServer over a real grpc.aio channel on 127.0.0.1.

The client side is hand-built DiscoveryRequests (no Envoy, no mocks): stale nonces,
NACKs, no resend of an unchanged version, reconnects that present their versions, and
delta removed_resources. Envoy itself is exercised in tests/integration/test_ads_envoy.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from graylane.xds.cache import DEFAULT_KEY, SnapshotCache
from graylane.xds.render import render
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, MESSAGE_TYPES, ROUTE, SCOPED_ROUTE, Resources
from graylane.xds.server import Admitted, AdsServer, ProxyRefused, _DeltaStream, _Inbox, _SendSlots, _SotwStream
from graylane.xds.tracker import ProxyStatus, ProxyTracker
from graylane.xds.view import Endpoint, Lane, RoutingView, ServiceRoute, VersionEndpoints

NODE = base_pb2.Node(id="proxy-1", cluster="test")
TIMEOUT = 5.0


def view(*, gray: bool = False, second_service: bool = False) -> RoutingView:
    services = [ServiceRoute("a", "v1")]
    endpoints = [
        VersionEndpoints("a", "v1", (Endpoint("127.0.0.1", 1001),)),
        VersionEndpoints("a", "v2", (Endpoint("127.0.0.1", 1002),)),
    ]
    if second_service:
        services.append(ServiceRoute("b", "v1"))
        endpoints.append(VersionEndpoints("b", "v1", (Endpoint("127.0.0.1", 1003),)))
    lanes = (Lane("g", "a", 10, (("a", "v2"),)),) if gray else ()
    return RoutingView(services=tuple(services), endpoints=tuple(endpoints), lanes=lanes)


def snapshot(**kwargs: bool) -> Resources:
    return render(view(**kwargs), listen_port=10000)


@dataclass
class Ads:
    cache: SnapshotCache
    tracker: ProxyTracker
    stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub
    server: AdsServer

    def status(self) -> ProxyStatus:
        status = self.find()
        assert status is not None
        return status

    def find(self, node_id: str = NODE.id) -> ProxyStatus | None:
        """The one open stream of `node_id` (None if it has none)."""
        found = [p for p in self.tracker.proxies().values() if p.node_id == node_id]
        assert len(found) <= 1, found
        return found[0] if found else None


@pytest.fixture
async def ads() -> AsyncIterator[Ads]:
    cache = SnapshotCache()
    cache.set_snapshot(DEFAULT_KEY, snapshot())
    server = grpc.aio.server()
    ads_server = AdsServer(cache)
    ads_server.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Ads(cache, ads_server.tracker, ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), ads_server)
    await server.stop(grace=None)


_Request = TypeVar("_Request", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)


def _from_node_or_nack(request: _Request, node: bool, error: str | None) -> _Request:
    """`request` carrying NODE (a stream's first request) and, given `error`, as a NACK."""
    if node:
        request.node.CopyFrom(NODE)
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def sotw(
    type_url: str,
    names: tuple[str, ...] = (),
    *,
    version: str = "",
    nonce: str = "",
    error: str | None = None,
    node: bool = False,
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
    )
    return _from_node_or_nack(request, node, error)


async def read(call: grpc.aio.StreamStreamCall) -> discovery_pb2.DiscoveryResponse:  # type: ignore[type-arg]
    async with asyncio.timeout(TIMEOUT):
        response = await call.read()
    assert response is not grpc.aio.EOF
    return response  # type: ignore[no-any-return]


async def test_sotw_ack_is_recorded_and_an_unchanged_version_is_not_resent(ads: Ads) -> None:
    call = ads.stub.StreamAggregatedResources()
    await call.write(sotw(CLUSTER, node=True))
    cds = await read(call)
    assert cds.type_url == CLUSTER and cds.version_info and cds.nonce
    await call.write(sotw(CLUSTER, version=cds.version_info, nonce=cds.nonce))
    # The next response must be EDS, not a repeat of CDS (nothing changed for CDS).
    await call.write(sotw(ENDPOINT, ("a|v1",), node=False))
    eds = await read(call)
    assert eds.type_url == ENDPOINT
    assert ads.status().acked[CLUSTER].version == cds.version_info
    assert ads.status().connected
    call.cancel()


async def test_close_ends_every_stream_and_any_opened_after_it(ads: Ads) -> None:
    """A closing server ends its streams itself: the proxies reconnect (elsewhere) at once
    instead of waiting out the gRPC server's grace period."""
    sotw_call = ads.stub.StreamAggregatedResources()
    await sotw_call.write(sotw(CLUSTER, node=True))
    await read(sotw_call)
    delta_call = ads.stub.DeltaAggregatedResources()
    await delta_call.write(discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=CLUSTER))
    async with asyncio.timeout(TIMEOUT):
        assert (await delta_call.read()) is not grpc.aio.EOF
    ads.server.close()
    async with asyncio.timeout(TIMEOUT):
        assert await sotw_call.read() is grpc.aio.EOF
        assert await delta_call.read() is grpc.aio.EOF
        assert await sotw_call.code() == grpc.StatusCode.OK
        late = ads.stub.StreamAggregatedResources()
        await late.write(sotw(CLUSTER, node=True))
        assert await late.read() is grpc.aio.EOF
    # Closing released every stream at once: no proxy is left behind.
    assert dict(ads.tracker.proxies()) == {} and ads.cache.requested_keys() == frozenset()


async def test_sotw_stale_nonce_is_ignored_and_nack_is_recorded(ads: Ads) -> None:
    call = ads.stub.StreamAggregatedResources()
    await call.write(sotw(CLUSTER, node=True))
    first = await read(call)
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(second_service=True))
    second = await read(call)
    assert second.type_url == CLUSTER and second.nonce != first.nonce
    # A NACK of the first response is stale (its nonce is not the latest): ignored.
    await call.write(sotw(CLUSTER, nonce=first.nonce, error="old news"))
    # A NACK of the latest response is recorded, with Envoy's message.
    await call.write(sotw(CLUSTER, nonce=second.nonce, error="bad cluster"))
    status = await wait_for(ads, lambda s: s.last_nack is not None)
    assert status.last_nack is not None
    assert status.last_nack.message == "bad cluster"
    assert status.last_nack.version == second.version_info
    assert status.last_nack.nonce == second.nonce
    assert CLUSTER not in status.acked  # nothing was ever ACKed
    # The NACKed version is not pushed again: the next response is the EDS asked for.
    await call.write(sotw(ENDPOINT, ("a|v1",)))
    assert (await read(call)).type_url == ENDPOINT
    call.cancel()


async def test_sotw_reconnect_presenting_current_versions_is_not_resent(ads: Ads) -> None:
    call = ads.stub.StreamAggregatedResources()
    await call.write(sotw(CLUSTER, node=True))
    cds = await read(call)
    await call.write(sotw(CLUSTER, version=cds.version_info, nonce=cds.nonce))
    await call.write(sotw(ENDPOINT, ("a|v1",)))
    eds = await read(call)
    call.cancel()

    # A new stream presenting what it holds (versions are content hashes, so this works
    # on another replica too: see tests/integration/test_ads_envoy.py).
    call = ads.stub.StreamAggregatedResources()
    await call.write(sotw(CLUSTER, version=cds.version_info, node=True))
    await call.write(sotw(ENDPOINT, ("a|v1",), version=eds.version_info))
    await call.write(sotw(LISTENER))
    # CDS and EDS are known: the first response is LDS (released: CDS+EDS are ACKed).
    lds = await read(call)
    assert lds.type_url == LISTENER
    call.cancel()


async def test_scopes_and_routes_wait_for_cluster_and_endpoint_acks(ads: Ads) -> None:
    call = ads.stub.StreamAggregatedResources()
    await call.write(sotw(CLUSTER, node=True))
    cds = await read(call)
    assert cds.type_url == CLUSTER
    await call.write(sotw(LISTENER))
    lds = await read(call)
    assert lds.type_url == LISTENER  # names no route config: it warms on its scopes
    await call.write(sotw(LISTENER, version=lds.version_info, nonce=lds.nonce))
    await call.write(sotw(SCOPED_ROUTE))  # wildcard, as Envoy asks
    await call.write(sotw(CLUSTER, version=cds.version_info, nonce=cds.nonce))
    await call.write(sotw(ENDPOINT, ("a|v1",)))
    eds = await read(call)
    assert eds.type_url == ENDPOINT  # no scope yet: its routes would use unACKed clusters
    await call.write(sotw(ENDPOINT, ("a|v1",), version=eds.version_info, nonce=eds.nonce))
    srds = await read(call)
    assert srds.type_url == SCOPED_ROUTE and len(srds.resources) == 1
    await call.write(sotw(SCOPED_ROUTE, version=srds.version_info, nonce=srds.nonce))
    await call.write(sotw(ROUTE, ("graylane/a",)))
    rds = await read(call)
    assert rds.type_url == ROUTE and len(rds.resources) == 1
    call.cancel()


async def configure_sotw(
    ads: Ads,
    call: grpc.aio.StreamStreamCall,  # type: ignore[type-arg]
) -> dict[str, discovery_pb2.DiscoveryResponse]:
    """Subscribe the way Envoy does (CDS -> EDS names, LDS -> SRDS -> RDS names), ACK all."""
    latest: dict[str, discovery_pb2.DiscoveryResponse] = {}

    async def step(type_url: str, names: tuple[str, ...] = (), node: bool = False) -> Any:
        await call.write(sotw(type_url, names, node=node))
        response = await read(call)
        assert response.type_url == type_url
        await call.write(sotw(type_url, names, version=response.version_info, nonce=response.nonce))
        latest[type_url] = response
        return [unpack(r) for r in response.resources]

    clusters = await step(CLUSTER, node=True)
    await step(ENDPOINT, tuple(sorted(c.name for c in clusters)))
    await step(LISTENER)
    scopes = await step(SCOPED_ROUTE)
    await step(ROUTE, tuple(sorted(s.route_configuration_name for s in scopes)))
    await wait_for(ads, lambda s: ROUTE in s.acked)
    return latest


def unpack(packed: Any) -> Any:
    message = MESSAGE_TYPES[packed.type_url]()
    packed.Unpack(message)
    return message


async def test_sotw_rds_sends_only_the_changed_route_config_versioned_as_the_whole_set(ads: Ads) -> None:
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(second_service=True))
    call = ads.stub.StreamAggregatedResources()
    first = await configure_sotw(ads, call)
    assert sorted(unpack(r).name for r in first[ROUTE].resources) == ["graylane/a", "graylane/b"]
    status = await wait_for(ads, lambda s: ROUTE in s.acked)
    target = ads.cache.snapshot(DEFAULT_KEY)
    assert target is not None and status.acked[ROUTE].version == target[ROUTE].version

    # A lane at a: a's routes change (after its new cluster warms); b's route config is not re-sent.
    ads.cache.set_snapshot(DEFAULT_KEY, gray := snapshot(gray=True, second_service=True))
    cds = await read(call)
    assert cds.type_url == CLUSTER
    await call.write(sotw(CLUSTER, version=cds.version_info, nonce=cds.nonce))
    names = ("a|v1", "a|v2|g", "b|v1")
    await call.write(sotw(ENDPOINT, names, version=first[ENDPOINT].version_info, nonce=first[ENDPOINT].nonce))
    eds = await read(call)
    assert eds.type_url == ENDPOINT
    assert [unpack(r).cluster_name for r in eds.resources] == ["a|v2|g"]  # only the new one
    await call.write(sotw(ENDPOINT, names, version=eds.version_info, nonce=eds.nonce))
    rds = await read(call)
    assert rds.type_url == ROUTE
    assert [unpack(r).name for r in rds.resources] == ["graylane/a"]
    assert rds.version_info == gray[ROUTE].version  # the version of the whole selection
    await call.write(sotw(ROUTE, ("graylane/a", "graylane/b"), version=rds.version_info, nonce=rds.nonce))
    status = await wait_for(ads, lambda s: s.acked[ROUTE].version == gray[ROUTE].version)
    assert status.acked[ROUTE].resources == dict(gray[ROUTE].versions)
    call.cancel()


async def test_sotw_scopes_are_the_whole_set_and_a_shrunk_rds_subscription_moves_the_version(ads: Ads) -> None:
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(second_service=True))
    call = ads.stub.StreamAggregatedResources()
    first = await configure_sotw(ads, call)

    assert first[ROUTE].version_info == ads.status().acked[ROUTE].version
    ads.cache.set_snapshot(DEFAULT_KEY, one := snapshot())  # b goes away
    srds = await read(call)
    assert srds.type_url == SCOPED_ROUTE
    assert [unpack(r).name for r in srds.resources] == ["graylane/a"]  # the whole set, without b
    # The RDS selection lost b: a response with nothing to carry moves the version.
    rds = await read(call)
    assert rds.type_url == ROUTE and list(rds.resources) == []
    assert rds.version_info == one[ROUTE].version
    await call.write(sotw(SCOPED_ROUTE, version=srds.version_info, nonce=srds.nonce))
    # Envoy drops b's scope and with it its RDS subscription (and ACKs).
    await call.write(sotw(ROUTE, ("graylane/a",), version=rds.version_info, nonce=rds.nonce))
    status = await wait_for(ads, lambda s: s.acked[ROUTE].version == one[ROUTE].version)
    assert status.acked[ROUTE].resources == dict(one[ROUTE].versions)
    # With b's routes gone from the proxy, b's cluster goes too.
    cds = await read(call)
    assert cds.type_url == CLUSTER and [unpack(r).name for r in cds.resources] == ["a|v1"]
    call.cancel()


async def test_sotw_a_route_config_whose_response_was_nacked_is_sent_again_with_the_next_change(ads: Ads) -> None:
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(second_service=True))
    call = ads.stub.StreamAggregatedResources()
    first = await configure_sotw(ads, call)
    names = ("graylane/a", "graylane/b")

    # b's endpoints move (EDS only) and a gets a lane: a's route config is NACKed.
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(gray=True, second_service=True))
    cds = await read(call)
    await call.write(sotw(CLUSTER, version=cds.version_info, nonce=cds.nonce))
    eds_names = ("a|v1", "a|v2|g", "b|v1")
    await call.write(sotw(ENDPOINT, eds_names, version=first[ENDPOINT].version_info, nonce=first[ENDPOINT].nonce))
    eds = await read(call)
    await call.write(sotw(ENDPOINT, eds_names, version=eds.version_info, nonce=eds.nonce))
    rds = await read(call)
    assert [unpack(r).name for r in rds.resources] == ["graylane/a"]
    # Before the NACK arrives, the lane goes away again and b changes: the next response
    # must carry a's route config again (the proxy may hold neither version the server sent).
    ads.cache.set_snapshot(DEFAULT_KEY, third := snapshot(second_service=True))
    again = await read(call)
    assert again.type_url == ROUTE
    assert [unpack(r).name for r in again.resources] == ["graylane/a"]
    await call.write(sotw(ROUTE, names, version=first[ROUTE].version_info, nonce=rds.nonce, error="bad a"))  # stale
    await call.write(sotw(ROUTE, names, version=again.version_info, nonce=again.nonce))
    status = await wait_for(ads, lambda s: s.acked[ROUTE].version == third[ROUTE].version)
    assert status.last_nack is None  # the stale NACK was ignored; the ACK covers a as re-sent
    call.cancel()


async def test_delta_with_many_route_configs_sends_only_the_changed_one(ads: Ads) -> None:
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(second_service=True))
    call = ads.stub.DeltaAggregatedResources()
    await call.write(delta(CLUSTER, node=True))
    cds = await dread(call)
    await call.write(delta(CLUSTER, nonce=cds.nonce))
    await call.write(delta(ENDPOINT, ("a|v1", "b|v1")))
    eds = await dread(call)
    await call.write(delta(ENDPOINT, nonce=eds.nonce))
    await call.write(delta(SCOPED_ROUTE))  # legacy wildcard, as Envoy asks
    srds = await dread(call)
    assert srds.type_url == SCOPED_ROUTE and sorted(r.name for r in srds.resources) == ["graylane/a", "graylane/b"]
    await call.write(delta(SCOPED_ROUTE, nonce=srds.nonce))
    await call.write(delta(ROUTE, ("graylane/a", "graylane/b")))
    rds = await dread(call)
    assert sorted(r.name for r in rds.resources) == ["graylane/a", "graylane/b"]
    await call.write(delta(ROUTE, nonce=rds.nonce))
    await wait_for(ads, lambda s: ROUTE in s.acked)

    # A lane at a: only a's route config changes; b's is not re-sent.
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(gray=True, second_service=True))
    cds = await dread(call)
    await call.write(delta(CLUSTER, nonce=cds.nonce))
    await call.write(delta(ENDPOINT, ("a|v2|g",)))
    eds = await dread(call)
    await call.write(delta(ENDPOINT, nonce=eds.nonce))
    rds = await dread(call)
    assert rds.type_url == ROUTE
    assert [r.name for r in rds.resources] == ["graylane/a"] and list(rds.removed_resources) == []
    call.cancel()


def delta(
    type_url: str,
    subscribe: tuple[str, ...] = (),
    *,
    nonce: str = "",
    unsubscribe: tuple[str, ...] = (),
    initial: dict[str, str] | None = None,
    node: bool = False,
    error: str | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        initial_resource_versions=initial or {},
        response_nonce=nonce,
    )
    return _from_node_or_nack(request, node, error)


async def dread(call: grpc.aio.StreamStreamCall) -> discovery_pb2.DeltaDiscoveryResponse:  # type: ignore[type-arg]
    return await read(call)  # type: ignore[return-value]


async def test_delta_sends_only_changes_and_removed_names(ads: Ads) -> None:
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(second_service=True))
    call = ads.stub.DeltaAggregatedResources()
    await call.write(delta(CLUSTER, node=True))  # legacy wildcard
    first = await dread(call)
    assert sorted(r.name for r in first.resources) == ["a|v1", "b|v1"]
    assert all(r.version for r in first.resources)
    await call.write(delta(CLUSTER, nonce=first.nonce))
    await wait_for(ads, lambda s: CLUSTER in s.acked)

    # Service b goes away: nothing routes to it (no route ACKed), so it is removed at once.
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot())
    second = await dread(call)
    assert list(second.resources) == []
    assert list(second.removed_resources) == ["b|v1"]
    await call.write(delta(CLUSTER, nonce=second.nonce, error="no thanks"))
    status = await wait_for(ads, lambda s: s.last_nack is not None)
    assert status.last_nack is not None and status.last_nack.message == "no thanks"

    # A gray version appears: only the new cluster is sent, the lane's own cluster for it.
    ads.cache.set_snapshot(DEFAULT_KEY, snapshot(gray=True))
    third = await dread(call)
    assert [r.name for r in third.resources] == ["a|v2|g"]
    assert list(third.removed_resources) == []
    call.cancel()


async def test_delta_reconnect_with_initial_versions_gets_only_what_changed(ads: Ads) -> None:
    current = ads.cache.snapshot(DEFAULT_KEY)
    assert current is not None
    call = ads.stub.DeltaAggregatedResources()
    await call.write(delta(CLUSTER, node=True, initial=dict(current[CLUSTER].versions)))
    await call.write(delta(ENDPOINT, ("a|v1",), initial={"a|v1": "stale-version"}))
    response = await dread(call)
    # CDS is up to date (nothing sent); EDS's presented version differs: re-sent.
    assert response.type_url == ENDPOINT
    assert [r.name for r in response.resources] == ["a|v1"]
    status = ads.status()
    assert status.acked[CLUSTER].resources == dict(current[CLUSTER].versions)
    await call.write(delta(ENDPOINT, nonce=response.nonce))
    await call.write(delta(LISTENER))
    lds = await dread(call)
    assert lds.type_url == LISTENER  # released: CDS and EDS are ACKed
    # Unsubscribing forgets the resource: subscribing again sends it again.
    await call.write(delta(ENDPOINT, unsubscribe=("a|v1",)))
    await call.write(delta(ENDPOINT, ("a|v1",)))
    again = await dread(call)
    assert again.type_url == ENDPOINT
    assert [r.name for r in again.resources] == ["a|v1"]
    call.cancel()


async def wait_for(ads: Ads, predicate: Callable[[ProxyStatus], bool]) -> ProxyStatus:
    seq = 0
    async with asyncio.timeout(TIMEOUT):
        while True:
            status = ads.find()
            if status is not None and predicate(status):
                return status
            seq = await ads.tracker.wait_for_change(seq)


# --------------------------------------------------------------------------- stream lifecycle


async def cancel_twice_while_ending(stream: _SotwStream | _DeltaStream, first: object) -> None:
    """Run `stream`, cancel it, and cancel it again while it waits for its request reader."""
    sent = asyncio.Event()
    reader_cancelled, release_reader = asyncio.Event(), asyncio.Event()

    async def requests() -> AsyncIterator[object]:
        yield first
        try:
            await asyncio.Event().wait()  # the client sends nothing more
        finally:
            reader_cancelled.set()
            await release_reader.wait()  # the reader takes its time to finish

    async def send(response: object) -> None:
        sent.set()

    task = asyncio.create_task(stream.run(requests(), send))  # type: ignore[arg-type]
    async with asyncio.timeout(TIMEOUT):
        await sent.wait()
        assert len(stream.tracker.proxies()) == 1
        task.cancel()
        await reader_cancelled.wait()  # the stream now awaits its reader, in `finally`
        task.cancel()  # ... and is cancelled again right there
        release_reader.set()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_a_stream_cancelled_again_while_it_ends_is_still_released(protocol: str) -> None:
    """The client goes away (cancel), and grpc cancels the handler again while the stream
    waits for its request reader to finish: the proxy and its watch are released anyway."""
    cache, tracker = SnapshotCache(), ProxyTracker()
    cache.set_snapshot(DEFAULT_KEY, snapshot())
    for _ in range(20):
        if protocol == "sotw":
            await cancel_twice_while_ending(_SotwStream(cache, tracker), sotw(CLUSTER, node=True))
        else:
            await cancel_twice_while_ending(_DeltaStream(cache, tracker), delta(CLUSTER, node=True))
        assert dict(tracker.proxies()) == {}
        assert cache.requested_keys() == frozenset()


async def test_each_stream_is_its_own_proxy_even_with_one_node_id(ads: Ads, caplog: pytest.LogCaptureFixture) -> None:
    """Two Envoys that share a node id are two proxies: one's ACK never stands for the other,
    and the other's NACK is not lost."""
    with caplog.at_level(logging.WARNING, logger="graylane.xds.tracker"):
        first, second = ads.stub.StreamAggregatedResources(), ads.stub.StreamAggregatedResources()
        await first.write(sotw(CLUSTER, node=True))
        one = await read(first)
        await second.write(sotw(CLUSTER, node=True))
        two = await read(second)
        await first.write(sotw(CLUSTER, version=one.version_info, nonce=one.nonce))
        await second.write(sotw(CLUSTER, nonce=two.nonce, error="bad cluster"))
        seq = 0
        async with asyncio.timeout(TIMEOUT):
            while not (
                len(proxies := list(ads.tracker.proxies().values())) == 2
                and any(CLUSTER in p.acked for p in proxies)
                and any(p.last_nack is not None for p in proxies)
            ):
                seq = await ads.tracker.wait_for_change(seq)
    assert {p.node_id for p in proxies} == {NODE.id} and len({p.stream for p in proxies}) == 2
    [acked] = [p for p in proxies if CLUSTER in p.acked]
    [nacked] = [p for p in proxies if p.last_nack is not None]
    assert acked.last_nack is None and CLUSTER not in nacked.acked
    assert nacked.last_nack is not None and nacked.last_nack.stream == nacked.stream
    assert ads.tracker.duplicate_node_ids() == {NODE.id}
    warnings = [r for r in caplog.records if r.name == "graylane.xds.tracker" and NODE.id in r.getMessage()]
    assert len(warnings) == 1  # once, when the second stream opened
    first.cancel()
    async with asyncio.timeout(TIMEOUT):
        while len(ads.tracker.proxies()) != 1:
            seq = await ads.tracker.wait_for_change(seq)
    assert ads.tracker.duplicate_node_ids() == frozenset()
    second.cancel()


async def test_a_reconnected_proxy_nacking_nonce_1_again_is_a_new_nack(ads: Ads) -> None:
    """Nonces restart at 1 on every stream: a NACK is identified by (stream, nonce)."""
    heard: list[tuple[str, str]] = []
    ads.tracker.add_listener(lambda e: heard.append((e.stream, e.kind)) if e.kind == "nacked" else None)
    nacks = []
    for _ in range(2):
        call = ads.stub.StreamAggregatedResources()
        await call.write(sotw(CLUSTER, node=True))
        response = await read(call)
        assert response.nonce == "1"
        await call.write(sotw(CLUSTER, nonce=response.nonce, error="bad cluster"))
        status = await wait_for(ads, lambda s: s.last_nack is not None)
        nacks.append(status.last_nack)
        call.cancel()
        seq = 0
        async with asyncio.timeout(TIMEOUT):
            while ads.find() is not None:
                seq = await ads.tracker.wait_for_change(seq)
    assert [n.nonce for n in nacks if n is not None] == ["1", "1"]
    identities = {(n.stream, n.nonce) for n in nacks if n is not None}
    assert len(identities) == 2 and all(stream.startswith(NODE.id) for stream, _ in identities)
    assert {stream for stream, _ in heard} == {stream for stream, _ in identities}


@pytest.mark.parametrize("listen_port", [99999, "-5", "", "80a", 80.5])
async def test_a_node_with_a_bad_listen_port_is_refused_by_name(ads: Ads, listen_port: object) -> None:
    node = base_pb2.Node(id="bad-port")
    node.metadata.update({"listen_port": listen_port})
    call = ads.stub.StreamAggregatedResources()
    await call.write(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await read(call)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("node.metadata.listen_port: ")
    assert str(listen_port if not isinstance(listen_port, float) else 80.5) in (raised.value.details() or "")
    assert dict(ads.tracker.proxies()) == {} and ads.cache.requested_keys() == frozenset()


# ------------------------------------------------------------------ the gate


class _Gate:
    """A ProxyGate admitting every node but "rogue", with its `secret` metadata taken out."""

    def __init__(self) -> None:
        self.peers: list[object] = []

    def admit(self, node: base_pb2.Node, *, peer: Any) -> Admitted:
        self.peers.append(peer)
        if node.id == "rogue":
            raise ProxyRefused(grpc.StatusCode.PERMISSION_DENIED, "rogue may not")
        clean = base_pb2.Node()
        clean.CopyFrom(node)
        if "secret" in clean.metadata.fields:
            del clean.metadata.fields["secret"]
        return Admitted(clean)


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_a_refused_stream_is_ended_before_its_nack_counts_and_a_gate_cleans_the_node(protocol: str) -> None:
    cache = SnapshotCache()
    cache.set_snapshot(DEFAULT_KEY, snapshot())
    gate = _Gate()
    server = grpc.aio.server()
    ads_server = AdsServer(cache, gate=gate)
    ads_server.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    nack = status_pb2.Status(code=3, message="rejected")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            rogue = base_pb2.Node(id="rogue", cluster="test")

            async def one(request: Any) -> AsyncIterator[Any]:
                yield request
                await asyncio.Event().wait()

            fields = {"node": rogue, "type_url": ROUTE, "response_nonce": "1", "error_detail": nack}
            if protocol == "sotw":
                call = stub.StreamAggregatedResources(one(discovery_pb2.DiscoveryRequest(**fields)))
            else:
                call = stub.DeltaAggregatedResources(one(discovery_pb2.DeltaDiscoveryRequest(**fields)))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async with asyncio.timeout(TIMEOUT):
                    async for _ in call:
                        pass
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert refused.value.details() == "rogue may not"
            assert ads_server.tracker.proxies() == {} and ads_server.refused == 1
            assert ads_server.tracker.membership == 0  # never counted, not even for an instant

            good = base_pb2.Node(id="proxy-1", cluster="test")
            good.metadata.fields["secret"].string_value = "s3cret"
            good.metadata.fields["admin_address"].string_value = "127.0.0.1:9901"
            call = stub.StreamAggregatedResources(one(discovery_pb2.DiscoveryRequest(node=good, type_url=LISTENER)))
            async with asyncio.timeout(TIMEOUT):
                await call.read()
            (status,) = ads_server.tracker.proxies().values()
            assert dict(status.metadata) == {"admin_address": "127.0.0.1:9901"}
            assert len(gate.peers) == 2
            call.cancel()
    finally:
        await server.stop(grace=None)


def test_stream_inbox_keeps_order_wakes_its_reader_and_survives_a_cancelled_wait() -> None:
    async def main() -> None:
        inbox: _Inbox[int] = _Inbox()
        inbox.put_nowait(1)
        inbox.put_nowait(2)
        assert [await inbox.get(), await inbox.get()] == [1, 2]
        reader = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        assert not reader.done()
        inbox.put_nowait(3)
        assert await asyncio.wait_for(reader, 5) == 3
        waiting = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        inbox.put_nowait(4)  # no reader now: kept for the next one
        inbox.put_nowait(5)
        assert [await inbox.get(), await inbox.get()] == [4, 5]

    asyncio.run(main())


# -- the bound on streams pushing at once --------------------------------------------------


async def test_send_slots_bound_and_order() -> None:
    slots = _SendSlots(2, hold=60.0)
    first, second = await slots.take(), await slots.take()
    order: list[int] = []

    async def wait(i: int) -> int:
        token = await slots.take()
        order.append(i)
        return token

    waiting = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == []  # both slots held: nobody else gets one
    slots.give_back(first)
    slots.give_back(first)  # a second give-back of one token frees nothing
    await asyncio.sleep(0)
    assert order == [0]
    slots.give_back(second)
    await asyncio.sleep(0)
    assert order == [0, 1]  # served in the order they asked
    for token in await asyncio.gather(*waiting[:2]):
        slots.give_back(token)
    slots.give_back(await waiting[2])
    assert order == [0, 1, 2]
    assert {await slots.take(), await slots.take()}  # both free again, at once


async def test_send_slots_a_cancelled_waiter_passes_its_slot_on() -> None:
    slots = _SendSlots(1, hold=60.0)
    held = await slots.take()
    cancelled = asyncio.create_task(slots.take())
    after = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give_back(held)  # handed to `cancelled`...
    cancelled.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    async with asyncio.timeout(TIMEOUT):
        slots.give_back(await after)  # the slot went on to the next waiter


async def test_send_slots_reserved_are_granted_in_order_with_takers() -> None:
    slots = _SendSlots(1, hold=60.0)
    granted: list[tuple[str, int]] = []

    def grant(name: str, *, wants: bool = True) -> Callable[[int], bool]:
        def on_grant(token: int) -> bool:
            if wants:
                granted.append((name, token))
            return wants

        return on_grant

    slots.reserve(grant("a"))  # free: granted at once
    assert [name for name, _ in granted] == ["a"]
    taker = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.reserve(grant("b"))
    # Streams that ended while they waited: each passes the slot on, without recursion.
    for _ in range(5_000):
        slots.reserve(grant("gone", wants=False))
    slots.reserve(grant("c"))
    slots.give_back(granted[0][1])
    async with asyncio.timeout(TIMEOUT):
        token = await taker  # served before "b", which asked after it
    assert [name for name, _ in granted] == ["a"]
    slots.give_back(token)
    assert [name for name, _ in granted] == ["a", "b"]
    slots.give_back(granted[1][1])
    assert [name for name, _ in granted] == ["a", "b", "c"]
    slots.give_back(granted[2][1])
    slots.reserve(grant("refuses", wants=False))  # a free slot it refuses stays free
    assert not slots._waiters
    async with asyncio.timeout(TIMEOUT):
        slots.give_back(await slots.take())


async def test_send_slots_a_stuck_holder_is_forgotten_after_hold() -> None:
    slots = _SendSlots(1, hold=0.05)
    stuck = await slots.take()  # never given back: a proxy that stopped reading
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(TIMEOUT):
        token = await slots.take()
    assert loop.time() - began >= 0.04
    slots.give_back(stuck)  # late: counts for nothing
    slots.give_back(token)
    again, extra = asyncio.create_task(slots.take()), asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    assert again.done() and not extra.done()  # still one slot, not two
    slots.give_back(again.result())
    async with asyncio.timeout(TIMEOUT):
        slots.give_back(await extra)
