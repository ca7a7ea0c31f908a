"""ReleaseService over gRPC: the boundary where requests become domain values.

Owns: turning requests into validated domain values (through `controlplane.model`),
calling `Releases`, turning results back into messages, and the ONE table that maps the
`GraylaneError` tree to gRPC status codes. Anything else raised becomes INTERNAL with the
traceback logged and a generic message.

Every call passes the `CallerInterceptor` first (the one place where callers are
identified; authentication will live there).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import grpc
from graylane.controlplane import model
from graylane.controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    GraylaneError,
    InvalidArgument,
    NotFound,
    Unavailable,
    UnsupportedEtcd,
)
from graylane.controlplane.machine import Action, Cause
from graylane.controlplane.metrics import SeriesSummary, release_series
from graylane.controlplane.releases import Releases
from graylane.controlplane.store import Compacted
from graylane.controlplane.traffic import TrafficReader
from graylane.controlplane.windows import Windows
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api_pb
from graylane.v1 import release_service_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

STATUS_OF: Mapping[type[GraylaneError], grpc.StatusCode] = MappingProxyType(
    {
        InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        NotFound: grpc.StatusCode.NOT_FOUND,
        AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
        FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
        Conflict: grpc.StatusCode.ABORTED,
        Unavailable: grpc.StatusCode.UNAVAILABLE,
        UnsupportedEtcd: grpc.StatusCode.FAILED_PRECONDITION,
    }
)

ACTOR_METADATA = "x-graylane-actor"
AUTHORIZATION_METADATA = "authorization"
CLUSTER_METADATA = "x-graylane-cluster"
AGENT_SERVICE = "/graylane.v1.AgentService/"
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("graylane_caller", default="")
_cluster: contextvars.ContextVar[str | None] = contextvars.ContextVar("graylane_cluster", default=None)


def status_for(exc: GraylaneError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def authenticated_cluster() -> str | None:
    """The cluster whose agent credential the current call presented (None: not checked)."""
    return _cluster.get()


def _refuse(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.stream_stream_rpc_method_handler(refuse)


class CallerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The one place every call is identified and, where credentials are configured, checked.

    Callers are named by metadata `x-graylane-actor`, else their peer. Agents present
    `x-graylane-cluster: <name>` and `authorization: Bearer <token>`; with `agent_tokens`
    set (cluster -> token) a missing or wrong token is UNAUTHENTICATED before the stream
    starts. Without tokens (a local, single-machine set-up) agents are not checked.
    """

    def __init__(self, *, agent_tokens: Mapping[str, str] | None = None) -> None:
        self._agent_tokens = dict(agent_tokens or {})

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(handler_call_details.invocation_metadata or ())
        _caller.set(str(metadata.get(ACTOR_METADATA, "")))
        _cluster.set(None)
        if handler_call_details.method.startswith(AGENT_SERVICE) and self._agent_tokens:
            cluster = str(metadata.get(CLUSTER_METADATA, ""))
            token = str(metadata.get(AUTHORIZATION_METADATA, "")).removeprefix("Bearer ").strip()
            expected = self._agent_tokens.get(cluster)
            if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
                log.warning("refused an agent for cluster %r: bad or missing credential", cluster)
                return _refuse(grpc.StatusCode.UNAUTHENTICATED, f"no valid credential for cluster {cluster!r}")
            _cluster.set(cluster)
        return await continuation(handler_call_details)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, GraylaneError):
        await context.abort(status_for(exc), str(exc))
    log.exception("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the control plane's log)")


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def unary(fn: F) -> F:
    """Translate domain errors of a unary handler at this one seam."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except (GraylaneError, Exception) as exc:  # noqa: B014 - both kinds go to _abort
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def _cause(request: Any, context: grpc.aio.ServicerContext) -> Cause:
    actor = model.check_text("actor", getattr(request, "actor", ""), limit=model.MAX_LABEL_BYTES)
    reason = model.check_text("reason", getattr(request, "reason", ""))
    return Cause(actor=actor or _caller.get() or f"grpc:{context.peer()}", reason=reason)


class ReleaseServicer(api_grpc.ReleaseServiceServicer):
    def __init__(
        self,
        releases: Releases,
        *,
        traffic: TrafficReader | None = None,
        windows: Windows | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._releases = releases
        self._store = releases.store
        self._traffic = traffic
        self._windows = windows  # the metrics series this replica keeps (None: none)
        self._is_leader = is_leader
        self._clock = clock

    # ------------------------------------------------------------- releases

    @unary
    async def CreateRelease(
        self, request: api_pb.CreateReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.Release:
        spec = model.spec_from_proto(request.spec)
        r = await self._releases.create(request.name, spec, _cause(request, context))
        return model.release_to_proto(r)

    @unary
    async def ApplyRelease(self, request: api_pb.ApplyReleaseRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        spec = model.spec_from_proto(request.spec)
        r = await self._releases.apply(request.name, spec, _cause(request, context))
        return model.release_to_proto(r)

    @unary
    async def GetRelease(self, request: api_pb.GetReleaseRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        return model.release_to_proto(await self._store.get_release(request.name))

    @unary
    async def ListReleases(
        self, request: api_pb.ListReleasesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ListReleasesResponse:
        releases = await self._store.list_releases()
        return api_pb.ListReleasesResponse(releases=[model.release_to_proto(r) for r in releases])

    @unary
    async def DeleteRelease(
        self, request: api_pb.DeleteReleaseRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.DeleteReleaseResponse:
        await self._store.delete_release(request.name)
        return api_pb.DeleteReleaseResponse()

    async def _act(
        self, action: Action, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Release:
        r = await self._releases.act(
            request.name, action, _cause(request, context), expected_revision=request.expected_revision
        )
        return model.release_to_proto(r)

    @unary
    async def NextBatch(self, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        return await self._act(Action.NEXT, request, context)

    @unary
    async def Pause(self, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        return await self._act(Action.PAUSE, request, context)

    @unary
    async def Resume(self, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        return await self._act(Action.RESUME, request, context)

    @unary
    async def Rollback(self, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        return await self._act(Action.ROLLBACK, request, context)

    @unary
    async def Promote(self, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        return await self._act(Action.PROMOTE, request, context)

    @unary
    async def Restart(self, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        return await self._act(Action.RESTART, request, context)

    @unary
    async def History(
        self, request: api_pb.HistoryRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.HistoryResponse:
        events = await self._store.history(request.name)
        return api_pb.HistoryResponse(events=[model.event_to_proto(e) for e in events])

    async def Watch(self, request: api_pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Release]:
        try:
            async for release in self._watch(request.name):
                yield model.release_to_proto(release)
        except GraylaneError as exc:
            await _abort(context, exc)

    async def _watch(self, name: str) -> AsyncIterator[model.Release]:
        current, revision = await self._store.get_release_at(name)
        yield current
        while True:
            try:
                async for release in self._store.watch_release(name, start_revision=revision + 1):
                    if release is None:
                        return
                    revision = release.revision
                    current = release
                    yield release
            except Compacted:
                # History is gone: re-read the release and go on from where it is now.
                seen = current.revision
                current, revision = await self._store.get_release_at(name)
                if current.revision != seen:
                    yield current

    # ------------------------------------------------------------- registry

    @unary
    async def PutService(self, request: api_pb.PutServiceRequest, context: grpc.aio.ServicerContext) -> pb.Service:
        service = model.service_from_proto(request.service)
        await self._store.put_service(service)
        return model.service_to_proto(service)

    @unary
    async def ListServices(
        self, request: api_pb.ListServicesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ListServicesResponse:
        services = await self._store.list_services()
        return api_pb.ListServicesResponse(services=[model.service_to_proto(s) for s in services])

    @unary
    async def PutVersion(self, request: api_pb.PutVersionRequest, context: grpc.aio.ServicerContext) -> pb.Version:
        version = model.version_from_proto(request.version)
        if await self._store.get_service(version.service) is None:
            raise InvalidArgument("version.service", f"service {version.service!r} is not registered")
        await self._store.put_version(version)
        return model.version_to_proto(version)

    @unary
    async def ListVersions(
        self, request: api_pb.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ListVersionsResponse:
        versions = await self._store.list_versions(request.service)
        return api_pb.ListVersionsResponse(versions=[model.version_to_proto(v) for v in versions])

    # ------------------------------------------------------------- clusters

    @unary
    async def ListClusters(
        self, request: api_pb.ListClustersRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ListClustersResponse:
        snap = await self._store.snapshot()
        known = {c.name: c for c in snap.known_clusters}
        live = {c.name: c for c in snap.clusters}
        counts: dict[str, dict[tuple[str, str], int]] = {}
        for item in snap.cluster_endpoints:
            for e in item.endpoints:
                per_cluster = counts.setdefault(e.cluster, {})
                per_cluster[(item.service, item.version)] = per_cluster.get((item.service, item.version), 0) + 1
        clusters = []
        for name in sorted(known.keys() | live.keys()):
            info = live.get(name) or known[name]
            status = model.cluster_to_proto(info)
            clusters.append(
                api_pb.ClusterStatus(
                    name=name,
                    connected=name in live,
                    gateway_address=status.gateway_address,
                    agent_id=info.agent_id,
                    agent_version=info.agent_version,
                    versions=[
                        api_pb.ClusterVersion(service=service, version=version, endpoints=n)
                        for (service, version), n in sorted(counts.get(name, {}).items())
                    ],
                )
            )
        return api_pb.ListClustersResponse(clusters=clusters)

    @unary
    async def ForgetCluster(
        self, request: api_pb.ForgetClusterRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ForgetClusterResponse:
        name = model.check_name("name", request.name)
        await self._store.forget_cluster(name)
        log.info("cluster %s forgotten by %s", name, request.actor or _caller.get() or context.peer())
        return api_pb.ForgetClusterResponse()

    # ------------------------------------------------------------- traffic

    @unary
    async def GetTraffic(
        self, request: api_pb.GetTrafficRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.GetTrafficResponse:
        release = await self._store.get_release(request.name)
        if self._traffic is None:
            raise FailedPrecondition("this replica serves no proxies, so it has no traffic to count")
        report = await self._traffic.read(release)
        return api_pb.GetTrafficResponse(
            counts=[
                api_pb.TrafficCount(
                    service=service,
                    version=version,
                    lane=lane,
                    requests=c.requests,
                    responses_2xx=c.responses_2xx,
                    responses_4xx=c.responses_4xx,
                    responses_5xx=c.responses_5xx,
                    failures=c.failures,
                )
                for (service, version, lane), c in sorted(
                    report.counts.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])
                )
            ],
            proxies=report.proxies,
            unreachable=list(report.unreachable),
        )

    # ------------------------------------------------------------- metrics

    def _metrics(self, release: model.Release, window_s: float) -> api_pb.MetricsResponse:
        if self._windows is None:
            raise FailedPrecondition("this replica keeps no metrics")
        until = self._clock()
        since = until - window_s
        series = release_series(self._windows, release.spec, since=since, until=until)
        response = api_pb.MetricsResponse(series=[_series_to_proto(s) for s in series], leader=self._is_leader())
        response.since.FromNanoseconds(round(since * 1e9))
        response.until.FromNanoseconds(round(until * 1e9))
        return response

    @unary
    async def GetMetrics(
        self, request: api_pb.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.MetricsResponse:
        window_s, _ = _metrics_durations(request)
        return self._metrics(await self._store.get_release(request.name), window_s)

    async def WatchMetrics(
        self, request: api_pb.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb.MetricsResponse]:
        try:
            window_s, every_s = _metrics_durations(request)
            loop = asyncio.get_running_loop()
            deadline = loop.time()
            while True:
                # Re-read each time: the release's services may change, or it may be deleted.
                yield self._metrics(await self._store.get_release(request.name), window_s)
                deadline = max(deadline + every_s, loop.time())
                await asyncio.sleep(deadline - loop.time())
        except GraylaneError as exc:
            await _abort(context, exc)


DEFAULT_METRICS_WINDOW_SECONDS = 60.0
DEFAULT_METRICS_EVERY_SECONDS = 1.0
_MAX_METRICS_WINDOW_SECONDS = 24 * 3600.0
_MIN_METRICS_EVERY_SECONDS = 0.1


def _metrics_durations(request: api_pb.GetMetricsRequest) -> tuple[float, float]:
    """(window, every) in seconds, defaulted and validated."""
    window = DEFAULT_METRICS_WINDOW_SECONDS
    if request.HasField("window"):
        window = request.window.ToNanoseconds() / 1e9
        if not 0 < window <= _MAX_METRICS_WINDOW_SECONDS:
            raise InvalidArgument("window", f"must be more than 0 s and at most {_MAX_METRICS_WINDOW_SECONDS:.0f} s")
    every = DEFAULT_METRICS_EVERY_SECONDS
    if request.HasField("every"):
        every = request.every.ToNanoseconds() / 1e9
        if not _MIN_METRICS_EVERY_SECONDS <= every <= 3600:
            raise InvalidArgument("every", f"must be at least {_MIN_METRICS_EVERY_SECONDS} s and at most 3600 s")
    return window, every


def _series_to_proto(s: SeriesSummary) -> api_pb.SeriesWindow:
    a = s.window
    message = api_pb.SeriesWindow(
        service=s.key.service,
        version=s.key.version,
        lane=s.key.lane,
        cluster=s.key.cluster,
        requests=a.requests,
        errors=a.errors,
        error_rate=a.error_rate or 0.0,
        throughput_rps=a.throughput_rps or 0.0,
        bucket_bounds_ms=a.latency.bounds,
        bucket_counts=a.latency.counts,
        traffic_share=s.share or 0.0,
    )
    for field, value in (("p50_ms", a.p50), ("p90_ms", a.p90), ("p99_ms", a.p99)):
        if value is not None and math.isfinite(value):
            setattr(message, field, value)
    return message
