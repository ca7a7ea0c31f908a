"""The control plane's replicas in etcd: their proxies, what each counts, and the leader.

Keys (below the prefix):
    replicas/<identity>                  {node id: admin address} of the proxies on that replica, under its lease
    progress/<identity>                  {release: [lane fingerprint, proxies, converged(, scoped out)]} as that replica
                                         counts its own proxies and its agents', under its lease
    traffic/<identity>                   {"at": unix time, "nodes": [node id], "counts": {"service|version|lane":
                                         [requests, 2xx, 4xx, 5xx, failures]}}: the summed counters of the
                                         proxies on that replica (nonzero ones), under its lease
    leader                               identity of the replica that advances releases, under its lease

Must not import: graylane.xds.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from etcd3.etcdrpc import rpc_pb2
from graylane.controlplane.store._client import EtcdClient, LeaseHolder


@dataclass(frozen=True, slots=True)
class ReplicaProgress:
    """How many of one replica's proxies carry a release's lane, and which lane it counted
    against (a fingerprint: counts made against another value of the lane are stale)."""

    lane: str
    proxies: int
    converged: int
    # Proxies whose scope holds none of the release's services (left out of `proxies`);
    # written only when some are, so replicas that predate it read every other count.
    scoped_out: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaFleet:
    """Which proxies one replica counts, enough to recognise them once they reconnect
    elsewhere: its agents' proxies as a count per cluster, and the node ids of its own
    streams. `left`: the replica stopped on purpose (its proxies are reconnecting)."""

    clusters: Mapping[str, int] = field(default_factory=dict)
    nodes: frozenset[str] = frozenset()
    left: bool = False


TrafficCounts = Mapping[tuple[str, str, str], tuple[int, ...]]  # (service, version, lane) -> counters


@dataclass(frozen=True, slots=True)
class ReplicaTraffic:
    """One replica's proxies' request counters summed, and which proxies (node ids) they are,
    so a reader can tell a proxy counted in two records (it moved between replicas).
    `at`: the writer's wall clock when it read them (for the age shown to users only);
    `revision`: the etcd revision of the record (set when read), which orders records."""

    counts: TrafficCounts
    nodes: frozenset[str]
    at: float
    revision: int = 0


class ReplicaStore(LeaseHolder, Protocol):
    """What a replica publishes of itself, under its lease."""

    async def put_replica_proxies(self, identity: str, proxies: Mapping[str, str], lease: int) -> None: ...

    async def put_replica_progress(
        self, identity: str, progress: Mapping[str, ReplicaProgress], lease: int, *, fleet: ReplicaFleet | None = None
    ) -> None: ...

    async def put_replica_traffic(self, identity: str, traffic: ReplicaTraffic, lease: int) -> None: ...


class TrafficStore(Protocol):
    """What GetTraffic reads of the other replicas."""

    async def replica_traffic(self) -> dict[str, ReplicaTraffic]: ...


class LeaderStore(LeaseHolder, Protocol):
    """What the leader election uses."""

    async def campaign(self, identity: str, lease: int) -> str: ...

    async def leader(self) -> str | None: ...


class _KeptMapJson:
    """The JSON text of one string map (node id -> admin address), exactly as
    `json.dumps(dict(sorted(items)))` writes it, kept between writes: each entry is encoded
    once and kept with the sorted key order, so a write encodes only the entries that changed
    and joins the kept ones. While a fleet connects the map only grows, a few ids per write,
    and the whole encode (10,000 entries: ~15 ms) was one loop step per write; this is a join
    (~3-5 ms). The map is compared entry by entry each time: it may have changed in place."""

    # More new keys than this in one write: sort all keys again instead of inserting each.
    _INSERT_LIMIT = 256

    def __init__(self) -> None:
        self._text = "{}"
        self._values: dict[str, str] = {}  # key -> value
        self._fragments: dict[str, str] = {}  # key -> its encoded entry
        self._order: list[str] = []  # the keys, sorted

    def encode(self, entries: Mapping[str, str]) -> str:
        values = self._values
        fragments = self._fragments
        changed = [(k, v) for k, v in entries.items() if values.get(k, None) != v]
        gone = values.keys() - entries.keys()
        if gone:
            for key in gone:
                del values[key], fragments[key]
            self._order = [k for k in self._order if k not in gone]
        added = [k for k, _ in changed if k not in values]
        for key, value in changed:
            values[key] = value
            fragments[key] = f"{json.dumps(key)}: {json.dumps(value)}"
        if len(added) > self._INSERT_LIMIT:
            self._order = sorted(values)
        else:
            for key in added:
                bisect.insort(self._order, key)
        if changed or gone:
            self._text = "{" + ", ".join([fragments[k] for k in self._order]) + "}"
        return self._text


class _KeptSetJson:
    """The JSON text of one set of strings (node ids), exactly as `json.dumps(sorted(items))`
    writes it, kept between writes: the sorted ids and their encoded forms are kept side by
    side, so a write works out which ids came and went (set differences, in C), places each
    (a bisection) and joins the kept forms. While a fleet connects, every progress record
    carries a node set a few ids larger than the last one: sorting and encoding the whole set
    each time (10,000 ids: 4-10 ms, 1,300 of the loop's samples in a connect) becomes ~1 ms.
    The last set is also kept by identity: the same set object encodes to the same text."""

    # More ids come or go than this in one write: sort and encode all of them again instead.
    _PLACE_LIMIT = 256

    def __init__(self) -> None:
        self._set: frozenset[str] = frozenset()
        self._order: list[str] = []  # the ids, sorted
        self._encoded: list[str] = []  # each id's JSON string, in the same order
        self._text = "[]"

    def encode(self, items: frozenset[str]) -> str:
        if items is self._set:
            return self._text
        added = items - self._set
        # The ids gone only when some are (len(old) + len(added) - len(new) of them): a
        # connecting fleet only adds, and each difference is a pass over every id.
        gone = self._set - items if len(self._set) + len(added) > len(items) else frozenset()
        if len(added) + len(gone) > self._PLACE_LIMIT:
            self._order = sorted(items)
            self._encoded = [json.dumps(i) for i in self._order]
        elif added or gone:
            order, encoded = self._order, self._encoded
            for item in gone:
                at = bisect.bisect_left(order, item)
                del order[at], encoded[at]
            for item in added:
                at = bisect.bisect_left(order, item)
                order.insert(at, item)
                encoded.insert(at, json.dumps(item))
        self._set = items
        self._text = "[" + ", ".join(self._encoded) + "]"
        return self._text


# Per replica identity (a process normally publishes one; tests run several), the kept
# encodings of its proxy map and of its progress record's node set; a few kept, the least
# recently used dropped.
_KEPT_IDENTITIES = 4
_proxy_maps: dict[str, _KeptMapJson] = {}
_node_sets: dict[str, _KeptSetJson] = {}
_K = TypeVar("_K", _KeptMapJson, _KeptSetJson)


def _kept(kept: dict[str, _K], identity: str, make: Callable[[], _K]) -> _K:
    found = kept.pop(identity, None)
    if found is None:
        found = make()
        while len(kept) >= _KEPT_IDENTITIES:
            del kept[next(iter(kept))]
    kept[identity] = found  # most recently used last
    return found


def _proxy_map(identity: str) -> _KeptMapJson:
    return _kept(_proxy_maps, identity, _KeptMapJson)


def _node_set(identity: str) -> _KeptSetJson:
    return _kept(_node_sets, identity, _KeptSetJson)


class ReplicaRecords(EtcdClient):
    """Replicas' proxies and progress, and the leader key."""

    async def put_replica_proxies(self, identity: str, proxies: Mapping[str, str], lease: int) -> None:
        """The proxies connected to one replica (node id -> admin address), under its lease."""
        # The same text as json.dumps(dict(sorted(proxies.items()))), encoded incrementally.
        value = _proxy_map(identity).encode(proxies).encode()
        await self._txn([], [self._put(self._key("replicas", identity), value, lease=lease)])

    async def put_replica_progress(
        self, identity: str, progress: Mapping[str, ReplicaProgress], lease: int, *, fleet: ReplicaFleet | None = None
    ) -> None:
        """What one replica counts per live release (see `ReplicaProgress`) and which proxies
        (see `ReplicaFleet`), under its lease."""
        fleet = fleet or ReplicaFleet()
        releases = {
            name: [p.lane, p.proxies, p.converged] + ([p.scoped_out] if p.scoped_out else [])
            for name, p in sorted(progress.items())
        }
        # The same text as json.dumps of the whole record (same keys, order and separators),
        # with the node list encoded incrementally (`_KeptSetJson`): it is the bulk of the
        # record, a fleet's ACKs rewrite the counts many times while the set of streams stays
        # the same, and a connecting fleet adds a few ids per write.
        value = (
            f'{{"releases": {json.dumps(releases)}, "clusters": {json.dumps(dict(sorted(fleet.clusters.items())))}, '
            f'"nodes": {_node_set(identity).encode(fleet.nodes)}, "left": {json.dumps(fleet.left)}}}'
        )
        await self._txn([], [self._put(self._key("progress", identity), value.encode(), lease=lease)])

    async def put_replica_traffic(self, identity: str, traffic: ReplicaTraffic, lease: int) -> None:
        """One replica's proxies' summed counters (see `ReplicaTraffic`), under its lease."""
        value = json.dumps(
            {
                "at": round(traffic.at, 3),
                "nodes": sorted(traffic.nodes),
                "counts": {"|".join(key): list(c) for key, c in sorted(traffic.counts.items())},
            },
            separators=(",", ":"),
        )
        await self._txn([], [self._put(self._key("traffic", identity), value.encode(), lease=lease)])

    async def replica_traffic(self) -> dict[str, ReplicaTraffic]:
        """Every live replica's published traffic record, by identity (unreadable ones skipped)."""
        prefix = self._key("traffic") + b"/"
        found: dict[str, ReplicaTraffic] = {}
        for kv in (await self._range(prefix)).kvs:
            identity = kv.key[len(prefix) :].decode()
            try:
                doc = json.loads(kv.value)
                counts: dict[tuple[str, str, str], tuple[int, ...]] = {}
                for name, values in doc["counts"].items():
                    service, version, lane = name.split("|")
                    counts[(service, version, lane)] = tuple(int(v) for v in values)
                found[identity] = ReplicaTraffic(
                    counts=counts, nodes=frozenset(doc["nodes"]), at=float(doc["at"]), revision=kv.mod_revision
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # written by another version of the record: not counted
        return found

    # ----------------------------------------------------------------- leader

    async def campaign(self, identity: str, lease: int) -> str:
        """Try to become the leader under `lease`; the leader's identity afterwards.

        One key, `leader`, created only if absent and bound to the winner's lease: it
        disappears when the leader resigns (revokes) or stops refreshing its lease.
        """
        key = self._key("leader")
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        resp = await self._txn([absent], [self._put(key, identity.encode(), lease=lease)])
        if resp.succeeded:
            return identity
        return await self.leader() or ""

    async def leader(self) -> str | None:
        current = await self._get(self._key("leader"))
        return current.value.decode() if current is not None else None
