"""Issue 11, agent side: the `graylane agent` command under faults, as processes.

* Broken state files (a `view.json` or `agent_id` that is not UTF-8, a directory, another
  cluster's view): the agent starts, serves no stale view, and says so (a WARNING naming
  the file, `/healthz`, `/metrics`).
* A last-known-good view that cannot be saved shows in `/healthz` and `/metrics`.
* The local guard: the control plane stopped (SIGSTOP, so its connections stay open), the
  gray version answering 500 to everything: the agent routes the lane to base within
  `--guard-after` plus a few seconds, and the control plane records the guard's report in
  the release's history once it runs again.
* A control-plane stall longer than the agents' lease: traffic from separate processes
  through both clusters' Envoys sees no failed request across a 15 s SIGSTOP.

The layout is `TwoClusters` (real etcd, `graylane serve`, two `graylane agent`s, four
Envoys), its agents started with a short guard delay and control-plane timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from graylane.controlplane.api.client import Action
from graylane.controlplane.local.ports import free_port
from graylane.deploy.demo import clusters
from graylane.v1 import release_pb2 as pb

pytestmark = [pytest.mark.etcd, pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

TTL = 3
GUARD_AFTER = 3.0
CONTROL_PLANE_TIMEOUT = 2.0
LIVE = (pb.PENDING, pb.PROGRESSING, pb.PAUSED)


class TunedAgent(clusters.AgentProcess):
    """`graylane agent` with a short guard delay and control-plane timeout."""

    def arguments(self) -> list[str]:
        return [
            *super().arguments(),
            "--guard-after",
            f"{GUARD_AFTER:g}",
            "--control-plane-timeout",
            f"{CONTROL_PLANE_TIMEOUT:g}",
        ]


async def get_json(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as r:
        text = await r.text()
        return r.status, (json.loads(text) if r.content_type == "application/json" else text)


async def metric(port: int, name: str) -> float | None:
    status, text = await get_json(port, "/metrics")
    assert status == 200
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return float(value)
    return None


async def healthz(agent: clusters.AgentProcess) -> dict[str, Any] | None:
    """The agent's /healthz document once it answers (None before)."""
    agent.check_alive()
    try:
        status, document = await get_json(agent.http_port, "/healthz")
    except aiohttp.ClientConnectionError:
        return None
    return document if status == 200 and isinstance(document, dict) else None


# ------------------------------------------------------------------ broken state files


def write_view_of(state: Path, cluster: str) -> None:
    """A valid last-known-good file, written for `cluster`."""
    from graylane.agent.lkg import StateDir
    from graylane.agent.wire import cluster_view
    from graylane.xds import view as xv

    view = xv.RoutingView(
        services=(xv.ServiceRoute(clusters.SERVICE, "v1"),),
        endpoints=(xv.VersionEndpoints(clusters.SERVICE, "v1", (xv.Endpoint("127.0.0.1", 9),)),),
    )
    StateDir(state, cluster=cluster).save_view(cluster_view(view))


BROKEN = {
    "view.json not UTF-8": ("view.json", "not UTF-8"),
    "view.json a directory": ("view.json", "a directory"),
    "view.json of another cluster": ("view.json", "written for cluster 'west'"),
    "agent_id not UTF-8": ("agent_id", "not UTF-8"),
    "agent_id a directory": ("agent_id", "a directory"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_an_agent_with_a_broken_state_file_starts_serves_nothing_stale_and_says_so(
    tmp_path: Path, case: str
) -> None:
    file_name, reason = BROKEN[case]
    state = tmp_path / "state"
    state.mkdir()
    file = state / file_name
    if "not UTF-8" in case:
        file.write_bytes(b"\xff\xfe{not text")
    elif "directory" in case:
        file.mkdir()
    else:
        write_view_of(state, "west")
    agent = clusters.AgentProcess(
        cluster="east",
        control_plane=f"127.0.0.1:{free_port()}",  # nobody there: only the state dir speaks
        gateway_address=f"127.0.0.1:{free_port()}",
        state_dir=state,
        endpoints_file=None,
        token_file=None,
        log_path=tmp_path / "agent.log",
    )
    try:
        await agent.start()
        document = await clusters.poll(lambda: healthz(agent), timeout=15, what="agent /healthz")
        assert document["status"] == "degraded", document
        lkg = document["last_known_good"]
        assert lkg["served_at_start"] == ""  # nothing stale
        log = agent.log_text()
        assert "serving the last-known-good view" not in log
        if file_name == "view.json":
            assert str(file) in lkg["ignored_at_start"] and reason in lkg["ignored_at_start"]
            assert await metric(agent.http_port, "graylane_agent_lkg_ignored_at_start") == 1
            warning = f"WARNING graylane.agent.lkg: ignoring the last-known-good view at {file}: {reason}"
        else:
            assert str(file) in document["agent_id_replaced"] and reason in document["agent_id_replaced"]
            assert await metric(agent.http_port, "graylane_agent_id_replaced") == 1
            warning = f"WARNING graylane.agent.lkg: ignoring the agent id at {file}: {reason}"
        assert warning in log, log
        assert await metric(agent.http_port, "graylane_agent_lkg_served_at_start") == 0
        agent.check_alive()
    finally:
        assert await agent.stop() == 0, agent.log_tail()


# ------------------------------------------------------------------ the two-cluster layout


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def layout(
    etcd_endpoint: str, envoy_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[clusters.TwoClusters]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clusters, "AgentProcess", TunedAgent)
        async with clusters.TwoClusters(
            etcd_endpoint=etcd_endpoint,
            workdir=tmp_path_factory.mktemp("agent-faults"),
            lease_ttl_seconds=TTL,
            envoy_binary=envoy_binary,
            extra_tokens={"spare": "spare-token-0123456789"},
            actor="test",
        ) as two:
            patch.undo()
            yield two


@pytest_asyncio.fixture(loop_scope="module")
async def fresh(layout: clusters.TwoClusters) -> AsyncIterator[clusters.TwoClusters]:
    """The layout healthy, with no live release; the control plane running again after."""
    await layout.wait_registered(clusters.EAST, clusters.WEST)
    with contextlib.suppress(grpc.aio.AioRpcError):
        release = await layout.client.get_release(clusters.LANE)
        if release.status.phase in LIVE:
            await layout.client.act(Action.ROLLBACK, clusters.LANE, reason="test isolation")
    try:
        yield layout
    finally:
        pid = layout.serve.pid
        if pid is not None and layout.serve.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)
        layout.west.upstream.error_rate = 0.0


async def start_release(layout: clusters.TwoClusters, weight: int) -> pb.Release:
    await layout.client.apply_release(clusters.gray_in_west_release(), reason="test", restart=True)
    release = await layout.client.get_release(clusters.LANE)
    while release.status.weight != weight:
        await layout.client.act(Action.NEXT, clusters.LANE)
        release = await layout.client.get_release(clusters.LANE)
    return await layout.until_reached(clusters.LANE, weight=weight)


async def test_a_view_that_cannot_be_saved_shows_in_health_and_metrics(fresh: clusters.TwoClusters) -> None:
    layout = fresh
    state = layout.workdir / "spare-agent"
    (state / "view.json").mkdir(parents=True)  # every save of the view fails
    token = layout.workdir / "spare.token"
    token.write_text("spare-token-0123456789\n")
    agent = clusters.AgentProcess(
        cluster="spare",
        control_plane=layout.serve.target,
        gateway_address=f"127.0.0.1:{free_port()}",
        state_dir=state,
        endpoints_file=None,
        token_file=token,
        log_path=layout.workdir / "agent-spare.log",
    )
    try:
        await agent.start()

        async def failed_save() -> dict[str, Any] | None:
            document = await healthz(agent)
            return document if document and document["last_known_good"]["save_failures"] else None

        document = await clusters.poll(failed_save, timeout=20, what="a failed save in /healthz")
        assert document["status"] == "degraded"
        assert str(state / "view.json") in document["last_known_good"]["last_save_error"]
        assert document["control_plane"]["connected"]
        assert (await metric(agent.http_port, "graylane_agent_lkg_save_failures_total") or 0) >= 1
        assert await metric(agent.http_port, "graylane_agent_lkg_last_save_timestamp_seconds") is None
        assert "cannot keep view" in agent.log_text()
        # Saves work again: the next view is kept and the health clears.
        (state / "view.json").rmdir()
        await layout.client.apply_release(clusters.gray_in_west_release(), reason="test", restart=True)
        await layout.client.act(Action.NEXT, clusters.LANE)  # the lane enters every cluster's view

        async def saved() -> dict[str, Any] | None:
            document = await healthz(agent)
            return document if document and document["last_known_good"]["last_saved_at"] else None

        try:
            document = await clusters.poll(saved, timeout=20, what="a good save in /healthz")
        except TimeoutError:
            raise AssertionError(agent.log_tail()) from None
        assert document["last_known_good"]["last_save_error"] == ""
        assert (await metric(agent.http_port, "graylane_agent_lkg_last_save_timestamp_seconds") or 0) > 0
    finally:
        await agent.stop()
        # Gone for good: later control-plane restarts and stalls must not wait for it.
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            await layout.wait_unregistered("spare", timeout=3 * TTL)
            await layout.client.forget_cluster("spare")


async def test_the_local_guard_routes_a_failing_lane_to_base_while_the_control_plane_is_stopped(
    fresh: clusters.TwoClusters,
) -> None:
    layout = fresh
    await start_release(layout, weight=10)
    west = layout.west
    west.upstream.error_rate = 1.0  # the gray version (v2, in west) fails everything
    stop = asyncio.Event()
    lane_traffic = asyncio.create_task(
        layout.load(
            west, count=1_000_000, max_seconds=90, rate=50, concurrency=2, headers=clusters.RULE_HEADER, stop=stop
        )
    )
    try:
        # The agent's Envoy counts the gray failures before the control plane goes.
        await clusters.poll(
            lambda: asyncio.sleep(0, result=True if west.upstream.requests >= 20 else None),
            timeout=15,
            what="gray requests",
        )
        assert layout.serve.pid is not None
        os.killpg(layout.serve.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()

        async def at_base() -> bool | None:
            result = await layout.load(west, count=5, max_seconds=5, headers=clusters.RULE_HEADER, keep_versions=True)
            return True if result.ok == 5 and result.versions == {"v1": 5} else None

        await clusters.poll(
            at_base, timeout=CONTROL_PLANE_TIMEOUT + GUARD_AFTER + 10, what="the lane at base", interval=0.2
        )
        took = time.monotonic() - stopped_at
        # Counted from the control plane's last answer (at most one health check before the stop).
        assert took >= GUARD_AFTER - 1.2, took
        print(
            f"guard: lane at base {took:.1f}s after SIGSTOP (timeout {CONTROL_PLANE_TIMEOUT}s + guard {GUARD_AFTER}s)"
        )
        document = await healthz(west.agent)
        assert document is not None and document["guard"]["lanes_at_base"] == [clusters.LANE], document
        assert not document["control_plane"]["connected"]
        assert (
            "local guard: the control plane is away; routing lanes ['checkout-west'] to base" in west.agent.log_text()
        )
        # East's agent saw no gray failures: its guard did nothing.
        assert "local guard" not in layout.east.agent.log_text()

        os.killpg(layout.serve.pid, signal.SIGCONT)

        async def recorded() -> pb.Event | None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                for event in (await layout.client.history(clusters.LANE)).events:
                    if event.action == "guard":
                        return event
            return None

        event = await clusters.poll(recorded, timeout=30, what="the guard's report in the history")
        assert event.actor == "graylane/agent/west" and "control plane unreachable" in event.reason
        assert f"{clusters.LANE}: " in event.reason and "gray requests failed" in event.reason, event.reason
        guard_events = [e for e in (await layout.client.history(clusters.LANE)).events if e.action == "guard"]
        assert len(guard_events) == 1
    finally:
        stop.set()
        await lane_traffic


# ------------------------------------------------------------------ control-plane stall

_LOAD = """
import asyncio, json, sys
from graylane.deploy.local.traffic import run_load
port, seconds, headers = int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
r = asyncio.run(run_load(port, authority="checkout", count=10**9, max_seconds=seconds, rate=100, concurrency=4,
                         headers=headers))
print(json.dumps({"sent": r.sent, "ok": r.ok, "statuses": {str(k): v for k, v in r.statuses.items()},
                  "errors": dict(r.errors), "versions": dict(r.versions)}))
"""


async def load_process(port: int, seconds: float, headers: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LOAD, str(port), f"{seconds:g}", json.dumps(headers),
        stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


async def test_no_request_fails_across_a_control_plane_stall_longer_than_the_agent_lease(
    fresh: clusters.TwoClusters,
) -> None:
    layout = fresh
    await start_release(layout, weight=50)  # east's traffic crosses to west and back
    stall = 3 * TTL  # every agent lease lapses in etcd well before the control plane runs again
    mark = layout.serve.log_mark()
    agent_marks = layout.log_marks()
    load_seconds = 2 + stall + 8  # 2 s before the stall, the stall, 8 s after the control plane runs again
    loads = [
        await load_process(cluster.sidecar.listen_port, load_seconds, headers)
        for cluster in (layout.east, layout.west)
        for headers in ({}, clusters.RULE_HEADER)
        if cluster.sidecar is not None
    ]
    try:
        await asyncio.sleep(2)  # traffic flows before the stall
        assert layout.serve.pid is not None
        os.killpg(layout.serve.pid, signal.SIGSTOP)
        await asyncio.sleep(stall)  # the stall itself is the scenario
        marks = layout.log_marks()
        os.killpg(layout.serve.pid, signal.SIGCONT)
        await layout.wait_connected(marks, timeout=20)
        await layout.wait_registered(clusters.EAST, clusters.WEST, timeout=20)
    finally:
        results = []
        for process in loads:
            async with asyncio.timeout(60):
                out, _ = await process.communicate()
            results.append(json.loads(out))
    for result in results:
        print("stall load:", result)
    for result in results:
        # Paced at 100/s: most of the run's requests went out (none held back by the stall).
        assert result["sent"] > 80 * load_seconds and result["ok"] == result["sent"], results
    assert "did not run for" in layout.serve.log_text()[mark:] or "lapsed" in layout.serve.log_text()[mark:]
    # The control plane held its views: no agent had to hold one that dropped its own endpoints.
    for name, at in agent_marks.items():
        assert "lacks this cluster's own endpoints" not in layout.clusters[name].agent.log_text()[at:], name
