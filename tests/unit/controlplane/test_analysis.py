from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from graylane.controlplane.errors import InvalidArgument
from graylane.controlplane.progression.analysis import (
    AnalysisSpec,
    Decision,
    OnInconclusive,
    Outcome,
    Step,
    Tally,
    Verdict,
    check_analysis_spec,
    judge,
    mann_whitney_greater,
    next_decision,
    relative_effect,
    two_proportion_z,
)
from graylane.controlplane.progression.webhooks import Webhook, WebhookKind
from graylane.controlplane.progression.windows import Aggregate, Histogram, Sample, aggregate

SINCE, UNTIL = 1_000.0, 1_060.0

# Every verdict, whatever its outcome, carries at least these numbers.
ALWAYS = {
    "gray.requests",
    "gray.errors",
    "gray.error_rate",
    "gray.p99_ms",
    "gray.throughput_rps",
    "spec.min_requests",
    "spec.max_error_rate",
    "spec.max_p99_ms",
    "spec.baseline",
    "checks",
}
WITH_BASELINE = ALWAYS | {"base.requests", "base.error_rate", "base.p99_ms", "spec.alpha", "spec.min_effect"}


def latencies(n: int, *, median_ms: float = 40.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(np.log(median_ms), 0.5, n)


def window(
    requests: int,
    errors: int = 0,
    *,
    values: np.ndarray | None = None,
    raw: bool = False,
    latency: Histogram | None = None,
) -> Aggregate:
    """One 60 s window of one sample; the histogram is built from `values` (or given)."""
    if latency is None:
        latency = Histogram.of_values(values if values is not None else latencies(requests))
    s = Sample(
        at=UNTIL,
        interval_s=UNTIL - SINCE,
        requests=requests,
        errors=errors,
        latency=latency,
        values_ms=tuple(float(v) for v in values) if raw and values is not None else None,
    )
    return aggregate([s], since=SINCE, until=UNTIL)


def no_traffic() -> Aggregate:
    return aggregate([], since=SINCE, until=UNTIL)


def spec(**overrides: object) -> AnalysisSpec:
    values: dict[str, object] = {"min_requests": 100, "max_error_rate": 0.05, "max_p99_ms": 1_000.0}
    values.update(overrides)
    return check_analysis_spec(AnalysisSpec(**values))  # type: ignore[arg-type]


def num(details: object, key: str) -> float:
    assert isinstance(details, dict)
    return float(details[key])


# --------------------------------------------------------------------------- judge


def test_healthy_gray_passes_with_every_number_recorded() -> None:
    gray = window(5_000, 3, values=latencies(5_000, seed=1))
    base = window(20_000, 14, values=latencies(20_000, seed=2))
    v = judge(spec(), gray, base)
    assert v.outcome is Outcome.PASS, v.reason
    d = dict(v.details)
    assert WITH_BASELINE <= d.keys()
    assert d["gray.requests"] == "5000"
    assert d["base.requests"] == "20000"
    assert num(d, "gray.error_rate") == pytest.approx(3 / 5_000)
    assert num(d, "gray.throughput_rps") == pytest.approx(5_000 / 60)
    assert num(d, "gray.p99_ms") == pytest.approx(gray.p99, rel=1e-5)
    assert num(d, "errors.p_value") > 0.01
    assert num(d, "latency.p_value") > 0.01
    assert abs(num(d, "latency.effect")) < 0.10
    assert d["latency.values"] == "histogram"
    assert d["spec.alpha"] == "0.01"
    assert {d[k] for k in d if k.startswith("check.")} == {"pass"}
    assert set(k for k in d if k.startswith("check.")) == {
        "check.max_error_rate",
        "check.max_p99",
        "check.baseline_errors",
        "check.baseline_latency",
    }
    assert d["checks"] == "pass"
    assert d["window.since"] == "1000" and d["window.until"] == "1060"


def test_five_percent_errors_against_none_fails_on_the_baseline() -> None:
    v = judge(spec(max_error_rate=None), window(2_000, 100), window(2_000, 0))
    assert v.outcome is Outcome.FAIL
    assert "significantly worse" in v.reason
    assert v.details["check.baseline_errors"] == "fail"
    assert num(v.details, "errors.p_value") < 1e-6
    assert num(v.details, "errors.diff") == pytest.approx(0.05)
    assert num(v.details, "gray.error_rate") == pytest.approx(0.05)
    assert num(v.details, "base.error_rate") == 0.0


def test_error_rate_above_threshold_fails_without_a_baseline() -> None:
    v = judge(spec(baseline=False, max_error_rate=0.01), window(1_000, 50))
    assert v.outcome is Outcome.FAIL
    assert "above max 1.00%" in v.reason
    assert v.details["check.max_error_rate"] == "fail"
    assert "base.requests" not in v.details


def test_significant_but_small_error_difference_passes_within_the_margin() -> None:
    # 0.5 % vs 0.1 % on 100k requests each: significant, but 0.4 points < the 1 point margin.
    v = judge(spec(), window(100_000, 500), window(100_000, 100))
    assert v.outcome is Outcome.PASS, v.reason
    assert num(v.details, "errors.p_value") < 0.01
    assert num(v.details, "errors.diff") == pytest.approx(0.004)


def test_three_times_slower_fails_on_the_baseline() -> None:
    base_values = latencies(5_000, seed=3)
    gray = window(5_000, values=latencies(5_000, seed=4) * 3)
    v = judge(spec(max_p99_ms=None), gray, window(5_000, values=base_values))
    assert v.outcome is Outcome.FAIL
    assert v.details["check.baseline_latency"] == "fail"
    assert num(v.details, "latency.p_value") < 0.01
    assert num(v.details, "latency.effect") > 1.5
    assert num(v.details, "latency.p99_ratio") > 2.0
    assert "significantly slower" in v.reason


def test_three_times_slower_p99_fails_the_absolute_threshold() -> None:
    gray = window(5_000, values=latencies(5_000, median_ms=200.0, seed=5))
    v = judge(spec(baseline=False, max_p99_ms=300.0), gray)
    assert v.outcome is Outcome.FAIL
    assert v.details["check.max_p99"] == "fail"
    assert num(v.details, "gray.p99_ms") > 300.0
    assert "p99" in v.reason


@pytest.mark.parametrize("raw", [True, False], ids=["raw-values", "histograms"])
def test_two_percent_slower_on_a_large_sample_passes_by_the_effect_bound(raw: bool) -> None:
    base_values = latencies(50_000, seed=6)
    gray_values = latencies(50_000, seed=6) * 1.02
    gray = window(50_000, values=gray_values, raw=raw)
    base = window(50_000, values=base_values, raw=raw)
    v = judge(spec(), gray, base)
    assert v.outcome is Outcome.PASS, v.reason
    # Significant, yet too small to matter: that is the effect bound at work.
    assert num(v.details, "latency.p_value") < 0.01
    assert 0.0 < num(v.details, "latency.effect") < 0.10
    assert v.details["latency.values"] == ("raw" if raw else "histogram")


def test_twenty_percent_slower_on_raw_values_fails() -> None:
    base = window(5_000, values=latencies(5_000, seed=7), raw=True)
    gray = window(5_000, values=latencies(5_000, seed=8) * 1.2, raw=True)
    v = judge(spec(max_p99_ms=None), gray, base)
    assert v.outcome is Outcome.FAIL
    assert v.details["latency.values"] == "raw"


def test_no_traffic_is_inconclusive_with_the_numbers() -> None:
    v = judge(spec(), no_traffic(), no_traffic())
    assert v.outcome is Outcome.INCONCLUSIVE
    assert "gray has 0 requests" in v.reason and "base has 0 requests" in v.reason
    d = dict(v.details)
    assert WITH_BASELINE <= d.keys()
    assert d["gray.requests"] == "0"
    assert d["gray.error_rate"] == "n/a"
    assert d["gray.p99_ms"] == "n/a"
    assert d["gray.throughput_rps"] == "n/a"
    assert d["spec.min_requests"] == "100"
    assert d["checks"] == "not run"


def test_missing_base_is_inconclusive_when_the_baseline_is_on() -> None:
    v = judge(spec(), window(1_000), None)
    assert v.outcome is Outcome.INCONCLUSIVE
    assert v.details["base.requests"] == "0"
    assert v.details["base.error_rate"] == "n/a"
    assert judge(spec(baseline=False), window(1_000), None).outcome is Outcome.PASS


def test_too_few_requests_is_inconclusive_even_when_all_of_them_failed() -> None:
    v = judge(spec(), window(50, 50), window(5_000))
    assert v.outcome is Outcome.INCONCLUSIVE
    assert "fewer than min_requests 100" in v.reason
    assert v.details["gray.error_rate"] == "1"


def everything_failed() -> Aggregate:
    """Every request failed without a response: errors, and no latency observation at all."""
    return window(2_000, 2_000, latency=Histogram.empty())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"baseline": False},
        {"max_error_rate": None},
        {"max_error_rate": None, "baseline": False},
        {"max_error_rate": None, "max_p99_ms": None},
        {"max_p99_ms": None, "baseline": False},
    ],
)
def test_every_measurement_failed_is_never_a_pass(overrides: dict[str, object]) -> None:
    v = judge(spec(**overrides), everything_failed(), window(2_000))
    assert v.outcome is not Outcome.PASS
    assert v.details["gray.error_rate"] == "1"
    assert v.details["gray.latency_count"] == "0"


def test_no_latency_observations_is_inconclusive_not_pass() -> None:
    gray = window(2_000, 0, latency=Histogram.empty())
    v = judge(spec(max_error_rate=0.05, baseline=False), gray)
    assert v.outcome is Outcome.INCONCLUSIVE
    assert v.details["check.max_error_rate"] == "pass"
    assert v.details["check.max_p99"] == "inconclusive"
    v = judge(spec(max_p99_ms=None), gray, window(2_000))
    assert v.outcome is Outcome.INCONCLUSIVE
    assert v.details["check.baseline_latency"] == "inconclusive"
    assert v.details["latency.p_value"] == "n/a"


def test_a_failure_wins_over_missing_data() -> None:
    gray = window(2_000, 400, latency=Histogram.empty())
    v = judge(spec(baseline=False), gray)
    assert v.outcome is Outcome.FAIL
    assert v.details["check.max_p99"] == "inconclusive"
    assert v.details["check.max_error_rate"] == "fail"


def test_details_are_flat_strings_for_every_outcome() -> None:
    verdicts = [
        judge(spec(), window(5_000), window(5_000)),
        judge(spec(), window(5_000, 1_000), window(5_000)),
        judge(spec(), no_traffic(), no_traffic()),
    ]
    assert {v.outcome for v in verdicts} == set(Outcome)
    for v in verdicts:
        assert WITH_BASELINE <= v.details.keys()
        assert all(isinstance(k, str) and isinstance(x, str) and x for k, x in v.details.items())


# --------------------------------------------------------------------------- statistics


def test_two_proportion_z_matches_the_textbook_formula() -> None:
    z, p = two_proportion_z(60, 1_000, 40, 1_000)
    pooled = 100 / 2_000
    expected = (0.06 - 0.04) / math.sqrt(pooled * (1 - pooled) * (2 / 1_000))
    assert z == pytest.approx(expected)
    assert p == pytest.approx(0.5 * math.erfc(expected / math.sqrt(2)))
    assert two_proportion_z(40, 1_000, 60, 1_000)[1] > 0.5  # one-sided: gray better is no evidence


def test_two_proportion_z_without_variance_has_no_evidence() -> None:
    assert two_proportion_z(0, 100, 0, 100) == (0.0, 1.0)
    assert two_proportion_z(100, 100, 50, 50) == (0.0, 1.0)
    with pytest.raises(ValueError):
        two_proportion_z(0, 0, 0, 1)


def test_mann_whitney_is_one_sided_and_handles_total_ties() -> None:
    slow, fast = latencies(500, seed=9) * 2, latencies(500, seed=10)
    assert mann_whitney_greater(slow, fast)[1] < 1e-6
    assert mann_whitney_greater(fast, slow)[1] > 0.99
    same = np.full(10, 15.0)
    assert mann_whitney_greater(same, same) == (50.0, 1.0)
    with pytest.raises(ValueError):
        mann_whitney_greater(np.array([]), same)


def test_relative_effect() -> None:
    assert relative_effect(110.0, 100.0) == pytest.approx(0.10)
    assert relative_effect(5.0, 0.0) == math.inf
    assert relative_effect(0.0, 0.0) == 0.0


# --------------------------------------------------------------------------- spec validation


def hook(url: str = "https://ci.example/confirm", name: str = "confirm") -> Webhook:
    return Webhook(name=name, kind=WebhookKind.CONFIRM_BATCH, url=url)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_error_rate": -0.01}, "analysis.max_error_rate"),
        ({"max_error_rate": 1.5}, "analysis.max_error_rate"),
        ({"max_error_rate": math.nan}, "analysis.max_error_rate"),
        ({"max_p99_ms": 0.0}, "analysis.max_p99_ms"),
        ({"max_p99_ms": -5.0}, "analysis.max_p99_ms"),
        ({"max_p99_ms": math.inf}, "analysis.max_p99_ms"),
        ({"interval_s": 0.5}, "analysis.interval"),
        ({"interval_s": -60.0}, "analysis.interval"),
        ({"interval_s": math.nan}, "analysis.interval"),
        ({"min_requests": 0}, "analysis.min_requests"),
        ({"min_requests": -1}, "analysis.min_requests"),
        ({"min_requests": 1.5}, "analysis.min_requests"),
        ({"alpha": 0.0}, "analysis.alpha"),
        ({"alpha": 1.0}, "analysis.alpha"),
        ({"min_effect": -0.1}, "analysis.min_effect"),
        ({"error_rate_margin": -0.01}, "analysis.error_rate_margin"),
        ({"error_rate_margin": 1.0}, "analysis.error_rate_margin"),
        ({"failure_limit": 0}, "analysis.failure_limit"),
        ({"inconclusive_limit": 0}, "analysis.inconclusive_limit"),
        ({"passes_to_advance": 0}, "analysis.passes_to_advance"),
        ({"on_inconclusive": "pause"}, "analysis.on_inconclusive"),
        ({"max_error_rate": None, "max_p99_ms": None, "baseline": False}, "analysis"),
        ({"webhooks": (hook("ftp://ci.example/x"),)}, "analysis.webhooks[0].url"),
        ({"webhooks": (hook("file:///etc/passwd"),)}, "analysis.webhooks[0].url"),
        ({"webhooks": (hook("ci.example/confirm"),)}, "analysis.webhooks[0].url"),
        ({"webhooks": (hook(), hook("http://"))}, "analysis.webhooks[1].url"),
        ({"webhooks": (hook(), hook())}, "analysis.webhooks[1].name"),
    ],
)
def test_bad_spec_values_name_the_field(overrides: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"max_error_rate": 0.05}
    values.update(overrides)
    with pytest.raises(InvalidArgument) as caught:
        check_analysis_spec(AnalysisSpec(**values))  # type: ignore[arg-type]
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_field_names_follow_where_the_spec_sits() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_analysis_spec(AnalysisSpec(interval_s=0.2), where="batches[2].analysis")
    assert caught.value.field == "batches[2].analysis.interval"
    assert "0.2" in caught.value.reason


def test_valid_specs_are_returned_unchanged() -> None:
    s = AnalysisSpec()
    assert check_analysis_spec(s) is s
    edge = AnalysisSpec(
        interval_s=1.0,
        min_requests=1,
        max_error_rate=0.0,
        max_p99_ms=0.5,
        min_effect=0.0,
        error_rate_margin=0.0,
        webhooks=(hook("http://127.0.0.1:8080/ok"), hook(name="other")),
    )
    assert check_analysis_spec(edge) is edge
    assert check_analysis_spec(AnalysisSpec(max_error_rate=1.0)).max_error_rate == 1.0


# --------------------------------------------------------------------------- decisions


def verdict(outcome: Outcome, **details: str) -> Verdict:
    return Verdict(outcome, f"it was {outcome.value}", {"gray.requests": "10", **details})


P, F, N = Outcome.PASS, Outcome.FAIL, Outcome.INCONCLUSIVE  # N: no conclusion


def decide(outcomes: Sequence[Outcome], **overrides: object) -> Decision:
    return next_decision([verdict(o) for o in outcomes], spec(**overrides))


def test_tally_counts_totals_and_trailing_streaks() -> None:
    t = Tally.of([verdict(o) for o in (F, P, N, N, P, P)])
    assert t == Tally(checks=6, passed=3, failed=1, inconclusive=2, pass_streak=2, inconclusive_streak=0)
    assert Tally.of([]) == Tally()


def test_no_verdict_yet_waits() -> None:
    d = decide([])
    assert d.step is Step.WAIT
    assert d.details["tally.checks"] == "0"


def test_a_pass_advances_and_passes_to_advance_needs_a_run() -> None:
    assert decide([P]).step is Step.ADVANCE
    assert decide([P], passes_to_advance=2).step is Step.WAIT
    assert decide([P, P], passes_to_advance=2).step is Step.ADVANCE
    assert decide([P, N, P], passes_to_advance=2).step is Step.WAIT


def test_failures_count_in_total_within_the_batch() -> None:
    assert decide([F], failure_limit=2).step is Step.WAIT
    assert decide([F, P], failure_limit=2).step is Step.ADVANCE  # one blip, below the limit
    d = decide([F, P, P, F], failure_limit=2, passes_to_advance=3)
    assert d.step is Step.ROLLBACK
    assert "2 of 4 checks failed" in d.reason
    assert d.details["tally.failed"] == "2"
    assert d.details["tally.failure_limit"] == "2"


def test_rollback_wins_over_a_passing_last_check() -> None:
    assert decide([F, F, P], failure_limit=2).step is Step.ROLLBACK


def test_inconclusive_limit_pauses_or_rolls_back() -> None:
    assert decide([N, N], inconclusive_limit=3).step is Step.WAIT
    paused = decide([N, N, N], inconclusive_limit=3)
    assert paused.step is Step.PAUSE
    assert "3 inconclusive checks in a row" in paused.reason
    assert paused.details["tally.on_inconclusive"] == "pause"
    failed = decide([N, N, N], inconclusive_limit=3, on_inconclusive=OnInconclusive.FAIL)
    assert failed.step is Step.ROLLBACK
    assert decide([N, N, P, N, N], inconclusive_limit=3, passes_to_advance=2).step is Step.WAIT


def test_decision_details_carry_the_last_verdicts_numbers() -> None:
    d = next_decision([verdict(P, **{"gray.p99_ms": "12"})], spec())
    assert d.details["gray.p99_ms"] == "12"
    assert d.details["tally.passed"] == "1"
    assert "it was pass" in d.reason


def test_a_batch_where_every_request_fails_rolls_back_and_never_advances() -> None:
    s = spec(failure_limit=3)
    history: list[Verdict] = []
    steps = []
    for _ in range(3):
        history.append(judge(s, everything_failed(), window(2_000)))
        steps.append(next_decision(history, s).step)
    assert steps == [Step.WAIT, Step.WAIT, Step.ROLLBACK]
    assert next_decision(history, s).details["gray.error_rate"] == "1"


def test_a_batch_without_traffic_pauses_with_the_evidence() -> None:
    s = spec(inconclusive_limit=2)
    history = [judge(s, no_traffic(), window(5_000)) for _ in range(2)]
    d = next_decision(history, s)
    assert d.step is Step.PAUSE
    assert d.details["gray.requests"] == "0"
    assert "gray has 0 requests" in d.reason
