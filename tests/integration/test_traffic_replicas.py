"""GetTraffic across replicas: the sum of every live replica's proxies, whichever replica answers.

Real etcd, real Envoys: one Envoy on each replica, requests through each, and the counts
compared with what each Envoy's own admin endpoint says.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from graylane.agent.stats import EnvoyStatsScraper
from graylane.controlplane.errors import Unavailable
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.local.ports import free_port
from graylane.controlplane.store import EtcdStore, connect
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc

from tests.integration.conftest import (
    LOOPBACK,
    HttpGet,
    StartEnvoy,
    api_stub,
    control_plane,
    eventually,
    lane_spec,
    serving_replica,
    start_serve,
    stop_group,
)

RELEASE = "rel"


async def envoy_requests(scraper: EnvoyStatsScraper, proxies: Sequence[EnvoyProcess]) -> int:
    """checkout v1's requests outside any lane, summed over `proxies`, as their admin endpoints say."""
    total = 0
    for proxy in proxies:
        counts = await scraper.scrape(f"{LOOPBACK}:{proxy.admin_port}")
        base = counts.get(("checkout", "v1", ""))
        total += base.requests if base is not None else 0
    return total


def base_requests(traffic: api.GetTrafficResponse) -> int:
    return sum(c.requests for c in traffic.counts if (c.service, c.version, c.lane) == ("checkout", "v1", ""))


async def send(http_get: HttpGet, proxy: EnvoyProcess, n: int) -> None:
    for _ in range(n):
        answer = await http_get(proxy.listen_port, "checkout")
        assert answer.status == 200, answer.body


async def routing(http_get: HttpGet, proxy: EnvoyProcess) -> bool:
    with contextlib.suppress(OSError, TimeoutError):
        return (await http_get(proxy.listen_port, "checkout", timeout=1.0)).status == 200
    return False


async def traffic_of(stub: api_grpc.ReleaseServiceStub) -> api.GetTrafficResponse:
    return await stub.GetTraffic(api.GetTrafficRequest(name=RELEASE))


async def answers(
    stub: api_grpc.ReleaseServiceStub, want: int, *, replicas: int, note: str = "", timeout: float = 10.0
) -> api.GetTrafficResponse:
    """GetTraffic of `stub` once it counts `want` base requests on `replicas` replicas."""
    got: list[api.GetTrafficResponse] = []

    async def holds() -> bool:
        got[:] = [await traffic_of(stub)]
        t = got[0]
        return base_requests(t) == want and t.replicas == replicas and (note in t.note if note else not t.note)

    try:
        await eventually(holds, timeout=timeout, what=f"{want} requests on {replicas} replicas")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answer: {got[0] if got else None}") from None
    return got[0]


async def test_either_replica_answers_the_sum_and_a_killed_replicas_share_expires_with_its_lease(
    store: EtcdStore, etcd_endpoint: str, envoy: StartEnvoy, http_get: HttpGet, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as es:
        a, stub_a, _ = await serving_replica(es, store, "checkout", leader_ttl_seconds=3)
        # Replica B: a `graylane serve` process on the same etcd and prefix, so it can be killed.
        xds_b = free_port()
        proc, api_b = start_serve(
            tmp_path / "b.log",
            "--etcd", etcd_endpoint, "--etcd-prefix", store.prefix, "--leader-ttl", "3",
            "--xds-listen", f"{LOOPBACK}:{xds_b}",
        )  # fmt: skip
        es.callback(stop_group, proc)
        channel_b = await es.enter_async_context(grpc.aio.insecure_channel(f"{LOOPBACK}:{api_b}"))
        stub_b = api_grpc.ReleaseServiceStub(channel_b)
        await stub_a.ApplyRelease(api.ApplyReleaseRequest(name=RELEASE, spec=lane_spec("checkout", "canary")))

        envoy_a = await envoy(ads_port=a.xds_port, node_id="envoy-a")
        envoy_b = await envoy(ads_port=xds_b, node_id="envoy-b", wait_ready=False)
        await eventually(lambda: routing(http_get, envoy_a), what="envoy-a routing checkout")
        await eventually(lambda: routing(http_get, envoy_b), what="envoy-b routing checkout", timeout=20)
        await send(http_get, envoy_a, 30)
        await send(http_get, envoy_b, 50)

        scraper = await es.enter_async_context(EnvoyStatsScraper())
        on_a = await envoy_requests(scraper, [envoy_a])
        on_b = await envoy_requests(scraper, [envoy_b])
        assert on_a >= 30 and on_b >= 50
        # Either replica: its own Envoy read now plus the other's as published.
        for stub in (stub_a, stub_b):
            t = await answers(stub, on_a + on_b, replicas=2)
            assert t.proxies == 2 and not t.unreachable
        # More traffic on B only: A's answer follows once B republished (within seconds).
        await send(http_get, envoy_b, 20)
        on_b = await envoy_requests(scraper, [envoy_b])
        t = await answers(stub_a, on_a + on_b, replicas=2)
        assert t.HasField("oldest") and t.oldest.ToMilliseconds() < 10_000

        # B killed (no clean stop, its lease is not revoked): its share stays until the lease
        # (3 s) expires, then A answers its own proxies only.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        t = await answers(stub_a, on_a, replicas=1, timeout=12)
        assert t.proxies == 1 and not t.HasField("oldest")


class _CutOff(EtcdStore):
    """An EtcdStore whose unary calls fail while `cut` is set (etcd out of reach for this
    replica alone; its watch stays, as a partitioned replica's watch would just stall)."""

    cut = False

    async def _unary(self, method: object, request: Any, timeout: float) -> Any:
        if self.cut:
            raise Unavailable("etcd unreachable (injected)")
        return await super()._unary(method, request, timeout)


async def test_etcd_out_of_reach_answers_own_numbers_and_says_the_others_are_unknown(
    store: EtcdStore, etcd_endpoint: str, envoy: StartEnvoy, http_get: HttpGet
) -> None:
    async with contextlib.AsyncExitStack() as es:
        plain = await connect(etcd_endpoint, prefix=store.prefix)
        es.push_async_callback(plain.close)
        cut = _CutOff(plain._channel, prefix=store.prefix)
        b, stub_b, _ = await serving_replica(es, store, "checkout", leader_ttl_seconds=3)
        a = await es.enter_async_context(control_plane(cut, leader_ttl_seconds=3))
        stub_a = await api_stub(es, a)
        await stub_b.ApplyRelease(api.ApplyReleaseRequest(name=RELEASE, spec=lane_spec("checkout", "canary")))
        envoy_a = await envoy(ads_port=a.xds_port, node_id="envoy-a")
        envoy_b = await envoy(ads_port=b.xds_port, node_id="envoy-b")
        await eventually(lambda: routing(http_get, envoy_a), what="envoy-a routing checkout")
        await eventually(lambda: routing(http_get, envoy_b), what="envoy-b routing checkout")
        await send(http_get, envoy_a, 20)
        await send(http_get, envoy_b, 40)
        scraper = await es.enter_async_context(EnvoyStatsScraper())
        on_a = await envoy_requests(scraper, [envoy_a])
        on_b = await envoy_requests(scraper, [envoy_b])
        await answers(stub_a, on_a + on_b, replicas=2)

        cut.cut = True
        t = await answers(stub_a, on_a, replicas=1, note="unknown")
        assert "etcd" in t.note and t.proxies == 1
        # The other replica still sums both (A's record lives until its lease expires; then
        # only B's own): never more than the two Envoys served.
        assert base_requests(await traffic_of(stub_b)) in (on_a + on_b, on_b)

        cut.cut = False  # etcd back: A answers the sum again, and never stopped serving
        await answers(stub_a, on_a + on_b, replicas=2, timeout=15)
        await answers(stub_b, on_a + on_b, replicas=2, timeout=15)
