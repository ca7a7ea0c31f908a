"""Typed sets of Envoy resources and their content-derived versions.

Owns: the five resource types Graylane serves (CDS, EDS, LDS, SRDS, RDS), the `Resources`
value that `render` returns and the snapshot cache stores, and the version of a resource
(a hash of its deterministic serialisation, so every replica and agent derives the same
version for the same content and a reconnect to another replica re-sends nothing).

Serialised once: a message that enters a `TypedResources` is encoded once (bytes, content
version, and the packed `Any` the ADS server sends) and the encoding is shared by every
stream and every later plan that holds the same message object. Messages held in a
`Resources` are frozen by convention: nothing mutates them after render.

Must not import: etcd, graylane.controlplane, graylane.agent.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator, Mapping
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
    """One message's deterministic bytes, content version and packed Any (shared, read-only).

    A NamedTuple, not a dataclass: a full render encodes tens of thousands of messages
    (two per service for the routes alone), and a tuple is several times cheaper to make.
    """

    message: Message
    version: str
    packed: any_pb2.Any


# Encodings by message identity. Each entry holds its message, so an id cannot be reused
# while its entry lives; evicted entries are simply encoded again. FIFO (a dict keeps
# insertion order), bounded.
_ENCODED: dict[int, Encoded] = {}
ENCODED_LIMIT = 250_000
_TYPE_URLS: dict[str, str] = {}  # message full name -> its type URL


def _encode(message: Message) -> Encoded:
    data = message.SerializeToString(deterministic=True)
    full_name = message.DESCRIPTOR.full_name
    type_url = _TYPE_URLS.get(full_name)
    if type_url is None:
        type_url = _TYPE_URLS[full_name] = "type.googleapis.com/" + full_name
    packed = any_pb2.Any(type_url=type_url, value=data)
    return Encoded(message, hashlib.sha256(data).hexdigest()[:16], packed)


def encoded(message: Message) -> Encoded:
    """The shared encoding of a message that belongs to a Resources (encoded on first use)."""
    hit = _ENCODED.get(id(message))
    if hit is not None and hit.message is message:
        return hit
    enc = _encode(message)
    _ENCODED[id(message)] = enc
    if len(_ENCODED) > ENCODED_LIMIT:
        for stale in list(itertools.islice(_ENCODED, len(_ENCODED) - ENCODED_LIMIT)):
            del _ENCODED[stale]
    return enc


def content_version(message: Message) -> str:
    """A version derived from content only: equal bytes, equal version, on any host."""
    hit = _ENCODED.get(id(message))
    if hit is not None and hit.message is message:
        return hit.version
    return _encode(message).version


def packed(message: Message) -> any_pb2.Any:
    """`message` packed in an Any, shared by every response that carries it."""
    hit = _ENCODED.get(id(message))
    if hit is not None and hit.message is message:
        return hit.packed
    return _encode(message).packed


def set_version(versions: Mapping[str, str]) -> str:
    """The version of a whole set (SotW `version_info`): a hash of its names and versions."""
    # One update over the joined bytes: the same digest as one update per part, at a
    # fraction of the cost for sets of thousands.
    data = "".join(f"{name}\0{versions[name]}\n" for name in sorted(versions)).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class TypedResources:
    """All resources of one type, by name, with their content versions."""

    type_url: str
    items: Mapping[str, Message]
    versions: Mapping[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", MappingProxyType({n: encoded(m).version for n, m in self.items.items()}))

    @functools.cached_property
    def version(self) -> str:
        """The set's version (SotW version_info of all items), computed once."""
        return set_version(self.versions)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.items))

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Resources:
    """One complete configuration for a proxy: every type Graylane serves."""

    by_type: Mapping[str, TypedResources]

    @classmethod
    def of(cls, resources: Mapping[str, Mapping[str, Message]]) -> Resources:
        return cls(
            MappingProxyType({t: TypedResources(t, MappingProxyType(dict(resources.get(t, {})))) for t in PUSH_ORDER})
        )

    def __getitem__(self, type_url: str) -> TypedResources:
        return self.by_type[type_url]
