"""What a lone leader may keep back of its published count (`convergence._handed_is_safe`):
only a count whose last published value says no more than the current one does, read as a
leader reads another replica's."""

from __future__ import annotations

from graylane.controlplane.reconcile.convergence import _handed_is_safe
from graylane.controlplane.store import ReplicaProgress


def test_a_moved_target_may_wait_the_old_one_counts_as_not_carried() -> None:
    handed = {"rel": ReplicaProgress("A", 2, 2)}
    assert _handed_is_safe(handed, {"rel": ReplicaProgress("B", 2, 0)})
    assert _handed_is_safe(handed, {"rel": ReplicaProgress("B", 2, 2)})


def test_more_converged_of_the_same_proxies_may_wait() -> None:
    assert _handed_is_safe({"rel": ReplicaProgress("A", 3, 1)}, {"rel": ReplicaProgress("A", 3, 3)})
    assert _handed_is_safe({"rel": ReplicaProgress("A", 3, 1)}, {"rel": ReplicaProgress("A", 3, 1)})


def test_a_target_back_to_the_one_published_its_proxies_not_there_goes_at_once() -> None:
    # Published "A: 2 of 2", the target moved to B and back to A: the proxies carry B now.
    assert not _handed_is_safe({"rel": ReplicaProgress("A", 2, 2)}, {"rel": ReplicaProgress("A", 2, 0)})


def test_other_proxies_or_a_release_no_longer_counted_go_at_once() -> None:
    handed = {"rel": ReplicaProgress("A", 2, 2), "other": ReplicaProgress("C", 2, 2)}
    assert not _handed_is_safe(handed, {"rel": ReplicaProgress("A", 2, 2)})  # "other" left
    assert not _handed_is_safe({"rel": ReplicaProgress("A", 2, 2)}, {"rel": ReplicaProgress("A", 3, 3)})
    assert not _handed_is_safe({"rel": ReplicaProgress("A", 2, 2, 1)}, {"rel": ReplicaProgress("A", 2, 2)})


def test_a_release_counted_anew_may_wait_a_leader_reads_it_as_not_carried() -> None:
    assert _handed_is_safe({}, {"rel": ReplicaProgress("A", 1, 1)})
