"""Full-link gray lanes end to end: the demo chain A -> B -> C -> D -> E behind real Envoys.

A real etcd and control plane; one edge Envoy and one sidecar Envoy per calling service,
all configured over ADS; the services are `graylane.deploy.demo.service` instances that
pass the trace context, baggage and (optionally) the `x-graylane` header on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.local.envoy import http_get
from graylane.controlplane.store import EtcdStore
from graylane.deploy.demo.chain import Chain, ChainAnswer
from graylane.deploy.local.stack import header_rule, manual_canary
from graylane.v1 import release_pb2 as pb

from tests.integration.conftest import control_plane

STABLE = "a:v1>b:v1>c:v1>d:v1>e:v1"
LANE = "gray-bc"
LANE_PATH = "a:v1>b:v2>c:v2>d:v1>e:v1"
TESTER = {"x-user": "tester"}


@contextlib.asynccontextmanager
async def chain_stack(
    store: EtcdStore,
    envoy_binary: Path,
    *,
    propagate_lane_header: bool = True,
    protocol: str = "sotw",
    versions: Mapping[str, tuple[str, ...]] | None = None,
) -> AsyncIterator[tuple[Chain, ReleaseClient, ControlPlane]]:
    async with contextlib.AsyncExitStack() as stack:
        plane = await stack.enter_async_context(control_plane(store))
        client = await stack.enter_async_context(ReleaseClient.connect(f"127.0.0.1:{plane.api_port}", actor="test"))
        chain = await stack.enter_async_context(
            Chain(
                xds_port=plane.xds_port,
                client=client,
                versions=versions or {"b": ("v1", "v2"), "c": ("v1", "v2")},
                propagate_lane_header=propagate_lane_header,
                protocol=protocol,
                envoy_binary=envoy_binary,
            )
        )
        yield chain, client, plane


def full_link_release() -> pb.Release:
    return manual_canary(
        "gray-bc",
        lane=LANE,
        entry="b",
        grays=[("b", "v2"), ("c", "v2")],
        weights=(0, 100),
        rules=[header_rule({"x-user": "tester"})],
    )


async def until_reached(client: ReleaseClient, name: str, timeout: float = 15) -> pb.Release:
    async with asyncio.timeout(timeout):
        while True:
            r = await client.get_release(name)
            if r.status.reached:
                return r
            await asyncio.sleep(0.02)


async def lane_opened(client: ReleaseClient, *, reason: str = "", timeout: float = 15) -> pb.Release:
    """full_link_release applied and its first batch (the lane, rules only) reached."""
    release = full_link_release()
    await client.apply_release(release)
    await client.act(Action.NEXT, release.name, reason=reason)
    return await until_reached(client, release.name, timeout=timeout)


def failures(answers: list[ChainAnswer]) -> list[ChainAnswer]:
    return [a for a in answers if not a.ok][:3]


@pytest.mark.envoy
@pytest.mark.etcd
async def test_without_a_release_every_request_takes_the_stable_path_and_carries_its_context(
    store: EtcdStore, envoy_binary: Path
) -> None:
    async with chain_stack(store, envoy_binary) as (chain, _, _):
        assert [e.node_id for e in chain.envoys] == ["sidecar-a", "sidecar-b", "sidecar-c", "sidecar-d", "edge"]
        answers = await chain.run(200, concurrency=16, timeout=30)
        assert len(answers) == 200 and not failures(answers), failures(answers)
        assert {a.path for a in answers} == {STABLE}
        assert all(len(a.hops) == 5 and len({h.trace_id for h in a.hops}) == 1 for a in answers)

        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        answer = await chain.request({"baggage": "tenant=acme", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert answer.status == 200 and answer.path == STABLE, answer
        assert [h.baggage_members() for h in answer.hops] == [{"tenant": "acme"}] * 5
        assert {h.trace_id for h in answer.hops} == {trace_id}
        assert all(h.lane == "" for h in answer.hops)

        chain.service_instance("d", "v1").error_rate = 1.0
        broken = await chain.request()
        assert broken.status == 502 and broken.path == "a:v1>b:v1>c:v1>d:v1", broken
        assert "d:v1: injected error" in broken.error


@pytest.mark.envoy
@pytest.mark.etcd
@pytest.mark.parametrize("propagate_lane_header", [True, False], ids=["header-and-baggage", "baggage-only"])
async def test_a_full_link_lane_keeps_matching_requests_on_gray_through_every_hop(
    store: EtcdStore, envoy_binary: Path, propagate_lane_header: bool
) -> None:
    async with chain_stack(store, envoy_binary, propagate_lane_header=propagate_lane_header) as (chain, client, _):
        r = await lane_opened(client, reason="test: open the lane (rules only)")
        assert r.status.weight == 0 and r.status.convergence.proxies == len(chain.envoys)

        tester = await chain.request({**TESTER, "baggage": "tenant=acme"})
        assert tester.status == 200 and tester.path == LANE_PATH, tester
        assert len({h.trace_id for h in tester.hops}) == 1
        a, *after = tester.hops
        assert a.lane == "" and a.baggage_members() == {"tenant": "acme"}
        for hop in after:  # b, where the lane is decided, and every later hop
            assert hop.baggage_members() == {"tenant": "acme", "graylane": LANE}, hop
        lanes = [h.lane for h in after]
        assert lanes == ([LANE] * 4 if propagate_lane_header else [LANE, "", "", ""])

        mixed = await chain.run(
            300, headers_for=lambda i: TESTER if i % 3 == 0 else {"x-user": f"user-{i}"}, timeout=30
        )
        assert len(mixed) == 300 and not failures(mixed), failures(mixed)
        for i, answer in enumerate(mixed):
            assert answer.path == (LANE_PATH if i % 3 == 0 else STABLE), (i, answer)
        plain = [a for i, a in enumerate(mixed) if i % 3]
        assert all(h.lane == "" and "graylane" not in h.baggage_members() for a in plain for h in a.hops)

        # The last batch sends everyone into the lane: the entry tags the whole share.
        await client.act(Action.NEXT, r.name, reason="test: everyone")
        await until_reached(client, r.name)
        everyone = await chain.run(100, headers_for=lambda i: {"x-user": f"user-{i}"}, timeout=30)
        assert len(everyone) == 100 and {a.path for a in everyone} == {LANE_PATH}, failures(everyone)
        assert all(h.baggage_members().get("graylane") == LANE for a in everyone for h in a.hops[1:])


@pytest.mark.envoy
@pytest.mark.etcd
@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_the_first_batch_and_the_promote_reach_every_proxy_within_seconds(
    store: EtcdStore, envoy_binary: Path, protocol: str
) -> None:
    async with chain_stack(store, envoy_binary, protocol=protocol) as (chain, client, plane):
        release = await lane_opened(client, timeout=5)
        await client.act(Action.PROMOTE, release.name, reason="test: ship it")
        dataplane = plane.dataplane

        def promoted() -> bool:
            view = dataplane.view
            bases = {s.name: s.base_version for s in view.services} if view is not None else {}
            return view is not None and not view.lanes and (bases["b"], bases["c"]) == ("v2", "v2")

        async with asyncio.timeout(5):
            while not (promoted() and dataplane.proxies_current()):
                await asyncio.sleep(0.02)
        answers = await chain.run(50, timeout=10)
        assert {a.path for a in answers} == {LANE_PATH}


async def test_the_service_cli_serves_until_sigterm() -> None:
    service = [sys.executable, "-P", "-m", "graylane.deploy.demo.service"]
    argv = [*service, "--service", "e", "--version", "v3", "--port", "0"]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            port = int(await process.stdout.readline())
        status, body = await http_get(port, "/anything", host="e")
        assert status == 200 and json.loads(body)["path"] == "e:v3"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
