"""Issue 13 (part B): TLS and mutual TLS on every port, xDS clients admitted by identity,
and metrics read only from allowed admin addresses — with certificates from `graylane
certs`, a real etcd and real Envoys over mTLS ADS. Each attack of the issue that concerns
these ports is replayed and must now change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from graylane.agent.stats import AdminAllowList
from graylane.controlplane.api import auth
from graylane.controlplane.api.certs import make_local_certs
from graylane.controlplane.api.proxyauth import TOKEN_METADATA, xds_authenticator
from graylane.controlplane.api.release_service import token_record
from graylane.controlplane.api.tls import ClientTls, ServerTls, agent_uri, open_channel, user_uri
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.domain import model
from graylane.controlplane.errors import Unavailable
from graylane.controlplane.local.envoy import EnvoyProcess, EnvoyTls
from graylane.controlplane.local.etcd import EtcdProcess, EtcdTls
from graylane.controlplane.store import EtcdStore, connect
from graylane.deploy.local.traffic import run_load
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import agent_pb2_grpc
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc
from graylane.xds.resources import LISTENER, ROUTE
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import BIN, east_agent, lane_spec, poll_release, register, start_serve

pytestmark = [pytest.mark.etcd, pytest.mark.envoy]

TOKEN = "local-proxy-token-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    make_local_certs(directory, clusters=["local", "east"], users=["admin", "alice"])
    return directory


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA and its certificates: a client (or server) nobody here trusts."""
    directory = tmp_path_factory.mktemp("other-certs")
    make_local_certs(directory, clusters=["local"], users=["admin"])
    return directory


def server_tls(certs: Path) -> ServerTls:
    return ServerTls(cert=certs / "server.pem", key=certs / "server-key.pem", client_ca=certs / "ca.pem")


def client(certs: Path, who: str) -> ClientTls:
    return ClientTls(ca=certs / "ca.pem", cert=certs / f"{who}.pem", key=certs / f"{who}-key.pem")


def envoy_tls(certs: Path, cluster: str = "local") -> EnvoyTls:
    return EnvoyTls(cert=certs / f"envoy-{cluster}.pem", key=certs / f"envoy-{cluster}-key.pem", ca=certs / "ca.pem")


@contextlib.asynccontextmanager
async def mtls_plane(store: EtcdStore, certs: Path, **options: Any) -> AsyncIterator[ControlPlane]:
    tls = server_tls(certs)
    plane = ControlPlane(
        store,
        api_listen="127.0.0.1:0",
        xds_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        tls=tls,
        xds_auth=xds_authenticator(cluster="local", tokens=(), mutual=True),
        **options,
    )
    async with plane.running():
        yield plane


@contextlib.asynccontextmanager
async def api_stub(plane: ControlPlane, tls: ClientTls | None) -> AsyncIterator[Any]:
    async with open_channel(f"127.0.0.1:{plane.api_port}", tls) as channel:
        yield api_grpc.ReleaseServiceStub(channel)


async def mtls_checkout_release(
    es: contextlib.AsyncExitStack, store: EtcdStore, certs: Path
) -> tuple[ControlPlane, Any]:
    """An mTLS replica with checkout's v1 and v2 upstreams registered and release "rel"
    applied (not yet moved), all closed with `es`: the replica and an admin's stub."""
    v1 = await es.enter_async_context(Upstream("checkout", "v1"))
    v2 = await es.enter_async_context(Upstream("checkout", "v2"))
    plane = await es.enter_async_context(mtls_plane(store, certs))
    stub = await es.enter_async_context(api_stub(plane, client(certs, "user-admin")))
    await register(stub, "checkout", v1, v2)
    await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")))
    return plane, stub


async def rogue_nack(port: int, tls: ClientTls | None, node: base_pb2.Node) -> grpc.StatusCode:
    """Open an ADS stream and send, as its first request, a NACK of the route type: what a
    rogue process did to pause every live release. The status the stream ended with."""
    request = discovery_pb2.DiscoveryRequest(
        node=node,
        type_url=ROUTE,
        version_info="",
        response_nonce="1",
        error_detail=status_pb2.Status(code=3, message="rogue NACK"),
    )

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        yield request
        await asyncio.Event().wait()  # keep the stream open; the server ends it

    async with open_channel(f"127.0.0.1:{port}", tls) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests())
        try:
            async with asyncio.timeout(10):
                async for _ in call:
                    pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            call.cancel()
    return grpc.StatusCode.OK


def node(node_id: str, cluster: str = "local", **metadata: str) -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster=cluster)
    for key, value in metadata.items():
        n.metadata.fields[key].string_value = value
    return n


# ------------------------------------------------------------------ Envoy over mTLS ADS


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_envoy_over_mtls_ads_gets_routes_and_reaches_each_batch(
    store: EtcdStore, certs: Path, envoy: Any, protocol: str
) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub = await mtls_checkout_release(es, store, certs)
        proxy: EnvoyProcess = await envoy(
            ads_port=plane.xds_port, protocol=protocol, node_id="tls-envoy", node_cluster="local", tls=envoy_tls(certs)
        )
        for weight in (10, 50, 100):
            await stub.NextBatch(api.ActionRequest(name="rel"))
            reached = await poll_release(stub, "rel", lambda r, w=weight: r.status.reached and r.status.weight == w)
            assert reached.status.convergence.converged == reached.status.convergence.proxies == 1
        result = await run_load(proxy.listen_port, authority="checkout", count=200, max_seconds=10)
        assert result.failed == 0 and result.versions == {"v2": 200}, (result.statuses, result.errors)
        (status,) = plane.tracker.of_node("tls-envoy")
        assert status.cluster == "local"


# ------------------------------------------------------------------ every port refuses


async def _health(port: int, tls: ClientTls | None) -> grpc.StatusCode:
    async with open_channel(f"127.0.0.1:{port}", tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def _https(port: int, context: ssl.SSLContext | None) -> int | str:
    scheme = "http" if context is None else "https"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(f"{scheme}://127.0.0.1:{port}/healthz", ssl=context or False) as response:
                return response.status
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__


async def test_each_port_refuses_plain_text_wrong_ca_and_certificate_less_clients(
    store: EtcdStore, certs: Path, other_certs: Path
) -> None:
    good = client(certs, "user-admin")
    no_cert = ClientTls(ca=certs / "ca.pem")
    foreign_cert = ClientTls(  # trusts our server, presents a certificate another CA signed
        ca=certs / "ca.pem", cert=other_certs / "user-admin.pem", key=other_certs / "user-admin-key.pem"
    )
    wrong_ca = client(other_certs, "user-admin")  # does not trust our server
    async with mtls_plane(store, certs) as plane:
        assert await _health(plane.api_port, good) == grpc.StatusCode.OK
        for bad in (None, no_cert, foreign_cert, wrong_ca):
            assert await _health(plane.api_port, bad) == grpc.StatusCode.UNAVAILABLE, bad
            assert await rogue_nack(plane.xds_port, bad, node("rogue")) == grpc.StatusCode.UNAVAILABLE, bad
        assert await _https(plane.http_port, good.ssl_context()) == 200
        for context in (None, no_cert.ssl_context(), foreign_cert.ssl_context(), wrong_ca.ssl_context()):
            assert await _https(plane.http_port, context) != 200
        assert plane.tracker.open_streams() == 0


# ------------------------------------------------------------------ a rogue xDS stream


async def test_a_rogue_xds_streams_nack_changes_nothing(store: EtcdStore, certs: Path, envoy: Any) -> None:
    async with contextlib.AsyncExitStack() as es:
        plane, stub = await mtls_checkout_release(es, store, certs)
        await envoy(ads_port=plane.xds_port, node_id="real", node_cluster="local", tls=envoy_tls(certs))
        await stub.NextBatch(api.ActionRequest(name="rel"))
        await poll_release(stub, "rel", lambda r: r.status.reached)

        attempts = {
            # A user's certificate proves no proxy.
            "user certificate": (client(certs, "user-admin"), node("rogue-1")),
            # Another cluster's proxy may not get (or NACK) this cluster's configuration.
            "east proxy": (client(certs, "envoy-east"), node("rogue-2", cluster="east")),
            # A proxy of this cluster's certificate, claiming to be in another cluster.
            "wrong node cluster": (client(certs, "envoy-local"), node("rogue-3", cluster="east")),
        }
        codes = {name: await rogue_nack(plane.xds_port, tls, n) for name, (tls, n) in attempts.items()}
        assert codes == {
            "user certificate": grpc.StatusCode.UNAUTHENTICATED,
            "east proxy": grpc.StatusCode.PERMISSION_DENIED,
            "wrong node cluster": grpc.StatusCode.PERMISSION_DENIED,
        }
        assert plane.ads is not None and plane.ads.refused == 3
        # Nothing changed: the release progresses, reaches its next batch with the one real
        # proxy, and no NACK was ever recorded.
        assert set(plane.tracker.proxies()) == {s.stream for s in plane.tracker.of_node("real")}
        release = await stub.NextBatch(api.ActionRequest(name="rel"))
        assert release.status.phase == pb.PROGRESSING
        release = await poll_release(stub, "rel", lambda r: r.status.reached and r.status.weight == 50)
        assert release.status.phase == pb.PROGRESSING and not release.status.HasField("last_nack")
        assert release.status.convergence.proxies == 1


# ------------------------------------------------------------------ node tokens


async def test_a_node_token_admits_an_envoy_and_is_never_recorded(store: EtcdStore, envoy: Any) -> None:
    plane = ControlPlane(
        store,
        api_listen="127.0.0.1:0",
        xds_listen="127.0.0.1:0",
        xds_auth=xds_authenticator(cluster="local", tokens=[("local", None, TOKEN)], mutual=False),
    )
    async with plane.running():
        await envoy(ads_port=plane.xds_port, node_id="tokened", node_cluster="local", xds_token=TOKEN)
        (status,) = plane.tracker.of_node("tokened")
        assert LISTENER in status.acked
        assert TOKEN_METADATA not in status.metadata and "admin_address" in status.metadata
        wrong = node("rogue", **{TOKEN_METADATA: "not-the-token-0123456789"})
        assert await rogue_nack(plane.xds_port, None, wrong) == grpc.StatusCode.UNAUTHENTICATED
        assert await rogue_nack(plane.xds_port, None, node("rogue")) == grpc.StatusCode.UNAUTHENTICATED
        assert [p.node_id for p in plane.tracker.proxies().values()] == ["tokened"]


# ------------------------------------------------------------------ an agent over TLS


async def test_an_agent_over_mtls_serves_its_clusters_envoys_over_mtls(
    store: EtcdStore, certs: Path, envoy: Any, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as es:
        v1 = await es.enter_async_context(Upstream("checkout", "v1"))
        plane = await es.enter_async_context(mtls_plane(store, certs))
        stub = await es.enter_async_context(api_stub(plane, client(certs, "user-admin")))
        await stub.PutService(api.PutServiceRequest(service=pb.Service(name="checkout", stable_version="v1")))
        agent = await east_agent(
            es,
            plane.api_port,
            tmp_path,
            [v1],
            control_plane_tls=client(certs, "agent-east"),
            tls=server_tls(certs),
        )
        proxy: EnvoyProcess = await envoy(
            ads_port=agent.xds_port, node_id="east-envoy", node_cluster="east", tls=envoy_tls(certs, "east")
        )
        result = await run_load(proxy.listen_port, authority="checkout", count=50, max_seconds=10)
        assert result.failed == 0 and result.versions == {"v1": 50}, (result.statuses, result.errors)
        # The control plane's own proxies' certificate does not open the agent's port.
        code = await rogue_nack(agent.xds_port, client(certs, "envoy-local"), node("rogue", cluster="local"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert await rogue_nack(agent.xds_port, None, node("rogue", cluster="east")) == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ metrics trust


async def test_a_self_reported_admin_address_outside_the_allow_list_is_not_fetched(store: EtcdStore) -> None:
    hits = {"allowed": 0, "refused": 0}

    async def start_admin(name: str) -> tuple[web.AppRunner, int]:
        async def stats(request: web.Request) -> web.Response:
            hits[name] += 1
            # What a rogue answered to roll a release back: nothing but 5xx on a gray version.
            total = 100 * hits[name]
            return web.json_response(
                {"stats": [{"name": "cluster.checkout|v2.upstream_rq_total", "value": total},
                           {"name": "cluster.checkout|v2.upstream_rq_5xx", "value": total}]}
            )  # fmt: skip

        app = web.Application()
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, int(runner.addresses[0][1])

    allowed, allowed_port = await start_admin("allowed")
    refused, refused_port = await start_admin("refused")
    try:
        plane = ControlPlane(
            store,
            api_listen="127.0.0.1:0",
            xds_listen="127.0.0.1:0",
            admin_allow=AdminAllowList.parse([f"127.0.0.1/32:{allowed_port}"]),
        )
        async with plane.running(), contextlib.AsyncExitStack() as es:
            for name, port in (("allowed", allowed_port), ("refused", refused_port)):
                proxy = node(name, admin_address=f"127.0.0.1:{port}")
                await es.enter_async_context(_open_stream(plane.xds_port, proxy))
            async with asyncio.timeout(15):
                while hits["allowed"] < 3:
                    await asyncio.sleep(0.05)
            assert hits["refused"] == 0
    finally:
        await allowed.cleanup()
        await refused.cleanup()


@contextlib.asynccontextmanager
async def _open_stream(port: int, n: base_pb2.Node) -> AsyncIterator[None]:
    """An ADS stream that asks for listeners and then stays open (a proxy that connected)."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        yield discovery_pb2.DiscoveryRequest(node=n, type_url=LISTENER)
        await done.wait()

    async with open_channel(f"127.0.0.1:{port}") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests())
        try:
            yield
        finally:
            done.set()
            call.cancel()


# ------------------------------------------------------------------ the CLI end to end


@pytest.fixture
def served_tls(tmp_path: Path, etcd_endpoint: str) -> Iterator[tuple[str, Path]]:
    certs = tmp_path / "certs"
    made = subprocess.run(
        [str(BIN / "graylane"), "certs", "--out", str(certs)], capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    proc, api = start_serve(
        tmp_path / "serve.log",
        "--data-dir", str(tmp_path / "state"),
        "--tls-cert", str(certs / "server.pem"),
        "--tls-key", str(certs / "server-key.pem"),
        "--client-ca", str(certs / "ca.pem"),
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{api}", certs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_cli_reaches_a_mutual_tls_server_with_its_certificate_only(served_tls: tuple[str, Path]) -> None:
    server, certs = served_tls
    env_tls = {
        "GRAYLANE_CA": str(certs / "ca.pem"),
        "GRAYLANE_CERT": str(certs / "user-admin.pem"),
        "GRAYLANE_KEY": str(certs / "user-admin-key.pem"),
    }

    def graylane(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "graylane"), "--server", server, "--timeout", "3", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", **(env or {})},
        )

    deadline = time.monotonic() + 30
    while (answer := graylane("get", env=env_tls)).returncode != 0:
        assert time.monotonic() < deadline, answer.stderr
        time.sleep(0.2)
    flags = graylane(
        "get", "--ca", str(certs / "ca.pem"), "--cert", str(certs / "user-admin.pem"),
        "--key", str(certs / "user-admin-key.pem"),
    )  # fmt: skip
    assert flags.returncode == 0, flags.stderr
    plain = graylane("get")
    assert plain.returncode == 1 and "cannot reach graylane" in plain.stderr
    no_cert = graylane("get", "--ca", str(certs / "ca.pem"))
    assert no_cert.returncode == 1
    half = graylane("get", "--cert", str(certs / "user-admin.pem"))
    assert half.returncode == 2 and "needs its key" in half.stderr


# ------------------------------------------------------------------ certificates as API identities


async def _agent_hello(port: int, tls: ClientTls, cluster: str) -> grpc.StatusCode:
    """An AgentService stream with a certificate and no token: its status (OK: welcomed)."""

    async def requests() -> AsyncIterator[apb.AgentMessage]:
        yield apb.AgentMessage(hello=apb.AgentHello(cluster=cluster, gateway_address="127.0.0.1:9000", agent_id="x"))
        await asyncio.Event().wait()

    async with open_channel(f"127.0.0.1:{port}", tls) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests(), metadata=[("x-graylane-cluster", cluster)])
        try:
            async with asyncio.timeout(10):
                async for message in call:
                    if message.HasField("welcome"):
                        return grpc.StatusCode.OK
        except grpc.aio.AioRpcError:
            pass
        finally:
            call.cancel()
        return await call.code()


async def test_with_auth_a_certificate_is_an_identity_only_where_a_record_names_it(
    store: EtcdStore, certs: Path
) -> None:
    made = auth.new_token()
    await store.create_token(token_record(name="root", role="admin", made=made, created_by="test"))
    admin = (("authorization", f"Bearer {made.token}"),)
    async with contextlib.AsyncExitStack() as es:
        plane = await es.enter_async_context(mtls_plane(store, certs, auth=True))
        # The TLS layer wants a certificate from everyone; the admin's token rides on one
        # that no record names.
        stub = await es.enter_async_context(api_stub(plane, client(certs, "user-admin")))
        service = pb.Service(name="checkout", stable_version="v1")
        await stub.PutService(api.PutServiceRequest(service=service), metadata=admin)
        for v in ("v1", "v2"):
            await stub.PutVersion(api.PutVersionRequest(version=pb.Version(service="checkout", name=v)), metadata=admin)
        await stub.ApplyRelease(api.ApplyReleaseRequest(name="rel", spec=lane_spec("checkout", "lane")), metadata=admin)
        with pytest.raises(grpc.aio.AioRpcError) as nobody:
            await stub.GetRelease(api.GetReleaseRequest(name="rel"))  # a certificate alone grants nothing
        assert nobody.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for name, role, extra in (("alice", "operator", {}), ("east-agent", "agent", {"cluster": "east"})):
            subject = user_uri("alice") if name == "alice" else agent_uri("east")
            await stub.CreateToken(
                api.CreateTokenRequest(name=name, role=role, subject=subject, **extra),  # type: ignore[arg-type]
                metadata=admin,
            )
        alice = await es.enter_async_context(api_stub(plane, client(certs, "user-alice")))
        moved = await alice.NextBatch(api.ActionRequest(name="rel", actor="someone-else"))
        assert moved.status.weight == 10
        history = await alice.History(api.HistoryRequest(name="rel"))
        assert history.events[-1].actor == "cert:alice"
        with pytest.raises(grpc.aio.AioRpcError) as operator:
            await alice.DeleteRelease(api.DeleteReleaseRequest(name="rel"))
        assert operator.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # An agent's certificate opens its own cluster's AgentService stream, no other.
        assert await _agent_hello(plane.api_port, client(certs, "agent-east"), "east") == grpc.StatusCode.OK
        code = await _agent_hello(plane.api_port, client(certs, "agent-east"), "west")
        assert code == grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------------------------------ etcd over TLS


async def test_the_store_reaches_an_etcd_that_requires_client_certificates(certs: Path, tmp_path: Path) -> None:
    tls = EtcdTls(
        cert=certs / "server.pem",
        key=certs / "server-key.pem",
        ca=certs / "ca.pem",
        client_ca=certs / "ca.pem",
        probe_cert=certs / "user-admin.pem",
        probe_key=certs / "user-admin-key.pem",
    )
    async with EtcdProcess(data_dir=tmp_path / "etcd", tls=tls) as etcd:
        good = client(certs, "user-admin").grpc_credentials()
        store = await connect(etcd.endpoint, prefix="/tls-test/v1/", credentials=good)
        try:
            await store.put_service(model.Service(name="checkout", stable_version="v1"))
            assert [s.name for s in await store.list_services()] == ["checkout"]
            plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None)
            async with plane.running(), api_stub(plane, None) as stub:
                listed = await stub.ListServices(api.ListServicesRequest())
                assert [s.name for s in listed.services] == ["checkout"]
        finally:
            await store.close()
        # Plain text, no client certificate, or a CA that did not sign etcd's: no store.
        for credentials in (None, ClientTls(ca=certs / "ca.pem").grpc_credentials()):
            with pytest.raises(Unavailable):
                await connect(etcd.endpoint, prefix="/tls-test/v1/", timeout=2, credentials=credentials)
