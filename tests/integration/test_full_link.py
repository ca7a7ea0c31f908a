"""Issue 4 acceptance: full-link gray lanes through the chain A -> B -> C -> D -> E.

Real etcd, a real control plane, real Envoys (an edge and one sidecar per calling
service) and the demo services, which answer with the path each request took. Every
assertion about isolation is made on those paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.store import EtcdStore
from graylane.deploy.demo.chain import ChainAnswer
from graylane.deploy.local.stack import header_rule, manual_canary
from graylane.v1 import release_pb2 as pb

from .test_chain import chain_stack

STABLE = "a:v1>b:v1>c:v1>d:v1>e:v1"
BC = "gray-bc"
BC_PATH = "a:v1>b:v2>c:v2>d:v1>e:v1"
TESTER = {"x-user": "tester"}


def bound(n: int, p: float, z: float = 3.29) -> float:
    """Half-width of the two-sided 99.9 % normal interval for a share over n trials."""
    return z * math.sqrt(p * (1 - p) / n)


async def until_reached(client: ReleaseClient, name: str, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not (await client.get_release(name)).status.reached:
            await asyncio.sleep(0.02)


async def start(client: ReleaseClient, r: pb.Release) -> None:
    """Apply `r`, move it to its first batch and wait until every proxy carries it."""
    await client.apply_release(r)
    await client.act(Action.NEXT, r.name)
    await until_reached(client, r.name)


def failures(answers: Sequence[ChainAnswer]) -> list[tuple[int, str]]:
    return [(a.status, a.error) for a in answers if not a.ok]


async def test_rules_send_the_whole_chain_into_the_lane_and_the_weight_splits_the_rest(
    store: EtcdStore, envoy_binary: Path
) -> None:
    async with chain_stack(store, envoy_binary) as (chain, client, _):
        await start(
            client,
            manual_canary(
                "bc", lane=BC, entry="b", grays=[("b", "v2"), ("c", "v2")], weights=[20], rules=[header_rule(TESTER)]
            ),
        )
        # Every sixth request is a tester's; the others are plain traffic.
        answers = await chain.run(2400, headers_for=lambda i: TESTER if i % 6 == 0 else {}, timeout=120)
        assert len(answers) == 2400
        assert failures(answers) == []
        testers = answers[::6]
        plain = [a for i, a in enumerate(answers) if i % 6]
        assert Counter(a.path for a in testers) == {BC_PATH: len(testers)}
        paths = Counter(a.path for a in plain)
        assert set(paths) <= {STABLE, BC_PATH}, paths  # never a mixed path
        share = paths[BC_PATH] / len(plain)
        assert abs(share - 0.2) <= bound(len(plain), 0.2), share
        # Outside the lane (no tag after b), no request ever touched b:v2 or c:v2; inside,
        # every hop after the entry saw the lane tag.
        for a in answers:
            tagged = [h.lane for h in a.hops[2:]]
            if a.path == BC_PATH:
                assert tagged == [BC, BC, BC]
            else:
                assert tagged == ["", "", ""] and not {"b:v2", "c:v2"} & {h.name for h in a.hops}

        # The proxies' own counts, per service, version and lane, through the API: the lane
        # is counted apart at every hop where it has a version (d and e count it in v1).
        in_lane = sum(a.path == BC_PATH for a in answers)
        want = {("b", "v2"): in_lane, ("c", "v2"): in_lane}
        lane_counts: dict[tuple[str, str], int] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while lane_counts != want:
                    traffic = await client.get_traffic("bc")
                    lane_counts = {
                        (c.service, c.version): c.requests for c in traffic.counts if c.lane == BC and c.requests
                    }
                    if lane_counts != want:
                        await asyncio.sleep(0.05)
        assert lane_counts == want
        base = {(c.service, c.version): c.requests for c in traffic.counts if c.lane == ""}
        assert base[("b", "v1")] >= len(answers) - in_lane  # outside the lane (plus the warm-up requests)
        assert traffic.proxies == len(chain.envoys)


async def test_baggage_survives_end_to_end_and_carries_the_lane(store: EtcdStore, envoy_binary: Path) -> None:
    async with chain_stack(store, envoy_binary) as (chain, client, _):
        await start(
            client,
            manual_canary(
                "bc", lane=BC, entry="b", grays=[("b", "v2"), ("c", "v2")], weights=[0], rules=[header_rule(TESTER)]
            ),
        )
        inside = await chain.request({**TESTER, "baggage": "tenant=acme"})
        assert inside.ok and inside.path == BC_PATH
        assert inside.hops[0].baggage_members() == {"tenant": "acme"}
        for hop in inside.hops[2:]:  # after the entry: the app's member kept, the lane's added
            assert hop.baggage_members() == {"tenant": "acme", "graylane": BC}, hop
        outside = await chain.request({"baggage": "tenant=acme"})
        assert outside.ok and outside.path == STABLE
        assert all(h.baggage_members() == {"tenant": "acme"} for h in outside.hops)


async def test_an_app_that_only_propagates_baggage_stays_in_its_lane(store: EtcdStore, envoy_binary: Path) -> None:
    async with chain_stack(store, envoy_binary, propagate_lane_header=False) as (chain, client, _):
        await start(
            client,
            manual_canary(
                "bc", lane=BC, entry="b", grays=[("b", "v2"), ("c", "v2")], weights=[30], rules=[header_rule(TESTER)]
            ),
        )
        tester = await chain.request(TESTER)
        assert tester.ok and tester.path == BC_PATH
        assert [h.lane for h in tester.hops[2:]] == ["", "", ""]  # no header: baggage alone
        answers = await chain.run(600, timeout=60)
        assert failures(answers) == []
        paths = Counter(a.path for a in answers)
        assert set(paths) == {STABLE, BC_PATH}, paths  # both occur, never mixed


async def test_two_overlapping_lanes_are_isolated_and_one_rolls_back_under_load(
    store: EtcdStore, envoy_binary: Path
) -> None:
    versions = {"b": ("v1", "v2"), "c": ("v1", "v2", "v3"), "d": ("v1", "v2")}
    x_path, y_path = BC_PATH, "a:v1>b:v1>c:v3>d:v2>e:v1"
    async with chain_stack(store, envoy_binary, versions=versions) as (chain, client, plane):
        await start(
            client, manual_canary("x", lane="lane-x", entry="b", grays=[("b", "v2"), ("c", "v2")], weights=[30])
        )
        await start(
            client, manual_canary("y", lane="lane-y", entry="c", grays=[("c", "v3"), ("d", "v2")], weights=[30])
        )
        answers = await chain.run(1500, timeout=90)
        assert failures(answers) == []
        paths = Counter(a.path for a in answers)
        assert set(paths) == {STABLE, x_path, y_path}, paths  # 0 cross-lane hops
        for a in answers:
            lanes = {h.lane for h in a.hops[2:]} - {""}
            assert len(lanes) <= 1, a  # one decision per request, kept to the end

        # Roll lane x back while traffic runs: its requests return to base, none fails.
        load = asyncio.create_task(chain.run(3000, timeout=90))
        async with asyncio.timeout(30):
            while chain.answered < 1000:
                await asyncio.sleep(0.01)
        await client.act(Action.ROLLBACK, "x")
        during = await load
        assert len(during) == 3000
        assert failures(during) == []
        assert set(Counter(a.path for a in during)) <= {STABLE, x_path, y_path}
        dataplane = plane.dataplane
        async with asyncio.timeout(10):  # the lane is gone from the view and every proxy has that
            while dataplane.view is None or "lane-x" in {lane.name for lane in dataplane.view.lanes}:
                await asyncio.sleep(0.02)
            await dataplane.wait_current()
        after = await chain.run(600, timeout=60)
        assert failures(after) == []
        assert set(Counter(a.path for a in after)) == {STABLE, y_path}
