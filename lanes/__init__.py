"""Lane propagation for gRPC services called without a sidecar (proxyless gRPC).

Owns: reading the gray lane of an incoming call (`x-graylane`, or the W3C baggage member
``graylane=<lane>`` when that header is absent), keeping it for the call's duration
(`current_lane`, a context variable), and stamping it on every outgoing call made
meanwhile, as both carriers, so the next hop's routes send the call to its version in the
lane. Envoy stamps the lane itself; a proxyless gRPC client cannot (gRPC ignores a route's
header additions), so the services carry it, as an OpenTelemetry SDK carries baggage.

Use (grpc.aio)::

    server = grpc.aio.server(interceptors=[LaneServerInterceptor(own_lane=os.environ.get("GRAYLANE_LANE"))])
    channel = grpc.aio.insecure_channel("xds:///checkout", interceptors=[LaneClientInterceptor()])

`own_lane`: set it on a gray version deployed for lane L. A proxyless client decides the
lane at the release's entry by routing alone (a rule or the weighted split sends the call
to the gray version) and cannot tag the call; the gray version knows it only serves its
lane, so it stamps L on calls that arrive untagged. Calls already tagged keep their tag.

Only this package's own names are public: `LANE_HEADER`, `BAGGAGE_HEADER`, `BAGGAGE_KEY`,
`current_lane`, `lane_scope`, `lane_of`, `with_lane`, `LaneServerInterceptor`,
`LaneClientInterceptor`. Must not import: etcd, graylane.controlplane, graylane.xds.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote, unquote

import grpc

__all__ = [
    "BAGGAGE_HEADER",
    "BAGGAGE_KEY",
    "LANE_HEADER",
    "LaneClientInterceptor",
    "LaneServerInterceptor",
    "current_lane",
    "lane_of",
    "lane_scope",
    "with_lane",
]

# The same carriers Envoy's routes read and stamp (graylane.xds.view).
LANE_HEADER = "x-graylane"
BAGGAGE_HEADER = "baggage"
BAGGAGE_KEY = "graylane"

_lane: contextvars.ContextVar[str | None] = contextvars.ContextVar("graylane_lane", default=None)

Metadata = Iterable[tuple[str, str | bytes]]


def current_lane() -> str | None:
    """The lane of the call being served in this context (None: outside any lane)."""
    return _lane.get()


@contextlib.contextmanager
def lane_scope(lane: str | None) -> Iterator[None]:
    """Calls made inside the block carry `lane` (None: none), whatever the context had."""
    token = _lane.set(lane or None)
    try:
        yield
    finally:
        _lane.reset(token)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _baggage_lane(value: str) -> str | None:
    """The ``graylane`` member of one baggage value (members ","-separated, properties after ";")."""
    for member in value.split(","):
        key, sep, rest = member.partition("=")
        if sep and key.strip() == BAGGAGE_KEY:
            lane = unquote(rest.split(";", 1)[0].strip())
            return lane or None
    return None


def lane_of(metadata: Metadata | None) -> str | None:
    """The lane a call's metadata carries: `x-graylane` wins, else the baggage member."""
    baggage: list[str] = []
    for key, value in metadata or ():
        name = key.lower()
        if name == LANE_HEADER:
            lane = _text(value).strip()
            if lane:
                return lane
        elif name == BAGGAGE_HEADER:
            baggage.append(_text(value))
    for value in baggage:
        found = _baggage_lane(value)
        if found:
            return found
    return None


def with_lane(metadata: Metadata | None, lane: str | None) -> list[tuple[str, str | bytes]]:
    """`metadata` carrying `lane` in both carriers (unchanged when `lane` is None).

    An `x-graylane` already there is replaced; the lane joins an existing baggage value as
    one more member (a ``graylane`` member there is replaced), so other members survive.
    """
    out = [(k, v) for k, v in (metadata or ()) if k.lower() != LANE_HEADER]
    if not lane:
        return out
    member = f"{BAGGAGE_KEY}={quote(lane, safe='')}"
    merged = False
    for i, (key, value) in enumerate(out):
        if key.lower() == BAGGAGE_HEADER and not merged:
            kept = [m for m in _text(value).split(",") if m.strip() and m.partition("=")[0].strip() != BAGGAGE_KEY]
            out[i] = (key, ",".join([*kept, member]))
            merged = True
    if not merged:
        out.append((BAGGAGE_HEADER, member))
    out.append((LANE_HEADER, lane))
    return out


# ----------------------------------------------------------------------------- server


def _in_lane(behavior: Callable[..., Any], lane: str | None, *, streaming_response: bool) -> Callable[..., Any]:
    """`behavior` run with `lane` as the current lane (each call gets its own context)."""
    if streaming_response:

        @functools.wraps(behavior)
        async def stream(request: Any, context: Any) -> Any:
            token = _lane.set(lane)
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):  # a handler that writes with context.write
                    await result
                else:
                    for item in result:
                        yield item
            finally:
                _lane.reset(token)

        return stream

    @functools.wraps(behavior)
    async def unary(request: Any, context: Any) -> Any:
        token = _lane.set(lane)
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            _lane.reset(token)

    return unary


class LaneServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Makes the incoming call's lane the current lane while its handler runs.

    `own_lane`: the lane of a gray version (see the module docstring): a call that arrives
    untagged is in it.
    """

    def __init__(self, *, own_lane: str | None = None) -> None:
        self.own_lane = own_lane or None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        lane = lane_of(handler_call_details.invocation_metadata) or self.own_lane
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_in_lane(handler.unary_unary, lane, streaming_response=False))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_in_lane(handler.unary_stream, lane, streaming_response=True))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_in_lane(handler.stream_unary, lane, streaming_response=False))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_in_lane(handler.stream_stream, lane, streaming_response=True))
        return handler


# ----------------------------------------------------------------------------- client


def _stamped(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    lane = _lane.get()
    if lane is None:
        return details
    metadata: Sequence[tuple[str, str | bytes]] = tuple(details.metadata or ())
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*with_lane(metadata, lane)),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class LaneClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Stamps the current lane (`current_lane`) on every outgoing call, in both carriers."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_stamped(client_call_details), request)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_stamped(client_call_details), request)

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_stamped(client_call_details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_stamped(client_call_details), request_iterator)
