from __future__ import annotations

import math

import numpy as np
import pytest
from graylane.controlplane.progression.windows import (
    ENVOY_DEFAULT_BOUNDS_MS,
    MAX_VALUES_PER_SAMPLE,
    Aggregate,
    CounterDelta,
    Histogram,
    RingWindow,
    Sample,
    Scrape,
    SeriesKey,
    Windows,
    aggregate,
    counter_delta,
    expand,
    merge,
)

BOUNDS = (10.0, 20.0, 40.0)


def hist(*counts: int, bounds: tuple[float, ...] = BOUNDS) -> Histogram:
    return Histogram(bounds, counts)


def sample(
    at: float,
    requests: int = 10,
    errors: int = 0,
    *,
    interval: float = 5.0,
    latency: Histogram | None = None,
    values_ms: tuple[float, ...] | None = None,
) -> Sample:
    return Sample(
        at=at,
        interval_s=interval,
        requests=requests,
        errors=errors,
        latency=latency if latency is not None else Histogram(),
        values_ms=values_ms,
    )


# --------------------------------------------------------------------------- histogram


def test_histogram_from_envoy_cumulative_buckets_and_back() -> None:
    h = Histogram.from_cumulative([(10, 10), (20, 90), (40, 100), (math.inf, 103)])
    assert h == Histogram((10.0, 20.0, 40.0), (10, 80, 10, 3))
    assert h.total == 103
    assert h.cumulative() == ((10.0, 10), (20.0, 90), (40.0, 100), (math.inf, 103))


def test_histogram_overflow_from_count_or_none() -> None:
    assert Histogram.from_cumulative([(10, 4), (20, 6)], count=9).counts == (4, 2, 3)
    assert Histogram.from_cumulative([(10, 4), (20, 6)]).counts == (4, 2, 0)


@pytest.mark.parametrize(
    ("buckets", "count"),
    [
        ([(10, 5), (20, 4)], None),  # cumulative went down
        ([(10, 5), (math.inf, 7)], 8),  # +Inf disagrees with _count
        ([(10, 5)], 4),  # _count below the last bucket
        ([(20, 1), (10, 2)], None),  # bounds not increasing
    ],
)
def test_histogram_rejects_inconsistent_buckets(buckets: list[tuple[float, int]], count: int | None) -> None:
    with pytest.raises(ValueError):
        Histogram.from_cumulative(buckets, count=count)


def test_histogram_invariants() -> None:
    with pytest.raises(ValueError):
        Histogram((10.0,), (1,))
    with pytest.raises(ValueError):
        Histogram((10.0,), (1, -1))
    with pytest.raises(ValueError):
        Histogram((0.0, 10.0), (0, 0, 0))
    assert Histogram.empty().bounds == ENVOY_DEFAULT_BOUNDS_MS
    assert Histogram.empty().total == 0


def test_of_values_puts_a_value_on_a_bound_in_that_bucket() -> None:
    h = Histogram.of_values([0.1, 10.0, 10.5, 20.0, 39.0, 41.0, 1e9], bounds=BOUNDS)
    assert h.counts == (2, 2, 1, 2)


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    h = hist(10, 80, 10, 0)
    assert h.quantile(0.5) == pytest.approx(15.0)  # rank 50: 40 of 80 into (10, 20]
    assert h.quantile(0.9) == pytest.approx(20.0)  # rank 90: the end of (10, 20]
    assert h.quantile(0.99) == pytest.approx(38.0)  # rank 99: 9 of 10 into (20, 40]
    assert h.quantile(0.05) == pytest.approx(5.0)  # first bucket starts at 0
    assert h.quantile(0.0) == pytest.approx(0.0)


def test_quantile_of_empty_is_none_and_overflow_is_the_last_bound() -> None:
    assert hist(0, 0, 0, 0).quantile(0.99) is None
    assert Histogram().quantile(0.5) is None
    assert hist(1, 0, 0, 99).quantile(0.99) == 40.0
    with pytest.raises(ValueError):
        hist(1, 0, 0, 0).quantile(1.5)


def test_quantile_skips_empty_buckets() -> None:
    assert hist(0, 0, 10, 0).quantile(0.5) == pytest.approx(30.0)


def test_adding_histograms_with_the_same_bounds() -> None:
    assert hist(1, 2, 3, 4) + hist(10, 20, 30, 40) == hist(11, 22, 33, 44)
    assert Histogram() + hist(1, 2, 3, 4) == hist(1, 2, 3, 4)
    assert hist(1, 2, 3, 4) + Histogram() == hist(1, 2, 3, 4)


def test_adding_histograms_with_different_bounds_keeps_cumulative_counts_at_every_bound() -> None:
    a = Histogram((10.0, 40.0), (5, 5, 1))
    b = Histogram((20.0, 40.0), (3, 4, 2))
    s = a + b
    assert s.bounds == (10.0, 20.0, 40.0)
    assert s.total == a.total + b.total
    assert dict(s.cumulative())[40.0] == 10 + 7
    assert dict(s.cumulative())[10.0] == 5


def test_expand_gives_midpoints_and_ranks_overflow_above_everything() -> None:
    values = expand(hist(1, 2, 0, 1))
    assert values.tolist() == [5.0, 15.0, 15.0, 80.0]
    assert expand(hist(0, 0, 0, 0)).size == 0
    assert expand(Histogram((), (3,))).tolist() == [0.0, 0.0, 0.0]


def test_expand_preserves_the_order_of_the_underlying_values() -> None:
    rng = np.random.default_rng(1)
    raw = rng.lognormal(np.log(40), 0.6, 2_000)
    values = expand(Histogram.of_values(raw))
    assert values.size == raw.size
    assert np.all(np.diff(values) >= 0)


# --------------------------------------------------------------------------- samples and deltas


def test_sample_validation() -> None:
    with pytest.raises(ValueError):
        sample(1.0, interval=0.0)
    with pytest.raises(ValueError):
        sample(1.0, requests=-1)
    with pytest.raises(ValueError):
        sample(math.nan)
    with pytest.raises(ValueError):
        sample(1.0, values_ms=(1.0,) * (MAX_VALUES_PER_SAMPLE + 1))
    # A scrape can split a request (counted at start) from its 5xx (counted at the end).
    assert sample(1.0, requests=2, errors=3).errors == 3


def scrape(at: float, requests: int, errors: int, *counts: int) -> Scrape:
    return Scrape(at=at, requests=requests, errors=errors, latency=hist(*(counts or (0, 0, 0, 0))))


def test_counter_delta_subtracts_every_counter() -> None:
    s = counter_delta(scrape(10.0, 100, 5, 50, 40, 10, 0), scrape(15.0, 130, 6, 60, 55, 14, 1))
    assert s == Sample(at=15.0, interval_s=5.0, requests=30, errors=1, latency=hist(10, 15, 4, 1))


@pytest.mark.parametrize(
    "after",
    [
        scrape(15.0, 7, 1, 5, 2, 0, 0),  # requests went down: Envoy restarted
        scrape(15.0, 130, 1, 5, 2, 0, 0),  # errors went down
        scrape(15.0, 130, 6, 5, 200, 0, 0),  # a bucket went down
        Scrape(at=15.0, requests=130, errors=6, latency=Histogram((5.0,), (3, 4))),  # new bucket layout
    ],
)
def test_counter_reset_makes_the_new_scrape_the_whole_delta(after: Scrape) -> None:
    before = scrape(10.0, 100, 5, 50, 40, 10, 0)
    s = counter_delta(before, after)
    assert (s.requests, s.errors, s.latency) == (after.requests, after.errors, after.latency)
    assert s.interval_s == 5.0


def test_counter_delta_refuses_scrapes_out_of_order() -> None:
    with pytest.raises(ValueError):
        counter_delta(scrape(10.0, 1, 0), scrape(10.0, 2, 0))


def test_counter_delta_tracker_baseline_duplicates_and_resets() -> None:
    d = CounterDelta()
    assert d.observe(scrape(0.0, 1_000_000, 10)) is None  # baseline only: it may span days
    first = d.observe(scrape(5.0, 1_000_050, 11))
    assert first is not None and (first.requests, first.errors) == (50, 1)
    assert d.observe(scrape(5.0, 1_000_050, 11)) is None  # duplicate delivery
    assert d.observe(scrape(4.0, 1_000_040, 11)) is None  # late delivery
    after_restart = d.observe(scrape(10.0, 20, 2))
    assert after_restart is not None and (after_restart.requests, after_restart.errors) == (20, 2)
    assert d.resets == 1
    nxt = d.observe(scrape(15.0, 45, 2))
    assert nxt is not None and nxt.requests == 25


# --------------------------------------------------------------------------- ring window and aggregate


def test_ring_window_is_bounded_and_moves_forward() -> None:
    ring = RingWindow(3)
    for t in (5.0, 10.0, 15.0, 20.0):
        ring.append(sample(t))
    assert ring.capacity == 3
    assert [s.at for s in ring] == [10.0, 15.0, 20.0]
    assert ring.latest is not None and ring.latest.at == 20.0
    with pytest.raises(ValueError):
        ring.append(sample(20.0))
    with pytest.raises(ValueError):
        RingWindow(0)


def test_window_is_half_open_so_back_to_back_windows_never_double_count() -> None:
    ring = RingWindow(10)
    for t in (5.0, 10.0, 15.0, 20.0):
        ring.append(sample(t, requests=int(t)))
    first, second = ring.aggregate(0.0, 10.0), ring.aggregate(10.0, 20.0)
    assert (first.requests, second.requests) == (15, 35)
    assert first.requests + second.requests == ring.aggregate(0.0, 20.0).requests
    with pytest.raises(ValueError):
        ring.between(10.0, 5.0)


def test_aggregate_numbers() -> None:
    samples = [
        sample(5.0, requests=100, errors=1, latency=hist(10, 80, 10, 0)),
        sample(10.0, requests=100, errors=3, latency=hist(10, 80, 10, 0)),
    ]
    a = aggregate(samples, since=0.0, until=10.0)
    assert (a.samples, a.requests, a.errors, a.covered_s) == (2, 200, 4, 10.0)
    assert a.error_rate == pytest.approx(0.02)
    assert a.throughput_rps == pytest.approx(20.0)
    assert a.p50 == pytest.approx(15.0)
    assert a.p90 == pytest.approx(20.0)
    assert a.p99 == pytest.approx(38.0)
    assert a.percentile(0.05) == pytest.approx(5.0)
    assert a.latency == hist(20, 160, 20, 0)
    assert a.values_ms is None  # the samples carried no raw values


def test_empty_window_says_nothing_rather_than_zero() -> None:
    a = RingWindow(4).aggregate(0.0, 60.0)
    assert (a.requests, a.samples) == (0, 0)
    assert a.error_rate is None
    assert a.throughput_rps is None
    assert a.p99 is None


def test_quiet_window_has_zero_throughput_but_no_rates() -> None:
    a = aggregate([sample(5.0, requests=0)], since=0.0, until=5.0)
    assert a.throughput_rps == 0.0
    assert a.error_rate is None


def test_error_rate_is_clamped_to_one() -> None:
    a = aggregate([sample(5.0, requests=2, errors=3)], since=0.0, until=5.0)
    assert a.error_rate == 1.0


def test_raw_values_survive_only_when_every_sample_has_them() -> None:
    with_values = [sample(5.0, values_ms=(1.0, 2.0)), sample(10.0, values_ms=(3.0,))]
    assert aggregate(with_values, since=0.0, until=10.0).values_ms == (1.0, 2.0, 3.0)
    mixed = [*with_values, sample(15.0)]
    assert aggregate(mixed, since=0.0, until=15.0).values_ms is None


# --------------------------------------------------------------------------- windows


def key(version: str = "v2", cluster: str = "east") -> SeriesKey:
    return SeriesKey(service="checkout", version=version, lane="gray", cluster=cluster)


def test_windows_evict_the_least_recently_updated_key() -> None:
    w = Windows(capacity=4, max_keys=2)
    a, b, c = key("a"), key("b"), key("c")
    w.append(a, sample(1.0))
    w.append(b, sample(1.0))
    w.append(a, sample(2.0))  # a is now the most recently updated
    w.window(b, 0.0, 10.0)  # a query does not refresh b
    w.append(c, sample(1.0))
    assert b not in w
    assert w.keys() == (a, c)
    assert (len(w), w.evicted) == (2, 1)


def test_windows_bound_each_series() -> None:
    w = Windows(capacity=2, max_keys=8)
    for t in (1.0, 2.0, 3.0):
        w.append(key(), sample(t))
    assert [s.at for s in w.series(key())] == [2.0, 3.0]
    assert w.series(key("other")) == ()


def test_unknown_key_is_an_empty_window_not_an_error() -> None:
    w = Windows(capacity=2, max_keys=2)
    a = w.window(key(), 0.0, 60.0)
    assert a == Aggregate(since=0.0, until=60.0)
    assert a.error_rate is None


def test_forget_drops_a_series() -> None:
    w = Windows(capacity=2, max_keys=2)
    w.append(key(), sample(1.0))
    w.forget(key())
    w.forget(key())
    assert key() not in w


def test_windows_validate_their_bounds() -> None:
    with pytest.raises(ValueError):
        Windows(capacity=0, max_keys=1)
    with pytest.raises(ValueError):
        Windows(capacity=1, max_keys=0)
    with pytest.raises(ValueError):
        Windows(capacity=1, max_keys=1).window(key(), 10.0, 0.0)


def test_window_many_sums_a_version_across_clusters() -> None:
    w = Windows(capacity=8, max_keys=8)
    east, west = key(cluster="east"), key(cluster="west")
    for t in (5.0, 10.0):
        w.append(east, sample(t, requests=50, errors=1, latency=hist(5, 40, 5, 0), values_ms=(1.0,)))
        w.append(west, sample(t, requests=150, errors=0, latency=hist(15, 120, 15, 0), values_ms=(2.0,)))
    a = w.window_many([east, west, key(cluster="north")], 0.0, 10.0)
    assert (a.requests, a.errors) == (400, 2)
    assert a.throughput_rps == pytest.approx(10.0 + 30.0)
    assert a.covered_s == 10.0
    assert a.latency == hist(40, 320, 40, 0)
    assert a.values_ms is not None and sorted(a.values_ms) == [1.0, 1.0, 2.0, 2.0]
    assert w.window_many([], 0.0, 10.0) == Aggregate(since=0.0, until=10.0)


def test_merge_needs_something_to_merge() -> None:
    with pytest.raises(ValueError):
        merge([])
