"""The release state machine: one table of legal moves and one function that applies them.

Owns: `Action`, the `TRANSITIONS` table and `transition`, a pure function from a release
and an action to the next release value and the `Event` that records the move. Nothing
here touches etcd; `controlplane.releases` writes the result in one guarded transaction.

    PENDING -> PROGRESSING(batch i) <-> PAUSED -> SUCCEEDED | ROLLED_BACK | FAILED

Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from graylane.controlplane.domain.model.values import Event, Phase, Release, ReleaseStatus, weight_of
from graylane.controlplane.errors import FailedPrecondition


class Action(enum.Enum):
    NEXT = "next"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    RESTART = "restart"
    FAIL = "fail"


# Where each action goes: the phases it is legal from, and the (phase, batch) it leads to
# as a function of the release. A move not in this table is illegal.
Target = Callable[[Release], tuple[Phase, int]]


@dataclass(frozen=True, slots=True)
class Move:
    sources: frozenset[Phase]
    target: Target


def _next(r: Release) -> tuple[Phase, int]:
    nxt = r.status.batch + 1
    if nxt >= len(r.spec.batches):
        return Phase.SUCCEEDED, r.status.batch
    return Phase.PROGRESSING, nxt


_LIVE = frozenset({Phase.PENDING, Phase.PROGRESSING, Phase.PAUSED})

TRANSITIONS: Mapping[Action, Move] = MappingProxyType(
    {
        Action.NEXT: Move(frozenset({Phase.PENDING, Phase.PROGRESSING}), _next),
        Action.PAUSE: Move(frozenset({Phase.PROGRESSING}), lambda r: (Phase.PAUSED, r.status.batch)),
        Action.RESUME: Move(frozenset({Phase.PAUSED}), lambda r: (Phase.PROGRESSING, r.status.batch)),
        Action.ROLLBACK: Move(_LIVE, lambda r: (Phase.ROLLED_BACK, r.status.batch)),
        Action.PROMOTE: Move(_LIVE, lambda r: (Phase.SUCCEEDED, r.status.batch)),
        Action.RESTART: Move(frozenset({Phase.ROLLED_BACK, Phase.FAILED}), lambda r: (Phase.PROGRESSING, 0)),
        Action.FAIL: Move(frozenset({Phase.PROGRESSING, Phase.PAUSED}), lambda r: (Phase.FAILED, r.status.batch)),
    }
)

_HINTS: Mapping[Phase, str] = MappingProxyType(
    {
        Phase.PAUSED: "resume it first",
        Phase.SUCCEEDED: "it has finished; apply it with --restart to start a new rollout",
        Phase.ROLLED_BACK: "restart it, or apply it with --restart",
        Phase.FAILED: "restart it, or apply it with --restart",
        Phase.PENDING: "start it with next",
    }
)


@dataclass(frozen=True, slots=True)
class Cause:
    """Who asked for a move and why; `details` carries the numbers behind an automatic one."""

    actor: str
    reason: str = ""
    details: Mapping[str, str] = field(default_factory=dict)


def make_event(before: Release, after: Release, *, action: str, cause: Cause, now: datetime) -> Event:
    return Event(
        release=before.name,
        sequence=before.status.events,
        at=now,
        action=action,
        actor=cause.actor,
        reason=cause.reason,
        from_phase=before.status.phase,
        to_phase=after.status.phase,
        from_batch=before.status.batch,
        to_batch=after.status.batch,
        weight=after.weight(),
        details=dict(cause.details),
    )


def transition(release: Release, action: Action, *, cause: Cause, now: datetime) -> tuple[Release, Event]:
    """Apply `action` to `release`; raise FailedPrecondition when the table forbids it."""
    move = TRANSITIONS[action]
    phase = release.status.phase
    if phase not in move.sources:
        hint = _HINTS.get(phase, "")
        raise FailedPrecondition(
            f"release {release.name!r} is {phase.name}: cannot {action.value}" + (f" ({hint})" if hint else "")
        )
    to_phase, to_batch = move.target(release)
    batch_changed = to_batch != release.status.batch or (to_phase.routes_lane != phase.routes_lane)
    status = replace(
        release.status,
        phase=to_phase,
        batch=to_batch,
        reason=cause.reason or f"{action.value} by {cause.actor}",
        events=release.status.events + 1,
    )
    if batch_changed or weight_of(release.spec, status) != release.weight():
        # A new routing target: it has to be reached again by every proxy.
        status = replace(status, reached=False, converged=0, batch_started=now, batch_reached=None)
    if to_phase is Phase.PROGRESSING:
        status = replace(status, last_nack=None) if action is Action.RESUME else status
    after = replace(release, status=status)
    return after, make_event(release, after, action=action.value, cause=cause, now=now)


def record(
    release: Release, status: ReleaseStatus, *, action: str, cause: Cause, now: datetime
) -> tuple[Release, Event]:
    """A status change that is not a phase move (reached, convergence, NACK seen)."""
    status = replace(status, events=release.status.events + 1)
    after = replace(release, status=status)
    return after, make_event(release, after, action=action, cause=cause, now=now)
