"""Ending long-lived response streams when the control plane stops.

A graceful gRPC stop lets calls in flight finish for a grace period. Unary calls finish
in milliseconds, but a Watch, WatchMetrics or agent stream never finishes on its own, so
the stop would always take the whole grace period, and the clients would only move to
another replica once it has passed. `ClosingInterceptor` wraps every handler that streams
its responses: once `close()` is called, each such stream ends (UNAVAILABLE) after the
message it is producing, and the client reconnects elsewhere straight away.

`Continuation` is the type every server interceptor of the control plane is handed.
`run_until_signalled` is how a process (`graylane serve`, `graylane agent`) stops: on
SIGTERM/SIGINT its main coroutine is cancelled and waited for, so its stops run.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

#: What gRPC hands a server interceptor's `intercept_service`: the lookup of the next
#: interceptor's (in the end the method's) handler. The control plane's interceptors
#: (this module's, release_service's auth, telemetry's tracing) all take one.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


async def until_set(stream: AsyncIterator[T], stop: asyncio.Event) -> AsyncIterator[T]:
    """The items of `stream` until it ends or `stop` is set, whichever comes first."""
    stopped = asyncio.ensure_future(stop.wait())
    item: asyncio.Future[T] | None = None
    try:
        while not stop.is_set():
            item = asyncio.ensure_future(anext(stream))
            await asyncio.wait({item, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                return
            try:
                value = item.result()
            except StopAsyncIteration:
                return
            yield value
    finally:
        stopped.cancel()
        if item is not None and not item.done():
            item.cancel()  # the stream is inside a step: end that step first, then close it
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await item
        if inspect.isasyncgen(stream):
            await stream.aclose()


class ClosingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Makes every response stream of a server end when `close()` is called."""

    def __init__(self) -> None:
        self._closing = asyncio.Event()

    def close(self) -> None:
        self._closing.set()

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not handler.response_streaming:
            return handler
        if handler.request_streaming:
            inner, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        else:
            inner, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        if not inspect.isasyncgenfunction(inner):
            return handler  # a handler that writes through its context: left as it is

        closing = self._closing

        async def closable(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in until_set(inner(request, context), closing):
                yield response
            if closing.is_set():
                # Not the stream's own end: say so, and the client knows to reconnect.
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is stopping; reconnect")

        return make(
            closable,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def run_until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` until it ends or SIGTERM/SIGINT arrives, then cancel it and wait for it."""
    runner = asyncio.create_task(main)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
