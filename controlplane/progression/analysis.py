"""Judging a gray version against its base over one window, and what a batch does next.

Owns:
- `AnalysisSpec` and `check_analysis_spec`: the thresholds, statistics options and limits
  of automated analysis, validated once at the edge (`InvalidArgument` naming the field).
- `judge`: pure judgement of one window, gray vs base, into a `Verdict` (PASS, FAIL or
  INCONCLUSIVE) whose `details` hold every number behind it, whatever the outcome.
- `Tally` and `next_decision`: from the verdicts of the current batch to a `Decision`
  (ADVANCE, WAIT, PAUSE or ROLLBACK) that carries the tally and the last verdict's numbers.

The rules, chosen against the failure modes of Flagger and Argo Rollouts:
- A pass needs evidence. Too few requests on gray (or on base when the baseline comparison
  is on), or no latency observations for a latency check, is INCONCLUSIVE, never PASS, and
  a spec with no check at all is refused. A FAIL from one check wins over missing data in
  another; PASS needs every configured check to have measured and passed.
- Thresholds are absolute: gray error rate above `max_error_rate`, or gray p99 above
  `max_p99_ms`, fails.
- The baseline comparison needs significance *and* size. Error rates: a one-sided pooled
  two-proportion z-test (gray worse), failing when p < alpha and the rate difference is
  above `error_rate_margin`. Latency: a one-sided Mann-Whitney U test (gray slower) on raw
  latencies when both sides have them, else on histogram bucket midpoints, failing when
  p < alpha and the *median* effect, gray p50 / base p50 - 1, is above `min_effect`. The
  median, because Mann-Whitney speaks about the bulk of the distribution; tail latency is
  what `max_p99_ms` is for. A large sample makes a 2 % shift significant; the effect bound
  keeps it from failing a release.
- Failed checks count in total within a batch (Flagger's `threshold`): `failure_limit` of
  them roll back. Inconclusive checks count consecutively: `inconclusive_limit` in a row
  pause (or roll back, per `on_inconclusive`), because a lasting lack of traffic is a
  condition a person should look at, not a pass.

Pure: no clocks, no I/O. Must not import: etcd, grpc, aiohttp, graylane.xds, graylane.agent.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from graylane.controlplane.errors import InvalidArgument
from graylane.controlplane.progression.webhooks import Webhook, check_webhook
from graylane.controlplane.progression.windows import Aggregate, expand


class OnInconclusive(enum.Enum):
    PAUSE = "pause"
    FAIL = "fail"


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalysisSpec:
    """How a batch is judged. Each check looks at the window (now - interval_s, now]."""

    interval_s: float = 60.0
    min_requests: int = 100
    max_error_rate: float | None = None  # absolute, 0..1; None: no threshold
    max_p99_ms: float | None = None  # absolute; None: no threshold
    baseline: bool = True  # compare with the base version over the same window
    alpha: float = 0.01  # significance level of both one-sided tests
    min_effect: float = 0.10  # gray p50 must be more than 10 % above base p50 to fail
    error_rate_margin: float = 0.01  # gray error rate must be more than 1 point above base to fail
    failure_limit: int = 2  # failed checks (in total, within a batch) before rollback
    inconclusive_limit: int = 5  # consecutive inconclusive checks before on_inconclusive
    on_inconclusive: OnInconclusive = OnInconclusive.PAUSE
    passes_to_advance: int = 1  # consecutive passing checks before the batch may advance
    webhooks: tuple[Webhook, ...] = ()


def check_analysis_spec(spec: AnalysisSpec, *, where: str = "analysis") -> AnalysisSpec:
    """Validate `spec`; raise `InvalidArgument` naming the field (`analysis.max_error_rate`).

    `where` is the path of the spec in the request (`batches[2].analysis`).
    """
    if not (math.isfinite(spec.interval_s) and spec.interval_s >= 1.0):
        raise InvalidArgument(f"{where}.interval", f"{spec.interval_s!r} s is below the minimum of 1 s")
    _check_count(f"{where}.min_requests", spec.min_requests)
    if spec.max_error_rate is not None and not (0.0 <= spec.max_error_rate <= 1.0):
        raise InvalidArgument(f"{where}.max_error_rate", f"{spec.max_error_rate!r} is outside [0, 1]")
    if spec.max_p99_ms is not None and not (math.isfinite(spec.max_p99_ms) and spec.max_p99_ms > 0):
        raise InvalidArgument(f"{where}.max_p99_ms", f"{spec.max_p99_ms!r} must be a positive number of ms")
    if not (0.0 < spec.alpha < 1.0):
        raise InvalidArgument(f"{where}.alpha", f"{spec.alpha!r} is outside (0, 1)")
    if not (math.isfinite(spec.min_effect) and spec.min_effect >= 0.0):
        raise InvalidArgument(f"{where}.min_effect", f"{spec.min_effect!r} must be 0 or more")
    if not (0.0 <= spec.error_rate_margin < 1.0):
        raise InvalidArgument(f"{where}.error_rate_margin", f"{spec.error_rate_margin!r} is outside [0, 1)")
    _check_count(f"{where}.failure_limit", spec.failure_limit)
    _check_count(f"{where}.inconclusive_limit", spec.inconclusive_limit)
    _check_count(f"{where}.passes_to_advance", spec.passes_to_advance)
    if not isinstance(spec.on_inconclusive, OnInconclusive):
        options = ", ".join(o.value for o in OnInconclusive)
        raise InvalidArgument(f"{where}.on_inconclusive", f"{spec.on_inconclusive!r} is not one of {options}")
    if spec.max_error_rate is None and spec.max_p99_ms is None and not spec.baseline:
        raise InvalidArgument(
            where, "has no check: set max_error_rate, max_p99_ms or baseline, or it would pass on traffic alone"
        )
    names: set[str] = set()
    for i, hook in enumerate(spec.webhooks):
        check_webhook(hook, where=f"{where}.webhooks[{i}]")
        if hook.name in names:
            raise InvalidArgument(f"{where}.webhooks[{i}].name", f"{hook.name!r} is used by another webhook")
        names.add(hook.name)
    return spec


def _check_count(field_name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field_name, f"{value!r} is not a whole number")
    if value < 1:
        raise InvalidArgument(field_name, f"{value} is below the minimum of 1")


# --------------------------------------------------------------------------- judgement


class Outcome(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One window judged. `details` is flat text, ready for an `Event`: every count, rate,
    percentile, p-value, effect and threshold behind `outcome`, for every outcome."""

    outcome: Outcome
    reason: str
    details: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Check:
    name: str
    outcome: Outcome
    reason: str


def judge(spec: AnalysisSpec, gray: Aggregate, base: Aggregate | None = None) -> Verdict:
    """Judge `gray` (and `base`, for the baseline comparison) over one window.

    `spec` is trusted (`check_analysis_spec` ran at the edge). `base` may be None when the
    baseline comparison is off; when it is on, a missing base is a base without traffic.
    """
    details: dict[str, str] = {}
    _describe(details, "gray", gray)
    if spec.baseline:
        _describe(details, "base", base)
    _describe_spec(details, spec)

    short = _too_few(spec, gray, base)
    if short:
        details["checks"] = "not run"
        return Verdict(Outcome.INCONCLUSIVE, short, details)

    checks: list[_Check] = []
    if spec.max_error_rate is not None:
        checks.append(_error_threshold(spec.max_error_rate, gray))
    if spec.max_p99_ms is not None:
        checks.append(_latency_threshold(spec, gray))
    if spec.baseline:
        assert base is not None  # _too_few returned a reason otherwise
        checks.append(_errors_vs_base(spec, gray, base, details))
        checks.append(_latency_vs_base(spec, gray, base, details))
    for c in checks:
        details[f"check.{c.name}"] = c.outcome.value

    for outcome in (Outcome.FAIL, Outcome.INCONCLUSIVE):
        reasons = [c.reason for c in checks if c.outcome is outcome]
        if reasons:
            details["checks"] = outcome.value
            return Verdict(outcome, "; ".join(reasons), details)
    details["checks"] = "pass"
    return Verdict(Outcome.PASS, "; ".join(c.reason for c in checks), details)


def _too_few(spec: AnalysisSpec, gray: Aggregate, base: Aggregate | None) -> str:
    need = spec.min_requests
    parts = []
    if gray.requests < need:
        parts.append(f"gray has {gray.requests} requests in the window, fewer than min_requests {need}")
    if spec.baseline:
        have = base.requests if base is not None else 0
        if have < need:
            parts.append(f"base has {have} requests in the window, fewer than min_requests {need}")
    return "; ".join(parts)


def _error_threshold(limit: float, gray: Aggregate) -> _Check:
    rate = gray.error_rate
    assert rate is not None  # gray.requests >= min_requests >= 1
    if rate > limit:
        return _Check("max_error_rate", Outcome.FAIL, f"gray error rate {_pct(rate)} is above max {_pct(limit)}")
    return _Check("max_error_rate", Outcome.PASS, f"gray error rate {_pct(rate)} is within max {_pct(limit)}")


def _latency_threshold(spec: AnalysisSpec, gray: Aggregate) -> _Check:
    limit = spec.max_p99_ms
    assert limit is not None
    observed = gray.latency.total
    p99 = gray.p99
    if p99 is None or observed < spec.min_requests:
        return _Check(
            "max_p99",
            Outcome.INCONCLUSIVE,
            f"gray has {observed} latency observations, fewer than min_requests {spec.min_requests}",
        )
    if p99 > limit:
        return _Check("max_p99", Outcome.FAIL, f"gray p99 {_ms(p99)} is above max {_ms(limit)}")
    return _Check("max_p99", Outcome.PASS, f"gray p99 {_ms(p99)} is within max {_ms(limit)}")


def _errors_vs_base(spec: AnalysisSpec, gray: Aggregate, base: Aggregate, details: dict[str, str]) -> _Check:
    # Errors are clamped to requests (see windows.Sample): a proportion needs x <= n.
    x1, n1 = min(gray.errors, gray.requests), gray.requests
    x2, n2 = min(base.errors, base.requests), base.requests
    z, p = two_proportion_z(x1, n1, x2, n2)
    diff = x1 / n1 - x2 / n2
    details["errors.z"] = _num(z)
    details["errors.p_value"] = _num(p)
    details["errors.diff"] = _num(diff)
    said = f"gray error rate {_pct(x1 / n1)} vs base {_pct(x2 / n2)} (p={_num(p)})"
    margin = _pct(spec.error_rate_margin)
    if p < spec.alpha and diff > spec.error_rate_margin:
        return _Check("baseline_errors", Outcome.FAIL, f"{said}: significantly worse, by more than the {margin} margin")
    return _Check("baseline_errors", Outcome.PASS, f"{said}: not worse beyond the margin")


def _latency_vs_base(spec: AnalysisSpec, gray: Aggregate, base: Aggregate, details: dict[str, str]) -> _Check:
    g_n, b_n = gray.latency.total, base.latency.total
    if g_n < spec.min_requests or b_n < spec.min_requests:
        details["latency.p_value"] = "n/a"
        details["latency.effect"] = "n/a"
        return _Check(
            "baseline_latency",
            Outcome.INCONCLUSIVE,
            f"latency observations gray {g_n}, base {b_n}: fewer than min_requests {spec.min_requests}",
        )
    if gray.values_ms is not None and base.values_ms is not None and gray.values_ms and base.values_ms:
        source = "raw"
        g_values = np.asarray(gray.values_ms, dtype=np.float64)
        b_values = np.asarray(base.values_ms, dtype=np.float64)
    else:
        source = "histogram"
        g_values, b_values = expand(gray.latency), expand(base.latency)
    u, p = mann_whitney_greater(g_values, b_values)
    g50, b50 = gray.p50, base.p50
    assert g50 is not None and b50 is not None  # both histograms hold observations
    effect = relative_effect(g50, b50)
    g99, b99 = gray.p99, base.p99
    details["latency.values"] = source
    details["latency.u"] = _num(u)
    details["latency.p_value"] = _num(p)
    details["latency.effect"] = _num(effect)
    details["latency.p99_ratio"] = _num(g99 / b99) if g99 is not None and b99 else "n/a"
    said = f"gray p50 {_ms(g50)} vs base {_ms(b50)} ({effect:+.1%}, p={_num(p)})"
    limit = f"min_effect {spec.min_effect:.0%}"
    if p < spec.alpha and effect > spec.min_effect:
        return _Check("baseline_latency", Outcome.FAIL, f"{said}: significantly slower, by more than {limit}")
    return _Check("baseline_latency", Outcome.PASS, f"{said}: not slower beyond min_effect")


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """One-sided pooled two-proportion z-test that rate 1 is above rate 2: (z, p-value).

    Equal rates of 0 or 1 on both sides have no variance and no evidence: (0, 1).
    """
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both samples need at least one trial")
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    if se == 0.0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / se
    from scipy import stats  # imported when first used: 1 s of start-up otherwise, for every user of model

    return z, float(stats.norm.sf(z))


def mann_whitney_greater(gray: npt.NDArray[np.float64], base: npt.NDArray[np.float64]) -> tuple[float, float]:
    """One-sided Mann-Whitney U that gray is stochastically greater (slower): (U, p-value).

    All values equal (one shared bucket) carries no evidence: (n1 * n2 / 2, 1).
    """
    if gray.size == 0 or base.size == 0:
        raise ValueError("both samples need at least one value")
    lo = min(float(gray.min()), float(base.min()))
    hi = max(float(gray.max()), float(base.max()))
    if lo == hi:
        return gray.size * base.size / 2.0, 1.0
    from scipy import stats

    result = stats.mannwhitneyu(gray, base, alternative="greater")
    return float(result.statistic), float(result.pvalue)


def relative_effect(gray: float, base: float) -> float:
    """gray / base - 1; a zero base makes any positive gray infinitely worse."""
    if base > 0:
        return gray / base - 1.0
    return math.inf if gray > 0 else 0.0


def _describe(details: dict[str, str], side: str, a: Aggregate | None) -> None:
    if a is None:
        details[f"{side}.requests"] = "0"
        details[f"{side}.samples"] = "0"
        for name in ("errors", "error_rate", "throughput_rps", "p50_ms", "p90_ms", "p99_ms", "latency_count"):
            details[f"{side}.{name}"] = "n/a"
        return
    details[f"{side}.requests"] = str(a.requests)
    details[f"{side}.errors"] = str(a.errors)
    details[f"{side}.error_rate"] = _num(a.error_rate)
    details[f"{side}.throughput_rps"] = _num(a.throughput_rps)
    details[f"{side}.p50_ms"] = _num(a.p50)
    details[f"{side}.p90_ms"] = _num(a.p90)
    details[f"{side}.p99_ms"] = _num(a.p99)
    details[f"{side}.latency_count"] = str(a.latency.total)
    details[f"{side}.samples"] = str(a.samples)
    details["window.since"] = _num(a.since)
    details["window.until"] = _num(a.until)


def _describe_spec(details: dict[str, str], spec: AnalysisSpec) -> None:
    details["spec.interval_s"] = _num(spec.interval_s)
    details["spec.min_requests"] = str(spec.min_requests)
    details["spec.max_error_rate"] = _num(spec.max_error_rate) if spec.max_error_rate is not None else "off"
    details["spec.max_p99_ms"] = _num(spec.max_p99_ms) if spec.max_p99_ms is not None else "off"
    details["spec.baseline"] = "on" if spec.baseline else "off"
    if spec.baseline:
        details["spec.alpha"] = _num(spec.alpha)
        details["spec.min_effect"] = _num(spec.min_effect)
        details["spec.error_rate_margin"] = _num(spec.error_rate_margin)


def _num(value: float | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


def _pct(rate: float) -> str:
    return f"{rate:.2%}"


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


# --------------------------------------------------------------------------- decisions


class Step(enum.Enum):
    """What the batch does next. ADVANCE maps to the machine's NEXT (once the batch's own
    pause has run), PAUSE to PAUSE, ROLLBACK to ROLLBACK; WAIT means check again."""

    ADVANCE = "advance"
    WAIT = "wait"
    PAUSE = "pause"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class Tally:
    """The verdicts of one batch counted; streaks are the run at the end."""

    checks: int = 0
    passed: int = 0
    failed: int = 0
    inconclusive: int = 0
    pass_streak: int = 0
    inconclusive_streak: int = 0

    @classmethod
    def of(cls, verdicts: Sequence[Verdict]) -> Tally:
        counts = {o: 0 for o in Outcome}
        for v in verdicts:
            counts[v.outcome] += 1
        return cls(
            checks=len(verdicts),
            passed=counts[Outcome.PASS],
            failed=counts[Outcome.FAIL],
            inconclusive=counts[Outcome.INCONCLUSIVE],
            pass_streak=_streak(verdicts, Outcome.PASS),
            inconclusive_streak=_streak(verdicts, Outcome.INCONCLUSIVE),
        )


def _streak(verdicts: Sequence[Verdict], outcome: Outcome) -> int:
    n = 0
    for v in reversed(verdicts):
        if v.outcome is not outcome:
            break
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    reason: str
    details: Mapping[str, str]


def next_decision(history: Sequence[Verdict], spec: AnalysisSpec) -> Decision:
    """What the current batch does after its verdicts so far (oldest first, this batch only).

    In order: `failure_limit` FAILs in total roll back; `inconclusive_limit` INCONCLUSIVEs
    in a row pause or roll back (`on_inconclusive`); `passes_to_advance` PASSes in a row
    advance; anything else waits for the next check. The details merge the last verdict's
    numbers with the tally, so the event that records the decision shows why.
    """
    tally = Tally.of(history)
    details: dict[str, str] = dict(history[-1].details) if history else {}
    details.update(
        {
            "tally.checks": str(tally.checks),
            "tally.passed": str(tally.passed),
            "tally.failed": str(tally.failed),
            "tally.inconclusive": str(tally.inconclusive),
            "tally.pass_streak": str(tally.pass_streak),
            "tally.inconclusive_streak": str(tally.inconclusive_streak),
            "tally.failure_limit": str(spec.failure_limit),
            "tally.inconclusive_limit": str(spec.inconclusive_limit),
            "tally.passes_to_advance": str(spec.passes_to_advance),
            "tally.on_inconclusive": spec.on_inconclusive.value,
        }
    )
    if not history:
        return Decision(Step.WAIT, "no analysis has run in this batch yet", details)
    last = history[-1]
    if tally.failed >= spec.failure_limit:
        step = Step.ROLLBACK
        why = f"{tally.failed} of {tally.checks} checks failed in this batch (failure_limit {spec.failure_limit})"
    elif tally.inconclusive_streak >= spec.inconclusive_limit:
        step = Step.PAUSE if spec.on_inconclusive is OnInconclusive.PAUSE else Step.ROLLBACK
        why = (
            f"{tally.inconclusive_streak} inconclusive checks in a row (inconclusive_limit "
            f"{spec.inconclusive_limit}, on_inconclusive {spec.on_inconclusive.value})"
        )
    elif tally.pass_streak >= spec.passes_to_advance:
        step = Step.ADVANCE
        why = f"{tally.pass_streak} passing checks in a row (passes_to_advance {spec.passes_to_advance})"
    else:
        return Decision(Step.WAIT, f"last check {last.outcome.value}: {last.reason}", details)
    return Decision(step, f"{why}; last: {last.reason}", details)
