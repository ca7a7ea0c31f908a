"""app: the collector tuning freezes what survives each full pass, and thaws after churn."""

from __future__ import annotations

import asyncio
import gc

from envoy.config.core.v3 import base_pb2
from graylane.controlplane import app
from graylane.xds.tracker import SOTW, ProxyTracker


async def _after_collect() -> None:
    gc.collect()
    for _ in range(3):  # the callback hands the work to the loop
        await asyncio.sleep(0)


def test_full_passes_freeze_their_survivors_and_churn_thaws_them() -> None:
    async def main() -> None:
        threshold = gc.get_threshold()
        tracker = ProxyTracker()
        for i in range(10):
            tracker.connected(base_pb2.Node(id=f"n{i}"), stream=f"n{i}#1", key="k", protocol=SOTW)
        try:
            with app.CollectorTuning(tracker) as tuning:
                assert gc.get_threshold()[0] == app._YOUNG_THRESHOLD
                await _after_collect()
                assert tuning.freezes == 1 and gc.get_freeze_count() > 0
                for i in range(app._THAW_MIN_ENDED):  # streams come and go: their state may be frozen garbage
                    tracker.connected(base_pb2.Node(id=f"c{i}"), stream=f"c{i}#1", key="k", protocol=SOTW)
                    tracker.disconnected(f"c{i}#1")
                assert tuning.ended_since_thaw() == app._THAW_MIN_ENDED
                await _after_collect()
                assert tuning.thaws == 1 and gc.get_freeze_count() == 0
                assert tuning.ended_since_thaw() == 0
                await _after_collect()
                assert tuning.freezes == 2
            assert gc.get_threshold() == threshold and gc.get_freeze_count() == 0
        finally:
            gc.unfreeze()

    asyncio.run(main())
