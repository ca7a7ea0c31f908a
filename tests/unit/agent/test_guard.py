"""The local guard (agent/guard.py), driven tick by tick with a fake AbortCheck and a fake clock."""

from __future__ import annotations

from collections.abc import Iterable

from graylane.agent.guard import LocalGuard, without_lanes
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
