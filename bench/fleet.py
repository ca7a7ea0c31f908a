"""A fleet of fake ADS clients in worker processes, for the scale benchmark (bench/run.py --fleet).

Each worker process runs one asyncio loop with `count` clients; each client holds one ADS
stream (state-of-the-world or delta), subscribes like Envoy does (CDS and LDS wildcard,
EDS for the clusters it was sent, SRDS wildcard once it holds the listener, RDS for the
route configs its scopes name), ACKs every response, and records the wall-clock instant
it first sees each weight of one lane's split at one entry service (in the entry's own
route config, `graylane/<entry>`; a SotW RDS response carries only the route configs that
changed, so a response without it leaves the weight as it was). Clients never decode the
same content twice in one process: what a version carries (cluster names, scope targets,
the weight) is cached, so the fleet's own CPU stays small next to the control plane's.

The parent talks to a worker over a Pipe, one command at a time (the other workers, the same
clients in another process, answer the same commands as JSON lines on their stdin/stdout:
NodeWorker runs bench/fleet_node/worker.js on grpc-js, CWorker bench/fleet_c/worker.c on
libnghttp2):
  ("status",)        -> {"connected", "configured", "errors", "reconnects", "error_codes"}
  ("seen", weight)   -> list of first-seen wall-clock times (None where not seen yet)
  ("missing", weight) -> how many clients have not seen it yet (an int: cheap to poll)
  ("stop",)          -> final status; the worker exits.

`worker_class(impl)` picks one: the fleet's own CPU is a bench artefact (in production the
proxies run elsewhere) taken from the control plane on the same 2 cores, so it should be small;
grpc.aio's per-message cost made the Python fleet cost as much CPU per change as the control
plane, and grpc-js's about half of it.

Also here: an API prober process (GetRelease in a loop, bounded in count and time).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import descriptor_pb2, struct_pb2

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
ROUTE_CONFIG_PREFIX = "graylane/"  # graylane.xds.view.route_config_name(service)

RECONNECT_DELAY = 1.0
STREAMS_PER_CHANNEL = 10  # HTTP/2 connections are shared by this many streams
NODE_DIR = pathlib.Path(__file__).resolve().parent / "fleet_node"  # the Node worker and its node_modules
# `make fleet-c` builds it; GRAYLANE_FLEET_C_BIN runs another build instead (for A/B runs).
C_WORKER = pathlib.Path(
    os.environ.get("GRAYLANE_FLEET_C_BIN") or pathlib.Path(__file__).resolve().parent / "fleet_c" / "graylane-fleet-c"
)


@dataclass(frozen=True)
class FleetSpec:
    target: str  # host:port of the ADS server
    first: int  # index of the first client of this worker
    count: int
    delta_every: int  # every n-th client speaks delta (0: none)
    entry: str  # the entry service whose split is watched
    lane_cluster_part: str  # "|<lane>" suffix of the lane's cluster name
    connect_rate: float  # clients started per second by this worker
    listen_port: int  # node metadata: all clients share one snapshot key


class _Decoded:
    """What each resource version carries, decoded once per process."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.cluster_sets: dict[str, tuple[str, ...]] = {}
        self.scope_sets: dict[str, tuple[str, ...]] = {}
        self.weights: dict[bytes, int] = {}
        self.entry_route = ROUTE_CONFIG_PREFIX + spec.entry
        # A serialised RouteConfiguration starts with its name (field 1): the entry's is
        # found without decoding the others.
        name = self.entry_route.encode()
        self.entry_prefix = b"\x0a" + bytes((len(name),)) + name

    def route_configs(self, version: str, resources: Any) -> tuple[str, ...]:
        """The route configs a SotW SRDS response's scopes name (the whole set: SRDS is wildcard)."""
        found = self.scope_sets.get(version)
        if found is None:
            found = self.scope_sets[version] = tuple(sorted(self.route_config_of_scope(m) for m in resources))
        return found

    def route_config_of_scope(self, any_msg: Any) -> str:
        scope = scoped_route_pb2.ScopedRouteConfiguration()
        any_msg.Unpack(scope)
        return str(scope.route_configuration_name)

    def is_entry(self, any_msg: Any) -> bool:
        return bool(any_msg.value.startswith(self.entry_prefix))

    def eds_names(self, version: str, resources: Any) -> tuple[str, ...]:
        """The EDS names a SotW CDS response's clusters ask for (cached by version)."""
        found = self.cluster_sets.get(version)
        if found is None:
            eds = [c for c in map(self._cluster, resources) if c.type == cluster_pb2.Cluster.EDS]
            found = self.cluster_sets[version] = tuple(sorted(c.eds_cluster_config.service_name or c.name for c in eds))
        return found

    @staticmethod
    def _cluster(any_msg: Any) -> cluster_pb2.Cluster:
        c = cluster_pb2.Cluster()
        any_msg.Unpack(c)
        return c

    def weight(self, any_msg: Any) -> int:
        """The lane's weight in the entry's route config (cached by its bytes)."""
        found = self.weights.get(any_msg.value)
        if found is None:
            rc = route_pb2.RouteConfiguration()
            any_msg.Unpack(rc)
            found = 0
            for vh in rc.virtual_hosts:
                if vh.name != self.spec.entry:
                    continue
                for r in vh.routes:
                    for w in r.route.weighted_clusters.clusters:
                        if w.name.endswith(self.spec.lane_cluster_part):
                            found = w.weight.value
                    if found:
                        break
            self.weights[any_msg.value] = found
        return found


@dataclass
class _Client:
    index: int
    delta: bool
    configured: bool = False
    connected: bool = False
    weight: int = -1
    seen: dict[int, float] = field(default_factory=dict)

    def saw(self, weight: int) -> None:
        self.weight = weight
        self.configured = True
        if weight not in self.seen:
            self.seen[weight] = time.time()


class _Fleet:
    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.decoded = _Decoded(spec)
        self.clients = [
            _Client(spec.first + i, delta=bool(spec.delta_every) and (spec.first + i) % spec.delta_every == 0)
            for i in range(spec.count)
        ]
        self.errors = 0
        self.reconnects = 0
        self.error_codes: collections.Counter[str] = collections.Counter()
        self.error_details: collections.Counter[str] = collections.Counter()  # code: the status details
        self.channels: list[grpc.aio.Channel] = []
        self.stopping = False

    def node(self, client: _Client) -> base_pb2.Node:
        meta = struct_pb2.Struct()
        meta.update({"listen_port": str(self.spec.listen_port)})
        return base_pb2.Node(id=f"fleet-{client.index}", cluster="graylane", metadata=meta)

    async def run_client(self, client: _Client, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        while not self.stopping:
            try:
                if client.delta:
                    await self._delta(client, stub)
                else:
                    await self._sotw(client, stub)
                code = "ended"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                self.error_details[f"{code}: {(exc.details() or '')[:80]}"] += 1
            client.connected = False
            if self.stopping:
                return
            self.errors += 1
            self.error_codes[code] += 1
            self.reconnects += 1
            await asyncio.sleep(RECONNECT_DELAY)

    async def _subscribe(self, client: _Client, call: Any, request: Any) -> None:
        """Open a stream as Envoy does: CDS and LDS wildcard, the node on the first request."""
        await call.write(request(node=self.node(client), type_url=CLUSTER))
        await call.write(request(type_url=LISTENER))
        client.connected = True

    async def _sotw(self, client: _Client, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        Req = discovery_pb2.DiscoveryRequest
        call = stub.StreamAggregatedResources()
        try:
            await self._subscribe(client, call, Req)
            # A parent's response names what its child subscribes to (CDS -> EDS, SRDS -> RDS);
            # per child, its latest response (version, nonce) and the names subscribed.
            children = {CLUSTER: ENDPOINT, SCOPED_ROUTE: ROUTE}
            latest: dict[str, tuple[str, str]] = {ENDPOINT: ("", ""), ROUTE: ("", "")}
            subscribed: dict[str, tuple[str, ...] | None] = {ENDPOINT: None, ROUTE: None}
            srds_requested = False
            while (resp := await call.read()) is not grpc.aio.EOF:
                t = resp.type_url
                ack = Req(type_url=t, version_info=resp.version_info, response_nonce=resp.nonce)
                if (child := children.get(t)) is not None:
                    if t == CLUSTER:
                        names = self.decoded.eds_names(resp.version_info, resp.resources)
                    else:
                        names = self.decoded.route_configs(resp.version_info, resp.resources)
                    await call.write(ack)
                    if names != subscribed[child]:
                        subscribed[child] = names
                        version, nonce = latest[child]
                        await call.write(
                            Req(type_url=child, version_info=version, response_nonce=nonce, resource_names=names)
                        )
                elif t in subscribed:
                    latest[t] = (resp.version_info, resp.nonce)
                    ack.resource_names.extend(subscribed[t] or ())
                    await call.write(ack)
                    if t == ROUTE:
                        for any_msg in resp.resources:
                            if self.decoded.is_entry(any_msg):
                                client.saw(self.decoded.weight(any_msg))
                elif t == LISTENER:
                    await call.write(ack)
                    if not srds_requested:  # the listener's scoped routes subscribe to SRDS
                        srds_requested = True
                        await call.write(Req(type_url=SCOPED_ROUTE))
        finally:
            call.cancel()

    async def _delta(self, client: _Client, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        Req = discovery_pb2.DeltaDiscoveryRequest
        call = stub.DeltaAggregatedResources()
        try:
            await self._subscribe(client, call, Req)
            subscribed: set[str] = set()
            scopes: dict[str, str] = {}  # scope name -> the route config it names
            eds_started = srds_started = False
            while (resp := await call.read()) is not grpc.aio.EOF:
                t = resp.type_url
                await call.write(Req(type_url=t, response_nonce=resp.nonce))
                if t == CLUSTER:
                    added = [r.name for r in resp.resources if r.name not in subscribed]
                    gone = [n for n in resp.removed_resources if n in subscribed]
                    subscribed.update(added)
                    subscribed.difference_update(gone)
                    if added or gone or not eds_started:
                        eds_started = True
                        await call.write(
                            Req(type_url=ENDPOINT, resource_names_subscribe=added, resource_names_unsubscribe=gone)
                        )
                elif t == LISTENER and not srds_started:
                    srds_started = True
                    await call.write(Req(type_url=SCOPED_ROUTE))  # wildcard
                elif t == SCOPED_ROUTE:
                    before = set(scopes.values())
                    for r in resp.resources:
                        scopes[r.name] = self.decoded.route_config_of_scope(r.resource)
                    for name in resp.removed_resources:
                        scopes.pop(name, None)
                    after = set(scopes.values())
                    if after != before:
                        await call.write(
                            Req(
                                type_url=ROUTE,
                                resource_names_subscribe=sorted(after - before),
                                resource_names_unsubscribe=sorted(before - after),
                            )
                        )
                elif t == ROUTE:
                    for r in resp.resources:
                        if r.name == self.decoded.entry_route:
                            client.saw(self.decoded.weight(r.resource))
        finally:
            call.cancel()

    def status(self) -> dict[str, Any]:
        return {
            "connected": sum(c.connected for c in self.clients),
            "configured": sum(c.configured for c in self.clients),
            "errors": self.errors,
            "reconnects": self.reconnects,
            "error_codes": dict(self.error_codes),
            "error_details": dict(self.error_details.most_common(5)),
        }

    async def run(self, conn: multiprocessing.connection.Connection) -> None:
        tasks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()

        async def start() -> None:
            gap = 1.0 / self.spec.connect_rate if self.spec.connect_rate > 0 else 0.0
            stub = None
            for i, client in enumerate(self.clients):
                if self.stopping:
                    return
                if i % STREAMS_PER_CHANNEL == 0:
                    channel = grpc.aio.insecure_channel(
                        self.spec.target,
                        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
                    )
                    self.channels.append(channel)
                    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                assert stub is not None
                tasks.append(asyncio.create_task(self.run_client(client, stub)))
                if gap:
                    await asyncio.sleep(gap)

        starter = asyncio.create_task(start())
        try:
            while True:
                cmd = await loop.run_in_executor(None, conn.recv)
                if cmd[0] == "status":
                    conn.send(self.status())
                elif cmd[0] == "seen":
                    conn.send([c.seen.get(cmd[1]) for c in self.clients])
                elif cmd[0] == "missing":
                    conn.send(sum(1 for c in self.clients if cmd[1] not in c.seen))
                elif cmd[0] == "stop":
                    break
        finally:
            self.stopping = True
            starter.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(starter, *tasks, return_exceptions=True)
            final = self.status()
            for channel in self.channels:
                await channel.close(grace=None)
            with contextlib.suppress(OSError):
                conn.send(final)


# The fleet and the API prober stand in for proxies and CI jobs on other machines. Started as
# children of the bench they would share its session, and with the kernel's per-session CPU
# groups (sched_autogroup) the prober would wait for a core behind the fleet's workers inside
# one group. Each gets a session of its own, as a separately launched program has.
# GRAYLANE_BENCH_SHARED_SESSION=1 keeps them in the bench's session (for comparison).
OWN_SESSIONS = not os.environ.get("GRAYLANE_BENCH_SHARED_SESSION")


# GRAYLANE_BENCH_FLEET_NICE=N (0-19): each fleet worker's CPU group (its session's autogroup)
# gets that nice value, so the fake proxies take the cores the control plane leaves idle, as
# proxies on other machines would take none of them. Unset: the same weight as any program.
FLEET_NICE = os.environ.get("GRAYLANE_BENCH_FLEET_NICE", "")


def lower_priority(pid: int | str = "self") -> None:
    """The fleet's FLEET_NICE on `pid`'s autogroup (nothing when unset or not a session leader)."""
    if not FLEET_NICE or not OWN_SESSIONS:
        return
    with contextlib.suppress(OSError):
        pathlib.Path(f"/proc/{pid}/autogroup").write_text(FLEET_NICE)


def _own_session() -> None:
    if OWN_SESSIONS:
        with contextlib.suppress(OSError):
            os.setsid()


def _worker_main(spec: FleetSpec, conn: multiprocessing.connection.Connection) -> None:
    _own_session()
    lower_priority()
    asyncio.run(_Fleet(spec).run(conn))


class Worker:
    """One worker process and its end of the Pipe (commands answered in order)."""

    def __init__(self, spec: FleetSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(spec, child), daemon=True)
        self.process.start()
        child.close()

    async def ask(self, *cmd: Any, timeout: float = 30.0) -> Any:
        loop = asyncio.get_running_loop()
        self.conn.send(cmd)
        async with asyncio.timeout(timeout):
            return await loop.run_in_executor(None, self.conn.recv)

    async def stop(self, timeout: float = 20.0) -> dict[str, Any] | None:
        final: dict[str, Any] | None = None
        with contextlib.suppress(Exception):
            final = await self.ask("stop", timeout=timeout)
        await asyncio.get_running_loop().run_in_executor(None, self.process.join, 5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        return final

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)


def process_cpu_seconds(pid: int | None) -> float:
    """A process's user+system CPU seconds, all its threads (from /proc; 0 once it is gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (OSError, TypeError):
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- Node workers


def node_fleet_missing() -> str | None:
    """Why the Node fleet cannot run here (None: it can)."""
    if shutil.which("node") is None:
        return "node is missing: apt-get install nodejs npm (the Makefile's bench setup does)"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return f"{NODE_DIR}/node_modules is missing: cd {NODE_DIR} && npm ci (the Makefile's bench setup does)"
    return None


_DESCRIPTORS: pathlib.Path | None = None


def descriptor_set() -> pathlib.Path:
    """A FileDescriptorSet of the xDS and Envoy messages the Node worker reads and writes, from
    the installed Python protos (the descriptors the control plane serialises with), written
    once per process into a temporary file."""
    global _DESCRIPTORS
    if _DESCRIPTORS is not None and _DESCRIPTORS.exists():
        return _DESCRIPTORS
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: Any) -> None:  # dependencies first, each file once
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        fd.CopyToProto(out.file.add())

    for module in (discovery_pb2, base_pb2, cluster_pb2, route_pb2, scoped_route_pb2):
        add(module.DESCRIPTOR)
    fd, name = tempfile.mkstemp(prefix="graylane-fleet-", suffix=".fds")
    with os.fdopen(fd, "wb") as f:
        f.write(out.SerializeToString())
    _DESCRIPTORS = pathlib.Path(name)
    atexit.register(_DESCRIPTORS.unlink, missing_ok=True)
    return _DESCRIPTORS


class NodeWorker:
    """One Node worker process (bench/fleet_node/worker.js) with the same `ask`/`stop` as
    `Worker`: commands go as JSON lines on its stdin, answers come back on its stdout, matched
    by a sequence number (an answer to an ask that timed out is skipped, not taken for the next)."""

    def __init__(self, spec: FleetSpec, *, streams_per_channel: int = STREAMS_PER_CHANNEL) -> None:
        reason = node_fleet_missing()
        if reason is not None:
            raise RuntimeError(reason)
        self.spec = spec
        args = {
            "target": spec.target,
            "first": spec.first,
            "count": spec.count,
            "delta_every": spec.delta_every,
            "entry": spec.entry,
            "lane_cluster_part": spec.lane_cluster_part,
            "connect_rate": spec.connect_rate,
            "listen_port": spec.listen_port,
            "streams_per_channel": streams_per_channel,
            "descriptors": str(descriptor_set()),
        }
        # GRAYLANE_FLEET_NODE_ARGS: node's own options for a run (e.g. "--cpu-prof --cpu-prof-dir=/tmp/p").
        node_args = os.environ.get("GRAYLANE_FLEET_NODE_ARGS", "").split()
        self.process = subprocess.Popen(
            ["node", *node_args, str(NODE_DIR / "worker.js"), json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=NODE_DIR,
            start_new_session=OWN_SESSIONS,
        )
        lower_priority(self.process.pid)
        self._ids = itertools.count()
        self._reader: asyncio.StreamReader | None = None
        self._lock: asyncio.Lock | None = None

    async def _attach(self) -> asyncio.StreamReader:
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)  # `seen` is one line per worker
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.process.stdout)
        return reader

    async def ask(self, *cmd: Any, timeout: float = 30.0) -> Any:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._reader is None:
                self._reader = await self._attach()
            ident = next(self._ids)
            assert self.process.stdin is not None
            self.process.stdin.write((json.dumps([ident, *cmd]) + "\n").encode())
            self.process.stdin.flush()
            async with asyncio.timeout(timeout):
                while True:
                    line = await self._reader.readline()
                    if not line:
                        raise EOFError(f"fleet worker {self.process.pid} exited ({self.process.poll()})")
                    answer = json.loads(line)
                    if answer["id"] == ident:
                        return answer["result"]

    async def stop(self, timeout: float = 20.0) -> dict[str, Any] | None:
        final: dict[str, Any] | None = None
        with contextlib.suppress(Exception):
            final = await self.ask("stop", timeout=timeout)
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()  # the worker also stops on its stdin's end
        loop = asyncio.get_running_loop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await loop.run_in_executor(None, self.process.wait, 5.0)
        if self.process.poll() is None:
            self.process.kill()
            await loop.run_in_executor(None, self.process.wait, 2.0)
        return final

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)


def c_fleet_missing() -> str | None:
    """Why the C fleet cannot run here (None: it can)."""
    if not os.access(C_WORKER, os.X_OK):
        return f"{C_WORKER} is missing: make fleet-c (gcc and libnghttp2-dev, the Makefile installs the latter)"
    return None


class CWorker(NodeWorker):
    """The same clients in C (bench/fleet_c/worker.c: libnghttp2, epoll, gRPC framing and protobuf
    by hand): the spec as arguments, the same commands and answers on stdin/stdout as NodeWorker."""

    def __init__(self, spec: FleetSpec, *, streams_per_channel: int = STREAMS_PER_CHANNEL) -> None:
        reason = c_fleet_missing()
        if reason is not None:
            raise RuntimeError(reason)
        self.spec = spec
        host, _, port = spec.target.rpartition(":")
        argv = [str(C_WORKER), host, port, str(spec.first), str(spec.count), str(spec.delta_every), spec.entry]
        argv += [spec.lane_cluster_part, repr(float(spec.connect_rate)), str(spec.listen_port)]
        argv.append(str(streams_per_channel))
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=OWN_SESSIONS
        )
        lower_priority(self.process.pid)
        self._ids = itertools.count()
        self._reader: asyncio.StreamReader | None = None
        self._lock: asyncio.Lock | None = None


FLEET_IMPLS = ("c", "node", "python")


def worker_class(impl: str) -> type[Worker] | type[NodeWorker]:
    """The worker for a --fleet-impl name."""
    if impl == "c":
        return CWorker
    if impl == "node":
        return NodeWorker
    if impl == "python":
        return Worker
    raise ValueError(f"fleet implementation {impl!r}: one of {FLEET_IMPLS}")


# --------------------------------------------------------------------------- API prober


PROBE_ID_METADATA = "x-graylane-probe"  # the prober's call index, for bench/scale.py's API trace


def _prober_main(target: str, release: str, max_calls: int, max_seconds: float, gap: float, conn: Any) -> None:
    from graylane.v1 import release_service_pb2, release_service_pb2_grpc

    _own_session()

    async def run() -> list[tuple[float, float, str]]:
        out: list[tuple[float, float, str]] = []
        async with grpc.aio.insecure_channel(target) as channel:
            stub = release_service_pb2_grpc.ReleaseServiceStub(channel)
            deadline = time.monotonic() + max_seconds
            paused = False
            while len(out) < max_calls and time.monotonic() < deadline:
                if conn.poll():
                    command = conn.recv()
                    if command == "stop":
                        break
                    paused = command == "pause"
                if paused:
                    await asyncio.sleep(0.05)
                    continue
                t0 = time.perf_counter()
                code = "OK"
                try:
                    await stub.GetRelease(
                        release_service_pb2.GetReleaseRequest(name=release),
                        timeout=10.0,
                        metadata=((PROBE_ID_METADATA, str(len(out))),),
                    )
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                out.append((time.time(), (time.perf_counter() - t0) * 1000, code))
                await asyncio.sleep(gap)
        return out

    conn.send(asyncio.run(run()))


def _sleeper_main(period: float, max_seconds: float, conn: Any) -> None:
    _own_session()
    woke: list[tuple[float, float]] = []
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline and not conn.poll():
        t0 = time.perf_counter()
        time.sleep(period)
        woke.append((time.time(), (time.perf_counter() - t0 - period) * 1000))
    conn.send(woke)


class _PipedProcess:
    """A spawned process that runs `target(*args, conn)` and sends one result back when told
    to stop (or when its own bound ends)."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(*args, child), daemon=True)
        self.process.start()

    async def _stop(self) -> Any:
        """Tell it to stop and take its result (None if none came within 30 s)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):  # it may have ended on its own bound, its result sent
            self.conn.send("stop")
        result = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                result = await loop.run_in_executor(None, self.conn.recv)
        await loop.run_in_executor(None, self.process.join, 5.0)
        if self.process.is_alive():
            self.process.kill()
        return result


class Sleeper(_PipedProcess):
    """A process of its own that only sleeps `period` s at a time and notes how late it
    wakes (ms): nothing of Graylane in it, so what it sees is the machine's scheduling, the
    least delay any process here (an API replica, etcd, a prober) pays for each wake-up."""

    def __init__(self, *, period: float = 0.01, max_seconds: float) -> None:
        super().__init__(_sleeper_main, period, max_seconds)

    async def stop(self) -> list[tuple[float, float]]:
        """(wall-clock instant, ms late) of every wake-up."""
        return list(await self._stop() or [])


class Prober(_PipedProcess):
    """GetRelease in a loop in its own process, every `gap` s, until stopped or bounded."""

    def __init__(self, target: str, release: str, *, max_calls: int, max_seconds: float, gap: float = 0.02) -> None:
        super().__init__(_prober_main, target, release, max_calls, max_seconds, gap)

    def pause(self, paused: bool) -> None:
        """Stop calling (an idle measurement should not count the prober's own load), or go on."""
        self.conn.send("pause" if paused else "resume")

    async def stop(self) -> list[tuple[float, float, str]]:
        """(wall-clock end, ms, status code name) of every call."""
        return list(await self._stop() or [])
