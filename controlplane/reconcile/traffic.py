"""Request counts per (service, version, lane) for a release, from the proxies' statistics.

Owns: asking every connected proxy that states its admin endpoint (node metadata
`admin_address`) for its counters, summing them, and keeping the ones that concern one
release: its lane's traffic at every service the lane reached, and the traffic outside
any lane at those services (the baseline beside it). It reads the proxies connected to
this replica; proxies behind agents are not read (their metrics reach the control plane
through the agents' reports instead, see `controlplane.metrics`).

Nothing is stored: every call reads the proxies now, so the numbers are Envoy's own.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from graylane.agent.stats import ADMIN_METADATA, EnvoyStatsScraper, TrafficCounters, TrafficKey
from graylane.controlplane.domain import model
from graylane.xds.tracker import ProxyTracker


@dataclass(frozen=True, slots=True)
class TrafficReport:
    counts: Mapping[TrafficKey, TrafficCounters]  # (service, version, lane) -> counters
    proxies: int  # proxies whose statistics were read
    unreachable: tuple[str, ...]  # node ids whose admin endpoint did not answer


def admin_addresses(tracker: ProxyTracker) -> Mapping[str, str]:
    """node id -> admin "host:port" of every connected proxy that states one (read-only).

    Keyed by node id (stable across reconnects, so counter series stay continuous); a second
    proxy with the same node id and another admin address is keyed "<node id>@<address>".
    Computed again only when a stream opened or ended since the last call (the registry
    and the scraper ask every second and on every tracker change, and ACKs change nothing
    here).
    """
    cached = _admin_cache.get(tracker)
    if cached is not None and cached[0] == tracker.membership:
        return cached[1]
    found: dict[str, str] = {}
    for proxy in sorted(tracker.proxies().values(), key=lambda p: p.connected_at):
        address = proxy.metadata.get(ADMIN_METADATA)
        if isinstance(address, str) and address:
            name = proxy.node_id if found.get(proxy.node_id, address) == address else f"{proxy.node_id}@{address}"
            found[name] = address
    result = MappingProxyType(found)
    _admin_cache[tracker] = (tracker.membership, result)
    return result


_admin_cache: weakref.WeakKeyDictionary[ProxyTracker, tuple[int, Mapping[str, str]]] = weakref.WeakKeyDictionary()


def for_release(
    counts: Mapping[TrafficKey, TrafficCounters], spec: model.ReleaseSpec
) -> dict[TrafficKey, TrafficCounters]:
    """The counts that concern one release: its lane, and base traffic at the same services."""
    services = {s.service for s in spec.services}
    services.update(service for service, _, lane in counts if lane == spec.lane)
    return {key: c for key, c in counts.items() if key[2] in ("", spec.lane) and key[0] in services}


class TrafficReader:
    def __init__(self, tracker: ProxyTracker, scraper: EnvoyStatsScraper) -> None:
        self._tracker = tracker
        self._scraper = scraper

    async def read(self, release: model.Release) -> TrafficReport:
        admins = admin_addresses(self._tracker)
        counts, unreachable = await self._scraper.scrape_all(admins)
        return TrafficReport(
            counts=for_release(counts, release.spec),
            proxies=len(admins) - len(unreachable),
            unreachable=unreachable,
        )
