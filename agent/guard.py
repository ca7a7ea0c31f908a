"""The local guard: what an agent may do on its own while the control plane is away.

Owns: the rule that a disconnected agent holds its last view (it never moves weights on its
own) unless a lane's abort condition is met by local metrics, in which case it routes that
lane back to base in its cluster and keeps a `GuardReport` to send on reconnect.

`AbortCheck` is the hook the metrics work plugs into: given the view in force, which
lanes' abort conditions local metrics meet now. The guard is pure decision plus a clock
passed in, so it is driven tick by tick in tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

from graylane.v1 import agent_pb2 as apb
from graylane.xds import view as xv


class AbortCheck(Protocol):
    def __call__(self, view: xv.RoutingView) -> Iterable[str]:
        """Lanes of `view` whose abort condition local metrics meet now."""
        ...


def without_lanes(view: xv.RoutingView, lanes: Iterable[str]) -> xv.RoutingView:
    """`view` with `lanes` gone: their traffic (tagged or not) goes to base."""
    drop = set(lanes)
    return dataclasses.replace(view, lanes=tuple(lane for lane in view.lanes if lane.name not in drop))


class LocalGuard:
    def __init__(self, check: AbortCheck | None, *, after_seconds: float) -> None:
        self._check = check
        self.after_seconds = after_seconds
        self.aborted: set[str] = set()
        self.pending: list[apb.GuardReport] = []  # sent on reconnect

    def tick(self, view: xv.RoutingView | None, *, disconnected_for: float | None, now: float) -> xv.RoutingView | None:
        """The view to serve instead of `view`, or None to keep serving `view` unchanged.

        `disconnected_for` is None while the control plane is reachable: the guard then
        never acts (the control plane decides).
        """
        if view is None or self._check is None or disconnected_for is None or disconnected_for < self.after_seconds:
            return None
        live = {lane.name for lane in view.lanes}
        newly = sorted(set(self._check(view)) & live - self.aborted)
        if not newly:
            return None
        self.aborted.update(newly)
        report = apb.GuardReport(
            lanes=newly,
            reason=f"control plane unreachable for {disconnected_for:.1f}s and the abort condition was met locally",
        )
        report.at.FromNanoseconds(int(now * 1e9))
        self.pending.append(report)
        return without_lanes(view, self.aborted)

    def reconnected(self) -> list[apb.GuardReport]:
        """Reports to send now; the control plane's view is authoritative again."""
        reports, self.pending = self.pending, []
        self.aborted.clear()
        return reports
