"""Which configuration every proxy accepted: ACKs, NACKs and pushes, per xDS stream.

A proxy is one xDS stream, not one node id: every stream gets a process-unique id that is
never reused (`new_stream_id`), and two open streams presenting one node id are two proxies
(with a warning, and listed by `duplicate_node_ids()`). A stream that ended is removed at
once with all its state: `proxies()` holds exactly the streams open now.

Owns: per open stream, its node, its metadata, per resource type the last
ACKed version (and per-resource versions), the last NACK with Envoy's message, and a short
log of what was pushed to it. A NACK is data: it is recorded here, never raised. Per
metadata key a reader asks for (`metadata_index`): the open streams that state a value
under it, per node id, kept as streams open and end.

Readers get frozen `ProxyStatus` values (`proxies()`), and wait for changes with a change
sequence: `seq = tracker.seq; ...; seq = await tracker.wait_for_change(seq)`. That is how
the control plane computes convergence ("have all proxies of this cluster ACKed the route
version that carries batch i?") and pauses a release on a NACK. A reader that keeps its own
state per stream asks `changed_since(seq)` for the streams changed after the sequence it
last read, so its work per change is what changed, not the whole fleet.

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
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NamedTuple

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format
from graylane.xds import multimap
from graylane.xds.cache import PROXYLESS_KEY
from graylane.xds.scope import SCOPE_SEPARATOR

log = logging.getLogger(__name__)

SOTW = "sotw"
_JOURNAL_SLACK = 1024  # ended streams remembered beyond the open ones (see `changed_since`)
DELTA = "delta"
PUSH_LOG_SIZE = 64

# ProxyEvent kinds
CONNECTED = "connected"
DISCONNECTED = "disconnected"  # the stream ended (the proxy is gone from `proxies()`)
PUSHED = "pushed"
ACKED = "acked"
NACKED = "nacked"


class ProxyEvent(NamedTuple):
    """One change of one proxy, as listeners hear it (a value; the state is in `proxies()`).

    A named tuple, as `Push` is: a fan-out makes two per stream per change, and a frozen
    dataclass costs four times as much to make (its fields are set through object.__setattr__).
    """

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
    # name -> content version of the resources the rejected response carried: a client that
    # subscribes by name (proxyless gRPC) rejects a part of a set, which no set version names.
    resources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


class Push(NamedTuple):
    """One response sent to a proxy (a bounded log, newest last); one per stream per change."""

    type_url: str
    version: str
    nonce: str
    resources: tuple[str, ...]  # names of the resources in the response
    removed: tuple[str, ...] = ()  # delta removed_resources


_PushRow = tuple[str, str, str, tuple[str, ...], tuple[str, ...]]


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
    # The push log as plain tuples (see `_Record.pushes`); read it as `pushes`.
    push_log: tuple[_PushRow, ...] = ()
    stream: str = ""  # the stream id: the proxy's identity in `ProxyTracker.proxies()`
    connected_at: float = 0.0  # unix time the stream opened

    @property
    def pushes(self) -> tuple[Push, ...]:
        """What was pushed to the proxy, oldest first (the last PUSH_LOG_SIZE responses)."""
        return tuple(Push(*row) for row in self.push_log)

    def has_acked(self, type_url: str, name: str, version: str) -> bool:
        """Whether the proxy holds resource `name` of `type_url` at content `version`."""
        ack = self.acked.get(type_url)
        return ack is not None and ack.resources.get(name) == version


class MetadataIndex:
    """The open streams whose node metadata holds a non-empty string under one key, per node
    id, kept as streams open and end (`ProxyTracker.metadata_index`): a reader of, say, every
    proxy's admin address reads again only the node ids whose streams came or went since it
    last asked (`take_changed`), not every open stream (10,000 of them while a fleet connects,
    one at a time). One reader per key: `take_changed` hands the changes over once."""

    __slots__ = ("key", "_by_node", "_changed")

    def __init__(self, key: str) -> None:
        self.key = key
        self._by_node: dict[str, dict[str, str]] = {}  # node id -> {stream: value}, oldest stream first
        self._changed: set[str] = set()

    def values(self, node_id: str) -> tuple[str, ...]:
        """The values of `node_id`'s open streams that state one, oldest stream first."""
        streams = self._by_node.get(node_id)
        return tuple(streams.values()) if streams else ()

    def take_changed(self) -> set[str]:
        """The node ids whose streams with a value opened or ended since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def _add(self, node_id: str, stream: str, metadata: Mapping[str, Any]) -> None:
        value = metadata.get(self.key)
        if isinstance(value, str) and value:
            self._by_node.setdefault(node_id, {})[stream] = value
            self._changed.add(node_id)

    def _remove(self, node_id: str, stream: str) -> None:
        streams = self._by_node.get(node_id)
        if streams is not None and streams.pop(stream, None) is not None:
            self._changed.add(node_id)
            if not streams:
                del self._by_node[node_id]


@dataclass(slots=True, eq=False)
class _Record:
    """The mutable state of one open stream; read as a frozen `ProxyStatus` (`view`).

    Pushes and ACKs update it in place (a fleet sends and ACKs on every stream on every
    change); the frozen value is built only when someone reads it, and kept until the next
    change of this stream.
    """

    node_id: str
    cluster: str
    key: str
    protocol: str
    metadata: Mapping[str, Any]
    stream: str
    connected_at: float
    # Updated in place on each ACK (a fleet ACKs four types per change); views copy it.
    acked: dict[str, TypeAck] = field(default_factory=dict)
    last_nack: Nack | None = None
    # Each push as a plain tuple of strings (`_PushRow`): the collector stops tracking those
    # after one young pass, so a fleet's push logs (up to PUSH_LOG_SIZE per stream, hundreds
    # of thousands at 10,000 streams) are not scanned by its full passes; Push on read.
    pushes: deque[_PushRow] = field(default_factory=lambda: deque(maxlen=PUSH_LOG_SIZE))
    frozen: ProxyStatus | None = None

    def view(self) -> ProxyStatus:
        if self.frozen is None:
            self.frozen = ProxyStatus(
                node_id=self.node_id,
                cluster=self.cluster,
                key=self.key,
                protocol=self.protocol,
                connected=True,
                metadata=self.metadata,
                acked=MappingProxyType(dict(self.acked)),
                last_nack=self.last_nack,
                push_log=tuple(self.pushes),
                stream=self.stream,
                connected_at=self.connected_at,
            )
        return self.frozen


class ProxyTracker:
    """Per-stream ACK/NACK state, readable as frozen values and awaitable for changes.

    `seq` counts every change; `membership` counts only streams opening and ending (what
    readers that care about who is connected, not what they hold, recompute on). Waiters
    are woken once per loop iteration however many changes it made (a fan-out changes
    thousands of streams in a few iterations).
    """

    def __init__(self) -> None:
        self._proxies: dict[str, _Record] = {}  # stream id -> state, open streams only
        self._by_node: dict[str, set[str]] = {}  # node id -> its open streams
        self._seq = 0
        self._membership = 0
        # Replaced on every wake: waiters hold the event of the sequence they saw.
        self._changed = asyncio.Event()
        self._wake_loop: asyncio.AbstractEventLoop | None = None  # where a wake is scheduled
        self._listeners: list[ProxyListener] = []
        # The frozen values readers get, brought up to date on read for the streams changed since.
        self._views: dict[str, ProxyStatus] = {}
        self._dirty: set[str] = set()
        self._view: tuple[int, Mapping[str, ProxyStatus]] | None = None
        # stream id -> the sequence of its last change, in the order of those changes (an
        # entry moves to the end when its stream changes again), ended streams included
        # until pruned; `_horizon`: the newest sequence pruned with them.
        self._journal: dict[str, int] = {}
        self._horizon = 0
        self._indexes: dict[str, MetadataIndex] = {}  # metadata key -> its index (`metadata_index`)

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def membership(self) -> int:
        """Changes whenever a stream opens or ends (and only then)."""
        return self._membership

    def proxies(self) -> Mapping[str, ProxyStatus]:
        """stream id -> status of every stream open now (one mapping per change sequence)."""
        if self._view is None or self._view[0] != self._seq:
            views, records = self._views, self._proxies
            for stream in self._dirty:
                record = records.get(stream)
                if record is not None:
                    views[stream] = record.view()
                else:
                    views.pop(stream, None)
            self._dirty.clear()
            self._view = (self._seq, MappingProxyType(dict(views)))
        return self._view[1]

    def changed_since(self, seq: int) -> list[str] | None:
        """Stream ids that opened, changed or ended after change `seq`, newest first; None
        when the tracker no longer remembers that far back (read `proxies()` whole then).

        An id listed here is either open (`get` answers it) or ended (`get` answers None).
        """
        if seq < self._horizon:
            return None
        found = []
        for stream in reversed(self._journal):
            if self._journal[stream] <= seq:
                break
            found.append(stream)
        return found

    def acked_version(self, stream: str, type_url: str) -> str | None:
        """The version of `type_url` the open `stream` last ACKed ("" none; None: not open),
        without building its status (a reader of many streams' changes asks this)."""
        record = self._proxies.get(stream)
        if record is None:
            return None
        ack = record.acked.get(type_url)
        return ack.version if ack is not None else ""

    def acked_resources(self, stream: str, type_url: str) -> Mapping[str, str]:
        """The content versions of `type_url` the open `stream` holds (empty: none)."""
        record = self._proxies.get(stream)
        ack = record.acked.get(type_url) if record is not None else None
        return ack.resources if ack is not None else MappingProxyType({})

    def last_nack(self, stream: str) -> Nack | None:
        """The last NACK of the open `stream` (None: none, or not open)."""
        record = self._proxies.get(stream)
        return record.last_nack if record is not None else None

    def connections(self) -> list[tuple[str, Mapping[str, Any]]]:
        """(node id, metadata) of every open stream, in the order they connected, without
        building their statuses: after a fan-out every stream's status is stale, and
        `proxies()` then builds 10,000 of them (~40 ms of the loop) for a reader that wants
        only who is connected."""
        return [(record.node_id, record.metadata) for record in self._proxies.values()]

    def metadata_index(self, key: str) -> MetadataIndex:
        """The index of the open streams' values of metadata `key` (see `MetadataIndex`),
        made on the first call (every node id then counts as changed) and kept up to date
        from then on as streams open and end."""
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = MetadataIndex(key)
            for record in self._proxies.values():  # oldest first
                index._add(record.node_id, record.stream, record.metadata)
        return index

    def open_streams(self) -> int:
        """How many streams are open now (without building their statuses)."""
        return len(self._proxies)

    def get(self, stream: str) -> ProxyStatus | None:
        record = self._proxies.get(stream)
        return record.view() if record is not None else None

    def of_node(self, node_id: str) -> tuple[ProxyStatus, ...]:
        """The open streams presenting `node_id` (usually one), oldest first."""
        found = (self._proxies[s].view() for s in self._by_node.get(node_id, ()) if s in self._proxies)
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
        # A proxyless gRPC process opens one stream per channel target, all with its one node
        # id: expected there (each stream still counts as its own proxy).
        if len(streams) > 1 and key.partition(SCOPE_SEPARATOR)[0] != PROXYLESS_KEY:
            log.warning(
                "node id %r has %d open xDS streams (%s): each is tracked as its own proxy; "
                "give every Envoy a unique node id",
                node.id,
                len(streams),
                ", ".join(sorted(streams)),
            )
        self._proxies[stream] = _Record(
            node_id=node.id,
            cluster=node.cluster,
            key=key,
            protocol=protocol,
            metadata=MappingProxyType(json_format.MessageToDict(node.metadata)),
            stream=stream,
            connected_at=now(),
        )
        for index in self._indexes.values():
            index._add(node.id, stream, self._proxies[stream].metadata)
        self._membership += 1
        self._touch(stream)
        self._tell(ProxyEvent(CONNECTED, node.id, stream=stream))

    def disconnected(self, stream: str) -> None:
        """The stream ended: its state is released now (a no-op for an unknown stream)."""
        record = self._proxies.pop(stream, None)
        if record is None:
            return
        multimap.discard(self._by_node, record.node_id, stream)
        for index in self._indexes.values():
            index._remove(record.node_id, stream)
        self._membership += 1
        self._touch(stream)
        self._prune_journal()
        self._tell(ProxyEvent(DISCONNECTED, record.node_id, stream=stream))

    def pushed(self, stream: str, push: Push) -> None:
        record = self._proxies.get(stream)
        if record is not None:
            record.pushes.append((push.type_url, push.version, push.nonce, push.resources, push.removed))
            record.frozen = None
            self._touch(stream)
            self._tell(ProxyEvent(PUSHED, record.node_id, push.type_url, push.version, stream=stream))

    def acked(self, stream: str, type_url: str, ack: TypeAck) -> None:
        record = self._proxies.get(stream)
        if record is None:
            return
        # A read-only view is kept as given (the server passes versions it never mutates,
        # shared by every stream that ACKed the same set); anything else is copied.
        if not isinstance(ack.resources, MappingProxyType):
            ack = replace(ack, resources=MappingProxyType(dict(ack.resources)))
        record.acked[type_url] = ack
        record.frozen = None
        self._touch(stream)
        self._tell(ProxyEvent(ACKED, record.node_id, type_url, ack.version, stream=stream))

    def nacked(self, stream: str, nack: Nack) -> None:
        record = self._proxies.get(stream)
        if record is not None:
            record.last_nack = replace(nack, stream=stream)
            record.frozen = None
            self._touch(stream)
            self._tell(ProxyEvent(NACKED, record.node_id, nack.type_url, nack.version, stream=stream))

    def _tell(self, event: ProxyEvent) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("proxy listener %r failed on %s", listener, event)

    def _touch(self, stream: str) -> None:
        """`stream` changed: a new sequence, noted for `proxies()` and `changed_since`."""
        self._dirty.add(stream)
        self._bump()
        journal = self._journal
        journal.pop(stream, None)
        journal[stream] = self._seq

    def _prune_journal(self) -> None:
        """Forget ended streams once they outnumber the open ones (plus some slack): a reader
        that last read before the newest of them reads everything again."""
        journal = self._journal
        if len(journal) <= 2 * len(self._proxies) + _JOURNAL_SLACK:
            return
        kept: dict[str, int] = {}
        for stream, seq in journal.items():
            if stream in self._proxies:
                kept[stream] = seq
            else:
                self._horizon = max(self._horizon, seq)
        self._journal = kept

    def _bump(self) -> None:
        self._seq += 1
        if self._wake_loop is not None:
            # A wake is already scheduled (the tracker lives on one loop). Checked first:
            # asyncio.get_running_loop() makes a getpid() system call each time, and a
            # fan-out bumps twice per stream per change (7 % of the loop's samples at
            # 10,000 streams, with the streams' own queue waits).
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._wake()
            return
        self._wake_loop = loop
        loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_loop = None
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


_stream_numbers = itertools.count(1)


def new_stream_id(node_id: str) -> str:
    """A process-unique, never reused id for one xDS stream of `node_id`."""
    return f"{node_id}#{next(_stream_numbers)}"


def now() -> float:
    return time.time()
