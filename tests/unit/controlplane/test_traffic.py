"""What GetTraffic sums over replicas (`merge_replicas`): every proxy's counters once."""

from __future__ import annotations

from graylane.agent.stats import TrafficCounters
from graylane.controlplane.reconcile.traffic import merge_replicas
from graylane.controlplane.store import ReplicaTraffic

BASE = ("checkout", "v1", "")
GRAY = ("checkout", "v2", "lane-a")


def record(nodes: set[str], revision: int, at: float = 100.0, **counts: tuple[int, ...]) -> ReplicaTraffic:
    keys = {"base": BASE, "gray": GRAY}
    return ReplicaTraffic(
        counts={keys[k]: v for k, v in counts.items()}, nodes=frozenset(nodes), at=at, revision=revision
    )


def test_own_and_other_replicas_add_up() -> None:
    own = {"e1": {BASE: TrafficCounters(10, 10), GRAY: TrafficCounters(2, 1, 0, 1)}}
    others = {"b": record({"e2"}, 5, at=90.0, base=(7, 7, 0, 0, 0)), "c": record({"e3"}, 6, gray=(3, 3, 0, 0, 0))}
    merged = merge_replicas(own, frozenset({"e1"}), others)
    assert merged.counts == {BASE: TrafficCounters(17, 17), GRAY: TrafficCounters(5, 4, 0, 1)}
    assert (merged.proxies, merged.replicas, merged.oldest_at, merged.set_aside) == (3, 3, 90.0, ())


def test_a_proxy_that_moved_here_is_not_counted_twice() -> None:
    # e2 was on replica b (its record: e2 at 7 requests, e4 at 5); it reconnected here and has
    # served 3 more since: b's record still names it until b republishes.
    own = {"e1": {BASE: TrafficCounters(10, 10)}, "e2": {BASE: TrafficCounters(10, 10)}}
    others = {"b": record({"e2", "e4"}, 5, base=(12, 12, 0, 0, 0))}
    merged = merge_replicas(own, frozenset({"e1", "e2"}), others)
    # e1 10 + e2 10 (read now) + b's record minus e2's current 10 (e4's 5, less the 3 e2 served
    # since: undercounts by them, never twice).
    assert merged.counts == {BASE: TrafficCounters(22, 22)}
    assert merged.proxies == 3


def test_subtraction_never_goes_below_zero() -> None:
    own = {"e2": {BASE: TrafficCounters(50, 40, 0, 10)}}
    merged = merge_replicas(own, frozenset({"e2"}), {"b": record({"e2"}, 5, base=(7, 7, 0, 0, 0))})
    assert merged.counts == {BASE: TrafficCounters(50, 40, 0, 10)}


def test_a_record_naming_a_proxy_a_newer_record_names_is_set_aside() -> None:
    # e3 moved from b (older record, revision 5) to c (newer, revision 9): b's record is left out.
    others = {"b": record({"e3", "e4"}, 5, base=(8, 8, 0, 0, 0)), "c": record({"e3"}, 9, base=(6, 6, 0, 0, 0))}
    merged = merge_replicas({}, frozenset(), others)
    assert merged.counts == {BASE: TrafficCounters(6, 6)}
    assert (merged.set_aside, merged.replicas, merged.proxies) == (("b",), 2, 1)


def test_an_unreachable_proxy_here_keeps_its_published_numbers() -> None:
    # e2 is connected here but its admin endpoint did not answer: nothing read now to subtract,
    # and nothing of it counted here, so b's record counts it once.
    merged = merge_replicas({}, frozenset({"e2"}), {"b": record({"e2"}, 5, base=(7, 7, 0, 0, 0))})
    assert (merged.counts, merged.proxies) == ({BASE: TrafficCounters(7, 7)}, 1)
