"""A typed asyncio client for the ReleaseService, over one grpc.aio channel.

Owns the client side of the API: which RPC each operation calls, the deadline of unary
calls, and the channel's lifetime (`async with ReleaseClient.connect(...)`). It does not
translate errors: `grpc.aio.AioRpcError` reaches the caller, which knows how to present it
(the CLI does so in one place). Used by the CLI; usable by the demo and tests. It imports
no etcd or xds code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar, cast

import grpc
from google.protobuf.message import Message
from graylane.controlplane.api.tls import ClientTls, open_channel
from graylane.controlplane.defaults import ACTOR_METADATA, DEFAULT_RPC_TIMEOUT_SECONDS
from graylane.controlplane.domain.machine import Action as Action  # re-exported: the verbs callers use
from graylane.v1 import release_pb2, release_service_pb2
from graylane.v1.release_service_pb2_grpc import ReleaseServiceStub

# The verbs that move a release are the state machine's; callers may use all but FAIL
# (the analyzer's own move). Re-exported here: `from graylane.controlplane.api.client import Action`.
USER_ACTIONS: Final = tuple(a for a in Action if a is not Action.FAIL)

# The ReleaseService method behind each action (the dashboard names the role each needs).
ACTION_RPCS: Final = {
    Action.NEXT: "NextBatch",
    Action.PAUSE: "Pause",
    Action.RESUME: "Resume",
    Action.ROLLBACK: "Rollback",
    Action.PROMOTE: "Promote",
    Action.RESTART: "Restart",
}


# A release's history may hold several MB of reasons (gRPC's default limit is 4 MB).
_CHANNEL_OPTIONS: Final = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]

Answer = TypeVar("Answer", bound=Message)


class ReleaseClient:
    """One channel to one control plane, acting as `actor`.

    The actor goes in the request where the message has an `actor` field and, for every
    call, in the `x-graylane-actor` metadata (so PutService/PutVersion are attributed too).
    Unary calls carry `timeout` as their deadline; `watch` has none (it lasts as long as
    the caller iterates).
    """

    def __init__(self, channel: grpc.aio.Channel, *, actor: str = "", token: str = "", timeout: float) -> None:
        self._stub: Any = ReleaseServiceStub(channel)
        self._actor = actor
        metadata: list[tuple[str, str]] = [(ACTOR_METADATA, actor)] if actor else []
        if token:
            # A server with auth records the token's identity; the actor is then ignored.
            metadata.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(metadata)
        self._timeout = timeout

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        target: str,
        *,
        actor: str = "",
        token: str = "",
        timeout: float = DEFAULT_RPC_TIMEOUT_SECONDS,
        tls: ClientTls | None = None,
    ) -> AsyncIterator[ReleaseClient]:
        """A client over a channel to `target`: TLS (mutual with a certificate) with `tls`."""
        async with open_channel(target, tls, options=_CHANNEL_OPTIONS) as channel:
            yield cls(channel, actor=actor, token=token, timeout=timeout)

    async def _unary(self, rpc: str, request: Message, answer: type[Answer]) -> Answer:
        """Call `rpc` with the deadline and metadata; the stubs are untyped, so the caller names
        the response type (`answer`) for mypy to check against what it returns."""
        result = await getattr(self._stub, rpc)(request, timeout=self._timeout, metadata=self._metadata)
        return cast(Answer, result)

    async def get_release(self, name: str) -> release_pb2.Release:
        request = release_service_pb2.GetReleaseRequest(name=name)
        return await self._unary("GetRelease", request, release_pb2.Release)

    async def list_releases(self) -> release_service_pb2.ListReleasesResponse:
        request = release_service_pb2.ListReleasesRequest()
        return await self._unary("ListReleases", request, release_service_pb2.ListReleasesResponse)

    async def apply_release(
        self, release: release_pb2.Release, *, reason: str = "", restart: bool = False
    ) -> release_pb2.Release:
        request = release_service_pb2.ApplyReleaseRequest(
            name=release.name, spec=release.spec, actor=self._actor, reason=reason, restart=restart
        )
        return await self._unary("ApplyRelease", request, release_pb2.Release)

    async def delete_release(self, name: str, *, reason: str = "") -> None:
        request = release_service_pb2.DeleteReleaseRequest(name=name, actor=self._actor, reason=reason)
        await self._unary("DeleteRelease", request, release_service_pb2.DeleteReleaseResponse)

    async def list_tombstones(self, name: str = "") -> release_service_pb2.ListTombstonesResponse:
        return await self._unary(
            "ListTombstones",
            release_service_pb2.ListTombstonesRequest(name=name),
            release_service_pb2.ListTombstonesResponse,
        )

    async def tombstone_history(self, name: str, generation: int = 0) -> release_service_pb2.HistoryResponse:
        request = release_service_pb2.TombstoneHistoryRequest(name=name, generation=generation)
        return await self._unary("TombstoneHistory", request, release_service_pb2.HistoryResponse)

    async def create_token(
        self, request: release_service_pb2.CreateTokenRequest
    ) -> release_service_pb2.CreateTokenResponse:
        return await self._unary("CreateToken", request, release_service_pb2.CreateTokenResponse)

    async def list_tokens(self) -> release_service_pb2.ListTokensResponse:
        return await self._unary(
            "ListTokens", release_service_pb2.ListTokensRequest(), release_service_pb2.ListTokensResponse
        )

    async def revoke_token(self, token: str) -> None:
        await self._unary(
            "RevokeToken", release_service_pb2.RevokeTokenRequest(id=token), release_service_pb2.RevokeTokenResponse
        )

    async def act(
        self,
        action: Action,
        name: str,
        *,
        reason: str = "",
        expected_revision: int = 0,
    ) -> release_pb2.Release:
        request = release_service_pb2.ActionRequest(
            name=name, actor=self._actor, reason=reason, expected_revision=expected_revision
        )
        return await self._unary(ACTION_RPCS[action], request, release_pb2.Release)

    async def history(self, name: str) -> release_service_pb2.HistoryResponse:
        request = release_service_pb2.HistoryRequest(name=name)
        return await self._unary("History", request, release_service_pb2.HistoryResponse)

    async def watch(self, name: str) -> AsyncIterator[release_pb2.Release]:
        """The release now, then each change; ends when the server ends the stream.

        Leaving the iteration early cancels the call."""
        call = self._stub.Watch(release_service_pb2.WatchRequest(name=name), metadata=self._metadata)
        try:
            async for release in call:
                yield release
        finally:
            call.cancel()

    async def put_service(self, service: release_pb2.Service, *, move_stable: bool = False) -> release_pb2.Service:
        request = release_service_pb2.PutServiceRequest(service=service, move_stable=move_stable)
        return await self._unary("PutService", request, release_pb2.Service)

    async def list_services(self) -> release_service_pb2.ListServicesResponse:
        request = release_service_pb2.ListServicesRequest()
        return await self._unary("ListServices", request, release_service_pb2.ListServicesResponse)

    async def put_version(self, version: release_pb2.Version) -> release_pb2.Version:
        request = release_service_pb2.PutVersionRequest(version=version)
        return await self._unary("PutVersion", request, release_pb2.Version)

    async def list_versions(self, service: str) -> release_service_pb2.ListVersionsResponse:
        request = release_service_pb2.ListVersionsRequest(service=service)
        return await self._unary("ListVersions", request, release_service_pb2.ListVersionsResponse)

    async def list_clusters(self) -> release_service_pb2.ListClustersResponse:
        return await self._unary(
            "ListClusters", release_service_pb2.ListClustersRequest(), release_service_pb2.ListClustersResponse
        )

    async def forget_cluster(self, name: str, *, actor: str = "") -> None:
        request = release_service_pb2.ForgetClusterRequest(name=name, actor=actor)
        await self._unary("ForgetCluster", request, release_service_pb2.ForgetClusterResponse)

    async def get_traffic(self, name: str) -> release_service_pb2.GetTrafficResponse:
        request = release_service_pb2.GetTrafficRequest(name=name)
        return await self._unary("GetTraffic", request, release_service_pb2.GetTrafficResponse)

    @staticmethod
    def _metrics_request(name: str, window: float | None, every: float | None) -> release_service_pb2.GetMetricsRequest:
        request = release_service_pb2.GetMetricsRequest(name=name)
        if window is not None:
            request.window.FromNanoseconds(round(window * 1e9))
        if every is not None:
            request.every.FromNanoseconds(round(every * 1e9))
        return request

    async def get_metrics(self, name: str, *, window: float | None = None) -> release_service_pb2.MetricsResponse:
        """The release's series over the last `window` seconds (the server's default: 60)."""
        return await self._unary(
            "GetMetrics", self._metrics_request(name, window, None), release_service_pb2.MetricsResponse
        )

    async def watch_metrics(
        self, name: str, *, window: float | None = None, every: float | None = None
    ) -> AsyncIterator[release_service_pb2.MetricsResponse]:
        """The same as `get_metrics`, again every `every` seconds until the caller stops."""
        call = self._stub.WatchMetrics(self._metrics_request(name, window, every), metadata=self._metadata)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()
