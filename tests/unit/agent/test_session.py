"""The agent's control-plane session (agent/session.py): reconnect backoff, and a hung
control plane noticed on an open stream (an in-process gRPC server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from graylane.agent.session import Backoff, ControlPlaneSession
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import agent_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def test_full_jitter_stays_within_the_exponential_ceiling_and_the_cap() -> None:
    backoff = Backoff(base=0.1, cap=5.0, rng=random.Random(7))
    ceilings = [min(5.0, 0.1 * 2**n) for n in range(12)]
    for ceiling in ceilings:
        samples = []
        for _ in range(200):
            backoff.reset()
            for _ in range(ceilings.index(ceiling)):
                backoff.next()
            samples.append(backoff.next())
        assert all(0.0 <= s <= ceiling for s in samples), ceiling
        # Full jitter: the draws spread over the whole interval, not near one point.
        assert max(samples) > 0.8 * ceiling and min(samples) < 0.2 * ceiling, ceiling


def test_the_ceiling_stops_growing_at_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=2.0, rng=random.Random(1))
    draws = [backoff.next() for _ in range(1000)]  # the exponent is clamped: no overflow
    assert max(draws) <= 2.0
    assert max(draws[3:]) > 1.5  # from the third attempt the ceiling is the cap
    assert backoff.longest() == 2.0


def test_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(base=0.1, cap=5.0, rng=random.Random(3))
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert backoff.next() <= 0.1
    assert backoff.next() <= 0.2


@pytest.mark.parametrize("seed", range(5))
def test_first_retry_is_quick(seed: int) -> None:
    assert Backoff(base=0.1, cap=5.0, rng=random.Random(seed)).next() <= 0.1


class WelcomeThenSilence(agent_pb2_grpc.AgentServiceServicer):
    """A control plane that welcomes an agent and then never sends anything again; once
    `hang` is set it welcomes nobody (its loop is stalled)."""

    def __init__(self, hang: asyncio.Event) -> None:
        self.hang = hang

    async def Connect(
        self, requests: AsyncIterator[apb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[apb.ControlMessage]:
        await anext(aiter(requests))
        if self.hang.is_set():
            await asyncio.Event().wait()
        yield apb.ControlMessage(welcome=apb.Welcome(cluster="east", heartbeat_interval_ms=100, lease_ttl_seconds=3))
        await asyncio.Event().wait()


class HangableHealth(health_pb2_grpc.HealthServicer):
    """Answers health checks until `hang` is set, then never (a stalled control plane's loop)."""

    def __init__(self) -> None:
        self.hang = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if self.hang.is_set():
            await asyncio.Event().wait()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.asyncio
async def test_a_control_plane_that_stops_answering_on_an_open_stream_counts_as_gone() -> None:
    server = grpc.aio.server()
    health = HangableHealth()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(WelcomeThenSilence(health.hang), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    session = ControlPlaneSession(
        target=f"127.0.0.1:{port}",
        hello=apb.AgentHello(cluster="east"),
        on_view=lambda view: None,
        backoff=Backoff(base=0.05, cap=0.1),
        answer_timeout_seconds=0.5,
    )
    running = asyncio.create_task(session.run())
    try:
        async with asyncio.timeout(5):
            await session.connected.wait()
        async with asyncio.timeout(5):
            while session.last_answer is None or session.last_answer < time.monotonic() - 0.05:
                await asyncio.sleep(0.02)  # a health check answered since the welcome
        health.hang.set()
        hung_at = time.monotonic()
        async with asyncio.timeout(5):
            while session.connected.is_set():
                await asyncio.sleep(0.02)
        noticed = time.monotonic() - hung_at
        assert 0.4 <= noticed <= 2.5, noticed
        # Away since its last answer, not since the moment the agent noticed.
        assert session.disconnected_since is not None and session.disconnected_since <= hung_at
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await server.stop(0)
