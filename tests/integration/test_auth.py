"""Identities, roles, audit and limits on the API port, against a real etcd and control plane.

Each attack of issue 13 that the API owns is replayed here and shown refused: a forged
actor, a delete that erased history, a rogue agent for another cluster, a webhook aimed at
the metadata address, a viewer acting, a revoked token.
"""

from __future__ import annotations

import asyncio
import os
import stat
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from graylane.controlplane.api import auth
from graylane.controlplane.api.release_service import token_record
from graylane.controlplane.app import ControlPlane, bootstrap_admin
from graylane.controlplane.progression.webhooks import PolicyResolver, Webhook, WebhookKind, WebhookPolicy, call_webhook
from graylane.controlplane.store import EtcdStore
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import agent_pb2_grpc
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import LOST_STATUS_ATTEMPTS, status_lost


@dataclass
class Secured:
    plane: ControlPlane
    channel: grpc.aio.Channel
    stub: api_grpc.ReleaseServiceStub
    admin: str

    async def token(self, name: str, role: str, **scope: Sequence[str] | str) -> str:
        made = await self.stub.CreateToken(
            api.CreateTokenRequest(name=name, role=role, **scope),  # type: ignore[arg-type]
            metadata=bearer(self.admin),
        )
        assert made.secret.startswith("glt_")
        return made.secret


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _admin_token(store: EtcdStore) -> str:
    made = auth.new_token()
    await store.create_token(token_record(name="root", role="admin", made=made, created_by="test"))
    return made.token


@pytest.fixture
async def secured(store: EtcdStore) -> AsyncIterator[Secured]:
    admin = await _admin_token(store)
    plane = ControlPlane(
        store,
        api_listen="127.0.0.1:0",
        xds_listen=None,
        http_listen="127.0.0.1:0",
        auth=True,
        agent_tokens={"west": "west-secret#with-a-hash"},
        max_streams_per_identity=2,
        max_receive_message_bytes=256 * 1024,
        stream_recheck_seconds=0.2,
    )
    async with plane.running():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
            secured = Secured(plane, channel, api_grpc.ReleaseServiceStub(channel), admin)
            md = bearer(admin)
            await secured.stub.PutService(
                api.PutServiceRequest(service=pb.Service(name="checkout", stable_version="v1")), metadata=md
            )
            for v in ("v1", "v2"):
                await secured.stub.PutVersion(
                    api.PutVersionRequest(version=pb.Version(service="checkout", name=v)), metadata=md
                )
            yield secured


def canary(*, hooks: Sequence[pb.Webhook] = ()) -> pb.ReleaseSpec:
    spec = pb.ReleaseSpec(
        lane="checkout-v2",
        entry="checkout",
        services=[pb.ServiceVersions(service="checkout", base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in (10, 50, 100)],
    )
    if hooks:
        spec.analysis.interval.FromSeconds(30)
        spec.analysis.min_requests = 1
        spec.analysis.max_error_rate = 0.05
        spec.analysis.webhooks.extend(hooks)
    return spec


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_unauthenticated_calls_are_refused_but_health_answers(secured: Secured) -> None:
    err = await refused(secured.stub.ListReleases(api.ListReleasesRequest()))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    err = await refused(secured.stub.ListReleases(api.ListReleasesRequest(), metadata=bearer("glt_" + "0" * 16)))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    # A well-formed token with a wrong secret is no better than none.
    other = secured.admin[:-1] + ("A" if secured.admin[-1] != "A" else "B")
    err = await refused(secured.stub.ListReleases(api.ListReleasesRequest(), metadata=bearer(other)))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(secured.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_forged_actor_is_not_recorded(secured: Secured) -> None:
    ci = await secured.token("ci", "operator")
    md = (*bearer(ci), ("x-graylane-actor", "mallory"))
    await secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary(), actor="mallory"), metadata=md)
    await secured.stub.NextBatch(api.ActionRequest(name="rel", actor="alice", reason="looks good"), metadata=md)
    history = await secured.stub.History(api.HistoryRequest(name="rel"), metadata=md)
    assert [e.actor for e in history.events] == ["token:ci", "token:ci"]
    assert history.events[-1].reason == "looks good"


async def test_a_viewer_cannot_act_and_an_operator_cannot_delete(secured: Secured) -> None:
    viewer = await secured.token("watcher", "viewer")
    operator = await secured.token("deployer", "operator")
    await secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()), metadata=bearer(operator))
    assert (await secured.stub.GetRelease(api.GetReleaseRequest(name="rel"), metadata=bearer(viewer))).name == "rel"
    for call in (
        secured.stub.NextBatch(api.ActionRequest(name="rel"), metadata=bearer(viewer)),
        secured.stub.Rollback(api.ActionRequest(name="rel"), metadata=bearer(viewer)),
    ):
        err = await refused(call)
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "needs role operator (this identity has viewer)" in (err.details() or "")
    err = await refused(secured.stub.DeleteRelease(api.DeleteReleaseRequest(name="rel"), metadata=bearer(operator)))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED and "needs role admin" in (err.details() or "")
    err = await refused(
        secured.stub.CreateToken(api.CreateTokenRequest(name="x", role="admin"), metadata=bearer(operator))
    )
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    release = await secured.stub.GetRelease(api.GetReleaseRequest(name="rel"), metadata=bearer(viewer))
    assert release.status.phase == pb.PENDING  # nothing moved

    # Every refusal is counted on /metrics.
    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{secured.plane.http_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(scrape)
    denied = [line for line in text.splitlines() if line.startswith("graylane_api_denied_total{")]
    assert any('code="permission_denied"' in line and "NextBatch" in line for line in denied), denied


async def test_scopes_limit_a_token_to_its_releases(secured: Secured) -> None:
    operator = await secured.token("deployer", "operator")
    await secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="mine", spec=canary()), metadata=bearer(operator))
    md = bearer(secured.admin)
    await secured.stub.PutService(
        api.PutServiceRequest(service=pb.Service(name="cart", stable_version="v1")), metadata=md
    )
    await secured.stub.PutVersion(api.PutVersionRequest(version=pb.Version(service="cart", name="v2")), metadata=md)
    other = pb.ReleaseSpec(
        lane="cart-v2",
        entry="cart",
        services=[pb.ServiceVersions(service="cart", base_version="v1", gray_version="v2")],
        batches=[pb.Batch(weight=10, pause=pb.Pause(manual=True))],
    )
    await secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="theirs", spec=other), metadata=bearer(operator))
    scoped = await secured.token("team", "operator", releases=["mine"])
    await secured.stub.NextBatch(api.ActionRequest(name="mine"), metadata=bearer(scoped))
    err = await refused(secured.stub.NextBatch(api.ActionRequest(name="theirs"), metadata=bearer(scoped)))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED and "outside the identity's scope" in (err.details() or "")
    text = await asyncio.to_thread(_scrape, secured.plane.http_port)
    assert any(
        line.startswith("graylane_api_denied_total{") and "NextBatch" in line and 'code="permission_denied"' in line
        for line in text.splitlines()
    ), text
    listed = await secured.stub.ListReleases(api.ListReleasesRequest(), metadata=bearer(scoped))
    assert [r.name for r in listed.releases] == ["mine"]
    # A scope of services admits the releases whose services are all in it.
    by_service = await secured.token("carts", "operator", services=["cart"])
    await secured.stub.NextBatch(api.ActionRequest(name="theirs"), metadata=bearer(by_service))
    err = await refused(secured.stub.Pause(api.ActionRequest(name="mine"), metadata=bearer(by_service)))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    # A scoped admin registers only its own services' versions.
    cart_admin = await secured.token("cart-admin", "admin", services=["cart"])
    await secured.stub.PutVersion(
        api.PutVersionRequest(version=pb.Version(service="cart", name="v3")), metadata=bearer(cart_admin)
    )
    err = await refused(
        secured.stub.PutVersion(
            api.PutVersionRequest(version=pb.Version(service="checkout", name="v3")), metadata=bearer(cart_admin)
        )
    )
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_revoked_token_stops_working(secured: Secured) -> None:
    ci = await secured.token("ci", "operator")
    await secured.stub.ListReleases(api.ListReleasesRequest(), metadata=bearer(ci))
    tokens = await secured.stub.ListTokens(api.ListTokensRequest(), metadata=bearer(secured.admin))
    assert {t.name for t in tokens.tokens} == {"root", "ci"}
    secret = ci[len("glt_") + 17 :]
    assert all(secret not in str(t) for t in tokens.tokens)  # never the secret
    await secured.stub.RevokeToken(api.RevokeTokenRequest(id="ci"), metadata=bearer(secured.admin))
    err = await refused(secured.stub.ListReleases(api.ListReleasesRequest(), metadata=bearer(ci)))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_token_stops_working_on_another_replica(secured: Secured, store: EtcdStore) -> None:
    ci = await secured.token("ci", "operator")
    other = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None, auth=True)
    async with other.running(), grpc.aio.insecure_channel(f"127.0.0.1:{other.api_port}") as channel:
        stub = api_grpc.ReleaseServiceStub(channel)
        await stub.ListReleases(api.ListReleasesRequest(), metadata=bearer(ci))
        await secured.stub.RevokeToken(api.RevokeTokenRequest(id="ci"), metadata=bearer(secured.admin))
        async with asyncio.timeout(5):  # its cache holds a record for a second at most
            while True:
                try:
                    await stub.ListReleases(api.ListReleasesRequest(), metadata=bearer(ci))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                    break
                await asyncio.sleep(0.1)


async def test_a_long_history_is_kept_whole(store: EtcdStore) -> None:
    """More events than etcd takes in one transaction (128 operations) are kept, in order."""
    from graylane.controlplane.domain import model
    from graylane.controlplane.domain.machine import Action, Cause
    from graylane.controlplane.domain.releases import Releases

    await store.put_service(model.Service(name="checkout", stable_version="v1"))
    await store.put_version(model.Version(service="checkout", name="v2"))
    releases = Releases(store)
    await releases.create("rel", model.spec_from_proto(canary()), Cause(actor="t"))
    await releases.act("rel", Action.NEXT, Cause(actor="t"))
    for i in range(149):
        await releases.act("rel", Action.PAUSE if i % 2 == 0 else Action.RESUME, Cause(actor="t", reason="x" * 3000))
    tomb = await store.delete_release("rel", actor="t")
    kept_tomb, events = await store.tombstone_history("rel")
    assert tomb.events == kept_tomb.events == len(events) == 151
    assert [e.sequence for e in events] == list(range(151))


async def test_delete_keeps_the_history_under_a_tombstone(secured: Secured) -> None:
    md = bearer(secured.admin)
    await secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()), metadata=md)
    for _ in range(2):
        await secured.stub.NextBatch(api.ActionRequest(name="rel", reason="step"), metadata=md)
    await secured.stub.DeleteRelease(api.DeleteReleaseRequest(name="rel", reason="cleanup"), metadata=md)
    err = await refused(secured.stub.GetRelease(api.GetReleaseRequest(name="rel"), metadata=md))
    assert err.code() is grpc.StatusCode.NOT_FOUND

    tombs = await secured.stub.ListTombstones(api.ListTombstonesRequest(), metadata=md)
    assert [(t.release, t.deleted_by, t.reason, t.events) for t in tombs.tombstones] == [
        ("rel", "token:root", "cleanup", 3)
    ]
    assert tombs.tombstones[0].release_at_delete.status.weight == 50
    kept = await secured.stub.TombstoneHistory(api.TombstoneHistoryRequest(name="rel"), metadata=md)
    assert [e.action for e in kept.events] == ["create", "next", "next"]

    # The name may be used again: a new history, the old one still kept.
    await secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()), metadata=md)
    fresh = await secured.stub.History(api.HistoryRequest(name="rel"), metadata=md)
    assert len(fresh.events) == 1
    await secured.stub.DeleteRelease(api.DeleteReleaseRequest(name="rel"), metadata=md)
    tombs = await secured.stub.ListTombstones(api.ListTombstonesRequest(name="rel"), metadata=md)
    assert [t.events for t in tombs.tombstones] == [3, 1]
    first = await secured.stub.TombstoneHistory(
        api.TombstoneHistoryRequest(name="rel", generation=tombs.tombstones[0].generation), metadata=md
    )
    assert len(first.events) == 3

    viewer = await secured.token("watcher", "viewer")
    err = await refused(secured.stub.ListTombstones(api.ListTombstonesRequest(), metadata=bearer(viewer)))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_webhooks_aimed_at_metadata_or_link_local_are_refused(secured: Secured) -> None:
    md = bearer(secured.admin)
    for url, why in (
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata service"),
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata service"),
        ("http://[fe80::1]/x", "link-local"),
        ("http://127.0.0.1:8080/confirm", "loopback"),  # auth on: this machine is not a default target
        ("http://[::ffff:169.254.169.254]/", "cloud metadata service"),
        ("http://example.com/" + "a" * 1024 * 1024, "above the limit"),
        ("file:///etc/passwd", "not an http or https URL"),
    ):
        hook = pb.Webhook(name="gate", kind=pb.CONFIRM_BATCH, url=url)
        err = await refused(
            secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary(hooks=[hook])), metadata=md)
        )
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), url[:60]
        if err.code() is grpc.StatusCode.INVALID_ARGUMENT:
            assert why in (err.details() or ""), (url[:60], err.details())


async def test_a_name_resolving_to_a_refused_address_is_not_called() -> None:
    """DNS is checked at call time too: `localhost` resolves to loopback, refused by default."""
    hits = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        hits += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    policy = WebhookPolicy()
    hook = Webhook(name="gate", kind=WebhookKind.CONFIRM_BATCH, url=f"http://localhost:{port}/x", retries=0)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=PolicyResolver(policy))) as session:
            result = await call_webhook(session, hook, {}, policy=policy)
            assert not result.ok and "refused by the webhook policy" in result.error and result.attempts == 0
            # Without the check of the URL as written, the resolver still refuses the address.
            result = await call_webhook(session, hook, {})
            assert not result.ok and "resolves only to refused addresses" in result.error, result.error
        assert hits == 0
        allowed = WebhookPolicy.parse(["127.0.0.0/8"])
        assert allowed.refuses_address("127.0.0.1") is None
        assert allowed.refuses_address("169.254.169.254") is not None
    finally:
        server.close()
        await server.wait_closed()


async def _agent_call(
    plane: ControlPlane, cluster: str, token: str, *, hello_cluster: str = ""
) -> tuple[grpc.aio.AioRpcError | _Status | None, list[apb.ControlMessage]]:
    for _ in range(LOST_STATUS_ATTEMPTS - 1):
        err, got = await _agent_call_once(plane, cluster, token, hello_cluster=hello_cluster)
        if got or not status_lost(err):
            return err, got
    return await _agent_call_once(plane, cluster, token, hello_cluster=hello_cluster)


async def _agent_call_once(
    plane: ControlPlane, cluster: str, token: str, *, hello_cluster: str = ""
) -> tuple[grpc.aio.AioRpcError | _Status | None, list[apb.ControlMessage]]:
    hello = apb.AgentMessage(
        hello=apb.AgentHello(cluster=hello_cluster or cluster, gateway_address="127.0.0.1:9000", agent_id="x")
    )
    done = asyncio.Event()

    async def requests() -> AsyncIterator[apb.AgentMessage]:
        yield hello  # only the hello: a refusal then never races a second write
        await done.wait()

    metadata = [("x-graylane-cluster", cluster)]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    got: list[apb.ControlMessage] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests(), metadata=metadata)
        try:
            async with asyncio.timeout(5):
                async for message in call:
                    got.append(message)
                    if message.HasField("welcome"):
                        call.cancel()
                        return None, got
        except grpc.aio.AioRpcError as exc:
            # A refusal may reach the client while it is still sending its first message,
            # which gRPC reports as a failed send; the call's status, when it differs, is the
            # server's answer (when it is lost as well, `_agent_call` asks again).
            if exc.code() is grpc.StatusCode.INTERNAL and await call.code() is not grpc.StatusCode.INTERNAL:
                return _Status(await call.code(), await call.details()), got
            return exc, got
        finally:
            done.set()
    return None, got


@dataclass
class _Status:
    status: grpc.StatusCode
    text: str

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.text


async def test_a_rogue_agent_cannot_report_for_another_cluster(secured: Secured, store: EtcdStore) -> None:
    east = await secured.token("east-agent", "agent", cluster="east")
    # No credential, another cluster's credential, a user's token: refused before a write.
    err, _ = await _agent_call(secured.plane, "east", "")
    assert err is not None and err.code() is grpc.StatusCode.UNAUTHENTICATED
    # An `--agent-tokens` line presented for another cluster is no credential for it.
    err, _ = await _agent_call(secured.plane, "east", "west-secret#with-a-hash")
    assert err is not None and err.code() is grpc.StatusCode.UNAUTHENTICATED
    # A token bound to east, saying hello as west: refused before a write.
    err, _ = await _agent_call(secured.plane, "west", east)
    assert err is not None and err.code() is grpc.StatusCode.PERMISSION_DENIED
    # Naming its own cluster in the metadata but another in the hello: refused before a write.
    err, _ = await _agent_call(secured.plane, "east", east, hello_cluster="west")
    assert err is not None and err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "hello.cluster" in (err.details() or "")
    err, _ = await _agent_call(secured.plane, "west", secured.admin)
    assert err is not None and err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await store.known_clusters() == frozenset()
    # Each agent with its own credential is welcome (a `#` inside a legacy token is kept).
    err, got = await _agent_call(secured.plane, "west", "west-secret#with-a-hash")
    assert err is None and got[0].welcome.cluster == "west"
    err, got = await _agent_call(secured.plane, "east", east)
    assert err is None and got[0].welcome.cluster == "east"
    assert await store.known_clusters() == {"west", "east"}


async def test_streams_per_identity_and_message_size_are_capped(secured: Secured) -> None:
    viewer = await secured.token("watcher", "viewer")
    await secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()), metadata=bearer(secured.admin))
    calls = [secured.stub.Watch(api.WatchRequest(name="rel"), metadata=bearer(viewer)) for _ in range(2)]
    try:
        for call in calls:
            assert (await anext(aiter(call))).name == "rel"
        third = secured.stub.Watch(api.WatchRequest(name="rel"), metadata=bearer(viewer))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await anext(aiter(third))
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another identity has its own allowance.
        admin_watch = secured.stub.Watch(api.WatchRequest(name="rel"), metadata=bearer(secured.admin))
        assert (await anext(aiter(admin_watch))).name == "rel"
        admin_watch.cancel()
    finally:
        for call in calls:
            call.cancel()
    # A slot comes back when its stream ends.
    async with asyncio.timeout(5):
        while True:
            again = secured.stub.Watch(api.WatchRequest(name="rel"), metadata=bearer(viewer))
            try:
                assert (await anext(aiter(again))).name == "rel"
                again.cancel()
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.05)
    request = api.ApplyReleaseRequest(name="big", spec=canary(), reason="x" * (300 * 1024))
    err2 = await refused(secured.stub.ApplyRelease(request, metadata=bearer(secured.admin)))
    assert err2.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_bootstrap_writes_one_admin_token_per_installation(store: EtcdStore, tmp_path: Path) -> None:
    path = tmp_path / "state" / "admin.token"
    assert await bootstrap_admin(store, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = path.read_text().strip()
    assert not await bootstrap_admin(store, tmp_path / "again.token")
    assert not (tmp_path / "again.token").exists()
    # A restart with the same file leaves it as the first start wrote it.
    assert not await bootstrap_admin(store, path)
    assert path.read_text().strip() == token
    assert sorted(p.name for p in path.parent.iterdir()) == ["admin.token"]
    plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None, auth=True)
    async with plane.running(), grpc.aio.insecure_channel(f"127.0.0.1:{plane.api_port}") as channel:
        stub = api_grpc.ReleaseServiceStub(channel)
        listed = await stub.ListTokens(api.ListTokensRequest(), metadata=bearer(token))
        assert [(t.name, t.role) for t in listed.tokens] == [("bootstrap-admin", "admin")]


async def test_revoking_a_token_ends_the_streams_it_opened(secured: Secured, store: EtcdStore) -> None:
    viewer = await secured.token("watcher", "viewer")
    agent = await secured.token("east-agent", "agent", cluster="east")
    await secured.stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=canary()), metadata=bearer(secured.admin))
    watch = secured.stub.Watch(api.WatchRequest(name="rel"), metadata=bearer(viewer))
    assert (await anext(aiter(watch))).name == "rel"

    stop = asyncio.Event()

    async def requests() -> AsyncIterator[apb.AgentMessage]:
        yield apb.AgentMessage(hello=apb.AgentHello(cluster="east", gateway_address="127.0.0.1:9000", agent_id="a"))
        await stop.wait()

    metadata = (("x-graylane-cluster", "east"), *bearer(agent))
    stream = agent_pb2_grpc.AgentServiceStub(secured.channel).Connect(requests(), metadata=metadata)
    try:
        assert (await anext(aiter(stream))).welcome.cluster == "east"
        for name in ("watcher", "east-agent"):
            await secured.stub.RevokeToken(api.RevokeTokenRequest(id=name), metadata=bearer(secured.admin))
        async with asyncio.timeout(10):
            for call in (watch, stream):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in (err.value.details() or "")
    finally:
        stop.set()
        watch.cancel()
        stream.cancel()
