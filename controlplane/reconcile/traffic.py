"""Request counts per (service, version, lane) for a release, summed over every replica's proxies.

Owns: asking every connected proxy that states its admin endpoint (node metadata
`admin_address`) for its counters, summing them, and keeping the ones that concern one
release: its lane's traffic at every service the lane reached, and the traffic outside
any lane at those services (the baseline beside it). Proxies behind agents are not read
(their metrics reach the control plane through the agents' reports, see `controlplane.metrics`).

Across replicas: each replica reads its own proxies and publishes their summed counters
(nonzero ones) with the node ids they came from as `traffic/<identity>` under its replica
lease (`TrafficReader.publish` -> `ReplicaRegistry.set_traffic`): a dead replica's numbers expire
with its lease, a cleanly stopped one's go when it revokes it. GetTraffic answers this
replica's proxies read now plus the other live replicas' records as published (`merge_replicas`
says what is summed, so a proxy that moved between replicas counts once). With etcd out of
reach it answers this replica's numbers and says the others' are unknown.

Write rate: a record is written only when the counters or the node set changed, and at
most once per `PUBLISH_SECONDS` (2 s) per replica, whatever the number of releases: with
R replicas, at most R/2 writes per second. Its size grows with the (service, version, lane)
series that carried traffic (and by a node id per proxy): 1,000 releases of 3 services of
their own, every lane and base series busy, 100 proxies: 6,000 series, 316 KB per write
(at most ~160 KB/s per replica into etcd and to every watcher), under etcd's 1.5 MiB
request limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from graylane.agent.stats import ADMIN_METADATA, EnvoyStatsScraper, TrafficCounters, TrafficKey, merge
from graylane.controlplane.domain import model
from graylane.controlplane.errors import GraylaneError
from graylane.xds.tracker import MetadataIndex, ProxyTracker

if TYPE_CHECKING:  # the agent imports `admin_addresses` from here and must not load the etcd client
    from graylane.controlplane.store import ReplicaTraffic, TrafficStore

log = logging.getLogger(__name__)

PUBLISH_SECONDS = 2.0  # a replica's traffic record is written at most this often
_OTHERS_TIMEOUT_SECONDS = 2.0  # GetTraffic waits at most this for the other replicas' records


@dataclass(frozen=True, slots=True)
class TrafficReport:
    counts: Mapping[TrafficKey, TrafficCounters]  # (service, version, lane) -> counters
    proxies: int  # proxies whose statistics are counted (read now here, or published by another replica)
    unreachable: tuple[str, ...]  # node ids (of this replica's proxies) whose admin endpoint did not answer
    replicas: int = 1  # replicas whose proxies are counted, this one included
    oldest_seconds: float | None = None  # age of the oldest record of another replica counted; None: all read now
    note: str = ""  # what the numbers leave out (the other replicas unknown, a record set aside)


def admin_addresses(tracker: ProxyTracker) -> Mapping[str, str]:
    """node id -> admin "host:port" of every connected proxy that states one (read-only).

    Keyed by node id (stable across reconnects, so counter series stay continuous); a second
    proxy with the same node id and another admin address is keyed "<node id>@<address>".
    The same mapping object while no stream that states an address opened or ended (the
    registry and the scraper ask every second and on every tracker change, and ACKs change
    nothing here); else a new one, in which only the node ids whose streams came or went were
    worked out again (`_AdminNames`).
    """
    names = _admin_names.get(tracker)
    if names is None:
        names = _admin_names[tracker] = _AdminNames(tracker.metadata_index(ADMIN_METADATA))
    return names.current(tracker.membership)


class _AdminNames:
    """`admin_addresses` of one tracker, kept from call to call and updated per node id from
    the tracker's index of the streams' admin addresses: rebuilt whole over every connection,
    as it once was, it cost 10-30 ms of the loop per call at 10,000 streams, and a connecting
    fleet changes the membership on every loop pass. Per node id the rule is the same as
    over the whole list: its oldest stream's address under the plain node id, another address
    of its under "<node id>@<address>"."""

    def __init__(self, index: MetadataIndex) -> None:
        self._index = index
        self._found: dict[str, str] = {}  # name -> address
        self._names: dict[str, tuple[str, ...]] = {}  # node id -> its names in `_found`
        self._owner: dict[str, str] = {}  # name -> the node id that set it last
        self._membership = -1
        self._result: Mapping[str, str] = MappingProxyType({})

    def current(self, membership: int) -> Mapping[str, str]:
        if membership == self._membership:
            return self._result
        self._membership = membership
        changed = self._index.take_changed()
        if not changed:
            return self._result
        found, owner = self._found, self._owner
        for node_id in changed:
            for name in self._names.pop(node_id, ()):
                if owner.get(name) == node_id:  # a name another node id took over stays its own
                    del found[name], owner[name]
            addresses = self._index.values(node_id)
            if not addresses:
                continue
            mine: dict[str, str] = {}
            for address in addresses:  # oldest stream first
                mine[node_id if address == addresses[0] else f"{node_id}@{address}"] = address
            found.update(mine)
            owner.update(dict.fromkeys(mine, node_id))
            self._names[node_id] = tuple(mine)
        self._result = MappingProxyType(dict(found))
        return self._result


_admin_names: weakref.WeakKeyDictionary[ProxyTracker, _AdminNames] = weakref.WeakKeyDictionary()


def for_release(
    counts: Mapping[TrafficKey, TrafficCounters], spec: model.ReleaseSpec
) -> dict[TrafficKey, TrafficCounters]:
    """The counts that concern one release: its lane, and base traffic at the same services."""
    services = {s.service for s in spec.services}
    services.update(service for service, _, lane in counts if lane == spec.lane)
    return {key: c for key, c in counts.items() if key[2] in ("", spec.lane) and key[0] in services}


def _as_counters(values: tuple[int, ...]) -> TrafficCounters:
    return TrafficCounters(*values[: len(dataclasses.fields(TrafficCounters))])


def _minus(a: TrafficCounters, b: TrafficCounters) -> TrafficCounters:
    return TrafficCounters(
        *(max(0, getattr(a, f.name) - getattr(b, f.name)) for f in dataclasses.fields(TrafficCounters))
    )


@dataclass(frozen=True, slots=True)
class MergedTraffic:
    counts: dict[TrafficKey, TrafficCounters]
    proxies: int
    replicas: int
    oldest_at: float | None  # wall time of the oldest other record counted
    set_aside: tuple[str, ...]  # replicas whose record was left out (see `merge_replicas`)


def merge_replicas(
    own: Mapping[str, Mapping[TrafficKey, TrafficCounters]],
    own_nodes: frozenset[str],
    others: Mapping[str, ReplicaTraffic],
) -> MergedTraffic:
    """What GetTraffic sums. Counters are cumulative per proxy (an Envoy keeps them across a
    reconnect to another replica), so the sum is: for every proxy, its counters once.

    - this replica's proxies as read now (`own`: node id -> counters; `own_nodes`: every
      proxy connected here, read or not);
    - each other replica's record, newest first (by etcd revision), minus the counters read
      now of any proxy it names that is connected here (it moved here since that record was
      written; subtracting its current counters, clamped at 0, may undercount by what it
      served between the record and now, never count it twice);
    - a record naming a proxy that a newer record of another replica names too is set aside
      whole (its per-proxy split is not published): that replica republishes within
      `PUBLISH_SECONDS` of the move if it is alive, and its record expires with its lease if not.
    """
    counts = merge(own.values())
    claimed = set(own_nodes)
    proxies = len(own)
    replicas = 1
    oldest: float | None = None
    set_aside: list[str] = []
    for identity, record in sorted(others.items(), key=lambda kv: -kv[1].revision):
        moved_here = record.nodes & own.keys()  # connected and read here now
        if record.nodes & (claimed - own_nodes):
            set_aside.append(identity)
            claimed |= record.nodes
            continue
        part = {key: _as_counters(values) for key, values in record.counts.items()}
        for node in moved_here:
            for key, now in own.get(node, {}).items():
                if key in part:
                    part[key] = _minus(part[key], now)
        for key, c in part.items():
            counts[key] = counts.get(key, TrafficCounters()) + c
        claimed |= record.nodes
        proxies += len(record.nodes - moved_here)
        replicas += 1
        oldest = record.at if oldest is None else min(oldest, record.at)
    return MergedTraffic(counts, proxies, replicas, oldest, tuple(sorted(set_aside)))


@dataclass(eq=False)
class TrafficReader:
    """Reads this replica's proxies now and, with a `store`, adds the other replicas' records;
    `publish()` (a background loop) hands this replica's counters, the node ids they come
    from and the wall time they were read to `publish_to`."""

    tracker: ProxyTracker
    scraper: EnvoyStatsScraper
    _: KW_ONLY
    store: TrafficStore | None = None
    identity: str = ""
    publish_to: Callable[[Mapping[TrafficKey, tuple[int, ...]], frozenset[str], float], None] | None = None
    # The release as this replica follows it, for GetTraffic while etcd is out of reach.
    followed: Callable[[str], model.Release | None] = lambda name: None
    publish_seconds: float = PUBLISH_SECONDS

    async def _read_own(self) -> tuple[dict[str, dict[TrafficKey, TrafficCounters]], frozenset[str], tuple[str, ...]]:
        admins = admin_addresses(self.tracker)
        readings, unreachable = await self.scraper.read_all(admins, latency=False)
        own = {node: {key: s.counters for key, s in r.items()} for node, r in readings.items()}
        return own, frozenset(admins), unreachable

    async def read(self, release: model.Release) -> TrafficReport:
        own, own_nodes, unreachable = await self._read_own()
        others: dict[str, ReplicaTraffic] = {}
        note = ""
        if self.store is not None:
            try:
                async with asyncio.timeout(_OTHERS_TIMEOUT_SECONDS):
                    others = await self.store.replica_traffic()
            except (GraylaneError, TimeoutError) as exc:
                note = f"other replicas' numbers unknown (etcd: {exc or 'no answer in time'}); this replica's only"
            others.pop(self.identity, None)  # this replica's own numbers are read now
        merged = merge_replicas(own, own_nodes, others)
        if merged.set_aside:
            note = (
                "left out, their proxies are now counted by another replica (republished within "
                f"{self.publish_seconds:.0f} s): " + ", ".join(merged.set_aside)
            )
        return TrafficReport(
            counts=for_release(merged.counts, release.spec),
            proxies=merged.proxies,
            unreachable=unreachable,
            replicas=merged.replicas,
            oldest_seconds=None if merged.oldest_at is None else max(0.0, time.time() - merged.oldest_at),
            note=note,
        )

    async def publish(self) -> None:
        """Every `publish_seconds`, read this replica's proxies and hand their summed nonzero
        counters over when they or the set of proxies changed (see the module docstring)."""
        if self.publish_to is None:
            return
        last: tuple[object, frozenset[str]] | None = None
        while True:
            try:
                own, _, _ = await self._read_own()
                counts = {
                    key: dataclasses.astuple(c) for key, c in merge(own.values()).items() if c != TrafficCounters()
                }
                nodes = frozenset(own)
                if last != (counts, nodes):
                    self.publish_to(counts, nodes, time.time())
                    last = (counts, nodes)
            except Exception:  # a proxy's odd answer must not stop the publishing
                log.exception("cannot read this replica's proxies for the traffic record; retrying")
            await asyncio.sleep(self.publish_seconds)
