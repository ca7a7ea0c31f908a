"""Typed sets of Envoy resources and their content-derived versions.

Owns: the five resource types Graylane serves (CDS, EDS, LDS, SRDS, RDS), the `Resources`
value that `render` returns and the snapshot cache stores, and the version of a resource
(a hash of its deterministic serialisation, so every replica and agent derives the same
version for the same content and a reconnect to another replica re-sends nothing).

Derived sets: a `TypedResources` (and a `Resources`) may be built from the previous one by
a few changes (`replaced`); it then records what it was derived from (the base's set
version, never the base object) and which names changed or went, and its set version (an
order-free sum of per-item digests) is updated in O(changes). Readers holding the base
(the cache's consistency check, the plan, the ADS server's selections and diffs) follow
the change in O(changes) instead of walking every item.

Serialised once: a message that enters a `TypedResources` is encoded once (content version,
and its wire entry: the packed Any as an element of a response's repeated field 2) and the
encoding is shared by every stream and every later plan that holds the same message object.
Response bodies are joins of entries (`sotw_body`, `delta_body`), byte for byte what
protobuf would serialise; a set keeps its entries once asked for (`entries`). Messages held in a
`Resources` are frozen by convention: nothing mutates them after render.

Must not import: etcd, graylane.controlplane, graylane.agent.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"

# The order in which a change is pushed on one ADS stream (make-before-break): clusters
# and their endpoints before the listeners and routes that use them. Scopes come before
# the route configs they name because that is the order Envoy subscribes in (the listener
# names the SRDS config, each scope names one RDS resource, and Envoy asks for a route
# config only once it holds the scope naming it); the plan sends a new scope only once
# the route config it names may be sent too, so the route config follows at once.
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE)

MESSAGE_TYPES: Mapping[str, type[Message]] = MappingProxyType(
    {
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        LISTENER: listener_pb2.Listener,
        SCOPED_ROUTE: scoped_route_pb2.ScopedRouteConfiguration,
        ROUTE: route_pb2.RouteConfiguration,
    }
)


class Encoded(NamedTuple):
    """One message's content version and its wire entry (shared, read-only).

    `entry` is the message packed in an Any, in the wire form of one element of a repeated
    Any field numbered 2 (tag, length, the Any's bytes): the `resources` of a
    DiscoveryResponse, and the `resource` of a delta Resource, are both field 2. A
    response body is then a join of entries (`sotw_body`), at C speed, with no Any
    objects built per response.

    A NamedTuple, not a dataclass: a full render encodes tens of thousands of messages
    (two per service for the routes alone), and a tuple is several times cheaper to make.
    """

    message: Message
    version: str
    entry: bytes

    @property
    def packed(self) -> any_pb2.Any:
        """The message packed in an Any (a new object: responses are built from `entry`)."""
        start = 1  # past the tag, then past the length's varint
        while self.entry[start] & 0x80:
            start += 1
        return any_pb2.Any.FromString(self.entry[start + 1 :])


# Encodings by message identity. Each entry holds its message, so an id cannot be reused
# while its entry lives; evicted entries are simply encoded again. FIFO (a dict keeps
# insertion order), bounded.
_ENCODED: dict[int, Encoded] = {}
ENCODED_LIMIT = 250_000
_TYPE_URLS: dict[str, str] = {}  # message full name -> its type URL


_ANY_HEADS: dict[str, bytes] = {}  # message full name -> Any field 1 (its type URL) and field 2's tag


def varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf base-128 varint."""
    if value < _SMALL_VARINTS:
        return _varints[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Every varint below 2**14 (two bytes), made once: lengths of most resources, and the tags;
# a full render of 10,000 services encodes 84,000 of them.
_SMALL_VARINTS = 1 << 14
_varints = [bytes((v,)) if v < 0x80 else bytes(((v & 0x7F) | 0x80, v >> 7)) for v in range(_SMALL_VARINTS)]


def field_bytes(number: int, data: bytes) -> bytes:
    """One length-delimited field (string, bytes or message) in wire form."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def _encode(message: Message) -> Encoded:
    data = message.SerializeToString(deterministic=True)
    full_name = message.DESCRIPTOR.full_name
    head = _ANY_HEADS.get(full_name)
    if head is None:
        head = _ANY_HEADS[full_name] = field_bytes(1, ("type.googleapis.com/" + full_name).encode()) + b"\x12"
    any_bytes = head + varint(len(data)) + data
    return Encoded(message, hashlib.sha256(data).hexdigest()[:16], b"\x12" + varint(len(any_bytes)) + any_bytes)


def encoded(message: Message) -> Encoded:
    """The shared encoding of a message that belongs to a Resources (encoded on first use)."""
    hit = _ENCODED.get(id(message))
    if hit is not None and hit.message is message:
        return hit
    enc = _encode(message)
    _ENCODED[id(message)] = enc
    if len(_ENCODED) > ENCODED_LIMIT:
        _evict_oldest()
    return enc


def _evict_oldest() -> None:
    """Drop the oldest quarter of the encodings at once, rebuilding the dict.

    Deleting the oldest entry on every insertion past the limit left a growing run of
    deleted slots at the dict's front that each later deletion scanned again (a full render
    of 10,000 services took 2.6 s instead of 0.8 s once the memo was full); dropping a
    quarter and compacting keeps eviction O(1) per insertion, amortised.
    """
    kept = list(itertools.islice(_ENCODED.items(), ENCODED_LIMIT // 4, None))
    _ENCODED.clear()
    _ENCODED.update(kept)


def content_version(message: Message) -> str:
    """A version derived from content only: equal bytes, equal version, on any host."""
    hit = _ENCODED.get(id(message))
    if hit is not None and hit.message is message:
        return hit.version
    return _encode(message).version


def entry(message: Message) -> bytes:
    """`message` packed in an Any as one field-2 entry (`Encoded.entry`), shared by every
    response that carries it."""
    hit = _ENCODED.get(id(message))
    if hit is not None and hit.message is message:
        return hit.entry
    return _encode(message).entry


def packed(message: Message) -> any_pb2.Any:
    """`message` packed in an Any (a new object; see `entry`)."""
    return encoded(message).packed


def sotw_body(version: str, type_url: str, entries: Iterable[bytes]) -> bytes:
    """A DiscoveryResponse of `entries` (`Encoded.entry` each) without its nonce: the bytes
    protobuf serialises for `DiscoveryResponse(version_info=version, resources=[...],
    type_url=type_url)` (fields in number order, empty strings left out)."""
    parts = [field_bytes(1, version.encode())] if version else []
    parts.extend(entries)  # from a dict's values: at C speed
    if type_url:
        parts.append(field_bytes(4, type_url.encode()))
    return b"".join(parts)


def delta_body(
    version: str, type_url: str, resources: Iterable[tuple[str, str, bytes]], removed: Iterable[str]
) -> bytes:
    """A DeltaDiscoveryResponse without its nonce, from (name, content version, entry) per
    resource: the bytes protobuf serialises for the same fields (in number order, empty
    strings left out)."""
    parts = [field_bytes(1, version.encode())] if version else []
    for name, resource_version, wire in resources:
        # A Resource: version (1), the packed message (2: the entry as is), name (3).
        body = (field_bytes(1, resource_version.encode()) if resource_version else b"") + wire
        parts.append(field_bytes(2, (body + field_bytes(3, name.encode())) if name else body))
    if type_url:
        parts.append(field_bytes(4, type_url.encode()))
    parts.extend(field_bytes(6, name.encode()) for name in removed)
    return b"".join(parts)


# The version of a set is the sum, modulo 2**128, of a 128-bit digest of each (name,
# content version): independent of order, so a set derived from another by a few changes
# gets its version in O(changes) (subtract what left, add what came), equal to the
# version computed from scratch.
_SET_MODULUS = 1 << 128


def _item_digest(name: str, version: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{name}\0{version}".encode(), digest_size=16).digest(), "big")


def _set_hex(total: int) -> str:
    return f"{total:032x}"


def _set_sum(versions: Mapping[str, str]) -> int:
    # `_item_digest` inlined: a full render sums tens of thousands of items.
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    return (
        sum(
            from_bytes(blake2b(f"{name}\0{version}".encode(), digest_size=16).digest(), "big")
            for name, version in versions.items()
        )
        % _SET_MODULUS
    )


def set_version(versions: Mapping[str, str]) -> str:
    """The version of a whole set (SotW `version_info`): derived from its names and versions only."""
    return _set_hex(_set_sum(versions))


class TypedResources:
    """All resources of one type, by name, with their content versions (read-only).

    A set may be derived from another (`replaced`): it then knows the version of the set
    it was derived from (`base_version`) and what differs from it (`changed`: names added
    or whose content changed, `removed`), so readers that hold the base can follow the
    change in O(changes). It never refers to the base object itself: a chain of bases
    would keep every old set alive. A set built from scratch has `base_version` "" (and
    empty `changed` / `removed`).
    """

    __slots__ = (
        "type_url",
        "items",
        "versions",
        "base_version",
        "changed",
        "removed",
        "added",
        "names_token",
        "_items",
        "_versions",
        "_sum",
        "_entries",
    )

    type_url: str
    items: Mapping[str, Message]
    versions: Mapping[str, str]
    base_version: str
    changed: frozenset[str]
    removed: frozenset[str]
    added: frozenset[str]  # the names of `changed` the base did not hold
    # The same object in a set derived from this one with the same names (only contents
    # changed): a reader that found the names equal to something need not compare again.
    names_token: object

    def __init__(self, type_url: str, items: Mapping[str, Message]) -> None:
        self._init(type_url, dict(items), {n: encoded(m).version for n, m in items.items()}, None, "", _EMPTY, _EMPTY)

    def _init(
        self,
        type_url: str,
        items: dict[str, Message],
        versions: dict[str, str],
        total: int | None,
        base_version: str,
        changed: frozenset[str],
        removed: frozenset[str],
    ) -> None:
        self.type_url = type_url
        self._items = items
        self._versions = versions
        self.items = MappingProxyType(items)
        self.versions = MappingProxyType(versions)
        self._sum = total
        self._entries: dict[str, bytes] | None = None
        self.base_version = base_version
        self.changed = changed
        self.removed = removed
        self.added = _EMPTY
        self.names_token = object()

    @property
    def version(self) -> str:
        """The set's version (SotW version_info of all items), computed once."""
        if self._sum is None:
            self._sum = _set_sum(self._versions)
        return _set_hex(self._sum)

    def replaced(self, upserts: Mapping[str, Message], removals: Iterable[str] = ()) -> TypedResources:
        """This set with `upserts` added or replaced and `removals` gone: O(changes) plus one
        dict copy. A name whose new content has the same version keeps its old message
        (the same object: its encoding and every plan keyed by it stay shared). Returns
        `self` when nothing differs."""
        total = self._sum if self._sum is not None else _set_sum(self._versions)
        items: dict[str, Message] | None = None
        versions: dict[str, str] = self._versions
        changed: list[str] = []
        removed: list[str] = []
        added: list[str] = []
        for name, message in upserts.items():
            version = encoded(message).version
            old = self._versions.get(name)
            if old == version:
                continue
            if items is None:
                items, versions = dict(self._items), dict(self._versions)
            if old is not None:
                total -= _item_digest(name, old)
            else:
                added.append(name)
            total += _item_digest(name, version)
            items[name] = message
            versions[name] = version
            changed.append(name)
        for name in removals:
            if name in upserts:
                continue
            old = self._versions.get(name)
            if old is None:
                continue
            if items is None:
                items, versions = dict(self._items), dict(self._versions)
            total -= _item_digest(name, old)
            del items[name]
            del versions[name]
            removed.append(name)
        if items is None:
            return self
        out = TypedResources.__new__(TypedResources)
        out._init(
            self.type_url, items, versions, total % _SET_MODULUS, self.version, frozenset(changed), frozenset(removed)
        )
        if self._entries is not None:
            # Kept up to date once asked for (the wildcard types' bodies): a dict copy, in
            # the same order as `items` (replaced names keep their place, new ones follow).
            entries = dict(self._entries)
            for name in changed:
                entries[name] = entry(items[name])
            for name in removed:
                del entries[name]
            out._entries = entries
        out.added = frozenset(added)
        if not added and not removed:
            out.names_token = self.names_token
        return out

    def shared_items(self) -> dict[str, Message]:
        """The items as the set's own dict, shared with every holder: never mutate it."""
        return self._items

    def shared_versions(self) -> dict[str, str]:
        """The versions as the set's own dict, shared with every holder: never mutate it."""
        return self._versions

    def entries(self) -> Mapping[str, bytes]:
        """name -> `Encoded.entry`, in the order of `items` (built on first use, then carried
        to the sets derived from this one in O(changes) plus a dict copy)."""
        if self._entries is None:
            self._entries = {name: entry(message) for name, message in self._items.items()}
        return self._entries

    def derives_from(self, base: TypedResources) -> bool:
        """Whether `changed` / `removed` are exactly what differs from `base`."""
        return bool(self.base_version) and self.base_version == base.version

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"TypedResources({self.type_url!r}, {len(self)} items, version {self.version})"


_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Resources:
    """One complete configuration for a proxy: every type Graylane serves.

    `base_versions`: for a configuration derived from another (`replaced`), that one's set
    version per type; each type's set is then either the base's own set or derived from
    it (`TypedResources.derives_from`). Empty for a configuration built from scratch.
    """

    by_type: Mapping[str, TypedResources]
    base_versions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, resources: Mapping[str, Mapping[str, Message]]) -> Resources:
        return cls(
            MappingProxyType({t: TypedResources(t, MappingProxyType(dict(resources.get(t, {})))) for t in PUSH_ORDER})
        )

    def replaced(self, changes: Mapping[str, tuple[Mapping[str, Message], Iterable[str]]]) -> Resources:
        """This configuration with, per type, (upserts, removals) applied; `self` if nothing differs."""
        by_type = dict(self.by_type)
        for type_url, (upserts, removals) in changes.items():
            by_type[type_url] = self.by_type[type_url].replaced(upserts, removals)
        if all(by_type[t] is self.by_type[t] for t in by_type):
            return self
        return self.derived(by_type)

    def derived(self, by_type: Mapping[str, TypedResources]) -> Resources:
        """A configuration of `by_type`, derived from this one if each set is this one's own
        or derived from it (else built as from scratch: no `base_versions`)."""
        for type_url, typed in by_type.items():
            mine = self.by_type.get(type_url)
            if mine is None or not (typed is mine or typed.derives_from(mine)):
                return Resources(MappingProxyType(dict(by_type)))
        return Resources(
            MappingProxyType(dict(by_type)), MappingProxyType({t: typed.version for t, typed in self.by_type.items()})
        )

    def __getitem__(self, type_url: str) -> TypedResources:
        return self.by_type[type_url]
