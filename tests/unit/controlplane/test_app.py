"""app: the collector tuning freezes what survives middle and full passes, and thaws after churn or growth."""

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


def test_middle_passes_freeze_their_survivors_unless_a_thaw_waits_for_its_full_pass() -> None:
    async def main() -> None:
        tracker = ProxyTracker()
        try:
            with app.CollectorTuning(tracker) as tuning:
                gc.unfreeze()
                kept = [[i] for i in range(1000)]  # survivors of the middle pass below
                gc.collect(1)
                for _ in range(3):
                    await asyncio.sleep(0)
                assert tuning.young_freezes >= 1 and gc.get_freeze_count() > 0
                assert gc.is_tracked(kept[0])
                # A thaw waits for the full pass that scans everything: no freeze before it.
                tuning._thawed = True
                gc.unfreeze()
                gc.collect(1)
                for _ in range(3):
                    await asyncio.sleep(0)
                assert gc.get_freeze_count() == 0
                await _after_collect()  # that full pass: freezing resumes
                assert gc.get_freeze_count() > 0 and not tuning._thawed
        finally:
            gc.unfreeze()

    asyncio.run(main())


def test_frozen_objects_growing_faster_than_the_streams_thaw_them() -> None:
    async def main() -> None:
        tracker = ProxyTracker()
        try:
            with app.CollectorTuning(tracker) as tuning:
                await _after_collect()
                per_stream = tuning._per_stream
                assert tuning.freezes == 1 and per_stream > 0
                # Garbage-like growth with no new stream: more than double per open stream.
                grown = [[i] for i in range(int(per_stream * app._STREAM_SLACK * app._THAW_GROWTH) + 1)]
                gc.freeze()  # as the middle passes do with what survives them
                await _after_collect()
                assert tuning.thaws == 1 and gc.get_freeze_count() == 0
                await _after_collect()
                assert tuning.freezes == 2 and tuning._per_stream >= per_stream
                del grown
        finally:
            gc.unfreeze()

    asyncio.run(main())
