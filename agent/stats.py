"""Envoy's own request counters per (service, version, lane), read from its admin endpoint.

Owns: reading one Envoy's ``/stats`` and folding the counters of Graylane's upstream
clusters into `TrafficCounters` keyed by (service, version, lane). Graylane names a
cluster ``service|version`` for traffic outside lanes and ``service|version|lane`` for a
lane's traffic (see `graylane.xds.view.cluster_name`), so Envoy's per-cluster statistics
already count every lane apart, including lane traffic that fell back to a base version.
Other clusters (the xDS cluster, anything not ours) are ignored.

The agent runs this for its cluster's Envoys; in single-cluster mode the control plane
runs it for the Envoys it serves, finding each admin endpoint in the node metadata
(`ADMIN_METADATA`).

Concurrency: one asyncio loop; a scraper owns one aiohttp session (keep-alive to every
admin endpoint it reads). Must not import: etcd, graylane.controlplane.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from graylane.xds.view import parse_cluster_name

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


def parse_stats(text: str) -> dict[TrafficKey, TrafficCounters]:
    """Counters of Graylane clusters from Envoy's text ``/stats`` output.

    Cluster names may hold dots (versions such as ``1.2.3``), so a line is split at its
    known counter suffix, never at the first dot.
    """
    fields: dict[TrafficKey, dict[str, int]] = {}
    for line in text.splitlines():
        name, sep, value = line.rpartition(": ")
        if not sep or not name.startswith("cluster.") or not value.strip().isdigit():
            continue
        cluster, dot, counter = name[len("cluster.") :].rpartition(".")
        if not dot or counter not in _WANTED:
            continue
        key = parse_cluster_name(cluster)
        if key is None:
            continue
        slot = fields.setdefault(key, {})
        if counter == _REQUESTS:
            slot["requests"] = int(value)
        elif counter in _CLASSES:
            slot[_CLASSES[counter]] = int(value)
        else:
            slot["failures"] = slot.get("failures", 0) + int(value)
    return {key: TrafficCounters(**values) for key, values in fields.items()}


def merge(parts: Iterable[Mapping[TrafficKey, TrafficCounters]]) -> dict[TrafficKey, TrafficCounters]:
    """Sum the counters of several proxies."""
    total: dict[TrafficKey, TrafficCounters] = {}
    for part in parts:
        for key, counters in part.items():
            total[key] = total.get(key, TrafficCounters()) + counters
    return total


class StatsUnavailable(Exception):
    """An Envoy's admin endpoint did not answer (in time, or with 200)."""


class EnvoyStatsScraper:
    """Reads Graylane's per-cluster counters from Envoy admin endpoints.

    ``async with EnvoyStatsScraper() as scraper: await scraper.scrape("127.0.0.1:9901")``
    """

    def __init__(self, *, timeout: float = 2.0) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EnvoyStatsScraper:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def scrape(self, admin: str) -> dict[TrafficKey, TrafficCounters]:
        """The counters of the Envoy whose admin endpoint is `admin` ("host:port")."""
        if self._session is None:
            raise RuntimeError("use EnvoyStatsScraper as an async context manager")
        url = f"http://{admin}/stats"
        try:
            async with self._session.get(url, params={"filter": STATS_FILTER}) as response:
                if response.status != 200:
                    raise StatsUnavailable(f"{admin}: /stats answered {response.status}")
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StatsUnavailable(f"{admin}: {exc or type(exc).__name__}") from exc
        return parse_stats(text)

    async def scrape_all(
        self, admins: Mapping[str, str]
    ) -> tuple[dict[TrafficKey, TrafficCounters], tuple[str, ...]]:
        """Summed counters of every proxy (node id -> admin address), and the unreachable ones."""
        names = sorted(admins)
        results = await asyncio.gather(*(self.scrape(admins[n]) for n in names), return_exceptions=True)
        good: list[dict[TrafficKey, TrafficCounters]] = []
        unreachable: list[str] = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, StatsUnavailable):
                unreachable.append(name)
            elif isinstance(result, BaseException):
                raise result
            else:
                good.append(result)
        return merge(good), tuple(unreachable)
