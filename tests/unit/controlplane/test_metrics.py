"""The metrics pipeline's pure parts (controlplane/progression/metrics.py): deltas, Prometheus queries
and answers, agent reports, the collector over fake sources, and a release's series."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import pytest
from graylane.agent.stats import ClusterStats, TrafficCounters
from graylane.controlplane.domain import model
from graylane.controlplane.progression.metrics import (
    CounterDeltas,
    MetricsCollector,
    PrometheusError,
    _SeriesDelta,
    instances,
    parse_vector,
    prometheus_queries,
    release_keys,
    release_series,
    report_from_samples,
    samples_from_prometheus,
    samples_from_report,
    scrape_of,
)
from graylane.controlplane.progression.windows import Histogram, Sample, SeriesKey, Windows
from graylane.v1 import agent_pb2 as apb

BOUNDS = (1.0, 5.0, 25.0)


def stats(requests: int, errors: int = 0, buckets: tuple[tuple[float, int], ...] = ()) -> ClusterStats:
    return ClusterStats(TrafficCounters(requests=requests, responses_5xx=errors), buckets)


def cumulative(*counts: int) -> tuple[tuple[float, int], ...]:
    return tuple(zip(BOUNDS, counts, strict=True))


# --------------------------------------------------------------------------- deltas


def test_first_reading_is_a_baseline_then_deltas() -> None:
    delta = _SeriesDelta()
    assert delta.observe(scrape_of(stats(100, 5, cumulative(50, 90, 100)), 1.0)) is None
    sample = delta.observe(scrape_of(stats(110, 6, cumulative(55, 99, 110)), 2.0))
    assert sample is not None
    assert (sample.requests, sample.errors, sample.interval_s) == (10, 1, 1.0)
    assert sample.latency == Histogram(BOUNDS, (5, 4, 1, 0))


def test_a_histogram_flushed_after_the_baseline_is_not_a_reset() -> None:
    # Envoy shows a histogram only after its first stats flush: counters came first.
    delta = _SeriesDelta()
    delta.observe(scrape_of(stats(5), 1.0))
    sample = delta.observe(scrape_of(stats(8, 0, cumulative(6, 8, 8)), 2.0))
    assert sample is not None
    assert sample.requests == 3  # not 8: no counter went back
    assert sample.latency.total == 8  # everything flushed so far is new to us


def test_a_missing_histogram_means_nothing_new_unless_envoy_restarted() -> None:
    delta = _SeriesDelta()
    delta.observe(scrape_of(stats(10, 0, cumulative(10, 10, 10)), 1.0))
    carried = delta.observe(scrape_of(stats(12), 2.0))
    assert carried is not None and (carried.requests, carried.latency.total) == (2, 0)
    restarted = delta.observe(scrape_of(stats(3), 3.0))
    assert restarted is not None and restarted.requests == 3


def test_a_counter_reset_counts_what_the_restarted_envoy_saw() -> None:
    delta = _SeriesDelta()
    delta.observe(scrape_of(stats(1000, 10, cumulative(900, 1000, 1000)), 1.0))
    sample = delta.observe(scrape_of(stats(7, 1, cumulative(7, 7, 7)), 2.0))
    assert sample is not None and (sample.requests, sample.errors, sample.latency.total) == (7, 1, 7)


# --------------------------------------------------------------------------- Prometheus


def test_queries_read_the_envoys_counters_per_series() -> None:
    q = prometheus_queries()
    assert q["requests"] == "envoy_cluster_upstream_rq_total{}"
    assert q["latency"] == "envoy_cluster_upstream_rq_time_bucket{}"
    errors = [v for k, v in q.items() if k.startswith("errors/")]
    assert len(errors) == 4 and all('envoy_response_code_class=~"5|"' in e for e in errors)
    assert "increase(" not in "".join(q.values())  # deltas are taken here, exactly
    scoped = prometheus_queries(selector='namespace="shop"')
    assert scoped["requests"] == 'envoy_cluster_upstream_rq_total{namespace="shop"}'
    assert scoped["errors/envoy_cluster_upstream_rq_timeout"].endswith(',namespace="shop"}')


def test_counter_deltas_take_a_baseline_then_gains_and_survive_a_reset() -> None:
    deltas = CounterDeltas()
    a = {"envoy_cluster_name": "checkout|v1", "instance": "e1"}
    b = {"envoy_cluster_name": "checkout|v1", "instance": "e2"}
    fivexx = {"envoy_cluster_name": "checkout|v1", "instance": "e1", "envoy_response_code_class": "5"}
    assert deltas.step([(a, 100.0)]) == []  # first sight of e1: only the baseline
    known = instances([(a, 100.0)])
    # e2 is an Envoy not read before: its baseline; e1's first 5xx counter started at 0 since.
    assert deltas.step([(a, 130.0), (b, 7.0), (fivexx, 4.0)], known=known) == [(a, 30.0), (fivexx, 4.0)]
    known = instances([(a, 130.0), (b, 7.0)])
    assert deltas.step([(a, 5.0), (b, 10.0), (fivexx, 4.0)], known=known) == [(a, 5.0), (b, 3.0), (fivexx, 0.0)]
    assert deltas.step([(b, 10.0)], known=known) == [(b, 0.0)]
    assert deltas.step([(a, 9.0)], known=frozenset({"e2"})) == []  # e1 vanished in between: a new baseline


def vector(*elements: tuple[Mapping[str, str], str]) -> dict[str, object]:
    result = [{"metric": dict(labels), "value": [1700000000.0, value]} for labels, value in elements]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def test_parse_vector_reads_values_and_drops_nan() -> None:
    doc = vector(({"envoy_cluster_name": "checkout|v1"}, "12.5"), ({"envoy_cluster_name": "checkout|v2"}, "NaN"))
    assert parse_vector(doc) == [({"envoy_cluster_name": "checkout|v1"}, 12.5)]


@pytest.mark.parametrize(
    "doc",
    [
        {"status": "error", "errorType": "bad_data", "error": "parse error"},
        {"status": "success", "data": {"resultType": "matrix", "result": []}},
        {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}}]}},
        [],
    ],
)
def test_parse_vector_refuses_anything_else(doc: object) -> None:
    with pytest.raises(PrometheusError):
        parse_vector(doc)


def test_samples_from_prometheus_answers() -> None:
    label = "envoy_cluster_name"
    requests = parse_vector(
        vector(
            ({label: "checkout|v1"}, "99.7"),
            ({label: "checkout|v2|gray"}, "10.2"),
            ({label: "graylane_xds"}, "3"),
        )
    )
    errors = parse_vector(vector(({label: "checkout|v2|gray"}, "1.1"), ({label: "other|v9"}, "5")))
    buckets = [
        ({label: "checkout|v2|gray", "le": le}, value)
        for le, value in (("1", 0.0), ("5", 4.2), ("25", 3.9), ("+Inf", 10.2))  # rounding made 25 < 5
    ]
    samples = samples_from_prometheus(requests, errors, buckets, at=100.0, interval_s=15.0, cluster="east")
    assert set(samples) == {SeriesKey("checkout", "v1", "", "east"), SeriesKey("checkout", "v2", "gray", "east")}
    base = samples[SeriesKey("checkout", "v1", "", "east")]
    assert (base.requests, base.errors, base.latency.total, base.interval_s) == (100, 0, 0, 15.0)
    gray = samples[SeriesKey("checkout", "v2", "gray", "east")]
    assert (gray.requests, gray.errors) == (10, 1)
    assert gray.latency == Histogram((1.0, 5.0, 25.0), (0, 4, 0, 6))


# --------------------------------------------------------------------------- agent reports


def test_reports_round_trip() -> None:
    samples = {
        SeriesKey("checkout", "v1", "", ""): Sample(
            at=5.0, interval_s=1.0, requests=20, errors=1, latency=Histogram(BOUNDS, (10, 5, 5, 0))
        ),
        SeriesKey("checkout", "v2", "gray", ""): Sample(at=5.0, interval_s=1.0, requests=0, errors=0),
    }
    report = report_from_samples(samples, at=5.0, interval_s=1.0)
    assert report.at.seconds == 5 and report.interval_seconds == 1.0
    back = samples_from_report(apb.MetricsReport.FromString(report.SerializeToString()), at=42.0)
    latency = samples[SeriesKey("checkout", "v1", "", "")].latency
    assert back == {
        ("checkout", "v1", ""): Sample(at=42.0, interval_s=1.0, requests=20, errors=1, latency=latency),
        ("checkout", "v2", "gray"): Sample(at=42.0, interval_s=1.0, requests=0, errors=0),
    }


def test_malformed_report_series_are_dropped() -> None:
    report = apb.MetricsReport(interval_seconds=1.0)
    report.series.add(service="checkout", version="v1", requests=3, bucket_bounds_ms=[1.0], bucket_counts=[3])
    report.series.add(service="", version="v1", requests=3)
    report.series.add(service="checkout", version="v2", requests=3, bucket_bounds_ms=[1.0], bucket_counts=[1, 2])
    assert set(samples_from_report(report, at=1.0)) == {("checkout", "v2", "")}
    assert samples_from_report(apb.MetricsReport(interval_seconds=0.0), at=1.0) == {}


# --------------------------------------------------------------------------- collector


class FakeSource:
    """A MetricsSource that hands out prepared ticks."""

    def __init__(self, *ticks: Mapping[SeriesKey, int], fail: bool = False) -> None:
        self.ticks = list(ticks)
        self.fail = fail
        self.closed = False

    async def collect(self, at: float) -> dict[SeriesKey, Sample]:
        if self.fail:
            raise RuntimeError("source down")
        counts = self.ticks.pop(0) if self.ticks else {}
        return {key: Sample(at=at, interval_s=1.0, requests=n, errors=0) for key, n in counts.items()}

    async def aclose(self) -> None:
        self.closed = True


V1 = SeriesKey("checkout", "v1", "", "")
V2 = SeriesKey("checkout", "v2", "gray", "")


async def test_collector_appends_every_source_and_survives_a_failing_one() -> None:
    windows = Windows(capacity=10, max_keys=10)
    clock = iter([100.0, 100.0, 99.0])  # a clock that stalls and steps back
    collector = MetricsCollector(
        [FakeSource({V1: 5}, {V1: 7}, {V1: 1}), FakeSource({V1: 1, V2: 2}), FakeSource(fail=True)],
        windows,
        clock=lambda: next(clock),
    )
    assert await collector.collect_once() == 2
    assert await collector.collect_once() == 1
    assert await collector.collect_once() == 1
    ats = [s.at for s in windows.series(V1)]
    assert [s.requests for s in windows.series(V1)] == [6, 7, 1]  # two sources' V1 summed
    assert ats == sorted(ats) and len(set(ats)) == 3  # stamps strictly increase


async def test_agent_reports_are_filed_under_their_cluster() -> None:
    windows = Windows(capacity=10, max_keys=10)
    collector = MetricsCollector([], windows, clock=lambda: 50.0)
    report = report_from_samples({V2: Sample(at=1.0, interval_s=1.0, requests=4, errors=1)}, at=1.0, interval_s=1.0)
    assert collector.ingest_agent_report("east", report) == 1
    assert collector.ingest_agent_report("east", report) == 1
    (only,) = windows.keys()
    assert only == SeriesKey("checkout", "v2", "gray", "east")
    assert windows.window(only, 0.0, 100.0).requests == 8


async def test_run_ticks_until_cancelled_and_closes_its_sources() -> None:
    source = FakeSource(*({V1: 1} for _ in range(1000)))
    collector = MetricsCollector(source, Windows(capacity=100, max_keys=10), interval=0.01)
    task = asyncio.create_task(collector.run())
    async with asyncio.timeout(5):
        while collector.ticks < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed


# --------------------------------------------------------------------------- reading


def spec(lane: str = "gray", services: tuple[str, ...] = ("checkout",)) -> model.ReleaseSpec:
    return model.ReleaseSpec(
        lane=lane,
        entry=services[0],
        services=tuple(model.ServiceVersions(service=s, base_version="v1", gray_version="v2") for s in services),
        strategy=model.Strategy.CANARY,
        match=(),
        batches=(),
    )


def test_release_keys_are_its_lane_and_the_base_beside_it() -> None:
    keys = [
        V1,
        V2,
        SeriesKey("checkout", "v1", "other-lane", ""),
        SeriesKey("payment", "v1", "gray", "east"),  # reached by the lane: its service counts
        SeriesKey("payment", "v1", "", "east"),
        SeriesKey("search", "v1", "", ""),  # never on the lane
    ]
    assert release_keys(keys, spec()) == sorted(
        [V1, V2, SeriesKey("payment", "v1", "gray", "east"), SeriesKey("payment", "v1", "", "east")]
    )


def test_release_series_windows_and_shares() -> None:
    windows = Windows(capacity=100, max_keys=10)
    latency = Histogram(BOUNDS, (0, 10, 0, 0))
    for at in range(1, 11):
        windows.append(V1, Sample(at=float(at), interval_s=1.0, requests=30, errors=0, latency=latency))
        windows.append(V2, Sample(at=float(at), interval_s=1.0, requests=10, errors=1))
    windows.append(SeriesKey("checkout", "v1", "", "old"), Sample(at=0.5, interval_s=1.0, requests=99, errors=0))
    series = release_series(windows, spec(), since=5.0, until=10.0)
    assert [s.key for s in series] == [V1, V2]  # base lane first; the stale series is left out
    base, gray = series
    assert (base.window.requests, base.share) == (150, 0.75)
    assert (gray.window.requests, gray.window.errors, gray.share) == (50, 5, 0.25)
    assert base.window.throughput_rps == 30.0
    assert base.window.p50 is not None and 1.0 < base.window.p50 <= 5.0
    assert gray.window.p50 is None  # no latency observations: absent, not 0
    assert math.isclose(gray.window.error_rate or 0, 0.1)
