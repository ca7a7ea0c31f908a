"""CPU of the Envoy stats scraper with dead admin endpoints (part of `make bench`).

`EnvoyStatsScraper.read_all` once a second (the metrics tick) over `targets` admin
addresses on loopback ports nothing listens on, for `seconds`; this process's CPU time
over wall time. Two settings: unbounded (no concurrency limit, no backoff: every dead
admin asked every tick, as before the limits) and the defaults (32 at once, backoff
doubling from 1 s to 60 s).
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time

from graylane.agent.stats import EnvoyStatsScraper


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _closed_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


async def scrape_cpu(*, targets: int, seconds: float, bounded: bool, tick: float = 1.0) -> dict[str, float]:
    ports = _closed_ports(targets)
    admins = {f"proxy-{i}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    options = {} if bounded else {"max_concurrency": 1_000_000, "backoff_s": 0.0, "max_backoff_s": 0.0}
    requests = 0
    async with EnvoyStatsScraper(**options) as scraper:  # type: ignore[arg-type]
        cpu0, t0 = _cpu(), time.monotonic()
        ticks = 0
        while time.monotonic() - t0 < seconds and ticks < seconds / tick + 1:
            started = time.monotonic()
            asked = sum(1 for a in admins.values() if not scraper.backing_off(a))
            _, unreachable = await scraper.read_all(admins)
            requests += asked
            assert len(unreachable) == targets
            ticks += 1
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - started)))
        wall = time.monotonic() - t0
        cpu = _cpu() - cpu0
    return {"cpu_pct": 100 * cpu / wall, "requests": requests, "ticks": ticks, "wall": wall}
