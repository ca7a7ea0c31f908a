"""Graylane's own telemetry: metrics for Prometheus on `/metrics`, traces over OTLP when configured.

Owns, per `Telemetry` (one per control-plane replica or agent):

* an OpenTelemetry `MeterProvider` whose only reader is a `PrometheusMetricReader` bound to
  this Telemetry's OWN prometheus_client `CollectorRegistry`, never the process-global
  `REGISTRY`: several control planes (tests, a replica beside an agent) live in one process
  without clashing, and `/metrics` shows exactly one replica. Nothing here sets the global
  OpenTelemetry providers either.
* the instruments, under stable Prometheus names (the `METRIC_*` constants are the exported
  family names): proxies and agents connected, xDS pushes, push-to-ACK latency, NACKs,
  releases by phase, analysis outcomes, and the event loop's lag (`LoopLag`, a timer
  probe the process runs: how long steps held the loop).
* a `TracerProvider` exporting spans over OTLP/HTTP only when an endpoint is configured
  (`otlp_endpoint=` or `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
  and the gRPC server interceptor that opens a span per unary API call. Without an endpoint
  the tracer is a no-op and no interceptor is installed.

Observable gauges read live state (the xDS tracker, the last store snapshot, the agent hub)
in their callbacks, which run while `/metrics` is rendered: render on the event loop's
thread (`metrics_text()` from an aiohttp handler), never in a worker thread.

Must not import: etcd (it reads store values handed to it), agent code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import grpc
from graylane.controlplane.api.closing import Continuation
from graylane.controlplane.defaults import DEFAULT_LOOP_LAG_INTERVAL_SECONDS
from graylane.controlplane.domain.model.values import Phase
from graylane.xds.tracker import ACKED, DISCONNECTED, NACKED, PUSHED, ProxyEvent, ProxyTracker
from opentelemetry import propagate, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

CONTROL_PLANE_SERVICE = "graylane-controlplane"
AGENT_TELEMETRY_NAME = "graylane-agent"  # the agent's OpenTelemetry service.name

METRIC_PROXIES_CONNECTED = "graylane_proxies_connected"
METRIC_XDS_PUSHES = "graylane_xds_pushes_total"
METRIC_XDS_PUSH_ACK = "graylane_xds_push_ack_seconds"
METRIC_XDS_NACKS = "graylane_xds_nacks_total"
METRIC_RELEASES = "graylane_releases"
METRIC_ANALYSIS = "graylane_analysis_total"
METRIC_AGENTS_CONNECTED = "graylane_agents_connected"
METRIC_STORE_UP = "graylane_store_up"
METRIC_DENIED_CALLS = "graylane_api_denied_total"
METRIC_LOOP_LAG = "graylane_event_loop_lag_seconds"
METRIC_LOOP_LAG_MAX = "graylane_event_loop_lag_max_seconds"
METRIC_LOOP_LAG_CPU = "graylane_event_loop_lag_cpu_seconds"

#: Outcomes `analysis_outcome` accepts (the `outcome` label).
ANALYSIS_OUTCOMES = frozenset({"pass", "fail", "inconclusive"})

# Envoy ACKs a push in about a millisecond on one host; a slow proxy or a big route table
# takes seconds. Buckets from half a millisecond to half a minute.
PUSH_ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# How late the loop woke the lag probe's timer: from a few milliseconds (the OS scheduling
# other work) to seconds (a step that holds the loop).
LOOP_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_OTLP_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_TRACES_PATH = "/v1/traces"


def type_name(type_url: str) -> str:
    """`type.googleapis.com/envoy.config.route.v3.RouteConfiguration` -> `RouteConfiguration`."""
    return type_url.rsplit(".", 1)[-1]


def releases_by_phase(phases: Iterable[Phase]) -> dict[str, int]:
    """Phase name -> how many of `phases` are in it; every phase is present, absent ones at 0."""
    counts = dict.fromkeys((p.name for p in Phase), 0)
    for phase in phases:
        counts[phase.name] += 1
    return counts


class PushAckTimer:
    """Time from a push to the ACK of the same version, per proxy and resource type.

    Pure bookkeeping over values (the clock is passed in). A version pushed again before it
    is ACKed keeps its first push time (the proxy has been waiting since then); a NACK or a
    disconnect drops what was pending. At most `per_type` versions wait per proxy and type,
    the oldest dropped first, so a proxy that never answers cannot grow it.
    """

    def __init__(self, *, per_type: int = 16) -> None:
        self._per_type = per_type
        # proxy -> type_url -> version -> push time: forgetting a proxy is one pop.
        self._pending: dict[str, dict[str, OrderedDict[str, float]]] = {}

    def pushed(self, node_id: str, type_url: str, version: str, at: float) -> None:
        by_type = self._pending.get(node_id)
        if by_type is None:
            by_type = self._pending[node_id] = {}
        pending = by_type.get(type_url)
        if pending is None:
            pending = by_type[type_url] = OrderedDict()
        pending.setdefault(version, at)
        if len(pending) > self._per_type:
            pending.popitem(last=False)

    def acked(self, node_id: str, type_url: str, version: str, at: float) -> float | None:
        """Seconds since `version` was pushed, or None for an ACK of nothing this timer saw pushed.

        Older versions still pending are dropped: the proxy has moved past them.
        """
        pending = self._pending.get(node_id, {}).get(type_url)
        if pending is None or version not in pending:
            return None
        while pending:
            pushed_version, pushed_at = pending.popitem(last=False)
            if pushed_version == version:
                return max(0.0, at - pushed_at)
        return None  # unreachable: `version` was in `pending`

    def nacked(self, node_id: str, type_url: str, version: str) -> None:
        pending = self._pending.get(node_id, {}).get(type_url)
        if pending is not None:
            pending.pop(version, None)

    def forget(self, node_id: str) -> None:
        self._pending.pop(node_id, None)

    def __len__(self) -> int:
        return sum(len(p) for by_type in self._pending.values() for p in by_type.values())


def otlp_traces_url(endpoint: str) -> str:
    """An OTLP/HTTP base URL (like OTEL_EXPORTER_OTLP_ENDPOINT) -> its traces URL."""
    url = endpoint.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{endpoint!r}: expected a URL such as http://127.0.0.1:4318")
    return url if url.endswith(_TRACES_PATH) else url + _TRACES_PATH


def configured_otlp_endpoint(option: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The endpoint traces go to: the option if given, else the standard environment variables."""
    if option:
        return option
    return next((environ[name] for name in _OTLP_ENV if environ.get(name)), None)


class LoopLag:
    """How late the event loop wakes a timer, the cost every other task sees while a step
    holds the loop (a long render or serialisation, a collector pass) or the OS runs
    other processes instead.

    `run()` sleeps `interval` seconds in a loop and hands each wake's lateness to
    `on_lag` (the histogram). The longest lateness since the last `take_longest()` is kept
    with the loop thread's own CPU time over that same sleep: near the lateness when a
    step of this process held the loop, near zero when the process waited for a core.
    `take_longest` resets it, like prom-client's event-loop maximum: one scraper reads the
    longest stall of each scrape interval.
    """

    def __init__(
        self,
        *,
        interval: float = DEFAULT_LOOP_LAG_INTERVAL_SECONDS,
        on_lag: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"loop lag interval {interval!r}: expected a positive number of seconds")
        self.interval = interval
        self._on_lag = on_lag
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._longest = (0.0, 0.0)  # (lateness, loop-thread CPU over that sleep) since the last take

    def woke(self, lateness: float, cpu: float) -> None:
        """One wake `lateness` seconds after it was due, the loop thread having spent `cpu`
        seconds of CPU since the sleep began."""
        lateness = max(0.0, lateness)
        if self._on_lag is not None:
            self._on_lag(lateness)
        if lateness > self._longest[0]:
            self._longest = (lateness, max(0.0, cpu))

    def take_longest(self) -> tuple[float, float]:
        """(lateness, its loop-thread CPU) of the latest wake since the last call; resets."""
        out, self._longest = self._longest, (0.0, 0.0)
        return out

    async def run(self) -> None:
        """Probe until cancelled; run it on the loop it measures."""
        clock, cpu_clock, interval = self._clock, self._cpu_clock, self.interval
        while True:
            started, cpu_started = clock(), cpu_clock()
            await asyncio.sleep(interval)
            self.woke(clock() - started - interval, cpu_clock() - cpu_started)


class Telemetry:
    """Metrics (for `/metrics`) and traces of one control-plane replica or agent.

    Sources are attached after construction (`observe_proxies`, `observe_releases`,
    `observe_agents`, `observe_loop`), so one class serves the control plane and the agent: a gauge with no
    source exports no series. Concurrency: one asyncio loop; instruments are also safe to
    use from threads (the SDK locks).
    """

    def __init__(
        self,
        *,
        service_name: str = CONTROL_PLANE_SERVICE,
        otlp_endpoint: str | None = None,
        span_exporter: SpanExporter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        resource = Resource.create({SERVICE_NAME: service_name})
        self.registry = CollectorRegistry(auto_describe=True)
        # scope_info off: our own instruments come from one meter; otel_scope_* labels on every
        # series would only add noise.
        reader = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        # shutdown_on_exit=False: no atexit hook per instance (tests make many); `aclose` owns it.
        self._meters = MeterProvider(metric_readers=[reader], resource=resource, shutdown_on_exit=False)
        meter = self._meters.get_meter("graylane")
        self._clock = clock
        self._timer = PushAckTimer()
        self._proxies: Callable[[], int] | None = None
        self._releases: Callable[[], Mapping[str, int] | None] | None = None
        self._agents: Callable[[], int] | None = None
        self._store_up: Callable[[], bool] | None = None

        meter.create_observable_gauge(
            METRIC_PROXIES_CONNECTED,
            callbacks=[self._observe_proxies],
            description="Envoy proxies with an open xDS stream to this process",
        )
        self._push_counts: Counter[str] = Counter()  # type_url -> responses sent
        self._nack_counts: Counter[str] = Counter()  # type_url -> responses rejected
        self._type_attributes: dict[str, Mapping[str, str]] = {}
        meter.create_observable_counter(
            METRIC_XDS_PUSHES,
            callbacks=[self._observe_pushes],
            description="xDS responses sent to proxies, by resource type",
        )
        self._push_ack = meter.create_histogram(
            METRIC_XDS_PUSH_ACK,
            unit="s",
            description="Time from an xDS push to the proxy's ACK of that version, by resource type",
            explicit_bucket_boundaries_advisory=PUSH_ACK_BUCKETS,
        )
        meter.create_observable_counter(
            METRIC_XDS_NACKS,
            callbacks=[self._observe_nacks],
            description="xDS responses proxies rejected (NACK), by resource type",
        )
        meter.create_observable_gauge(
            METRIC_RELEASES, callbacks=[self._observe_releases], description="Releases by phase"
        )
        self._analysis = meter.create_counter(
            METRIC_ANALYSIS, description="Analysis verdicts by outcome (pass, fail, inconclusive) and release"
        )
        self._denied = meter.create_counter(
            METRIC_DENIED_CALLS,
            description="API calls refused: unauthenticated, or the identity lacks the role, scope or cluster",
        )
        meter.create_observable_gauge(
            METRIC_AGENTS_CONNECTED,
            callbacks=[self._observe_agents],
            description="Cluster agents with an open session to this replica",
        )
        meter.create_observable_gauge(
            METRIC_STORE_UP,
            callbacks=[self._observe_store],
            description="1 while this replica can use etcd (a quorum answers), 0 while it cannot",
        )
        # The loop-lag probe's wakes (a histogram with no wakes exports no series).
        self._lag_histogram = meter.create_histogram(
            METRIC_LOOP_LAG,
            unit="s",
            description="How late the event loop woke the lag probe's timer (every wake)",
            explicit_bucket_boundaries_advisory=LOOP_LAG_BUCKETS,
        )
        self._loop_lag: LoopLag | None = None
        self._lag_read: tuple[float, float] | None = None  # taken by the first gauge, read by the second
        meter.create_observable_gauge(
            METRIC_LOOP_LAG_MAX,
            callbacks=[self._observe_lag_max],
            unit="s",
            description="The event loop's longest lateness since the previous scrape (reset by each scrape)",
        )
        meter.create_observable_gauge(
            METRIC_LOOP_LAG_CPU,
            callbacks=[self._observe_lag_cpu],
            unit="s",
            description="The loop thread's own CPU time during that longest lateness: near it when a step "
            "of this process held the loop, near zero when the process waited for a core",
        )

        self._tracing = self._tracer_provider(resource, otlp_endpoint, span_exporter)
        self.tracer: trace.Tracer = (
            self._tracing.get_tracer("graylane") if self._tracing is not None else trace.NoOpTracer()
        )
        self._closed = False

    # -------------------------------------------------------------------- sources

    def observe_proxies(self, tracker: ProxyTracker) -> Callable[[], None]:
        """Count connected proxies, and pushes, ACK latency and NACKs as the tracker reports them.

        Returns the function that stops listening.
        """
        self._proxies = tracker.open_streams
        stop: Callable[[], None] = tracker.add_listener(self.proxy_event)
        return stop

    def observe_releases(self, by_phase: Callable[[], Mapping[str, int] | None]) -> None:
        """`by_phase()` -> phase name -> count, or None while no store snapshot is loaded."""
        self._releases = by_phase

    def observe_agents(self, count: Callable[[], int]) -> None:
        self._agents = count

    def observe_store(self, up: Callable[[], bool]) -> None:
        self._store_up = up

    def observe_loop(self, *, interval: float = DEFAULT_LOOP_LAG_INTERVAL_SECONDS) -> LoopLag:
        """The event loop's lag, from the probe returned: the caller runs its `run()` on the
        loop it measures, in its TaskGroup. Without it, no lag series are exported."""
        self._loop_lag = LoopLag(interval=interval, on_lag=self._lag_histogram.record)
        return self._loop_lag

    # -------------------------------------------------------------------- events

    def proxy_event(self, event: ProxyEvent) -> None:
        """A tracker listener: count and time pushes, ACKs and NACKs.

        Runs on every push and ACK of every stream (twice per proxy per change): the
        attribute sets are built once per type, and only ACK latency goes through the SDK
        per event; pushes and NACKs are plain counts the SDK reads when it collects.
        """
        kind = event.kind
        if kind == PUSHED:
            self._push_counts[event.type_url] += 1
            self._timer.pushed(event.stream, event.type_url, event.version, self._clock())
        elif kind == ACKED:
            elapsed = self._timer.acked(event.stream, event.type_url, event.version, self._clock())
            if elapsed is not None:
                self._push_ack.record(elapsed, self._attributes(event.type_url))
        elif kind == NACKED:
            self._nack_counts[event.type_url] += 1
            self._timer.nacked(event.stream, event.type_url, event.version)
        elif kind == DISCONNECTED:
            self._timer.forget(event.stream)

    def _attributes(self, type_url: str) -> Mapping[str, str]:
        attributes = self._type_attributes.get(type_url)
        if attributes is None:
            attributes = self._type_attributes[type_url] = {"type": type_name(type_url)}
        return attributes

    def analysis_outcome(self, outcome: str, release: str) -> None:
        """Count one analysis verdict of `release`: `outcome` is pass, fail or inconclusive."""
        if outcome not in ANALYSIS_OUTCOMES:
            raise ValueError(f"outcome {outcome!r}: expected one of {sorted(ANALYSIS_OUTCOMES)}")
        self._analysis.add(1, {"outcome": outcome, "release": release})

    def denied_call(self, code: str, method: str) -> None:
        """Count one refused API call (`code`: unauthenticated, permission_denied, resource_exhausted)."""
        self._denied.add(1, {"code": code, "method": method})

    # -------------------------------------------------------------------- export

    def metrics_text(self, accept: str = "") -> tuple[bytes, str]:
        """This process's metrics in the format a scraper's `Accept` header asks for (Prometheus
        text 0.0.4 unless it asks for OpenMetrics or text 1.0.0), and its content type.

        Runs the gauges' callbacks: call it on the event loop's thread.
        """
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    @property
    def tracing(self) -> bool:
        """Whether spans are exported (an OTLP endpoint or a span exporter is configured)."""
        return self._tracing is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors for a grpc.aio server: a span per unary call, none when not tracing."""
        return [TracingInterceptor(self.tracer)] if self._tracing is not None else []

    async def flush(self) -> None:
        """Send the spans that are still queued (a worker thread does the blocking export)."""
        if self._tracing is not None and not self._closed:
            await asyncio.to_thread(self._tracing.force_flush)

    async def aclose(self) -> None:
        """Flush and stop tracing, stop metrics. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tracing is not None:
            await asyncio.to_thread(self._tracing.shutdown)
        self._meters.shutdown()

    # -------------------------------------------------------------------- internals

    @staticmethod
    def _tracer_provider(
        resource: Resource, endpoint: str | None, exporter: SpanExporter | None
    ) -> TracerProvider | None:
        if exporter is None:
            configured = configured_otlp_endpoint(endpoint)
            if configured is None:
                return None
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning(
                    "OTLP endpoint %s is configured but opentelemetry-exporter-otlp-proto-http is not "
                    "installed (pip install 'graylane[otlp]'): running without traces",
                    configured,
                )
                return None
            # An option is a base URL like OTEL_EXPORTER_OTLP_ENDPOINT; from the environment the
            # exporter applies the standard rules itself (a *_TRACES_ENDPOINT is used as is).
            exporter = OTLPSpanExporter(endpoint=otlp_traces_url(endpoint)) if endpoint else OTLPSpanExporter()
            log.info("exporting traces over OTLP/HTTP to %s", configured)
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        # Batch: the export (blocking HTTP) happens on the processor's thread, never the loop's.
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return provider

    def _observe_proxies(self, options: CallbackOptions) -> Iterator[Observation]:
        if self._proxies is not None:
            yield Observation(self._proxies())

    def _observe_pushes(self, options: CallbackOptions) -> Iterator[Observation]:
        for type_url, count in tuple(self._push_counts.items()):
            yield Observation(count, self._attributes(type_url))

    def _observe_nacks(self, options: CallbackOptions) -> Iterator[Observation]:
        for type_url, count in tuple(self._nack_counts.items()):
            yield Observation(count, self._attributes(type_url))

    def _observe_releases(self, options: CallbackOptions) -> Iterator[Observation]:
        counts = self._releases() if self._releases is not None else None
        for phase, count in (counts or {}).items():
            yield Observation(count, {"phase": phase})

    def _observe_agents(self, options: CallbackOptions) -> Iterator[Observation]:
        if self._agents is not None:
            yield Observation(self._agents())

    def _observe_store(self, options: CallbackOptions) -> Iterator[Observation]:
        if self._store_up is not None:
            yield Observation(int(self._store_up()))

    # The two lag gauges are one reading: the first callback of a collection takes (and
    # resets) it, the second reports its CPU part and clears it for the next collection.
    def _observe_lag_max(self, options: CallbackOptions) -> Iterator[Observation]:
        if self._loop_lag is not None:
            self._lag_read = self._loop_lag.take_longest()
            yield Observation(self._lag_read[0])

    def _observe_lag_cpu(self, options: CallbackOptions) -> Iterator[Observation]:
        read, self._lag_read = self._lag_read, None
        if self._loop_lag is not None:
            yield Observation((read or self._loop_lag.take_longest())[1])


def agent_telemetry(tracker: ProxyTracker, *, otlp_endpoint: str | None = None) -> Telemetry:
    """The telemetry of a cluster agent: its proxies, pushes, ACK latency and NACKs."""
    telemetry = Telemetry(service_name=AGENT_TELEMETRY_NAME, otlp_endpoint=otlp_endpoint)
    telemetry.observe_proxies(tracker)
    return telemetry


# ------------------------------------------------------------------------ gRPC tracing


class _MetadataGetter(Getter[Mapping[str, str]]):
    """Reads W3C trace context (`traceparent`, `baggage`) from gRPC invocation metadata."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if value is not None else None

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _MetadataGetter()


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A server span per unary-unary call, child of the caller's W3C `traceparent` if it sent one.

    Streams (the agent sessions) are left alone: a span hours long explains nothing.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = details.method
        metadata: dict[str, str] = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        parent = propagate.extract(metadata, getter=_GETTER)
        service, _, name = method.lstrip("/").rpartition("/")
        behaviour = handler.unary_unary
        tracer = self._tracer

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
            with tracer.start_as_current_span(
                method.lstrip("/"), context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
            ) as span:
                try:
                    response = await behaviour(request, context)
                except BaseException:
                    # An abort sets the code; anything else becomes UNKNOWN/INTERNAL in gRPC and
                    # the span records the exception on its way out.
                    _set_code(span, context.code())
                    raise
                _set_code(span, context.code() or grpc.StatusCode.OK)
                return response

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _set_code(span: trace.Span, code: object) -> None:
    if isinstance(code, grpc.StatusCode):
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(trace.StatusCode.ERROR, code.name)
