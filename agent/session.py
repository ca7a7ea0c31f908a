"""The agent's stream to the control plane: hello, facts up, views down, reconnects.

Owns: one `AgentService.Connect` stream at a time; sending the hello (with the cluster's
credential in the call metadata), the current endpoint set, proxy reports and heartbeats;
handing every received `ClusterView` to a callback; and reconnecting with jittered
exponential backoff when the stream fails or is refused. Refusals (wrong credential,
cluster name taken) are logged with the control plane's reason and retried at the
longest backoff, so an operator can fix them without restarting the agent.

A control plane that hangs (stopped, its loop stalled, a half-open connection) never closes
the stream, so two checks count it as gone: HTTP/2 keepalive pings on the channel (gRPC
ends the connection when a ping is not answered within the timeout), and a health check
sent on the same channel every heartbeat that must be answered within
`answer_timeout_seconds` (it needs the control plane's event loop, which a ping does not).
`disconnected_since` then dates from the last answer, not from the detection.

Concurrency: one asyncio loop; `run()` is the only loop and is cancellable.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc
from graylane.agent.defaults import DEFAULT_ANSWER_TIMEOUT_SECONDS
from graylane.controlplane.api.tls import ClientTls, open_channel
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import agent_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

_REFUSED = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INVALID_ARGUMENT,
}


DEFAULT_KEEPALIVE_SECONDS = 2.0


class ControlPlaneSilent(Exception):
    """The control plane stopped answering on an open stream (hung, not closed)."""


class Backoff:
    """Full-jitter exponential backoff: a random delay in [0, min(cap, base * 2**n)]."""

    def __init__(self, *, base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self._rng = rng or random.Random()
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return self._rng.uniform(0, ceiling)

    def longest(self) -> float:
        return self.cap

    def reset(self) -> None:
        self._attempt = 0


class ControlPlaneSession:
    def __init__(
        self,
        *,
        target: str,
        hello: apb.AgentHello,
        token: str = "",
        on_view: Callable[[apb.ClusterView], None],
        backoff: Backoff | None = None,
        answer_timeout_seconds: float = DEFAULT_ANSWER_TIMEOUT_SECONDS,
        keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS,
        tls: ClientTls | None = None,
    ) -> None:
        self.target = target
        self.tls = tls  # None: plain text
        self.answer_timeout_seconds = answer_timeout_seconds
        self.keepalive_seconds = keepalive_seconds
        self.hello = hello
        self.token = token
        self._on_view = on_view
        self._backoff = backoff or Backoff()
        self._outbox: asyncio.Queue[apb.AgentMessage] | None = None
        self._endpoints: apb.EndpointSnapshot | None = None
        self._report: apb.ProxyReport | None = None
        self._pending_guard: list[apb.GuardReport] = []
        self.connected = asyncio.Event()
        self.disconnected_since: float | None = time.monotonic()  # None while connected
        self.refused = ""  # the control plane's last refusal, "" when none
        self.heartbeat_seconds = 1.0
        self.lease_ttl_seconds = 0  # the control plane's agent lease, from its welcome
        self.last_answer: float | None = None  # monotonic time of the control plane's last answer
        self._outage_logged = False

    # ------------------------------------------------------------ facts to send

    def set_endpoints(self, snapshot: apb.EndpointSnapshot) -> None:
        self._endpoints = snapshot
        self._send(apb.AgentMessage(endpoints=snapshot))

    def set_report(self, report: apb.ProxyReport) -> None:
        if report == self._report:
            return
        self._report = report
        self._send(apb.AgentMessage(proxies=report))

    def add_guard_reports(self, reports: list[apb.GuardReport]) -> None:
        """Send now if connected, else on the next welcome."""
        for report in reports:
            if self._outbox is not None and self.connected.is_set():
                self._outbox.put_nowait(apb.AgentMessage(guard=report))
            else:
                self._pending_guard.append(report)

    def send_metrics(self, report: apb.MetricsReport) -> None:
        """Deltas are sent only while connected: the control plane stamps them on arrival."""
        self._send(apb.AgentMessage(metrics=report))

    def _send(self, message: apb.AgentMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        while True:
            try:
                await self._stream()
                log.info("the control plane ended the stream; reconnecting")
                delay = self._backoff.next()
            except ControlPlaneSilent as exc:
                log.log(
                    logging.DEBUG if self._outage_logged else logging.WARNING,
                    "the control plane at %s stopped answering (%s); reconnecting",
                    self.target,
                    exc,
                )
                self._outage_logged = True
                delay = self._backoff.next()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _REFUSED:
                    refused = f"{exc.code().name}: {exc.details()}"
                    # Said once per reason: a refused agent retries at the longest backoff.
                    log.log(
                        logging.ERROR if refused != self.refused else logging.DEBUG,
                        "the control plane refused this agent: %s",
                        refused,
                    )
                    self.refused = refused
                    delay = self._backoff.longest()
                else:
                    # Said once per outage; the attempts that follow are debug noise.
                    log.log(
                        logging.DEBUG if self._outage_logged else logging.WARNING,
                        "control plane stream lost (%s); reconnecting",
                        exc.code().name,
                    )
                    self._outage_logged = True
                    delay = self._backoff.next()
            except Exception:
                # Never let one bad stream end the agent: its Envoys still need it.
                log.exception("control plane stream failed; reconnecting")
                delay = self._backoff.next()
            finally:
                self._outbox = None
                if self.connected.is_set():
                    self.connected.clear()
                    # Since the last sign of life: a hang is noticed only after the timeout.
                    now = time.monotonic()
                    self.disconnected_since = now if self.last_answer is None else min(now, self.last_answer)
            await asyncio.sleep(delay)

    def _channel_options(self) -> list[tuple[str, int]]:
        ms = round(self.keepalive_seconds * 1000)
        return [
            ("grpc.keepalive_time_ms", ms),
            ("grpc.keepalive_timeout_ms", round(self.answer_timeout_seconds * 1000)),
            # Heartbeats are data, but pings must go on whatever the stream carries.
            ("grpc.http2.max_pings_without_data", 0),
        ]

    async def _stream(self) -> None:
        metadata = (("x-graylane-cluster", self.hello.cluster), ("authorization", f"Bearer {self.token}"))
        async with open_channel(self.target, self.tls, options=self._channel_options()) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            outbox: asyncio.Queue[apb.AgentMessage] = asyncio.Queue()
            outbox.put_nowait(apb.AgentMessage(hello=self.hello))
            if self._endpoints is not None:
                outbox.put_nowait(apb.AgentMessage(endpoints=self._endpoints))
            if self._report is not None:
                outbox.put_nowait(apb.AgentMessage(proxies=self._report))
            # Facts that change from now on go to this stream: the control plane reads them
            # after the hello (gRPC buffers them meanwhile), so a change made before the
            # welcome arrives is never lost.
            self._outbox = outbox
            call = stub.Connect(self._requests(outbox), metadata=metadata)
            # Whichever ends first ends the stream: the stream itself, or the watchdog (a
            # health check not answered in time).
            watchdog: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            side: list[asyncio.Task[None]] = []
            messages = asyncio.create_task(self._messages(call, outbox, channel, side, watchdog))
            try:
                await asyncio.wait({messages, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (messages, *side):
                    task.cancel()
                await asyncio.gather(messages, *side, return_exceptions=True)
                call.cancel()
            if watchdog.done() and (silent := watchdog.exception()) is not None:
                raise silent
            messages.result()  # the stream's own end: normal, or its gRPC error

    async def _messages(
        self,
        call: grpc.aio.StreamStreamCall[apb.AgentMessage, apb.ControlMessage],
        outbox: asyncio.Queue[apb.AgentMessage],
        channel: grpc.aio.Channel,
        side: list[asyncio.Task[None]],
        watchdog: asyncio.Future[None],
    ) -> None:
        async for message in call:
            self.last_answer = time.monotonic()
            kind = message.WhichOneof("kind")
            if kind == "welcome":
                self._welcomed(message.welcome, outbox)
                side.append(asyncio.create_task(self._heartbeats(outbox)))
                side.append(asyncio.create_task(self._probe(channel, watchdog)))
            elif kind == "view":
                self._on_view(message.view)

    async def _probe(self, channel: grpc.aio.Channel, watchdog: asyncio.Future[None]) -> None:
        """A health check every heartbeat, each answered within the answer timeout."""
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.answer_timeout_seconds)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # a closed connection ends the stream itself
                if not watchdog.done():
                    watchdog.set_exception(
                        ControlPlaneSilent(f"no answer to a health check within {self.answer_timeout_seconds:g}s")
                    )
                return
            self.last_answer = time.monotonic()

    def _welcomed(self, welcome: apb.Welcome, outbox: asyncio.Queue[apb.AgentMessage]) -> None:
        self.refused = ""
        self._outage_logged = False
        self._backoff.reset()
        if welcome.heartbeat_interval_ms:
            self.heartbeat_seconds = welcome.heartbeat_interval_ms / 1000
        self.lease_ttl_seconds = welcome.lease_ttl_seconds
        for report in self._pending_guard:
            outbox.put_nowait(apb.AgentMessage(guard=report))
        self._pending_guard.clear()
        self.disconnected_since = None
        self.connected.set()
        log.info("connected to the control plane at %s as cluster %s", self.target, welcome.cluster)

    async def _heartbeats(self, outbox: asyncio.Queue[apb.AgentMessage]) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            outbox.put_nowait(apb.AgentMessage(heartbeat=apb.Heartbeat()))

    @staticmethod
    async def _requests(outbox: asyncio.Queue[apb.AgentMessage]) -> AsyncIterator[apb.AgentMessage]:
        while True:
            yield await outbox.get()
