"""Sticky cohorts and per-lane traffic counts, through a real Envoy, real etcd, real upstreams.

A cohort release decides the batch by a consistent hash of `x-user-id`: over 10,000
synthetic ids, the ids in the lane at 5 % are all still in it at 20 % and 50 %, and each
share matches its weight. The counts `GetTraffic` reads from Envoy's statistics match
what the clients saw.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import run_load
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc

from tests.integration.conftest import binomial_bound, checkout_replica

SERVICE = "checkout"
LANE = "checkout-v2"
IDS = 10_000


def cohort_spec(weights: tuple[int, ...], cohort: pb.Cohort) -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane=LANE,
        entry=SERVICE,
        services=[pb.ServiceVersions(service=SERVICE, base_version="v1", gray_version="v2")],
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in weights],
        cohort=cohort,
    )


async def until_reached(stub: api_grpc.ReleaseServiceStub, weight: int, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while True:
            r = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
            if r.status.reached and r.status.weight == weight:
                return
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def single_service(
    store: EtcdStore, envoy: Any
) -> AsyncIterator[tuple[api_grpc.ReleaseServiceStub, EnvoyProcess]]:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await checkout_replica(es, store)
        proxy = await envoy(ads_port=plane.xds_port, node_id="envoy-cohort")
        yield stub, proxy


async def lane_members(proxy: EnvoyProcess, headers: Any) -> set[int]:
    """The synthetic ids (0..IDS-1) whose request was answered by the gray version."""
    result = await run_load(
        proxy.listen_port,
        authority=SERVICE,
        count=IDS,
        max_seconds=90,
        concurrency=16,
        headers=headers,
        keep_versions=True,
    )
    assert result.failed == 0, (result.statuses, result.errors)
    assert len(result.version_of) == IDS
    return {i for i, version in result.version_of.items() if version == "v2"}


@pytest.mark.parametrize(
    ("cohort", "headers"),
    [
        (pb.Cohort(header="x-user-id"), lambda i: {"x-user-id": f"user-{i}"}),
        (pb.Cohort(cookie="uid"), lambda i: {"cookie": f"theme=dark; uid=u{i}"}),
    ],
    ids=["header", "cookie"],
)
async def test_cohort_at_a_lower_weight_stays_in_the_lane_at_every_higher_weight(
    store: EtcdStore, envoy: Any, cohort: pb.Cohort, headers: Any
) -> None:
    async with single_service(store, envoy) as (stub, proxy):
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=cohort_spec((5, 20, 50), cohort)))
        members: dict[int, set[int]] = {}
        for weight in (5, 20, 50):
            await stub.NextBatch(api.ActionRequest(name="rel", actor="test"))
            await until_reached(stub, weight)
            members[weight] = await lane_members(proxy, headers)
            share = len(members[weight]) / IDS
            assert abs(share - weight / 100) <= binomial_bound(IDS, weight / 100), (weight, share)
        assert members[5] <= members[20] <= members[50]
        assert members[5] < members[50]  # the cohort grew: the weights really changed


async def test_requests_without_the_cohort_key_are_split_at_random(store: EtcdStore, envoy: Any) -> None:
    async with single_service(store, envoy) as (stub, proxy):
        await stub.ApplyRelease(
            api.ApplyReleaseRequest(name="rel", spec=cohort_spec((30,), pb.Cohort(header="x-user-id")))
        )
        await stub.NextBatch(api.ActionRequest(name="rel", actor="test"))
        await until_reached(stub, 30)
        same_user = await run_load(
            proxy.listen_port, authority=SERVICE, count=300, max_seconds=30, headers={"x-user-id": "user-7"}
        )
        assert same_user.failed == 0
        assert len(same_user.versions) == 1  # one user, one decision, every time
        keyless = await run_load(proxy.listen_port, authority=SERVICE, count=2000, max_seconds=30)
        assert keyless.failed == 0
        assert abs(keyless.share("v2") - 0.3) <= binomial_bound(2000, 0.3)


async def test_traffic_counts_from_envoy_match_what_clients_saw(store: EtcdStore, envoy: Any) -> None:
    async with single_service(store, envoy) as (stub, proxy):
        rule = pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-user", op=pb.EXACT, value="tester")])
        spec = cohort_spec((20,), pb.Cohort(header="x-user-id"))
        spec.match.append(rule)
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec))
        await stub.NextBatch(api.ActionRequest(name="rel", actor="test"))
        await until_reached(stub, 20)
        plain = await run_load(
            proxy.listen_port, authority=SERVICE, count=1000, max_seconds=30, headers=lambda i: {"x-user-id": str(i)}
        )
        testers = await run_load(
            proxy.listen_port, authority=SERVICE, count=200, max_seconds=30, headers={"x-user": "tester"}
        )
        assert plain.failed == testers.failed == 0
        want = {
            (SERVICE, "v1", ""): plain.versions["v1"],
            (SERVICE, "v2", LANE): plain.versions["v2"] + testers.versions["v2"],
        }
        assert testers.versions["v2"] == 200

        # Envoy counts a request once its response is done; poll until both agree.
        seen: dict[tuple[str, str, str], int] = {}
        async with asyncio.timeout(10):
            while seen != want:
                response = await stub.GetTraffic(api.GetTrafficRequest(name="rel"))
                seen = {(c.service, c.version, c.lane): c.requests for c in response.counts if c.requests}
                if seen != want:
                    await asyncio.sleep(0.05)
        assert response.proxies == 1 and not response.unreachable
        by_key = {(c.service, c.version, c.lane): c for c in response.counts}
        assert by_key[(SERVICE, "v2", LANE)].responses_2xx == want[(SERVICE, "v2", LANE)]
        assert all(c.responses_5xx == 0 and c.failures == 0 for c in response.counts)


async def test_traffic_of_an_unknown_release_is_not_found(store: EtcdStore, envoy: Any) -> None:
    async with single_service(store, envoy) as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetTraffic(api.GetTrafficRequest(name="nope"))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
