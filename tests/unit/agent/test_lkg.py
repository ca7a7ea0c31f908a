"""The last-known-good view and the agent id on disk (agent/lkg.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from graylane.agent.lkg import StateDir
from graylane.agent.wire import cluster_view
from graylane.xds import view as xv

VIEW = xv.RoutingView(
    services=(xv.ServiceRoute("checkout", "v1"),),
    endpoints=(
        xv.VersionEndpoints("checkout", "v1", (xv.Endpoint("127.0.0.1", 8081),)),
        xv.VersionEndpoints("checkout", "v2", (xv.Endpoint("127.0.0.1", 9443),), via_cluster="west"),
    ),
    lanes=(xv.Lane(name="gray", entry="checkout", weight=30, versions=(("checkout", "v2"),)),),
)


def test_a_saved_view_loads_back_equal(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    assert state.load_view() is None
    message = cluster_view(VIEW)
    state.save_view(message)
    assert StateDir(tmp_path / "state").load_view() == message


def test_saving_replaces_the_file_whole(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    first = cluster_view(VIEW)
    second = cluster_view(xv.RoutingView(services=VIEW.services, endpoints=VIEW.endpoints))
    state.save_view(first)
    state.save_view(second)
    assert state.load_view() == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view.json"]  # no temporary left behind


def test_a_crash_while_writing_leaves_the_previous_view(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    message = cluster_view(VIEW)
    state.save_view(message)
    # What a crash between writing the temporary file and renaming it leaves behind.
    (tmp_path / "view.json.tmp").write_text('{"version": "half')
    assert StateDir(tmp_path).load_view() == message
    state.save_view(message)  # and the next save simply overwrites it
    assert StateDir(tmp_path).load_view() == message


def test_an_unreadable_view_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "view.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="graylane.agent.lkg"):
        assert StateDir(tmp_path).load_view() is None
    assert "unreadable last-known-good view" in caplog.text


def test_the_agent_id_is_created_once_and_kept(tmp_path: Path) -> None:
    first = StateDir(tmp_path).agent_id()
    assert len(first) == 32
    assert StateDir(tmp_path).agent_id() == first
    assert StateDir(tmp_path / "elsewhere").agent_id() != first
