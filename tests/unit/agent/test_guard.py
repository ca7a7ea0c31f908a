"""The local guard (agent/guard.py), driven tick by tick with a fake AbortCheck and a fake clock."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from graylane.agent.guard import LaneErrorRate, LocalGuard, without_lanes
from graylane.v1 import agent_pb2 as apb
from graylane.xds import view as xv

AFTER = 30.0
NOW = 1_700_000_000.0


class ScriptedAbortCheck:
    """An AbortCheck answering what the test says, recording every view it was asked about."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.calls: list[xv.RoutingView] = []

    def __call__(self, view: xv.RoutingView) -> Iterable[str]:
        self.calls.append(view)
        return sorted(self.failing)


def lane(name: str, weight: int = 10) -> xv.Lane:
    return xv.Lane(name=name, entry="checkout", weight=weight, versions=(("checkout", f"v-{name}"),))


VIEW = xv.RoutingView(
    services=(xv.ServiceRoute("checkout", "v1"),),
    endpoints=(xv.VersionEndpoints("checkout", "v1", (xv.Endpoint("127.0.0.1", 8081),)),),
    lanes=(lane("a"), lane("b", 20)),
)


def test_holds_the_view_while_connected_or_not_away_long_enough() -> None:
    check = ScriptedAbortCheck()
    check.failing = {"a", "b"}
    guard = LocalGuard(check, after_seconds=AFTER)
    assert guard.tick(VIEW, disconnected_for=None, now=NOW) is None
    assert guard.tick(VIEW, disconnected_for=AFTER - 0.1, now=NOW) is None
    assert check.calls == []  # the control plane decides while it is reachable (or only just gone)
    assert guard.pending == [] and guard.aborted == set()


def test_never_moves_weights_on_its_own_when_no_abort_condition_holds() -> None:
    check = ScriptedAbortCheck()
    guard = LocalGuard(check, after_seconds=AFTER)
    for tick in range(5):
        assert guard.tick(VIEW, disconnected_for=AFTER + tick, now=NOW + tick) is None
    assert len(check.calls) == 5 and guard.pending == []


def test_routes_an_aborting_lane_to_base_once_and_reports_it() -> None:
    check = ScriptedAbortCheck()
    guard = LocalGuard(check, after_seconds=AFTER)

    check.failing = {"a"}
    override = guard.tick(VIEW, disconnected_for=AFTER, now=NOW)
    assert override is not None
    assert [x.name for x in override.lanes] == ["b"]
    assert override.services == VIEW.services and override.endpoints == VIEW.endpoints
    assert guard.aborted == {"a"}
    [report] = guard.pending
    assert list(report.lanes) == ["a"]
    assert "30.0s" in report.reason
    assert report.at.ToNanoseconds() == int(NOW * 1e9)

    # Still failing: nothing new to do, nothing reported twice.
    assert guard.tick(VIEW, disconnected_for=AFTER + 1, now=NOW + 1) is None
    assert len(guard.pending) == 1

    # A second lane fails later: the override drops both, the report names the new one.
    check.failing = {"a", "b"}
    override = guard.tick(VIEW, disconnected_for=AFTER + 2, now=NOW + 2)
    assert override is not None and override.lanes == ()
    assert [list(r.lanes) for r in guard.pending] == [["a"], ["b"]]


def test_ignores_lanes_the_view_does_not_have() -> None:
    check = ScriptedAbortCheck()
    check.failing = {"gone"}
    guard = LocalGuard(check, after_seconds=AFTER)
    assert guard.tick(VIEW, disconnected_for=AFTER, now=NOW) is None
    assert guard.aborted == set() and guard.pending == []


def test_reconnect_hands_over_the_reports_and_the_control_plane_decides_again() -> None:
    check = ScriptedAbortCheck()
    check.failing = {"a"}
    guard = LocalGuard(check, after_seconds=AFTER)
    assert guard.tick(VIEW, disconnected_for=AFTER, now=NOW) is not None
    reports = guard.reconnected()
    assert [list(r.lanes) for r in reports] == [["a"]]
    assert guard.pending == [] and guard.aborted == set()
    assert guard.reconnected() == []
    # Away again: the lane may be aborted again (the control plane's view brought it back).
    assert guard.tick(VIEW, disconnected_for=AFTER, now=NOW + 60) is not None


def test_without_a_check_or_a_view_it_never_acts() -> None:
    guard = LocalGuard(None, after_seconds=0.0)
    assert guard.tick(VIEW, disconnected_for=1e9, now=NOW) is None
    guard = LocalGuard(ScriptedAbortCheck(), after_seconds=0.0)
    assert guard.tick(None, disconnected_for=1e9, now=NOW) is None


def test_without_lanes_keeps_everything_else() -> None:
    assert without_lanes(VIEW, ["b", "nope"]).lanes == (lane("a"),)
    assert without_lanes(VIEW, []) == VIEW


def metrics_report(at: float, *series: tuple[str, str, str, int, int]) -> apb.MetricsReport:
    report = apb.MetricsReport(interval_seconds=1.0)
    report.at.FromNanoseconds(int(at * 1e9))
    for service, version, lane_name, requests, errors in series:
        report.series.add(service=service, version=version, lane=lane_name, requests=requests, errors=errors)
    return report


def test_lane_error_rate_judges_a_lanes_gray_versions_over_its_window() -> None:
    check = LaneErrorRate(max_error_rate=0.5, min_requests=10, window_seconds=10.0)
    assert check(VIEW) == []  # nothing seen: nothing to judge
    # Lane a's gray version fails 6 of 8: too few requests to judge yet.
    check.observe(metrics_report(NOW, ("checkout", "v-a", "a", 8, 6), ("checkout", "v1", "", 100, 90)))
    assert check(VIEW) == []
    check.observe(metrics_report(NOW + 1, ("checkout", "v-a", "a", 4, 3), ("checkout", "v-b", "b", 40, 1)))
    assert check(VIEW) == ["a"]  # 9 of 12; b fails 1 of 40; base errors are not the lanes'
    assert check.totals(VIEW.lanes[0]) == (12, 9)
    # Base traffic of a lane (fallback to v1 inside lane a) is not the gray version's.
    check.observe(metrics_report(NOW + 2, ("checkout", "v1", "a", 500, 500)))
    assert check(VIEW) == ["a"]
    # Ten seconds on, the failures have left the window.
    check.observe(metrics_report(NOW + 11.5, ("checkout", "v-a", "a", 20, 0)))
    assert check(VIEW) == []


def test_lane_error_rate_rejects_meaningless_settings() -> None:
    for bad in ({"max_error_rate": 0.0}, {"max_error_rate": 1.5}, {"min_requests": 0}, {"window_seconds": 0.0}):
        with pytest.raises(ValueError):
            LaneErrorRate(**bad)  # type: ignore[arg-type]


def test_the_report_says_what_the_error_rate_check_saw() -> None:
    check = LaneErrorRate(max_error_rate=0.5, min_requests=10, window_seconds=10.0)
    check.observe(metrics_report(NOW, ("checkout", "v-a", "a", 20, 20)))
    guard = LocalGuard(check, after_seconds=AFTER)
    assert guard.tick(VIEW, disconnected_for=AFTER, now=NOW) is not None
    [report] = guard.pending
    assert list(report.lanes) == ["a"]
    assert "a: 20 of 20 gray requests failed in the last 10s (limit 50% of at least 10)" in report.reason
