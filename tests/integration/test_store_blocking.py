"""The store's blocking path (unary calls and lease keep-alives on a blocking channel in threads).

It must answer exactly as the asyncio channel does (same values, same errors) and keep the
loop free while etcd does not answer; measured for latency by `bench/run.py --fleet-only`
(GRAYLANE_BENCH_STORE_PROBE=1).
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from graylane.controlplane.domain import model
from graylane.controlplane.errors import LeaseLost, NotFound, Unavailable
from graylane.controlplane.local.etcd import EtcdProcess
from graylane.controlplane.store import EtcdStore, _client, connect
from graylane.controlplane.store._client import CHANNEL_OPTIONS


@pytest.fixture
async def both(etcd_endpoint: str) -> AsyncIterator[tuple[EtcdStore, EtcdStore]]:
    """The same prefix through a store with the blocking path (`connect`) and one without."""
    prefix = f"/graylane-test/{uuid.uuid4().hex}/v1/"
    blocking = await connect(etcd_endpoint, prefix=prefix)
    plain = EtcdStore(grpc.aio.insecure_channel(etcd_endpoint, options=list(CHANNEL_OPTIONS)), prefix=prefix)
    try:
        yield blocking, plain
    finally:
        await blocking.close()
        await plain.close()


async def test_blocking_and_asyncio_paths_answer_alike(both: tuple[EtcdStore, EtcdStore]) -> None:
    blocking, plain = both
    assert blocking._blocking is not None and plain._blocking is None
    await blocking.put_service(model.Service(name="checkout", stable_version="v1"))
    for store in both:
        assert [s.name for s in await store.list_services()] == ["checkout"]
        assert (await store.get_service("checkout")) == (await plain.get_service("checkout"))
        with pytest.raises(NotFound):
            await store.get_release("absent")
        lease = await store.grant_lease(5)
        assert 0 < await store.keep_alive(lease) <= 5
        await store.revoke_lease(lease)
        # A revoked lease: the same answer on both paths (0 or LeaseLost, never anything else).
        outcomes = []
        for s in both:
            try:
                outcomes.append(await s.keep_alive(lease))
            except LeaseLost:
                outcomes.append("lease lost")
        assert outcomes[0] == outcomes[1], outcomes
        assert outcomes[0] in (0, "lease lost")


async def test_etcd_gone_is_unavailable_and_the_loop_keeps_running(tmp_path: pathlib.Path) -> None:
    etcd = EtcdProcess(data_dir=tmp_path / "etcd")
    await etcd.start()
    store = await connect(etcd.endpoint, prefix="/graylane-test/gone/v1/")
    try:
        lease = await store.grant_lease(5)
        etcd.kill()
        # While calls wait on the dead etcd in their threads, the loop keeps ticking.
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        try:
            with pytest.raises(Unavailable):
                await store.get_release("rel")
            with pytest.raises(Unavailable):
                await store.keep_alive(lease)
            with pytest.raises(Unavailable):
                await store.list_releases()
        finally:
            ticker.cancel()
        elapsed = time.monotonic() - started
        assert ticks >= int(elapsed / 0.01 / 4), (ticks, elapsed)  # a blocked loop would not tick
    finally:
        await store.close()
        await etcd.stop()


def test_a_call_queued_past_its_deadline_is_unavailable_without_being_sent() -> None:
    sent: list[float] = []

    def call(*, timeout: float) -> int:
        sent.append(timeout)
        return 1

    with pytest.raises(grpc.RpcError) as raised:
        _client._before(time.monotonic() - 0.1, call)
    assert sent == []
    assert isinstance(_client._unavailable(raised.value), Unavailable)
    assert _client._before(time.monotonic() + 5.0, call) == 1
    assert 4.0 < sent[0] <= 5.0


async def test_unary_calls_go_on_the_loop_channel_while_the_owner_says_so(
    both: tuple[EtcdStore, EtcdStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`unary_on_loop_while`: asked before each call; true sends it on the grpc.aio channel
    (no worker thread), false (or no predicate) in a thread; the answers are the same."""
    store, plain = both
    in_thread: list[float] = []
    before = _client._before

    def counted(deadline: float, call: object) -> object:
        in_thread.append(deadline)
        return before(deadline, call)  # type: ignore[arg-type]

    monkeypatch.setattr(_client, "_before", counted)
    on_loop = True
    asked = 0

    def small() -> bool:
        nonlocal asked
        asked += 1
        return on_loop

    store.unary_on_loop_while(small)
    await store.put_service(model.Service(name="checkout", stable_version="v1"))
    assert (await store.get_service("checkout")) == (await plain.get_service("checkout"))
    with pytest.raises(NotFound):
        await store.get_release("absent")
    assert in_thread == [] and asked >= 3
    on_loop = False
    assert (await store.get_service("checkout")) == (await plain.get_service("checkout"))
    with pytest.raises(NotFound):
        await store.get_release("absent")
    assert len(in_thread) >= 2
    store.unary_on_loop_while(None)
    seen = len(in_thread)
    await store.list_services()
    assert len(in_thread) > seen


async def test_etcd_gone_is_unavailable_on_the_loop_channel_too(tmp_path: pathlib.Path) -> None:
    etcd = EtcdProcess(data_dir=tmp_path / "etcd")
    await etcd.start()
    store = await connect(etcd.endpoint, prefix="/graylane-test/gone-loop/v1/")
    store.unary_on_loop_while(lambda: True)
    try:
        await store.put_service(model.Service(name="checkout", stable_version="v1"))
        etcd.kill()
        with pytest.raises(Unavailable):
            await store.get_release("rel")
        with pytest.raises(Unavailable):
            await store.list_releases()
    finally:
        await store.close()
        await etcd.stop()
