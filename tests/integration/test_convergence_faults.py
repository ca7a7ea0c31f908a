"""Convergence under faults: status claims only what the Envoys' own config shows.

Real etcd, real Envoys, control-plane replicas from `controlplane.app`; traffic from a
separate process where requests must not fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import run_load
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.xds.resources import LISTENER

from tests.integration import conftest as conftest

from .test_xds_churn import client as churn_client
from .test_xds_churn import ready as churn_ready


async def follower_of(
    leader: ControlPlane, store: EtcdStore, **options: Any
) -> tuple[ControlPlane, asyncio.Task[None]]:
    """Once `leader` leads, a second replica beside it that the test stops itself (the
    replica, and the task running it to cancel)."""
    async with asyncio.timeout(10):
        await leader.election.leading.wait()
    follower = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0", **options)
    running = asyncio.create_task(follower.run())
    async with asyncio.timeout(10):
        await follower.ready.wait()
    return follower, running


async def route_dump(proxy: EnvoyProcess) -> list[dict[str, Any]]:
    status, body = await proxy.admin_get("/config_dump?resource=dynamic_route_configs")
    assert status == 200, body
    return [c["route_config"] for c in json.loads(body).get("configs", [])]


def _routes(configs: list[dict[str, Any]], authority: str) -> list[dict[str, Any]]:
    return [
        route
        for config in configs
        for host in config.get("virtual_hosts", [])
        if authority in host.get("domains", [])
        for route in host.get("routes", [])
    ]


async def gray_weight(proxy: EnvoyProcess, authority: str = "checkout", gray: str = "v2") -> int:
    """The weight of the gray version in the weighted split Envoy holds for `authority`."""
    weights = [
        int(c.get("weight", 0))
        for route in _routes(await route_dump(proxy), authority)
        for c in route.get("route", {}).get("weighted_clusters", {}).get("clusters", [])
        if gray in c["name"]
    ]
    return max(weights, default=0)


async def untagged_target(proxy: EnvoyProcess, authority: str = "checkout") -> str:
    """The cluster Envoy's last (catch-all) route for `authority` sends untagged traffic to."""
    routes = _routes(await route_dump(proxy), authority)
    return str(routes[-1]["route"].get("cluster", "")) if routes else ""


async def reached_events(stub: Any, name: str) -> list[tuple[str, int]]:
    history = await stub.History(api.HistoryRequest(name=name))
    return [(e.action, e.to_batch) for e in history.events if e.action in ("next", "reached", "rollback", "promote")]


_LOAD = """
import asyncio, json, sys
from graylane.deploy.local.traffic import run_load
port, seconds = int(sys.argv[1]), float(sys.argv[2])
r = asyncio.run(run_load(port, authority="checkout", count=10**9, max_seconds=seconds, rate=100, concurrency=4))
print(json.dumps({"sent": r.sent, "failed": r.failed, "errors": dict(r.errors)}))
"""


async def load_process(port: int, seconds: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LOAD, str(port), f"{seconds:g}", stdout=asyncio.subprocess.PIPE, start_new_session=True
    )


async def load_result(process: asyncio.subprocess.Process) -> dict[str, Any]:
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_a_nack_holds_the_release_at_what_the_rejecting_proxy_serves_on_every_proxy(
    store: EtcdStore, envoy: Any
) -> None:
    """Two Envoys; the strict one rejects the lane's rule. The release pauses naming it, the
    other Envoy is moved back to what the strict one serves (no lane), status says weight 0
    is served, and traffic through both never fails."""
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await conftest.checkout_replica(es, store)
        relaxed = await envoy(ads_port=plane.xds_port, node_id="relaxed")
        strict = await envoy(ads_port=plane.xds_port, node_id="strict", runtime=conftest.STRICT_RUNTIME)
        loads = [await load_process(p.listen_port, 6) for p in (relaxed, strict)]

        rule = conftest.big_rule()
        await stub.ApplyRelease(
            api.ApplyReleaseRequest(name="rel", spec=conftest.lane_spec("checkout", "lane", rules=[rule]))
        )
        await stub.NextBatch(api.ActionRequest(name="rel"))
        held = await conftest.poll_release(stub, "rel", lambda r: r.status.phase == pb.PAUSED)
        assert held.status.last_nack.node == "strict"
        assert held.status.last_nack.stream.startswith("strict")
        assert "program size" in held.status.last_nack.message
        assert held.status.HasField("held_batch") and held.status.held_batch == -1
        assert (held.status.weight, held.status.served_weight) == (10, 0)
        # Both Envoys end up on what the strict one accepted: no lane, and status counts it.
        await conftest.eventually(lambda: _both_at(relaxed, strict, 0))
        carried = await conftest.poll_release(
            stub, "rel", lambda r: r.status.convergence.proxies == r.status.convergence.converged == 2
        )
        assert not carried.status.reached  # held is not the batch asked for
        for process in loads:
            result = await load_result(process)
            assert result["failed"] == 0 and result["sent"] > 100, result
        # One pause, naming the proxy; no reached event.
        history = await stub.History(api.HistoryRequest(name="rel"))
        assert [e.action for e in history.events].count("pause") == 1
        assert "reached" not in [e.action for e in history.events]


async def _both_at(a: EnvoyProcess, b: EnvoyProcess, weight: int) -> bool:
    return await gray_weight(a) == weight and await gray_weight(b) == weight


async def test_a_proxy_that_never_acks_blocks_until_the_stale_timeout_then_is_named(
    store: EtcdStore, envoy: Any
) -> None:
    stale = 2.0
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await conftest.checkout_replica(es, store, stale_proxy_seconds=stale)
        proxy = await envoy(ads_port=plane.xds_port, node_id="real")
        # A fake ADS client: asks for listeners once, then never ACKs anything.
        xds = await es.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{plane.xds_port}"))
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(xds).StreamAggregatedResources()
        es.callback(call.cancel)
        await call.write(
            discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id="mute", cluster="fake"), type_url=LISTENER, resource_names=[]
            )
        )
        async with asyncio.timeout(10):
            while not any(p.node_id == "mute" for p in plane.tracker.proxies().values()):
                await asyncio.sleep(0.02)

        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=conftest.lane_spec("checkout", "lane")))
        started = time.monotonic()
        await stub.NextBatch(api.ActionRequest(name="rel"))
        await conftest.eventually(lambda: _weight_is(proxy, 10))
        lagging = await conftest.poll_release(stub, "rel", lambda r: r.status.convergence.converged == 1)
        assert not lagging.status.reached and lagging.status.convergence.proxies == 2
        assert any(name.startswith("mute (cluster fake") for name in lagging.status.convergence.lagging)
        done = await conftest.poll_release(stub, "rel", lambda r: r.status.reached, timeout=stale + 10)
        assert time.monotonic() - started >= stale * 0.9
        assert (done.status.convergence.proxies, done.status.convergence.converged) == (1, 1)
        assert done.status.convergence.gone == 1
        assert done.status.convergence.gone_names[0].startswith("mute (cluster fake")
        assert await reached_events(stub, "rel") == [("next", 0), ("reached", 0)]


async def _weight_is(proxy: EnvoyProcess, weight: int) -> bool:
    return await gray_weight(proxy) == weight


async def test_rollback_and_promote_are_reached_once_the_envoys_carry_the_end_state(
    store: EtcdStore, envoy: Any
) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, _ = await conftest.serving_replica(es, store, "checkout", "search")
        proxies = [await envoy(ads_port=plane.xds_port, node_id=f"e{i}") for i in range(2)]
        for name, service in (("back", "checkout"), ("forward", "search")):
            await stub.ApplyRelease(
                api.ApplyReleaseRequest(name=name, spec=conftest.lane_spec(service, f"lane-{name}"))
            )
            await stub.NextBatch(api.ActionRequest(name=name))
            await conftest.poll_release(stub, name, lambda r: r.status.reached)

        # Each end is reached once both Envoys serve it: no lane, untagged traffic on `kept`.
        for act, name, action, phase, service, kept in (
            (stub.Rollback, "back", "rollback", pb.ROLLED_BACK, "checkout", "v1"),
            (stub.Promote, "forward", "promote", pb.SUCCEEDED, "search", "v2"),
        ):
            await act(api.ActionRequest(name=name))
            done = await conftest.poll_release(stub, name, lambda r: r.status.reached)
            assert done.status.phase == phase
            assert (done.status.convergence.proxies, done.status.convergence.converged) == (2, 2)
            for p in proxies:
                assert await gray_weight(p, service) == 0
                assert kept in await untagged_target(p, service)
            assert await reached_events(stub, name) == [("next", 0), ("reached", 0), (action, 0), ("reached", 0)]


async def test_a_dead_replicas_proxies_count_until_the_stale_timeout_and_are_named(
    store: EtcdStore, envoy: Any
) -> None:
    """Two replicas on one etcd, an Envoy on each. The follower stops (its tasks cancelled)
    and its Envoy, with nowhere else to connect, goes on serving the old weight: the next
    batch is not reached once the follower's keys are gone, only at the stale timeout, and
    status names the replica and its proxy."""
    ttl, stale = 2, 6.0
    async with contextlib.AsyncExitStack() as es:
        leader, stub, _, _ = await conftest.checkout_replica(
            es, store, leader_ttl_seconds=ttl, stale_proxy_seconds=stale
        )
        follower, running = await follower_of(leader, store, leader_ttl_seconds=ttl, stale_proxy_seconds=stale)
        mine = await envoy(ads_port=leader.xds_port, node_id="on-leader")
        orphan = await envoy(ads_port=follower.xds_port, node_id="on-follower")
        first = await conftest.first_batch_reached(stub, conftest.lane_spec("checkout", "lane"))
        assert (first.status.convergence.proxies, first.status.convergence.converged) == (2, 2)

        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        started = time.monotonic()
        await stub.NextBatch(api.ActionRequest(name="rel"))
        await conftest.eventually(lambda: _weight_is(mine, 50))
        assert await gray_weight(orphan) == 10  # still on the old batch: nobody serves it now
        # Past the dead replica's lease (its keys are gone), before the stale timeout.
        await asyncio.sleep(max(0.0, ttl + 2.0 - (time.monotonic() - started)))  # pacing: outlive the lease
        pending = await stub.GetRelease(api.GetReleaseRequest(name="rel"))
        assert not pending.status.reached, pending.status
        assert pending.status.convergence.proxies == 2 and pending.status.convergence.converged == 1
        assert any("on-follower" in name for name in pending.status.convergence.lagging), pending.status
        done = await conftest.poll_release(stub, "rel", lambda r: r.status.reached, timeout=stale + 10)
        assert time.monotonic() - started >= stale * 0.9
        assert done.status.convergence.gone == 1
        assert any(f"replica {follower.election.identity}" in n for n in done.status.convergence.gone_names)
        assert any("on-follower" in n for n in done.status.convergence.gone_names)
        assert await gray_weight(orphan) == 10
        assert await reached_events(stub, "rel") == [("next", 0), ("reached", 0), ("next", 1), ("reached", 1)]


class _Switch:
    """A loopback TCP forwarder whose upstream port can be changed: new connections go to
    the current one (an Envoy's one ADS address, moved from one replica to another)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> _Switch:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


async def test_a_cleanly_stopped_replicas_proxy_counts_where_it_reconnects_not_until_the_stale_timeout(
    store: EtcdStore, envoy: Any
) -> None:
    """Two replicas; an Envoy on the follower. The follower stops cleanly (what SIGTERM does:
    its tasks cancelled, so it says it left and revokes its lease) while a batch is pending;
    its Envoy reconnects to the leader, and the batch is reached once it ACKed there, long
    before the stale timeout (a silent replica's proxies would count for all of it)."""
    ttl, stale = 2, 30.0
    async with contextlib.AsyncExitStack() as es:
        leader, stub, _, _ = await conftest.checkout_replica(
            es, store, leader_ttl_seconds=ttl, stale_proxy_seconds=stale
        )
        follower, running = await follower_of(leader, store, leader_ttl_seconds=ttl, stale_proxy_seconds=stale)
        switch = await es.enter_async_context(_Switch(follower.xds_port))
        mine = await envoy(ads_port=leader.xds_port, node_id="on-leader")
        moving = await envoy(ads_port=switch.port, node_id="moving")
        first = await conftest.first_batch_reached(stub, conftest.lane_spec("checkout", "lane"))
        assert (first.status.convergence.proxies, first.status.convergence.converged) == (2, 2)
        # The follower's count is published before it stops (the leader reads it from etcd).
        await conftest.eventually(lambda: _published_by(store, follower.election.identity))

        switch.upstream = leader.xds_port  # where the Envoy reconnects once its stream ends
        running.cancel()  # a clean stop, as on SIGTERM
        with contextlib.suppress(asyncio.CancelledError):
            await running
        started = time.monotonic()
        await stub.NextBatch(api.ActionRequest(name="rel"))
        done = await conftest.poll_release(stub, "rel", lambda r: r.status.reached, timeout=15)
        assert time.monotonic() - started < stale / 2, "counted as a silent replica until the stale timeout"
        assert (done.status.convergence.proxies, done.status.convergence.converged) == (2, 2)
        assert done.status.convergence.gone == 0
        assert await gray_weight(moving) == 50 and await gray_weight(mine) == 50
        assert [p.node_id for p in leader.tracker.proxies().values()].count("moving") == 1


async def _published_by(store: EtcdStore, identity: str) -> bool:
    snap = await store.snapshot()
    fleet = snap.replica_fleet.get(identity)
    return fleet is not None and "moving" in fleet.nodes


def _header_values(configs: list[dict[str, Any]], authority: str = "checkout") -> set[str]:
    """Every exact header value Envoy's routes for `authority` match on."""
    return {
        str(h.get("string_match", {}).get("exact", ""))
        for route in _routes(configs, authority)
        for h in route.get("match", {}).get("headers", [])
    } - {""}


async def test_a_rejected_rules_edit_holds_the_lane_the_proxies_accepted(store: EtcdStore, envoy: Any) -> None:
    """A release at batch 1 (10 %, rule x-user: alice) is edited (`graylane apply`) to a rule
    the strict Envoy rejects. The release pauses and is held at the lane the proxies
    accepted: alice's rule at 10 %, served to both Envoys and shown in status (not "no
    lane", which a batch index of the edited spec would give)."""
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await conftest.checkout_replica(es, store)
        relaxed = await envoy(ads_port=plane.xds_port, node_id="relaxed")
        strict = await envoy(ads_port=plane.xds_port, node_id="strict", runtime=conftest.STRICT_RUNTIME)
        alice = pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-user", op=pb.EXACT, value="alice")])
        await conftest.first_batch_reached(stub, conftest.lane_spec("checkout", "lane", rules=[alice]))

        big = conftest.big_rule()
        await stub.ApplyRelease(
            api.ApplyReleaseRequest(name="rel", spec=conftest.lane_spec("checkout", "lane", rules=[big]))
        )
        held = await conftest.poll_release(stub, "rel", lambda r: r.status.phase == pb.PAUSED)
        assert held.status.last_nack.node == "strict", held.status
        lane = held.status.held_lane
        assert held.status.HasField("held_lane"), held.status
        assert (lane.weight, held.status.served_weight) == (10, 10)
        assert [[(c.name, c.op, c.value) for c in r.conditions] for r in lane.match] == [
            [("x-user", pb.EXACT, "alice")]
        ]
        assert [(s.service, s.gray_version) for s in lane.services] == [("checkout", "v2")]
        # Both Envoys serve the accepted lane, and status counts them carrying it.
        for proxy in (relaxed, strict):
            await conftest.eventually(lambda p=proxy: _serves_alice_at_10(p))
        await conftest.poll_release(
            stub, "rel", lambda r: r.status.convergence.proxies == r.status.convergence.converged == 2
        )
        for proxy in (relaxed, strict):
            result = await run_load(
                proxy.listen_port, authority="checkout", count=20, max_seconds=10, headers={"x-user": "alice"}
            )
            assert result.failed == 0 and result.versions == {"v2": 20}, result


async def _serves_alice_at_10(proxy: EnvoyProcess) -> bool:
    configs = await route_dump(proxy)
    return (
        "alice" in _header_values(configs)
        and conftest.BIG_REGEX not in json.dumps(configs)
        and await gray_weight(proxy) == 10
    )


async def test_short_lived_proxies_with_distinct_ports_leave_no_per_key_state(store: EtcdStore, envoy: Any) -> None:
    """300 short-lived ADS clients, each with its own listen port (a separate process, every
    way a stream can end): once they are gone the replica's cache and DataPlane keep only
    the long-lived Envoy's key, and a change afterwards renders what it rendered before."""
    async with contextlib.AsyncExitStack() as es:
        plane, stub, v1, v2 = await conftest.checkout_replica(es, store)
        steady = await envoy(ads_port=plane.xds_port, node_id="steady")
        await conftest.first_batch_reached(stub, conftest.lane_spec("checkout", "lane"))
        before = plane.cache.keys()
        assert before == plane.cache.requested_keys() == plane.dataplane.kept_keys() == {str(steady.listen_port)}

        churn = await churn_client(f"127.0.0.1:{plane.xds_port}", "churn", count=300, live=0, seed=3)
        try:
            async with asyncio.timeout(60):
                await churn_ready(churn)
                while len(plane.tracker.proxies()) != 1:
                    await asyncio.sleep(0.05)
            assert plane.cache.requested_keys() == before
            assert plane.cache.keys() == before, f"{len(plane.cache.keys()) - len(before)} keys kept"
            assert plane.dataplane.kept_keys() == before
        finally:
            churn.kill()
            await churn.wait()

        await stub.NextBatch(api.ActionRequest(name="rel"))
        await conftest.poll_release(stub, "rel", lambda r: r.status.reached and r.status.weight == 50)
        assert plane.cache.keys() == plane.dataplane.kept_keys() == before  # one key rendered, as before
        assert await gray_weight(steady) == 50
