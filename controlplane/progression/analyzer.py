"""Unattended progression: the leader judges live metrics and moves releases on its own.

Owns the leader's tick, the one place that moves a release forward unasked (the API moves
it when asked). Each tick re-reads every release from etcd (nothing lives only in memory,
so a new leader carries on where the old one stopped) and takes at most one step per
release. A release without an `analysis` moves on only by the clock: a reached batch
whose duration pause is over goes to the next batch (`views.pause_due`). One with an
`analysis` takes, in a fixed order:

1. PENDING: run the pre-rollout webhooks; when all succeed, start the first batch.
2. PROGRESSING with the batch reached (every proxy ACKed it) and its pause over: once per
   `interval`, judge each gray version's lane traffic against its base version's traffic
   over the last window (`analysis.judge`), then `next_decision` over this batch's
   verdicts: WAIT records the analysis as an event; ADVANCE runs the confirm-batch
   webhooks and moves to the next batch; ROLLBACK and PAUSE move the release. The event
   of every step carries the numbers behind it (samples, rates, percentiles, p-values,
   thresholds, tally, webhook results).
3. SUCCEEDED or ROLLED_BACK (automatically or by hand): run the post-rollout or rollback
   webhooks once, recorded as an event.

Every write is guarded by the revision the tick read, so a step is taken exactly once
even when a leader is replaced mid-tick. The metrics come from `windows` (the leader's
in-memory series); timestamps there are wall-clock seconds, like the release's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Protocol

import aiohttp
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Action, Cause
from graylane.controlplane.domain.releases import Releases
from graylane.controlplane.errors import Conflict, FailedPrecondition, NotFound, Unavailable
from graylane.controlplane.progression.analysis import (
    AnalysisSpec,
    Decision,
    Outcome,
    Step,
    Verdict,
    judge,
    next_decision,
)
from graylane.controlplane.progression.webhooks import (
    PolicyResolver,
    WebhookKind,
    WebhookPolicy,
    WebhookResult,
    call_webhook,
)
from graylane.controlplane.progression.windows import Aggregate, SeriesKey
from graylane.controlplane.reconcile import views
from graylane.controlplane.store import ReleaseStore

log = logging.getLogger(__name__)

ACTOR = "graylane/analysis"
# The actor of a move made because a duration pause ended: the name history has always
# given it (it was the data plane's until this tick took it over), kept for readers of history.
TIMED_PAUSE_ACTOR = "graylane/dataplane"
ANALYSIS_EVENT = "analysis"
WEBHOOK_EVENT = "webhook"
DEFAULT_TICK_SECONDS = 0.25


class MetricWindows(Protocol):
    """What the analyzer reads: the leader's series (graylane.controlplane.progression.windows.Windows)."""

    def keys(self) -> tuple[SeriesKey, ...]: ...

    def window_many(self, keys: Iterable[SeriesKey], since: float, until: float) -> Aggregate: ...


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...


def _ts(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


def verdict_of(event: model.Event) -> Verdict | None:
    """The verdict an analysis event recorded (None for other events)."""
    outcome = event.details.get("verdict")
    if event.action != ANALYSIS_EVENT or outcome not in {o.value for o in Outcome}:
        return None
    return Verdict(Outcome(outcome), event.reason, dict(event.details))


def batch_verdicts(release: model.Release, events: Iterable[model.Event]) -> list[Verdict]:
    """This batch's verdicts, oldest first (events after the batch started, at this batch)."""
    started = _ts(release.status.batch_started)
    found = []
    for e in events:
        if e.to_batch == release.status.batch and _ts(e.at) >= started:
            v = verdict_of(e)
            if v is not None:
                found.append(v)
    return found


def combine(verdicts: Mapping[str, Verdict]) -> Verdict:
    """One verdict for a lane over several services: any FAIL fails, any gap is inconclusive."""
    details: dict[str, str] = {}
    for service, v in sorted(verdicts.items()):
        details.update({f"{service}.{k}": val for k, val in v.details.items()})
    for outcome in (Outcome.FAIL, Outcome.INCONCLUSIVE, Outcome.PASS):
        reasons = [f"{s}: {v.reason}" for s, v in sorted(verdicts.items()) if v.outcome is outcome]
        if reasons:
            details["verdict"] = outcome.value
            return Verdict(outcome, "; ".join(reasons), details)
    details["verdict"] = Outcome.INCONCLUSIVE.value
    return Verdict(Outcome.INCONCLUSIVE, "no service to judge", details)


def judge_release(
    release: model.Release, analysis: AnalysisSpec, windows: MetricWindows, *, since: float, until: float
) -> Verdict:
    """Each gray version's lane traffic against its base's traffic, over (since, until]."""
    spec = release.spec
    keys = windows.keys()
    verdicts = {}
    for sv in spec.services:
        gray = [k for k in keys if (k.service, k.version, k.lane) == (sv.service, sv.gray_version, spec.lane)]
        base = [k for k in keys if (k.service, k.version, k.lane) == (sv.service, sv.base_version, "")]
        verdicts[sv.service] = judge(
            analysis,
            windows.window_many(gray, since, until),
            windows.window_many(base, since, until) if analysis.baseline else None,
        )
    verdict = combine(verdicts)
    details = dict(verdict.details)
    details["window.since"] = f"{since:.3f}"
    details["window.until"] = f"{until:.3f}"
    return Verdict(verdict.outcome, verdict.reason, details)


class Analyzer:
    def __init__(
        self,
        releases: Releases,
        windows: MetricWindows,
        leadership: Leadership,
        *,
        store: ReleaseStore,
        tick_seconds: float = DEFAULT_TICK_SECONDS,
        clock: Callable[[], float] = time.time,
        on_verdict: Callable[[str, Outcome], None] | None = None,
        webhook_policy: WebhookPolicy | None = None,
    ) -> None:
        # Tests and embedders that name no policy keep loopback webhooks (what they serve on).
        self._policy = webhook_policy or WebhookPolicy(allow_loopback=True)
        self._releases = releases
        self._store = store  # releases and their history, read on each tick
        self._windows = windows
        self._leadership = leadership
        self._tick_seconds = tick_seconds
        self._clock = clock
        self._on_verdict = on_verdict or (lambda release, outcome: None)
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(resolver=PolicyResolver(self._policy))
        async with aiohttp.ClientSession(connector=connector) as session:
            self._session = session
            while True:
                if self._leadership.is_leader:
                    try:
                        await self.tick()
                    except Unavailable as exc:
                        log.warning("analysis tick skipped: %s", exc)
                await asyncio.sleep(self._tick_seconds)

    async def tick(self) -> None:
        for release in await self._store.list_releases():
            try:
                if release.spec.analysis is None:
                    await self._timed_pause(release)
                else:
                    await self._step(release)
            except (Conflict, FailedPrecondition, NotFound) as exc:
                log.info("release %s moved under the analyzer (%s); next tick", release.name, exc)

    async def _step(self, release: model.Release) -> None:
        phase = release.status.phase
        if phase is model.Phase.PENDING:
            await self._start(release)
        elif phase is model.Phase.PROGRESSING and release.status.reached:
            await self._analyse(release)
        elif phase in (model.Phase.SUCCEEDED, model.Phase.ROLLED_BACK):
            await self._after(release)

    # ----------------------------------------------------------------- steps

    async def _timed_pause(self, release: model.Release) -> None:
        """A reached batch with a duration pause moves on once the duration has passed;
        guarded by the revision it was decided on, so it moves exactly once."""
        due = views.pause_due(release)
        if due is None or datetime.fromtimestamp(self._clock(), UTC) < due:
            return
        pause = release.spec.batches[release.status.batch].pause
        cause = Cause(
            actor=TIMED_PAUSE_ACTOR,
            reason=f"batch {release.status.batch + 1} held {pause} after it was reached",
            details={"pause_seconds": f"{pause.total_seconds() if pause else 0:g}"},
        )
        await self._releases.act(release.name, Action.NEXT, cause, expected_revision=release.revision)

    async def _start(self, release: model.Release) -> None:
        results = await self._hooks(release, WebhookKind.PRE_ROLLOUT)
        details = _hook_details(results)
        if all(r.ok for r in results):
            reason = "pre-rollout webhooks passed" if results else "unattended release: analysis starts it"
            cause = Cause(actor=ACTOR, reason=reason, details=details)
            await self._releases.act(release.name, Action.NEXT, cause, expected_revision=release.revision)
            return
        last = await self._last_event(release.name)
        if last is not None and last.action == WEBHOOK_EVENT and self._clock() - _ts(last.at) < self._interval(release):
            return  # retried once per interval, not every tick
        failed = ", ".join(r.name for r in results if not r.ok)
        cause = Cause(actor=ACTOR, reason=f"waiting: pre-rollout webhook {failed} failed", details=details)
        await self._releases.note(release.name, WEBHOOK_EVENT, cause, expected_revision=release.revision)

    async def _analyse(self, release: model.Release) -> None:
        spec = release.spec.analysis
        assert spec is not None
        now = self._clock()
        reached = _ts(release.status.batch_reached)
        pause = release.spec.batches[release.status.batch].pause
        if pause is not None and now < reached + pause.total_seconds():
            return
        events = await self._store.history(release.name)
        history = batch_verdicts(release, events)
        last_check = max([reached] + [float(v.details.get("window.until", 0)) for v in history])
        if now < last_check + spec.interval_s:
            return
        used = spec
        if release.weight() >= 100 and spec.baseline:
            # Everything goes to gray: no base traffic is left to compare with.
            used = dataclasses.replace(spec, baseline=False)
            if used.max_error_rate is None and used.max_p99_ms is None:
                details = {"verdict": "pass", "decision": "advance", "baseline": "skipped: no base traffic at 100 %"}
                cause = Cause(actor=ACTOR, reason="batch at 100 %: nothing left to compare with", details=details)
                await self._releases.act(release.name, Action.NEXT, cause, expected_revision=release.revision)
                return
        verdict = judge_release(release, used, self._windows, since=max(reached, now - spec.interval_s), until=now)
        self._on_verdict(release.name, verdict.outcome)
        decision = next_decision([*history, verdict], spec)
        details = {**decision.details, **verdict.details, "decision": decision.step.value}
        if decision.step is Step.WAIT:
            await self._note_analysis(release, verdict, details)
        elif decision.step is Step.ADVANCE:
            await self._advance(release, verdict, decision, details)
        elif decision.step is Step.ROLLBACK:
            cause = Cause(actor=ACTOR, reason=decision.reason, details=details)
            await self._releases.act(release.name, Action.ROLLBACK, cause, expected_revision=release.revision)
        else:
            cause = Cause(actor=ACTOR, reason=decision.reason, details=details)
            await self._releases.act(release.name, Action.PAUSE, cause, expected_revision=release.revision)

    async def _note_analysis(self, release: model.Release, verdict: Verdict, details: Mapping[str, str]) -> None:
        cause = Cause(actor=ACTOR, reason=verdict.reason, details=details)
        await self._releases.note(release.name, ANALYSIS_EVENT, cause, expected_revision=release.revision)

    async def _advance(
        self, release: model.Release, verdict: Verdict, decision: Decision, details: dict[str, str]
    ) -> None:
        results = await self._hooks(release, WebhookKind.CONFIRM_BATCH)
        details.update(_hook_details(results))
        if not all(r.ok for r in results):
            failed = ", ".join(r.name for r in results if not r.ok)
            details["decision"] = "wait"
            waiting = Verdict(verdict.outcome, f"{verdict.reason}; waiting: confirm-batch {failed} refused", details)
            await self._note_analysis(release, waiting, details)
            return
        cause = Cause(actor=ACTOR, reason=decision.reason, details=details)
        await self._releases.act(release.name, Action.NEXT, cause, expected_revision=release.revision)

    async def _after(self, release: model.Release) -> None:
        """The post-rollout or rollback webhooks, once per ending (deduplicated by the log)."""
        kind = WebhookKind.POST_ROLLOUT if release.status.phase is model.Phase.SUCCEEDED else WebhookKind.ROLLBACK
        if not any(h.kind is kind for h in release.spec.analysis.webhooks):  # type: ignore[union-attr]
            return
        events = await self._store.history(release.name)
        ended = max((i for i, e in enumerate(events) if e.to_phase is release.status.phase), default=-1)
        if any(e.action == WEBHOOK_EVENT and e.details.get("kind") == kind.value for e in events[ended + 1 :]):
            return
        results = await self._hooks(release, kind)
        details = {"kind": kind.value, **_hook_details(results)}
        reason = f"{kind.value} webhooks: " + ", ".join(f"{r.name} {'ok' if r.ok else 'failed'}" for r in results)
        cause = Cause(actor=ACTOR, reason=reason, details=details)
        await self._releases.note(release.name, WEBHOOK_EVENT, cause, expected_revision=release.revision)

    # ----------------------------------------------------------------- helpers

    async def _hooks(self, release: model.Release, kind: WebhookKind) -> list[WebhookResult]:
        assert release.spec.analysis is not None and self._session is not None
        payload = {
            "release": release.name,
            "lane": release.spec.lane,
            "phase": release.status.phase.name,
            "batch": release.status.batch,
            "weight": release.weight(),
            "kind": kind.value,
            "at": datetime.now(UTC).isoformat(),
        }
        hooks = [h for h in release.spec.analysis.webhooks if h.kind is kind]
        return list(
            await asyncio.gather(*(call_webhook(self._session, h, payload, policy=self._policy) for h in hooks))
        )

    async def _last_event(self, name: str) -> model.Event | None:
        events = await self._store.history(name)
        return events[-1] if events else None

    @staticmethod
    def _interval(release: model.Release) -> float:
        return release.spec.analysis.interval_s if release.spec.analysis is not None else 60.0


def _hook_details(results: Iterable[WebhookResult]) -> dict[str, str]:
    details: dict[str, str] = {}
    for r in results:
        details.update(r.details())
    return details
