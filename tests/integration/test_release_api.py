"""ReleaseService end to end over gRPC against a real etcd: lifecycle, history, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta

import etcd3
import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Action, Cause
from graylane.controlplane.domain.releases import Releases
from graylane.controlplane.errors import Conflict, FailedPrecondition
from graylane.controlplane.store import EtcdStore
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import register


@pytest.fixture
async def stub(store: EtcdStore) -> AsyncIterator[api_grpc.ReleaseServiceStub]:
    plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None)
    task = asyncio.create_task(plane.run())
    async with asyncio.timeout(10):
        await plane.ready.wait()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
        yield api_grpc.ReleaseServiceStub(channel)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def canary(weights: tuple[int, ...] = (10, 20, 50, 100)) -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane="checkout-v2",
        entry="checkout",
        services=[pb.ServiceVersions(service="checkout", base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        match=[pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-canary", op=pb.EXACT, value="1")])],
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in weights],
    )


async def test_lifecycle_through_grpc_with_history(stub: api_grpc.ReleaseServiceStub) -> None:
    await register(stub, "checkout")
    r = await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary(), actor="ci"))
    assert (r.status.phase, r.status.batch, r.status.weight) == (pb.PENDING, -1, 0)

    def step(req: api.ActionRequest) -> api.ActionRequest:
        return req

    seen = []
    for _ in range(2):
        r = await stub.NextBatch(api.ActionRequest(name="rel", actor="alice", reason="looks good"))
        seen.append(r.status.weight)
    assert seen == [10, 20]
    r = await stub.Pause(api.ActionRequest(name="rel", actor="bob", reason="investigating"))
    assert (r.status.phase, r.status.weight) == (pb.PAUSED, 20)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.NextBatch(api.ActionRequest(name="rel"))
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "resume it first" in (err.value.details() or "")
    r = await stub.Resume(api.ActionRequest(name="rel", actor="bob"))
    r = await stub.Rollback(api.ActionRequest(name="rel", actor="bob", reason="errors"))
    assert (r.status.phase, r.status.weight) == (pb.ROLLED_BACK, 0)
    r = await stub.Restart(api.ActionRequest(name="rel", actor="carol"))
    assert (r.status.phase, r.status.batch, r.status.weight) == (pb.PROGRESSING, 0, 10)
    r = await stub.Promote(api.ActionRequest(name="rel", actor="carol", reason="ship it"))
    assert (r.status.phase, r.status.weight) == (pb.SUCCEEDED, 100)

    services = await stub.ListServices(api.ListServicesRequest())
    assert [(s.name, s.stable_version) for s in services.services] == [("checkout", "v2")]

    history = await stub.History(api.HistoryRequest(name="rel"))
    rows = [(e.sequence, e.action, e.actor, e.reason, e.to_phase) for e in history.events]
    assert rows == [
        (0, "create", "ci", "", pb.PENDING),
        (1, "next", "alice", "looks good", pb.PROGRESSING),
        (2, "next", "alice", "looks good", pb.PROGRESSING),
        (3, "pause", "bob", "investigating", pb.PAUSED),
        (4, "resume", "bob", "", pb.PROGRESSING),
        (5, "rollback", "bob", "errors", pb.ROLLED_BACK),
        (6, "restart", "carol", "", pb.PROGRESSING),
        (7, "promote", "carol", "ship it", pb.SUCCEEDED),
    ]


async def test_walking_past_the_last_batch_succeeds(stub: api_grpc.ReleaseServiceStub) -> None:
    await register(stub, "checkout")
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary((50, 100))))
    phases = []
    for _ in range(3):
        r = await stub.NextBatch(api.ActionRequest(name="rel"))
        phases.append((r.status.phase, r.status.weight))
    assert phases == [(pb.PROGRESSING, 50), (pb.PROGRESSING, 100), (pb.SUCCEEDED, 100)]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s.batches[2].__setattr__("weight", 140), "batches[2].weight: 140 is above 100"),
        (lambda s: s.services[0].__setattr__("gray_version", "v1"), "spec.services[0].gray_version"),
        (lambda s: s.__setattr__("lane", "Bad Lane!"), "spec.lane"),
        (
            lambda s: (
                s.match[0].conditions[0].__setattr__("op", pb.REGEX)
                or s.match[0].conditions[0].__setattr__("value", "(unclosed")
            ),
            "match[0].conditions[0].value",
        ),
        (
            lambda s: s.services.add(service="checkout", base_version="v1", gray_version="v3"),
            "spec.services[1].service: 'checkout' is listed twice",
        ),
        (lambda s: s.__setattr__("entry", "nowhere"), "spec.entry: 'nowhere' is not one of the release's services"),
        (lambda s: s.__setattr__("lane", "gray lane"), "spec.lane: 'gray lane' is not a valid lane"),
        (lambda s: s.__setattr__("lane", "gray,x=1"), "spec.lane: 'gray,x=1' is not a valid lane"),
        (lambda s: s.services[0].__setattr__("gray_version", "v1"), "spec.services[0].gray_version: 'v1' equals"),
        (lambda s: s.cohort.__setattr__("header", "X User"), "spec.cohort.header: 'X User' is not a valid"),
        (lambda s: s.analysis.__setattr__("max_error_rate", 1.5), "spec.analysis.max_error_rate: 1.5 is outside"),
        (lambda s: s.analysis.__setattr__("max_error_rate", -0.1), "spec.analysis.max_error_rate: -0.1 is outside"),
        (lambda s: s.analysis.interval.FromMilliseconds(500), "spec.analysis.interval: 0.5 s is below"),
        (lambda s: s.analysis.__setattr__("min_requests", 0), "spec.analysis.min_requests: 0 is below"),
        (
            lambda s: (
                s.analysis.__setattr__("baseline", True),
                s.analysis.webhooks.add(name="gate", kind=pb.CONFIRM_BATCH, url="ftp://example.com/x"),
            ),
            "spec.analysis.webhooks[0].url",
        ),
        (lambda s: s.services[0].__setattr__("gray_version", "v9"), "spec.services[0].gray_version: version 'v9'"),
    ],
)
async def test_bad_input_names_the_field_and_changes_nothing(
    stub: api_grpc.ReleaseServiceStub, mutate: object, field: str
) -> None:
    await register(stub, "checkout")
    spec = canary()
    mutate(spec)  # type: ignore[operator]
    assert field in await _invalid(stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec)))
    listed = await stub.ListReleases(api.ListReleasesRequest())
    assert list(listed.releases) == []


async def test_missing_release_is_not_found(stub: api_grpc.ReleaseServiceStub) -> None:
    for call in (stub.GetRelease(api.GetReleaseRequest(name="nope")), stub.NextBatch(api.ActionRequest(name="nope"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() is grpc.StatusCode.NOT_FOUND


async def test_expected_revision_guards_concurrent_change(stub: api_grpc.ReleaseServiceStub) -> None:
    await register(stub, "checkout")
    r = await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
    await stub.NextBatch(api.ActionRequest(name="rel"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.NextBatch(api.ActionRequest(name="rel", expected_revision=r.revision))
    assert err.value.code() is grpc.StatusCode.ABORTED
    now = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
    assert now.status.batch == 0


async def test_concurrent_actions_each_land_exactly_once(stub: api_grpc.ReleaseServiceStub) -> None:
    await register(stub, "checkout")
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary(tuple(range(5, 101, 5)))))
    await asyncio.gather(*(stub.NextBatch(api.ActionRequest(name="rel")) for _ in range(8)))
    r = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
    history = await stub.History(api.HistoryRequest(name="rel"))
    assert r.status.batch == 7
    assert [e.to_batch for e in history.events if e.action == "next"] == list(range(8))


async def test_watch_streams_each_change(stub: api_grpc.ReleaseServiceStub) -> None:
    await register(stub, "checkout")
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
    call = stub.Watch(api.WatchRequest(name="rel"))
    first = await call.read()
    assert first.status.phase == pb.PENDING
    await stub.NextBatch(api.ActionRequest(name="rel"))
    await stub.NextBatch(api.ActionRequest(name="rel"))
    # Every value is streamed in order; convergence may write the status of one batch more
    # than once (its own numbers changed), so compare the sequence of distinct weights.
    weights: list[int] = []
    async with asyncio.timeout(10):
        while not weights or weights[-1] != 20:
            msg = await call.read()
            if not weights or weights[-1] != msg.status.weight:
                weights.append(msg.status.weight)
    assert weights == [10, 20]
    call.cancel()


async def test_watch_continues_after_compaction(stub: api_grpc.ReleaseServiceStub, store: EtcdStore) -> None:
    """A watcher that falls behind a compaction re-reads and goes on, losing no final state."""
    from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

    await register(stub, "checkout")
    r = await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
    for _ in range(3):
        r = await stub.NextBatch(api.ActionRequest(name="rel"))
    await rpc_pb2_grpc.KVStub(store._channel).Compact(rpc_pb2.CompactionRequest(revision=r.revision))
    seen = []
    async with asyncio.timeout(10):
        # Start from a revision that is gone: the store raises Compacted, the API re-reads.
        async for release in _watch_from(store, "rel", start=r.revision - 3):
            seen.append(release.status.batch)
            break
    assert seen == [2]


async def _watch_from(store: EtcdStore, name: str, *, start: int):  # type: ignore[no-untyped-def]
    from graylane.controlplane.store import Compacted

    try:
        async for release in store.watch_release(name, start_revision=start):
            yield release
    except Compacted as exc:
        assert exc.compact_revision >= start
        yield await store.get_release(name)


async def test_health_and_reflection_answer(store: EtcdStore) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None)
    task = asyncio.create_task(plane.run())
    try:
        async with asyncio.timeout(10):
            await plane.ready.wait()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            resp = await health.Check(health_pb2.HealthCheckRequest(service="graylane.v1.ReleaseService"))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = refl.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            answer = await call.read()
            names = {s.name for s in answer.list_services_response.service}
            assert "graylane.v1.ReleaseService" in names
            await call.done_writing()
            # v1, as newer grpcurl asks first: the same messages under the v1 service name.
            v1 = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )()
            await v1.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="graylane.v1.ReleaseService"))
            described = await v1.read()
            assert described.file_descriptor_response.file_descriptor_proto  # the service's own file
            await v1.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = {s.name for s in (await v1.read()).list_services_response.service}
            assert {"graylane.v1.AgentService", "grpc.reflection.v1.ServerReflection"} <= listed
            await v1.done_writing()
            agents = await health.Check(health_pb2.HealthCheckRequest(service="graylane.v1.AgentService"))
            assert agents.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_lanes_entering_one_service_cannot_ask_for_more_than_all_of_it(
    stub: api_grpc.ReleaseServiceStub,
) -> None:
    await register(stub, "checkout")
    await stub.PutVersion(api.PutVersionRequest(version=pb.Version(service="checkout", name="v3")))
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="one", spec=canary((10, 60))))
    other = canary((10, 60))
    other.lane = "checkout-v3"
    other.services[0].gray_version = "v3"
    assert "spec.entry" in await _invalid(stub.ApplyRelease(api.ApplyReleaseRequest(name="two", spec=other)))
    del other.batches[1]  # 10 + 60 fits
    r = await stub.ApplyRelease(api.ApplyReleaseRequest(name="two", spec=other))
    assert r.status.phase == pb.PENDING


async def test_stopping_a_replica_ends_its_watches_with_unavailable(store: EtcdStore) -> None:
    """A stopping replica ends its response streams itself (UNAVAILABLE, so clients reconnect
    to another replica) instead of holding them until the grace period runs out."""
    plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None)
    task = asyncio.create_task(plane.run())
    async with asyncio.timeout(10):
        await plane.ready.wait()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
        stub = api_grpc.ReleaseServiceStub(channel)
        await register(stub, "checkout")
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
        watch = stub.Watch(api.WatchRequest(name="rel"))
        metrics = stub.WatchMetrics(api.GetMetricsRequest(name="rel"))
        async with asyncio.timeout(10):
            assert (await watch.read()).status.phase == pb.PENDING
            assert (await metrics.read()).HasField("until")
        task.cancel()
        async with asyncio.timeout(10):
            for call in (watch, metrics):
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    while True:  # a message already on its way may come first
                        await call.read()
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "stopping" in (ended.value.details() or "")
            with pytest.raises(asyncio.CancelledError):
                await task


# ------------------------------------------------------------------ bad input (issue 11)


async def _invalid(call: Awaitable[object]) -> str:
    """Await `call`, which must be refused as INVALID_ARGUMENT; the refusal's details."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details() or ""


async def _stored(store: EtcdStore) -> tuple[object, ...]:
    """What the API writes: releases (with their revisions), services and versions."""
    snap = await store.snapshot()
    return snap.releases, snap.services, snap.versions


@pytest.fixture
async def registered(stub: api_grpc.ReleaseServiceStub, store: EtcdStore) -> tuple[object, ...]:
    """The service checkout registered; what the store holds then (`_stored`), which a
    refused call must leave as it is."""
    await register(stub, "checkout")
    return await _stored(store)


def _condition(**fields: object) -> pb.Condition:
    return pb.Condition(**{"kind": pb.HEADER, "name": "x-canary", "op": pb.EXACT, "value": "1", **fields})


def _rules(*conditions: pb.Condition, copies: int = 1) -> list[pb.MatchRule]:
    return [pb.MatchRule(conditions=list(conditions))] * copies


def _set(field: str, value: object):  # type: ignore[no-untyped-def]
    def mutate(s: pb.ReleaseSpec) -> None:
        target = getattr(s, field)
        del target[:]
        target.extend(value)  # type: ignore[attr-defined]

    return mutate


def _pause(seconds: int):  # type: ignore[no-untyped-def]
    def mutate(s: pb.ReleaseSpec) -> None:
        s.batches[1].pause.duration.seconds = seconds

    return mutate


def _analysis(edit):  # type: ignore[no-untyped-def]
    def mutate(s: pb.ReleaseSpec) -> None:
        s.analysis.baseline = True
        edit(s.analysis)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: setattr(s, "lane", "checkout-v2\n"), "spec.lane: "),
        (lambda s: setattr(s, "lane", "l" * 63), "spec.lane: "),
        (lambda s: setattr(s.services[0], "service", "checkout\n"), "spec.services[0].service: "),
        (lambda s: setattr(s.services[0], "gray_version", "v2\n"), "spec.services[0].gray_version: "),
        (_set("match", _rules(_condition(), _condition(kind=7))), "spec.match[0].conditions[1].kind: "),
        (_set("match", _rules(_condition(op=9))), "spec.match[0].conditions[0].op: "),
        (_set("match", _rules(_condition(name="x-canary\n"))), "spec.match[0].conditions[0].name: "),
        (_set("match", _rules(_condition(kind=pb.QUERY, name="a&b"))), "spec.match[0].conditions[0].name: "),
        (_set("match", _rules(_condition(kind=pb.COOKIE, name="s", value="v" * 90))), "conditions[0].value: "),
        (_set("match", _rules(_condition(value="v" * 4097))), "spec.match[0].conditions[0].value: "),
        (_set("match", _rules(_condition(), copies=65)), "spec.match: 65 rules is above the limit of 64"),
        (_set("match", _rules(*[_condition()] * 17)), "spec.match[0].conditions: 17 conditions"),
        (_set("match", _rules(*[_condition(value="v" * 4000)] * 16, copies=5)), "spec: is "),
        (
            _set(
                "services",
                [pb.ServiceVersions(service=f"s{i}", base_version="v1", gray_version="v2") for i in range(101)],
            ),
            "spec.services: 101 services",
        ),
        (_set("batches", [pb.Batch(weight=100, pause=pb.Pause(manual=True))] * 101), "spec.batches: 101 batches"),
        (_pause(80_000_000 * 3600), "spec.batches[1].pause.duration: 3.33333e+06d is above the maximum of 30d"),
        (_pause(2**62), "spec.batches[1].pause.duration: "),
        (_analysis(lambda a: setattr(a.interval, "seconds", 2 * 86400)), "spec.analysis.interval: "),
        (
            _analysis(lambda a: a.webhooks.add(name="g", kind=pb.CONFIRM_BATCH, url="http://x/" + "p" * 2048)),
            "spec.analysis.webhooks[0].url: ",
        ),
    ],
)
async def test_bad_input_from_issue_11_is_refused_naming_the_field(
    stub: api_grpc.ReleaseServiceStub, store: EtcdStore, registered: tuple[object, ...], mutate: object, field: str
) -> None:
    spec = canary()
    spec.batches[1].pause.CopyFrom(pb.Pause(duration=Duration(seconds=60)))
    mutate(spec)  # type: ignore[operator]
    for call in (
        stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec)),
        stub.CreateRelease(api.CreateReleaseRequest(name="rel", spec=spec)),
    ):
        assert field in await _invalid(call)
    after = await _stored(store)
    assert after == registered and after[0] == ()  # nothing written


async def test_a_release_named_with_a_newline_is_refused(
    stub: api_grpc.ReleaseServiceStub, store: EtcdStore, registered: tuple[object, ...]
) -> None:
    refusal = await _invalid(stub.ApplyRelease(api.ApplyReleaseRequest(name="rel\n", spec=canary())))
    assert refusal.startswith("name: ")
    assert await _stored(store) == registered


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (api.PutServiceRequest(service=pb.Service(name="evil\n", stable_version="v1")), "service.name: "),
        (api.PutServiceRequest(service=pb.Service(name="cart", stable_version="v1\n")), "service.stable_version: "),
        (
            api.PutServiceRequest(service=pb.Service(name="cart", stable_version="v1", description="d" * 4097)),
            "service.description: ",
        ),
        (api.PutVersionRequest(version=pb.Version(service="checkout", name="v3\n")), "version.name: "),
        (
            api.PutVersionRequest(
                version=pb.Version(
                    service="checkout", name="v3", metadata=pb.VersionMetadata(change_summary="c" * 5000)
                )
            ),
            "version.metadata.change_summary: ",
        ),
        (
            api.PutVersionRequest(
                version=pb.Version(
                    service="checkout", name="v3", endpoints=[pb.Endpoint(address="h.example\n", port=80)]
                )
            ),
            "version.endpoints[0].address: ",
        ),
        (
            # A host name: Envoy's EDS would refuse it (and with it every endpoint update).
            api.PutVersionRequest(
                version=pb.Version(service="checkout", name="v3", endpoints=[pb.Endpoint(address="h.example", port=80)])
            ),
            "version.endpoints[0].address: 'h.example' is not an IP address",
        ),
    ],
)
async def test_bad_services_and_versions_are_refused_and_nothing_written(
    stub: api_grpc.ReleaseServiceStub, store: EtcdStore, registered: tuple[object, ...], request_: object, field: str
) -> None:
    call = stub.PutService if isinstance(request_, api.PutServiceRequest) else stub.PutVersion
    assert (await _invalid(call(request_))).startswith(field)  # type: ignore[operator]
    assert await _stored(store) == registered


@pytest.mark.parametrize(
    ("changes", "field"), [({"reason": "r" * 4097}, "reason: "), ({"actor": "a" * 257}, "actor: ")]
)
async def test_an_oversized_reason_or_actor_is_refused_and_nothing_written(
    stub: api_grpc.ReleaseServiceStub, store: EtcdStore, changes: dict[str, str], field: str
) -> None:
    await register(stub, "checkout")
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
    before = await _stored(store)
    for call in (
        stub.NextBatch(api.ActionRequest(name="rel", **changes)),
        stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary(weights=(5, 100)), **changes)),
    ):
        assert (await _invalid(call)).startswith(field)
    assert await _stored(store) == before
    history = await stub.History(api.HistoryRequest(name="rel"))
    assert len(history.events) == 1


async def test_an_out_of_range_pause_already_in_etcd_is_read_clamped(
    stub: api_grpc.ReleaseServiceStub, store: EtcdStore, etcd_endpoint: str
) -> None:
    """A value an older version let in: every read still works, with the pause at its bound."""
    await register(stub, "checkout")
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
    key = store.release_key("rel")
    host, port = etcd_endpoint.removeprefix("http://").rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port))
    try:
        value, _ = await asyncio.to_thread(client.get, key)
        stored = json_format.Parse(value, pb.Release(), ignore_unknown_fields=True)
        stored.spec.batches[0].pause.CopyFrom(pb.Pause(duration=Duration(seconds=80_000_000 * 3600)))
        await asyncio.to_thread(client.put, key, json_format.MessageToJson(stored))
    finally:
        await asyncio.to_thread(client.close)
    got = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
    assert got.spec.batches[0].pause.duration.seconds == 30 * 86400
    listed = await stub.ListReleases(api.ListReleasesRequest())
    assert [r.name for r in listed.releases] == ["rel"]
    snapshot = await store.snapshot()
    assert snapshot.by_name["rel"].spec.batches[0].pause == timedelta(days=30)


async def test_a_service_text_above_the_limit_already_in_etcd_is_still_read(
    stub: api_grpc.ReleaseServiceStub, store: EtcdStore, etcd_endpoint: str
) -> None:
    await register(stub, "checkout")
    host, port = etcd_endpoint.removeprefix("http://").rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port))
    old = pb.Service(name="legacy", stable_version="v1", description="d" * 10_000)
    try:
        await asyncio.to_thread(
            client.put,
            store.release_key("x").replace(b"releases/x", b"services/legacy"),
            json_format.MessageToJson(old),
        )
    finally:
        await asyncio.to_thread(client.close)
    listed = await stub.ListServices(api.ListServicesRequest())
    assert sorted(s.name for s in listed.services) == ["checkout", "legacy"]
    assert len((await store.snapshot()).services) == 2


async def test_concurrent_creates_of_one_lane_let_exactly_one_in(stub: api_grpc.ReleaseServiceStub) -> None:
    await register(stub, "checkout")

    async def create(i: int) -> grpc.StatusCode:
        try:
            await stub.ApplyRelease(api.ApplyReleaseRequest(name=f"same-lane-{i}", spec=canary((10,))))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() != grpc.StatusCode.INVALID_ARGUMENT or "is used by release" in (exc.details() or "")
            return exc.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(create(i) for i in range(8)))
    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == 7
    listed = await stub.ListReleases(api.ListReleasesRequest())
    assert len(listed.releases) == 1


async def test_actions_starting_from_a_follower_that_is_behind_decide_on_the_fresh_value(
    stub: api_grpc.ReleaseServiceStub, store: EtcdStore
) -> None:
    """`Releases.act` starts from the store follower's value; a follower that never moves
    on (frozen here) must cost a read, never a wrong move or a wrong refusal."""
    await register(stub, "checkout")
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
    await stub.NextBatch(api.ActionRequest(name="rel"))
    releases = Releases(store)
    releases.follow(await store.live_state())  # frozen at batch 0, PROGRESSING
    cause = Cause(actor="test")
    await stub.Pause(api.ActionRequest(name="rel"))
    # The follower says PROGRESSING (resume refused there): the fresh value is PAUSED.
    resumed = await releases.act("rel", Action.RESUME, cause)
    assert resumed.status.phase is model.Phase.PROGRESSING
    # The follower's batch 0 is stale twice over: the move lands once, on the fresh value.
    await stub.NextBatch(api.ActionRequest(name="rel"))
    moved = await releases.act("rel", Action.NEXT, cause)
    assert moved.status.batch == 2
    # Its own write is where the next one starts; a stale expected revision still aborts.
    again = await releases.act("rel", Action.NEXT, cause, expected_revision=moved.revision)
    assert again.status.batch == 3
    with pytest.raises(Conflict):
        await releases.act("rel", Action.PAUSE, cause, expected_revision=moved.revision)
    # A move the fresh value forbids is still refused.
    await stub.Promote(api.ActionRequest(name="rel"))
    with pytest.raises(FailedPrecondition):
        await releases.act("rel", Action.NEXT, cause)
    got = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
    assert got.status.phase == pb.SUCCEEDED


async def test_re_applying_after_a_promote_changes_nothing_and_undoing_it_is_explicit(
    stub: api_grpc.ReleaseServiceStub,
) -> None:
    """The release file applied again after a promote (services, versions, release): the
    stable version stays promoted and the release stays finished; moving the stable version
    back (undoing the promote) and starting a changed release over each need their flag."""
    await register(stub, "checkout")
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
    await stub.NextBatch(api.ActionRequest(name="rel"))
    promoted = await stub.Promote(api.ActionRequest(name="rel"))
    assert promoted.status.phase == pb.SUCCEEDED

    def stable() -> Awaitable[api.ListServicesResponse]:
        return stub.ListServices(api.ListServicesRequest())

    assert [s.stable_version for s in (await stable()).services] == ["v2"]
    with pytest.raises(grpc.aio.AioRpcError) as moved:
        await register(stub, "checkout")  # the file's Service still says v1
    assert moved.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "service.stable_version" in (moved.value.details() or "")
    same = await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()))
    assert (same.status.phase, same.revision) == (pb.SUCCEEDED, promoted.revision)  # nothing written
    assert [s.stable_version for s in (await stable()).services] == ["v2"]

    await stub.PutVersion(api.PutVersionRequest(version=pb.Version(service="checkout", name="v3")))
    changed = canary((20, 100))
    changed.services[0].base_version, changed.services[0].gray_version = "v2", "v3"
    with pytest.raises(grpc.aio.AioRpcError) as finished:
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=changed))
    assert finished.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "restart" in (
        finished.value.details() or ""
    )

    # Undo the promote: v1 stable again, said so explicitly.
    undo = pb.Service(name="checkout", stable_version="v1")
    await stub.PutService(api.PutServiceRequest(service=undo, move_stable=True))
    assert [s.stable_version for s in (await stable()).services] == ["v1"]
    again = await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary((20, 100)), restart=True))
    assert (again.status.phase, again.status.batch) == (pb.PENDING, -1)


async def test_put_service_never_overwrites_a_change_it_did_not_see(store: EtcdStore) -> None:
    """PutService checks the stable version it read; the write is guarded by that read's
    revision, so a promote landing in between is not silently undone (Conflict, nothing
    written), and a write from the current revision goes through."""
    await store.put_service(model.Service(name="checkout", stable_version="v1"))
    seen, revision = await store.get_service_at("checkout")
    assert seen is not None and seen.stable_version == "v1" and revision > 0
    await store.put_service(model.Service(name="checkout", stable_version="v2"))  # a promote, meanwhile
    with pytest.raises(Conflict, match="'checkout'"):
        await store.put_service(
            model.Service(name="checkout", stable_version="v1", description="x"), if_revision=revision
        )
    now, latest = await store.get_service_at("checkout")
    assert now is not None and (now.stable_version, now.description) == ("v2", "") and latest > revision
    await store.put_service(model.Service(name="checkout", stable_version="v2", description="x"), if_revision=latest)
    assert (await store.get_service("checkout")) == model.Service(name="checkout", stable_version="v2", description="x")
    with pytest.raises(Conflict):  # "still absent" is a revision too
        await store.put_service(model.Service(name="cart", stable_version="v1"), if_revision=latest)
    await store.put_service(model.Service(name="cart", stable_version="v1"), if_revision=0)
    assert (await store.get_service_at("cart"))[1] > latest
