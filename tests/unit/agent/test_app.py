"""The agent's handling of views from the control plane (agent/app.py), without processes."""

from __future__ import annotations

import time
from pathlib import Path

from graylane.agent.app import Agent, AgentOptions
from graylane.agent.wire import cluster_view
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import release_pb2 as pb
from graylane.xds import view as xv

OWN = xv.VersionEndpoints("checkout", "v1", (xv.Endpoint("127.0.0.1", 8081),))
GRAY = xv.VersionEndpoints("checkout", "v2", (xv.Endpoint("127.0.0.1", 9443),), via_cluster="west")


def routing(*endpoints: xv.VersionEndpoints, weight: int = 10) -> xv.RoutingView:
    return xv.RoutingView(
        services=(xv.ServiceRoute("checkout", "v1"),),
        endpoints=endpoints,
        lanes=(xv.Lane(name="gray", entry="checkout", weight=weight, versions=(("checkout", "v2"),)),),
    )


def agent(tmp_path: Path) -> Agent:
    made = Agent(
        AgentOptions(
            cluster="east",
            control_plane="127.0.0.1:1",
            gateway_address="127.0.0.1:2",
            state_dir=tmp_path / "state",
        )
    )
    made._endpoints = apb.EndpointSnapshot(
        versions=[
            apb.VersionEndpoints(
                service="checkout", version="v1", endpoints=[pb.Endpoint(address="127.0.0.1", port=8081)]
            )
        ]
    )
    return made


def test_a_view_without_this_clusters_own_endpoints_is_held_for_a_while(tmp_path: Path) -> None:
    a = agent(tmp_path)
    good = cluster_view(routing(OWN, GRAY))
    a._on_view(good)
    assert a.relay.version == good.version

    # The control plane lost east's registration: its view lacks east's own v1.
    empty = cluster_view(routing(GRAY))
    a._on_view(empty)
    assert a.relay.version == good.version  # still serving the good view
    assert a.state.load_view() == good  # and still keeping it as the last-known-good one
    assert any("holding back" in p for p in a.health.document()["problems"])

    # A later view with the endpoints back replaces it at once.
    moved = cluster_view(routing(OWN, GRAY, weight=50))
    a._on_view(moved)
    assert a.relay.version == moved.version and a.health.held_view == ""

    # Held no longer than the hold: then the control plane's view is applied after all.
    a._on_view(empty)
    assert a.relay.version == moved.version
    assert a._hold_until is not None
    a._hold_until = time.monotonic() - 0.001
    a._release_held()
    assert a.relay.version == empty.version


def test_views_are_applied_as_they_come_when_the_cluster_reports_nothing(tmp_path: Path) -> None:
    a = agent(tmp_path)
    a._endpoints = apb.EndpointSnapshot()
    a._on_view(cluster_view(routing(OWN, GRAY)))
    empty = cluster_view(routing(GRAY))
    a._on_view(empty)
    assert a.relay.version == empty.version
