"""Issue 5 acceptance: per-cluster agents, two simulated clusters on 127.0.0.1.

One `TwoClusters` layout (graylane.deploy.demo.clusters) serves the whole module: a real
etcd (the session fixture, under a key prefix of its own), a real `graylane serve`
subprocess, and per cluster a real `graylane agent` subprocess, a sidecar Envoy and a
gateway Envoy fed by that agent. East runs checkout v1, west runs checkout v2; the agents
report them, nothing is registered by hand.

Isolation between tests: before each test the `fresh` fixture brings the layout back to
its healthy shape (control plane and both agents running, endpoint files as written,
both clusters registered with exactly their endpoints) and ends any live release; every
test applies its own release. Tests that kill processes restart them before they end,
and `fresh` would otherwise.

The lease TTL is 3 s, so "within the lease TTL" is quick to observe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from graylane.controlplane.api.client import Action
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.deploy.demo.clusters import (
    EAST,
    LANE,
    RULE_HEADER,
    SERVICE,
    WEST,
    AgentProcess,
    Cluster,
    TwoClusters,
    envoy_counter,
    gray_in_west_release,
    graylane_command,
    poll,
)
from graylane.deploy.local.traffic import LoadResult, run_load
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import agent_pb2_grpc
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.xds import view as xv
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import binom

from tests.integration.conftest import LOST_STATUS_ATTEMPTS, STRICT_RUNTIME, big_rule, status_lost

pytestmark = [pytest.mark.etcd, pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

TTL = 3
PROBE = "probe"  # a cluster name with a token, for speaking the agent protocol by hand
PROBE_TOKEN = "probe-token-0123456789"
LIVE = (pb.PENDING, pb.PROGRESSING, pb.PAUSED)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def layout(
    etcd_endpoint: str, envoy_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TwoClusters]:
    async with TwoClusters(
        etcd_endpoint=etcd_endpoint,
        workdir=tmp_path_factory.mktemp("two-clusters"),
        lease_ttl_seconds=TTL,
        envoy_binary=envoy_binary,
        extra_tokens={PROBE: PROBE_TOKEN},
        actor="test",
    ) as two:
        yield two


@pytest_asyncio.fixture(loop_scope="module")
async def fresh(layout: TwoClusters) -> TwoClusters:
    """The layout healthy again, with no live release."""
    if not layout.serve.running:
        await layout.serve.restart()
    for cluster in (layout.east, layout.west):
        if not cluster.agent.running:
            await cluster.agent.restart()
        if cluster.endpoints_file.read_text() != cluster.endpoints_yaml():
            cluster.write_endpoints()
    await layout.wait_registered(EAST, WEST)
    with contextlib.suppress(grpc.aio.AioRpcError):
        release = await layout.client.get_release(LANE)
        if release.status.phase in LIVE:
            await layout.client.act(Action.ROLLBACK, LANE, reason="test isolation")
    return layout


# ----------------------------------------------------------------------------- helpers


def within_binomial(successes: int, n: int, p: float) -> bool:
    """Whether `successes` of `n` lies in the central 99.9 % of Binomial(n, p)."""
    low, high = binom.interval(0.999, n, p)
    return low <= successes <= high


def assert_no_failures(result: LoadResult, where: str) -> None:
    assert result.sent > 0, where
    assert result.failed == 0, f"{where}: {result.statuses} {result.errors} (of {result.sent})"


async def start_release(layout: TwoClusters, weight: int) -> pb.Release:
    """Apply the gray-in-west release and step it to the batch of `weight`, reached by all 4 proxies."""
    await layout.client.apply_release(gray_in_west_release(), reason="test", restart=True)
    release = await layout.client.get_release(LANE)
    while release.status.weight != weight:
        await layout.client.act(Action.NEXT, LANE)
        release = await layout.client.get_release(LANE)
    return await layout.until_reached(LANE, weight=weight)


def background_load(layout: TwoClusters, cluster: Cluster, stop: asyncio.Event) -> asyncio.Task[LoadResult]:
    return asyncio.create_task(
        layout.load(cluster, count=1_000_000, max_seconds=60, rate=200, concurrency=4, stop=stop)
    )


async def v2_counts(layout: TwoClusters) -> tuple[int, int]:
    """(west v2 upstream requests, west gateway requests to its local checkout v2)."""
    assert layout.west.gateway is not None
    gateway = await envoy_counter(layout.west.gateway, "cluster.checkout|v2.upstream_rq_total")
    return layout.west.upstream.requests, gateway


async def config_dump(envoy: EnvoyProcess) -> str:
    status, body = await envoy.admin_get("/config_dump?include_eds")
    assert status == 200, body[:200]
    return body


def port_values(dump: str) -> set[int]:
    """Every socket port in an Envoy config dump."""
    found: set[int] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "port_value":
                    found.add(int(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(dump))
    return found


class RawAgent:
    """The AgentService protocol spoken by hand: hello, then whatever the test sends."""

    def __init__(self, target: str, *, cluster: str, token: str) -> None:
        self.target = target
        self.metadata = (("x-graylane-cluster", cluster), ("authorization", f"Bearer {token}"))

    async def exchange(
        self, hello: apb.AgentHello, *then: apb.AgentMessage, timeout: float = 10.0
    ) -> tuple[list[apb.ControlMessage], grpc.aio.AioRpcError | None]:
        """Send the hello, then `then` once welcomed; what came back and the error that ended it.

        Without an error, returns once a view arrived after the last message was sent.
        """
        for _ in range(LOST_STATUS_ATTEMPTS - 1):
            received, error = await self._exchange_once(hello, then, timeout)
            if received or not status_lost(error):
                return received, error
        return await self._exchange_once(hello, then, timeout)

    async def _exchange_once(
        self, hello: apb.AgentHello, then: tuple[apb.AgentMessage, ...], timeout: float
    ) -> tuple[list[apb.ControlMessage], grpc.aio.AioRpcError | None]:
        outbox: asyncio.Queue[apb.AgentMessage | None] = asyncio.Queue()
        outbox.put_nowait(apb.AgentMessage(hello=hello))

        async def requests() -> AsyncIterator[apb.AgentMessage]:
            while (item := await outbox.get()) is not None:
                yield item

        received: list[apb.ControlMessage] = []
        async with grpc.aio.insecure_channel(self.target) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests(), metadata=self.metadata)
            try:
                async with asyncio.timeout(timeout):
                    async for message in call:
                        received.append(message)
                        if message.WhichOneof("kind") == "welcome":
                            for item in then:
                                outbox.put_nowait(item)
                        elif not then:
                            return received, None
            except grpc.aio.AioRpcError as exc:
                return received, exc
            finally:
                outbox.put_nowait(None)  # ends the request stream, so nothing is left pending
                call.cancel()
        return received, None


def probe_hello(**fields: str) -> apb.AgentHello:
    base = {"cluster": PROBE, "gateway_address": "127.0.0.1:9", "agent_version": "test", "agent_id": "probe-agent"}
    base.update(fields)
    return apb.AgentHello(**base)


def endpoints_message(address: str, port: int) -> apb.AgentMessage:
    return apb.AgentMessage(
        endpoints=apb.EndpointSnapshot(
            versions=[
                apb.VersionEndpoints(service=SERVICE, version="v2", endpoints=[pb.Endpoint(address=address, port=port)])
            ]
        )
    )


# ------------------------------------------------------------------------------- tests


async def test_gray_in_west_takes_the_batch_share_through_west_gateway(fresh: TwoClusters) -> None:
    layout = fresh
    east, west = layout.east, layout.west
    for weight in (10, 50):
        reached = await start_release(layout, weight)
        assert reached.status.convergence.converged == reached.status.convergence.proxies == 4
        v1_before = east.upstream.requests
        upstream_before, gateway_before = await v2_counts(layout)
        result = await layout.load(east, count=2000)
        assert_no_failures(result, f"east at {weight}%")
        gray = result.versions["v2"]
        assert set(result.versions) <= {"v1", "v2"}
        assert within_binomial(gray, result.sent, weight / 100), (weight, result.versions)
        # Every gray answer came from west's v2 through west's gateway; the rest from east's v1.
        upstream_after, gateway_after = await v2_counts(layout)
        assert upstream_after - upstream_before == gray
        assert gateway_after - gateway_before == gray
        assert east.upstream.requests - v1_before == result.versions["v1"]

    # The rule sends every matching request to west, whatever the weight.
    upstream_before, gateway_before = await v2_counts(layout)
    ruled = await layout.load(east, count=300, headers=RULE_HEADER)
    assert_no_failures(ruled, "rule requests")
    assert ruled.versions == {"v2": 300}
    upstream_after, gateway_after = await v2_counts(layout)
    assert upstream_after - upstream_before == gateway_after - gateway_before == 300

    # West's own callers: base v1 through east's gateway, the batch share on local v2.
    from_west = await layout.load(west, count=2000)
    assert_no_failures(from_west, "west at 50%")
    assert within_binomial(from_west.versions["v2"], from_west.sent, 0.5), from_west.versions


async def test_agents_report_their_clusters_metrics_and_export_their_own(fresh: TwoClusters) -> None:
    layout = fresh
    await start_release(layout, 50)

    # An agent's first reading of a proxy is its baseline (its counters may span days):
    # wait until east's agent has reported the release's series once, then send traffic.
    async def east_counts() -> dict[tuple[str, str], int]:
        response = await layout.client.get_metrics(LANE, window=3600)
        return {
            (s.version, s.lane): int(s.requests)
            for s in response.series
            if s.cluster == "east" and s.service == "checkout"
        }

    # (A lane cluster Envoy has not used yet is not in its statistics: that series shows up
    # with the first request, counted from zero, since the proxy itself is known.)
    async with asyncio.timeout(15):
        while ("v1", "") not in await east_counts():
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)  # a tick more, so every earlier request is in `before`
    before = await east_counts()
    result = await layout.load(layout.east, count=600)
    assert_no_failures(result, "east at 50%")
    # East's sidecar counted the lane's requests to west's v2 (through the gateway) and its
    # base requests to local v1; east's agent reported them, tagged with its cluster.
    want = {
        ("v1", ""): before[("v1", "")] + result.versions["v1"],
        ("v2", LANE): before.get(("v2", LANE), 0) + result.versions["v2"],
    }
    seen: dict[tuple[str, str], int] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(15):
            while seen != want:
                seen = await east_counts()
                await asyncio.sleep(0.2)
    assert seen == want, (before, result.versions)
    # Each agent exports its own telemetry: both of its proxies (sidecar and gateway) connected.
    for cluster in (layout.east, layout.west):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{cluster.agent.http_port}/metrics") as answer:
                text = await answer.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["graylane_proxies_connected"].samples[0].value == 2


async def test_east_envoys_never_receive_west_local_resources(fresh: TwoClusters) -> None:
    layout = fresh
    east, west = layout.east, layout.west
    assert east.sidecar and east.gateway and west.sidecar and west.gateway
    for weight in (10, 100):
        await start_release(layout, weight)
        for envoy in (east.sidecar, east.gateway):
            ports = port_values(await config_dump(envoy))
            assert west.upstream.port not in ports, (envoy.node_id, weight)
            if envoy is east.sidecar:
                assert west.gateway_port in ports and east.upstream.port in ports
        # And the other way round: west's Envoys reach east's v1 only through east's gateway.
        west_ports = port_values(await config_dump(west.sidecar))
        assert east.upstream.port not in west_ports and east.gateway_port in west_ports
    # Nor does east's agent ever hold them: the view it keeps on disk is east's view.
    kept = json.loads((east.agent.state_dir / "view.json").read_text())
    assert kept["cluster"] == EAST  # the file names its cluster (agent/lkg.py)
    ports = {e.get("port") for ve in kept["view"]["view"]["endpoints"] for e in ve.get("endpoints", [])}
    assert west.upstream.port not in ports and {east.upstream.port, west.gateway_port} <= ports


async def _active_clusters(envoy: EnvoyProcess) -> dict[str, tuple[str, str]]:
    """Envoy's own word: its active dynamic clusters, name -> (version_info, last_updated)."""
    status, body = await envoy.admin_get("/config_dump?resource=dynamic_active_clusters")
    assert status == 200, body[:200]
    return {c["cluster"]["name"]: (c["version_info"], c["last_updated"]) for c in json.loads(body).get("configs", [])}


async def test_a_pending_release_is_staged_at_the_agents_envoys_and_its_start_sends_routes_only(
    fresh: TwoClusters,
) -> None:
    """Staged clusters reach the Envoys an agent serves too: a release created (not started)
    has its gray cluster active in every Envoy of both clusters, no request reaches v2, and
    the start leaves every Envoy's clusters as they were (it changes routes only)."""
    layout = fresh
    envoys = [e for c in (layout.east, layout.west) for e in (c.sidecar, c.gateway) if e is not None]
    await layout.client.apply_release(gray_in_west_release(), reason="test", restart=True)
    assert (await layout.client.get_release(LANE)).status.phase == pb.PENDING
    gray = xv.cluster_name(SERVICE, "v2", LANE)

    async def staged() -> bool | None:
        sidecars = [c.sidecar for c in (layout.east, layout.west) if c.sidecar is not None]
        for sidecar in sidecars:
            if gray not in await _active_clusters(sidecar):
                return None
        return True

    await poll(staged, timeout=20, what="the gray cluster active at both sidecars")
    # Staged, not routed: the lane's rule does not take a request to v2 before the start.
    v2_before = layout.west.upstream.requests
    for cluster in (layout.east, layout.west):
        result = await layout.load(cluster, count=200, headers=RULE_HEADER)
        assert_no_failures(result, f"{cluster.name}, rule header, pending")
        assert result.versions == {"v1": result.sent}, (cluster.name, result.versions)
    assert layout.west.upstream.requests == v2_before

    before = {e.node_id: await _active_clusters(e) for e in envoys}
    await layout.client.act(Action.NEXT, LANE)
    await layout.until_reached(LANE, weight=10)
    after = {e.node_id: await _active_clusters(e) for e in envoys}
    assert after == before  # no CDS change anywhere: the start sent routes alone


async def test_a_nack_from_an_agents_proxy_pauses_the_release_naming_cluster_and_node(fresh: TwoClusters) -> None:
    """An Envoy in east, fed by east's agent, rejects the release's routes (a stricter RE2
    limit): the agent reports the NACK with the view it rejected, the control plane pauses
    the release that view introduced and names the proxy; every proxy goes on serving."""
    layout = fresh
    east = layout.east
    strict = EnvoyProcess(
        ads_port=east.agent.xds_port,
        node_id="strict",
        node_cluster=EAST,
        binary=layout.envoy_binary,
        runtime=STRICT_RUNTIME,
    )
    async with strict:
        release = gray_in_west_release()
        release.spec.match.append(big_rule())
        await layout.client.apply_release(release, reason="test", restart=True)
        await layout.client.act(Action.NEXT, LANE)

        async def paused() -> pb.Release | None:
            r = await layout.client.get_release(LANE)
            return r if r.status.phase == pb.PAUSED else None

        held = await poll(paused, timeout=20, what="the release paused by the NACK")
        assert held.status.last_nack.node == f"{EAST}/strict"
        assert "program size" in held.status.last_nack.message
        assert f"{EAST}/strict" in held.status.reason
        history = await layout.client.history(LANE)
        pause = history.events[-1]
        assert (pause.action, pause.details["node"]) == ("pause", f"{EAST}/strict")

        # Held out of the view once every proxy ACKed the held view (status counts it: the
        # pause is written before the agents' Envoys carry it), the strict one too: v1 only.
        def carried(r: pb.Release) -> bool:
            c = r.status.convergence
            return r.status.phase == pb.PAUSED and c.proxies == c.converged == 5

        await poll(lambda: _matching(layout, carried), timeout=20, what="every proxy carrying the held view")
        for port in (east.sidecar.listen_port if east.sidecar else 0, strict.listen_port):
            result = await run_load(port, authority=SERVICE, count=200, max_seconds=20)
            assert_no_failures(result, f"port {port}")
            assert result.versions == {"v1": 200}


async def _matching(layout: TwoClusters, pred: Callable[[pb.Release], bool]) -> pb.Release | None:
    release = await layout.client.get_release(LANE)
    return release if pred(release) else None


async def test_clusters_are_listed_and_one_gone_for_good_can_be_forgotten(fresh: TwoClusters) -> None:
    layout = fresh
    listed = {c.name: c for c in (await layout.client.list_clusters()).clusters}
    assert listed[EAST].connected and listed[WEST].connected
    assert (listed[EAST].gateway_address, listed[WEST].gateway_address) == (
        layout.east.gateway_address,
        layout.west.gateway_address,
    )
    assert [(v.service, v.version, v.endpoints) for v in listed[EAST].versions] == [(SERVICE, "v1", 1)]
    assert [(v.service, v.version, v.endpoints) for v in listed[WEST].versions] == [(SERVICE, "v2", 1)]

    # A cluster whose agent connected once and went away: known, not connected, once its
    # lease has expired.
    received, error = await RawAgent(layout.serve.target, cluster=PROBE, token=PROBE_TOKEN).exchange(probe_hello())
    assert error is None and received

    async def gone() -> api.ClusterStatus | None:
        found = {c.name: c for c in (await layout.client.list_clusters()).clusters}.get(PROBE)
        return found if found is not None and not found.connected else None

    probe = await poll(gone, timeout=3 * TTL, what="the probe cluster's lease expiring")
    assert (probe.gateway_address, probe.agent_version, list(probe.versions)) == ("127.0.0.1:9", "test", [])

    # Forgetting: refused for a connected cluster, a name nobody registered, a bad name.
    for name, code, words in (
        (EAST, grpc.StatusCode.FAILED_PRECONDITION, "connected agent"),
        ("nowhere", grpc.StatusCode.NOT_FOUND, "not known"),
        ("Bad_Name", grpc.StatusCode.INVALID_ARGUMENT, "name:"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await layout.client.forget_cluster(name)
        assert refused.value.code() == code and words in (refused.value.details() or ""), name
    await layout.client.forget_cluster(PROBE, actor="test")
    names = [c.name for c in (await layout.client.list_clusters()).clusters]
    assert names == sorted([EAST, WEST])
    assert PROBE not in await layout.store.known_clusters()


async def test_wrong_cluster_credential_is_refused(fresh: TwoClusters, tmp_path: Path) -> None:
    layout = fresh
    before = await layout.registered()
    snap = await layout.snapshot()
    east_agent_id = next(c.agent_id for c in snap.clusters if c.name == EAST)

    # A real agent for east presenting west's token: refused, and east stays its agent's.
    wrong_token = tmp_path / "wrong.token"
    wrong_token.write_text(layout.tokens[WEST])
    impostor = AgentProcess(
        cluster=EAST,
        control_plane=layout.serve.target,
        gateway_address="127.0.0.1:9",
        state_dir=tmp_path / "impostor",
        endpoints_file=layout.east.endpoints_file,
        token_file=wrong_token,
        log_path=tmp_path / "impostor.log",
    )
    try:
        await impostor.start()
        await impostor.wait_log("the control plane refused this agent: UNAUTHENTICATED", timeout=15)
    finally:
        await impostor.stop()
    snap = await layout.snapshot()
    assert next(c.agent_id for c in snap.clusters if c.name == EAST) == east_agent_id
    assert await layout.registered() == before

    # East's valid token claiming west: refused before anything is written.
    raw = RawAgent(layout.serve.target, cluster=EAST, token=layout.tokens[EAST])
    _, error = await raw.exchange(probe_hello(cluster=WEST, agent_id="someone-else"))
    assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    assert "hello.cluster" in (error.details() or "")
    # No token at all.
    raw = RawAgent(layout.serve.target, cluster=WEST, token="")
    _, error = await raw.exchange(probe_hello(cluster=WEST))
    assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert await layout.registered() == before
    assert (await layout.load(layout.west, count=100)).failed == 0


async def test_second_agent_with_a_taken_cluster_name_is_refused(fresh: TwoClusters, tmp_path: Path) -> None:
    layout = fresh
    await start_release(layout, 10)
    before = await layout.registered()
    snap = await layout.snapshot()
    west_agent_id = next(c.agent_id for c in snap.clusters if c.name == WEST)
    other_endpoints = tmp_path / "other-endpoints.yaml"
    other_endpoints.write_text(
        "versions:\n  - {service: checkout, version: v2, endpoints: [{address: 127.0.0.1, port: 1}]}\n"
    )
    second = AgentProcess(
        cluster=WEST,
        control_plane=layout.serve.target,
        gateway_address="127.0.0.1:9",
        state_dir=tmp_path / "second-west",  # another installation: another agent id
        endpoints_file=other_endpoints,
        token_file=layout.west.token_file,
        log_path=tmp_path / "second-west.log",
    )
    try:
        await second.start()
        await second.wait_log("the control plane refused this agent: ALREADY_EXISTS", timeout=15)
        assert "served by another agent" in second.log_text()
        assert await layout.registered() == before
        snap = await layout.snapshot()
        assert next(c.agent_id for c in snap.clusters if c.name == WEST) == west_agent_id
    finally:
        await second.stop()
    result = await layout.load(layout.east, count=200, headers=RULE_HEADER)
    assert_no_failures(result, "rule requests to west after the refusal")
    assert result.versions == {"v2": 200}


async def test_unusable_endpoints_file_keeps_the_last_good_set(fresh: TwoClusters) -> None:
    layout = fresh
    east = layout.east
    await start_release(layout, 10)
    before = await layout.registered()
    cases = [
        ("versions: [ {service: checkout", "not YAML"),
        (
            "versions:\n  - {service: checkout, version: v1, endpoints: [{address: 999.1.1.1, port: 8080}]}\n",
            "endpoints.versions[0].endpoints[0].address",
        ),
        (
            "versions:\n  - {service: checkout, version: v1, endpoints: [{address: 127.0.0.1, port: 0}]}\n",
            "endpoints.versions[0].endpoints[0].port",
        ),
    ]
    try:
        for text, named in cases:
            mark = east.agent.log_mark()
            east.write_endpoints(text)
            await east.agent.wait_log(named, timeout=10, after=mark)
            assert "keeping the last good endpoints" in east.agent.log_text()[mark:]
            assert await layout.registered() == before, text
            assert_no_failures(await layout.load(east, count=200), f"east with a broken file ({named})")
    finally:
        mark = east.agent.log_mark()
        east.write_endpoints()
    await east.agent.wait_log("endpoints from", timeout=10, after=mark)
    assert await layout.registered() == before


async def test_kill_9_control_plane_under_load(fresh: TwoClusters) -> None:
    layout = fresh
    await start_release(layout, 10)
    stop = asyncio.Event()
    loads = {c.name: background_load(layout, c, stop) for c in (layout.east, layout.west)}
    try:
        await asyncio.sleep(1.0)  # traffic before the kill
        await layout.serve.kill()
        assert not layout.serve.running
        await asyncio.sleep(1.0)  # traffic with no control plane at all
        await layout.serve.restart()
        # The release resumes: the next batch is reached by every proxy of both clusters.
        await layout.client.act(Action.NEXT, LANE, reason="after the restart")
        reached = await layout.until_reached(LANE, weight=50)
        assert reached.status.convergence.converged == 4
        await asyncio.sleep(0.5)  # traffic on the new batch
    finally:
        stop.set()
    for name, task in loads.items():
        assert_no_failures(await task, f"{name} while the control plane was killed")
    assert loads[EAST].result().versions["v2"] > 0
    await layout.wait_registered(EAST, WEST)


async def test_agent_restarted_while_control_plane_is_down_serves_last_known_good(fresh: TwoClusters) -> None:
    layout = fresh
    east = layout.east
    await start_release(layout, 50)
    stop = asyncio.Event()
    load = background_load(layout, east, stop)
    try:
        await layout.serve.kill()
        mark = east.agent.log_mark()
        await east.agent.kill()  # a crash: the view on disk must have survived whole
        await east.agent.restart()
        await east.agent.wait_log("serving the last-known-good view", timeout=10, after=mark)
        # A proxy that (re)starts now gets its whole configuration from the restarted agent.
        async with EnvoyProcess(
            ads_port=east.agent.xds_port, node_id="east-sidecar-late", node_cluster=EAST, binary=layout.envoy_binary
        ) as late:
            fresh_result = await run_load(late.listen_port, authority=SERVICE, count=2000, max_seconds=30)
        assert_no_failures(fresh_result, "a new Envoy fed from the last-known-good view")
        assert within_binomial(fresh_result.versions["v2"], fresh_result.sent, 0.5), fresh_result.versions
        assert "connected to the control plane" not in east.agent.log_text()[mark:]
    finally:
        stop.set()
    assert_no_failures(await load, "east while its agent restarted with no control plane")
    await layout.serve.restart()
    await layout.client.act(Action.NEXT, LANE)
    await layout.until_reached(LANE, weight=100)


async def test_killed_agent_endpoints_leave_within_the_lease_ttl(fresh: TwoClusters) -> None:
    layout = fresh
    east, west = layout.east, layout.west
    await start_release(layout, 50)
    stop = asyncio.Event()
    load = background_load(layout, east, stop)
    try:
        await asyncio.sleep(0.5)
        killed = time.monotonic()
        await west.agent.kill()
        gone = await layout.wait_unregistered(WEST, timeout=TTL + 5)
        assert time.monotonic() - killed <= TTL + 1.0, f"west left etcd {gone:.2f}s after the kill"

        async def v2_gone() -> bool | None:
            probe = await layout.load(east, count=200)
            assert_no_failures(probe, "east while west's endpoints leave")
            return True if probe.versions["v2"] == 0 else None

        await poll(v2_gone, timeout=10, what="east's gray share leaving west", interval=0.1)
        release = await layout.client.get_release(LANE)
        assert release.status.weight == 50  # the weight stays; only where it can go changed
        settled = await layout.load(east, count=1000)
        assert_no_failures(settled, "east after west left")
        assert settled.versions == {"v1": 1000}
    finally:
        stop.set()
    assert_no_failures(await load, "east while west's agent died")
    # West comes back: its endpoints (and the gray share) return.
    await west.agent.restart()
    await layout.wait_registered(EAST, WEST)
    await layout.until_reached(LANE, weight=50, timeout=30)


@pytest.mark.parametrize(
    ("address", "port", "field"),
    [
        ("999.0.0.1", 8080, "endpoints.versions[0].endpoints[0].address"),
        ("not an address", 8080, "endpoints.versions[0].endpoints[0].address"),
        ("checkout.west.internal", 8080, "endpoints.versions[0].endpoints[0].address"),
        ("127.0.0.1", 0, "endpoints.versions[0].endpoints[0].port"),
        ("127.0.0.1", 70000, "endpoints.versions[0].endpoints[0].port"),
    ],
)
async def test_invalid_endpoint_is_refused_naming_the_field(
    fresh: TwoClusters, address: str, port: int, field: str
) -> None:
    raw = RawAgent(fresh.serve.target, cluster=PROBE, token=PROBE_TOKEN)
    received, error = await raw.exchange(probe_hello(), endpoints_message(address, port))
    assert received and received[0].WhichOneof("kind") == "welcome"
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert (error.details() or "").startswith(field), error.details()
    assert PROBE not in {k for k, v in (await fresh.registered()).items() if v}


async def test_invalid_hello_is_refused_naming_the_field(fresh: TwoClusters) -> None:
    raw = RawAgent(fresh.serve.target, cluster=PROBE, token=PROBE_TOKEN)
    for hello, field in (
        (probe_hello(gateway_address="nowhere"), "hello.gateway_address"),
        (probe_hello(gateway_address="127.0.0.1:0"), "hello.gateway_address"),
        (probe_hello(agent_id=""), "hello.agent_id"),
    ):
        _, error = await raw.exchange(hello)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, (hello, error)
        assert (error.details() or "").startswith(field), error.details()


async def test_demo_with_two_clusters_answers_every_request(etcd_endpoint: str, envoy_binary: Path) -> None:
    """`graylane demo --clusters 2` (with its own etcd): exit 0 means every request got a 200."""
    del etcd_endpoint, envoy_binary  # only that both binaries exist
    argv = [*graylane_command(), "demo", "--clusters", "2", "--requests", "300"]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True
    )
    try:
        async with asyncio.timeout(90):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "kill -9 the control plane" in text and "promoted: stable v2" in text
    assert "0 not answered 200" in text
