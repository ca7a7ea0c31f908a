"""The local guard: what an agent may do on its own while the control plane is away.

Owns: the rule that a disconnected agent holds its last view (it never moves weights on its
own) unless a lane's abort condition is met by local metrics, in which case it routes that
lane back to base in its cluster and keeps a `GuardReport` to send on reconnect.

`AbortCheck` is the hook the metrics work plugs into: given the view in force, which
lanes' abort conditions local metrics meet now. `LaneErrorRate` is the agent's own: the
per-(service, version, lane) deltas its metrics reporter reads from the cluster's Envoys
(agent/stats.py through `MetricsReporter`), kept over a short window, and a lane aborts
when its gray versions' share of errors (5xx and requests ended without an answer) over
that window reaches a threshold with enough requests to judge. The guard is pure decision
plus a clock passed in, so it is driven tick by tick in tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from graylane.agent.defaults import DEFAULT_MAX_ERROR_RATE
from graylane.v1 import agent_pb2 as apb
from graylane.xds import view as xv


class AbortCheck(Protocol):
    def __call__(self, view: xv.RoutingView) -> Iterable[str]:
        """Lanes of `view` whose abort condition local metrics meet now."""
        ...


@runtime_checkable
class ExplainedAbortCheck(AbortCheck, Protocol):
    """An `AbortCheck` that also says what it saw, for the guard's report (the release history)."""

    def explain(self, lane: xv.Lane) -> str: ...


DEFAULT_MIN_REQUESTS = 10
DEFAULT_WINDOW_SECONDS = 10.0


class LaneErrorRate:
    """An `AbortCheck` over the metrics reports the agent reads from its Envoys.

    `observe(report)` on every reporter tick (connected or not); `__call__(view)` names the
    lanes whose gray versions failed at least `max_error_rate` of at least `min_requests`
    requests in the reports of the last `window_seconds` (by the reports' own times).
    One asyncio loop; no I/O.
    """

    def __init__(
        self,
        *,
        max_error_rate: float = DEFAULT_MAX_ERROR_RATE,
        min_requests: int = DEFAULT_MIN_REQUESTS,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
    ) -> None:
        if not 0 < max_error_rate <= 1:
            raise ValueError(f"max_error_rate {max_error_rate} must be in (0, 1]")
        if min_requests < 1:
            raise ValueError(f"min_requests {min_requests} must be at least 1")
        if not (math.isfinite(window_seconds) and window_seconds > 0):
            raise ValueError(f"window_seconds {window_seconds} must be positive")
        self.max_error_rate = max_error_rate
        self.min_requests = min_requests
        self.window_seconds = window_seconds
        # (report time, {(service, version, lane): (requests, errors)})
        self._reports: deque[tuple[float, dict[tuple[str, str, str], tuple[int, int]]]] = deque()

    def observe(self, report: apb.MetricsReport) -> None:
        at = report.at.ToNanoseconds() / 1e9
        series: dict[tuple[str, str, str], tuple[int, int]] = {}
        for s in report.series:
            requests, errors = series.get((s.service, s.version, s.lane), (0, 0))
            series[(s.service, s.version, s.lane)] = (requests + s.requests, errors + s.errors)
        self._reports.append((at, series))
        while self._reports and self._reports[0][0] <= at - self.window_seconds:
            self._reports.popleft()

    def totals(self, lane: xv.Lane) -> tuple[int, int]:
        """(requests, errors) of `lane`'s gray versions in the window."""
        wanted = {(service, version, lane.name) for service, version in lane.versions}
        requests = errors = 0
        for _, series in self._reports:
            for key in wanted & series.keys():
                requests += series[key][0]
                errors += series[key][1]
        return requests, errors

    def explain(self, lane: xv.Lane) -> str:
        requests, errors = self.totals(lane)
        return (
            f"{lane.name}: {errors} of {requests} gray requests failed in the last {self.window_seconds:g}s "
            f"(limit {self.max_error_rate:.0%} of at least {self.min_requests})"
        )

    def __call__(self, view: xv.RoutingView) -> list[str]:
        failing = []
        for lane in view.lanes:
            requests, errors = self.totals(lane)
            if requests >= self.min_requests and errors >= self.max_error_rate * requests:
                failing.append(lane.name)
        return failing


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
        self.actions = 0  # lanes routed to base since start, for metrics

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
        self.actions += len(newly)
        reason = f"control plane unreachable for {disconnected_for:.1f}s and the abort condition was met locally"
        if isinstance(self._check, ExplainedAbortCheck):
            lanes = {lane.name: lane for lane in view.lanes}
            reason += ": " + "; ".join(self._check.explain(lanes[name]) for name in newly)
        report = apb.GuardReport(lanes=newly, reason=reason)
        report.at.FromNanoseconds(int(now * 1e9))
        self.pending.append(report)
        return without_lanes(view, self.aborted)

    def reconnected(self) -> list[apb.GuardReport]:
        """Reports to send now; the control plane's view is authoritative again."""
        reports, self.pending = self.pending, []
        self.aborted.clear()
        return reports
