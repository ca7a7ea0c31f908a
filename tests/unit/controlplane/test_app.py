"""app: the collector tuning freezes what survives every pass, and thaws (with one full pass)
after churn or growth of the allocated blocks per stream."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Awaitable, Callable

from envoy.config.core.v3 import base_pb2
from graylane.controlplane import app
from graylane.xds.tracker import SOTW, ProxyTracker


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def _settle() -> None:
    for _ in range(3):  # the collector's callback hands the work to the loop
        await asyncio.sleep(0)


async def _after_collect(generation: int = 2) -> None:
    gc.collect(generation)
    await _settle()


def _run_tuned(body: Callable[[ProxyTracker, app.CollectorTuning], Awaitable[None]]) -> None:
    """Run `body` in a new event loop inside the collector tuning of a new tracker, and
    unfreeze whatever it froze, pass or fail."""

    async def main() -> None:
        tracker = ProxyTracker()
        try:
            with app.CollectorTuning(tracker) as tuning:
                await body(tracker, tuning)
        finally:
            gc.unfreeze()

    asyncio.run(main())


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
                # A frozen cycle: only a pass over everything reclaims it.
                cycle = _Cycle()
                gone = weakref.ref(cycle)
                gc.freeze()
                del cycle
                gc.collect()  # frozen: this pass does not reclaim it
                assert gone() is not None
                await _settle()  # the bound is seen; the thaw collects at once, then freezes
                assert tuning.thaws == 1 and tuning.freezes == 2
                assert gone() is None and gc.get_freeze_count() > 0
                assert tuning.ended_since_thaw() == 0
                await _after_collect()
                assert tuning.freezes == 3 and tuning.thaws == 1
            assert gc.get_threshold() == threshold and gc.get_freeze_count() == 0
        finally:
            gc.unfreeze()

    asyncio.run(main())


def test_young_and_middle_passes_freeze_their_survivors_at_once() -> None:
    async def body(tracker: ProxyTracker, tuning: app.CollectorTuning) -> None:
        for generation in (0, 1):
            gc.unfreeze()
            kept = [[i] for i in range(1000)]  # survivors of the pass below
            young = tuning.young_freezes
            gc.collect(generation)
            # Frozen inside the collector's callback, before anything else runs.
            assert tuning.young_freezes == young + 1 and gc.get_freeze_count() > len(kept)
        # Nothing is frozen between a thaw and the end of its full pass.
        tuning._thawing = True
        gc.unfreeze()
        gc.collect(0)
        assert gc.get_freeze_count() == 0
        await _after_collect()  # that full pass: freezing resumes
        assert gc.get_freeze_count() > 0 and not tuning._thawing

    _run_tuned(body)


def test_allocated_blocks_growing_faster_than_the_streams_thaw_everything() -> None:
    async def body(tracker: ProxyTracker, tuning: app.CollectorTuning) -> None:
        await _after_collect()
        per_stream = tuning._per_stream
        assert tuning.freezes == 1 and per_stream > 0
        # Growth with no new stream (what frozen garbage would look like): past the bound
        # (each one-element list is at least two blocks: the list and its items).
        grown = [[i] for i in range(int(per_stream * app._STREAM_SLACK * (app._THAW_GROWTH - 1) / 2) + 1000)]
        gc.freeze()
        for _ in range(app._CHECK_EVERY):  # checked every few young passes
            gc.collect(0)
        await _settle()  # thawed, and one full pass run at once
        assert tuning.thaws == 1 and tuning.freezes == 2
        assert tuning._per_stream >= per_stream  # the new baseline: all of it is live
        for _ in range(app._CHECK_EVERY):
            gc.collect(0)
        await _settle()
        assert tuning.thaws == 1
        del grown

    _run_tuned(body)


def test_young_passes_are_started_from_the_loop_while_streams_change() -> None:
    async def body(tracker: ProxyTracker, tuning: app.CollectorTuning) -> None:
        passes: list[int] = []

        def count(phase: str, info: dict[str, int]) -> None:
            if phase == "stop" and info["generation"] == 0:
                passes.append(1)

        gc.callbacks.append(count)
        try:
            await asyncio.sleep(3 * app._YOUNG_SECONDS)
            idle = len(passes)
            assert idle == 0  # nothing changes: the driver waits on the tracker
            deadline = asyncio.get_running_loop().time() + 5.0
            i = 0
            while len(passes) < idle + 3:  # each change of a stream lets one more pass start
                assert asyncio.get_running_loop().time() < deadline
                tracker.connected(base_pb2.Node(id=f"s{i}"), stream=f"s{i}#1", key="k", protocol=SOTW)
                i += 1
                await asyncio.sleep(app._YOUNG_SECONDS)
        finally:
            gc.callbacks.remove(count)

    _run_tuned(body)


def test_the_growth_bound_needs_no_full_pass_to_set_its_baseline() -> None:
    async def body(tracker: ProxyTracker, tuning: app.CollectorTuning) -> None:
        for _ in range(app._CHECK_EVERY):  # young passes only, as a serving replica has
            gc.collect(0)
        await _settle()
        per_stream = tuning._per_stream
        assert per_stream >= app._MIN_PER_STREAM and tuning.freezes == 0
        grown = [[i] for i in range(int(per_stream * app._STREAM_SLACK * (app._THAW_GROWTH - 1) / 2) + 1000)]
        for _ in range(app._CHECK_EVERY):
            gc.collect(0)
        await _settle()
        assert tuning.thaws == 1 and tuning.freezes == 1
        del grown

    _run_tuned(body)
