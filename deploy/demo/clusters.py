"""Two simulated clusters on loopback, each with its own agent: the multi-cluster layout.

Owns, for the integration tests and `graylane demo --clusters 2`:

* `ServeProcess` — a real `graylane serve` subprocess against a given etcd and key prefix,
  on fixed loopback ports, that can be killed with SIGKILL and started again on the same
  ports (its state lives in etcd, not in the process);
* `AgentProcess` — a real `graylane agent` subprocess, killed (SIGKILL) or stopped
  (SIGTERM) and started again with the same state dir and ports;
* `TwoClusters` — the layout itself: one control plane with agent tokens for both
  clusters; service `checkout` (stable v1) with versions v1 and v2 registered *without*
  endpoints, because the agents report them; cluster `east` runs checkout v1 and cluster
  `west` runs checkout v2, each as an `Upstream` listed in the cluster's endpoints YAML
  file, with its own agent, a sidecar Envoy (where the cluster's callers send requests)
  and a gateway Envoy (where the other cluster reaches its versions; it listens on the
  port of the cluster's gateway address). Every Envoy takes its configuration from its
  own cluster's agent, never from the control plane.

Start order: control plane, registration, upstreams and endpoint files, agents (each
waits until its cluster and endpoints are in etcd), Envoys (each LIVE once its agent
serves it), then one request through each sidecar. Stopped in reverse; every child is
stopped by PID (its own process group), never by name.

Binds 127.0.0.1 only. Reads etcd (through `graylane.controlplane.store`) only to observe
what the agents registered; everything else goes through the control plane's API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import yaml
from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.lifecycle import Lifecycle
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.local.ports import free_port
from graylane.controlplane.store import EtcdStore, Snapshot, connect
from graylane.deploy.local.stack import header_rule, manual_canary
from graylane.deploy.local.traffic import LoadResult, run_load
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import release_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = [
    "EAST",
    "LANE",
    "SERVICE",
    "WEST",
    "AgentProcess",
    "Cluster",
    "ServeProcess",
    "TwoClusters",
    "gray_in_west_release",
]

SERVICE: Final = "checkout"
EAST: Final = "east"
WEST: Final = "west"
LANE: Final = "checkout-west"
RULE_HEADER: Final = {"x-canary": "always"}
_LOOPBACK: Final = "127.0.0.1"
_POLL_SECONDS: Final = 0.05
_T = TypeVar("_T")


def graylane_command() -> list[str]:
    """The `graylane` entry point of this environment (the venv's bin/graylane)."""
    beside = Path(sys.executable).parent / "graylane"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-P", "-m", "graylane.controlplane.cli"]


async def poll(
    check: Callable[[], Awaitable[_T | None]], *, timeout: float, what: str, interval: float = _POLL_SECONDS
) -> _T:
    """`check()` until it returns a value other than None, within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                found = await check()
                if found is not None:
                    return found
                await asyncio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"{what}: not within {timeout:g}s") from None


class ChildProcess:
    """One graylane subprocess in its own process group, its output appended to a log file.

    Signals go to the process group of the PID it started (its own session), so nothing
    else on the machine is touched. Its `arguments` are fixed when it is made: a restart runs
    the same command, on the same ports.
    """

    def __init__(self, *, name: str, log_path: Path, arguments: list[str]) -> None:
        self.name = name
        self.log_path = log_path
        self._arguments = arguments
        self._process: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def arguments(self) -> list[str]:
        """The `graylane` command's arguments."""
        return list(self._arguments)

    async def spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start {self.starts + 1}: {' '.join(self.arguments())}\n".encode())
            log.flush()
            self._process = await asyncio.create_subprocess_exec(
                *graylane_command(),
                *self.arguments(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def check_alive(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self._process.returncode}; log tail:\n{self.log_tail()}")

    async def kill(self) -> None:
        """SIGKILL (kill -9) the process group; returns once the process is gone."""
        await self._signal_and_wait(signal.SIGKILL, timeout=10.0)

    async def stop(self, *, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None if it was not running)."""
        process = self._process
        if process is None or process.returncode is not None:
            return None if process is None else process.returncode
        try:
            await self._signal_and_wait(signal.SIGTERM, timeout=timeout)
        except TimeoutError:
            await self.kill()
        return process.returncode

    async def _signal_and_wait(self, sig: signal.Signals, *, timeout: float) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        async with asyncio.timeout(timeout):
            await process.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_log(self, text: str, *, timeout: float, after: int = 0) -> int:
        """Wait until `text` appears in the log after offset `after`; the offset past it."""

        async def found() -> int | None:
            log = self.log_text()
            at = log.find(text, after)
            return None if at < 0 else at + len(text)

        return await poll(found, timeout=timeout, what=f"{self.name}: log line {text!r}")

    def log_mark(self) -> int:
        """The log's length now: wait for lines written after it with `wait_log(after=...)`."""
        return len(self.log_text())

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class ServeProcess(ChildProcess):
    """`graylane serve` on fixed loopback ports against an external etcd and a key prefix."""

    def __init__(
        self,
        *,
        etcd_endpoint: str,
        etcd_prefix: str,
        workdir: Path,
        agent_tokens_file: Path | None = None,
        agent_lease_ttl_seconds: int = 10,
        api_port: int | None = None,
        xds_port: int | None = None,
    ) -> None:
        self.api_port = api_port or free_port()
        self.xds_port = xds_port or free_port()
        args = [
            "serve",
            "--etcd",
            etcd_endpoint,
            "--etcd-prefix",
            etcd_prefix,
            "--listen",
            self.target,
            "--xds-listen",
            f"{_LOOPBACK}:{self.xds_port}",
            "--http-listen",
            f"{_LOOPBACK}:0",  # not the default 7403: runs side by side must not clash
            "--data-dir",
            str(workdir / "serve-state"),
            "--agent-lease-ttl",
            str(agent_lease_ttl_seconds),
        ]
        if agent_tokens_file is not None:
            args += ["--agent-tokens", str(agent_tokens_file)]
        super().__init__(name="graylane serve", log_path=workdir / "serve.log", arguments=args)

    @property
    def target(self) -> str:
        return f"{_LOOPBACK}:{self.api_port}"

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start and return once the API answers SERVING on its health service."""
        await self.spawn()
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool | None:
                self.check_alive()
                with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                    answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                return None

            await poll(serving, timeout=timeout, what=f"{self.name} on {self.target}")

    async def restart(self, *, timeout: float = 30.0) -> None:
        """Start again on the same ports (after `kill` or `stop`)."""
        await self.start(timeout=timeout)


class AgentProcess(ChildProcess):
    """`graylane agent` for one cluster, on a fixed xDS port and state dir."""

    def __init__(
        self,
        *,
        cluster: str,
        control_plane: str,
        gateway_address: str,
        state_dir: Path,
        endpoints_file: Path | None,
        token_file: Path | None,
        xds_port: int | None = None,
        reconnect_max_seconds: float = 0.5,
        log_path: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.xds_port = xds_port or free_port()
        self.http_port = free_port()  # the agent's /metrics and /healthz
        args = [
            "agent",
            "--cluster",
            cluster,
            "--control-plane",
            control_plane,
            "--gateway-address",
            gateway_address,
            "--xds-listen",
            f"{_LOOPBACK}:{self.xds_port}",
            "--state-dir",
            str(state_dir),
            "--reconnect-max",
            f"{reconnect_max_seconds:g}",
            "--http-listen",
            f"{_LOOPBACK}:{self.http_port}",
        ]
        if endpoints_file is not None:
            args += ["--endpoints", str(endpoints_file)]
        if token_file is not None:
            args += ["--token-file", str(token_file)]
        log_path = log_path or state_dir.parent / f"agent-{cluster}.log"
        super().__init__(name=f"agent {cluster}", log_path=log_path, arguments=args)

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start and return once its xDS port accepts connections (the control plane may be away)."""
        await self.spawn()

        async def listening() -> bool | None:
            self.check_alive()
            try:
                _, writer = await asyncio.open_connection(_LOOPBACK, self.xds_port)
            except OSError:
                return None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True

        await poll(listening, timeout=timeout, what=f"{self.name}: xDS port {self.xds_port}")

    async def restart(self, *, timeout: float = 30.0) -> None:
        await self.start(timeout=timeout)


@dataclass
class Cluster:
    """One simulated cluster: its version of checkout, endpoints file, agent and Envoys."""

    name: str
    version: str  # the version of checkout this cluster runs
    upstream: Upstream
    endpoints_file: Path
    token_file: Path
    gateway_port: int
    agent: AgentProcess
    sidecar: EnvoyProcess | None = None
    gateway: EnvoyProcess | None = None

    @property
    def gateway_address(self) -> str:
        return f"{_LOOPBACK}:{self.gateway_port}"

    def endpoints_document(self) -> dict[str, Any]:
        return {
            "versions": [
                {
                    "service": SERVICE,
                    "version": self.version,
                    "endpoints": [{"address": _LOOPBACK, "port": self.upstream.port}],
                }
            ]
        }

    def endpoints_yaml(self) -> str:
        return yaml.safe_dump(self.endpoints_document(), sort_keys=True)

    def write_endpoints(self, text: str | None = None) -> None:
        """Replace the endpoints file (atomically, as a deploy tool would); None: the good set."""
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(self.endpoints_yaml() if text is None else text)
        os.replace(tmp, self.endpoints_file)


def gray_in_west_release(
    name: str = LANE, *, weights: tuple[int, ...] = (10, 50, 100), gray_clusters: tuple[str, ...] = (WEST,)
) -> pb.Release:
    """Canary of checkout v1 -> v2, gray version placed in west; `x-canary: always` joins the lane."""
    return manual_canary(
        name,
        entry=SERVICE,
        grays=[(SERVICE, "v2")],
        weights=weights,
        rules=[header_rule(RULE_HEADER)],
        gray_clusters=gray_clusters,
    )


class TwoClusters(Lifecycle):
    """`async with TwoClusters(etcd_endpoint=..., workdir=...) as layout:` east and west, serving.

    `extra_tokens` adds credentials for more cluster names (tests use one to speak the
    AgentService protocol by hand). Everything is stopped on exit, children by PID.
    """

    def __init__(
        self,
        *,
        etcd_endpoint: str,
        workdir: Path,
        etcd_prefix: str | None = None,
        lease_ttl_seconds: int = 3,
        reconnect_max_seconds: float = 0.5,
        envoy_binary: Path | None = None,
        extra_tokens: Mapping[str, str] | None = None,
        actor: str = "two-clusters",
    ) -> None:
        self.workdir = workdir
        self.etcd_endpoint = etcd_endpoint
        self.etcd_prefix = etcd_prefix or f"/graylane-clusters/{uuid.uuid4().hex}/v1/"
        self.lease_ttl_seconds = lease_ttl_seconds
        self.reconnect_max_seconds = reconnect_max_seconds
        self.envoy_binary = envoy_binary
        self.tokens: dict[str, str] = {EAST: secrets.token_hex(16), WEST: secrets.token_hex(16)}
        self.tokens.update(extra_tokens or {})
        self.actor = actor
        self.tokens_file = workdir / "agent-tokens.yaml"
        self.serve = ServeProcess(
            etcd_endpoint=etcd_endpoint,
            etcd_prefix=self.etcd_prefix,
            workdir=workdir,
            agent_tokens_file=self.tokens_file,
            agent_lease_ttl_seconds=lease_ttl_seconds,
        )
        self.clusters: dict[str, Cluster] = {}
        self._client: ReleaseClient | None = None
        self._store: EtcdStore | None = None
        self._stack = contextlib.AsyncExitStack()

    # ------------------------------------------------------------------ access

    @property
    def east(self) -> Cluster:
        return self.clusters[EAST]

    @property
    def west(self) -> Cluster:
        return self.clusters[WEST]

    @property
    def client(self) -> ReleaseClient:
        if self._client is None:
            raise RuntimeError("TwoClusters is not running")
        return self._client

    @property
    def store(self) -> EtcdStore:
        if self._store is None:
            raise RuntimeError("TwoClusters is not running")
        return self._store

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tokens_file.write_text("".join(f"{c}: {t}\n" for c, t in sorted(self.tokens.items())))
        self._store = await connect(self.etcd_endpoint, prefix=self.etcd_prefix)
        self._stack.push_async_callback(self._store.close)

        self._stack.push_async_callback(self.serve.stop)
        await self.serve.start()
        self._client = await self._stack.enter_async_context(ReleaseClient.connect(self.serve.target, actor=self.actor))
        await self._client.put_service(pb.Service(name=SERVICE, stable_version="v1"))
        for version in ("v1", "v2"):
            await self._client.put_version(pb.Version(service=SERVICE, name=version))

        for name, version in ((EAST, "v1"), (WEST, "v2")):
            upstream = await self._stack.enter_async_context(Upstream(SERVICE, version))
            gateway_port = free_port()
            token_file = self.workdir / f"{name}.token"
            token_file.write_text(self.tokens[name] + "\n")
            cluster = Cluster(
                name=name,
                version=version,
                upstream=upstream,
                endpoints_file=self.workdir / f"{name}-endpoints.yaml",
                token_file=token_file,
                gateway_port=gateway_port,
                agent=AgentProcess(
                    cluster=name,
                    control_plane=self.serve.target,
                    gateway_address=f"{_LOOPBACK}:{gateway_port}",
                    state_dir=self.workdir / f"{name}-agent",
                    endpoints_file=self.workdir / f"{name}-endpoints.yaml",
                    token_file=token_file,
                    reconnect_max_seconds=self.reconnect_max_seconds,
                    log_path=self.workdir / f"agent-{name}.log",
                ),
            )
            cluster.write_endpoints()
            self.clusters[name] = cluster
            self._stack.push_async_callback(cluster.agent.stop)

        await asyncio.gather(*(c.agent.start() for c in self.clusters.values()))
        await self.wait_registered(EAST, WEST)

        async def envoys(cluster: Cluster) -> None:
            cluster.sidecar = await self.start_envoy(cluster, node_id=f"{cluster.name}-sidecar")
            cluster.gateway = await self.start_envoy(
                cluster, node_id=f"{cluster.name}-gateway", listen_port=cluster.gateway_port
            )

        await asyncio.gather(*(envoys(c) for c in self.clusters.values()))
        # Each sidecar answers through the other cluster's gateway too (west's base is in east).
        for cluster in self.clusters.values():
            await self.wait_serving(cluster)

    async def start_envoy(self, cluster: Cluster, *, node_id: str, listen_port: int | None = None) -> EnvoyProcess:
        """Another Envoy fed by `cluster`'s agent, stopped with the layout."""
        return await self._stack.enter_async_context(
            EnvoyProcess(
                ads_port=cluster.agent.xds_port,
                node_id=node_id,
                node_cluster=cluster.name,
                listen_port=listen_port,
                binary=self.envoy_binary,
            )
        )

    # ------------------------------------------------------------------ observation

    async def snapshot(self) -> Snapshot:
        return await self.store.snapshot()

    async def registered(self) -> dict[str, tuple[str, ...]]:
        """Cluster name -> the "service/version@address:port" endpoints its agent reported."""
        snap = await self.snapshot()
        found: dict[str, set[str]] = {c.name: set() for c in snap.clusters}
        for ce in snap.cluster_endpoints:
            for e in ce.endpoints:
                found.setdefault(e.cluster, set()).add(f"{ce.service}/{ce.version}@{e.address}:{e.port}")
        return {name: tuple(sorted(eps)) for name, eps in found.items()}

    def expected_endpoints(self, name: str) -> tuple[str, ...]:
        c = self.clusters[name]
        return (f"{SERVICE}/{c.version}@{_LOOPBACK}:{c.upstream.port}",)

    async def wait_registered(self, *names: str, timeout: float = 30.0) -> None:
        """Until each cluster is registered in etcd with exactly its endpoints file's set."""

        async def done() -> bool | None:
            for c in self.clusters.values():
                c.agent.check_alive()
            now = await self.registered()
            return True if all(now.get(n) == self.expected_endpoints(n) for n in names) else None

        await poll(done, timeout=timeout, what=f"clusters {', '.join(names)} registered with their endpoints")

    async def wait_unregistered(self, name: str, *, timeout: float) -> float:
        """Seconds until cluster `name` and its endpoints are gone from etcd."""
        start = time.monotonic()

        async def gone() -> bool | None:
            return True if name not in await self.registered() else None

        await poll(gone, timeout=timeout, what=f"cluster {name} gone from etcd")
        return time.monotonic() - start

    async def wait_serving(self, cluster: Cluster, *, timeout: float = 30.0) -> None:
        """Until one request through `cluster`'s sidecar is answered 200."""

        async def answered() -> bool | None:
            result = await self.load(cluster, count=1, max_seconds=5)
            return True if result.ok == 1 else None

        await poll(answered, timeout=timeout, what=f"{cluster.name}'s sidecar serving {SERVICE}", interval=0.1)

    async def load(self, cluster: Cluster, *, count: int, max_seconds: float = 30.0, **options: Any) -> LoadResult:
        """Bounded traffic to checkout through `cluster`'s sidecar Envoy."""
        if cluster.sidecar is None:
            raise RuntimeError(f"{cluster.name} has no sidecar")
        options.setdefault("concurrency", 8)
        return await run_load(
            cluster.sidecar.listen_port, authority=SERVICE, count=count, max_seconds=max_seconds, **options
        )

    async def until_reached(
        self, name: str, *, weight: int | None = None, proxies: int | None = 4, timeout: float = 30.0
    ) -> pb.Release:
        """Until release `name` is reached (at `weight`, by `proxies` proxies), riding out API outages."""

        async def reached() -> pb.Release | None:
            try:
                r = await self.client.get_release(name)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return None
                raise
            if r.status.phase not in (pb.PROGRESSING, pb.PAUSED, pb.PENDING):
                return r
            if not r.status.reached or (weight is not None and r.status.weight != weight):
                return None
            if proxies is not None and r.status.convergence.proxies != proxies:
                return None
            return r

        return await poll(reached, timeout=timeout, what=f"release {name} reached", interval=0.05)

    async def wait_connected(self, marks: Mapping[str, int], *, timeout: float = 30.0) -> None:
        """Until each agent logged a connection to the control plane after its log `marks[name]`."""
        for name, mark in marks.items():
            await self.clusters[name].agent.wait_log("connected to the control plane", timeout=timeout, after=mark)

    def log_marks(self) -> dict[str, int]:
        """Each agent's log offset now, for `wait_connected`."""
        return {name: c.agent.log_mark() for name, c in self.clusters.items()}


async def envoy_counter(envoy: EnvoyProcess, name: str) -> int:
    """One counter from an Envoy's admin /stats (0 while it does not exist yet)."""
    status, body = await envoy.admin_get(f"/stats?filter=^{_stat_regex(name)}$")
    if status != 200:
        raise RuntimeError(f"envoy {envoy.node_id} /stats answered {status}")
    for line in body.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def _stat_regex(name: str) -> str:
    return "".join("\\" + ch if ch in ".|[](){}*+?^$\\" else ch for ch in name)
