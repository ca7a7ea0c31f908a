"""Envoy's own request counters per (service, version, lane), read from its admin endpoint.

Owns: reading one Envoy's ``/stats`` and folding the counters of Graylane's upstream
clusters into `TrafficCounters` keyed by (service, version, lane). Graylane names a
cluster ``service|version`` for traffic outside lanes and ``service|version|lane`` for a
lane's traffic (see `graylane.xds.view.cluster_name`), so Envoy's per-cluster statistics
already count every lane apart, including lane traffic that fell back to a base version.
Other clusters (the xDS cluster, anything not ours) are ignored.

Two readings: `scrape` gives the counters (`GetTraffic`); `read` adds each cluster's
latency histogram ``upstream_rq_time`` as cumulative buckets (`ClusterStats`, one
cumulative reading per series that the metrics pipeline turns into deltas). Both use the
admin JSON (``/stats?format=json&usedonly&histogram_buckets=cumulative``). Envoy 1.40
answers ``{"stats": [{"name", "value"}..., {"histograms": [{"name", "buckets":
[{"upper_bound", "interval", "cumulative"}...]}]}]}``; histograms appear only after a
stats flush (``stats_flush_interval``, 5 s by default; the bootstraps set 1 s), so the
latency lags the counters by up to one flush.

Cluster names hold dots (versions such as ``1.2.3``, dotted lanes) and Envoy also emits
sub-scoped stats such as ``cluster.<name>.external.upstream_rq_5xx``, so a name is never
split at a dot: the clusters are those with ``cluster.<name>.upstream_rq_total`` (Envoy
emits that counter only in a cluster's own scope), and every other stat is taken only
where ``cluster.<name>.<suffix>`` matches one of them exactly.

The agent runs this for its cluster's Envoys; in single-cluster mode the control plane
runs it for the Envoys it serves, finding each admin endpoint in the node metadata
(`ADMIN_METADATA`). That address is what a proxy says of itself, so it is fetched only when
it is inside the `AdminAllowList` (`--admin-allow`; default loopback only): an IP literal in
a listed network, on the listed port if one is given. Any other address is reported
unreachable without a request, so no proxy can make Graylane fetch an address it chose (a
cloud metadata service, another tenant's Envoy) and take the answer for metrics.

Bounded: `read_all` reads at most `max_concurrency` admin endpoints at once, and an
endpoint that did not answer is not asked again until its backoff (doubling from
`backoff_s` up to `max_backoff_s`, reset by an answer) has passed; until then it is
reported unreachable without a request. A fleet of dead admins costs a few requests a
minute each, not one a tick.

Concurrency: one asyncio loop; a scraper owns one aiohttp session (keep-alive to every
admin endpoint it reads). Must not import: etcd, graylane.controlplane (except
graylane.controlplane.address, the one HOST:PORT parser).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from graylane.controlplane.address import HostPort
from graylane.xds.view import parse_cluster_name

log = logging.getLogger(__name__)

# Node metadata key holding "host:port" of the Envoy's admin endpoint (set in the bootstraps
# under deploy/envoy/).
ADMIN_METADATA = "admin_address"

TrafficKey = tuple[str, str, str]  # (service, version, lane); lane "" = outside any lane

# The counters we read, by their name after "cluster.<cluster name>.".
_REQUESTS = "upstream_rq_total"
_CLASSES = {"upstream_rq_2xx": "responses_2xx", "upstream_rq_4xx": "responses_4xx", "upstream_rq_5xx": "responses_5xx"}
# Requests that ended without an upstream response. Connect failures are not here: the
# routes retry them, so they are not lost requests.
_FAILURES = ("upstream_rq_timeout", "upstream_rq_rx_reset", "upstream_rq_pending_failure_eject")
_WANTED = (_REQUESTS, *_CLASSES, *_FAILURES)
# Server-side filter so Envoy sends only these lines (admin filters are RE2 regexes).
STATS_FILTER = r"^cluster\..*\.(" + "|".join(_WANTED) + ")$"
# The latency histogram of requests to a cluster, in ms.
_LATENCY = "upstream_rq_time"
METRICS_FILTER = r"^cluster\..*\.(" + "|".join((*_WANTED, _LATENCY)) + ")$"

# Cumulative latency buckets as Envoy reports them: (upper bound in ms, observations at or
# below it), bounds increasing; nothing above the last bound (Envoy's is one hour).
LatencyBuckets = tuple[tuple[float, int], ...]


@dataclass(frozen=True, slots=True)
class TrafficCounters:
    requests: int = 0
    responses_2xx: int = 0
    responses_4xx: int = 0
    responses_5xx: int = 0
    failures: int = 0

    def __add__(self, other: TrafficCounters) -> TrafficCounters:
        return TrafficCounters(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(TrafficCounters))
        )

    @property
    def errors(self) -> int:
        """5xx answers plus requests that ended without an answer."""
        return self.responses_5xx + self.failures


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """One read of one series (a Graylane cluster of one Envoy), cumulative since the Envoy
    started: a `graylane.controlplane.progression.windows.Scrape` without its time."""

    counters: TrafficCounters
    latency: LatencyBuckets = ()  # () until Envoy has flushed the cluster's histogram once

    @property
    def requests(self) -> int:
        return self.counters.requests

    @property
    def errors(self) -> int:
        return self.counters.errors


def _split(name: str, suffixes: Iterable[str]) -> tuple[str, str] | None:
    """(cluster, suffix) of ``cluster.<cluster>.<suffix>`` for a known suffix, else None."""
    if not name.startswith("cluster."):
        return None
    for suffix in suffixes:
        if name.endswith("." + suffix) and len(name) > len("cluster.") + len(suffix) + 1:
            return name[len("cluster.") : -len(suffix) - 1], suffix
    return None


def _fold(counters: Mapping[str, int]) -> dict[TrafficKey, TrafficCounters]:
    """Stat name -> value, to counters per Graylane cluster (see the module docstring)."""
    clusters: dict[str, TrafficKey] = {}
    for name in counters:
        split = _split(name, (_REQUESTS,))
        if split is not None and (key := parse_cluster_name(split[0])) is not None:
            clusters[split[0]] = key
    fields: dict[str, dict[str, int]] = {cluster: {} for cluster in clusters}
    for name, value in counters.items():
        split = _split(name, _WANTED)
        if split is None or split[0] not in clusters:
            continue  # a sub-scope (external., zone.x.y.) or not a Graylane cluster
        slot = fields[split[0]]
        counter = split[1]
        if counter == _REQUESTS:
            slot["requests"] = value
        elif counter in _CLASSES:
            slot[_CLASSES[counter]] = value
        else:
            slot["failures"] = slot.get("failures", 0) + value
    return {clusters[cluster]: TrafficCounters(**values) for cluster, values in fields.items()}


def parse_stats(text: str) -> dict[TrafficKey, TrafficCounters]:
    """Counters of Graylane clusters from Envoy's text ``/stats`` output."""
    counters: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.rpartition(": ")
        if sep and value.strip().isdigit():
            counters[name] = int(value)
    return _fold(counters)


def _buckets(raw: Any) -> LatencyBuckets:
    """Cumulative buckets of one histogram of the admin JSON, validated."""
    if not isinstance(raw, list):
        return ()
    out: list[tuple[float, int]] = []
    for bucket in raw:
        bound, count = bucket.get("upper_bound"), bucket.get("cumulative")
        if not isinstance(bound, int | float) or not isinstance(count, int | float):
            return ()
        if not math.isfinite(bound) or (out and (bound <= out[-1][0] or count < out[-1][1])):
            return ()  # not what Envoy sends: better no latency than a wrong one
        out.append((float(bound), int(count)))
    return tuple(out)


def parse_json_stats(document: Mapping[str, Any]) -> dict[TrafficKey, ClusterStats]:
    """Counters and latency histograms of Graylane clusters from the admin JSON
    (``/stats?format=json&histogram_buckets=cumulative``)."""
    counters: dict[str, int] = {}
    histograms: dict[str, LatencyBuckets] = {}
    for entry in document.get("stats", ()):
        if not isinstance(entry, dict):
            continue
        if "histograms" in entry:
            found = entry["histograms"]
            # A dict is the summary (quantiles) form: the request asked for buckets.
            for h in found if isinstance(found, list) else ():
                if isinstance(h, dict) and isinstance(h.get("name"), str):
                    histograms[h["name"]] = _buckets(h.get("buckets"))
            continue
        name, value = entry.get("name"), entry.get("value")
        if isinstance(name, str) and isinstance(value, int) and not isinstance(value, bool):
            counters[name] = value
    folded = _fold(counters)
    latency: dict[TrafficKey, LatencyBuckets] = {}
    for name, buckets in histograms.items():
        split = _split(name, (_LATENCY,))
        if split is None or f"cluster.{split[0]}.{_REQUESTS}" not in counters:
            continue  # a sub-scope (cluster.<name>.external.upstream_rq_time) or not ours
        if (key := parse_cluster_name(split[0])) is not None:
            latency[key] = buckets
    return {key: ClusterStats(c, latency.get(key, ())) for key, c in folded.items()}


def merge(parts: Iterable[Mapping[TrafficKey, TrafficCounters]]) -> dict[TrafficKey, TrafficCounters]:
    """Sum the counters of several proxies."""
    total: dict[TrafficKey, TrafficCounters] = {}
    for part in parts:
        for key, counters in part.items():
            total[key] = total.get(key, TrafficCounters()) + counters
    return total


class StatsUnavailable(Exception):
    """An Envoy's admin endpoint did not answer (in time, or with 200)."""


class AdminNotAllowed(StatsUnavailable):
    """An admin address outside the allow-list: it was not fetched."""


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class AdminAllowList:
    """Where admin endpoints may be fetched: (network, port or None for any port) pairs."""

    entries: tuple[tuple[IpNetwork, int | None], ...]

    @classmethod
    def parse(cls, items: Iterable[str]) -> AdminAllowList:
        """`CIDR` or `CIDR:PORT` (IPv6 with a port: `[CIDR]:PORT`); ValueError names the item."""
        return cls(tuple(_allow_entry(item) for item in items))

    def allows(self, admin: str) -> bool:
        """Whether `admin` ("ip:port" or "[ipv6]:port") is inside a listed network and port.
        A host name is never allowed: what it resolves to is not ours to decide."""
        try:
            target = HostPort.parse(admin)
            address = ipaddress.ip_address(target.host)
        except ValueError:
            return False
        return any(address in net and (allowed is None or allowed == target.port) for net, allowed in self.entries)

    def __str__(self) -> str:
        return ", ".join(str(net) if port is None else f"{net}:{port}" for net, port in self.entries) or "nothing"


def _allow_entry(item: str) -> tuple[IpNetwork, int | None]:
    text = item.strip()
    port: int | None = None
    if text.startswith("["):
        text, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{item!r}: expected [IPv6 CIDR]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        text, _, port_text = text.partition(":")
    else:
        port_text = ""
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{item!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    try:
        return ipaddress.ip_network(text, strict=False), port
    except ValueError:
        raise ValueError(f"{item!r}: expected CIDR[:PORT], e.g. 10.0.0.0/8:15000 or 127.0.0.1") from None


#: The default: Envoys on this host only (their admin listens on loopback in the bootstraps).
LOOPBACK_ONLY = AdminAllowList.parse(("127.0.0.0/8", "::1/128"))


_REFUSED_LOGGED = 1_000  # refused addresses remembered, so each is logged once (bounded)


class EnvoyStatsScraper:
    """Reads Graylane's per-cluster counters from Envoy admin endpoints.

    ``async with EnvoyStatsScraper() as scraper: await scraper.scrape("127.0.0.1:9901")``
    """

    def __init__(
        self,
        *,
        timeout: float = 2.0,
        max_concurrency: int = 32,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        admin_allow: AdminAllowList = LOOPBACK_ONLY,
    ) -> None:
        self._timeout = timeout
        self.admin_allow = admin_allow
        self._refused: set[str] = set()  # addresses refused and logged (bounded below)
        self._session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(max_concurrency)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._failing: dict[str, tuple[int, float]] = {}  # admin -> (failures in a row, retry at)

    def backing_off(self, admin: str) -> bool:
        """Whether `admin` failed lately and is not to be asked before its retry time."""
        failing = self._failing.get(admin)
        return failing is not None and self._clock() < failing[1]

    def _failed(self, admin: str) -> None:
        failures = self._failing.get(admin, (0, 0.0))[0] + 1
        delay = min(self._backoff_s * 2 ** (failures - 1), self._max_backoff_s)
        self._failing[admin] = (failures, self._clock() + delay)

    async def __aenter__(self) -> EnvoyStatsScraper:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def read(self, admin: str, *, latency: bool = True) -> dict[TrafficKey, ClusterStats]:
        """Counters (and, with `latency`, histograms) of the Envoy at `admin` ("host:port")."""
        if self._session is None:
            raise RuntimeError("use EnvoyStatsScraper as an async context manager")
        if not self.admin_allow.allows(admin):
            if admin not in self._refused:
                if len(self._refused) >= _REFUSED_LOGGED:
                    self._refused.clear()
                self._refused.add(admin)
                log.warning("not reading the admin endpoint %s: outside --admin-allow (%s)", admin, self.admin_allow)
            raise AdminNotAllowed(f"{admin}: outside the admin allow-list")
        url = f"http://{admin}/stats"
        params = {
            "format": "json",
            "usedonly": "",
            "histogram_buckets": "cumulative",
            "filter": METRICS_FILTER if latency else STATS_FILTER,
        }
        try:
            async with self._limit, self._session.get(url, params=params) as response:
                if response.status != 200:
                    raise StatsUnavailable(f"{admin}: /stats answered {response.status}")
                document = await response.json(content_type=None)
            if not isinstance(document, dict):
                raise StatsUnavailable(f"{admin}: /stats answered JSON that is not an object")
        except StatsUnavailable:
            self._failed(admin)
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failed(admin)
            raise StatsUnavailable(f"{admin}: {exc or type(exc).__name__}") from exc
        self._failing.pop(admin, None)
        return parse_json_stats(document)

    async def read_all(
        self, admins: Mapping[str, str], *, latency: bool = True
    ) -> tuple[dict[str, dict[TrafficKey, ClusterStats]], tuple[str, ...]]:
        """Per proxy (node id -> admin address) its reading, and the unreachable ones
        (those that failed now, and those still backing off from an earlier failure)."""
        unreachable: list[str] = sorted(
            n for n, a in admins.items() if self.backing_off(a) or not self.admin_allow.allows(a)
        )
        skipped = set(unreachable)
        names = sorted(n for n in admins if n not in skipped)
        for gone in self._failing.keys() - set(admins.values()):
            del self._failing[gone]
        results = await asyncio.gather(*(self.read(admins[n], latency=latency) for n in names), return_exceptions=True)
        good: dict[str, dict[TrafficKey, ClusterStats]] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, StatsUnavailable):
                unreachable.append(name)
            elif isinstance(result, BaseException):
                raise result
            else:
                good[name] = result
        return good, tuple(sorted(unreachable))

    async def scrape(self, admin: str) -> dict[TrafficKey, TrafficCounters]:
        """The counters of the Envoy whose admin endpoint is `admin` ("host:port")."""
        return {key: stats.counters for key, stats in (await self.read(admin, latency=False)).items()}

    async def scrape_all(self, admins: Mapping[str, str]) -> tuple[dict[TrafficKey, TrafficCounters], tuple[str, ...]]:
        """Summed counters of every proxy (node id -> admin address), and the unreachable ones."""
        readings, unreachable = await self.read_all(admins, latency=False)
        return merge({k: s.counters for k, s in r.items()} for r in readings.values()), unreachable
