"""The scale bench's compiled and Node fleets against a real control plane on a real etcd, each
run the same way (bench/fleet.py's worker_class: "node" is bench/fleet_node/worker.js on grpc-js,
"c" bench/fleet_c/worker.c on libnghttp2):
every client is configured as the Python fleet's would be (the control plane sees each node, on
the protocol and snapshot key it asked for, with every type ACKed and nothing NACKed) and each sees
a weight change.

A missing node, bench/fleet_node/node_modules or bench/fleet_c/graylane-fleet-c (the Makefile's
fleet-node and fleet-c targets) skips its case on a developer machine and fails it under CI=true.
"""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
import sys
import time
from types import ModuleType
from typing import Any

import pytest
from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.store import EtcdStore
from graylane.v1 import release_pb2 as pb
from graylane.xds import resources
from graylane.xds.tracker import DELTA, SOTW

from tests.conftest import require_binary

pytestmark = pytest.mark.etcd

CLIENTS = 20
ENTRY = "svc-0"
LANE = "fleet-v2"
LISTEN_PORT = 15000


def load_fleet() -> ModuleType:
    """bench/fleet.py, which is not a package module (bench/ is run as scripts)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "fleet.py"
    spec = importlib.util.spec_from_file_location("graylane_bench_fleet", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("impl", ["node", "c"])
async def test_node_fleet_configures_every_client_and_sees_a_weight_change(store: EtcdStore, impl: str) -> None:
    fleet = load_fleet()
    missing = fleet.c_fleet_missing() if impl == "c" else fleet.node_fleet_missing()
    require_binary(None if missing else "node", str(missing))
    async with ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0").running() as plane:
        async with ReleaseClient.connect(f"127.0.0.1:{plane.api_port}", actor="test") as client:
            for i in range(3):
                name = f"svc-{i}"
                await client.put_service(pb.Service(name=name, stable_version="v1"))
                for v in ("v1", "v2") if name == ENTRY else ("v1",):
                    endpoint = pb.Endpoint(address="127.0.0.1", port=20000 + i)
                    await client.put_version(pb.Version(service=name, name=v, endpoints=[endpoint]))
            spec = pb.ReleaseSpec(
                lane=LANE,
                entry=ENTRY,
                services=[pb.ServiceVersions(service=ENTRY, base_version="v1", gray_version="v2")],
                strategy=pb.CANARY,
                batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in (10, 30)],
            )
            await client.apply_release(pb.Release(name="fleet", spec=spec))
            first = await client.act(Action.NEXT, "fleet")
            assert first.status.weight == 10

            worker = fleet.worker_class(impl)(
                fleet.FleetSpec(
                    target=f"127.0.0.1:{plane.xds_port}",
                    first=0,
                    count=CLIENTS,
                    delta_every=2,  # half the clients speak delta
                    entry=ENTRY,
                    lane_cluster_part=f"|{LANE}",
                    connect_rate=0.0,
                    listen_port=LISTEN_PORT,
                ),
                streams_per_channel=4,
            )
            try:

                async def configured() -> bool:
                    return bool((await worker.ask("status", timeout=5))["configured"] == CLIENTS)

                await until(configured, 10, "every Node client configured")
                seen = await worker.ask("seen", 10)
                assert len(seen) == CLIENTS and all(isinstance(t, float) for t in seen), seen

                # What the control plane holds of each client: the node, protocol and snapshot
                # key it asked for; every type it subscribed to ACKed; nothing NACKed.
                wanted = {resources.CLUSTER, resources.ENDPOINT, resources.LISTENER, resources.ROUTE}
                wanted.add(resources.SCOPED_ROUTE)

                async def all_acked() -> dict[str, Any]:
                    got = {p.node_id: p for p in plane.tracker.proxies().values() if p.connected}
                    done = len(got) == CLIENTS and all(wanted <= set(p.acked) for p in got.values())
                    return got if done else {}

                proxies = await until(all_acked, 5, "every type ACKed by every client")
                assert sorted(proxies) == sorted(f"fleet-{i}" for i in range(CLIENTS))
                for node_id, p in proxies.items():
                    index = int(node_id.removeprefix("fleet-"))
                    assert p.protocol == (DELTA if index % 2 == 0 else SOTW), node_id
                    assert p.cluster == "graylane" and p.key == str(LISTEN_PORT), (p.cluster, p.key)
                    assert p.metadata.get("listen_port") == str(LISTEN_PORT)
                    assert p.last_nack is None, p.last_nack

                t0 = time.time()
                second = await client.act(Action.NEXT, "fleet")
                assert second.status.weight == 30

                async def everyone_saw() -> bool:
                    return bool(await worker.ask("missing", 30, timeout=5) == 0)

                await until(everyone_saw, 10, "every Node client sees weight 30")
                seen = await worker.ask("seen", 30)
                assert all(t0 - 0.01 <= t <= time.time() for t in seen), (t0, seen)
                status = await worker.ask("status")
                assert status["errors"] == 0 and status["connected"] == CLIENTS, status
            finally:
                final = await worker.stop()
            assert final is not None and final["configured"] == CLIENTS, final
            assert worker.process.returncode == 0
