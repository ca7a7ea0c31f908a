"""Which configuration every proxy accepted: ACKs, NACKs and pushes, per xDS stream.

A proxy is one xDS stream, not one node id: every stream gets a process-unique id that is
never reused (`new_stream_id`), and two open streams presenting one node id are two proxies
(with a warning, and listed by `duplicate_node_ids()`). A stream that ended is removed at
once with all its state: `proxies()` holds exactly the streams open now.

Owns: per open stream, its node, its metadata, per resource type the last
ACKed version (and per-resource versions), the last NACK with Envoy's message, and a short
log of what was pushed to it. A NACK is data: it is recorded here, never raised.

Readers get frozen `ProxyStatus` values (`proxies()`), and wait for changes with a change
sequence: `seq = tracker.seq; ...; seq = await tracker.wait_for_change(seq)`. That is how
the control plane computes convergence ("have all proxies of this cluster ACKed the route
version that carries batch i?") and pauses a release on a NACK.

Listeners (`add_listener`) hear each change as a small `ProxyEvent`, synchronously and after
the state is updated: that is how telemetry counts pushes, ACKs and NACKs and times push to
ACK without this module knowing any metrics library.

Concurrency: single asyncio loop. Must not import: etcd, graylane.controlplane,
graylane.agent, OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

log = logging.getLogger(__name__)

SOTW = "sotw"
DELTA = "delta"
PUSH_LOG_SIZE = 64

# ProxyEvent kinds
CONNECTED = "connected"
DISCONNECTED = "disconnected"  # the stream ended (the proxy is gone from `proxies()`)
PUSHED = "pushed"
ACKED = "acked"
NACKED = "nacked"


@dataclass(frozen=True, slots=True)
class ProxyEvent:
    """One change of one proxy, as listeners hear it (a value; the state is in `proxies()`)."""

    kind: str  # CONNECTED, DISCONNECTED, PUSHED, ACKED or NACKED
    node_id: str
    type_url: str = ""  # PUSHED, ACKED, NACKED
    version: str = ""  # PUSHED and ACKED: the version pushed or accepted; NACKED: the version rejected
    stream: str = ""  # the stream (the proxy) it happened on


ProxyListener = Callable[[ProxyEvent], None]


@dataclass(frozen=True, slots=True)
class TypeAck:
    """The last configuration of one type a proxy accepted."""

    version: str  # SotW version_info / delta system_version_info of the ACKed response
    # name -> content version the proxy now holds
    resources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Nack:
    type_url: str
    version: str  # the version Envoy rejected
    nonce: str
    message: str  # Envoy's error_detail.message
    at: float  # unix time, for display only
    # The stream that sent it (set by the tracker). Nonces restart at 1 on every stream, so
    # (stream, nonce) identifies one NACK; (node id, nonce) does not.
    stream: str = ""


@dataclass(frozen=True, slots=True)
class Push:
    """One response sent to a proxy (a bounded log, newest last)."""

    type_url: str
    version: str
    nonce: str
    resources: tuple[str, ...]  # names of the resources in the response
    removed: tuple[str, ...] = ()  # delta removed_resources


@dataclass(frozen=True, slots=True)
class ProxyStatus:
    node_id: str
    cluster: str
    key: str  # the snapshot key the proxy is served from
    protocol: str  # SOTW or DELTA
    connected: bool
    metadata: Mapping[str, Any]
    acked: Mapping[str, TypeAck] = field(default_factory=lambda: MappingProxyType({}))
    last_nack: Nack | None = None
    pushes: tuple[Push, ...] = ()
    stream: str = ""  # the stream id: the proxy's identity in `ProxyTracker.proxies()`
    connected_at: float = 0.0  # unix time the stream opened

    def has_acked(self, type_url: str, name: str, version: str) -> bool:
        """Whether the proxy holds resource `name` of `type_url` at content `version`."""
        ack = self.acked.get(type_url)
        return ack is not None and ack.resources.get(name) == version


class ProxyTracker:
    """Per-stream ACK/NACK state, readable as frozen values and awaitable for changes."""

    def __init__(self) -> None:
        self._proxies: dict[str, ProxyStatus] = {}  # stream id -> status, open streams only
        self._by_node: dict[str, set[str]] = {}  # node id -> its open streams
        self._seq = 0
        # Replaced on every change: waiters hold the event of the sequence they saw.
        self._changed = asyncio.Event()
        self._listeners: list[ProxyListener] = []

    @property
    def seq(self) -> int:
        return self._seq

    def proxies(self) -> Mapping[str, ProxyStatus]:
        """stream id -> status of every stream open now."""
        return MappingProxyType(dict(self._proxies))

    def get(self, stream: str) -> ProxyStatus | None:
        return self._proxies.get(stream)

    def of_node(self, node_id: str) -> tuple[ProxyStatus, ...]:
        """The open streams presenting `node_id` (usually one), oldest first."""
        found = (self._proxies[s] for s in self._by_node.get(node_id, ()) if s in self._proxies)
        return tuple(sorted(found, key=lambda p: p.connected_at))

    def duplicate_node_ids(self) -> frozenset[str]:
        """Node ids with more than one open stream (each stream is still its own proxy)."""
        return frozenset(node_id for node_id, streams in self._by_node.items() if len(streams) > 1)

    async def wait_for_change(self, since: int) -> int:
        """Return the sequence number once it is past `since` (immediately if it already is)."""
        while self._seq <= since:
            await self._changed.wait()
        return self._seq

    def add_listener(self, listener: ProxyListener) -> Callable[[], None]:
        """Call `listener` with every later event; returns the function that removes it.

        A listener runs on the xDS stream's task and must be quick; what it raises is logged
        and swallowed, so it can never break a stream.
        """
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def connected(self, node: base_pb2.Node, *, stream: str, key: str, protocol: str) -> None:
        if stream in self._proxies:
            raise ValueError(f"stream {stream!r} is already connected")
        streams = self._by_node.setdefault(node.id, set())
        streams.add(stream)
        if len(streams) > 1:
            log.warning(
                "node id %r has %d open xDS streams (%s): each is tracked as its own proxy; "
                "give every Envoy a unique node id",
                node.id,
                len(streams),
                ", ".join(sorted(streams)),
            )
        status = ProxyStatus(
            node_id=node.id,
            cluster=node.cluster,
            key=key,
            protocol=protocol,
            connected=True,
            metadata=MappingProxyType(json_format.MessageToDict(node.metadata)),
            stream=stream,
            connected_at=now(),
        )
        self._update(status)
        self._tell(ProxyEvent(CONNECTED, node.id, stream=stream))

    def disconnected(self, stream: str) -> None:
        """The stream ended: its state is released now (a no-op for an unknown stream)."""
        status = self._proxies.pop(stream, None)
        if status is None:
            return
        streams = self._by_node.get(status.node_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._by_node[status.node_id]
        self._bump()
        self._tell(ProxyEvent(DISCONNECTED, status.node_id, stream=stream))

    def pushed(self, stream: str, push: Push) -> None:
        status = self._proxies.get(stream)
        if status is not None:
            self._update(replace(status, pushes=(*status.pushes, push)[-PUSH_LOG_SIZE:]))
            self._tell(ProxyEvent(PUSHED, status.node_id, push.type_url, push.version, stream=stream))

    def acked(self, stream: str, type_url: str, ack: TypeAck) -> None:
        status = self._proxies.get(stream)
        if status is None:
            return
        acked = dict(status.acked)
        # A read-only view is kept as given (the server passes versions it never mutates,
        # shared by every stream that ACKed the same set); anything else is copied.
        if not isinstance(ack.resources, MappingProxyType):
            ack = replace(ack, resources=MappingProxyType(dict(ack.resources)))
        acked[type_url] = ack
        self._update(replace(status, acked=MappingProxyType(acked)))
        self._tell(ProxyEvent(ACKED, status.node_id, type_url, ack.version, stream=stream))

    def nacked(self, stream: str, nack: Nack) -> None:
        status = self._proxies.get(stream)
        if status is not None:
            self._update(replace(status, last_nack=replace(nack, stream=stream)))
            self._tell(ProxyEvent(NACKED, status.node_id, nack.type_url, nack.version, stream=stream))

    def _update(self, status: ProxyStatus) -> None:
        self._proxies[status.stream] = status
        self._bump()

    def _tell(self, event: ProxyEvent) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("proxy listener %r failed on %s", listener, event)

    def _bump(self) -> None:
        self._seq += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


_stream_numbers = itertools.count(1)


def new_stream_id(node_id: str) -> str:
    """A process-unique, never reused id for one xDS stream of `node_id`."""
    return f"{node_id}#{next(_stream_numbers)}"


def now() -> float:
    return time.time()
