"""The agent's own condition, for operators: `/healthz` and a few Prometheus series.

Owns: reading (never changing) what the agent's parts know of themselves — whether a
last-known-good view was served at start or why a file was ignored, failed saves of the
view and the time of the last good one, whether a fresh agent id replaced an unreadable
one, the control-plane session, the local guard's actions — and rendering it as the JSON
body of `/healthz` and as series in the agent's metrics registry.

`/healthz` answers 503 until the agent serves, then 200 with `"status": "ok"`, or
`"degraded"` and the reasons (an LKG file ignored at start, the last save failed, the
control plane out of reach, lanes the guard routed to base): the agent still serves its
Envoys then, so a liveness probe must not restart it, and a human or an alert reads why.

Concurrency: one asyncio loop; the collector runs on it when `/metrics` is rendered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from graylane.agent.guard import LocalGuard
from graylane.agent.lkg import StateDir
from graylane.agent.session import ControlPlaneSession
from graylane.controlplane.api.http import HttpServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LKG_SAVE_FAILURES = "graylane_agent_lkg_save_failures"  # exported as ..._total
LKG_LAST_SAVE = "graylane_agent_lkg_last_save_timestamp_seconds"
LKG_IGNORED = "graylane_agent_lkg_ignored_at_start"
LKG_SERVED = "graylane_agent_lkg_served_at_start"
AGENT_ID_REPLACED = "graylane_agent_id_replaced"
CONTROL_PLANE_CONNECTED = "graylane_agent_control_plane_connected"
GUARD_ACTIONS = "graylane_agent_guard_actions"  # exported as ..._total
GUARD_LANES = "graylane_agent_guard_lanes_at_base"


class AgentHealth(Collector):
    def __init__(
        self,
        *,
        state: StateDir,
        session: ControlPlaneSession,
        guard: LocalGuard,
        ready: Callable[[], bool],
    ) -> None:
        self._state = state
        self._session = session
        self._guard = guard
        self._ready = ready
        self.lkg_served = ""  # the view version served from disk at start, "" when none
        self.held_view = ""  # why a view from the control plane is held back, "" when none is

    def document(self) -> dict[str, Any]:
        """The body of `/healthz`."""
        state, session = self._state, self._session
        notes = {
            "last-known-good view ignored at start": state.load_note,
            "last-known-good view not saved": state.last_save_error,
            "agent id replaced": state.id_note,
        }
        problems = [f"{what}: {note}" for what, note in notes.items() if note]
        since = session.disconnected_since
        away = None if since is None else round(time.monotonic() - since, 3)
        if away is not None:
            problems.append(f"control plane unreachable for {away:g}s")
        if self.held_view:
            problems.append(f"holding back {self.held_view}")
        if self._guard.aborted:
            problems.append(f"local guard routed lanes {sorted(self._guard.aborted)} to base")
        if not self._ready():
            status = "starting"
        else:
            status = "degraded" if problems else "ok"
        return {
            "status": status,
            "problems": problems,
            "control_plane": {"target": session.target, "connected": away is None, "unreachable_seconds": away},
            "last_known_good": {
                "file": str(state.view_file),
                "served_at_start": self.lkg_served,
                "ignored_at_start": state.load_note,
                "save_failures": state.save_failures,
                "last_save_error": state.last_save_error,
                "last_saved_at": state.last_saved_at,
            },
            "agent_id_replaced": state.id_note,
            "guard": {"lanes_at_base": sorted(self._guard.aborted), "actions": self._guard.actions},
        }

    def route(self, server: HttpServer) -> None:
        """`GET /healthz` on `server` (see the module docstring for the answers)."""

        async def healthz(request: web.Request) -> web.Response:
            document = self.document()
            return web.Response(
                status=503 if document["status"] == "starting" else 200,
                text=json.dumps(document, indent=1) + "\n",
                content_type="application/json",
            )

        server.add_route("GET", "/healthz", healthz, name="healthz")

    def collect(self) -> Iterator[Metric]:
        state = self._state
        failures = CounterMetricFamily(LKG_SAVE_FAILURES, "Failed saves of the last-known-good view")
        failures.add_metric([], state.save_failures)
        yield failures
        if state.last_saved_at is not None:
            saved = GaugeMetricFamily(LKG_LAST_SAVE, "When the last-known-good view was last saved (Unix time)")
            saved.add_metric([], state.last_saved_at)
            yield saved
        yield GaugeMetricFamily(
            LKG_IGNORED, "1 if a last-known-good file was ignored at start (unreadable, other cluster)",
            value=1 if state.load_note else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            LKG_SERVED, "1 if a last-known-good view was served at start", value=1 if self.lkg_served else 0
        )
        yield GaugeMetricFamily(
            AGENT_ID_REPLACED,
            "1 if an unreadable agent id was replaced by a fresh one",
            value=1 if state.id_note else 0,
        )
        yield GaugeMetricFamily(
            CONTROL_PLANE_CONNECTED,
            "1 while the session to the control plane is up",
            value=1 if self._session.disconnected_since is None else 0,
        )
        actions = CounterMetricFamily(GUARD_ACTIONS, "Lanes the local guard routed to base")
        actions.add_metric([], self._guard.actions)
        yield actions
        yield GaugeMetricFamily(GUARD_LANES, "Lanes the local guard holds at base now", value=len(self._guard.aborted))
