"""`graylane demo --grpc`: a gray lane through proxyless gRPC services, no Envoy anywhere.

Starts an embedded etcd (temporary folder), one control-plane replica and the greeter
chain a -> b -> c of `graylane.deploy.demo.greeter` (grpc.aio services in one child
process; b in v1 and v2; every hop calls the next through `xds:///<service>`, routed by
gRPC's own xDS resolver, and carries the lane with `graylane.lanes`). Two independent
proxyless clients call a: grpcio (Python) and, when `make node` installed it,
@grpc/grpc-js-xds (Node). Then it applies a release (lane `gray-b`, entry b, testers by
header, batches 10 / 50 / 100 %) and steps it through every batch, then rolls it back.
Per step and client it prints how many proxies carry the step, the share of each path
plain calls took, and how many testers stayed in the lane.

Owns the demo's script and its verdict. Exit status 0 when no call failed and every call
took a path it may take: a tester the lane's path (a v1 > b v2 > c v1, with the lane
seen by b and c) while the release is live, any plain call the stable path or (at the
entry's split) the lane's path, and, after the rollback, every call the stable path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.deploy.demo.greeter import ClientProcess, GreeterProcess, ServerSpec, node_binary, node_modules
from graylane.deploy.local.stack import header_rule, local_control_plane, manual_canary
from graylane.v1 import release_pb2 as pb

NAME = "gray-b"
LANE = "gray-b"
TESTER_HEADER = ("x-user", "tester")
STABLE = "a:v1>b:v1>c:v1"
IN_LANE = f"a:v1>b:v2@{LANE}>c:v1@{LANE}"
STEP_TIMEOUT_SECONDS = 20.0
PHASES = {v: k for k, v in pb.Phase.items()}


def _release() -> pb.Release:
    return manual_canary(
        NAME,
        lane=LANE,
        entry="b",
        grays=[("b", "v2")],
        weights=(10, 50, 100),
        rules=[header_rule(dict([TESTER_HEADER]))],
    )


async def _until(client: ReleaseClient, done: Any) -> pb.Release:
    async with asyncio.timeout(STEP_TIMEOUT_SECONDS):
        while True:
            r = await client.get_release(NAME)
            if done(r):
                return r
            await asyncio.sleep(0.05)


async def run_grpc_demo(*, calls_per_step: int = 400) -> int:
    calls_per_step = max(10, min(calls_per_step, 10_000))
    failed = wrong = sent = 0
    async with contextlib.AsyncExitStack() as stack:
        local = await stack.enter_async_context(local_control_plane(prefix="graylane-demo-grpc-"))
        xds_port = local.plane.xds_port
        client = await stack.enter_async_context(ReleaseClient.connect(local.api_target, actor="demo"))
        servers = [
            ServerSpec("a", "v1", next_hop="b"),
            ServerSpec("b", "v1", next_hop="c"),
            ServerSpec("b", "v2", next_hop="c", own_lane=LANE),
            ServerSpec("c", "v1"),
        ]
        greeters = await stack.enter_async_context(GreeterProcess(servers, xds_port=xds_port))
        for service, versions in (("a", ("v1",)), ("b", ("v1", "v2")), ("c", ("v1",))):
            await client.put_service(pb.Service(name=service, stable_version="v1"))
            for version in versions:
                endpoint = pb.Endpoint(address="127.0.0.1", port=greeters.ports[f"{service}:{version}"])
                await client.put_version(pb.Version(service=service, name=version, endpoints=[endpoint]))
        print(f"control plane: API {local.api_target}, xDS 127.0.0.1:{xds_port}")
        print("greeters (grpc.aio, one process): " + ", ".join(f"{k} on :{v}" for k, v in greeters.ports.items()))

        kinds = ["python"]
        if node_binary() is not None and node_modules() is not None:
            kinds.append("node")
        else:
            print("node or @grpc/grpc-js-xds is missing (make node): the Node client is left out")
        clients = []
        for kind in kinds:
            proc = ClientProcess(kind, "xds:///a", xds_port=xds_port, node_id=f"demo-{kind}")
            clients.append(await stack.enter_async_context(proc))
        for c in clients:
            await c.ready()
        print(f"proxyless clients of xds:///a: {', '.join(kinds)}\n")
        print(f"paths: stable {STABLE}   lane {IN_LANE}")
        print(f"{'step':<18} {'phase':<12} {'weight':>6} {'proxies':>8}  {'client':<7} {'plain in lane':>13}  testers")

        async def step(label: str, r: pb.Release, *, live: bool) -> None:
            nonlocal failed, wrong, sent
            conv = r.status.convergence
            for c in clients:
                plain = await c.calls(calls_per_step, concurrency=16)
                testers = await c.calls(max(calls_per_step // 10, 10), metadata=[TESTER_HEADER])
                paths: Counter[str] = Counter(plain["paths"])
                sent += plain["ok"] + plain["failed"] + testers["ok"] + testers["failed"]
                failed += plain["failed"] + testers["failed"]
                allowed = {STABLE, IN_LANE} if live else {STABLE}
                wrong += sum(n for p, n in paths.items() if p not in allowed)
                tester_path = IN_LANE if live else STABLE
                wrong += sum(n for p, n in testers["paths"].items() if p != tester_path)
                share = paths[IN_LANE] / max(plain["ok"], 1)
                in_lane = testers["paths"].get(IN_LANE, 0)
                print(
                    f"{label:<18} {PHASES[r.status.phase]:<12} {r.status.weight:>5}% "
                    f"{conv.converged:>3}/{conv.proxies:<4}  {c.kind:<7} {share:>12.1%}  "
                    f"{in_lane}/{testers['ok']} in the lane"
                )
                for error, count in list(plain["errors"].items())[:2]:
                    print(f"    ! {count} x {error}")

        r = await client.apply_release(_release(), reason="demo: gray b for proxyless gRPC")
        await step("applied (pending)", r, live=False)
        for i in range(len(r.spec.batches)):
            await client.act(Action.NEXT, NAME, reason="demo: next batch")
            r = await _until(client, lambda r: r.status.reached and r.status.phase == pb.PROGRESSING)  # noqa: B023
            await step(f"batch {i + 1}", r, live=True)
        await client.act(Action.ROLLBACK, NAME, reason="demo: take it back")
        r = await _until(client, lambda r: r.status.reached and r.status.phase == pb.ROLLED_BACK)
        await step("rollback", r, live=False)

    print(f"\n{sent} calls from {len(clients)} proxyless client(s): {failed} failed, {wrong} off their path")
    return 0 if failed == 0 and wrong == 0 else 1
