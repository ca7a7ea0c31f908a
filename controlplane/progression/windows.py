"""Bounded in-memory time series of per-version traffic: the numbers analysis judges.

Owns:
- `Histogram`: latency buckets the way Envoy keeps them (finite upper bounds in ms plus an
  overflow bucket), stored as per-bucket counts; `expand` turns one into representative
  values (bucket midpoints) for rank tests.
- `Sample`: what one scrape interval added for one series (a delta, never a cumulative
  counter); `Scrape`, `counter_delta` and `CounterDelta` turn Envoy's cumulative counters
  into samples and survive counter resets (an Envoy restart).
- `RingWindow`: the bounded series of one key; `Windows`: a bounded set of them keyed by
  `SeriesKey` (service, version, lane, cluster), evicting the least recently updated key.
- `Aggregate`: a window summed, with error rate, throughput and interpolated percentiles;
  `merge` sums concurrent series (one version across clusters).

Invariants: no clocks (every time is passed in, seconds as float, one clock per series);
no I/O; no locks (one asyncio task owns a `Windows` and both appends and queries). Absence
is explicit: a window with no requests has `error_rate` None and percentiles None, never 0,
so "no values found" cannot pass for a healthy zero.

Must not import: etcd, grpc, aiohttp, graylane.xds, graylane.agent.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

# Envoy's default histogram buckets (source/common/stats/histogram_impl.cc), in ms for
# timers such as upstream_rq_time. Anything above the last bound lands in the overflow
# bucket (Prometheus `le="+Inf"`).
ENVOY_DEFAULT_BOUNDS_MS: tuple[float, ...] = (
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0,
    10_000.0, 30_000.0, 60_000.0, 300_000.0, 600_000.0, 1_800_000.0, 3_600_000.0,
)  # fmt: skip

# Raw latency values are optional and only kept when a source has them (the demo traffic
# generator, tests). This caps what one sample may carry, so a window stays bounded.
MAX_VALUES_PER_SAMPLE = 100_000


# --------------------------------------------------------------------------- histogram


@dataclass(frozen=True, slots=True)
class Histogram:
    """Latency buckets: `counts[i]` observations in (bounds[i-1], bounds[i]] (the first from
    0), and `counts[-1]` the overflow above the last bound. Per-bucket, not cumulative."""

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.bounds)} bounds need {len(self.bounds) + 1} counts, got {len(self.counts)}")
        previous = 0.0
        for b in self.bounds:
            if not (math.isfinite(b) and b > previous):
                raise ValueError(f"bucket bounds must be finite, positive and increasing: {self.bounds}")
            previous = b
        if any(c < 0 for c in self.counts):
            raise ValueError(f"bucket counts must not be negative: {self.counts}")

    @classmethod
    def empty(cls, bounds: Sequence[float] = ENVOY_DEFAULT_BOUNDS_MS) -> Histogram:
        return cls(tuple(float(b) for b in bounds), (0,) * (len(bounds) + 1))

    @classmethod
    def from_cumulative(cls, buckets: Iterable[tuple[float, int]], *, count: int | None = None) -> Histogram:
        """From Envoy/Prometheus buckets: (upper bound, observations at or below it).

        A `math.inf` bound is the `+Inf` bucket; `count` (the histogram's `_count`) may stand
        in for it. Without either, nothing overflowed.
        """
        bounds: list[float] = []
        counts: list[int] = []
        below = 0
        total: int | None = count
        for bound, cumulative in buckets:
            if cumulative < below:
                raise ValueError(f"cumulative bucket counts must not decrease: {cumulative} after {below}")
            if math.isinf(bound):
                total = cumulative if total is None else total
                if cumulative != total:
                    raise ValueError(f"+Inf bucket {cumulative} disagrees with count {total}")
                continue
            bounds.append(float(bound))
            counts.append(cumulative - below)
            below = cumulative
        total = below if total is None else total
        if total < below:
            raise ValueError(f"count {total} is below the last bucket's {below}")
        return cls(tuple(bounds), (*counts, total - below))

    @classmethod
    def of_values(cls, values_ms: Iterable[float], *, bounds: Sequence[float] = ENVOY_DEFAULT_BOUNDS_MS) -> Histogram:
        """Bucket raw latencies the way Envoy would: a value equal to a bound is in that bucket."""
        edges = np.asarray(bounds, dtype=np.float64)
        values = np.fromiter(values_ms, dtype=np.float64)
        index = np.searchsorted(edges, values, side="left")
        counts = np.bincount(index, minlength=len(edges) + 1)
        return cls(tuple(float(b) for b in bounds), tuple(int(c) for c in counts))

    @property
    def total(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """Back to Envoy/Prometheus form, ending with (inf, total)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, c in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += c
            out.append((bound, running))
        return tuple(out)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 <= q <= 1) in ms, None for an empty histogram.

        Linear interpolation inside the bucket that holds rank q * total, the first bucket
        starting at 0: what Prometheus' histogram_quantile computes over Envoy's buckets.
        A rank in the overflow bucket returns the highest finite bound, a lower bound of the
        truth (there is no upper edge to interpolate towards).
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is outside [0, 1]")
        total = self.total
        if total == 0:
            return None
        rank = q * total
        below = 0
        for i, c in enumerate(self.counts):
            if c and below + c >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1] if self.bounds else None
                lower = self.bounds[i - 1] if i else 0.0
                upper = self.bounds[i]
                return lower + (upper - lower) * max(rank - below, 0.0) / c
            below += c
        return self.bounds[-1] if self.bounds else None  # unreachable: rank <= total

    def __add__(self, other: Histogram) -> Histogram:
        if self.bounds == other.bounds:
            return Histogram(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)))
        if not any(other.counts):
            return self
        if not any(self.counts):
            return other
        # Bucket layouts differ (histogram_bucket_settings changed across a restart): move
        # every bucket onto the union of bounds, keeping its upper edge. Cumulative counts at
        # every shared bound stay exact; only interpolation inside a coarse bucket shifts.
        union = tuple(sorted(set(self.bounds) | set(other.bounds)))
        position = {b: i for i, b in enumerate(union)}
        counts = [0] * (len(union) + 1)
        for h in (self, other):
            for i, c in enumerate(h.counts):
                counts[position[h.bounds[i]] if i < len(h.bounds) else len(union)] += c
        return Histogram(union, tuple(counts))

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations added since `earlier` (same bounds, no bucket went down)."""
        if self.bounds != earlier.bounds:
            raise ValueError("histograms with different bounds cannot be subtracted")
        return Histogram(self.bounds, tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True)))


def expand(histogram: Histogram) -> npt.NDArray[np.float64]:
    """One representative value per observation, for rank tests (Mann-Whitney U).

    Each bucket contributes its midpoint (the first bucket's is half its bound). The
    overflow bucket contributes twice the highest bound: a value above every finite bucket,
    which is all a rank test needs of it. Values within a bucket tie, which rank tests with
    tie correction handle; a shift that stays inside one bucket is invisible, as it is to
    the histogram itself.
    """
    if not histogram.bounds:
        return np.zeros(histogram.counts[0], dtype=np.float64)
    edges = np.asarray(histogram.bounds, dtype=np.float64)
    lower = np.concatenate(([0.0], edges[:-1]))
    points = np.concatenate(((lower + edges) / 2.0, [2.0 * edges[-1]]))
    return np.repeat(points, np.asarray(histogram.counts, dtype=np.int64))


# --------------------------------------------------------------------------- samples


class SeriesKey(NamedTuple):
    """One series: a version of a service in a lane ("" for untagged traffic), in a cluster."""

    service: str
    version: str
    lane: str
    cluster: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """What one interval (at - interval_s, at] added to a series.

    `errors` (5xx plus failures without a response) may exceed `requests` in one interval:
    Envoy counts a request when it starts and its 5xx when it ends, so a scrape can split
    them. Rates clamp at the aggregate, where that evens out.
    """

    at: float
    interval_s: float
    requests: int
    errors: int
    latency: Histogram = field(default_factory=Histogram)
    values_ms: tuple[float, ...] | None = None  # raw latencies, when the source has them

    def __post_init__(self) -> None:
        if not math.isfinite(self.at):
            raise ValueError(f"sample time {self.at} is not finite")
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"sample interval {self.interval_s} must be positive")
        if self.requests < 0 or self.errors < 0:
            raise ValueError(f"sample counts must not be negative: {self.requests} requests, {self.errors} errors")
        if self.values_ms is not None and len(self.values_ms) > MAX_VALUES_PER_SAMPLE:
            raise ValueError(f"{len(self.values_ms)} raw values in one sample, at most {MAX_VALUES_PER_SAMPLE}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Scrape:
    """One read of a series' cumulative counters, as Envoy's admin endpoint reports them."""

    at: float
    requests: int  # upstream_rq_total
    errors: int  # upstream_rq_5xx + failures without a response
    latency: Histogram = field(default_factory=Histogram)  # upstream_rq_time since start


def counter_delta(previous: Scrape, current: Scrape) -> Sample:
    """The sample between two scrapes of one series.

    A counter reset (any counter or bucket went down, or the bucket layout changed: Envoy
    restarted) makes `current` the whole delta: everything it counts happened since the
    restart, inside this interval. Per-counter reset handling would mix pre- and
    post-restart numbers in one sample.
    """
    if not current.at > previous.at:
        raise ValueError(f"scrape at {current.at} is not after the previous one at {previous.at}")
    interval = current.at - previous.at
    if _went_back(previous, current):
        return Sample(
            at=current.at, interval_s=interval, requests=current.requests, errors=current.errors,
            latency=current.latency,
        )  # fmt: skip
    return Sample(
        at=current.at,
        interval_s=interval,
        requests=current.requests - previous.requests,
        errors=current.errors - previous.errors,
        latency=current.latency.minus(previous.latency),
    )


def _went_back(previous: Scrape, current: Scrape) -> bool:
    if current.requests < previous.requests or current.errors < previous.errors:
        return True
    if current.latency.bounds != previous.latency.bounds:
        return True
    return any(c < p for c, p in zip(current.latency.counts, previous.latency.counts, strict=True))


class CounterDelta:
    """Turns successive scrapes of one series into samples.

    The first scrape only sets the baseline (its counters may span days), so it yields no
    sample; a scrape not after the last one (a duplicate or late delivery) is dropped.
    """

    __slots__ = ("_last", "_resets")

    def __init__(self) -> None:
        self._last: Scrape | None = None
        self._resets = 0

    @property
    def resets(self) -> int:
        """How many counter resets (restarts) were seen."""
        return self._resets

    def observe(self, scrape: Scrape) -> Sample | None:
        last = self._last
        if last is not None and not scrape.at > last.at:
            return None
        self._last = scrape
        if last is None:
            return None
        if _went_back(last, scrape):
            self._resets += 1
        return counter_delta(last, scrape)


# --------------------------------------------------------------------------- aggregate


@dataclass(frozen=True, slots=True, kw_only=True)
class Aggregate:
    """The samples of a window (since, until] summed.

    `covered_s` is the time the included samples span (the sum of their intervals);
    `throughput_rps` is requests over it, None when nothing was sampled. `values_ms` holds
    raw latencies only when every included sample carried them.
    """

    since: float
    until: float
    samples: int = 0
    covered_s: float = 0.0
    requests: int = 0
    errors: int = 0
    latency: Histogram = field(default_factory=Histogram)
    values_ms: tuple[float, ...] | None = None
    throughput_rps: float | None = None

    @property
    def error_rate(self) -> float | None:
        """errors / requests, clamped to 1; None without requests (not 0: nothing was seen)."""
        if self.requests == 0:
            return None
        return min(self.errors, self.requests) / self.requests

    def percentile(self, q: float) -> float | None:
        return self.latency.quantile(q)

    @property
    def p50(self) -> float | None:
        return self.latency.quantile(0.50)

    @property
    def p90(self) -> float | None:
        return self.latency.quantile(0.90)

    @property
    def p99(self) -> float | None:
        return self.latency.quantile(0.99)


def aggregate(samples: Iterable[Sample], *, since: float, until: float) -> Aggregate:
    """Sum samples (already chosen for the window) into an `Aggregate`."""
    count = 0
    covered = 0.0
    requests = 0
    errors = 0
    latency = Histogram()
    values: list[float] | None = []
    for s in samples:
        count += 1
        covered += s.interval_s
        requests += s.requests
        errors += s.errors
        latency = latency + s.latency
        if values is not None and s.values_ms is not None:
            values.extend(s.values_ms)
        else:
            values = None
    return Aggregate(
        since=since,
        until=until,
        samples=count,
        covered_s=covered,
        requests=requests,
        errors=errors,
        latency=latency,
        values_ms=tuple(values) if values is not None and count else None,
        throughput_rps=requests / covered if count else None,
    )


def merge(aggregates: Iterable[Aggregate]) -> Aggregate:
    """Sum concurrent series over the same window (one version across clusters).

    Counts and histograms add, and so do throughputs (the series ran side by side);
    `covered_s` is the longest coverage. Raw values survive only if every side has them.
    """
    items = list(aggregates)
    if not items:
        raise ValueError("merge needs at least one aggregate")
    latency = Histogram()
    values: list[float] | None = []
    for a in items:
        latency = latency + a.latency
        if values is not None and a.values_ms is not None:
            values.extend(a.values_ms)
        elif a.samples:
            values = None
    rates = [a.throughput_rps for a in items if a.throughput_rps is not None]
    samples = sum(a.samples for a in items)
    return Aggregate(
        since=min(a.since for a in items),
        until=max(a.until for a in items),
        samples=samples,
        covered_s=max(a.covered_s for a in items),
        requests=sum(a.requests for a in items),
        errors=sum(a.errors for a in items),
        latency=latency,
        values_ms=tuple(values) if values is not None and samples else None,
        throughput_rps=sum(rates) if rates else None,
    )


# --------------------------------------------------------------------------- windows


class RingWindow:
    """The last `capacity` samples of one series, oldest first; appends must move forward."""

    __slots__ = ("_samples",)

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"window capacity {capacity} must be at least 1")
        self._samples: deque[Sample] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        assert self._samples.maxlen is not None
        return self._samples.maxlen

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    @property
    def latest(self) -> Sample | None:
        return self._samples[-1] if self._samples else None

    def append(self, sample: Sample) -> None:
        """Add the newest sample; the oldest falls out at capacity."""
        if self._samples and not sample.at > self._samples[-1].at:
            raise ValueError(f"sample at {sample.at} is not after the latest at {self._samples[-1].at}")
        self._samples.append(sample)

    def between(self, since: float, until: float) -> tuple[Sample, ...]:
        """Samples with since < at <= until: back-to-back windows never count one twice."""
        if until < since:
            raise ValueError(f"window ends at {until}, before it starts at {since}")
        return tuple(s for s in self._samples if since < s.at <= until)

    def aggregate(self, since: float, until: float) -> Aggregate:
        return aggregate(self.between(since, until), since=since, until=until)


class Windows:
    """A `RingWindow` per series key, at most `max_keys` of them.

    A new key beyond `max_keys` evicts the least recently *updated* key (queries do not
    count: a dashboard polling a dead version must not keep it alive). Asking about an
    unknown key gives an empty aggregate, never an error: no traffic is a fact to judge.
    """

    __slots__ = ("_capacity", "_max_keys", "_series", "_evicted")

    def __init__(self, *, capacity: int, max_keys: int) -> None:
        if capacity < 1:
            raise ValueError(f"window capacity {capacity} must be at least 1")
        if max_keys < 1:
            raise ValueError(f"max_keys {max_keys} must be at least 1")
        self._capacity = capacity
        self._max_keys = max_keys
        self._series: OrderedDict[SeriesKey, RingWindow] = OrderedDict()
        self._evicted = 0

    @property
    def evicted(self) -> int:
        """How many keys were evicted to stay within `max_keys`."""
        return self._evicted

    def __len__(self) -> int:
        return len(self._series)

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def keys(self) -> tuple[SeriesKey, ...]:
        """Least recently updated first."""
        return tuple(self._series)

    def append(self, key: SeriesKey, sample: Sample) -> None:
        ring = self._series.get(key)
        if ring is None:
            ring = RingWindow(self._capacity)
            ring.append(sample)
            self._series[key] = ring
            while len(self._series) > self._max_keys:
                self._series.popitem(last=False)
                self._evicted += 1
            return
        ring.append(sample)
        self._series.move_to_end(key)

    def forget(self, key: SeriesKey) -> None:
        self._series.pop(key, None)

    def series(self, key: SeriesKey) -> tuple[Sample, ...]:
        ring = self._series.get(key)
        return tuple(ring) if ring is not None else ()

    def window(self, key: SeriesKey, since: float, until: float) -> Aggregate:
        ring = self._series.get(key)
        if ring is None:
            if until < since:
                raise ValueError(f"window ends at {until}, before it starts at {since}")
            return Aggregate(since=since, until=until)
        return ring.aggregate(since, until)

    def window_many(self, keys: Iterable[SeriesKey], since: float, until: float) -> Aggregate:
        """One aggregate over concurrent series (e.g. a version in every cluster)."""
        parts = [self.window(k, since, until) for k in keys]
        return merge(parts) if parts else Aggregate(since=since, until=until)
