"""The last-known-good view and the agent id on disk (agent/lkg.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from google.protobuf import json_format
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


def state_dir(path: Path, cluster: str = "east") -> StateDir:
    return StateDir(path, cluster=cluster, control_plane="127.0.0.1:7400")


def test_a_saved_view_loads_back_equal(tmp_path: Path) -> None:
    state = state_dir(tmp_path / "state")
    assert state.load_view() is None and state.load_note == ""
    message = cluster_view(VIEW)
    state.save_view(message)
    assert state_dir(tmp_path / "state").load_view() == message
    document = json.loads((tmp_path / "state" / "view.json").read_text())
    assert document["cluster"] == "east" and document["control_plane"] == "127.0.0.1:7400"


def test_saving_replaces_the_file_whole(tmp_path: Path) -> None:
    state = state_dir(tmp_path)
    first = cluster_view(VIEW)
    second = cluster_view(xv.RoutingView(services=VIEW.services, endpoints=VIEW.endpoints))
    state.save_view(first)
    state.save_view(second)
    assert state.load_view() == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view.json"]  # no temporary left behind


def test_a_crash_while_writing_leaves_the_previous_view(tmp_path: Path) -> None:
    state = state_dir(tmp_path)
    message = cluster_view(VIEW)
    state.save_view(message)
    # What a crash between writing the temporary file and renaming it leaves behind.
    (tmp_path / "view.json.tmp").write_text('{"version": "half')
    assert state_dir(tmp_path).load_view() == message
    state.save_view(message)  # and the next save simply overwrites it
    assert state_dir(tmp_path).load_view() == message


def make_bad_view(path: Path, kind: str) -> None:
    file = path / "view.json"
    if kind == "not json":
        file.write_text("{not json")
    elif kind == "not utf-8":
        file.write_bytes(b'{"view": "\xff\xfe"}')
    elif kind == "directory":
        file.mkdir()
    elif kind == "other cluster":
        state_dir(path, cluster="west").save_view(cluster_view(VIEW))
    elif kind == "no cluster":  # the bare view this agent wrote before files named their cluster
        file.write_text(json_format.MessageToJson(cluster_view(VIEW)))
    elif kind == "not a view":
        file.write_text(json.dumps({"format": 1, "cluster": "east", "view": {"version": 7, "bogus": []}}))


BAD_VIEWS = {
    "not json": "not JSON",
    "not utf-8": "not UTF-8",
    "directory": "a directory",
    "other cluster": "written for cluster 'west', this agent serves cluster 'east'",
    "no cluster": "no cluster named",
    "not a view": "not a view",
}


@pytest.mark.parametrize("kind", sorted(BAD_VIEWS))
def test_an_unusable_view_file_is_named_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    make_bad_view(tmp_path, kind)
    state = state_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="graylane.agent.lkg"):
        assert state.load_view() is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(tmp_path / "view.json") in record.getMessage() and BAD_VIEWS[kind] in record.getMessage()
    assert BAD_VIEWS[kind] in state.load_note and str(tmp_path / "view.json") in state.load_note


def test_a_failed_save_is_counted_and_cleared_by_the_next_good_one(tmp_path: Path) -> None:
    state = state_dir(tmp_path)
    (tmp_path / "view.json").mkdir()
    assert not state.keep(cluster_view(VIEW))
    assert not state.keep(cluster_view(VIEW))
    assert state.save_failures == 2 and "view.json" in state.last_save_error
    assert state.last_saved_at is None
    (tmp_path / "view.json").rmdir()
    assert state.keep(cluster_view(VIEW))
    assert state.save_failures == 2 and state.last_save_error == "" and state.last_saved_at is not None


def test_the_agent_id_is_created_once_and_kept(tmp_path: Path) -> None:
    first = state_dir(tmp_path).agent_id()
    assert len(first) == 32
    assert state_dir(tmp_path).agent_id() == first
    assert state_dir(tmp_path / "elsewhere").agent_id() != first


@pytest.mark.parametrize("kind", ["not utf-8", "garbage", "directory"])
def test_an_unreadable_agent_id_gives_a_fresh_one_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    file = tmp_path / "agent_id"
    if kind == "not utf-8":
        file.write_bytes(b"\xff\xfe\x00abc")
    elif kind == "garbage":
        file.write_text("two words\nand a line")
    else:
        file.mkdir()
    state = state_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="graylane.agent.lkg"):
        fresh = state.agent_id()
    assert len(fresh) == 32
    assert str(file) in caplog.text and fresh in caplog.text
    assert str(file) in state.id_note
    if kind != "directory":  # replaced on disk: the next start keeps the fresh id, quietly
        again = state_dir(tmp_path)
        assert again.agent_id() == fresh and again.id_note == ""
