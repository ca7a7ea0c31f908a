from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from graylane.controlplane.domain.machine import TRANSITIONS, Action, Cause, transition
from graylane.controlplane.domain.model.values import Phase, Release
from graylane.controlplane.errors import FailedPrecondition

from tests.unit.controlplane.conftest import canary_release

NOW = datetime(2026, 11, 22, tzinfo=UTC)
WHO = Cause(actor="tester", reason="because")


def release(phase: Phase = Phase.PENDING, batch: int = -1, weights: tuple[int, ...] = (10, 20, 50, 100)) -> Release:
    """The machine's starting point: a four-batch canary that has written three events."""
    return canary_release(phase, batch, weights=weights, created=NOW, events=3)


def test_next_walks_every_batch_then_succeeds() -> None:
    r = release()
    seen = []
    for _ in range(4):
        r, event = transition(r, Action.NEXT, cause=WHO, now=NOW)
        seen.append((r.status.phase, r.status.batch, r.weight(), event.weight))
    assert seen == [
        (Phase.PROGRESSING, 0, 10, 10),
        (Phase.PROGRESSING, 1, 20, 20),
        (Phase.PROGRESSING, 2, 50, 50),
        (Phase.PROGRESSING, 3, 100, 100),
    ]
    r, event = transition(r, Action.NEXT, cause=WHO, now=NOW)
    assert r.status.phase is Phase.SUCCEEDED and r.weight() == 100
    assert (event.from_phase, event.to_phase) == (Phase.PROGRESSING, Phase.SUCCEEDED)


def test_event_records_who_what_why_and_sequence() -> None:
    r, event = transition(release(Phase.PROGRESSING, 1), Action.PAUSE, cause=WHO, now=NOW)
    assert (event.sequence, event.action, event.actor, event.reason) == (3, "pause", "tester", "because")
    assert (event.from_batch, event.to_batch) == (1, 1)
    assert r.status.events == 4
    assert r.status.phase is Phase.PAUSED and r.weight() == 20  # a pause holds the weight


def test_weight_change_resets_convergence() -> None:
    from dataclasses import replace

    r = release(Phase.PROGRESSING, 0)
    r = replace(r, status=replace(r.status, reached=True, converged=3, batch_reached=NOW))
    after, _ = transition(r, Action.NEXT, cause=WHO, now=NOW + timedelta(seconds=1))
    assert not after.status.reached and after.status.converged == 0
    assert after.status.batch_started == NOW + timedelta(seconds=1)
    paused, _ = transition(r, Action.PAUSE, cause=WHO, now=NOW)
    assert paused.status.reached  # same routing target: still reached


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("phase", list(Phase))
def test_table_is_the_only_authority(action: Action, phase: Phase) -> None:
    r = release(phase, 0 if phase is not Phase.PENDING else -1)
    if phase in TRANSITIONS[action].sources:
        after, _ = transition(r, action, cause=WHO, now=NOW)
        assert after.status.phase is not None
    else:
        with pytest.raises(FailedPrecondition, match=f"cannot {action.value}"):
            transition(r, action, cause=WHO, now=NOW)


def test_rollback_and_restart() -> None:
    r, _ = transition(release(Phase.PROGRESSING, 2), Action.ROLLBACK, cause=WHO, now=NOW)
    assert r.status.phase is Phase.ROLLED_BACK and r.weight() == 0
    r, _ = transition(r, Action.RESTART, cause=WHO, now=NOW)
    assert (r.status.phase, r.status.batch, r.weight()) == (Phase.PROGRESSING, 0, 10)


def test_blue_green_switches_zero_to_hundred() -> None:
    r = release(weights=(100,))
    r, _ = transition(r, Action.NEXT, cause=WHO, now=NOW)
    assert r.weight() == 100
    r, _ = transition(r, Action.ROLLBACK, cause=WHO, now=NOW)
    assert r.weight() == 0
