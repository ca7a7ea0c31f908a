"""What mutual TLS costs on the release path: NextBatch -> every Envoy ACKed, and -> `reached`.

One etcd, one release with 20 manual batches on one service, and per round two replicas in
turn on that etcd: plain text, then mutual TLS on every port (certificates from `graylane
certs`, the API client and the Envoys presenting theirs, the xDS gate admitting each Envoy
by its certificate). Each replica is measured with 1 and then 5 real Envoys
(`store_bench.bench_reached`: REACHED_STEPS NextBatch calls each, made by a client in another
process, as a pipeline would; the ACK instants come from the tracker). Rounds alternate the two
so a busy moment on the machine falls on both. Medians over every step of every round.

`python -P bench/tls_bench.py [ROUNDS]` prints the section; `make bench ARGS=--tls` writes
it into bench/RESULTS.md as section 8.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from graylane.controlplane.api.certs import make_local_certs
from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.api.proxyauth import xds_authenticator
from graylane.controlplane.api.tls import ClientTls, ServerTls
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.local.envoy import EnvoyTls
from graylane.controlplane.local.etcd import EtcdProcess
from graylane.controlplane.store import connect
from graylane.v1 import release_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/store_bench.py
from store_bench import REACHED_STEPS, bench_reached, p99, register, spec  # noqa: E402

TITLE = "8. TLS overhead on NextBatch -> every Envoy ACKed"
ENVOYS = (1, 5)
PLAIN, MTLS = "plain text", "mutual TLS"


async def one_replica(etcd: str, certs: Path | None, envoys: int, prefix: str) -> dict[str, list[float]]:
    store = await connect(etcd, prefix=prefix)
    try:
        await register(store, 1)
        name = "r-s0000"
        tls = envoy_tls = client_tls = auth = None
        if certs is not None:
            tls = ServerTls(cert=certs / "server.pem", key=certs / "server-key.pem", client_ca=certs / "ca.pem")
            auth = xds_authenticator(cluster="local", tokens=(), mutual=True)
            envoy_tls = EnvoyTls(cert=certs / "envoy-local.pem", key=certs / "envoy-local-key.pem", ca=certs / "ca.pem")
            client_tls = ClientTls(ca=certs / "ca.pem", cert=certs / "user-bench.pem", key=certs / "user-bench-key.pem")
        plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0", tls=tls, xds_auth=auth)
        async with plane.running():
            target = f"127.0.0.1:{plane.api_port}"
            async with ReleaseClient.connect(target, actor="bench", tls=client_tls) as client:
                await client.apply_release(pb.Release(name=name, spec=spec(0)))
            return await bench_reached(plane, envoys, name, envoy_tls=envoy_tls, client_tls=client_tls)
    finally:
        await store.close()


async def run(rounds: int = 3) -> str:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="graylane-tls-bench-") as tmp:
        certs = Path(tmp) / "certs"
        make_local_certs(certs, users=["bench"])
        async with EtcdProcess(data_dir=Path(tmp) / "etcd") as etcd:
            for r in range(rounds):
                for variant in (PLAIN, MTLS):
                    for envoys in ENVOYS:
                        print(f"round {r + 1}/{rounds}: {variant}, {envoys} Envoys", flush=True)
                        out = await one_replica(
                            etcd.endpoint,
                            certs if variant == MTLS else None,
                            envoys,
                            f"/graylane-tls-bench/{r}/{variant[0]}/{envoys}/v1/",
                        )
                        slot = results.setdefault((variant, envoys), {"acked": [], "watched": []})
                        slot["acked"] += out["acked"]
                        slot["watched"] += out["watched"]
    return section(results, rounds, time.monotonic() - started, load_before)


def section(
    results: dict[tuple[str, int], dict[str, list[float]]], rounds: int, seconds: float, load_before: float
) -> str:
    def med(values: Sequence[float]) -> str:
        return f"{statistics.median(values):.1f}" if values else "-"

    rows = []
    for envoys in ENVOYS:
        plain, mtls = results[(PLAIN, envoys)], results[(MTLS, envoys)]
        for what, label in (("acked", "-> every Envoy ACKed the new routes"), ("watched", "-> `reached` on a Watch")):
            a, b = plain[what], mtls[what]
            delta = statistics.median(b) - statistics.median(a) if a and b else float("nan")
            rows.append(
                f"| NextBatch {label}, {envoys} Envoy{'s' if envoys > 1 else ''} | {med(a)} (p99 {p99(a):.1f}) "
                f"| {med(b)} (p99 {p99(b):.1f}) | {delta:+.1f} |"
            )
    load = os.getloadavg()[0]
    return "\n".join(
        [
            f"## {TITLE}",
            "",
            f"`make bench ARGS=--tls` (bench/tls_bench.py): one release on one service, {rounds} rounds alternating a "
            "replica on plain text and one with mutual TLS on every port (the API client, in its own process; the "
            "Envoys' ADS, with the xDS gate checking each Envoy's certificate), each with 1 then 5 real Envoys, "
            f"{REACHED_STEPS} NextBatch calls per replica and Envoy count (section 7's method: ACK instants from the "
            "tracker, `reached` seen on a Watch). Medians in ms over every step (p99 beside). Run took "
            f"{seconds:.0f} s; load average {load_before:.1f} at the start, {load:.1f} at the end, on "
            f"{os.cpu_count()} cores.",
            "",
            f"| measurement | {PLAIN} | {MTLS} | difference |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )


def main(argv: Sequence[str] = ()) -> str:
    rounds = int(argv[0]) if argv else 3
    return asyncio.run(run(rounds))


if __name__ == "__main__":
    sys.exit(print(main(sys.argv[1:])))
