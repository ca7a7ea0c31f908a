"""The whole demo chain on loopback: services A -> B -> C -> D -> E, their sidecars and an edge.

Owns, for the demo and the integration tests: starting one `ChainService` per (service,
version); registering every service (stable version "v1") and every version with its
endpoint through the ReleaseService API; one sidecar Envoy per service that has a next
hop (node id ``sidecar-<service>``), through which every version of that service calls
the next one; one edge Envoy (node id ``edge``) through which clients call the first
service; and sending bounded traffic through the edge. Every Envoy takes all of its
configuration from the control plane over ADS, so which version serves each hop is
decided by the rendered routes only.

Start order: services, then registration, then Envoys (so each Envoy's first snapshot
already has the routes it serves); stopped in reverse, Envoys by PID.

Must not import: etcd, graylane.xds. Talks to the control plane only through its API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote

import aiohttp
from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.lifecycle import Lifecycle
from graylane.controlplane.local.envoy import SOTW, EnvoyProcess
from graylane.deploy.demo.service import ChainService
from graylane.v1 import release_pb2 as pb

__all__ = ["STABLE_VERSION", "Chain", "ChainAnswer", "Hop"]

STABLE_VERSION: Final = "v1"
_LOOPBACK: Final = "127.0.0.1"
_REQUEST_TIMEOUT_SECONDS: Final = 10.0


@dataclass(frozen=True, slots=True)
class Hop:
    """What one service saw of one request (as it reported it in the answer)."""

    service: str
    version: str
    lane: str = ""  # the incoming x-graylane header, "" when absent
    baggage: str = ""  # the incoming baggage header, raw, "" when absent
    trace_id: str = ""

    @property
    def name(self) -> str:
        return f"{self.service}:{self.version}"

    def baggage_members(self) -> dict[str, str]:
        """The incoming baggage as key -> value (properties after ";" dropped, values decoded)."""
        members: dict[str, str] = {}
        for member in self.baggage.split(","):
            key, sep, value = member.partition("=")
            if sep and key.strip():
                members[unquote(key.strip())] = unquote(value.split(";", 1)[0].strip())
        return members


@dataclass(frozen=True, slots=True)
class ChainAnswer:
    """One request through the edge: status 0 when no HTTP answer came back at all."""

    status: int
    path: str = ""
    hops: tuple[Hop, ...] = ()
    error: str = ""
    timed_out: bool = False  # no answer within the request's time (a slow machine, not a refusal)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @classmethod
    def from_response(cls, status: int, raw: bytes) -> ChainAnswer:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return cls(status, error=raw[:200].decode(errors="replace"))
        hops = tuple(
            Hop(**{k: str(h.get(k, "")) for k in ("service", "version", "lane", "baggage", "trace_id")})
            for h in body.get("hops", [])
            if isinstance(h, dict)
        )
        return cls(status, str(body.get("path", "")), hops, str(body.get("error", "")))


async def get_once(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str], *, timeout: float
) -> ChainAnswer:
    """One GET, never raising: a timeout is an answer that says so (`timed_out`), any other
    failure is status 0 with the error."""
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, headers=headers) as response:
                return ChainAnswer.from_response(response.status, await response.read())
    except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
        return ChainAnswer(0, error=f"no answer within {timeout:.1f}s", timed_out=True)
    except aiohttp.ClientError as exc:
        return ChainAnswer(0, error=f"{type(exc).__name__}: {exc}")


class Chain(Lifecycle):
    """`async with Chain(xds_port=..., client=..., versions={"b": ("v1", "v2")}) as chain:`.

    `services` are called in order, each calling the next through its sidecar. Every
    service runs "v1" (its stable version) plus the versions listed for it in `versions`.
    """

    def __init__(
        self,
        *,
        xds_port: int,
        client: ReleaseClient,
        services: tuple[str, ...] = ("a", "b", "c", "d", "e"),
        versions: Mapping[str, tuple[str, ...]] | None = None,
        propagate_lane_header: bool = True,
        protocol: str = SOTW,
        envoy_binary: Path | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        if not services or len(set(services)) != len(services):
            raise ValueError(f"services: {services!r} must be distinct and not empty")
        unknown = set(versions or {}) - set(services)
        if unknown:
            raise ValueError(f"versions: {sorted(unknown)} are not in services {services!r}")
        self.services = services
        self.versions: dict[str, tuple[str, ...]] = {
            s: tuple(dict.fromkeys((STABLE_VERSION, *(versions or {}).get(s, ())))) for s in services
        }
        self.propagate_lane_header = propagate_lane_header
        self._client = client
        self._ready_timeout = ready_timeout
        # Every Envoy of the chain (the sidecars and the edge) starts alike but for its node id.
        self._envoy = functools.partial(
            EnvoyProcess, ads_port=xds_port, protocol=protocol, binary=envoy_binary, ready_timeout=ready_timeout
        )
        self._instances: dict[tuple[str, str], ChainService] = {}
        self._sidecars: dict[str, EnvoyProcess] = {}
        self._edge: EnvoyProcess | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self.answered = 0  # requests started through the edge so far (for tests that act mid-load)

    # -------------------------------------------------------------------------- access

    @property
    def entry(self) -> str:
        """The first service: the Host of every request through the edge."""
        return self.services[0]

    @property
    def edge_port(self) -> int:
        if self._edge is None:
            raise RuntimeError("the chain is not started")
        return self._edge.listen_port

    @property
    def envoys(self) -> list[EnvoyProcess]:
        """Every Envoy of the chain: the sidecars in service order, then the edge."""
        return [*self._sidecars.values(), *([self._edge] if self._edge is not None else [])]

    def sidecar(self, service: str) -> EnvoyProcess:
        return self._sidecars[service]

    def service_instance(self, service: str, version: str) -> ChainService:
        return self._instances[(service, version)]

    def stable_path(self) -> str:
        """The path of a request outside every lane: each service's stable version."""
        return ">".join(f"{s}:{STABLE_VERSION}" for s in self.services)

    # ----------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._stack is not None:
            raise RuntimeError("the chain is already started")
        async with contextlib.AsyncExitStack() as stack:
            # Envoys are created first (not started) only to know their listener ports.
            for service in self.services[:-1]:
                self._sidecars[service] = self._envoy(node_id=f"sidecar-{service}")
            self._edge = self._envoy(node_id="edge")
            stack.callback(self._forget)

            for index, service in enumerate(self.services):
                last = index == len(self.services) - 1
                for version in self.versions[service]:
                    instance = ChainService(
                        service=service,
                        version=version,
                        next_hop=None if last else self.services[index + 1],
                        sidecar_port=None if last else self._sidecars[service].listen_port,
                        propagate_lane_header=self.propagate_lane_header,
                    )
                    await stack.enter_async_context(instance)
                    self._instances[(service, version)] = instance
            await self._register()

            # Stopped (by PID, idempotent, a no-op if it never started) before the services
            # above, by exit-stack order: no Envoy routes to a closed service.
            for envoy in self.envoys:
                stack.push_async_callback(envoy.stop)
            async with asyncio.TaskGroup() as starting:
                for envoy in self.envoys:
                    starting.create_task(envoy.start())
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_SECONDS), auto_decompress=False
            )
            stack.push_async_callback(self._close_session)
            await self._until_serving()
            self._stack = stack.pop_all()

    async def stop(self) -> None:
        """Stop the Envoys (by PID), then the services; idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def _forget(self) -> None:
        self._instances.clear()
        self._sidecars.clear()
        self._edge = None

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _register(self) -> None:
        for service in self.services:
            await self._client.put_service(pb.Service(name=service, stable_version=STABLE_VERSION))
            for version in self.versions[service]:
                port = self._instances[(service, version)].port
                await self._client.put_version(
                    pb.Version(
                        service=service,
                        name=version,
                        endpoints=[pb.Endpoint(address=_LOOPBACK, port=port)],
                    )
                )

    async def _until_serving(self) -> None:
        """Poll through the edge until the whole chain answers 200 (LIVE is not yet EDS-warm
        everywhere on every Envoy version, and the first answer is the proof anyway)."""
        last = ChainAnswer(0)
        try:
            async with asyncio.timeout(self._ready_timeout):
                while not (last := await self.request(timeout=2.0)).ok:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise RuntimeError(
                f"the chain did not answer 200 within {self._ready_timeout}s; last answer: {last}"
            ) from None

    # ------------------------------------------------------------------------- traffic

    async def request(
        self, headers: Mapping[str, str] | None = None, *, path: str = "/", timeout: float = _REQUEST_TIMEOUT_SECONDS
    ) -> ChainAnswer:
        """One GET through the edge with Host = the first service; never raises for a
        failed request (status 0 and the error instead)."""
        if self._session is None or self._edge is None:
            raise RuntimeError("the chain is not started")
        self.answered += 1
        sent = {**(headers or {}), "Host": self.entry}
        url = f"http://{_LOOPBACK}:{self._edge.listen_port}{path}"
        return await get_once(self._session, url, sent, timeout=timeout)

    async def run(
        self,
        n: int,
        *,
        headers_for: Callable[[int], Mapping[str, str]] | None = None,
        concurrency: int = 16,
        timeout: float = 60,
    ) -> list[ChainAnswer]:
        """Up to `n` requests from `concurrency` workers, all within `timeout` seconds.

        Answers are in request order. Requests not started before the deadline are not
        sent (so fewer than `n` answers come back); one cut short by it is a status-0
        answer. Nothing is retried.
        """
        deadline = time.monotonic() + timeout
        answers: list[ChainAnswer | None] = [None] * n
        next_index = 0

        def claim() -> int | None:
            nonlocal next_index
            if next_index >= n or time.monotonic() >= deadline:
                return None
            next_index += 1
            return next_index - 1

        async def worker() -> None:
            while (i := claim()) is not None:
                headers = headers_for(i) if headers_for is not None else None
                remaining = max(deadline - time.monotonic(), 0.001)
                answers[i] = await self.request(headers, timeout=min(remaining, _REQUEST_TIMEOUT_SECONDS))

        async with asyncio.TaskGroup() as workers:
            for _ in range(max(1, min(concurrency, n))):
                workers.create_task(worker())
        return [a for a in answers if a is not None]
