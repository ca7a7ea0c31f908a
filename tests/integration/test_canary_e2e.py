"""Issue 3 end to end: release state in etcd -> control plane xDS -> a real Envoy -> real upstreams.

Every test runs for both ADS flavours (state-of-the-world and delta).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import LoadResult, run_load
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api

from tests.integration.conftest import CheckoutStack, binomial_bound, checkout_stack

SERVICE = "checkout"


class Stack(CheckoutStack):
    async def load(self, count: int = 2000, **kw: Any) -> LoadResult:
        kw.setdefault("max_seconds", 30)
        kw.setdefault("concurrency", 16)
        return await run_load(self.envoy.listen_port, authority=SERVICE, count=count, **kw)

    async def act(self, call: Callable[..., Awaitable[pb.Release]], **kw: Any) -> pb.Release:
        return await call(api.ActionRequest(name="rel", actor="test", **kw))


def spec(
    weights: tuple[int, ...] = (10, 20, 50, 100), rules: list[pb.MatchRule] | None = None, strategy: int = pb.CANARY
) -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane="checkout-v2",
        entry=SERVICE,
        services=[pb.ServiceVersions(service=SERVICE, base_version="v1", gray_version="v2")],
        strategy=strategy,
        match=rules or [],
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in weights],
    )


@pytest.fixture(params=["sotw", "delta"])
async def stack(request: pytest.FixtureRequest, store: EtcdStore, envoy: Any) -> AsyncIterator[Stack]:
    async with contextlib.AsyncExitStack() as es:
        yield await checkout_stack(es, store, envoy, Stack, protocol=request.param, node_id=f"envoy-{request.param}")


async def test_split_matches_each_batch_weight(stack: Stack) -> None:
    await stack.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec()))
    shares = {}
    for weight in (10, 20, 50, 100):
        await stack.act(stack.stub.NextBatch)
        r = await stack.until_reached()
        assert r.status.weight == weight and r.status.convergence.converged == r.status.convergence.proxies == 1
        result = await stack.load(2000)
        assert result.failed == 0, (result.statuses, result.errors)
        share = result.share("v2")
        shares[weight] = share
        assert abs(share - weight / 100) <= binomial_bound(result.sent, weight / 100), shares
    assert shares[100] == 1.0


HEADER_RULES = [
    (
        [pb.Condition(kind=pb.HEADER, name="x-user", op=pb.EXACT, value="tester")],
        {"x-user": "tester"},
        {"x-user": "tester2"},
    ),
    (
        [pb.Condition(kind=pb.HEADER, name="x-user", op=pb.PREFIX, value="beta-")],
        {"x-user": "beta-7"},
        {"x-user": "alpha-7"},
    ),
    (
        [pb.Condition(kind=pb.HEADER, name="x-user", op=pb.REGEX, value="u[0-9]+")],
        {"x-user": "u42"},
        {"x-user": "u42x"},
    ),
    ([pb.Condition(kind=pb.HEADER, name="x-canary", op=pb.PRESENT)], {"x-canary": ""}, {"x-other": "1"}),
    (
        [pb.Condition(kind=pb.COOKIE, name="group", op=pb.EXACT, value="beta")],
        {"cookie": "a=1; group=beta; z=2"},
        {"cookie": "group=betax"},
    ),
    ([pb.Condition(kind=pb.QUERY, name="gray", op=pb.EXACT, value="1")], "/?gray=1", "/?gray=2"),
    (
        [
            pb.Condition(kind=pb.HEADER, name="x-a", op=pb.EXACT, value="1"),
            pb.Condition(kind=pb.HEADER, name="x-b", op=pb.EXACT, value="2"),
        ],
        {"x-a": "1", "x-b": "2"},
        {"x-a": "1"},
    ),
]


@pytest.mark.parametrize(
    ("conditions", "matching", "other"),
    HEADER_RULES,
    ids=["header-exact", "header-prefix", "header-regex", "header-present", "cookie", "query", "and-of-two-headers"],
)
async def test_rules_send_matching_requests_to_gray(
    stack: Stack, conditions: list[pb.Condition], matching: Any, other: Any
) -> None:
    rules = [pb.MatchRule(conditions=conditions)]
    await stack.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec((0, 100), rules)))
    await stack.act(stack.stub.NextBatch)
    await stack.until_reached()

    def as_kw(x: Any) -> dict[str, Any]:
        return {"path": x} if isinstance(x, str) else {"headers": x}

    hit = await stack.load(200, **as_kw(matching))
    miss = await stack.load(200, **as_kw(other))
    assert hit.failed == miss.failed == 0
    assert hit.versions == {"v2": 200}
    assert miss.versions == {"v1": 200}  # weight 0: the rest stays on base


async def test_two_rules_are_ored_and_the_rest_follows_the_weight(stack: Stack) -> None:
    rules = [
        pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-user", op=pb.EXACT, value="a")]),
        pb.MatchRule(conditions=[pb.Condition(kind=pb.QUERY, name="beta", op=pb.PRESENT)]),
    ]
    await stack.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec((50, 100), rules)))
    await stack.act(stack.stub.NextBatch)
    await stack.until_reached()
    assert (await stack.load(200, headers={"x-user": "a"})).versions == {"v2": 200}
    assert (await stack.load(200, path="/?beta")).versions == {"v2": 200}
    rest = await stack.load(2000, headers={"x-user": "b"})
    assert abs(rest.share("v2") - 0.5) <= binomial_bound(rest.sent, 0.5)


async def test_zero_failed_requests_through_a_whole_rollout(stack: Stack) -> None:
    await stack.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=spec()))
    stop = asyncio.Event()
    load = asyncio.create_task(stack.load(60_000, rate=250, max_seconds=60, stop=stop, concurrency=8))
    try:
        # The gray cluster appears together with its first weight (the make-before-break case).
        for call in [stack.stub.NextBatch] * 4 + [
            stack.stub.Rollback,
            stack.stub.Restart,
            stack.stub.NextBatch,
            stack.stub.Promote,
        ]:
            r = await stack.act(call)
            if r.status.phase in (pb.PROGRESSING, pb.PAUSED):
                await stack.until_reached()
            await asyncio.sleep(
                0.3
            )  # let the load run on each step: this is traffic pacing, not a wait for a condition
    finally:
        stop.set()
        result = await load
    assert result.sent >= 200 and result.rate >= 200, result
    assert result.failed == 0, (result.statuses, result.errors)
    assert set(result.versions) == {"v1", "v2"}
    after = await stack.load(500)
    assert after.versions == {"v2": 500}  # promoted: v2 is stable
    svc = await stack.stub.ListServices(api.ListServicesRequest())
    assert [s.stable_version for s in svc.services] == ["v2"]
