"""The ADS server: state-of-the-world and delta xDS over grpc.aio.

Owns: the two stream loops (StreamAggregatedResources, DeltaAggregatedResources), the
per-type subscription state they share (`_TypeState`), nonces, ACK/NACK detection, and
the make-before-break push: after every snapshot change and every ACK the stream re-plans
(`graylane.xds.plan.plan`) and sends, in `PUSH_ORDER`, only the types whose content for
this proxy changed. ACKs, NACKs and pushes are reported to a `ProxyTracker`.

Protocol rules kept here (Envoy's "xDS REST and gRPC protocol"):
* one nonce per response; each stream's loop owns its nonces;
* SotW: a request whose response_nonce is not the latest nonce sent for its type is stale
  and ignored; ACK vs NACK is the presence of error_detail; LDS/CDS/SRDS are wildcard (a
  resource missing from a response is removed, so each response is the whole set),
  EDS/RDS answer the requested names; a response is sent only when its version differs
  from what the proxy has. EDS/RDS responses carry only the resources that changed (see
  `_SotwStream.respond`): Envoy leaves a subscribed EDS/RDS resource that a response
  does not carry as it is, so re-sending all 10,000 route configs for one change would
  buy nothing. Their version_info is still the version of the stream's whole selection,
  so an ACKed version means "holds that whole set", as for the wildcard types;
* delta: only changed resources plus removed_resources names; subscribe / unsubscribe /
  wildcard; per-resource versions; each response is ACKed on its own, so every
  outstanding nonce is tracked (a delta response is incremental: dropping an "older" ACK
  would lose what it carried);
* proxyless gRPC clients subscribe to every type by name (LDS -> RDS -> CDS -> EDS): a
  named LDS/CDS SotW response still carries the whole subscribed selection (those types
  are whole-state: a subscribed resource left out is deleted), and such a stream is
  planned `on_demand` (`graylane.xds.plan`): its routes go once their clusters can be
  served, not once it ACKed clusters it has not been told of yet;
* the node comes from the first request of a stream (later ones may omit it);
* a proxy that reconnects presenting versions it already has (SotW version_info, delta
  initial_resource_versions), to this replica or another, is not re-sent them: versions
  are content hashes, matched against the snapshot and the cache's content history.

Cost of a change: streams in one state share one plan, one selection per subscription and
one response body per type (`_Selections`). Where the new snapshot derives from the one a
stream holds (the common case: in sync before the change), the plan (`plan_derived`), the
selections (the planned sets themselves) and the bodies (the sets' changed / removed
names) cost what changed, not what the snapshot holds. What each further stream in that
state costs is O(changes) too, but for what the protocol itself carries: a SotW request
repeats every subscribed name (keyed by its bytes: one memcmp when unchanged, and streams
with equal names share one frozenset, `_Selections.names_of`) and a SotW wildcard response
is the whole set (joined once from per-resource wire entries; each stream copies it to add
its nonce). A proxy that reconnects presenting exactly the target's sets holds them as
shared selections at once and plans with its peers.

Concurrency: one asyncio loop; one task per stream plus its request reader, both
cancelled when the stream ends. At most `SEND_SLOTS` streams push at once (`_SendSlots`):
the process's gRPC calls share one completion queue, and an unbounded fan-out would queue
every stream's write and ACK ahead of the API's calls. However a stream ends (the client cancels or vanishes,
grpc cancels the handler, the server closes, bad node metadata), `_Stream.stop()` releases
it synchronously, exactly once, before anything can suspend: the tracker and the cache
never keep a stream that is gone. Must not import: etcd, graylane.controlplane,
graylane.agent.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message
from graylane.xds.cache import PROXYLESS_KEY, InvalidNodeMetadata, SnapshotCache, Watch
from graylane.xds.plan import Plan, plan, plan_derived, plan_wanted
from graylane.xds.resources import (
    CLUSTER,
    LISTENER,
    PUSH_ORDER,
    SCOPED_ROUTE,
    Resources,
    TypedResources,
    content_version,
    delta_body,
    entry,
    set_version,
    sotw_body,
)
from graylane.xds.scope import ScopedSnapshotCache, parse_scoped_key, scoped_key
from graylane.xds.tracker import DELTA, SOTW, Nack, ProxyTracker, Push, TypeAck, new_stream_id, now

log = logging.getLogger(__name__)

# Envoy subscribes to listeners, clusters and scopes (SRDS) as wildcards and drops any of
# them that a SotW response leaves out.
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER, SCOPED_ROUTE})
WILDCARD = "*"
WILDCARD_KEY = ("*",)  # the subscription key of a wildcard subscription
_NO_NAMES: frozenset[str] = frozenset()

# gRPC server options for the xDS port. A fleet reconnecting at once (a replica restarted)
# opens thousands of streams in a second; C-core cancels calls the application has not
# picked up yet beyond `max_pending_requests` (default 1,000, probabilistically up to the
# hard limit of 3,000), which the proxies see as CANCELLED / INTERNAL and retry, making
# the storm worse. The loop picks every call up within a few ms once it runs, so queueing
# them is the cheaper answer.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
    # ...and cancels a call still not picked up after 30 s (the CANCELLED ends seen at
    # 10,000 streams once the pending limit was raised): a proxy is better served waiting.
    ("grpc.server_max_unrequested_time_in_server", 600),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)

# At most this many streams push at once (`_SendSlots`): enough to keep gRPC's writer
# busy, few enough that another call's events queue behind little. A change keeps the loop
# busy from start to end either way; the bound sets how many streams' writes, ACKs and
# next pushes land in one loop pass, and so how long each of an API call's 4-5 trips
# through the loop waits. Measured at 10,000 streams (`GRAYLANE_BENCH_SEND_SLOTS=N
# bench/run.py --scale`, shared machine): the API's GetRelease during the changes p99
# 3.3-4.1 s unbounded, 400-670 ms with 256, 185-281 ms with 64; alternated runs on
# 2026-12-02 (load 2-7): 64 (4 runs) API p50 43-63 / p99 136-206 ms, change p99
# 3.2-3.9 s, 3.6-4.1 s of CPU per change, the loop's longest pass 31-44 ms of its CPU;
# 16 (3 runs) 18-22 / 82-107 ms, 2.6-3.1 s, 3.0-3.5 s, 17-29 ms; 32 and 8 in between
# and beside (8: API p99 69 ms, change p99 3.3 s, one run).
SEND_SLOTS = 16
SEND_SLOT_HOLD = 1.0  # seconds a stuck write may hold a slot

Req = TypeVar("Req", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
Resp = TypeVar("Resp", discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)


class ProxyRefused(Exception):
    """A proxy's credentials do not admit it: its stream ends with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Admitted:
    """A proxy a gate admits: the node to serve and record (credentials taken out of it),
    and the services it may receive (None: every service its node group is rendered)."""

    node: base_pb2.Node
    services: frozenset[str] | None = None


class ProxyGate(Protocol):
    """Decides, from a stream's first node and its peer (the call's auth context: the
    verified client certificate, if any), whether the proxy is served, and what of."""

    def admit(self, node: base_pb2.Node, *, peer: Mapping[str, Sequence[bytes]]) -> Admitted:
        """The proxy as admitted, or raise ProxyRefused."""
        ...


class _Signal(enum.Enum):
    SNAPSHOT_CHANGED = "snapshot changed"
    END_OF_STREAM = "end of stream"


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


@dataclass
class _Pending:
    """One delta response not yet ACKed or NACKed."""

    version: str
    resources: Mapping[str, Message]  # shared with other streams: read-only
    removed: tuple[str, ...]
    versions: Mapping[str, str]  # content versions of `resources` (and maybe more)
    # The diff went from `base` (what the stream was synced to) to `to`, when `base` is a
    # shared selection (see `_DeltaStream._ack_or_nack`).
    base: _Selection | None = None
    to: _Selection | None = None


@dataclass
class _TypeState:
    """What one stream knows of one resource type: subscription, sent and ACKed content."""

    type_url: str
    wildcard: bool = False
    names: AbstractSet[str] = _NO_NAMES  # one object: subscriptions change from it shared
    # SotW: the key of the resource names of the last request (`_Selections.names_of`).
    names_key: bytes = b""
    subscribed: bool = False  # a request for this type was seen on the stream
    sent: dict[str, Message] = field(default_factory=dict)  # content the proxy has or will
    sent_versions: dict[str, str] = field(default_factory=dict)  # includes unresolved ones
    acked: dict[str, Message] = field(default_factory=dict)
    acked_versions: dict[str, str] = field(default_factory=dict)  # content versions of `acked`
    acked_version: str = ""
    # SotW: version_info of the latest response (or the one the proxy presented).
    sotw_version: str = ""
    latest_nonce: str = ""
    # delta: every outstanding response by nonce.
    pending: dict[str, _Pending] = field(default_factory=dict)

    # The subscription as a hashable value (WILDCARD or the frozen names): streams with
    # equal subscriptions share one selection per planned snapshot (`_Selections`).
    subscription: object = WILDCARD_KEY
    # delta: the shared selection `sent_versions` equals exactly, if any (diffs are shared).
    synced: _Selection | None = None
    # The shared selections whose content `sent` / `acked` hold exactly, if any: streams in
    # the same state share one plan, keyed by these identities (`_Plans`).
    sent_selection: _Selection | None = None
    acked_selection: _Selection | None = None

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def select(self, items: Mapping[str, Message]) -> dict[str, Message]:
        return {n: m for n, m in sorted(items.items()) if self.wants(n)}

    def subscribe(self, *, wildcard: bool, names: AbstractSet[str], grows: bool = False) -> None:
        """Set the subscription; forget what the proxy no longer wants (only on a change).

        `names` is kept as given (never mutated; streams share one frozenset per distinct
        subscription, see `_Selections`). A change that drops nothing the stream holds keeps
        its content, and the delta selection it is synced to: its sent content did not
        change. `grows`: the caller knows the new names contain the current named
        subscription's; nothing is then checked, since everything a stream with a named
        subscription holds is wanted (every path that adds content adds wanted names, and
        every narrowing goes through here).
        """
        subscription: object = WILDCARD_KEY if wildcard else frozenset(names)
        self.wildcard = wildcard
        self.names = names
        if subscription == self.subscription:
            return
        grows = grows and isinstance(self.subscription, frozenset)
        self.subscription = subscription
        if wildcard or grows:
            return
        wanted: frozenset[str] = subscription  # type: ignore[assignment]
        # Copy on write: `sent` / `acked` may be mappings shared with other streams. The
        # keys of `sent` are among those of `sent_versions` (and `acked` has those of
        # `acked_versions`), so each pair is checked at C speed by its versions.
        if not wanted.issuperset(self.sent_versions):
            self.sent = {n: m for n, m in self.sent.items() if n in wanted}
            self.sent_versions = {n: v for n, v in self.sent_versions.items() if n in wanted}
            self.sent_selection = None
            self.synced = None
        if not wanted.issuperset(self.acked_versions):
            self.acked = {n: m for n, m in self.acked.items() if n in wanted}
            self.acked_versions = {n: v for n, v in self.acked_versions.items() if n in wanted}
            self.acked_selection = None

    def shareable(self) -> bool:
        """Whether `sent` and `acked` are each empty or exactly a shared selection."""
        return (self.acked_selection is not None or not self.acked) and (
            self.sent_selection is not None or not self.sent
        )


@dataclass(eq=False)
class _Selection:
    """What one planned snapshot holds of one type for one subscription (shared, read-only).

    Streams with equal subscriptions planned over the same Plan share it: the selection,
    its versions and set version are computed once, and a SotW response body is
    serialised once, each stream adding only its nonce.
    """

    type_url: str
    items: dict[str, Message]  # never mutated: streams hold it as their `sent` / `acked`
    versions: dict[str, str]
    version: str  # SotW version_info of the set (and the delta system_version_info)
    blocked: bool
    remembered: bool = False  # its set is in the cache's content history
    _sotw_body: bytes | None = None
    # The tracker's record of an ACK of exactly this selection at `version`: one frozen value
    # shared by every stream that ACKs it (a change to 10,000 streams made 20,000 objects).
    _ack: TypeAck | None = None
    # The selection as a set: the planned set itself where the selection is all of it (a
    # wildcard, or names equal to the planned ones), or that set less a few names; `items`
    # / `versions` are its own, and a selection whose set derives from another's differs
    # from it by `typed.changed` / `typed.removed`.
    typed: TypedResources | None = None

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(self.items)

    def sotw_body(self) -> bytes:
        """The DiscoveryResponse without its nonce, built once from the resources' entries
        (a join at C speed where the selection is a whole set: its entries are kept)."""
        if self._sotw_body is None:
            typed = self.typed
            if typed is not None and typed.shared_items() is self.items:
                entries: Iterable[bytes] = typed.entries().values()
            else:
                entries = [entry(m) for m in self.items.values()]
            self._sotw_body = sotw_body(self.version, self.type_url, entries)
        return self._sotw_body


@dataclass(eq=False)
class _Diff:
    """A delta response body from one shared selection to the next (shared, read-only)."""

    changed: dict[str, Message]
    removed: tuple[str, ...]
    body: bytes  # DeltaDiscoveryResponse without its nonce

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(self.changed)


_SELECTIONS_LIMIT = 1024
_PLANS_LIMIT = 256
_DIFFS_LIMIT = 1024
_NamesChange = tuple[int, frozenset[str], frozenset[str]]  # (id of the names, added, removed)
_INTERNED_LIMIT = 64  # distinct lists of names a fleet sends at once: a few
_NAMES_KEYED = 64  # shorter lists of names are cheaper to read than to key


class _Plans:
    """Plans by (target snapshot, per type the shared selections ACKed and sent); LRU.

    A fleet holds a few distinct states, and every stream in one state shares its plan:
    finding it costs a tuple of a few identities, not a walk over every held resource.
    Entries hold the objects they are keyed by, so an id is never reused while its entry
    lives.
    """

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple[object, ...], tuple[Plan, tuple[object, ...]]] = OrderedDict()

    def get(self, target: Resources, types: Mapping[str, _TypeState], *, on_demand: bool = False) -> Plan:
        """The plan of a stream subscribed as `types` say; `on_demand`: it asks for clusters
        by name (`graylane.xds.plan`)."""
        if on_demand:
            # Planned over what the stream asks for, whatever it holds: O(its subscription).
            wanted = {t: None if st.wildcard else st.names for t, st in types.items() if st.subscribed}
            acked = {t: s.acked for t, s in types.items()}
            sent = {t: s.sent for t, s in types.items()}
            return plan_wanted(target, acked=acked, sent=sent, wanted=wanted)
        # Every stream looks its plan up on every change: the key is built in one pass, and
        # what the entry holds only on a miss.
        key: list[object] = [id(target)]
        for type_url in PUSH_ORDER:
            st = types.get(type_url)
            if st is None:
                continue
            if not st.shareable():  # this stream holds content no shared selection names
                acked = {t: s.acked for t, s in types.items()}
                sent = {t: s.sent for t, s in types.items()}
                return plan(target, acked=acked, sent=sent)
            key += (type_url, id(st.acked_selection), id(st.sent_selection))
        frozen_key = tuple(key)
        found = self._plans.get(frozen_key)
        if found is not None and found[1][0] is target:
            self._plans.move_to_end(frozen_key)
            return found[0]
        refs: list[object] = [target]
        for type_url in PUSH_ORDER:
            if type_url in types:
                refs += (types[type_url].acked_selection, types[type_url].sent_selection)
        planned = _plan_held(target, types) or plan(
            target,
            acked={t: _items(types[t].acked_selection) for t in PUSH_ORDER if t in types},
            sent={t: _items(types[t].sent_selection) for t in PUSH_ORDER if t in types},
        )
        self._plans[frozen_key] = (planned, tuple(refs))
        while len(self._plans) > _PLANS_LIMIT:
            self._plans.popitem(last=False)
        return planned


def _plan_held(target: Resources, types: Mapping[str, _TypeState]) -> Plan | None:
    """`plan_derived` for a stream that ACKed and was sent, for every type, exactly one
    whole planned set's content (the common case: in sync with the previous target); else
    None."""
    holding: dict[str, TypedResources] = {}
    for type_url in PUSH_ORDER:
        st = types.get(type_url)
        if st is None or st.acked_selection is None or st.sent_selection is None:
            return None
        typed, sent = st.acked_selection.typed, st.sent_selection.typed
        # Two selections of one content (a re-plan that changed nothing for this type)
        # are one holding: versions are content hashes.
        if typed is None or sent is None or (typed is not sent and typed.version != sent.version):
            return None
        holding[type_url] = typed
    return plan_derived(target, holding)


def _items(selection: _Selection | None) -> Mapping[str, Message]:
    return selection.items if selection is not None else {}


class _Selections:
    """Selections by (plan, type, subscription), and delta diffs between selections; LRU.

    Entries hold the plan (or selections) they are keyed by, so an id is never reused
    while its entry lives.
    """

    def __init__(self) -> None:
        self.plans = _Plans()
        self._selections: OrderedDict[tuple[int, str, object], tuple[_Selection, Plan]] = OrderedDict()
        self._diffs: OrderedDict[tuple[int, int], tuple[_Diff, _Selection, _Selection]] = OrderedDict()
        self._partials: OrderedDict[tuple[int, int, int], tuple[_Diff, tuple[_Selection, ...]]] = OrderedDict()
        # id(subscription) -> (subscription, names_token of a set whose names it equals)
        self._names: OrderedDict[int, tuple[object, object]] = OrderedDict()
        # key of a SotW request's names -> (that key, those names), shared by the streams
        self._interned: OrderedDict[bytes, tuple[bytes, frozenset[str]]] = OrderedDict()
        self.names_keyed = _NAMES_KEYED  # from how many names `names_of` keys them
        self._held: OrderedDict[int, _Selection] = OrderedDict()  # id(set) -> `held(set)`
        self._grows: OrderedDict[tuple[int, int], tuple[object, frozenset[str], bool]] = OrderedDict()
        self._changed_names: OrderedDict[_NamesChange, tuple[frozenset[str], frozenset[str]]] = OrderedDict()

    def names_of(self, request: discovery_pb2.DiscoveryRequest, last: bytes) -> tuple[bytes, frozenset[str] | None]:
        """The key of a SotW request's resource names, and the names as a frozenset, None
        when the key equals `last` (the same names as the stream's previous request of the
        type).

        Envoy repeats every subscribed EDS / RDS name in every request (each ACK), 10,000 of
        them at fleet size: building a set from them costs ~2 ms per stream per ACK. The key
        is the request serialised less its per-request fields (version, nonce, node, error:
        the names and the type remain), at C speed; equal keys are equal lists of names.
        Streams sending the same names share one key object and one frozenset (interned), so
        the usual case, the names of the previous request, is one memcmp.
        """
        if len(request.resource_names) < self.names_keyed:
            return b"", frozenset(request.resource_names)
        version, nonce = request.version_info, request.response_nonce
        if request.HasField("node") or request.HasField("error_detail"):
            only = discovery_pb2.DiscoveryRequest()
            only.CopyFrom(request)
            only.ClearField("node")
            only.ClearField("error_detail")
            request = only
        request.version_info = ""
        request.response_nonce = ""
        try:
            key = request.SerializeToString(deterministic=True)
        finally:
            request.version_info, request.response_nonce = version, nonce
        if key == last:
            return last, None
        interned = self._interned.get(key)
        if interned is None:
            interned = (key, frozenset(request.resource_names))
            self._interned[key] = interned
            while len(self._interned) > _INTERNED_LIMIT:
                self._interned.popitem(last=False)
        else:
            self._interned.move_to_end(key)
        return interned

    def held(self, typed: TypedResources) -> _Selection:
        """The whole set `typed` as what a stream holds (one object per set, so streams
        holding it share plans)."""
        found = self._held.get(id(typed))
        if found is not None and found.typed is typed:
            self._held.move_to_end(id(typed))
            return found
        found = _Selection(
            typed.type_url, typed.shared_items(), typed.shared_versions(), typed.version, False, typed=typed
        )
        self._held[id(typed)] = found
        while len(self._held) > _SELECTIONS_LIMIT:
            self._held.popitem(last=False)
        return found

    def grows(self, old: object, new: frozenset[str]) -> bool:
        """Whether the named subscription `old` is within `new` (compared once per pair of
        interned subscriptions: a fleet in one state moves from one to the other)."""
        if not isinstance(old, frozenset) or len(old) > len(new):
            return False
        key = (id(old), id(new))
        hit = self._grows.get(key)
        if hit is not None and hit[0] is old and hit[1] is new:
            self._grows.move_to_end(key)
            return hit[2]
        value = old <= new
        self._grows[key] = (old, new, value)
        while len(self._grows) > _INTERNED_LIMIT:
            self._grows.popitem(last=False)
        return value

    def changed_names(self, old: frozenset[str], add: AbstractSet[str], remove: AbstractSet[str]) -> frozenset[str]:
        """`old` with the names of a delta request's (un)subscribe applied (unsubscribe wins),
        as one frozenset shared by the streams making the same change to the same names: in
        O(changes) for all but the first of them."""
        if old.issuperset(add) and old.isdisjoint(remove):
            return old
        key = (id(old), frozenset(add), frozenset(remove))
        hit = self._changed_names.get(key)
        if hit is not None and hit[0] is old:
            self._changed_names.move_to_end(key)
            return hit[1]
        new = (old | add) - remove
        self._changed_names[key] = (old, new)
        while len(self._changed_names) > _INTERNED_LIMIT:
            self._changed_names.popitem(last=False)
        return new

    def _whole(self, subscription: object, typed: TypedResources) -> bool:
        """Whether the named `subscription` is exactly `typed`'s names (compared once per
        subscription object and set of names, not once per change)."""
        hit = self._names.get(id(subscription))
        if hit is not None and hit[0] is subscription and hit[1] is typed.names_token:
            return True
        if not isinstance(subscription, frozenset) or subscription != typed.items.keys():
            return False
        self._names[id(subscription)] = (subscription, typed.names_token)
        self._names.move_to_end(id(subscription))
        while len(self._names) > _SELECTIONS_LIMIT:
            self._names.popitem(last=False)
        return True

    def get(self, planned: Plan, st: _TypeState) -> _Selection:
        key = (id(planned), st.type_url, st.subscription)
        hit = self._selections.get(key)
        if hit is not None and hit[1] is planned:
            self._selections.move_to_end(key)
            return hit[0]
        typed = planned.resources[st.type_url]
        if st.wildcard or self._whole(st.subscription, typed):
            # All of the planned set: no copy, no walk (its version is already known).
            blocked = any(t == st.type_url and n not in typed.items and st.wants(n) for t, n in planned.held)
            selection = _Selection(
                st.type_url, typed.shared_items(), typed.shared_versions(), typed.version, blocked, typed=typed
            )
        else:
            blocked = any(t == st.type_url and st.wants(n) and n not in typed.items for t, n in planned.held)
            drop = typed.items.keys() - st.names
            if len(drop) <= len(st.names):
                # Most of the set (a subscription catching up with new names): the set less
                # what is not wanted, its version in O(dropped).
                part = typed.replaced({}, drop)
                selection = _Selection(
                    st.type_url, part.shared_items(), part.shared_versions(), part.version, blocked, typed=part
                )
            else:
                items = st.select(typed.items)
                known = typed.versions
                versions = {name: known[name] for name in items}
                selection = _Selection(st.type_url, items, versions, set_version(versions), blocked)
        self._selections[key] = (selection, planned)
        while len(self._selections) > _SELECTIONS_LIMIT:
            self._selections.popitem(last=False)
        return selection

    def diff(self, old: _Selection, new: _Selection) -> _Diff:
        key = (id(old), id(new))
        hit = self._diffs.get(key)
        if hit is not None and hit[1] is old and hit[2] is new:
            self._diffs.move_to_end(key)
            return hit[0]
        found = _derived_diff(old, new, delta=True) or _make_diff(new, old.versions)
        self._diffs[key] = (found, old, new)
        while len(self._diffs) > _DIFFS_LIMIT:
            self._diffs.popitem(last=False)
        return found

    def sotw_partial(self, acked: _Selection, sent: _Selection, new: _Selection) -> _Diff:
        """The SotW EDS/RDS response from a stream that ACKed `acked` and was sent `sent`
        to `new` (shared by every stream in that state; `removed` is always empty)."""
        key = (id(acked), id(sent), id(new))
        hit = self._partials.get(key)
        if hit is not None and hit[1][0] is acked and hit[1][1] is sent and hit[1][2] is new:
            self._partials.move_to_end(key)
            return hit[0]
        found = None
        if acked is sent or acked.version == sent.version:
            found = _derived_diff(acked, new, delta=False)
        if found is None:
            found = _make_sotw_partial(new, acked.versions, sent.versions)
        self._partials[key] = (found, (acked, sent, new))
        while len(self._partials) > _DIFFS_LIMIT:
            self._partials.popitem(last=False)
        return found


def _make_sotw_partial(new: _Selection, acked_versions: Mapping[str, str], sent_versions: Mapping[str, str]) -> _Diff:
    """A SotW response carrying every resource of `new` the proxy may not hold as it is.

    That is each resource whose version differs from the one ACKed *or* from the one last
    sent. Against `sent` alone, a resource whose response was NACKed (or will be: the
    NACK may still be on its way, and then arrives with a stale nonce) would never be
    sent again, and the ACK of a later response would claim a set the proxy rejected.
    Against `acked` alone, a resource sent since and changed back would stay at the
    version sent. With both, an ACK of this response means the proxy holds all of `new`.
    """
    changed = {
        n: m
        for n, m in new.items.items()
        if acked_versions.get(n) != new.versions[n] or sent_versions.get(n) != new.versions[n]
    }
    return _Diff(changed, (), sotw_body(new.version, new.type_url, [entry(m) for m in changed.values()]))


def _derived_diff(old: _Selection, new: _Selection, *, delta: bool) -> _Diff | None:
    """The response from `old` to `new` in O(changes) where `new`'s set derives from `old`'s
    (None otherwise): a delta response (changed and removed), or a SotW EDS/RDS one
    (changed only; `version_info` the whole selection's)."""
    if old.typed is None or new.typed is None:
        return None
    if old.typed.version == new.typed.version:
        names: list[str] = []  # one content: nothing differs
        removed: tuple[str, ...] = ()
    elif new.typed.derives_from(old.typed):
        names = sorted(new.typed.changed)
        removed = tuple(sorted(new.typed.removed))
    else:
        return None
    changed = {name: new.items[name] for name in names}
    if not delta:
        return _Diff(changed, (), sotw_body(new.version, new.type_url, [entry(m) for m in changed.values()]))
    return _delta_diff(new, changed, removed)


def _make_diff(new: _Selection, sent_versions: Mapping[str, str]) -> _Diff:
    changed = {n: m for n, m in new.items.items() if sent_versions.get(n) != new.versions[n]}
    removed = tuple(sorted(n for n in sent_versions if n not in new.items))
    return _delta_diff(new, changed, removed)


def _delta_diff(new: _Selection, changed: dict[str, Message], removed: tuple[str, ...]) -> _Diff:
    versions = new.versions
    body = delta_body(new.version, new.type_url, [(n, versions[n], entry(m)) for n, m in changed.items()], removed)
    return _Diff(changed, removed, body)


_NOTHING: dict[str, _Selection] = {}
_NO_DIFF = _Diff({}, (), b"")  # nothing differs (never sent: a stream sends no empty diff)


def _nothing(type_url: str) -> _Selection:
    """The empty selection of a type: what a new delta stream holds (its first diff is shared)."""
    if type_url not in _NOTHING:
        _NOTHING[type_url] = _Selection(type_url, {}, {}, set_version({}), blocked=False)
    return _NOTHING[type_url]


def _as_selection(type_url: str, selection: _Selection | None, items: Mapping[str, Message]) -> _Selection | None:
    """The shared selection a stream's held `items` are exactly, if any (nothing is one too)."""
    if selection is not None:
        return selection
    return None if items else _nothing(type_url)


# Field 5 (length-delimited) and a one-byte length, per length: a nonce's tag and length.
_NONCE_TAGS = tuple(b"\x2a" + bytes((n,)) for n in range(128))


def _with_nonce(body: bytes, nonce: str) -> bytes:
    """`body` (a serialised response without a nonce) with field 5, `nonce`, appended.

    Both DiscoveryResponse and DeltaDiscoveryResponse carry the nonce as field 5 (a
    string); protobuf's wire format lets fields follow in any order.
    """
    data = nonce.encode()
    return body + _NONCE_TAGS[len(data)] + data  # one-byte length: nonces are decimal counters


T = TypeVar("T")


class _Inbox(Generic[T]):
    """A stream's events in order, for its one reader: an asyncio.Queue without the running
    loop looked up on every call (asyncio.get_running_loop() makes a getpid() system call
    each time; every stream waits here twice per change, for the change and for its ACK)."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def idle(self) -> bool:
        """Whether the reader is parked on an empty inbox (nothing queued, nothing woken)."""
        return self._waiter is not None and not self._items

    def drain(self) -> list[T]:
        """Take everything queued."""
        items = list(self._items)
        self._items.clear()
        return items

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> T:
        while not self._items:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:  # cancelled while waiting
                    self._waiter = None
        return self._items.popleft()


@dataclass(frozen=True, slots=True)
class _Ready:
    """Responses to a request the reader handled itself (see `_Stream._read`), to send in order."""

    responses: list[bytes]


@dataclass(frozen=True, slots=True)
class _Granted:
    """The snapshot changed, and a send slot (`token`) is held for the push (`_Stream._on_snapshot`)."""

    token: int


@dataclass(frozen=True, slots=True)
class _Failed:
    """An error raised handling a request on the reader's task: the loop raises it."""

    error: Exception


class _SendSlots:
    """Bounds how many streams have a push in flight at once (the process's gRPC calls share
    one completion queue and one loop).

    A change wakes thousands of streams; each then hands its responses to gRPC, and gRPC
    reports every write's completion and every ACK read through one completion queue shared
    by all the process's calls, first in, first out. Unbounded, a fan-out queues ~2 events a
    stream ahead of any other call: an API call's own events then wait out the whole change
    (seconds at 10,000 streams) although the loop itself is never held long. With at most
    `slots` streams sending, what queues ahead of another call is one slot's worth.

    A change's pushes queue here without waking their streams (`reserve`): a slot is handed
    to the next stream in line as one is given back, so each stream wakes once per change,
    with its slot. A slot is held from before the first write to after the last one
    completes. A proxy that stops reading (flow control) could hold one for good: a slot
    held for `hold` seconds is given back (the write goes on; only the bound forgets it), so
    stuck proxies slow a fan-out down and never stop it.

    Concurrency: the loop's thread only; waiters are served in order.
    """

    __slots__ = ("_free", "_held", "_hold", "_loop", "_timer", "_tokens", "_waiters")

    def __init__(self, slots: int, *, hold: float) -> None:
        self._free = slots
        self._hold = hold
        # A waiter is a future (`take`) or a function handed the token (`reserve`).
        self._waiters: collections.deque[asyncio.Future[None] | Callable[[int], bool]] = collections.deque()
        self._held: dict[int, float] = {}  # token -> loop time taken, oldest first
        self._tokens = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        # Looked up once: asyncio.get_running_loop() makes a getpid() system call each time.
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def take(self) -> int:
        """Wait for a slot; the token is for `give_back`."""
        loop = self._running_loop()
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # a slot is handed over: `_free` was not given back
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._hand_on()  # handed a slot, then cancelled before using it
                raise
        return self._token(loop)

    def reserve(self, grant: Callable[[int], bool]) -> None:
        """Call `grant(token)` with a slot: now if one is free, else once one is (in order
        with `take`'s waiters). Costs a waiting stream no wake: a change queues thousands of
        streams here, and each is woken once, holding its slot (see `_Stream._on_snapshot`).
        `grant` must not raise; it returns False when it no longer wants the slot (its
        stream ended), which then goes on at once to the next waiter."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            token = self._token(self._running_loop())
            if not grant(token):
                del self._held[token]
                self._free += 1
        else:
            self._waiters.append(grant)

    def _token(self, loop: asyncio.AbstractEventLoop) -> int:
        token = next(self._tokens)
        self._held[token] = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(loop.time() + self._hold, self._expire)
        return token

    def give_back(self, token: int) -> None:
        if self._held.pop(token, None) is not None:  # else it outlived `hold`: already given back
            self._hand_on()

    def _hand_on(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_result(None)
                    return
            else:
                token = self._token(self._running_loop())
                if waiter(token):
                    return
                del self._held[token]  # its stream ended while it waited: the next one
        self._free += 1

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for token, taken in list(self._held.items()):
            if now - taken < self._hold:
                self._timer = loop.call_at(taken + self._hold, self._expire)
                return
            del self._held[token]
            self._hand_on()


class _Stream(Generic[Req, Resp]):
    """State and logic shared by the SotW and delta stream loops of one proxy."""

    protocol = ""

    def __init__(self, cache: SnapshotCache, tracker: ProxyTracker, selections: _Selections | None = None) -> None:
        self.cache = cache
        self.tracker = tracker
        self.selections = selections if selections is not None else _Selections()
        self.node = base_pb2.Node()
        self.key = ""
        self.stream_id = ""  # set by the first request: the proxy's identity in the tracker
        self.types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)
        self._watch: Watch | None = None
        self._events: _Inbox[Req | _Signal | _Ready | _Failed | _Granted] = _Inbox()
        self._snapshot_changed = False
        self._stopped = False
        # The target the last push left every subscribed type holding as it is (nothing
        # held back, nothing kept), and whether a request since may have changed what to
        # send (`_needs_push`).
        self._settled: Resources | None = None
        self._replan = True
        # Set by the server when a gate is configured: the proxy is admitted (or refused)
        # on its first request, before the tracker or the cache ever see it, so a refused
        # stream's ACKs and NACKs count for nothing.
        self.admit: Callable[[base_pb2.Node], Admitted] | None = None
        # Set by the server: the process-wide bound on streams sending at once (`_SendSlots`).
        self.send_slots: _SendSlots | None = None
        # The loop is awaiting a write (a proxy that stopped reading holds it until its flow
        # control window opens), and a slot granted meanwhile was passed on (`_granted`).
        self._writing = False
        self._ask_again = False

    # -- the loop --------------------------------------------------------------------------

    async def run(self, requests: AsyncIterator[Req], send: Callable[[bytes], Awaitable[None]]) -> None:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                event = await self._events.get()
                if event is _Signal.END_OF_STREAM or self._stopped:
                    if isinstance(event, _Granted) and self.send_slots is not None:
                        self.send_slots.give_back(event.token)
                    break
                token = -1
                try:
                    if isinstance(event, _Granted):
                        # A change's push was granted its slot before it is planned (so the
                        # fan-out's own work, not only its writes, comes a slot's worth at a
                        # time); changes arriving meanwhile fold into this push.
                        token = event.token
                        self._snapshot_changed = False
                        responses = self.push()
                    elif isinstance(event, _Signal):  # a change, without a slot bound
                        self._snapshot_changed = False
                        responses = self.push()
                    elif isinstance(event, _Ready):
                        responses = event.responses
                    elif isinstance(event, _Failed):
                        raise event.error
                    else:
                        self._start(event)
                        self.handle(event)
                        responses = self.push() if self._needs_push() else []
                    if responses and token < 0 and self.send_slots is not None:
                        token = await self.send_slots.take()
                    self._writing = True
                    for response in responses:
                        await send(response)
                finally:
                    self._writing = False
                    if token >= 0 and self.send_slots is not None:
                        self.send_slots.give_back(token)
                    if self._ask_again and not self._stopped and self.send_slots is not None:
                        # A change came while this stream was still writing: its push now.
                        self._ask_again = False
                        self.send_slots.reserve(self._granted)
        finally:
            # Release the stream before anything can suspend this task: a second
            # cancellation (the client going away while the reader is awaited) must not
            # leave a ghost proxy in the tracker or a watch in the cache.
            self.stop()
            self._give_back_granted()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[Req]) -> None:
        """Hand each request to the loop; or, while the loop is parked with nothing queued,
        handle it here, where it arrived (the loop wakes only if there is something to send).

        Every proxy ACKs every change, and the ACK usually needs no answer: handled here it
        costs no wake of the loop's task (10,000 a change at fleet size). The order is the
        loop's: a request is handled here only when the loop would handle it next and at
        once, and what it leaves to send is queued before anything that arrives after it.
        A stream's first request (the admission) always goes through the loop.
        """
        events = self._events
        try:
            async for request in requests:
                if self.stream_id and not self._stopped and events.idle():
                    try:
                        self.handle(request)
                        responses = self.push() if self._needs_push() else []
                    except Exception as exc:  # raised by the loop, as if it had handled it
                        events.put_nowait(_Failed(exc))
                        return
                    if responses:
                        events.put_nowait(_Ready(responses))
                else:
                    events.put_nowait(request)
        finally:
            events.put_nowait(_Signal.END_OF_STREAM)

    def end(self) -> None:
        """Finish the loop after whatever it is doing now (the server is closing)."""
        self._events.put_nowait(_Signal.END_OF_STREAM)

    def _on_snapshot(self) -> None:
        if not self._snapshot_changed:
            self._snapshot_changed = True
            if self.send_slots is None:
                self._events.put_nowait(_Signal.SNAPSHOT_CHANGED)
            else:
                # Woken once a slot is its own, not to wait for one (`_SendSlots.reserve`).
                self.send_slots.reserve(self._granted)

    def _granted(self, token: int) -> bool:
        if self._stopped:
            return False
        if self._writing:
            # Still writing an earlier push: a proxy that stopped reading holds that write,
            # and its slot only until `SEND_SLOT_HOLD`; it must not take another slot on
            # every change, each held for as long, out of the fan-out's few. The slot goes
            # on to the next stream now, and this one asks again once its write completes
            # (the change stays noted: later ones fold into that push).
            self._ask_again = True
            return False
        self._events.put_nowait(_Granted(token))
        return True

    def _give_back_granted(self) -> None:
        """Slots granted to this stream that its loop, now over, never used."""
        if self.send_slots is None:
            return
        for event in self._events.drain():
            if isinstance(event, _Granted):
                self.send_slots.give_back(event.token)

    def _needs_push(self) -> bool:
        """Whether a request just handled may leave something to send: not when the last
        push settled the stream on the current target and the request was a plain ACK or
        a stale one (subscriptions unchanged, nothing rejected). Every proxy ACKs every
        change; planning each ACK again costs a plan lookup and a selection per type.

        Sound because a plan that is the target itself, nothing held back and nothing kept
        for live routes (`graylane.xds.plan`), stays so as the proxy ACKs what it was sent:
        readiness only grows with ACKs, and the routes it holds become the target's."""
        return self._replan or self._settled is None or self.target() is not self._settled

    def _start(self, request: Req) -> None:
        if self.stream_id or self._stopped:
            return
        admitted = Admitted(request.node) if self.admit is None else self.admit(request.node)  # raises ProxyRefused
        self.node.CopyFrom(admitted.node)
        # A scoped proxy is served its node group's configuration cut to its services, from
        # a key of its own (shared by every proxy of that group and scope).
        self.key = scoped_key(self.cache.key_for_node(self.node), admitted.services)  # raises InvalidNodeMetadata
        if admitted.services is not None and not isinstance(self.cache, ScopedSnapshotCache):
            # A plain cache would hand the key to its owner as a node group: the whole cluster.
            message = f"node {self.node.id!r} is scoped to services and this port cannot scope"
            raise ProxyRefused(grpc.StatusCode.PERMISSION_DENIED, message)
        self.stream_id = new_stream_id(self.node.id)
        self.tracker.connected(self.node, stream=self.stream_id, key=self.key, protocol=self.protocol)
        log.info("%s stream open: %s key %s", self.protocol, self.stream_id, self.key)
        self._watch = self.cache.watch(self.key, self._on_snapshot)

    def stop(self) -> None:
        """Release the stream: its watch and its tracker entry. Synchronous and idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self.stream_id:
            self.tracker.disconnected(self.stream_id)
            log.info("%s stream closed: %s", self.protocol, self.stream_id)

    # -- shared helpers --------------------------------------------------------------------

    def state(self, type_url: str) -> _TypeState:
        if type_url not in self.types:
            self.types[type_url] = _TypeState(type_url)
        return self.types[type_url]

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    def current_plan(self) -> Plan | None:
        target = self.target()
        if target is None:
            return None
        return self._plan_for(target, on_demand=self.clusters_on_demand())

    def _plan_for(self, target: Resources, *, on_demand: bool) -> Plan:
        return self.selections.plans.get(target, self.types, on_demand=on_demand)

    def clusters_on_demand(self) -> bool:
        """Whether this client asks for clusters by name (proxyless gRPC), so cannot ACK a
        cluster before a route names it. Envoy subscribes to all clusters first; a
        proxyless client is known by its node before it asks for any cluster."""
        st = self.types.get(CLUSTER)
        if st is not None and st.subscribed:
            return not st.wildcard
        return parse_scoped_key(self.key)[0] == PROXYLESS_KEY

    def target(self) -> Resources | None:
        return self.cache.snapshot(self.key)

    def selection(self, st: _TypeState, planned: Plan) -> _Selection:
        """The planned items of `st`'s type this stream subscribes to, shared by equal subscriptions.

        `blocked` holds a type back while a wanted target resource is held with nothing to
        stand in: sending the type without it would tell the proxy to drop (SotW
        wildcard) or never get (first push) the resource; better to wait until the plan
        releases it.
        """
        return self.selections.get(planned, st)

    def _remember(self, selection: _Selection) -> None:
        if selection.typed is not None:
            self.cache.history.remember_set(selection.typed)
        else:
            self.cache.history.remember(selection.type_url, selection.items)
        selection.remembered = True

    def record_ack(
        self, st: _TypeState, version: str, versions: Mapping[str, str], selection: _Selection | None = None
    ) -> None:
        """Report the ACK; `versions` (the content versions now held) is never mutated later;
        `selection`: the shared selection they are, if any."""
        st.acked_version = version
        if selection is not None and selection.versions is versions and selection.version == version:
            ack = selection._ack
            if ack is None:
                ack = selection._ack = TypeAck(version, MappingProxyType(versions))
        else:
            ack = TypeAck(version, MappingProxyType(versions))
        self.tracker.acked(self.stream_id, st.type_url, ack)
        # DEBUG: every proxy ACKs every change (10,000 lines a change at fleet size); the
        # tracker and the push-to-ACK metric carry the same facts.
        if log.isEnabledFor(logging.DEBUG):  # the arguments cost too, on every stream's every ACK
            log.debug("ACK %s %s version %s", self.stream_id, _short(st.type_url), version)

    def record_nack(self, st: _TypeState, version: str, nonce: str, message: str, resources: Mapping[str, str]) -> None:
        """Report the NACK; `resources`: the content versions of what was rejected (kept)."""
        nack = Nack(
            st.type_url, version, nonce, message, now(), stream=self.stream_id, resources=MappingProxyType(resources)
        )
        self.tracker.nacked(self.stream_id, nack)
        log.warning("NACK %s %s version %s: %s", self.stream_id, _short(st.type_url), version, message)

    def record_push(self, st: _TypeState, push: Push) -> None:
        self.tracker.pushed(self.stream_id, push)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "push %s %s version %s nonce %s: %d resources, %d removed",
                self.stream_id,
                _short(st.type_url),
                push.version,
                push.nonce,
                len(push.resources),
                len(push.removed),
            )

    # -- per protocol ----------------------------------------------------------------------

    def handle(self, request: Req) -> None:
        raise NotImplementedError

    def push(self) -> list[bytes]:
        """The serialised responses to send now, in PUSH_ORDER."""
        self._replan = False
        self._settled = None
        target = self.target()
        if target is None:
            return []
        on_demand = self.clusters_on_demand()
        planned = self._plan_for(target, on_demand=on_demand)
        responses = []
        for type_url in PUSH_ORDER:
            st = self.types.get(type_url)
            if st is None or not st.subscribed:
                continue
            response = self.respond(st, planned)
            if response is not None:
                responses.append(response)
        if planned.resources is target and not planned.held and not on_demand:
            self._settled = target  # every subscribed type now holds (or was sent) the target's
        return responses

    def respond(self, st: _TypeState, planned: Plan) -> bytes | None:
        raise NotImplementedError


class _SotwStream(_Stream[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]):
    protocol = SOTW

    def handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        st = self.state(request.type_url)
        if request.response_nonce and request.response_nonce != st.latest_nonce:
            log.debug("stale %s nonce %s from %s", _short(st.type_url), request.response_nonce, self.node.id)
            return
        first = not st.subscribed
        st.subscribed = True
        key, names = self.selections.names_of(request, st.names_key)
        if names is not None:  # not the names of the previous request of this type
            wildcard = st.type_url in WILDCARD_TYPES and (not names or WILDCARD in names)
            if WILDCARD in names:
                names = names - {WILDCARD}
            before = st.subscription
            st.subscribe(wildcard=wildcard, names=names, grows=self.selections.grows(st.subscription, names))
            st.names_key = key
            if st.subscription is not before and st.subscription != before:
                self._replan = True
        if first:
            self._replan = True
        if request.response_nonce:
            self._ack_or_nack(st, request)
        elif first and request.version_info:
            self._adopt_presented(st, request.version_info)

    def _ack_or_nack(self, st: _TypeState, request: discovery_pb2.DiscoveryRequest) -> None:
        if request.HasField("error_detail"):
            self._replan = True
            # `sent_versions` is never mutated in place: what the rejected response made it.
            self.record_nack(
                st, st.sotw_version, request.response_nonce, request.error_detail.message, st.sent_versions
            )
            return
        # `sent` and `sent_versions` are never mutated in place (shared selections).
        st.acked = st.sent
        st.acked_versions = st.sent_versions
        st.acked_selection = st.sent_selection
        self.record_ack(st, request.version_info, st.acked_versions, st.acked_selection)

    def _adopt_presented(self, st: _TypeState, version: str) -> None:
        """A reconnecting proxy presents the version it holds: learn its content if we can."""
        st.sotw_version = version
        resolved = self._resolve_set(st, version)
        if resolved is None:
            log.info("%s presents unknown %s version %s", self.node.id, _short(st.type_url), version)
            return
        if isinstance(resolved, _Selection):
            # The whole target set (a fleet reconnecting to a restarted replica): held as a
            # shared selection, so the stream plans with its peers (`_Plans`, in O(changes))
            # instead of planning alone over everything it holds on every change.
            st.sent, st.sent_versions = resolved.items, resolved.versions
            st.sent_selection = st.acked_selection = resolved
        else:
            st.sent = dict(resolved)
            st.sent_versions = {n: content_version(m) for n, m in resolved.items()}
            st.sent_selection = st.acked_selection = None  # content resolved, not a shared selection
        st.acked = st.sent
        st.acked_versions = st.sent_versions
        self.record_ack(st, version, st.acked_versions)

    def _resolve_set(self, st: _TypeState, version: str) -> _Selection | Mapping[str, Message] | None:
        target = self.target()
        if target is not None:
            typed = target[st.type_url]
            if st.wildcard or typed.items.keys() <= st.names:  # all of the set is wanted
                if typed.version == version:
                    return self.selections.held(typed)
            else:
                items = st.select(typed.items)
                if set_version({n: typed.versions[n] for n in items}) == version:
                    return items
        remembered: Mapping[str, Message] | None = self.cache.history.resolve_set(st.type_url, version)
        return remembered

    def respond(self, st: _TypeState, planned: Plan) -> bytes | None:
        selection = self.selection(st, planned)
        if selection.blocked or selection.version == st.sotw_version:
            return None
        if not selection.remembered:
            self._remember(selection)
        if st.wildcard or st.type_url in WILDCARD_TYPES:
            # Listeners, clusters and scopes are whole-state types even when subscribed by
            # name (proxyless gRPC): a subscribed one a response leaves out is removed.
            body, names = selection.sotw_body(), selection.names
        else:
            # EDS/RDS: only what the proxy may lack. A response may carry nothing at all
            # (the subscription shrank, or a change was reverted): it still moves the
            # stream's version, and its ACK says the proxy holds the new selection.
            acked = _as_selection(st.type_url, st.acked_selection, st.acked)
            sent = _as_selection(st.type_url, st.sent_selection, st.sent)
            if acked is not None and sent is not None:
                partial = self.selections.sotw_partial(acked, sent, selection)
            else:
                partial = _make_sotw_partial(selection, st.acked_versions, st.sent_versions)
            body, names = partial.body, partial.names
        nonce = self.next_nonce()
        st.sent = selection.items
        st.sent_versions = selection.versions
        st.sent_selection = selection
        st.sotw_version = selection.version
        st.latest_nonce = nonce
        self.record_push(st, Push(st.type_url, selection.version, nonce, names))
        return _with_nonce(body, nonce)


class _DeltaStream(_Stream[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse]):
    protocol = DELTA

    def handle(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        st = self.state(request.type_url)
        if request.response_nonce:
            self._ack_or_nack(st, request)
        first = not st.subscribed
        st.subscribed = True
        if first or request.resource_names_subscribe or request.resource_names_unsubscribe:
            self._replan = True
        if first:
            self._first_request(st, request)
        self._subscribe(st, request, first=first)

    def _first_request(self, st: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        # Legacy wildcard: a first LDS/CDS request that names nothing.
        st.wildcard = st.type_url in WILDCARD_TYPES and not request.resource_names_subscribe
        if not request.initial_resource_versions:
            return
        versions = dict(request.initial_resource_versions)
        target = self.target()
        typed = target[st.type_url] if target is not None else None
        if typed is not None and versions == typed.shared_versions():
            # Exactly the target's set (a fleet reconnecting to a restarted replica): held
            # as the shared selection of that set (the stream's own dicts equal to it, as
            # delta streams update theirs in place), so it plans with its peers at once.
            held = self.selections.held(typed)
            st.sent, st.sent_versions = dict(typed.shared_items()), versions
            st.acked, st.acked_versions = dict(typed.shared_items()), dict(versions)
            st.sent_selection = st.acked_selection = st.synced = held
            self.record_ack(st, typed.version, held.versions)
            return
        known: Mapping[str, str] = typed.versions if typed is not None else {}
        items: Mapping[str, Message] = typed.items if typed is not None else {}
        history = self.cache.history
        for name, version in versions.items():
            st.sent_versions[name] = version
            message = items[name] if known.get(name) == version else history.message(st.type_url, version)
            if message is not None:
                st.sent[name] = message
                st.acked[name] = message
                st.acked_versions[name] = version
        st.sent_selection = st.acked_selection = None
        self.record_ack(st, set_version(versions), dict(st.acked_versions))

    def _subscribe(self, st: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest, *, first: bool) -> None:
        if not request.resource_names_subscribe and not request.resource_names_unsubscribe:
            if first:  # the first request sets the subscription even when it names nothing
                st.subscribe(wildcard=st.wildcard, names=st.names)
            return
        wildcard = st.wildcard
        add = set(request.resource_names_subscribe)
        remove = set(request.resource_names_unsubscribe)
        if WILDCARD in add:
            wildcard = True
            add.discard(WILDCARD)
        if WILDCARD in remove:  # after a subscribe to it in the same request: it wins
            wildcard = False
            remove.discard(WILDCARD)
        old = frozenset(st.names)  # the same object: delta names are the shared frozensets
        names = self.selections.changed_names(old, add, remove)
        st.subscribe(wildcard=wildcard, names=names, grows=old.isdisjoint(remove))

    def _ack_or_nack(self, st: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        pending = st.pending.pop(request.response_nonce, None)
        if pending is None:
            log.debug("unknown %s nonce %s from %s", _short(st.type_url), request.response_nonce, self.node.id)
            return
        if request.HasField("error_detail"):
            self._replan = True
            rejected = {n: pending.versions[n] for n in pending.resources if n in pending.versions}
            self.record_nack(st, pending.version, request.response_nonce, request.error_detail.message, rejected)
            return
        # What the proxy had ACKed before this response, as a shared selection, if known.
        before = st.acked_selection if st.acked_selection is not None or st.acked else _nothing(st.type_url)
        for name, message in pending.resources.items():
            if st.wants(name):
                st.acked[name] = message
                st.acked_versions[name] = pending.versions[name]
        for name in pending.removed:
            st.acked.pop(name, None)
            st.acked_versions.pop(name, None)
        synced = st.synced
        # Nothing else in flight and the ACKed content is exactly the shared selection the
        # stream was last synced to: plan with it (content versions are content hashes).
        # Known without comparing when the response went from what the proxy had ACKed
        # (`before`; one content if one set version: versions are content hashes) to the
        # selection the stream is still synced to: the ACKed content is then that selection
        # (a subscription that dropped a name the response carried unsynced the stream).
        base = pending.base
        known = (
            synced is not None
            and pending.to is synced
            and base is not None
            and before is not None
            and (base is before or base.version == before.version)
        )
        exact = not st.pending and synced is not None and (known or st.acked_versions == synced.versions)
        st.acked_selection = synced if exact else None
        if exact and synced is not None:
            self.record_ack(st, pending.version, synced.versions, synced)  # equal; shared, never mutated
        else:
            self.record_ack(st, pending.version, dict(st.acked_versions))

    def respond(self, st: _TypeState, planned: Plan) -> bytes | None:
        selection = self.selection(st, planned)
        if selection.blocked or st.synced is selection:
            return None
        first = st.latest_nonce == "" and not st.sent_versions
        synced = st.synced if st.synced is not None or st.sent_versions else _nothing(st.type_url)
        if synced is not None:
            # The stream holds exactly an earlier shared selection: the diff is shared too.
            diff = self.selections.diff(synced, selection)
        elif st.sent_versions and st.sent_versions == selection.versions:  # C speed: a proxy reconnected
            diff = _NO_DIFF
        else:
            diff = _make_diff(selection, st.sent_versions)
        if not diff.changed and not diff.removed and not (first and not selection.items and st.wildcard):
            st.synced = selection  # nothing to send: the stream holds exactly this selection
            st.sent_selection = selection
            if st.acked_selection is None and not st.pending and st.acked_versions == selection.versions:
                # A proxy that reconnected holding it all (initial_resource_versions): no
                # response will come to be ACKed, so say now that its ACKed content is this
                # shared selection, or it would plan alone over all it holds on every change.
                st.acked_selection = selection
            return None
        if not selection.remembered:
            self._remember(selection)
        nonce = self.next_nonce()
        for name in diff.removed:
            st.sent.pop(name, None)
            st.sent_versions.pop(name, None)
        st.sent.update(diff.changed)
        st.sent_versions.update({n: selection.versions[n] for n in diff.changed})
        st.synced = selection  # removed what it lacks, updated what differed: equal now
        st.sent_selection = selection
        st.latest_nonce = nonce
        st.pending[nonce] = _Pending(
            selection.version, diff.changed, diff.removed, selection.versions, synced, selection
        )
        self.record_push(st, Push(st.type_url, selection.version, nonce, diff.names, diff.removed))
        return _with_nonce(diff.body, nonce)


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves a SnapshotCache to Envoys over ADS (SotW and delta), reporting to a tracker.

    With a `gate`, every stream's proxy is admitted or refused on its first request
    (`ProxyGate`); `refused` counts the refusals. Without one, every proxy is served. A
    proxy the gate scopes to some services is served from its scoped key
    (`graylane.xds.scope`): `cache` must then be a `ScopedSnapshotCache`, else it is refused.
    At most `send_slots` streams push at once (`_SendSlots`).
    """

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        tracker: ProxyTracker | None = None,
        gate: ProxyGate | None = None,
        send_slots: int = SEND_SLOTS,
    ) -> None:
        self.cache = cache
        self.tracker = tracker if tracker is not None else ProxyTracker()
        self._gate = gate
        self.refused = 0
        self._streams: set[_Stream[Any, Any]] = set()
        self._closed = False
        self._selections = _Selections()
        self._send_slots = _SendSlots(send_slots, hold=SEND_SLOT_HOLD)

    def close(self) -> None:
        """End every stream now, and any that opens from here on, before the server stops.

        An ADS stream never finishes on its own, so a graceful stop would otherwise hold
        for its whole grace period. Ending them costs the proxies nothing: they keep their
        configuration and reconnect (to another replica) at once.
        """
        self._closed = True
        for stream in tuple(self._streams):
            stream.stop()
            stream.end()

    async def _serve(
        self,
        stream: _Stream[Any, Any],
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if self._closed:
            return
        if self._gate is not None:
            stream.admit = functools.partial(self._gate.admit, peer=context.auth_context())
        stream.send_slots = self._send_slots
        self._streams.add(stream)
        try:
            await stream.run(requests, context.write)
        except InvalidNodeMetadata as exc:
            log.warning("refused an xDS stream from node %r: %s", stream.node.id, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ProxyRefused as exc:
            self.refused += 1
            log.warning("refused an xDS stream from %s: %s", context.peer(), exc.message)
            await context.abort(exc.code, exc.message)
        finally:
            stream.stop()
            self._streams.discard(stream)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register ADS on `server`; responses go out as bytes the streams serialised (shared)."""
        handlers = {
            "StreamAggregatedResources": self._handler(_SotwStream, discovery_pb2.DiscoveryRequest),
            "DeltaAggregatedResources": self._handler(_DeltaStream, discovery_pb2.DeltaDiscoveryRequest),
        }
        service = "envoy.service.discovery.v3.AggregatedDiscoveryService"
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    def _handler(self, kind: type[_Stream[Req, Any]], request: type[Req]) -> grpc.RpcMethodHandler:
        """The gRPC method of one ADS variant (SotW or delta): each call serves a new `kind` stream."""

        async def serve(requests: AsyncIterator[Req], context: grpc.aio.ServicerContext[Req, Any]) -> None:
            await self._serve(kind(self.cache, self.tracker, self._selections), requests, context)

        # No response serializer: the streams hand gRPC the bytes they serialised (shared
        # bodies), which it sends as they are (a serializer would be a Python call per write).
        return grpc.stream_stream_rpc_method_handler(serve, request_deserializer=request.FromString)
