"""The CI pipeline's side of the NextBatch benchmark, in its own process (bench/store_bench.py).

A pipeline calls the API from another process, so the bench does too: the control plane's
event loop then serves the calls instead of also running them. Commands arrive one per line
on stdin, answers leave as one JSON line each on stdout:

    next NAME            NextBatch on NAME, then wait for `reached` of the new batch two ways
                         at once: a Watch stream opened before the call, and GetRelease polled
                         every POLL seconds. Answer: {"t0", "reply", "watch", "poll"} as
                         time.perf_counter() instants (CLOCK_MONOTONIC: comparable across
                         processes on Linux).
    act ACTION NAME      any other action (rollback, restart), answered with the release.
    get NAME             {"batch", "batches", "phase", "reached"}.

    python -P bench/nextbatch_client.py API_TARGET [POLL [CA CERT KEY]]

With CA, CERT and KEY the client speaks mutual TLS (bench/tls_bench.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.api.tls import ClientTls
from graylane.v1 import release_pb2 as pb

TIMEOUT = 15.0


async def _next(client: ReleaseClient, name: str, poll: float) -> dict[str, float]:
    watch = client.watch(name)
    current = await anext(watch)  # the stream is open and has the release as it is
    want = current.status.batch + 1
    t0 = time.perf_counter()
    await client.act(Action.NEXT, name)
    reply = time.perf_counter()

    def done(r: pb.Release) -> bool:
        return r.status.batch == want and r.status.reached

    async def by_watch() -> float:
        async for release in watch:
            if done(release):
                return time.perf_counter()
        raise RuntimeError("watch ended before reached")

    async def by_poll() -> float:
        while not done(await client.get_release(name)):
            await asyncio.sleep(poll)
        return time.perf_counter()

    try:
        async with asyncio.timeout(TIMEOUT):
            watched, polled = await asyncio.gather(by_watch(), by_poll())
    finally:
        await watch.aclose()
    return {"t0": t0, "reply": reply, "watch": watched, "poll": polled}


async def main(target: str, poll: float, tls: ClientTls | None = None) -> None:
    loop = asyncio.get_running_loop()
    async with ReleaseClient.connect(target, actor="bench", tls=tls) as client:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            words = line.split()
            answer: dict[str, object]
            if words[0] == "next":
                answer = dict(await _next(client, words[1], poll))
            elif words[0] == "act":
                release = await client.act(Action[words[1].upper()], words[2])
                answer = {"phase": pb.Phase.Name(release.status.phase)}
            else:
                r = await client.get_release(words[1])
                answer = {
                    "batch": r.status.batch,
                    "batches": len(r.spec.batches),
                    "phase": pb.Phase.Name(r.status.phase),
                    "reached": r.status.reached,
                }
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    tls_files = [Path(a) for a in sys.argv[3:6]]
    tls = ClientTls(ca=tls_files[0], cert=tls_files[1], key=tls_files[2]) if len(tls_files) == 3 else None
    asyncio.run(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.005, tls))
