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
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import hmac
import inspect
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import duration_pb2, json_format
from graylane.controlplane.api import auth
from graylane.controlplane.api.closing import Continuation, until_set
from graylane.controlplane.defaults import ACTOR_METADATA
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Action, Cause
from graylane.controlplane.domain.releases import Releases
from graylane.controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    GraylaneError,
    InvalidArgument,
    NotFound,
    OutOfScope,
    Unavailable,
    UnsupportedEtcd,
)
from graylane.controlplane.progression.metrics import SeriesSummary, release_series
from graylane.controlplane.progression.webhooks import WebhookPolicy
from graylane.controlplane.progression.windows import Windows
from graylane.controlplane.reconcile.traffic import TrafficReader
from graylane.controlplane.store import (
    Compacted,
    InventoryStore,
    ReleaseStore,
    Snapshot,
    TokenStore,
    Tombstone,
)
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api_pb
from graylane.v1 import release_service_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

STATUS_OF: Mapping[type[GraylaneError], grpc.StatusCode] = MappingProxyType(
    {
        InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        NotFound: grpc.StatusCode.NOT_FOUND,
        OutOfScope: grpc.StatusCode.PERMISSION_DENIED,
        AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
        FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
        Conflict: grpc.StatusCode.ABORTED,
        Unavailable: grpc.StatusCode.UNAVAILABLE,
        UnsupportedEtcd: grpc.StatusCode.FAILED_PRECONDITION,
    }
)

AUTHORIZATION_METADATA = "authorization"
CLUSTER_METADATA = "x-graylane-cluster"
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("graylane_caller", default="")
_cluster: contextvars.ContextVar[str | None] = contextvars.ContextVar("graylane_cluster", default=None)
# The authenticated identity of the call (None: the server runs open, callers are not checked).
_identity: contextvars.ContextVar[auth.Identity | None] = contextvars.ContextVar("graylane_identity", default=None)

DEFAULT_MAX_STREAMS_PER_IDENTITY = 64
DEFAULT_RECHECK_SECONDS = 5.0  # a stream whose token is revoked ends within this (and the cache's second)
_CACHE_SECONDS = 1.0  # a revoked token stops working on every replica within this
_CACHE_ENTRIES = 4096
_DENIED_LOG_SECONDS = 1.0
_DELEGATED_PREFIX = "gld_"


def status_for(exc: GraylaneError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def authenticated_cluster() -> str | None:
    """The cluster whose agent credential the current call presented (None: not checked)."""
    return _cluster.get()


def current_identity() -> auth.Identity | None:
    """The authenticated caller of the current call (None: the server runs open)."""
    return _identity.get()


class Authenticator:
    """Turns a call's credentials into an `Identity`.

    Credentials, in order: a bearer token of `--agent-tokens` (an agent of that cluster), a
    bearer `glt_` token (its record read from etcd, kept `_CACHE_SECONDS`), a verified client
    certificate whose CN or SAN a record names; and the dashboard's `delegated` credential
    for a token by id (signed with a key of this process only). `enabled` False: the server runs open, every
    caller may do anything (agents are still checked against `agent_tokens` when given).
    """

    def __init__(
        self,
        store: TokenStore | None,
        *,
        enabled: bool,
        agent_tokens: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if enabled and store is None:
            raise ValueError("authentication needs the store that holds the token records")
        self.enabled = enabled
        self._store = store
        self._agents = auth.agent_identities(agent_tokens or {})
        self._clock = clock
        self._records: dict[str, tuple[float, auth.TokenRecord | None]] = {}
        self._subjects: tuple[float, list[auth.TokenRecord]] | None = None
        # Signs the credentials this process's dashboard calls its own API with on a
        # session's behalf (`delegated`): made here, never stored or sent off the host.
        self._delegation_key = secrets.token_bytes(32)

    @property
    def checks_agents(self) -> bool:
        return self.enabled or bool(self._agents)

    def forget(self, token_id: str = "") -> None:
        """Drop cached records (after a revoke here, it takes effect on this replica at once)."""
        if token_id:
            self._records.pop(token_id, None)
        else:
            self._records.clear()
        self._subjects = None

    async def _record(self, token_id: str) -> auth.TokenRecord | None:
        now = self._clock()
        cached = self._records.get(token_id)
        if cached is not None and now - cached[0] < _CACHE_SECONDS:
            return cached[1]
        assert self._store is not None
        record = await self._store.get_token(token_id)
        if len(self._records) >= _CACHE_ENTRIES:
            self._records.clear()  # bounded: a flood of made-up ids cannot grow it
        self._records[token_id] = (now, record)
        return record

    async def _subject_records(self) -> list[auth.TokenRecord]:
        now = self._clock()
        if self._subjects is None or now - self._subjects[0] >= _CACHE_SECONDS:
            assert self._store is not None
            self._subjects = (now, [r for r in await self._store.list_tokens() if r.subject])
        return self._subjects[1]

    def delegated(self, token_id: str) -> str:
        """A bearer credential for the token `token_id`, valid in this process only: the
        dashboard's sessions hold a token's id, not its secret, and call this replica's API
        with it. Each call re-reads the token's record, so a revoked token's is refused."""
        mac = hmac.new(self._delegation_key, token_id.encode(), hashlib.sha256).hexdigest()
        return f"{_DELEGATED_PREFIX}{token_id}_{mac}"

    async def identity_of(self, token_id: str) -> auth.Identity | None:
        """The identity of the bearer token `token_id` while its record exists (through the
        same one-second cache as every call); None when it is gone. Raises `Unavailable`."""
        if not self.enabled:
            return None
        record = await self._record(token_id)
        return record.identity() if record is not None and record.secret_hash else None

    async def identify(
        self, metadata: Mapping[str, str], auth_context: Mapping[str, Iterable[bytes]]
    ) -> auth.Identity | None:
        """The caller's identity, or None when it presented no valid credential.

        Raises `Unavailable` when etcd cannot be asked (the caller is neither let in nor
        told its credential is wrong)."""
        token = auth.bearer(metadata)
        if token:
            agent = self._agents.get(auth.hash_secret(token))
            if agent is not None:
                # An `--agent-tokens` line is a credential for its cluster only: presented
                # for another (`x-graylane-cluster`), it is no credential at all.
                named = metadata.get(CLUSTER_METADATA, "")
                return agent[1] if not named or named == agent[0] else None
            if token.startswith(_DELEGATED_PREFIX):
                token_id = token.removeprefix(_DELEGATED_PREFIX).partition("_")[0]
                if not hmac.compare_digest(self.delegated(token_id).encode(), token.encode()):
                    return None
                return await self.identity_of(token_id)
            parts = auth.split_token(token) if self.enabled else None
            if parts is not None:
                record = await self._record(parts[0])
                if record is not None and record.matches(parts[1]):
                    return record.identity()
            return None
        if self.enabled and auth.peer_names(auth_context).names:
            return auth.identity_from_peer(auth_context, await self._subject_records())
        return None


class DeniedLog:
    """One log line per refused call, at most one a second; the rest are counted in the next."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = -math.inf
        self._suppressed = 0

    def __call__(self, code: grpc.StatusCode, method: str, peer: str, who: str, why: str) -> None:
        now = self._clock()
        if now - self._last < _DENIED_LOG_SECONDS:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more refused since the last line)" if self._suppressed else ""
        self._last, self._suppressed = now, 0
        log.warning("refused %s from %s (%s): %s: %s%s", method, peer, who or "no credential", code.name, why, more)


class CallerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The one place every call is identified and, where credentials are configured, checked.

    The check runs around the handler, not before it: a grpc.aio interceptor sees the
    metadata but not the connection's auth context, which the client certificate is in.

    Auth on: a call without a valid credential is UNAUTHENTICATED; a role too low is
    PERMISSION_DENIED naming the role needed; a response stream beyond
    `max_streams_per_identity` open ones of the same identity is RESOURCE_EXHAUSTED. Each
    refusal is logged (`DeniedLog`) and counted (`on_denied(code, method)`).
    Auth off: callers are named by metadata `x-graylane-actor`, else their peer; agents
    present `x-graylane-cluster: <name>` and `authorization: Bearer <token>`, checked only
    when `--agent-tokens` are configured.
    """

    def __init__(
        self,
        *,
        agent_tokens: Mapping[str, str] | None = None,
        authenticator: Authenticator | None = None,
        on_denied: Callable[[str, str], None] = lambda code, method: None,
        max_streams_per_identity: int = DEFAULT_MAX_STREAMS_PER_IDENTITY,
        recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
    ) -> None:
        self._recheck_seconds = recheck_seconds
        self._auth = authenticator or Authenticator(None, enabled=False, agent_tokens=agent_tokens)
        self._on_denied = on_denied
        self._denied_log = DeniedLog()
        self._max_streams = max_streams_per_identity
        self._streams: dict[str, int] = {}

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        metadata = {str(k): str(v) for k, v in (details.invocation_metadata or ())}
        is_agent = method.startswith(auth.AGENT_SERVICE_PREFIX)
        if not self._auth.enabled and not (is_agent and self._auth.checks_agents):
            # Open: the old behaviour, nothing to check.
            caller = metadata.get(ACTOR_METADATA, "")

            async def setup(context: grpc.aio.ServicerContext) -> _Held | None:
                _caller.set(caller)
                _cluster.set(None)
                _identity.set(None)
                return None

            return _around(handler, setup)
        return _around(handler, functools.partial(self._check, method, metadata, is_agent))

    async def _deny(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, method: str, who: str, why: str
    ) -> None:
        self._on_denied(code.name.lower(), method)
        self._denied_log(code, method, context.peer(), who, why)
        await context.abort(code, why)

    async def _check(
        self, method: str, metadata: Mapping[str, str], is_agent: bool, context: grpc.aio.ServicerContext
    ) -> _Held | None:
        """Identify and authorize the call (aborting it when refused). For a stream, returns
        what it holds: its slot, and the check that ends it if its credential is revoked."""
        if auth.bearer(metadata).startswith(_DELEGATED_PREFIX) and not context.peer().startswith("unix:"):
            # The dashboard's delegated credential is for this process's private socket only.
            metadata = {k: v for k, v in metadata.items() if k != AUTHORIZATION_METADATA}
        try:
            identity = await self._auth.identify(metadata, context.auth_context())
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot check the credential now: {exc}")
            raise AssertionError("unreachable") from exc
        needed = auth.required_role(method)
        if identity is None and needed is not None:
            if is_agent:
                cluster = metadata.get(CLUSTER_METADATA, "")
                why = f"no valid credential for cluster {cluster!r}"
            else:
                why = "no valid credential: send `authorization: Bearer <token>` or a client certificate"
            await self._deny(context, grpc.StatusCode.UNAUTHENTICATED, method, "", why)
        if identity is not None:
            try:
                auth.authorize(identity, method)
            except auth.Denied as exc:
                await self._deny(context, grpc.StatusCode.PERMISSION_DENIED, method, identity.name, str(exc))
        _caller.set(identity.name if identity is not None else "")
        _identity.set(identity if self._auth.enabled else None)
        _cluster.set(identity.cluster if identity is not None and is_agent else None)
        if identity is None:
            return None
        finished = functools.partial(self._finished, method, identity.name)
        if not _streams(method):
            return _Held(release=_nothing, finished=finished)
        held = self._streams.get(identity.name, 0)
        if held >= self._max_streams:
            why = f"{identity.name} holds {held} streams already (the limit per identity is {self._max_streams})"
            await self._deny(context, grpc.StatusCode.RESOURCE_EXHAUSTED, method, identity.name, why)
        self._streams[identity.name] = held + 1
        revoked = asyncio.Event()
        peer = context.auth_context()
        recheck = asyncio.ensure_future(self._recheck(identity, metadata, peer, revoked))
        release = functools.partial(self._release_stream, identity.name, recheck)
        return _Held(release=release, revoked=revoked, finished=finished)

    def _finished(self, method: str, who: str, context: grpc.aio.ServicerContext) -> None:
        """A call the handler refused for its scope is a denied call too: logged and counted."""
        if context.code() == grpc.StatusCode.PERMISSION_DENIED:
            self._on_denied("permission_denied", method)
            self._denied_log(grpc.StatusCode.PERMISSION_DENIED, method, context.peer(), who, context.details() or "")

    async def _recheck(
        self,
        identity: auth.Identity,
        metadata: Mapping[str, str],
        peer: Mapping[str, Iterable[bytes]],
        revoked: asyncio.Event,
    ) -> None:
        """While a stream lasts, check its credential again now and then: a revoked token
        ends the streams it opened (an agent's included), not only its next calls. An etcd
        that cannot answer is no revocation: the stream goes on."""
        while True:
            await asyncio.sleep(self._recheck_seconds)
            try:
                again = await self._auth.identify(metadata, peer)
            except Unavailable:
                continue
            if again is None or again.name != identity.name or again.role is not identity.role:
                revoked.set()
                return

    def _release_stream(self, name: str, recheck: asyncio.Future[None]) -> None:
        recheck.cancel()
        held = self._streams.get(name, 0) - 1
        if held > 0:
            self._streams[name] = held
        else:
            self._streams.pop(name, None)


_STREAMING = frozenset({"Watch", "WatchMetrics", "Connect"})


def _streams(method: str) -> bool:
    return method.rsplit("/", 1)[-1] in _STREAMING


@dataclass(frozen=True, slots=True)
class _Held:
    """What a call holds while it runs: `release()` gives it back; `revoked` set ends a stream."""

    release: Callable[[], None]
    revoked: asyncio.Event | None = None
    finished: Callable[[grpc.aio.ServicerContext], None] | None = None

    def end(self, context: grpc.aio.ServicerContext) -> None:
        self.release()
        if self.finished is not None:
            self.finished(context)


def _nothing() -> None:
    pass


def _around(
    handler: grpc.RpcMethodHandler,
    setup: Callable[[grpc.aio.ServicerContext], Awaitable[_Held | None]],
) -> grpc.RpcMethodHandler:
    """`handler` with `await setup(context)` run first, in the handler's own task (so the
    context variables it sets are the handler's); what setup returns is released after."""
    if handler.request_streaming and handler.response_streaming:
        inner, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        inner, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        inner, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        inner, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler

    if inspect.isasyncgenfunction(inner):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            held = await setup(context)
            try:
                if held is None or held.revoked is None:
                    async for response in inner(request, context):
                        yield response
                    return
                async for response in until_set(inner(request, context), held.revoked):
                    yield response
                if held.revoked.is_set():
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the credential of this stream was revoked")
            finally:
                if held is not None:
                    held.end(context)

        behaviour: Callable[..., Any] = streaming
    else:

        async def plain(request: Any, context: grpc.aio.ServicerContext) -> Any:
            held = await setup(context)
            try:
                return await inner(request, context)
            finally:
                if held is not None:
                    held.end(context)

        behaviour = plain
    return make(
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


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
    reason = model.check_text("reason", getattr(request, "reason", ""))
    identity = _identity.get()
    if identity is not None:
        # Authenticated: the actor is who the credential says, whatever the request claims.
        return Cause(actor=identity.name, reason=reason)
    actor = model.check_text("actor", getattr(request, "actor", ""), limit=model.MAX_LABEL_BYTES)
    return Cause(actor=actor or _caller.get() or f"grpc:{context.peer()}", reason=reason)


def _in_scope(name: str, services: Iterable[str]) -> bool:
    identity = _identity.get()
    return identity is None or identity.may_touch(name, services)


def _check_scope(name: str, services: Iterable[str]) -> None:
    identity = _identity.get()
    if identity is not None and not identity.may_touch(name, services):
        raise OutOfScope(f"{identity.name} may not act on release {name!r}: it is outside the identity's scope")


def _check_service_scope(service: str) -> None:
    identity = _identity.get()
    if identity is not None and identity.scoped and service not in identity.services:
        raise OutOfScope(f"{identity.name} may not register service {service!r}: it is outside the identity's scope")


def _sees_webhook_answers() -> bool:
    identity = _identity.get()
    return identity is None or identity.role >= auth.Role.OPERATOR


# Event details that may carry what a webhook's server answered: shown to operators and up.
_HIDDEN = "(hidden: a webhook's answer is shown to role operator and above)"


def _event_for_caller(e: model.Event) -> pb.Event:
    message = model.event_to_proto(e)
    if _sees_webhook_answers():
        return message
    for key, value in list(message.details.items()):
        if not key.startswith("webhook."):
            continue
        if key.endswith(".body") and value:
            message.details[key] = _HIDDEN
        elif key.endswith(".error") and value.startswith("HTTP ") and ": " in value:
            # `HTTP 500: <the start of the answer>`: the status stays, the answer goes.
            message.details[key] = f"{value.split(': ', 1)[0]} {_HIDDEN}"
    return message


def _token_to_proto(r: auth.TokenRecord) -> api_pb.Token:
    return api_pb.Token(
        id=r.token_id,
        name=r.name,
        role=r.role.label,
        services=sorted(r.services),
        releases=sorted(r.releases),
        cluster=r.cluster,
        subject=r.subject,
        created_at=r.created_at,
        created_by=r.created_by,
    )


# Every field of a tombstone but `final` (proto JSON, parsed into `release_at_delete`).
_TOMBSTONE_FIELDS = ("release", "generation", "deleted_at", "deleted_by", "reason", "events", "phase")


def _tombstone_to_proto(t: Tombstone) -> api_pb.Tombstone:
    message = api_pb.Tombstone(**model.fields_of(t, _TOMBSTONE_FIELDS))
    if t.final:
        with contextlib.suppress(json_format.ParseError):
            json_format.Parse(t.final, message.release_at_delete)
    return message


_ActionRpc = Callable[["ReleaseServicer", api_pb.ActionRequest, grpc.aio.ServicerContext], Awaitable[pb.Release]]


def _action_rpc(action: Action) -> _ActionRpc:
    """The handler of an ActionRequest RPC: `action` on the named release."""

    @unary
    async def handle(
        self: ReleaseServicer, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Release:
        return await self._act(action, request, context)

    return handle


class ApiStore(ReleaseStore, InventoryStore, TokenStore, Protocol):
    """What the API reads and writes past `Releases`: releases, their history and
    tombstones, the registry, tokens, the live state at one revision (clusters) and the
    forgetting of a cluster."""

    async def snapshot(self, *, revision: int = 0) -> Snapshot: ...

    async def forget_cluster(self, name: str) -> None: ...


class ReleaseServicer(api_grpc.ReleaseServiceServicer):
    def __init__(
        self,
        releases: Releases,
        *,
        store: ApiStore,
        traffic: TrafficReader | None = None,
        windows: Windows | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
        authenticator: Authenticator | None = None,
        webhook_policy: WebhookPolicy | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._webhook_policy = webhook_policy
        self._releases = releases
        self._store = store
        self._traffic = traffic
        self._windows = windows  # the metrics series this replica keeps (None: none)
        self._is_leader = is_leader
        self._clock = clock

    # ------------------------------------------------------------- releases

    def _spec(self, message: pb.ReleaseSpec) -> model.ReleaseSpec:
        spec = model.spec_from_proto(message)
        if self._webhook_policy is not None and spec.analysis is not None:
            for i, hook in enumerate(spec.analysis.webhooks):
                self._webhook_policy.check_url(f"spec.analysis.webhooks[{i}].url", hook.url)
        return spec

    @unary
    async def CreateRelease(
        self, request: api_pb.CreateReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.Release:
        spec = self._spec(request.spec)
        _check_scope(request.name, (s.service for s in spec.services))
        r = await self._releases.create(request.name, spec, _cause(request, context))
        return model.release_to_proto(r)

    @unary
    async def ApplyRelease(self, request: api_pb.ApplyReleaseRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        spec = self._spec(request.spec)
        _check_scope(request.name, (s.service for s in spec.services))
        if _identity.get() is not None:
            # The release as it stands must be in scope too: no taking over another's release.
            with contextlib.suppress(NotFound):
                await self._scoped_release(request.name)
        r = await self._releases.apply(request.name, spec, _cause(request, context), restart=request.restart)
        return model.release_to_proto(r)

    @unary
    async def GetRelease(self, request: api_pb.GetReleaseRequest, context: grpc.aio.ServicerContext) -> pb.Release:
        return model.release_to_proto(await self._scoped_release(request.name))

    @unary
    async def ListReleases(
        self, request: api_pb.ListReleasesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ListReleasesResponse:
        releases = [r for r in await self._store.list_releases() if _in_scope(r.name, _services_of(r))]
        return api_pb.ListReleasesResponse(releases=[model.release_to_proto(r) for r in releases])

    @unary
    async def DeleteRelease(
        self, request: api_pb.DeleteReleaseRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.DeleteReleaseResponse:
        await self._scoped_release(request.name)
        cause = _cause(request, context)
        tomb = await self._store.delete_release(
            request.name, actor=cause.actor, reason=cause.reason, at=datetime.now(UTC).isoformat()
        )
        log.info(
            "release %s deleted by %s; its %d events are kept under a tombstone", request.name, cause.actor, tomb.events
        )
        return api_pb.DeleteReleaseResponse()

    async def _scoped_release(self, name: str) -> model.Release:
        release = await self._store.get_release(name)
        _check_scope(name, _services_of(release))
        return release

    async def _act(
        self, action: Action, request: api_pb.ActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Release:
        if (identity := _identity.get()) is not None and identity.scoped:
            await self._scoped_release(request.name)
        r = await self._releases.act(
            request.name, action, _cause(request, context), expected_revision=request.expected_revision
        )
        return model.release_to_proto(r)

    # The six ActionRequest RPCs differ only in the action they ask for.
    NextBatch = _action_rpc(Action.NEXT)
    Pause = _action_rpc(Action.PAUSE)
    Resume = _action_rpc(Action.RESUME)
    Rollback = _action_rpc(Action.ROLLBACK)
    Promote = _action_rpc(Action.PROMOTE)
    Restart = _action_rpc(Action.RESTART)

    @unary
    async def History(
        self, request: api_pb.HistoryRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.HistoryResponse:
        if (identity := _identity.get()) is not None and identity.scoped:
            await self._scoped_release(request.name)
        events = await self._store.history(request.name)
        return api_pb.HistoryResponse(events=[_event_for_caller(e) for e in events])

    async def Watch(self, request: api_pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Release]:
        try:
            async for release in self._watch(request.name):
                yield model.release_to_proto(release)
        except GraylaneError as exc:
            await _abort(context, exc)

    async def _watch(self, name: str) -> AsyncIterator[model.Release]:
        current, revision = await self._store.get_release_at(name)
        _check_scope(name, _services_of(current))
        yield current
        while True:
            try:
                async for release in self._store.watch_release(
                    name, start_revision=revision + 1, after=current.revision
                ):
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
        _check_service_scope(service.name)
        current, revision = await self._store.get_service_at(service.name)
        if current is not None and current.stable_version != service.stable_version and not request.move_stable:
            raise FailedPrecondition(
                f"service.stable_version: {service.name!r} serves {current.stable_version!r} as stable; "
                f"{service.stable_version!r} would move all of its traffic there (after a promote, back to the "
                "old version undoes it): say so with move_stable (graylane apply --move-stable)"
            )
        await self._store.put_service(service, if_revision=revision)
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
        _check_service_scope(version.service)
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
        # Agents' proxies, as every replica publishes the clusters of the agents it holds (a
        # replica that left on purpose: its agents are reconnecting and counted where they land).
        proxies: dict[str, int] = {}
        for fleet in snap.replica_fleet.values():
            if not fleet.left:
                for cluster, n in fleet.clusters.items():
                    proxies[cluster] = proxies.get(cluster, 0) + n
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
                    proxies=proxies.get(name, 0),
                )
            )
        return api_pb.ListClustersResponse(clusters=clusters)

    @unary
    async def ForgetCluster(
        self, request: api_pb.ForgetClusterRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ForgetClusterResponse:
        name = model.check_name("name", request.name)
        await self._store.forget_cluster(name)
        log.info("cluster %s forgotten by %s", name, _cause(request, context).actor)
        return api_pb.ForgetClusterResponse()

    # ------------------------------------------------------------- tombstones

    @unary
    async def ListTombstones(
        self, request: api_pb.ListTombstonesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ListTombstonesResponse:
        tombs = await self._store.list_tombstones(request.name)
        return api_pb.ListTombstonesResponse(tombstones=[_tombstone_to_proto(t) for t in tombs])

    @unary
    async def TombstoneHistory(
        self, request: api_pb.TombstoneHistoryRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.HistoryResponse:
        _, events = await self._store.tombstone_history(request.name, request.generation)
        return api_pb.HistoryResponse(events=[model.event_to_proto(e) for e in events])

    # ------------------------------------------------------------- tokens

    @unary
    async def CreateToken(
        self, request: api_pb.CreateTokenRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.CreateTokenResponse:
        made = auth.new_token() if not request.subject else None
        record = token_record(
            **model.fields_of(request, _TOKEN_REQUEST_FIELDS), made=made, created_by=_cause(request, context).actor
        )
        await self._store.create_token(record)
        if self._authenticator is not None:
            self._authenticator.forget(record.token_id)
        log.info(
            "token %s (%s, role %s) created by %s", record.token_id, record.name, record.role.label, record.created_by
        )
        return api_pb.CreateTokenResponse(token=_token_to_proto(record), secret=made.token if made else "")

    @unary
    async def ListTokens(
        self, request: api_pb.ListTokensRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.ListTokensResponse:
        records = sorted(await self._store.list_tokens(), key=lambda r: (r.name, r.token_id))
        return api_pb.ListTokensResponse(tokens=[_token_to_proto(r) for r in records])

    @unary
    async def RevokeToken(
        self, request: api_pb.RevokeTokenRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.RevokeTokenResponse:
        wanted = request.id.strip()
        if not wanted:
            raise InvalidArgument("id", "is required (a token's id or name)")
        matches = [r for r in await self._store.list_tokens() if wanted in (r.token_id, r.name)]
        if not matches:
            raise NotFound(f"no token with id or name {wanted!r}")
        for record in matches:
            await self._store.delete_token(record.token_id)
            if self._authenticator is not None:
                self._authenticator.forget(record.token_id)
            log.info("token %s (%s) revoked by %s", record.token_id, record.name, _cause(request, context).actor)
        return api_pb.RevokeTokenResponse()

    # ------------------------------------------------------------- traffic

    @unary
    async def GetTraffic(
        self, request: api_pb.GetTrafficRequest, context: grpc.aio.ServicerContext
    ) -> api_pb.GetTrafficResponse:
        if self._traffic is None:
            await self._scoped_release(request.name)
            raise FailedPrecondition("this replica serves no proxies, so it has no traffic to count")
        try:
            release = await self._scoped_release(request.name)
        except Unavailable:
            # etcd out of reach: the release as this replica follows it, so its own proxies'
            # numbers still answer (the report says the other replicas' are unknown).
            followed = self._traffic.followed(request.name)
            if followed is None:
                raise
            _check_scope(request.name, _services_of(followed))
            release = followed
        report = await self._traffic.read(release)
        oldest = None
        if report.oldest_seconds is not None:
            oldest = duration_pb2.Duration()
            oldest.FromMilliseconds(round(report.oldest_seconds * 1000))
        return api_pb.GetTrafficResponse(
            replicas=report.replicas,
            oldest=oldest,
            note=report.note,
            counts=[
                api_pb.TrafficCount(service=service, version=version, lane=lane, **dataclasses.asdict(c))
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
        return self._metrics(await self._scoped_release(request.name), window_s)

    async def WatchMetrics(
        self, request: api_pb.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb.MetricsResponse]:
        try:
            window_s, every_s = _metrics_durations(request)
            loop = asyncio.get_running_loop()
            deadline = loop.time()
            while True:
                # Re-read each time: the release's services may change, or it may be deleted.
                yield self._metrics(await self._scoped_release(request.name), window_s)
                deadline = max(deadline + every_s, loop.time())
                await asyncio.sleep(deadline - loop.time())
        except GraylaneError as exc:
            await _abort(context, exc)


def _services_of(release: model.Release) -> list[str]:
    return [s.service for s in release.spec.services]


# The fields of a CreateTokenRequest, each a keyword of `token_record`.
_TOKEN_REQUEST_FIELDS = ("name", "role", "services", "releases", "cluster", "subject")


def token_record(
    *,
    name: str,
    role: str,
    services: Iterable[str] = (),
    releases: Iterable[str] = (),
    cluster: str = "",
    subject: str = "",
    made: auth.NewToken | None,
    created_by: str,
) -> auth.TokenRecord:
    """A validated token record (InvalidArgument naming the field otherwise)."""
    try:
        parsed_role = auth.Role.parse(role)
    except ValueError as exc:
        raise InvalidArgument("role", str(exc)) from exc
    for field_name, values in (("services", services), ("releases", releases)):
        for i, value in enumerate(values):
            model.check_name(f"{field_name}[{i}]", value)
    if cluster:
        model.check_name("cluster", cluster)
    subject = model.check_text("subject", subject, limit=model.MAX_LABEL_BYTES)
    if subject and not subject.isprintable():
        raise InvalidArgument("subject", "must be printable text")
    record = auth.TokenRecord(
        token_id=made.token_id if made is not None else auth.new_token().token_id,
        name=name,
        role=parsed_role,
        services=frozenset(services),
        releases=frozenset(releases),
        cluster=cluster,
        subject=subject,
        secret_hash=made.secret_hash if made is not None else "",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        created_by=created_by,
    )
    try:
        return auth.check_record(record)
    except ValueError as exc:
        raise InvalidArgument("token", str(exc)) from exc


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
