"""The agent's metrics: its cluster's Envoys' statistics, as deltas, up to the control plane.

Owns: every second, reading the admin endpoint of each connected local proxy that states
one (node metadata `admin_address`), turning the cumulative counters and latency
histograms into per-(service, version, lane) deltas summed over the proxies (the same
`EnvoyAdminSource` the control plane uses in single-cluster mode), and handing each tick
to `send` as one `MetricsReport`. The control plane files the series under this agent's
cluster; the report does not name it.

A tick whose report cannot be sent (no control-plane stream) is simply lost: metrics are
facts about now, and the next tick's deltas start where this one ended, so nothing is
counted twice. Every report is also handed to `observe` (the local guard's error-rate
window), connected or not: the guard judges exactly when the control plane is away.
Concurrency: one asyncio loop; `run` is cancellable.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from graylane.agent.stats import LOOPBACK_ONLY, AdminAllowList
from graylane.controlplane.progression.metrics import DEFAULT_INTERVAL_SECONDS, EnvoyAdminSource, report_from_samples
from graylane.controlplane.reconcile.traffic import admin_addresses
from graylane.v1 import agent_pb2 as apb
from graylane.xds.tracker import ProxyTracker


class MetricsReporter:
    """`await MetricsReporter(tracker, send=...).run()`: one `MetricsReport` per tick with data."""

    def __init__(
        self,
        tracker: ProxyTracker,
        *,
        send: Callable[[apb.MetricsReport], None],
        observe: Callable[[apb.MetricsReport], None] | None = None,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        admin_allow: AdminAllowList = LOOPBACK_ONLY,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval {interval} must be positive")
        self._send = send
        self._observe = observe
        self._interval = interval
        self._clock = clock
        self._source = EnvoyAdminSource(
            lambda: {node: (admin, "") for node, admin in admin_addresses(tracker).items()},
            timeout=timeout,
            admin_allow=admin_allow,
        )
        self._last_at = -math.inf
        self.ticks = 0  # readings of the proxies done
        self.sent = 0  # reports handed to `send`

    async def tick(self) -> apb.MetricsReport | None:
        """Read the proxies once; the report of what they added since the last tick, if any."""
        at = max(self._clock(), self._last_at + 1e-6)
        self._last_at = at
        samples = await self._source.collect(at)
        self.ticks += 1
        if not samples:
            return None
        interval = next(iter(samples.values())).interval_s
        return report_from_samples(samples, at=at, interval_s=interval)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time()
            while True:
                report = await self.tick()
                if report is not None:
                    if self._observe is not None:
                        self._observe(report)
                    self._send(report)
                    self.sent += 1
                deadline += self._interval
                late = loop.time() - deadline
                if late > 0:
                    deadline += math.ceil(late / self._interval) * self._interval
                await asyncio.sleep(deadline - loop.time())
        finally:
            await self._source.aclose()
