"""Faults across the fleet: replicas killed or stopped, Envoys restarted, duplicated, churned.

Real etcd, real Envoys (deploy/envoy bootstraps), `graylane serve` subprocesses where the
replica itself is the thing that fails, and traffic from separate processes. Each scenario
checks three things against each other: the requests that must not fail did not, the
release's history holds exactly one event per transition, and status claims only what the
Envoys' own /config_dump shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.local.envoy import DELTA, SOTW, EnvoyProcess
from graylane.controlplane.local.ports import free_port
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc

from tests.integration.conftest import (
    STRICT_RUNTIME,
    api_stub,
    big_rule,
    checkout_replica,
    eventually,
    first_batch_reached,
    lane_spec,
    poll_release,
    register,
    stop_group,
)

from .test_convergence_faults import (
    gray_weight,
    load_process,
    load_result,
    reached_events,
)

BIN = pathlib.Path(sys.executable).parent


# ------------------------------------------------------------------ graylane serve replicas


class Served:
    """One `graylane serve` process on an external etcd, in its own process group."""

    def __init__(self, tmp: pathlib.Path, etcd: str, prefix: str, *, leader_ttl: int, stale: float) -> None:
        self.api_port, self.xds_port, self.http_port = free_port(), free_port(), free_port()
        self.log_path = tmp / f"serve-{self.api_port}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "graylane"),
                    "serve",
                    "--etcd",
                    etcd,
                    "--etcd-prefix",
                    prefix,
                    "--leader-ttl",
                    str(leader_ttl),
                    "--stale-proxy-seconds",
                    f"{stale:g}",
                    "--listen",
                    f"127.0.0.1:{self.api_port}",
                    "--xds-listen",
                    f"127.0.0.1:{self.xds_port}",
                    "--http-listen",
                    f"127.0.0.1:{self.http_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        stop_group(self.proc)


StartServe = Callable[..., Awaitable[tuple[Served, Any]]]


@pytest.fixture
async def serve(tmp_path: pathlib.Path, etcd_endpoint: str, store: EtcdStore) -> AsyncIterator[StartServe]:
    """`await serve(leader_ttl=2, stale=8)`: a replica answering its API, and a stub on it."""
    started: list[Served] = []
    async with contextlib.AsyncExitStack() as es:

        async def start(*, leader_ttl: int, stale: float) -> tuple[Served, Any]:
            served = Served(tmp_path, etcd_endpoint, store.prefix, leader_ttl=leader_ttl, stale=stale)
            started.append(served)
            stub = await api_stub(es, served)
            async with asyncio.timeout(30):
                while True:
                    assert served.proc.poll() is None, served.log()
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.ListReleases(api.ListReleasesRequest(), timeout=2)
                        return served, stub
                    await asyncio.sleep(0.1)

        try:
            yield start
        finally:
            for served in started:
                served.stop()


async def leader_and_follower(
    es: contextlib.AsyncExitStack, serve: StartServe, **options: Any
) -> tuple[Served, Served, api_grpc.ReleaseServiceStub]:
    """Upstreams of checkout v1 and v2 (closed with `es`), a replica `a` that leads, then a
    replica `b`; the stub talks to `b`, with both versions registered."""
    v1 = await es.enter_async_context(Upstream("checkout", "v1"))
    v2 = await es.enter_async_context(Upstream("checkout", "v2"))
    a, _ = await serve(**options)
    async with asyncio.timeout(10):
        while not leads(a):
            await asyncio.sleep(0.05)
    b, stub = await serve(**options)
    await register(stub, "checkout", v1, v2)
    return a, b, stub


def leader_lines(served: Served) -> list[str]:
    """The replica's own log lines about taking or losing the leadership, in order."""
    return [
        line
        for line in served.log().splitlines()
        if " is the leader" in line or "lost its leader lease" in line or "campaigning on a new lease" in line
    ]


def leads(served: Served) -> bool:
    """Whether the replica's last word about the leadership was taking it."""
    lines = leader_lines(served)
    return bool(lines) and " is the leader" in lines[-1]


async def load_never_failed(load: asyncio.subprocess.Process) -> None:
    """Wait for a background load run to end: it sent over 300 requests, none failed."""
    result = await load_result(load)
    assert result["failed"] == 0 and result["sent"] > 300, result


async def kill_leader(a: Served, b: Served, ttl: float) -> float:
    """SIGKILL replica `a`, the leader, and wait (up to its lease `ttl` + 10 s) until `b`
    leads: the time of the kill."""
    a.signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    killed = time.monotonic()
    await eventually(lambda: leads(b), timeout=ttl + 10, what="the other replica leading")
    return killed


async def transitions(stub: Any, name: str) -> list[str]:
    history = await stub.History(api.HistoryRequest(name=name))
    return [e.action for e in history.events]


async def weight_is(proxy: EnvoyProcess, weight: int) -> bool:
    return await gray_weight(proxy) == weight


def envoy_kill9(proxy: EnvoyProcess) -> None:
    assert proxy.pid is not None
    os.kill(proxy.pid, signal.SIGKILL)


# ------------------------------------------------------------------ 1. leader replica kill -9


@pytest.mark.chaos
async def test_leader_replica_kill9_keeps_its_envoys_counted_until_they_carry_the_batch_or_are_stale(
    serve: StartServe, store: EtcdStore, envoy: Any
) -> None:
    """Two `graylane serve` replicas; two Envoys on the leader, one on the other. The leader
    is killed with -9 under traffic and the other takes over. The next batch is not reached
    while the dead replica's Envoys still serve the old weight (their config_dump says so);
    one of them, restarted against the live replica, carries it and counts there; the other,
    left on its last config (serving it without a failure), holds the batch until the
    stale-proxy timeout, which names it."""
    ttl, stale = 2, 14.0
    async with contextlib.AsyncExitStack() as es:
        a, b, stub = await leader_and_follower(es, serve, leader_ttl=ttl, stale=stale)
        moved = await envoy(ads_port=a.xds_port, node_id="on-a-moved")
        orphan = await envoy(ads_port=a.xds_port, node_id="on-a-orphan")
        on_b = await envoy(ads_port=b.xds_port, node_id="on-b")
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")))
        await stub.NextBatch(api.ActionRequest(name="rel"))
        # Every replica's proxies counted (the race test below covers the first moments).
        await poll_release(stub, "rel", lambda r: r.status.reached and r.status.convergence.converged == 3)

        load_moved = await load_process(moved.listen_port, ttl + 6)
        load_orphan = await load_process(orphan.listen_port, stale + 8)
        load_b = await load_process(on_b.listen_port, stale + 8)
        await asyncio.sleep(0.5)  # traffic pacing: some load before the kill
        killed = await kill_leader(a, b, ttl)
        assert b.proc.poll() is None

        await stub.NextBatch(api.ActionRequest(name="rel"))
        asked = time.monotonic()
        await eventually(lambda: weight_is(on_b, 50))
        # Past the dead replica's lease (its keys are gone): its Envoys are still on batch 0.
        async with asyncio.timeout(ttl + 10):
            while time.monotonic() - killed < ttl + 3:
                got = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
                assert await gray_weight(moved) == 10 and await gray_weight(orphan) == 10
                assert not got.status.reached, got.status
                await asyncio.sleep(0.1)
        assert got.status.convergence.proxies == 3 and got.status.convergence.converged == 1, got.status
        assert any("on-a-moved" in n and "on-a-orphan" in n for n in got.status.convergence.lagging), got.status
        await load_never_failed(load_moved)

        # One Envoy restarts against the live replica (same node id): it carries the batch and
        # counts there; the orphan still holds the batch back.
        await moved.stop()
        again = await envoy(ads_port=b.xds_port, node_id="on-a-moved")
        await eventually(lambda: weight_is(again, 50))
        await poll_release(stub, "rel", lambda r: r.status.convergence.converged == 2, timeout=10)
        while time.monotonic() - asked < stale * 0.8:
            got = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
            assert not got.status.reached, got.status
            assert (got.status.convergence.proxies, got.status.convergence.converged) == (3, 2), got.status
            assert await gray_weight(orphan) == 10
            await asyncio.sleep(0.2)
        assert any("on-a-orphan" in n and "on-a-moved" not in n for n in got.status.convergence.lagging), got.status

        # At the stale timeout the orphan is declared gone, by name; it still serves batch 0.
        done = await poll_release(stub, "rel", lambda r: r.status.reached, timeout=stale)
        assert time.monotonic() - asked >= stale * 0.9
        assert (done.status.convergence.proxies, done.status.convergence.converged) == (2, 2), done.status
        assert await gray_weight(orphan) == 10
        assert await gray_weight(again) == 50 and await gray_weight(on_b) == 50
        for process in (load_orphan, load_b):
            result = await load_result(process)
            assert result["failed"] == 0 and result["sent"] > 1000, result
        assert await transitions(stub, "rel") == ["create", "next", "reached", "next", "reached"]
        # Status names the orphan as gone when the batch is reached, and keeps naming it (it
        # still serves batch 0: its config_dump above).
        later = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
        named = [
            (r.status.convergence.gone, list(r.status.convergence.gone_names))
            for r in (done, later)
            if r.status.convergence.gone != 1 or not any("on-a-orphan" in n for n in r.status.convergence.gone_names)
        ]
        assert not named, (
            "a silent replica's proxies must stay counted, then named as gone "
            f"after the stale timeout (reached with gone/gone_names {named} while on-a-orphan serves batch 0)"
        )


# ------------------------------------------------------------------ 2. leader replica SIGSTOP


@pytest.mark.chaos
async def test_leader_replica_stopped_past_its_lease_then_resumed(
    serve: StartServe, store: EtcdStore, envoy: Any
) -> None:
    """The leader is SIGSTOPped for longer than its lease under traffic, a batch is asked of
    the other replica meanwhile, then the leader resumes: no process exits, one leader
    afterwards, one event per transition, and status matches both Envoys' config_dump."""
    ttl, stale, stall = 2, 30.0, 6.0
    async with contextlib.AsyncExitStack() as es:
        a, b, stub = await leader_and_follower(es, serve, leader_ttl=ttl, stale=stale)
        on_a = await envoy(ads_port=a.xds_port, node_id="on-a")
        on_b = await envoy(ads_port=b.xds_port, node_id="on-b")
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")))
        await stub.NextBatch(api.ActionRequest(name="rel"))
        await poll_release(stub, "rel", lambda r: r.status.reached and r.status.convergence.converged == 2)
        identity_a = await store.leader()
        loads = [await load_process(p.listen_port, stall + 10) for p in (on_a, on_b)]
        await asyncio.sleep(0.5)  # traffic pacing: some load before the stall

        a.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            async with asyncio.timeout(ttl + 10):
                while not leads(b):
                    await asyncio.sleep(0.05)
            identity_b = await store.leader()
            assert identity_b and identity_b != identity_a
            await stub.NextBatch(api.ActionRequest(name="rel"))
            await eventually(lambda: weight_is(on_b, 50))
            # The stopped replica's Envoy serves batch 0: the batch is not reached.
            while time.monotonic() - stopped < stall:
                got = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
                assert not got.status.reached, got.status
                assert await gray_weight(on_a) == 10
                await asyncio.sleep(0.1)
        finally:
            a.signal(signal.SIGCONT)
        # Resumed: it hears of the batch and serves it to its Envoy; the batch is reached.
        await eventually(lambda: weight_is(on_a, 50), timeout=15)
        done = await poll_release(stub, "rel", lambda r: r.status.reached, timeout=15)
        assert done.status.weight == 50 and done.status.convergence.gone == 0, done.status
        await poll_release(stub, "rel", lambda r: r.status.convergence.converged == r.status.convergence.proxies == 2)
        assert await gray_weight(on_b) == 50
        for process in loads:
            result = await load_result(process)
            assert result["failed"] == 0 and result["sent"] > 600, result
        # One leader: B kept it, A's last word is losing it; both processes still run.
        await asyncio.sleep(ttl)  # pacing: give a wrongly resumed leader time to show itself
        assert await store.leader() == identity_b
        assert leads(b) and not leads(a), (leader_lines(a), leader_lines(b))
        assert a.proc.poll() is None and b.proc.poll() is None
        assert await reached_events(stub, "rel") == [("next", 0), ("reached", 0), ("next", 1), ("reached", 1)]
        assert await transitions(stub, "rel") == ["create", "next", "reached", "next", "reached"]


async def test_a_new_releases_batch_waits_for_a_live_replica_that_has_not_counted_it_yet(
    serve: StartServe, store: EtcdStore, envoy: Any
) -> None:
    """Two replicas, an Envoy on each, connected before the release exists. The follower is
    stopped for 1.5 s (well within its 3 s registry lease: it stays live) while a new
    release's first batch is asked of the leader. The follower's Envoy cannot carry the lane
    meanwhile (config_dump: weight 0), so the batch must not be reported reached."""
    ttl = 2
    async with contextlib.AsyncExitStack() as es:
        v1 = await es.enter_async_context(Upstream("checkout", "v1"))
        v2 = await es.enter_async_context(Upstream("checkout", "v2"))
        a, stub = await serve(leader_ttl=ttl, stale=30.0)
        async with asyncio.timeout(10):
            while not leads(a):
                await asyncio.sleep(0.05)
        b, _ = await serve(leader_ttl=ttl, stale=30.0)
        await register(stub, "checkout", v1, v2)
        await envoy(ads_port=a.xds_port, node_id="on-a")
        on_b = await envoy(ads_port=b.xds_port, node_id="on-b")
        async with asyncio.timeout(10):  # the follower has published its proxy
            while not any("on-b" in n for n in (await store.snapshot()).replica_proxies):
                await asyncio.sleep(0.05)

        false_reached: list[tuple[int, int, int]] = []
        b.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")))
            await stub.NextBatch(api.ActionRequest(name="rel"))
            while time.monotonic() - stopped < 1.5:
                got = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
                if got.status.reached:
                    weight = await gray_weight(on_b)
                    c = got.status.convergence
                    false_reached.append((c.proxies, c.converged, weight))
                    break
                await asyncio.sleep(0.05)
        finally:
            b.signal(signal.SIGCONT)
        assert b.proc.poll() is None and a.proc.poll() is None
        await eventually(lambda: weight_is(on_b, 10))
        done = await poll_release(stub, "rel", lambda r: r.status.reached and r.status.convergence.converged == 2)
        assert done.status.convergence.proxies == 2
        assert not false_reached, (
            "a live replica that has not counted a new release yet must hold it back: reached with "
            f"(proxies, converged, on-b's gray weight) = {false_reached[0]} while the follower was live"
        )
        assert await transitions(stub, "rel") == ["create", "next", "reached"]


# ------------------------------------------------------------------ 3. Envoy restart


async def streams_of(plane: ControlPlane, node: str, count: int) -> bool:
    return len(plane.tracker.of_node(node)) == count


@pytest.mark.parametrize("protocol", [SOTW, DELTA])
async def test_envoy_killed_mid_rollout_comes_back_on_the_current_config_counted_once(
    store: EtcdStore, envoy: Any, protocol: str
) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await checkout_replica(es, store)
        first = await envoy(ads_port=plane.xds_port, node_id="e1", protocol=protocol)
        other = await envoy(ads_port=plane.xds_port, node_id="e2", protocol=protocol)
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")))
        await stub.NextBatch(api.ActionRequest(name="rel"))
        await poll_release(stub, "rel", lambda r: r.status.reached and r.status.convergence.converged == 2)
        load = await load_process(other.listen_port, 8)
        await asyncio.sleep(0.3)  # traffic pacing: some load before the kill

        envoy_kill9(first)
        await eventually(lambda: streams_of(plane, "e1", 0))  # its stream ended with it
        await stub.NextBatch(api.ActionRequest(name="rel"))
        alone = await poll_release(stub, "rel", lambda r: r.status.reached)
        assert (alone.status.convergence.proxies, alone.status.convergence.converged) == (1, 1), alone.status
        assert await gray_weight(other) == 50

        again = await envoy(ads_port=plane.xds_port, node_id="e1", protocol=protocol)
        assert await gray_weight(again) == 50  # LIVE on the current config
        both = await poll_release(stub, "rel", lambda r: r.status.convergence.proxies == 2, timeout=10)
        assert both.status.reached and both.status.convergence.converged == 2, both.status
        assert both.status.convergence.gone == 0 and not both.status.convergence.lagging
        assert len(plane.tracker.of_node("e1")) == 1 and len(plane.tracker.proxies()) == 2
        await load_never_failed(load)
        assert await transitions(stub, "rel") == ["create", "next", "reached", "next", "reached"]


# ------------------------------------------------------------------ 4. duplicate node ids


async def test_two_envoys_with_one_node_id_are_two_proxies_and_one_nack_is_not_hidden(
    store: EtcdStore, envoy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Both Envoys say node id "twin"; the stricter one rejects the lane's rule. Both are
    counted (with a warning), the NACK names the strict one's stream, and the relaxed one's
    ACK does not make the batch reached."""
    caplog.set_level(logging.WARNING, logger="graylane.xds")
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await checkout_replica(es, store)
        relaxed = await envoy(ads_port=plane.xds_port, node_id="twin", node_cluster="relaxed-pool")
        strict = await envoy(
            ads_port=plane.xds_port, node_id="twin", node_cluster="strict-pool", runtime=STRICT_RUNTIME
        )
        assert len(plane.tracker.of_node("twin")) == 2 and "twin" in plane.tracker.duplicate_node_ids()
        assert any("'twin' has 2 open xDS streams" in r.getMessage() for r in caplog.records)
        strict_stream = next(p.stream for p in plane.tracker.of_node("twin") if p.cluster == "strict-pool")
        loads = [await load_process(p.listen_port, 6) for p in (relaxed, strict)]

        rule = big_rule()
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane", rules=[rule])))
        await stub.NextBatch(api.ActionRequest(name="rel"))
        held = await poll_release(stub, "rel", lambda r: r.status.phase == pb.PAUSED)
        nack = held.status.last_nack
        assert (nack.node, nack.cluster, nack.stream) == ("twin", "strict-pool", strict_stream), nack
        assert "program size" in nack.message
        # Both end up on what the strict one accepted (no lane); both counted, not reached.
        await eventually(lambda: _both_weight(relaxed, strict, 0))
        carried = await poll_release(
            stub, "rel", lambda r: r.status.convergence.proxies == r.status.convergence.converged == 2
        )
        assert not carried.status.reached and carried.status.served_weight == 0
        for process in loads:
            result = await load_result(process)
            assert result["failed"] == 0 and result["sent"] > 100, result
        assert await transitions(stub, "rel") == ["create", "next", "pause"]


async def _both_weight(a: EnvoyProcess, b: EnvoyProcess, weight: int) -> bool:
    return await gray_weight(a) == weight and await gray_weight(b) == weight


async def test_a_dead_replicas_envoy_is_not_taken_for_a_live_envoy_with_the_same_node_id(
    serve: StartServe, envoy: Any
) -> None:
    """Two replicas, an Envoy on each, both saying node id "twin". The leader is killed -9:
    its Envoy keeps serving batch 0 (config_dump) and nothing reconnected, so the next
    batch must not be reached before the stale timeout because the *other* "twin" is
    connected to the live replica."""
    ttl, stale = 2, 30.0
    async with contextlib.AsyncExitStack() as es:
        a, b, stub = await leader_and_follower(es, serve, leader_ttl=ttl, stale=stale)
        orphan = await envoy(ads_port=a.xds_port, node_id="twin", node_cluster="on-a")
        live = await envoy(ads_port=b.xds_port, node_id="twin", node_cluster="on-b")
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")))
        await stub.NextBatch(api.ActionRequest(name="rel"))
        await poll_release(stub, "rel", lambda r: r.status.reached and r.status.convergence.converged == 2)
        load = await load_process(orphan.listen_port, ttl + 8)

        killed = await kill_leader(a, b, ttl)
        await stub.NextBatch(api.ActionRequest(name="rel"))
        await eventually(lambda: weight_is(live, 50))
        false_reached = None
        async with asyncio.timeout(ttl + 10):
            while time.monotonic() - killed < ttl + 4:  # past the dead replica's leases
                got = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
                assert await gray_weight(orphan) == 10
                if got.status.reached:
                    c = got.status.convergence
                    false_reached = (c.proxies, c.converged, c.gone, time.monotonic() - killed)
                    break
                await asyncio.sleep(0.1)
        await load_never_failed(load)
        assert a.proc.poll() is not None and b.proc.poll() is None
        assert false_reached is None, (
            "a silent replica's proxy is not reconnected because a live proxy shares its node id: "
            "reached with "
            f"(proxies, converged, gone, s after kill) = {false_reached} while the orphan serves batch 0"
        )
        assert not got.status.reached and got.status.convergence.converged == 1, got.status


# ------------------------------------------------------------------ 5. NACK after reconnect


async def test_a_restarted_envoy_that_nacks_again_after_resume_pauses_the_release_again(
    store: EtcdStore, envoy: Any
) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await checkout_replica(es, store)
        relaxed = await envoy(ads_port=plane.xds_port, node_id="relaxed")
        strict = await envoy(ads_port=plane.xds_port, node_id="strict", runtime=STRICT_RUNTIME)
        load = await load_process(relaxed.listen_port, 10)

        rule = big_rule()
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane", rules=[rule])))
        await stub.NextBatch(api.ActionRequest(name="rel"))
        first = await poll_release(stub, "rel", lambda r: r.status.phase == pb.PAUSED)
        assert first.status.last_nack.node == "strict"

        envoy_kill9(strict)
        await eventually(lambda: streams_of(plane, "strict", 0))
        restarted = await envoy(ads_port=plane.xds_port, node_id="strict", runtime=STRICT_RUNTIME)
        assert await gray_weight(restarted) == 0  # held: it is served what it accepted
        await stub.Resume(api.ActionRequest(name="rel"))
        second = await poll_release(
            stub,
            "rel",
            lambda r: r.status.phase == pb.PAUSED and r.status.last_nack.stream != first.status.last_nack.stream,
        )
        assert second.status.last_nack.node == "strict" and "program size" in second.status.last_nack.message
        await eventually(lambda: _both_weight(relaxed, restarted, 0))
        await poll_release(stub, "rel", lambda r: r.status.convergence.proxies == r.status.convergence.converged == 2)
        await load_never_failed(load)
        assert await transitions(stub, "rel") == ["create", "next", "pause", "resume", "pause"]


# ------------------------------------------------------------------ 6. stream churn


async def test_an_envoy_restarted_ten_times_leaves_exactly_the_live_proxies(
    store: EtcdStore, envoy: Any, envoy_binary: pathlib.Path
) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await checkout_replica(es, store)
        steady = await envoy(ads_port=plane.xds_port, node_id="steady")
        await first_batch_reached(stub, lane_spec("checkout", "lane"))
        load = await load_process(steady.listen_port, 12)

        for i in range(10):
            # Alternately torn down LIVE (SotW) and while still fetching (delta); every third
            # by SIGKILL.
            churn = EnvoyProcess(
                binary=envoy_binary,
                ads_port=plane.xds_port,
                node_id="churn",
                wait_ready=i % 2 == 0,
                protocol=SOTW if i % 2 == 0 else DELTA,
            )
            await churn.start()
            if i % 3 == 0:
                envoy_kill9(churn)
            await churn.stop()
        last = await envoy(ads_port=plane.xds_port, node_id="churn")
        await eventually(lambda: _proxy_count(plane, 2))
        await stub.NextBatch(api.ActionRequest(name="rel"))
        done = await poll_release(stub, "rel", lambda r: r.status.reached)
        assert (done.status.convergence.proxies, done.status.convergence.converged) == (2, 2), done.status
        assert done.status.convergence.gone == 0
        assert await gray_weight(last) == 50 and await gray_weight(steady) == 50
        assert len(plane.tracker.of_node("churn")) == 1 and len(plane.tracker.proxies()) == 2
        await load_never_failed(load)
        assert await transitions(stub, "rel") == ["create", "next", "reached", "next", "reached"]


async def _proxy_count(plane: ControlPlane, count: int) -> bool:
    return len(plane.tracker.proxies()) == count
