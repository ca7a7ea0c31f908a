"""A throw-away control plane on loopback: embedded etcd in a temporary folder, one replica.

Owns the start-up and tear-down order shared by `graylane demo` and the benchmarks:
etcd first, then the store, then the replica (API and xDS on free ports); stopped in
reverse. Tests build their own from fixtures; this is for whole-product runs.
`register_service` puts a service and its versions through any control plane's API;
`manual_canary` is the release the demos and tests apply to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.lifecycle import cancel_and_wait
from graylane.controlplane.local.etcd import EtcdProcess
from graylane.controlplane.store import EtcdStore, connect
from graylane.v1 import release_pb2 as pb


@dataclass(frozen=True)
class LocalPlane:
    etcd: EtcdProcess
    store: EtcdStore
    plane: ControlPlane

    @property
    def api_target(self) -> str:
        return f"127.0.0.1:{self.plane.api_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.plane.http_port}/ui/"


async def register_service(client: ReleaseClient, service: str, versions: Iterable[str] = ("v1", "v2")) -> None:
    """`service` with stable version v1, and each of `versions` (without endpoints)."""
    await client.put_service(pb.Service(name=service, stable_version="v1"))
    for name in versions:
        await client.put_version(pb.Version(service=service, name=name))


def header_rule(headers: Mapping[str, str]) -> pb.MatchRule:
    """A rule that joins the requests carrying every one of `headers` with exactly its value."""
    return pb.MatchRule(
        conditions=[pb.Condition(kind=pb.HEADER, name=k, op=pb.EXACT, value=v) for k, v in headers.items()]
    )


def manual_canary(
    name: str,
    *,
    entry: str,
    grays: Iterable[tuple[str, str]],
    weights: Iterable[int],
    lane: str = "",
    rules: Iterable[pb.MatchRule] = (),
    gray_clusters: Iterable[str] = (),
) -> pb.Release:
    """Canary `name` in `lane` (default: `name`) from `entry`: each (service, gray version) of
    `grays` over base v1, a batch per weight, each moved on by hand (a manual pause); with
    `gray_clusters`, the gray versions run in those clusters only."""
    clusters = list(gray_clusters)
    return pb.Release(
        name=name,
        spec=pb.ReleaseSpec(
            lane=lane or name,
            entry=entry,
            services=[pb.ServiceVersions(service=s, base_version="v1", gray_version=g) for s, g in grays],
            strategy=pb.CANARY,
            match=list(rules),
            batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in weights],
            placement=pb.Placement(gray_clusters=clusters) if clusters else None,
        ),
    )


async def keep_serving(local: LocalPlane) -> None:
    """`demo --keep-running`: after the scenario, leave everything up (the dashboard shows
    what happened) until SIGINT or SIGTERM, then return so the caller stops it all in order."""
    print(f"\nstill serving: dashboard {local.dashboard_url} (open mode, loopback); Ctrl-C stops it", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def local_control_plane(*, prefix: str = "graylane-", ready_timeout: float = 15.0) -> AsyncIterator[LocalPlane]:
    async with contextlib.AsyncExitStack() as stack:
        tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        etcd = await stack.enter_async_context(EtcdProcess(data_dir=tmp / "etcd"))
        store = await connect(etcd.endpoint)
        stack.push_async_callback(store.close)
        # With its HTTP server, so the dashboard (open mode: no auth, loopback only) shows the run.
        plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0", http_listen="127.0.0.1:0")
        stack.push_async_callback(cancel_and_wait, asyncio.create_task(plane.run()))
        async with asyncio.timeout(ready_timeout):
            await plane.ready.wait()
        yield LocalPlane(etcd, store, plane)
