"""The ADS streams' shortcuts on the request path, driven by hand (no grpc): what they skip
must be what a full reading would have found.

* SotW: a request repeating the names of the previous one is not read again, and streams
  sending the same names share one frozenset; a change of names is still seen.
* delta: an ACK known to make the proxy hold the synced selection is not compared, and a
  NACKed response in between makes it compare (the proxy lacks what it rejected).
* both: an ACK of a stream the last push settled on the target is not planned again (a
  full push then sends nothing), and an ACK that may release held routes is.
* a change's pushes wait in line for a send slot unwoken, and a slot granted to a stream
  that ended, or that is still writing an earlier push, goes on to the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from graylane.xds.cache import SnapshotCache
from graylane.xds.render import render
from graylane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Resources, content_version
from graylane.xds.server import _DeltaStream, _Selections, _SendSlots, _SotwStream
from graylane.xds.tracker import ProxyTracker
from graylane.xds.view import Endpoint, Lane, RoutingView, ServiceRoute, VersionEndpoints


def _snapshot(services: int, *, lane: bool = False, port: int = 1000, weight: int = 10) -> Resources:
    routes = tuple(ServiceRoute(f"s{i}", "v1") for i in range(services))
    endpoints = [VersionEndpoints(f"s{i}", "v1", (Endpoint("127.0.0.1", port + i),)) for i in range(services)]
    lanes: tuple[Lane, ...] = ()
    if lane:
        endpoints.append(VersionEndpoints("s0", "v2", (Endpoint("127.0.0.2", port),)))
        lanes = (Lane("g", "s0", weight, (("s0", "v2"),)),)
    return render(RoutingView(services=routes, endpoints=tuple(endpoints), lanes=lanes), listen_port=10000)


def _open(stream: Any, name: str) -> Any:
    stream.key, stream.stream_id = "k", name
    stream.tracker.connected(base_pb2.Node(id=name), stream=name, key="k", protocol=stream.protocol)
    return stream


def _acked(stream: Any, type_url: str) -> dict[str, str]:
    status = stream.tracker.get(stream.stream_id)
    return dict(status.acked[type_url].resources)


def _sotw_eds(stream: Any, names: list[str], *, nonce: str = "", version: str = "") -> None:
    stream.handle(
        discovery_pb2.DiscoveryRequest(
            type_url=ENDPOINT, resource_names=names, response_nonce=nonce, version_info=version
        )
    )


def test_sotw_repeated_names_are_not_read_again_and_equal_names_are_shared() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("k", _snapshot(8))
    selections = _Selections()
    selections.names_keyed = 1  # key every list of names (as 10,000 names are)
    one = _open(_SotwStream(cache, ProxyTracker(), selections), "one")
    two = _open(_SotwStream(cache, ProxyTracker(), selections), "two")
    names = sorted(cache.snapshot("k")[ENDPOINT].items)
    _sotw_eds(one, names)
    _sotw_eds(two, names)
    a, b = one.types[ENDPOINT], two.types[ENDPOINT]
    assert a.names == set(names) and a.names is b.names  # one frozenset for equal lists
    first = a.subscription
    (body,) = [r for r in one.push() if discovery_pb2.DiscoveryResponse.FromString(r).type_url == ENDPOINT]
    sent = discovery_pb2.DiscoveryResponse.FromString(body)
    _sotw_eds(one, names, nonce=sent.nonce, version=sent.version_info)  # the ACK repeats the names
    assert a.subscription is first and a.acked_version == sent.version_info
    assert _acked(one, ENDPOINT) == dict(cache.snapshot("k")[ENDPOINT].versions)
    # Fewer names: seen, and what the proxy no longer wants is forgotten.
    _sotw_eds(one, names[:3], nonce=sent.nonce, version=sent.version_info)
    assert a.names == set(names[:3]) and set(a.acked) == set(names[:3]) and set(a.sent) == set(names[:3])
    # The same names again after a change: seen again.
    _sotw_eds(one, names, nonce=sent.nonce, version=sent.version_info)
    assert a.names == set(names)
    # A first request carrying the node, and a wildcard among many names.
    three = _open(_SotwStream(cache, ProxyTracker(), selections), "three")
    three.handle(
        discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="three"), type_url=CLUSTER, resource_names=["*", "x"])
    )
    assert three.types[CLUSTER].wildcard and three.types[CLUSTER].names == {"x"}
    _sotw_eds(three, names)
    assert three.types[ENDPOINT].names is a.names


def _delta_cds(stream: Any, *, nonce: str = "", nack: bool = False) -> None:
    stream.handle(
        discovery_pb2.DeltaDiscoveryRequest(
            type_url=CLUSTER,
            response_nonce=nonce,
            error_detail=status_pb2.Status(code=3, message="rejected") if nack else None,
        )
    )


def _delta_push(stream: Any) -> discovery_pb2.DeltaDiscoveryResponse:
    for body in stream.push():
        response = discovery_pb2.DeltaDiscoveryResponse.FromString(body)
        if response.type_url == CLUSTER:
            return response
    raise AssertionError("no CDS response")


def test_delta_ack_after_a_nack_is_what_the_proxy_holds_not_the_synced_selection() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("k", _snapshot(2))
    stream = _open(_DeltaStream(cache, ProxyTracker()), "d")
    _delta_cds(stream)
    held: dict[str, str] = {}

    def apply(response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        for resource in response.resources:
            held[resource.name] = resource.version
        for name in response.removed_resources:
            held.pop(name, None)

    r0 = _delta_push(stream)
    _delta_cds(stream, nonce=r0.nonce)
    apply(r0)
    st = stream.types[CLUSTER]
    assert st.acked_selection is st.synced and _acked(stream, CLUSTER) == held  # in sync: known
    cache.set_snapshot("k", _snapshot(3))  # a new cluster...
    r1 = _delta_push(stream)
    _delta_cds(stream, nonce=r1.nonce, nack=True)  # ...that the proxy rejects
    cache.set_snapshot("k", _snapshot(3, lane=True))  # then one more
    r2 = _delta_push(stream)
    assert "s2|v1" not in {r.name for r in r2.resources}  # the rejected cluster is not resent
    _delta_cds(stream, nonce=r2.nonce)
    apply(r2)
    assert _acked(stream, CLUSTER) == held == dict(st.acked_versions)
    assert "s2|v1" not in held and st.acked_selection is None
    expected = {n: content_version(m) for n, m in cache.snapshot("k")[CLUSTER].items.items()}
    assert held != expected


def _delta_eds(stream: Any, *, subscribe: list[str] = [], unsubscribe: list[str] = []) -> None:  # noqa: B006
    stream.handle(
        discovery_pb2.DeltaDiscoveryRequest(
            type_url=ENDPOINT, resource_names_subscribe=subscribe, resource_names_unsubscribe=unsubscribe
        )
    )


def test_delta_subscription_changes_are_shared_and_an_unsubscribe_drops_what_is_held() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("k", _snapshot(6))
    selections = _Selections()
    one = _open(_DeltaStream(cache, ProxyTracker(), selections), "one")
    two = _open(_DeltaStream(cache, ProxyTracker(), selections), "two")
    names = sorted(cache.snapshot("k")[ENDPOINT].items)
    for stream in (one, two):
        _delta_eds(stream, subscribe=names[:4])
        stream.push()
    a, b = one.types[ENDPOINT], two.types[ENDPOINT]
    assert a.names == set(names[:4]) and set(a.sent) == set(names[:4])
    for stream in (one, two):
        _delta_eds(stream, subscribe=names[4:])  # more names: one shared frozenset
    assert a.names is b.names and a.names == set(names) and a.synced is not None
    _delta_eds(one, subscribe=[names[0]])  # nothing new: the same object
    assert a.names is b.names
    _delta_eds(one, subscribe=["extra"], unsubscribe=[names[1], "extra"])  # unsubscribe wins
    assert a.names == set(names) - {names[1]}
    assert names[1] not in a.sent and names[1] not in a.sent_versions and a.synced is None


PEER_ORDER = (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE)


def _first_of_peers(stream_class: Any) -> tuple[SnapshotCache, _Selections, Any]:
    """A cache holding a 5-service snapshot, the selections its peers will share, and the
    first peer's stream ("synced") opened on them; the tests open the others alike."""
    cache = SnapshotCache()
    cache.set_snapshot("k", _snapshot(5))
    selections = _Selections()
    return cache, selections, _open(stream_class(cache, ProxyTracker(), selections), "synced")


def _reconnected_peers(
    stream_class: Any, cache: SnapshotCache, selections: _Selections, synced: Any, reconnect: Callable[[str, Any], Any]
) -> list[Any]:
    """Two more peers opened on `selections`, each presenting what `synced` holds (per type,
    `reconnect(type_url, synced's state)`): each is sent nothing, holds every type, and both
    share one plan that holds the target's versions."""
    back = []
    for name in ("again-1", "again-2"):
        stream = _open(stream_class(cache, ProxyTracker(), selections), name)
        for t in PEER_ORDER:
            stream.handle(reconnect(t, synced.types[t]))
        assert stream.push() == []  # holds it all: nothing is sent
        assert all(stream.types[t].acked_selection is not None for t in PEER_ORDER)
        back.append(stream)
    assert back[0].current_plan() is back[1].current_plan()
    for t in PEER_ORDER:
        assert _acked(back[0], t) == dict(cache.snapshot("k")[t].versions)
    return back


def test_sotw_streams_reconnecting_with_the_current_versions_plan_with_their_peers() -> None:
    """Proxies presenting the target's versions (a restarted replica) hold shared selections:
    one plan for all of them, and after a change they are sent what an in-sync proxy is."""
    cache, selections, synced = _first_of_peers(_SotwStream)
    for t in PEER_ORDER:
        names = [] if t in (CLUSTER, LISTENER, SCOPED_ROUTE) else sorted(cache.snapshot("k")[t].items)
        synced.handle(discovery_pb2.DiscoveryRequest(type_url=t, resource_names=names))
    for _ in range(10):  # make-before-break: a few rounds until everything is ACKed
        bodies = synced.push()
        if not bodies:
            break
        for body in bodies:
            r = discovery_pb2.DiscoveryResponse.FromString(body)
            names = list(synced.types[r.type_url].names)
            synced.handle(
                discovery_pb2.DiscoveryRequest(
                    type_url=r.type_url, version_info=r.version_info, response_nonce=r.nonce, resource_names=names
                )
            )
    assert synced.push() == [] and synced.types[ROUTE].sent

    def reconnect(t: str, st: Any) -> discovery_pb2.DiscoveryRequest:
        names = [] if st.wildcard else sorted(st.names)
        return discovery_pb2.DiscoveryRequest(type_url=t, version_info=st.sotw_version, resource_names=names)

    back = _reconnected_peers(_SotwStream, cache, selections, synced, reconnect)
    cache.set_snapshot("k", _snapshot(5, lane=True))

    def strip(bodies: list[bytes]) -> list[tuple[str, str, int]]:
        out = []
        for body in bodies:
            r = discovery_pb2.DiscoveryResponse.FromString(body)
            out.append((r.type_url, r.version_info, len(r.resources)))
        return out

    expected = strip(synced.push())
    assert expected and all(strip(stream.push()) == expected for stream in back)


def _settle_delta(stream: Any) -> None:
    for _ in range(10):
        bodies = stream.push()
        if not bodies:
            return
        for body in bodies:
            r = discovery_pb2.DeltaDiscoveryResponse.FromString(body)
            st = stream.types[r.type_url]
            wanted: set[str] = set()
            if r.type_url == ENDPOINT:
                wanted = set(stream.types[CLUSTER].sent)
            elif r.type_url == ROUTE:
                wanted = set(stream.types[SCOPED_ROUTE].sent)
            stream.handle(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=r.type_url, response_nonce=r.nonce, resource_names_subscribe=sorted(wanted - st.names)
                )
            )
        for t, source in ((ENDPOINT, CLUSTER), (ROUTE, SCOPED_ROUTE)):
            new = sorted(set(stream.types[source].sent) - stream.types[t].names)
            if new:
                stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=t, resource_names_subscribe=new))
    raise AssertionError("the stream never settled")


def test_delta_streams_reconnecting_with_the_current_versions_plan_with_their_peers() -> None:
    cache, selections, synced = _first_of_peers(_DeltaStream)
    for t in PEER_ORDER:
        synced.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=t))
    _settle_delta(synced)

    def reconnect(t: str, st: Any) -> discovery_pb2.DeltaDiscoveryRequest:
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=t,
            resource_names_subscribe=[] if st.wildcard else sorted(st.names),
            initial_resource_versions=st.acked_versions,
        )

    back = _reconnected_peers(_DeltaStream, cache, selections, synced, reconnect)
    cache.set_snapshot("k", _snapshot(5, lane=True))

    def strip(bodies: list[bytes]) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        out = []
        for body in bodies:
            r = discovery_pb2.DeltaDiscoveryResponse.FromString(body)
            out.append((r.type_url, tuple(x.name for x in r.resources), tuple(r.removed_resources)))
        return out

    expected = strip(synced.push())
    assert expected and all(strip(stream.push()) == expected for stream in back)


def test_streams_acking_one_shared_selection_share_one_recorded_ack() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("k", _snapshot(8))
    selections = _Selections()
    tracker = ProxyTracker()
    streams = [_open(_SotwStream(cache, tracker, selections), f"s{i}") for i in range(2)]
    names = sorted(cache.snapshot("k")[ENDPOINT].items)
    for stream in streams:
        _sotw_eds(stream, names)
        (body,) = [r for r in stream.push() if discovery_pb2.DiscoveryResponse.FromString(r).type_url == ENDPOINT]
        sent = discovery_pb2.DiscoveryResponse.FromString(body)
        _sotw_eds(stream, names, nonce=sent.nonce, version=sent.version_info)
    one, two = (tracker.get(s.stream_id).acked[ENDPOINT] for s in streams)
    assert one is two and one.version == sent.version_info
    assert dict(one.resources) == dict(cache.snapshot("k")[ENDPOINT].versions)


def _ack_all(stream: Any, bodies: list[bytes]) -> list[bool]:
    """Answer each response as a proxy would (an ACK naming what it subscribes to); per ACK,
    whether the stream said something may be left to send, after checking that when it says
    not, a full push indeed sends nothing."""
    said = []
    for body in bodies:
        if stream.protocol == "sotw":
            response = discovery_pb2.DiscoveryResponse.FromString(body)
            st = stream.types[response.type_url]
            names = [] if st.wildcard else sorted(st.names)
            stream.handle(
                discovery_pb2.DiscoveryRequest(
                    type_url=response.type_url,
                    resource_names=names,
                    response_nonce=response.nonce,
                    version_info=response.version_info,
                )
            )
        else:
            delta = discovery_pb2.DeltaDiscoveryResponse.FromString(body)
            stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=delta.type_url, response_nonce=delta.nonce))
        needed = stream._needs_push()
        if not needed:
            assert stream.push() == []
        said.append(needed)
        if CLUSTER.encode() in body:
            needed = _warm(stream)  # as Envoy: the new clusters' endpoints are asked for
            if not needed:
                assert stream.push() == []
            said[-1] = said[-1] or needed
    return said


def _warm(stream: Any) -> bool:
    """Subscribe to the endpoints of every cluster sent (what Envoy asks for once it has them)."""
    st = stream.types[ENDPOINT]
    names = sorted(stream.types[CLUSTER].sent)
    if stream.protocol == "sotw":
        stream.handle(
            discovery_pb2.DiscoveryRequest(
                type_url=ENDPOINT, resource_names=names, response_nonce=st.latest_nonce, version_info=st.sotw_version
            )
        )
    else:
        stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=names))
    return bool(stream._needs_push())


def _converge(stream: Any) -> list[bool]:
    """Push and ACK until nothing is left to send; what each ACK said (see `_ack_all`)."""
    said: list[bool] = []
    bodies = stream.push()
    for _ in range(10):
        if not bodies:
            return said
        said += _ack_all(stream, bodies)
        bodies = stream.push() if said[-1] else []
    raise AssertionError("did not converge")


def test_acks_of_a_settled_stream_are_not_planned_again_and_held_routes_still_go() -> None:
    for stream_class in (_SotwStream, _DeltaStream):
        cache = SnapshotCache()
        cache.set_snapshot("k", _snapshot(3))
        stream = _open(stream_class(cache, ProxyTracker(), _Selections()), stream_class.protocol)
        for t in (CLUSTER, LISTENER):
            if stream_class is _SotwStream:
                stream.handle(discovery_pb2.DiscoveryRequest(type_url=t))
            else:
                stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=t))
        for t, names in ((ENDPOINT, cache.snapshot("k")[ENDPOINT].items), (ROUTE, cache.snapshot("k")[ROUTE].items)):
            if stream_class is _SotwStream:
                stream.handle(discovery_pb2.DiscoveryRequest(type_url=t, resource_names=sorted(names)))
            else:
                stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=t, resource_names_subscribe=sorted(names)))
        _converge(stream)
        # A lane: a new cluster, its endpoints and a changed route, held until both are ACKed.
        cache.set_snapshot("k", _snapshot(3, lane=True))
        first = stream.push()
        routes = [b for b in first if ROUTE.encode() in b]
        assert not routes  # held back: its new cluster is not ACKed yet
        said = _ack_all(stream, first)
        assert said[0]  # the CDS ACK may release what was held: planned again
        said += _converge(stream)
        held = {t: dict(stream.types[t].acked_versions) for t in (CLUSTER, ENDPOINT, ROUTE)}
        assert held == {t: dict(cache.snapshot("k")[t].versions) for t in held}
        assert not said[-1]  # the last ACK, of the target itself: nothing planned
        # A change that holds nothing back (the lane at another weight): one route response,
        # whose ACK is not planned again.
        cache.set_snapshot("k", _snapshot(3, lane=True, weight=20))
        (body,) = stream.push()
        assert ROUTE.encode() in body
        assert _ack_all(stream, [body]) == [False]
        assert dict(stream.types[ROUTE].acked_versions) == dict(cache.snapshot("k")[ROUTE].versions)


async def test_a_slot_granted_to_a_stream_that_ended_goes_to_the_next_in_line() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("k", _snapshot(2))
    slots = _SendSlots(1, hold=60.0)
    streams = [_open(_SotwStream(cache, ProxyTracker()), f"s{i}") for i in range(3)]
    for stream in streams:
        stream.send_slots = slots
        stream._on_snapshot()
        stream._on_snapshot()  # a second change before the push folds into it
    queued = [list(stream._events._items) for stream in streams]
    assert [len(q) for q in queued] == [1, 0, 0]  # one slot: the others wait, not woken
    streams[1].stop()  # ends while it waits in line
    streams[0].stop()  # ends with its granted slot unused
    streams[0]._give_back_granted()
    (granted,) = streams[2]._events._items  # the slot skipped the ended stream
    slots.give_back(granted.token)
    assert not slots._waiters and slots._free == 1


async def test_a_stream_still_writing_passes_its_grant_on_and_pushes_once_the_write_completes() -> None:
    """A proxy that stopped reading holds a write (flow control), and its slot until `hold`.
    On a later change the slot it is granted goes on at once to the next stream in line
    instead of being held for as long again; once its write completes it asks again and
    pushes what changed meanwhile."""
    cache = SnapshotCache()
    cache.set_snapshot("k", _snapshot(2))
    slots = _SendSlots(1, hold=0.05)
    stuck: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sent: dict[str, list[bytes]] = {"a": [], "b": []}

    async def send_a(body: bytes) -> None:
        sent["a"].append(body)
        if len(sent["a"]) == 2:  # the proxy stops reading: its second write never completes until set
            await stuck

    async def send_b(body: bytes) -> None:
        sent["b"].append(body)

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        yield discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
        await asyncio.Event().wait()

    async def until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not done():
                await asyncio.sleep(0.001)

    a = _open(_SotwStream(cache, ProxyTracker()), "a")
    b = _open(_SotwStream(cache, ProxyTracker()), "b")
    a.send_slots = b.send_slots = slots
    tasks = [asyncio.create_task(a.run(requests(), send_a)), asyncio.create_task(b.run(requests(), send_b))]
    try:
        await until(lambda: len(sent["a"]) == 1 and len(sent["b"]) == 1)
        cache.set_snapshot("k", _snapshot(3))
        a._on_snapshot()  # a takes the one slot and its write sticks
        await until(lambda: len(sent["a"]) == 2)
        b._on_snapshot()  # waits in line until a's slot is forgotten (`hold`)
        await until(lambda: len(sent["b"]) == 2)
        cache.set_snapshot("k", _snapshot(4))
        a._on_snapshot()
        b._on_snapshot()
        # a, still writing, passed the slot on at once: b holds it, a holds none.
        assert [type(e).__name__ for e in b._events._items] == ["_Granted"]
        assert not a._events._items
        await until(lambda: len(sent["b"]) == 3)
        assert not slots._held
        stuck.set_result(None)  # the proxy reads again: a's write completes, and a pushes the latest
        await until(lambda: len(sent["a"]) == 3)
        latest = discovery_pb2.DiscoveryResponse.FromString(sent["a"][2])
        assert latest.version_info == cache.snapshot("k")[CLUSTER].version
        await until(lambda: not slots._held)
        assert slots._free == 1 and not slots._waiters
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
