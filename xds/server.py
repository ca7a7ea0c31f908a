"""The ADS server: state-of-the-world and delta xDS over grpc.aio.

Owns: the two stream loops (StreamAggregatedResources, DeltaAggregatedResources), the
per-type subscription state they share (`_TypeState`), nonces, ACK/NACK detection, and
the make-before-break push: after every snapshot change and every ACK the stream re-plans
(`graylane.xds.plan.plan`) and sends, in `PUSH_ORDER`, only the types whose content for
this proxy changed. ACKs, NACKs and pushes are reported to a `ProxyTracker`.

Protocol rules kept here (Envoy's "xDS REST and gRPC protocol"):
* one nonce per response; each stream's loop owns its nonces;
* SotW: a request whose response_nonce is not the latest nonce sent for its type is stale
  and ignored; ACK vs NACK is the presence of error_detail; LDS/CDS are wildcard, EDS/RDS
  answer the requested names; a response is sent only when its version differs from what
  the proxy has;
* delta: only changed resources plus removed_resources names; subscribe / unsubscribe /
  wildcard; per-resource versions; each response is ACKed on its own, so every
  outstanding nonce is tracked (a delta response is incremental: dropping an "older" ACK
  would lose what it carried);
* the node comes from the first request of a stream (later ones may omit it);
* a proxy that reconnects presenting versions it already has (SotW version_info, delta
  initial_resource_versions), to this replica or another, is not re-sent them: versions
  are content hashes, matched against the snapshot and the cache's content history.

Concurrency: one asyncio loop; one task per stream plus its request reader, both
cancelled when the stream ends. However a stream ends (the client cancels or vanishes,
grpc cancels the handler, the server closes, bad node metadata), `_Stream.stop()` releases
it synchronously, exactly once, before anything can suspend: the tracker and the cache
never keep a stream that is gone. Must not import: etcd, graylane.controlplane,
graylane.agent.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message
from graylane.xds.cache import InvalidNodeMetadata, SnapshotCache, Watch
from graylane.xds.plan import Plan, plan
from graylane.xds.resources import (
    CLUSTER,
    LISTENER,
    PUSH_ORDER,
    Resources,
    content_version,
    packed,
    set_version,
)
from graylane.xds.tracker import DELTA, SOTW, Nack, ProxyTracker, Push, TypeAck, new_stream_id, now

log = logging.getLogger(__name__)

WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})
WILDCARD = "*"

Req = TypeVar("Req", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
Resp = TypeVar("Resp", discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)


class _Signal(enum.Enum):
    SNAPSHOT_CHANGED = "snapshot changed"
    END_OF_STREAM = "end of stream"


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


@dataclass
class _Pending:
    """One delta response not yet ACKed or NACKed."""

    version: str
    resources: dict[str, Message]
    removed: tuple[str, ...]


@dataclass
class _TypeState:
    """What one stream knows of one resource type: subscription, sent and ACKed content."""

    type_url: str
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    subscribed: bool = False  # a request for this type was seen on the stream
    sent: dict[str, Message] = field(default_factory=dict)  # content the proxy has or will
    sent_versions: dict[str, str] = field(default_factory=dict)  # includes unresolved ones
    acked: dict[str, Message] = field(default_factory=dict)
    acked_version: str = ""
    # SotW: version_info of the latest response (or the one the proxy presented).
    sotw_version: str = ""
    latest_nonce: str = ""
    # delta: every outstanding response by nonce.
    pending: dict[str, _Pending] = field(default_factory=dict)

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def select(self, items: Mapping[str, Message]) -> dict[str, Message]:
        return {n: m for n, m in sorted(items.items()) if self.wants(n)}

    def forget_unwanted(self) -> None:
        for store in (self.sent, self.sent_versions, self.acked):
            for name in [n for n in store if not self.wants(n)]:
                del store[name]


class _Stream(Generic[Req, Resp]):
    """State and logic shared by the SotW and delta stream loops of one proxy."""

    protocol = ""

    def __init__(self, cache: SnapshotCache, tracker: ProxyTracker) -> None:
        self.cache = cache
        self.tracker = tracker
        self.node = base_pb2.Node()
        self.key = ""
        self.stream_id = ""  # set by the first request: the proxy's identity in the tracker
        self.types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)
        self._watch: Watch | None = None
        self._events: asyncio.Queue[Req | _Signal] = asyncio.Queue()
        self._snapshot_changed = False
        self._stopped = False

    # -- the loop --------------------------------------------------------------------------

    async def run(self, requests: AsyncIterator[Req], send: Callable[[Resp], Awaitable[None]]) -> None:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (event := await self._events.get()) is not _Signal.END_OF_STREAM and not self._stopped:
                if isinstance(event, _Signal):
                    self._snapshot_changed = False
                else:
                    self._start(event)
                    self.handle(event)
                for response in self.push():
                    await send(response)
        finally:
            # Release the stream before anything can suspend this task: a second
            # cancellation (the client going away while the reader is awaited) must not
            # leave a ghost proxy in the tracker or a watch in the cache.
            self.stop()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[Req]) -> None:
        try:
            async for request in requests:
                self._events.put_nowait(request)
        finally:
            self._events.put_nowait(_Signal.END_OF_STREAM)

    def end(self) -> None:
        """Finish the loop after whatever it is doing now (the server is closing)."""
        self._events.put_nowait(_Signal.END_OF_STREAM)

    def _on_snapshot(self) -> None:
        if not self._snapshot_changed:
            self._snapshot_changed = True
            self._events.put_nowait(_Signal.SNAPSHOT_CHANGED)

    def _start(self, request: Req) -> None:
        if self.stream_id or self._stopped:
            return
        self.node.CopyFrom(request.node)
        self.key = self.cache.key_for_node(self.node)  # raises InvalidNodeMetadata
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
        target = self.cache.snapshot(self.key)
        if target is None:
            return None
        acked = {t: s.acked for t, s in self.types.items()}
        sent = {t: s.sent for t, s in self.types.items()}
        return plan(target, acked=acked, sent=sent)

    def target(self) -> Resources | None:
        return self.cache.snapshot(self.key)

    def blocked(self, st: _TypeState, planned: Plan, items: Mapping[str, Message]) -> bool:
        """Hold a type back while a wanted target resource is held with nothing to stand in.

        Sending the type without it would tell the proxy to drop (SotW wildcard) or never
        get (first push) the resource; better to wait until the plan releases it.
        """
        return any(t == st.type_url and st.wants(n) and n not in items for t, n in planned.held)

    def record_ack(self, st: _TypeState, version: str) -> None:
        st.acked_version = version
        ack = TypeAck(version, {n: content_version(m) for n, m in st.acked.items()})
        self.tracker.acked(self.stream_id, st.type_url, ack)
        log.info("ACK %s %s version %s", self.stream_id, _short(st.type_url), version)

    def record_nack(self, st: _TypeState, version: str, nonce: str, message: str) -> None:
        self.tracker.nacked(self.stream_id, Nack(st.type_url, version, nonce, message, now(), stream=self.stream_id))
        log.warning("NACK %s %s version %s: %s", self.stream_id, _short(st.type_url), version, message)

    def record_push(self, st: _TypeState, push: Push) -> None:
        self.tracker.pushed(self.stream_id, push)
        log.info(
            "push %s %s version %s nonce %s: %d resources, %d removed",
            self.stream_id,
            _short(st.type_url),
            push.version,
            push.nonce,
            len(push.resources),
            len(push.removed),
        )

    def resolve_initial(self, st: _TypeState, name: str, version: str) -> Message | None:
        """The content of resource `name` at content `version`, if this replica knows it."""
        target = self.target()
        if target is not None and target[st.type_url].versions.get(name) == version:
            known: Message = target[st.type_url].items[name]
            return known
        remembered: Message | None = self.cache.history.message(st.type_url, version)
        return remembered

    # -- per protocol ----------------------------------------------------------------------

    def handle(self, request: Req) -> None:
        raise NotImplementedError

    def push(self) -> list[Resp]:
        raise NotImplementedError


def _versions(planned: Plan, type_url: str, items: Mapping[str, Message]) -> dict[str, str]:
    """Content versions of the selected items (computed once, by the planned Resources)."""
    known = planned.resources[type_url].versions
    return {name: known[name] for name in items}


def _pack(message: Message) -> any_pb2.Any:
    # Serialised once per resource content and shared by every stream (resources.packed).
    return packed(message)


class _SotwStream(_Stream[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]):
    protocol = SOTW

    def handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        st = self.state(request.type_url)
        if request.response_nonce and request.response_nonce != st.latest_nonce:
            log.debug("stale %s nonce %s from %s", _short(st.type_url), request.response_nonce, self.node.id)
            return
        first = not st.subscribed
        st.subscribed = True
        names = set(request.resource_names)
        st.wildcard = st.type_url in WILDCARD_TYPES and (not names or WILDCARD in names)
        st.names = names - {WILDCARD}
        st.forget_unwanted()
        if request.response_nonce:
            self._ack_or_nack(st, request)
        elif first and request.version_info:
            self._adopt_presented(st, request.version_info)

    def _ack_or_nack(self, st: _TypeState, request: discovery_pb2.DiscoveryRequest) -> None:
        if request.HasField("error_detail"):
            self.record_nack(st, st.sotw_version, request.response_nonce, request.error_detail.message)
            return
        st.acked = dict(st.sent)
        self.record_ack(st, request.version_info)

    def _adopt_presented(self, st: _TypeState, version: str) -> None:
        """A reconnecting proxy presents the version it holds: learn its content if we can."""
        st.sotw_version = version
        items = self._resolve_set(st, version)
        if items is None:
            log.info("%s presents unknown %s version %s", self.node.id, _short(st.type_url), version)
            return
        st.sent = dict(items)
        st.sent_versions = {n: content_version(m) for n, m in items.items()}
        st.acked = dict(items)
        self.record_ack(st, version)

    def _resolve_set(self, st: _TypeState, version: str) -> Mapping[str, Message] | None:
        target = self.target()
        if target is not None:
            items = st.select(target[st.type_url].items)
            if set_version({n: content_version(m) for n, m in items.items()}) == version:
                return items
        remembered: Mapping[str, Message] | None = self.cache.history.resolve_set(st.type_url, version)
        return remembered

    def push(self) -> list[discovery_pb2.DiscoveryResponse]:
        planned = self.current_plan()
        if planned is None:
            return []
        responses = []
        for type_url in PUSH_ORDER:
            st = self.types.get(type_url)
            if st is None or not st.subscribed:
                continue
            response = self._respond(st, planned)
            if response is not None:
                responses.append(response)
        return responses

    def _respond(self, st: _TypeState, planned: Plan) -> discovery_pb2.DiscoveryResponse | None:
        items = st.select(planned.resources[st.type_url].items)
        if self.blocked(st, planned, items):
            return None
        versions = _versions(planned, st.type_url, items)
        version = set_version(versions)
        if version == st.sotw_version:
            return None
        self.cache.history.remember(st.type_url, items)
        nonce = self.next_nonce()
        st.sent = items
        st.sent_versions = versions
        st.sotw_version = version
        st.latest_nonce = nonce
        self.record_push(st, Push(st.type_url, version, nonce, tuple(items)))
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[_pack(m) for m in items.values()],
            type_url=st.type_url,
            nonce=nonce,
        )


class _DeltaStream(_Stream[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse]):
    protocol = DELTA

    def handle(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        st = self.state(request.type_url)
        if request.response_nonce:
            self._ack_or_nack(st, request)
        first = not st.subscribed
        st.subscribed = True
        if first:
            self._first_request(st, request)
        self._subscribe(st, request)

    def _first_request(self, st: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        # Legacy wildcard: a first LDS/CDS request that names nothing.
        st.wildcard = st.type_url in WILDCARD_TYPES and not request.resource_names_subscribe
        for name, version in request.initial_resource_versions.items():
            st.sent_versions[name] = version
            message = self.resolve_initial(st, name, version)
            if message is not None:
                st.sent[name] = message
                st.acked[name] = message
        if request.initial_resource_versions:
            self.record_ack(st, set_version(dict(request.initial_resource_versions)))

    def _subscribe(self, st: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        for name in request.resource_names_subscribe:
            if name == WILDCARD:
                st.wildcard = True
            else:
                st.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                st.wildcard = False
            else:
                st.names.discard(name)
        st.forget_unwanted()

    def _ack_or_nack(self, st: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        pending = st.pending.pop(request.response_nonce, None)
        if pending is None:
            log.debug("unknown %s nonce %s from %s", _short(st.type_url), request.response_nonce, self.node.id)
            return
        if request.HasField("error_detail"):
            self.record_nack(st, pending.version, request.response_nonce, request.error_detail.message)
            return
        for name, message in pending.resources.items():
            if st.wants(name):
                st.acked[name] = message
        for name in pending.removed:
            st.acked.pop(name, None)
        self.record_ack(st, pending.version)

    def push(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        planned = self.current_plan()
        if planned is None:
            return []
        responses = []
        for type_url in PUSH_ORDER:
            st = self.types.get(type_url)
            if st is None or not st.subscribed:
                continue
            response = self._respond(st, planned)
            if response is not None:
                responses.append(response)
        return responses

    def _respond(self, st: _TypeState, planned: Plan) -> discovery_pb2.DeltaDiscoveryResponse | None:
        items = st.select(planned.resources[st.type_url].items)
        if self.blocked(st, planned, items):
            return None
        versions = _versions(planned, st.type_url, items)
        changed = {n: m for n, m in items.items() if st.sent_versions.get(n) != versions[n]}
        removed = tuple(sorted(n for n in st.sent_versions if n not in items))
        first = st.latest_nonce == "" and not st.sent_versions
        if not changed and not removed and not (first and not items and st.wildcard):
            return None
        system_version = self.cache.history.remember(st.type_url, items)
        nonce = self.next_nonce()
        for name in removed:
            st.sent.pop(name, None)
            st.sent_versions.pop(name, None)
        st.sent.update(changed)
        st.sent_versions.update({n: versions[n] for n in changed})
        st.latest_nonce = nonce
        st.pending[nonce] = _Pending(system_version, changed, removed)
        self.record_push(st, Push(st.type_url, system_version, nonce, tuple(changed), removed))
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=system_version,
            resources=[
                discovery_pb2.Resource(name=n, version=versions[n], resource=_pack(m)) for n, m in changed.items()
            ],
            removed_resources=list(removed),
            type_url=st.type_url,
            nonce=nonce,
        )


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves a SnapshotCache to Envoys over ADS (SotW and delta), reporting to a tracker."""

    def __init__(self, cache: SnapshotCache, *, tracker: ProxyTracker | None = None) -> None:
        self.cache = cache
        self.tracker = tracker if tracker is not None else ProxyTracker()
        self._streams: set[_Stream[Any, Any]] = set()
        self._closed = False

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
        self._streams.add(stream)
        try:
            await stream.run(requests, context.write)
        except InvalidNodeMetadata as exc:
            log.warning("refused an xDS stream from node %r: %s", stream.node.id, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            stream.stop()
            self._streams.discard(stream)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> None:
        await self._serve(_SotwStream(self.cache, self.tracker), request_iterator, context)

    async def DeltaAggregatedResources(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse],
    ) -> None:
        await self._serve(_DeltaStream(self.cache, self.tracker), request_iterator, context)
