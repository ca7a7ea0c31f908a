"""A NACK under a store fault: the pause it calls for is written once etcd answers again,
never dropped because the first attempt failed. Real etcd, a real Envoy that rejects the
lane's rule, one control-plane replica."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from graylane.controlplane.domain import model
from graylane.controlplane.errors import Unavailable
from graylane.controlplane.store import EtcdStore
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api

from tests.integration.conftest import STRICT_RUNTIME, big_rule, checkout_replica, faulty_store, lane_spec, poll_release


class _PauseFailsOnce(EtcdStore):
    """The real store, but the first write of a pause fails as if etcd could not be reached
    (the transaction is not sent): what a NACK arriving during an etcd outage meets."""

    failed = 0

    async def update_release(
        self, release: model.Release, events: Iterable[model.Event], **options: Any
    ) -> model.Release:
        events = list(events)
        if not self.failed and any(e.action == "pause" for e in events):
            self.failed += 1
            raise Unavailable("etcd unreachable (injected)")
        return await super().update_release(release, events, **options)


@pytest.fixture
async def flaky(etcd_endpoint: str) -> AsyncIterator[_PauseFailsOnce]:
    async with faulty_store(etcd_endpoint, _PauseFailsOnce) as store:
        yield store


async def test_a_nack_whose_pause_failed_to_write_pauses_once_etcd_answers(flaky: _PauseFailsOnce, envoy: Any) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub, _v1, _v2 = await checkout_replica(es, flaky)
        await envoy(ads_port=plane.xds_port, node_id="strict", runtime=STRICT_RUNTIME)
        await stub.ApplyRelease(
            api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane", rules=[big_rule()]))
        )
        await stub.NextBatch(api.ActionRequest(name="rel"))
        held = await poll_release(stub, "rel", lambda r: r.status.phase == pb.PAUSED)
        assert flaky.failed == 1  # the first attempt did fail
        assert held.status.last_nack.node == "strict" and "program size" in held.status.last_nack.message
        assert not held.status.reached
