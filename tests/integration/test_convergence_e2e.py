"""Convergence, NACK and control-plane restarts, end to end with a real etcd and Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from graylane.controlplane.local.envoy import EnvoyProcess, free_port
from graylane.controlplane.reconcile import convergence
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import run_load
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc
from graylane.xds.resources import PUSH_ORDER, ROUTE

from tests.integration.conftest import (
    STRICT_RUNTIME,
    api_stub,
    big_rule,
    checkout_replica,
    control_plane,
    first_batch_reached,
    lane_spec,
    poll_release,
    register,
    serving_replica,
)


@contextlib.asynccontextmanager
async def checkout_on_first_batch(
    es: contextlib.AsyncExitStack, store: EtcdStore, xds_port: int
) -> AsyncIterator[api_grpc.ReleaseServiceStub]:
    """A replica serving xDS on `xds_port` while the block runs, checkout's v1 and v2
    upstreams (closed with `es`) registered, and release "rel" moved to its first batch:
    a stub of the replica. A restart test starts the next replica on the same port."""
    v1 = await es.enter_async_context(Upstream("checkout", "v1"))
    v2 = await es.enter_async_context(Upstream("checkout", "v2"))
    async with control_plane(store, xds_port=xds_port) as plane:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as ch:
            stub = api_grpc.ReleaseServiceStub(ch)
            await register(stub, "checkout", v1, v2)
            await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")))
            await stub.NextBatch(api.ActionRequest(name="rel"))
            yield stub


async def test_nack_pauses_its_release_names_the_proxy_and_others_progress(store: EtcdStore, envoy: Any) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, _ = await serving_replica(es, store, "checkout", "search")
        proxy = await envoy(ads_port=plane.xds_port, node_id="strict-envoy", runtime=STRICT_RUNTIME)

        await first_batch_reached(stub, lane_spec("search", "good"), name="good")

        rule = big_rule()
        await stub.ApplyRelease(
            api.ApplyReleaseRequest(name="bad", spec=lane_spec("checkout", "bad-lane", rules=[rule]))
        )
        await stub.NextBatch(api.ActionRequest(name="bad"))
        bad = await poll_release(stub, "bad", lambda r: r.status.phase == pb.PAUSED)
        assert bad.status.last_nack.node == "strict-envoy"
        assert "program size" in bad.status.last_nack.message
        assert "strict-envoy" in bad.status.reason
        history = await stub.History(api.HistoryRequest(name="bad"))
        pause = history.events[-1]
        assert (pause.action, pause.actor, pause.details["node"]) == ("pause", "graylane/dataplane", "strict-envoy")

        # The other release keeps progressing and reaching its batches on the same proxy.
        await stub.NextBatch(api.ActionRequest(name="good"))
        good = await poll_release(stub, "good", lambda r: r.status.reached)
        assert (good.status.weight, good.status.convergence.converged) == (50, 1)
        # The proxy kept serving the paused release's service on its last good config.
        result = await run_load(proxy.listen_port, authority="checkout", count=300, max_seconds=10)
        assert result.failed == 0 and result.versions == {"v1": 300}


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_control_plane_restart_keeps_envoy_serving_and_resends_nothing(
    store: EtcdStore, envoy: Any, protocol: str
) -> None:
    xds_port = free_port()
    async with contextlib.AsyncExitStack() as es:
        async with checkout_on_first_batch(es, store, xds_port) as stub:
            proxy: EnvoyProcess = await envoy(ads_port=xds_port, protocol=protocol, node_id="steady")
            await poll_release(stub, "rel", lambda r: r.status.reached)
            stop = asyncio.Event()
            load = asyncio.create_task(
                run_load(proxy.listen_port, authority="checkout", count=100_000, max_seconds=30, rate=200, stop=stop)
            )
            await asyncio.sleep(0.5)  # traffic pacing: some load before the outage
        # The control plane is down: Envoy keeps its last config.
        await asyncio.sleep(1.0)  # traffic pacing: let the outage last a second under load
        async with control_plane(store, xds_port=xds_port) as plane2:
            async with asyncio.timeout(15):
                while not (p := plane2.tracker.of_node("steady")) or not all(t in p[0].acked for t in PUSH_ORDER):
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # traffic pacing after the reconnect
            stop.set()
            result = await load
            assert result.failed == 0, (result.statuses, result.errors)
            assert result.sent >= 300
            # Reconnected with what it had: the new replica sent it nothing.
            assert [s.pushes for s in plane2.tracker.of_node("steady")] == [()]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{plane2.api_port}") as ch:
                stub = api_grpc.ReleaseServiceStub(ch)
                r = await stub.NextBatch(api.ActionRequest(name="rel"))
                assert r.status.weight == 50
                await poll_release(stub, "rel", lambda r: r.status.reached)


async def test_envoy_started_while_control_plane_is_down_serves_once_it_is_back(store: EtcdStore, envoy: Any) -> None:
    xds_port = free_port()
    async with contextlib.AsyncExitStack() as es:
        async with checkout_on_first_batch(es, store, xds_port):
            pass  # the release waits in etcd at its first batch; the replica stops here
        # Control plane down; a (re)started Envoy has nothing yet.
        proxy: EnvoyProcess = await envoy(ads_port=xds_port, node_id="late", wait_ready=False)
        async with control_plane(store, xds_port=xds_port):
            async with asyncio.timeout(20):
                while True:
                    r = await run_load(proxy.listen_port, authority="checkout", count=1, max_seconds=1)
                    if r.ok:
                        break
                    await asyncio.sleep(0.05)
            result = await run_load(proxy.listen_port, authority="checkout", count=500, max_seconds=10)
            assert result.failed == 0 and set(result.versions) <= {"v1", "v2"}


async def test_duration_pauses_advance_on_their_own_once_reached(store: EtcdStore, envoy: Any) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await checkout_replica(es, store)
        await envoy(ads_port=plane.xds_port, node_id="timed")
        timed = lane_spec("checkout", "lane")
        for b in timed.batches[:2]:
            b.pause.duration.FromMilliseconds(500)
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=timed))
        await stub.NextBatch(api.ActionRequest(name="rel", actor="ci"))
        done = await poll_release(stub, "rel", lambda r: r.status.weight == 100 and r.status.reached, timeout=20)
        assert done.status.phase == pb.PROGRESSING  # the last batch is manual: it waits for `next`
        history = await stub.History(api.HistoryRequest(name="rel"))
        steps = [(e.action, e.actor, e.to_batch) for e in history.events if e.action in ("next", "reached")]
        assert steps == [
            ("next", "ci", 0),
            ("reached", "graylane/dataplane", 0),
            ("next", "graylane/dataplane", 1),
            ("reached", "graylane/dataplane", 1),
            ("next", "graylane/dataplane", 2),
            ("reached", "graylane/dataplane", 2),
        ]
        # Each timed step waited its pause after the batch was reached.
        by_seq = {e.sequence: e for e in history.events}
        for e in history.events:
            if e.action == "next" and e.actor == "graylane/dataplane":
                reached = by_seq[e.sequence - 1]
                assert reached.action == "reached"
                assert e.at.ToMilliseconds() - reached.at.ToMilliseconds() >= 500


async def test_a_batch_is_reached_only_once_the_proxies_of_every_replica_carry_it(store: EtcdStore, envoy: Any) -> None:
    """Two replicas, one Envoy on each. The leader writes convergence from its own count and
    the one the other replica publishes: while the other replica's Envoy is frozen (SIGSTOP)
    the batch is applied by one proxy of two and not reached; it is once the Envoy resumes."""
    async with contextlib.AsyncExitStack() as es:
        v1 = await es.enter_async_context(Upstream("checkout", "v1"))
        v2 = await es.enter_async_context(Upstream("checkout", "v2"))
        leader = await es.enter_async_context(control_plane(store))
        async with asyncio.timeout(10):
            await leader.election.leading.wait()
        follower = await es.enter_async_context(control_plane(store))
        assert not follower.election.is_leader
        stub = await api_stub(es, follower)
        await register(stub, "checkout", v1, v2)
        await envoy(ads_port=leader.xds_port, node_id="on-leader")
        frozen = await envoy(ads_port=follower.xds_port, node_id="on-follower")
        assert frozen.pid is not None

        first = await first_batch_reached(stub, lane_spec("checkout", "lane"))
        assert (first.status.convergence.proxies, first.status.convergence.converged) == (2, 2)

        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            await stub.NextBatch(api.ActionRequest(name="rel"))
            # The leader's own Envoy ACKs the new batch; the frozen one cannot.
            half = await poll_release(
                stub,
                "rel",
                lambda r: r.status.weight == 50 and r.status.convergence.converged == 1,
            )
            assert half.status.convergence.proxies == 2 and not half.status.reached
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        done = await poll_release(stub, "rel", lambda r: r.status.weight == 50 and r.status.reached)
        assert (done.status.convergence.proxies, done.status.convergence.converged) == (2, 2)
        history = await stub.History(api.HistoryRequest(name="rel"))
        assert [(e.action, e.to_batch) for e in history.events if e.action in ("next", "reached")] == [
            ("next", 0),
            ("reached", 0),
            ("next", 1),
            ("reached", 1),
        ]


async def test_a_next_batch_writes_only_its_own_release_and_reached_right_after_the_ack(
    store: EtcdStore, envoy: Any
) -> None:
    """Five live releases served to one Envoy: a NextBatch on one of them writes that
    release's key twice (the move, then `reached` once the Envoy ACKed) and no other
    release's key; the status of every other release stays as it was."""
    async with contextlib.AsyncExitStack() as es:
        plane = await es.enter_async_context(control_plane(store))
        stub = await api_stub(es, plane)
        names = [f"rel{i}" for i in range(5)]
        for i, name in enumerate(names):
            v1 = await es.enter_async_context(Upstream(f"svc{i}", "v1"))
            v2 = await es.enter_async_context(Upstream(f"svc{i}", "v2"))
            await register(stub, f"svc{i}", v1, v2)
            await stub.ApplyRelease(api.ApplyReleaseRequest(name=name, spec=lane_spec(f"svc{i}", f"lane{i}")))
        await envoy(ads_port=plane.xds_port, node_id="writes")
        for name in names:
            await stub.NextBatch(api.ActionRequest(name=name, actor="ci"))
        for name in names:
            await poll_release(stub, name, lambda r: r.status.reached and r.status.convergence.converged == 1)
        await plane.dataplane.wait_current()
        await asyncio.sleep(0.7)  # past the grace after the last move: nothing is left to write
        before = {name: await stub.GetRelease(api.GetReleaseRequest(name=name)) for name in names}
        start = max(r.revision for r in before.values())  # the latest release write so far
        writes: list[str] = []

        async def count() -> None:
            async for events in store.watch(start_revision=start + 1):
                for ev in events:
                    key = ev.kv.key.decode()[len(store.prefix) :]
                    if key.startswith("releases/"):
                        writes.append(key.removeprefix("releases/"))

        counter = asyncio.create_task(count())
        try:
            moved = await stub.NextBatch(api.ActionRequest(name="rel2", actor="ci"))
            assert moved.status.batch == 1
            done = await poll_release(stub, "rel2", lambda r: r.status.reached and r.status.batch == 1)
            await asyncio.sleep(0.7)  # anything a pass would still write after the grace
        finally:
            counter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counter
        assert set(writes) == {"rel2"}, writes  # no other release's status is written
        took = done.status.batch_reached.ToMilliseconds() - done.status.batch_started.ToMilliseconds()
        if took < 500:  # the ACK came within the grace after the move (_MOVE_GRACE_SECONDS)
            assert writes == ["rel2", "rel2"]  # the move, then `reached`: nothing in between
        else:  # a slow machine: the names of the proxy yet to ACK may be written in between
            assert len(writes) <= 3, writes
        for name in names:
            if name != "rel2":
                after = await stub.GetRelease(api.GetReleaseRequest(name=name))
                assert after.revision == before[name].revision
                assert after.status == before[name].status


async def test_a_proxy_joining_rewrites_every_count_over_several_passes_and_loses_none(
    store: EtcdStore, envoy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy that connects changes the count of every live release. With no write slice
    (convergence._WRITE_SLICE_SECONDS = 0) a pass writes one count-only status and leaves
    the rest to the next pass, run at once, so a `reached` that came due meanwhile would be
    written ahead of them; none of the counts is lost on the way: every release ends
    with both proxies counted and converged."""
    monkeypatch.setattr(convergence, "_WRITE_SLICE_SECONDS", 0.0)
    async with contextlib.AsyncExitStack() as es:
        plane = await es.enter_async_context(control_plane(store))
        stub = await api_stub(es, plane)
        names = [f"rel{i}" for i in range(4)]
        for i, name in enumerate(names):
            v1 = await es.enter_async_context(Upstream(f"svc{i}", "v1"))
            v2 = await es.enter_async_context(Upstream(f"svc{i}", "v2"))
            await register(stub, f"svc{i}", v1, v2)
            await stub.ApplyRelease(api.ApplyReleaseRequest(name=name, spec=lane_spec(f"svc{i}", f"lane{i}")))
            await stub.NextBatch(api.ActionRequest(name=name, actor="ci"))
        await envoy(ads_port=plane.xds_port, node_id="first")
        for name in names:
            await poll_release(stub, name, lambda r: r.status.reached and r.status.convergence.converged == 1)
        passes = plane.dataplane._convergence
        reconcile, write = passes.reconcile, passes._write_progress
        written_per_pass: list[int] = []

        async def counted_pass() -> None:
            written_per_pass.append(0)
            await reconcile()

        async def counted_write(*args: Any, **kwargs: Any) -> Any:
            out = await write(*args, **kwargs)
            if out[0] is not None:
                written_per_pass[-1] += 1
            return out

        monkeypatch.setattr(passes, "reconcile", counted_pass)
        monkeypatch.setattr(passes, "_write_progress", counted_write)
        await envoy(ads_port=plane.xds_port, node_id="second")
        for name in names:
            done = await poll_release(
                stub,
                name,
                lambda r: r.status.convergence.proxies == 2 and r.status.convergence.converged == 2,
            )
            assert done.status.reached and not done.status.convergence.lagging
        # Every write after the second Envoy joined is a count only (the batches were
        # reached already): one per pass, over several passes.
        assert max(written_per_pass) == 1, written_per_pass
        assert sum(written_per_pass) >= len(names), written_per_pass


async def test_a_pass_reading_one_stream_per_slice_counts_every_proxy(
    store: EtcdStore, envoy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass reads the changed streams a slice at a time, the loop running between slices
    (convergence._FACTS_SLICE_SECONDS); with every slice one stream long, the counts are
    still exact: `reached` only once all three Envoys ACKed each batch, three converged."""
    monkeypatch.setattr(convergence, "_FACTS_SLICE_SECONDS", 0.0)
    monkeypatch.setattr(convergence, "_CLOCK_EVERY", 1)
    async with contextlib.AsyncExitStack() as es:
        plane, stub, _ = await serving_replica(es, store, "checkout")
        for i in range(3):
            await envoy(ads_port=plane.xds_port, node_id=f"sliced-{i}")
        passes = plane.dataplane._convergence
        refresh = passes._own.refresh
        reads: list[bool] = []

        def counted_refresh(**kwargs: Any) -> Any:
            out = refresh(**kwargs)
            reads.append(passes._own.behind)
            return out

        monkeypatch.setattr(passes._own, "refresh", counted_refresh)
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")))
        for batch in range(3):
            await stub.NextBatch(api.ActionRequest(name="rel"))
            done = await poll_release(stub, "rel", lambda r, b=batch: r.status.batch == b and r.status.reached)
            assert done.status.convergence.proxies == 3
            assert done.status.convergence.converged == 3
            for proxy in plane.tracker.proxies().values():  # `reached` means every proxy has it
                snap = plane.cache.snapshot(proxy.key)
                assert snap is not None and proxy.acked[ROUTE].version == snap[ROUTE].version
        assert any(reads), "no pass read its streams over several slices"
