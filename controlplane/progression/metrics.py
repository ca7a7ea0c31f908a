"""The metrics pipeline: proxies' statistics in, per-series samples into `Windows`, windows out.

Owns:
- `MetricsSource`, the role of anything that yields one tick's `Sample` per `SeriesKey`,
  and two mechanisms: `EnvoyAdminSource` (reads Envoy admin endpoints every tick and turns
  their cumulative counters and histograms into deltas, per proxy and series, then sums the
  proxies) and `PrometheusQuerySource` (the same counters read from a Prometheus
  that already scrapes the Envoys, `serve --prometheus-url`; deltas taken between answers).
- `MetricsCollector`: the cancellable loop that appends every source's samples to one
  `Windows` each interval, and `ingest_agent_report` for the deltas agents send up
  (`AgentMessage.metrics`), filed under the agent's cluster.
- The wire form of agent reports (`report_from_samples`, `samples_from_report`) and the
  read side (`release_series`): the windows that concern one release, with traffic shares.

Time: samples are stamped with the collector's wall clock (seconds), made strictly
increasing, agent reports included (stamped on arrival: one clock for every series, so a
window [now - w, now] means the same for every cluster whatever the agents' clocks say).

Concurrency: one asyncio loop. The collector's task appends; API handlers read `Windows`
in the same loop between awaits, so no locks. Must not import: etcd, graylane.xds (except
graylane.xds.view, whose cluster names the stats are keyed by; the proxies come in as a
`targets` callable).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from graylane.agent.stats import LOOPBACK_ONLY, AdminAllowList, ClusterStats, EnvoyStatsScraper, TrafficKey
from graylane.controlplane.domain import model
from graylane.controlplane.progression.windows import (
    Aggregate,
    CounterDelta,
    Histogram,
    Sample,
    Scrape,
    SeriesKey,
    Windows,
)
from graylane.v1 import agent_pb2 as apb
from graylane.xds.view import parse_cluster_name

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 1.0

# node id -> (admin "host:port", cluster name; "" for the local cluster)
Targets = Callable[[], Mapping[str, tuple[str, str]]]


class MetricsSource(Protocol):
    """Where one tick's samples come from."""

    async def collect(self, at: float) -> Mapping[SeriesKey, Sample]:
        """What each series added since the previous call, stamped `at`.

        The first call (and a series' first sight) only sets a baseline; nothing is
        counted twice across calls."""
        ...

    async def aclose(self) -> None:
        """Release connections; the collector calls it when it stops."""
        ...


# --------------------------------------------------------------------------- Envoy admin


def scrape_of(stats: ClusterStats, at: float) -> Scrape:
    """One reading of a series as `windows.Scrape`. A histogram Envoy has not flushed yet
    is an empty one (the layout is filled in by `_SeriesDelta`)."""
    latency = Histogram.from_cumulative(stats.latency) if stats.latency else Histogram()
    return Scrape(at=at, requests=stats.requests, errors=stats.errors, latency=latency)


class _SeriesDelta:
    """`CounterDelta` for one series of one proxy, aware of Envoy's histogram lag.

    Envoy publishes a histogram only at its stats flush, so a series may have counters but
    no histogram yet, or (after a flush) suddenly a bucket layout it lacked before. A
    missing histogram stands for "nothing new" (the last one carried forward) unless the
    counters went back (a restart: then it is empty), and a layout that appears where there
    were no observations rebases the baseline: neither is a counter reset.
    """

    __slots__ = ("_delta", "_last")

    def __init__(self) -> None:
        self._delta = CounterDelta()
        self._last: Scrape | None = None

    def observe(self, scrape: Scrape) -> Sample | None:
        last = self._last
        if last is not None and scrape.latency.bounds != last.latency.bounds:
            if scrape.latency.total == 0:
                restarted = scrape.requests < last.requests or scrape.errors < last.errors
                latency = Histogram.empty(last.latency.bounds) if restarted else last.latency
                scrape = dataclasses.replace(scrape, latency=latency)
            elif last.latency.total == 0 and scrape.at > last.at:
                self._delta = CounterDelta()
                self._delta.observe(dataclasses.replace(last, latency=Histogram.empty(scrape.latency.bounds)))
        sample = self._delta.observe(scrape)
        if last is None or scrape.at > last.at:
            self._last = scrape
        return sample


def _sum(at: float, interval_s: float, parts: Sequence[Sample]) -> Sample:
    latency = Histogram()
    for part in parts:
        latency = latency + part.latency
    return Sample(
        at=at,
        interval_s=interval_s,
        requests=sum(p.requests for p in parts),
        errors=sum(p.errors for p in parts),
        latency=latency,
    )


_NAMED = 5  # dead admins named in the summary log line


class EnvoyAdminSource:
    """Reads each target Envoy's admin `/stats` (JSON, with latency buckets) every tick.

    `targets()` is asked on every tick, so proxies that come and go are followed. A
    proxy's first reading is only a baseline (its counters may span days); after that, a
    series it did not report before starts from zero, because Envoy leaves unused stats out
    (``usedonly``): the first requests of a new version are counted, not swallowed by a
    baseline. A proxy that leaves is forgotten (a fresh baseline if it returns); one that
    does not answer keeps its baseline, and its next answer covers the gap. A series a
    proxy no longer reports (its cluster was removed) is forgotten, which keeps the state
    bounded by what the proxies report.
    """

    def __init__(self, targets: Targets, *, timeout: float = 2.0, admin_allow: AdminAllowList = LOOPBACK_ONLY) -> None:
        self._targets = targets
        self._timeout = timeout
        self._admin_allow = admin_allow  # admin addresses outside it are never fetched
        self._stack = contextlib.AsyncExitStack()
        self._scraper: EnvoyStatsScraper | None = None
        self._series: dict[str, dict[SeriesKey, _SeriesDelta]] = {}  # node id -> key -> delta
        self._read_at: dict[str, float] = {}  # node id -> time of its last reading
        self._last_at: float | None = None
        self._unreachable: frozenset[str] = frozenset()

    async def collect(self, at: float) -> dict[SeriesKey, Sample]:
        if self._last_at is not None and at <= self._last_at:
            return {}
        interval = None if self._last_at is None else at - self._last_at
        self._last_at = at
        scraper = self._scraper
        if scraper is None:
            scraper = self._scraper = await self._stack.enter_async_context(
                EnvoyStatsScraper(timeout=self._timeout, admin_allow=self._admin_allow)
            )
        targets = dict(self._targets())
        for gone in self._series.keys() - targets.keys():
            del self._series[gone]
            self._read_at.pop(gone, None)
        readings, unreachable = await scraper.read_all({node: admin for node, (admin, _) in targets.items()})
        if frozenset(unreachable) != self._unreachable:
            # One summary line (a count and a few names), not one name per dead proxy.
            self._unreachable = frozenset(unreachable)
            if unreachable:
                shown = ", ".join(unreachable[:_NAMED])
                more = f" and {len(unreachable) - _NAMED} more" if len(unreachable) > _NAMED else ""
                log.warning(
                    "metrics: %d of %d admin endpoints not answering (%s%s)",
                    len(unreachable),
                    len(targets),
                    shown,
                    more,
                )
        parts: dict[SeriesKey, list[Sample]] = {}
        for node, reading in readings.items():
            cluster = targets[node][1]
            previous_at = self._read_at.get(node)
            self._read_at[node] = at
            known = self._series.setdefault(node, {})
            seen = {SeriesKey(*key, cluster): stats for key, stats in reading.items()}
            for stale in known.keys() - seen.keys():
                del known[stale]
            for key, stats in seen.items():
                delta = known.get(key)
                if delta is None:
                    delta = known[key] = _SeriesDelta()
                    if previous_at is not None:  # absent at the last reading: it was zero
                        delta.observe(Scrape(at=previous_at, requests=0, errors=0))
                sample = delta.observe(scrape_of(stats, at))
                if sample is not None:
                    parts.setdefault(key, []).append(sample)
        if interval is None:
            return {}
        # Each proxy's delta may span more than one tick (it missed one); the sum is filed
        # under this tick's interval so window coverage stays real time.
        return {key: _sum(at, interval, samples) for key, samples in parts.items()}

    async def aclose(self) -> None:
        self._scraper = None
        await self._stack.aclose()


# --------------------------------------------------------------------------- Prometheus

PROMETHEUS_CLUSTER_LABEL = "envoy_cluster_name"
_PROM_REQUESTS = "envoy_cluster_upstream_rq_total"
# 5xx answers (upstream_rq_xx with class 5) and requests that ended without an answer; the
# failure counters carry no class label, which the `=~"5|"` matcher lets through.
_PROM_ERRORS = (
    "envoy_cluster_upstream_rq_xx",
    "envoy_cluster_upstream_rq_timeout",
    "envoy_cluster_upstream_rq_rx_reset",
    "envoy_cluster_upstream_rq_pending_failure_eject",
)
_PROM_LATENCY = "envoy_cluster_upstream_rq_time_bucket"


class PrometheusError(Exception):
    """Prometheus did not answer, or answered something other than an instant vector."""


def prometheus_queries(*, selector: str = "") -> dict[str, str]:
    """The instant queries of one answer: the Envoys' cumulative counters as Prometheus last
    scraped them, one series per Envoy (`instance`) and Envoy cluster: requests, each failure
    counter (keyed `errors/<metric>`) and the latency buckets. Deltas are taken here, between
    answers (`CounterDeltas`), not with `increase()`: increases over consecutive short ranges
    extrapolate at both edges and lose what falls between two ranges' samples, so their sum
    missed or doubled a third of the requests against a real Prometheus.

    `selector` adds label matchers to every metric (`namespace="shop"`).
    """
    extra = f",{selector}" if selector else ""
    queries = {"requests": f"{_PROM_REQUESTS}{{{selector}}}", "latency": f"{_PROM_LATENCY}{{{selector}}}"}
    for metric in _PROM_ERRORS:
        # Several names in one selector would do, but keeping them apart keeps every series
        # identity whole (the name is part of it).
        queries[f"errors/{metric}"] = f'{metric}{{envoy_response_code_class=~"5|"{extra}}}'
    return queries


class CounterDeltas:
    """What each cumulative series (one Envoy's counter, by its whole label set) gained since
    the previous answer. A series that went down was reset (its Envoy restarted) and gained
    its new value. A series seen for the first time gained its whole value when its Envoy
    (`instance`) was already read at the previous answer: Envoy makes a counter when it
    first counts (the first 5xx of a cluster, a new cluster), so it started at 0 since.
    A series of an Envoy not read before only sets its baseline: Prometheus cannot tell
    when such a counter counted what it holds."""

    def __init__(self) -> None:
        self._last: dict[tuple[tuple[str, str], ...], float] = {}

    def step(
        self, answer: Iterable[tuple[Mapping[str, str], float]], *, known: frozenset[str] = frozenset()
    ) -> list[tuple[dict[str, str], float]]:
        """The gains of `answer`; `known`: the instances read at the previous answer."""
        seen: dict[tuple[tuple[str, str], ...], float] = {}
        out: list[tuple[dict[str, str], float]] = []
        for labels, value in answer:
            identity = tuple(sorted(labels.items()))
            seen[identity] = value
            before = self._last.get(identity)
            if before is not None:
                out.append((dict(labels), value - before if value >= before else value))
            elif labels.get("instance", "") in known:
                out.append((dict(labels), value))
        self._last = seen  # a series that vanished (its Envoy gone) is forgotten
        return out


def instances(answer: Iterable[tuple[Mapping[str, str], float]]) -> frozenset[str]:
    """The Envoys (`instance` label) an answer read."""
    return frozenset(labels.get("instance", "") for labels, _ in answer)


def parse_vector(document: Any) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each element of a `/api/v1/query` instant-vector answer; NaN and
    infinite values (an empty rate) are left out."""
    if not isinstance(document, dict):
        raise PrometheusError("answer is not a JSON object")
    if document.get("status") != "success":
        raise PrometheusError(f"{document.get('errorType', 'error')}: {document.get('error', 'query failed')}")
    data = document.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        got = data.get("resultType") if isinstance(data, dict) else data
        raise PrometheusError(f"expected an instant vector, got {got!r}")
    out: list[tuple[dict[str, str], float]] = []
    for element in data["result"]:
        try:
            labels = {str(k): str(v) for k, v in element["metric"].items()}
            value = float(element["value"][1])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise PrometheusError(f"malformed vector element {element!r}") from exc
        if math.isfinite(value):
            out.append((labels, value))
    return out


def _count(value: float) -> int:
    """Prometheus answers in floats: whole counts, kept at or above 0."""
    return max(0, round(value))


def samples_from_prometheus(
    requests: Iterable[tuple[Mapping[str, str], float]],
    errors: Iterable[tuple[Mapping[str, str], float]],
    latency: Iterable[tuple[Mapping[str, str], float]],
    *,
    at: float,
    interval_s: float,
    cluster: str = "",
    label: str = PROMETHEUS_CLUSTER_LABEL,
) -> dict[SeriesKey, Sample]:
    """One answer's samples from the counters' deltas (see `prometheus_queries`), summed
    over the Envoys per Graylane cluster.

    A series is a Graylane cluster present in the requests answer; errors and buckets of
    other clusters are ignored. Bucket counts are made cumulative-monotone after rounding.
    """

    def key_of(labels: Mapping[str, str]) -> SeriesKey | None:
        parsed = parse_cluster_name(labels.get(label, ""))
        return SeriesKey(*parsed, cluster) if parsed is not None else None

    counts: dict[SeriesKey, int] = {}
    for labels, value in requests:
        if (key := key_of(labels)) is not None:
            counts[key] = counts.get(key, 0) + _count(value)
    failed: dict[SeriesKey, int] = {}
    for labels, value in errors:
        key = key_of(labels)
        if key is not None and key in counts:
            failed[key] = failed.get(key, 0) + _count(value)
    buckets: dict[SeriesKey, dict[float, float]] = {}
    for labels, value in latency:
        key = key_of(labels)
        le = labels.get("le")
        if key is None or key not in counts or le is None:
            continue
        try:
            bound = float(le)  # "+Inf" parses to inf
        except ValueError:
            continue
        slot = buckets.setdefault(key, {})
        slot[bound] = slot.get(bound, 0.0) + value
    out: dict[SeriesKey, Sample] = {}
    for key, n in counts.items():
        histogram = Histogram()
        if key in buckets:
            running = 0
            cumulative: list[tuple[float, int]] = []
            for bound in sorted(buckets[key]):
                running = max(running, _count(buckets[key][bound]))
                cumulative.append((bound, running))
            histogram = Histogram.from_cumulative(cumulative)
        out[key] = Sample(at=at, interval_s=interval_s, requests=n, errors=failed.get(key, 0), latency=histogram)
    return out


class PrometheusQuerySource:
    """Samples from a Prometheus that already scrapes the Envoys (`/stats/prometheus`).

    Prometheus holds a point per scrape (often every 15 s), so this source answers at most
    every `interval` seconds (default 30). Each answer reads the Envoys' cumulative counters
    as Prometheus last scraped them at `at - delay` and files what they gained since the
    previous answer (`CounterDeltas`, per Envoy and counter), so consecutive answers add up
    to exactly what the Envoys counted; ticks in between return nothing. `delay` leaves
    Prometheus time to scrape up to the answer's instant.

    Envoy's default `envoy.cluster_name` tag stops at the cluster name's first dot, so
    versions or lanes with dots (``1.2.3``) need the bootstrap to override that tag (or
    Prometheus relabelling into the `label` given here) before this source can tell them
    apart; the Envoy admin source has no such limit.
    """

    def __init__(
        self,
        base_url: str,
        *,
        interval: float = 30.0,
        delay: float = 0.0,
        cluster: str = "",
        label: str = PROMETHEUS_CLUSTER_LABEL,
        selector: str = "",
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0) or not (math.isfinite(delay) and delay >= 0):
            raise ValueError("interval must be positive and delay not negative")
        self._url = base_url.rstrip("/") + "/api/v1/query"
        self._interval = interval
        self._delay = delay
        self._cluster = cluster
        self._label = label
        self._queries = prometheus_queries(selector=selector)
        self._deltas = {name: CounterDeltas() for name in self._queries}
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._last: float | None = None  # the instant of the last answer (None: none yet)
        self._instances: frozenset[str] = frozenset()  # the Envoys the last answer read

    async def collect(self, at: float) -> dict[SeriesKey, Sample]:
        if self._last is not None and at - self._last < self._interval:
            return {}
        answers = await asyncio.gather(*(self._query(q, at - self._delay) for q in self._queries.values()))
        # Only after every query answered: a failed tick leaves its gains to the next answer.
        known = self._instances
        gained = {
            name: self._deltas[name].step(answer, known=known)
            for name, answer in zip(self._queries, answers, strict=True)
        }
        self._instances = instances(answers[list(self._queries).index("requests")])
        previous, self._last = self._last, at
        if previous is None:
            return {}  # the baselines
        errors = [item for name, delta in gained.items() if name.startswith("errors/") for item in delta]
        return samples_from_prometheus(
            gained["requests"], errors, gained["latency"],
            at=at, interval_s=at - previous, cluster=self._cluster, label=self._label,
        )  # fmt: skip

    async def _query(self, query: str, at: float) -> list[tuple[dict[str, str], float]]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout), headers=self._headers
            )
        try:
            async with self._session.get(self._url, params={"query": query, "time": f"{at:.3f}"}) as response:
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PrometheusError(f"{self._url}: {exc or type(exc).__name__}") from exc
        return parse_vector(document)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


# --------------------------------------------------------------------------- agent reports


def report_from_samples(samples: Mapping[SeriesKey, Sample], *, at: float, interval_s: float) -> apb.MetricsReport:
    """One tick of an agent's samples, as sent up. The cluster is not sent: the control
    plane knows which cluster each agent stream belongs to."""
    report = apb.MetricsReport(interval_seconds=interval_s)
    report.at.FromNanoseconds(round(at * 1e9))
    for key in sorted(samples):
        s = samples[key]
        report.series.add(
            service=key.service,
            version=key.version,
            lane=key.lane,
            requests=s.requests,
            errors=s.errors,
            bucket_bounds_ms=s.latency.bounds,
            bucket_counts=s.latency.counts,
        )
    return report


def samples_from_report(report: apb.MetricsReport, *, at: float) -> dict[TrafficKey, Sample]:
    """The samples of one agent report, stamped `at`. Malformed series (empty names, a
    histogram whose counts do not fit its bounds) are dropped with a warning; a report
    without a positive interval gives nothing."""
    interval = report.interval_seconds
    if not (math.isfinite(interval) and interval > 0):
        log.warning("metrics report without a positive interval (%r) dropped", interval)
        return {}
    out: dict[TrafficKey, Sample] = {}
    for s in report.series:
        try:
            if not (s.service and s.version):
                raise ValueError("service and version are required")
            latency = Histogram(tuple(s.bucket_bounds_ms), tuple(s.bucket_counts) or (0,))
            sample = Sample(at=at, interval_s=interval, requests=s.requests, errors=s.errors, latency=latency)
        except ValueError as exc:
            log.warning("metrics series %s|%s|%s dropped: %s", s.service, s.version, s.lane, exc)
            continue
        key = (s.service, s.version, s.lane)
        out[key] = _sum(at, interval, [out[key], sample]) if key in out else sample
    return out


# --------------------------------------------------------------------------- collector


class MetricsCollector:
    """Appends every source's samples to `windows` every `interval` seconds (`run`), and
    agents' reports as they arrive (`ingest_agent_report`)."""

    def __init__(
        self,
        sources: MetricsSource | Sequence[MetricsSource],
        windows: Windows,
        *,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval {interval} must be positive")
        self.sources: tuple[MetricsSource, ...] = (sources,) if not isinstance(sources, Sequence) else tuple(sources)
        self.windows = windows
        self.interval = interval
        self._clock = clock
        self._last_at = -math.inf
        self.ticks = 0  # completed ticks (tests poll it)

    def now(self) -> float:
        """The collector's clock: wall-clock seconds, strictly increasing across calls."""
        at = max(self._clock(), self._last_at + 1e-6)
        self._last_at = at
        return at

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time()
            while True:
                await self.collect_once()
                deadline += self.interval
                late = loop.time() - deadline
                if late > 0:  # a slow tick: skip the ticks it overran instead of bursting
                    deadline += math.ceil(late / self.interval) * self.interval
                await asyncio.sleep(deadline - loop.time())
        finally:
            for source in self.sources:
                with contextlib.suppress(Exception):
                    await source.aclose()

    async def collect_once(self) -> int:
        """One tick of every source; returns the number of samples appended."""
        at = self.now()
        results = await asyncio.gather(*(s.collect(at) for s in self.sources), return_exceptions=True)
        merged: dict[SeriesKey, list[Sample]] = {}
        for source, result in zip(self.sources, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                log.warning("metrics source %s failed: %s", type(source).__name__, result)
                continue
            for key, sample in result.items():
                merged.setdefault(key, []).append(sample)
        for key, samples in merged.items():
            self._append(key, samples[0] if len(samples) == 1 else _sum(at, samples[0].interval_s, samples))
        self.ticks += 1
        return len(merged)

    def ingest_agent_report(self, cluster: str, report: apb.MetricsReport) -> int:
        """File an agent's deltas under its cluster; returns the number of samples appended."""
        samples = samples_from_report(report, at=self.now())
        for (service, version, lane), sample in samples.items():
            self._append(SeriesKey(service, version, lane, cluster), sample)
        return len(samples)

    def _append(self, key: SeriesKey, sample: Sample) -> None:
        try:
            self.windows.append(key, sample)
        except ValueError as exc:  # not after the latest: the clock guarantees it, so a bug
            log.warning("metrics sample for %s dropped: %s", key, exc)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    """One series over a window, with its share of its service's requests there."""

    key: SeriesKey
    window: Aggregate
    share: float | None  # None: the service had no requests in the window


def release_keys(keys: Iterable[SeriesKey], spec: model.ReleaseSpec) -> list[SeriesKey]:
    """The series that concern a release: at every service it lists or its lane reached,
    the lane's traffic and the traffic outside any lane (the baseline beside it)."""
    keys = list(keys)
    services = {s.service for s in spec.services}
    services.update(k.service for k in keys if spec.lane and k.lane == spec.lane)
    lanes = {"", spec.lane}
    return sorted(k for k in keys if k.service in services and k.lane in lanes)


def release_series(windows: Windows, spec: model.ReleaseSpec, *, since: float, until: float) -> list[SeriesSummary]:
    """Every series of the release with a sample in (since, until], sorted by service,
    lane, version, cluster."""
    found = [(k, windows.window(k, since, until)) for k in release_keys(windows.keys(), spec)]
    found = [(k, a) for k, a in found if a.samples]
    totals: dict[str, int] = {}
    for key, a in found:
        totals[key.service] = totals.get(key.service, 0) + a.requests
    found.sort(key=lambda ka: (ka[0].service, ka[0].lane, ka[0].version, ka[0].cluster))
    return [
        SeriesSummary(key, a, a.requests / totals[key.service] if totals[key.service] else None) for key, a in found
    ]
