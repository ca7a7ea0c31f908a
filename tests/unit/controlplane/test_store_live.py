"""LiveState: the follower's kept state, patched from watch events (no etcd needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from etcd3.etcdrpc import kv_pb2
from graylane.controlplane.domain import model
from graylane.controlplane.store import LiveState, ReplicaProgress
from graylane.controlplane.store._codec import _dump

PREFIX = "/t/"


def _kv(key: str, value: bytes, revision: int) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=(PREFIX + key).encode(), value=value, mod_revision=revision, create_revision=revision)


def _put(key: str, value: bytes, revision: int) -> kv_pb2.Event:
    return kv_pb2.Event(type=kv_pb2.Event.PUT, kv=_kv(key, value, revision))


def _delete(key: str, revision: int) -> kv_pb2.Event:
    return kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=_kv(key, b"", revision))


def _service(name: str, stable: str = "v1") -> bytes:
    return _dump(model.service_to_proto(model.Service(name=name, stable_version=stable)))


def test_puts_and_deletes_patch_only_their_keys_and_keep_key_order() -> None:
    state = LiveState(PREFIX, revision=1)
    state.load([_kv("services/b", _service("b"), 1)])
    first = state.snapshot()
    changed = state.apply([_put("services/a", _service("a"), 2), _put("services/b", _service("b", "v2"), 2)])
    snap = state.snapshot()
    assert snap.revision == 2
    assert [(s.name, s.stable_version) for s in snap.services] == [("a", "v1"), ("b", "v2")]
    assert set(changed["services"]) == {"a", "b"}
    old_b, new_b = changed["services"]["b"]
    assert isinstance(old_b, model.Service) and old_b.stable_version == "v1"
    assert isinstance(new_b, model.Service) and new_b.stable_version == "v2"
    assert first.services[0].stable_version == "v1"  # an earlier snapshot is not touched
    state.apply([_delete("services/a", 3)])
    assert [s.name for s in state.snapshot().services] == ["b"]


def test_keys_outside_the_live_kinds_only_move_the_revision() -> None:
    state = LiveState(PREFIX, revision=5)
    state.load([_kv("services/a", _service("a"), 5)])
    before = state.snapshot()
    assert state.apply([_put("events/rel/0000000000000001", b"{}", 9), _put("leader", b"me", 9)]) == {}
    after = state.snapshot()
    assert after.revision == 9
    assert after.services == before.services


def test_replicas_and_progress_are_decoded_and_replaced() -> None:
    state = LiveState(PREFIX, revision=1)
    state.apply(
        [
            _put("replicas/r1", json.dumps({"n1": "127.0.0.1:1"}).encode(), 2),
            # (a fourth number: proxies scoped away from the release, written only when some are)
            _put("progress/r1", json.dumps({"rel": ["fp", 2, 1], "other": ["fp", 0, 0, 3]}).encode(), 2),
        ]
    )
    snap = state.snapshot()
    assert snap.replica_proxies == {"n1": "127.0.0.1:1"}
    assert snap.replica_nodes == {"r1": frozenset({"n1"})}
    assert snap.replica_progress == {
        "r1": {"rel": ReplicaProgress("fp", 2, 1), "other": ReplicaProgress("fp", 0, 0, scoped_out=3)}
    }
    state.apply([_put("progress/r1", b"not json", 3), _delete("replicas/r1", 3)])
    snap = state.snapshot()
    assert snap.replica_progress == {} and snap.replica_proxies == {} and snap.replica_nodes == {}


def _release_value(name: str, phase: int) -> bytes:
    from graylane.v1 import release_pb2 as pb

    spec = pb.ReleaseSpec(
        lane=f"lane-{name}",
        entry="a",
        services=[pb.ServiceVersions(service="a", base_version="v1", gray_version="v2")],
        batches=[pb.Batch(weight=10, pause=pb.Pause(manual=True))],
    )
    return _dump(pb.Release(name=name, spec=spec, status=pb.ReleaseStatus(phase=phase)))


def test_a_snapshot_shares_every_kind_that_did_not_change_with_the_previous_one() -> None:
    from graylane.v1 import release_pb2 as pb

    state = LiveState(PREFIX, revision=1)
    state.load(
        [
            _kv("services/a", _service("a"), 1),
            _kv("releases/r1", _release_value("r1", pb.PROGRESSING), 1),
            _kv("releases/r2", _release_value("r2", pb.PROGRESSING), 1),
            _kv("replicas/x", json.dumps({"n1": "127.0.0.1:1"}).encode(), 1),
        ]
    )
    first = state.snapshot()
    state.apply([_put("releases/r2", _release_value("r2", pb.PAUSED), 2)])
    second = state.snapshot()
    assert second.services is first.services and second.versions is first.versions
    assert second.replica_proxies is first.replica_proxies and second.replica_nodes is first.replica_nodes
    assert second.releases is not first.releases
    assert second.releases[0] is first.releases[0]  # r1: the value decoded once, kept
    assert second.by_name["r2"].status.phase is model.Phase.PAUSED
    assert first.by_name["r2"].status.phase is model.Phase.PROGRESSING  # the earlier snapshot is not touched
    state.apply([_put("services/b", _service("b"), 3)])
    third = state.snapshot()
    assert third.releases is second.releases and third.by_name is second.by_name
    assert [s.name for s in third.services] == ["a", "b"]


def test_an_own_committed_write_applies_at_once_and_its_watch_events_are_then_no_ops() -> None:
    state = LiveState(PREFIX, revision=4)
    state.load([_kv("services/a", _service("a"), 4)])
    before = state.snapshot()
    puts = [_kv("services/a", _service("a", "v2"), 5), _kv("events/a/0000000000000001", b"{}", 5)]
    changed = state.apply_committed(5, puts)
    assert changed is not None and set(changed) == {"services"}
    assert state.revision == 5
    assert [s.stable_version for s in state.snapshot().services] == ["v2"]
    # The watch brings the same revision later: nothing changes, the snapshot is the same one.
    after = state.snapshot()
    assert state.apply([_put("services/a", _service("a", "v2"), 5)]) == {}
    assert state.snapshot() is after and before.services[0].stable_version == "v1"
    # The next revision from the watch applies as ever.
    assert set(state.apply([_put("services/b", _service("b"), 6)])) == {"services"}
    assert state.revision == 6


def test_an_own_write_behind_other_changes_waits_for_the_watch() -> None:
    state = LiveState(PREFIX, revision=4)
    state.load([_kv("services/a", _service("a"), 4)])
    snap = state.snapshot()
    # Revision 5 (someone else's) is not applied yet: 6 must not jump ahead of it.
    assert state.apply_committed(6, [_kv("services/a", _service("a", "v3"), 6)]) is None
    assert state.revision == 4 and state.snapshot() is snap
    assert set(state.apply([_put("services/b", _service("b"), 5)])) == {"services"}
    changed = state.apply([_put("services/a", _service("a", "v3"), 6)])
    assert set(changed["services"]) == {"a"} and state.revision == 6


def _release(name: str, batch: int) -> bytes:
    from dataclasses import replace

    from tests.unit.controlplane.conftest import canary_release

    return _dump(model.release_to_proto(replace(canary_release(batch=batch), name=name)))


def test_replaced_releases_are_patched_into_the_part_as_a_fresh_read_would_hold_them() -> None:
    """A release's new value (a NextBatch, a status write) is put in its place in the next
    snapshot instead of the whole releases' part being made again; adds, deletes and a key
    whose value names another release still remake it. Each snapshot must equal a fresh
    read of the same keys, and earlier snapshots stay as they were."""
    state = LiveState(PREFIX, revision=1)
    state.load([_kv(f"releases/r{i}", _release(f"r{i}", 0), 1) for i in range(5)])
    kept: dict[str, tuple[str, bytes, int]] = {f"r{i}": (f"releases/r{i}", _release(f"r{i}", 0), 1) for i in range(5)}
    seen = []
    steps: list[list[kv_pb2.Event]] = [
        [_put("releases/r2", _release("r2", 1), 2)],
        [_put("releases/r0", _release("r0", 1), 3), _put("releases/r4", _release("r4", 1), 3)],
        [_put("releases/r2", _release("r2", 2), 4)],
        [_put("releases/r10", _release("r10", 0), 5)],  # an added key: remade
        [_put("releases/r3", _release("r3", 2), 6)],
        [_delete("releases/r1", 7)],
        [_put("releases/r3", _release("other", 2), 8)],  # names another release: remade
        [_put("releases/r4", _release("r4", 2), 9), _put("releases/r0", _release("r0", 2), 9)],
    ]
    for events in steps:
        state.apply(events)
        for ev in events:
            name = ev.kv.key.decode()[len(PREFIX) :].split("/", 1)[1]
            if ev.type == kv_pb2.Event.DELETE:
                kept.pop(name)
            else:
                kept[name] = (f"releases/{name}", ev.kv.value, ev.kv.mod_revision)
        snap = state.snapshot()
        fresh = LiveState(PREFIX, revision=snap.revision)
        fresh.load([_kv(key, value, rev) for key, value, rev in kept.values()])
        want = fresh.snapshot()
        assert snap.releases == want.releases
        assert snap.by_name == want.by_name
        assert all(snap.by_name[r.name] is r for r in snap.releases if r.name != "other")
        seen.append((snap, [(r.name, r.status.batch) for r in snap.releases]))
    for snap, names in seen:  # an earlier snapshot is never written to
        assert [(r.name, r.status.batch) for r in snap.releases] == names
    unchanged = state.snapshot()
    assert state.snapshot() is unchanged


def test_a_release_this_process_wrote_decodes_as_a_parse_would_without_parsing(monkeypatch: object) -> None:
    """`_releases.encode` remembers the message behind the bytes it stores: the watch's (or
    the answer's) copy of that value is decoded from it, equal to a parse of the JSON."""
    from dataclasses import replace

    import pytest
    from graylane.controlplane.domain.machine import Action, Cause, transition
    from graylane.controlplane.store import _codec

    from tests.unit.controlplane.conftest import canary_release

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    cache = _codec._ReleaseCache(written=5)
    from graylane.controlplane.progression.analysis import AnalysisSpec

    r = replace(canary_release(model.Phase.PENDING, -1), name="r-wrote")
    # Doubles (the analysis thresholds) print as the shortest repr: read back exactly.
    analysis = AnalysisSpec(max_error_rate=1 / 3, max_p99_ms=123.456789, alpha=0.0123, min_effect=0.1 + 0.2)
    r = replace(r, spec=replace(r.spec, analysis=analysis))
    values = []
    for action in (Action.NEXT, Action.NEXT, Action.PAUSE, Action.RESUME, Action.ROLLBACK):
        r, _ = transition(r, action, cause=Cause(actor="a", reason="why ✓"), now=datetime.now(UTC))
        values.append(r)
    stored = [cache.encode(v) for v in values]
    parsed = []
    load = _codec._load

    def counted(data: bytes, message: object) -> object:
        parsed.append(data)
        return load(data, message)  # type: ignore[arg-type]

    monkeypatch.setattr(_codec, "_load", counted)
    for i, value in enumerate(stored):
        kv = _kv("releases/r-wrote", value, 10 + i)
        got = cache.decode(kv)
        fresh = _codec._ReleaseCache().decode(kv)  # parses
        assert got == fresh == replace(values[i], revision=10 + i)
        assert cache.decode(kv) is got
    # Only the fresh caches parsed; a sixth write pushes the oldest out (5 kept): parsed again.
    assert len(parsed) == len(stored)
    cache.encode(replace(values[-1], name="r-other"))
    assert cache.decode(_kv("releases/r-wrote", stored[0], 99)) == replace(values[0], revision=99)
    assert len(parsed) == len(stored) + 1
