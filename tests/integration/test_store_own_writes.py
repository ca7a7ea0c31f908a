"""This replica's own committed writes, applied from etcd's answer before the watch brings them.

Real etcd; the watch is held back (a store that delays every watch batch), so what arrives
within the delay can only have come from the transaction's answer: the follower's state,
a release Watch and the data plane's view. A failed transaction applies nothing; another
client's write still comes from the watch alone; the watch's events for an own write are
then no-ops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest
from etcd3.etcdrpc import kv_pb2, rpc_pb2
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Action, Cause
from graylane.controlplane.domain.releases import Releases
from graylane.controlplane.errors import Conflict
from graylane.controlplane.store import EtcdStore, connect

from tests.integration.conftest import checkout_canary, control_plane, eventually, faulty_store

HELD_SECONDS = 2.0  # every watch batch is held this long: what comes sooner came from an answer
SOON = 1.0


class HeldWatch(EtcdStore):
    """Delivers every watch batch HELD_SECONDS after it came (the answers to its writes are
    not held), in order."""

    async def watch(self, *, start_revision: int, key: bytes | None = None) -> AsyncIterator[list[rpc_pb2.Event]]:
        came: asyncio.Queue[tuple[float, list[rpc_pb2.Event]] | None] = asyncio.Queue()
        batches = super().watch(start_revision=start_revision, key=key)

        async def read() -> None:
            try:
                async for events in batches:
                    came.put_nowait((time.monotonic(), events))
            finally:
                came.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await came.get()) is not None:
                await asyncio.sleep(max(0.0, item[0] + HELD_SECONDS - time.monotonic()))
                yield item[1]
            reader.result()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@pytest.fixture
async def held(etcd_endpoint: str) -> AsyncIterator[HeldWatch]:
    async with faulty_store(etcd_endpoint, HeldWatch) as store:
        yield store


async def _release(store: EtcdStore) -> model.Release:
    await store.put_service(model.Service(name="checkout", stable_version="v1"))
    for v in ("v1", "v2"):
        await store.put_version(model.Version(service="checkout", name=v))
    return await Releases(store).create("rel", checkout_canary((10, 50, 100)), Cause(actor="ci"))


async def test_committed_puts_are_told_at_once_and_a_failed_transaction_tells_nothing(held: HeldWatch) -> None:
    release = await _release(held)
    told: list[tuple[int, list[bytes], dict[bytes, int]]] = []

    def listen(revision: int, puts: Sequence[kv_pb2.KeyValue], guards: Mapping[bytes, int]) -> None:
        told.append((revision, [kv.key for kv in puts], dict(guards)))

    remove = held.on_committed(listen)
    try:
        moved = replace_status(release, reason="moved")
        written = await held.update_release(moved, [])
        key = held.release_key("rel")
        assert told == [(written.revision, [key], {key: release.revision})]
        with pytest.raises(Conflict):
            await held.update_release(replace_status(release, reason="stale"), [])  # guarded on an old revision
        assert len(told) == 1
    finally:
        remove()
    await held.update_release(replace_status(written, reason="unheard"), [])
    assert len(told) == 1  # removed: told no more


def replace_status(release: model.Release, *, reason: str) -> model.Release:
    from dataclasses import replace

    return replace(release, status=replace(release.status, reason=reason))


async def test_a_release_watch_yields_this_replicas_write_before_the_watch_and_skips_it_after(
    held: HeldWatch, etcd_endpoint: str
) -> None:
    release = await _release(held)
    current, revision = await held.get_release_at("rel")
    watch = held.watch_release("rel", start_revision=revision + 1, after=current.revision)
    other = await connect(etcd_endpoint, prefix=held.prefix)
    try:
        # (the watch runs from its first value on: another client's write, held)
        before = await other.update_release(replace_status(release, reason="before"), [])
        async with asyncio.timeout(3 * HELD_SECONDS + 5):
            zeroth = await anext(watch)
        assert zeroth is not None and zeroth.status.reason == "before"
        t0 = time.monotonic()
        written = await held.update_release(replace_status(before, reason="mine"), [])
        async with asyncio.timeout(SOON):
            first = await anext(watch)
        assert first is not None and first.revision == written.revision and first.status.reason == "mine"
        assert time.monotonic() - t0 < SOON
        # Another client's write, then this one's guarded on it: the watch brings both, in
        # order (the own write cannot go ahead of a value not yielded yet), and the own first
        # write's event before them is skipped, not yielded twice.
        theirs = await other.update_release(replace_status(written, reason="theirs"), [])
        await held.update_release(replace_status(theirs, reason="after theirs"), [])
        async with asyncio.timeout(3 * HELD_SECONDS + 5):
            second = await anext(watch)
            third = await anext(watch)
        assert second is not None and second.revision == theirs.revision and second.status.reason == "theirs"
        assert third is not None and third.status.reason == "after theirs"
        assert time.monotonic() - t0 >= HELD_SECONDS
    finally:
        await other.close()
        await watch.aclose()  # type: ignore[attr-defined]


async def test_the_follower_applies_a_next_batch_before_its_watch_event(held: HeldWatch) -> None:
    await _release(held)
    async with control_plane(held) as plane:
        dp = plane.dataplane

        def follows(batch: int) -> bool:
            snap = dp.snapshot
            return snap is not None and "rel" in snap.by_name and snap.by_name["rel"].status.batch == batch

        await eventually(lambda: follows(-1), timeout=20, what="the follower to hold the release")

        async def caught_up() -> bool:  # (the test's etcd has no other writer meanwhile)
            _, now = await held.get_release_at("rel")
            live = plane.releases._live  # the follower's state: its revision moves on every key
            return live is not None and live.revision == now

        await eventually(caught_up, timeout=20, what="the follower to reach etcd's revision")
        t0 = time.monotonic()
        moved = await plane.releases.act("rel", Action.NEXT, Cause(actor="ci"))
        await eventually(lambda: follows(0), timeout=SOON, what="the follower to apply the write from its answer")
        assert time.monotonic() - t0 < SOON
        snap = dp.snapshot
        assert snap is not None and snap.revision >= moved.revision
        view = dp.view
        assert view is not None and [lane.weight for lane in view.lanes if lane.name == "checkout-v2"] == [10]
        # The watch's batch for that revision comes later and changes nothing.
        await asyncio.sleep(0)  # (let the follower take the held batch when it comes)
        await eventually(
            lambda: dp.snapshot is not None and dp.snapshot.revision >= moved.revision, timeout=3 * HELD_SECONDS
        )
        assert dp.snapshot is not None and dp.snapshot.by_name["rel"].status.batch == 0
