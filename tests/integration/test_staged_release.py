"""A release's gray clusters are staged at creation; its start changes routes only.

Real etcd, a real control plane and a real Envoy (both ADS flavours): a PENDING release's
gray cluster is in Envoy's own config, warmed with the gray endpoint, while no request
(tagged with the lane, by header or baggage, or untagged) reaches gray; the start's
NextBatch then pushes route configs alone and the split happens; a pending release
deleted takes its staged cluster away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import LoadResult, run_load
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.xds import view as xv
from graylane.xds.resources import ROUTE
from graylane.xds.tracker import ProxyStatus

from tests.integration.conftest import CheckoutStack, binomial_bound, checkout_stack

SERVICE = "checkout"
LANE = "checkout-v2"
GRAY_CLUSTER = xv.cluster_name(SERVICE, "v2", LANE)


class Stack(CheckoutStack):
    async def load(self, count: int, **kw: Any) -> LoadResult:
        kw.setdefault("max_seconds", 30)
        kw.setdefault("concurrency", 16)
        return await run_load(self.envoy.listen_port, authority=SERVICE, count=count, **kw)

    async def dynamic_clusters(self) -> dict[str, Any]:
        """Envoy's own word: its active dynamic clusters by name (warming ones are not)."""
        status, body = await self.envoy.admin_get("/config_dump?resource=dynamic_active_clusters")
        assert status == 200, body
        return {c["cluster"]["name"]: c for c in json.loads(body).get("configs", [])}

    async def gray_hosts(self) -> list[str]:
        """The hosts Envoy's /clusters lists for the staged gray cluster (its endpoints)."""
        status, body = await self.envoy.admin_get("/clusters")
        assert status == 200, body
        hosts = {line.split("::")[1] for line in body.splitlines() if line.startswith(GRAY_CLUSTER + "::")}
        return sorted(h for h in hosts if re.fullmatch(r"[0-9.]+:[0-9]+", h))

    async def until(self, what: str, check: Any, timeout: float = 15) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not await check():
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"not within {timeout}s: {what}") from None

    def proxy(self) -> ProxyStatus:
        (found,) = [p for p in self.plane.tracker.proxies().values() if p.connected]
        return found


def spec() -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane=LANE,
        entry=SERVICE,
        services=[pb.ServiceVersions(service=SERVICE, base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in (20, 100)],
    )


@pytest.fixture(params=["sotw", "delta"])
async def stack(request: pytest.FixtureRequest, store: EtcdStore, envoy: Any) -> AsyncIterator[Stack]:
    async with contextlib.AsyncExitStack() as es:
        yield await checkout_stack(es, store, envoy, Stack, protocol=request.param, node_id=f"envoy-{request.param}")


TAGGED = [{xv.LANE_HEADER: LANE}, {xv.BAGGAGE_HEADER: f"{xv.BAGGAGE_KEY}={LANE}"}]


async def test_a_pending_release_is_staged_in_envoy_and_its_start_sends_routes_only(stack: Stack) -> None:
    await stack.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec()))

    async def staged() -> bool:
        return GRAY_CLUSTER in await stack.dynamic_clusters() and bool(await stack.gray_hosts())

    await stack.until("the gray cluster is active in Envoy with its endpoint", staged)
    assert await stack.gray_hosts() == [f"127.0.0.1:{stack.v2.port}"]
    # Staged, not routed: no request reaches gray, tagged or not.
    for headers in [{}, *TAGGED]:
        result = await stack.load(300, headers=headers)
        assert result.failed == 0, (headers, result.statuses, result.errors)
        assert result.versions == {"v1": result.sent}, (headers, result.versions)
    r = await stack.stub.GetRelease(api.GetReleaseRequest(name="rel"))
    assert r.status.phase == pb.PENDING

    clusters_before = await stack.dynamic_clusters()
    pushed_before = len(stack.proxy().pushes)
    await stack.stub.NextBatch(api.ActionRequest(name="rel", actor="test"))
    r = await stack.until_reached()
    assert r.status.phase == pb.PROGRESSING and r.status.weight == 20
    assert r.status.convergence.converged == r.status.convergence.proxies == 1

    # The start sent route configs alone: no CDS or EDS push, Envoy's clusters untouched.
    sent = [(p.type_url, p.resources) for p in stack.proxy().pushes[pushed_before:]]
    assert sent and {type_url for type_url, _ in sent} == {ROUTE}, sent
    clusters_after = await stack.dynamic_clusters()
    assert {n: (c["version_info"], c["last_updated"]) for n, c in clusters_after.items()} == {
        n: (c["version_info"], c["last_updated"]) for n, c in clusters_before.items()
    }
    # ...and the split happened: tagged traffic all gray, untagged at the batch's weight.
    for headers in TAGGED:
        result = await stack.load(200, headers=headers)
        assert result.failed == 0 and result.versions == {"v2": result.sent}, (headers, result.versions)
    result = await stack.load(2000)
    assert result.failed == 0, (result.statuses, result.errors)
    assert abs(result.share("v2") - 0.2) <= binomial_bound(result.sent, 0.2), result.versions


async def test_a_pending_release_deleted_takes_its_staged_cluster_away(stack: Stack) -> None:
    await stack.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec()))

    async def present() -> bool:
        return GRAY_CLUSTER in await stack.dynamic_clusters()

    async def absent() -> bool:
        return not await present()

    await stack.until("the gray cluster is staged in Envoy", present)
    await stack.stub.DeleteRelease(api.DeleteReleaseRequest(name="rel", actor="test"))
    await stack.until("the staged cluster is gone from Envoy", absent)
    result = await stack.load(300)
    assert result.failed == 0 and result.versions == {"v1": result.sent}, (result.statuses, result.versions)
    assert stack.proxy().last_nack is None
