"""views: which lane proxies are served under a NACK hold, and how convergence is counted."""

from __future__ import annotations

from dataclasses import replace

import pytest
from graylane.controlplane.domain import model
from graylane.controlplane.domain.model.values import Phase, Release
from graylane.controlplane.reconcile import views
from graylane.xds import view as xv

from tests.unit.controlplane.conftest import NOW, canary_release

NACK = model.Nack(node="strict", type_url="rds", version="v", message="too big", at=NOW)


def view_with(*lanes: xv.Lane, base: str = "v1") -> xv.RoutingView:
    return xv.RoutingView(services=(xv.ServiceRoute("checkout", base),), endpoints=(), lanes=lanes)


def test_a_held_release_serves_the_batch_its_proxies_accepted() -> None:
    held = canary_release(Phase.PAUSED, 1, last_nack=NACK, held_batch=0)
    assert views.served_lane(held) == views.lane_of(canary_release(batch=0))
    assert model.served_weight_of(held.spec, held.status) == 10
    assert model.weight_of(held.spec, held.status) == 50
    never = canary_release(Phase.PAUSED, 0, last_nack=NACK, held_batch=-1)
    assert views.served_lane(never) is None and model.served_weight_of(never.spec, never.status) == 0


def test_accepted_batch_finds_the_batch_a_proxy_carries() -> None:
    r = canary_release(batch=1)
    assert views.accepted_batch(r, view_with(views.lane_of(canary_release(batch=0)))) == 0
    assert views.accepted_batch(r, view_with()) == -1
    assert views.accepted_batch(r, None) == -1


def test_a_proxy_that_never_carries_the_target_is_lagging_then_gone_and_named() -> None:
    r = canary_release(batch=0)
    intended = view_with(views.lane_of(r))
    proxies = [
        views.ProxyFacts("good", intended, since=100.0),
        views.ProxyFacts("mute", None, since=100.0, problem="rejected it"),
    ]

    def at(now: float) -> views.Progress:
        groups = views.group_by_carried(proxies)
        return views.grouped_progress(
            r, intended=intended, effective=intended, groups=groups, target_since=100.0, now=now, stale_seconds=30
        )

    early = at(110.0)
    assert (early.proxies, early.converged, early.gone, early.reached) == (2, 1, 0, False)
    assert early.lagging == ("mute: rejected: rejected it",) and early.next_deadline == 130.0
    late = at(130.0)
    assert (late.proxies, late.converged, late.gone, late.reached) == (1, 1, 1, True)
    assert late.gone_names[0].startswith("mute")


def test_a_rollback_is_carried_once_its_lane_admits_nothing_and_a_promote_once_the_lane_is_gone() -> None:
    lane = views.lane_of(canary_release(batch=0))
    rolled = canary_release(Phase.ROLLED_BACK, 0)
    promoted = canary_release(Phase.SUCCEEDED, 0)
    assert views.followed(rolled) and not views.followed(replace(rolled, status=replace(rolled.status, reached=True)))
    drained = replace(lane, weight=0, rules=(), cohort=None)
    for r, carried_end in ((rolled, view_with(drained)), (promoted, view_with(base="v2"))):
        assert views.target_in(carried_end, r) == views.target_of(r)
        assert views.target_in(view_with(lane), r) != views.target_of(r)
    assert views.target_in(view_with(), rolled) != views.target_of(rolled)  # gone before drained: not yet
    assert views.fingerprint(views.target_of(rolled)) != "-"


def test_a_rolled_back_lane_drains_until_reached_then_goes() -> None:
    """Rolled back (or failed): the lane stays, admitting nothing (weight 0, no rules), so
    requests admitted before the entry stopped keep their lane on later hops; once every
    proxy carries that (`reached`) it goes. After a NACK it goes at once."""
    rule = (model.Condition(model.MatchKind.HEADER, "x-user", model.MatchOp.EXACT, "bob"),)
    for phase in (Phase.ROLLED_BACK, Phase.FAILED):
        r = canary_release(phase, 1)
        r = replace(r, spec=replace(r.spec, match=(rule,)))
        served = views.served_lane(r)
        assert served is not None
        assert (served.weight, served.rules, served.versions) == (0, (), views.lane_of(r).versions)
        done = replace(r, status=replace(r.status, reached=True))
        assert views.served_lane(done) is None
        nacked = replace(r, status=replace(r.status, last_nack=NACK))
        assert views.served_lane(nacked) is None
    assert views.served_lane(canary_release(Phase.SUCCEEDED, 1)) is None


def test_a_held_lane_is_served_as_accepted_after_the_spec_was_edited() -> None:
    bob = xv.Rule((xv.Condition(xv.MatchKind.HEADER, "x-user", xv.MatchOp.EXACT, "bob"),))
    accepted = replace(views.lane_of(canary_release(batch=0)), rules=(bob,))
    rule = (model.Condition(model.MatchKind.HEADER, "x-user", model.MatchOp.EXACT, "alice"),)
    edited = canary_release(Phase.PAUSED, 1, last_nack=NACK, held_batch=-1)
    edited = replace(edited, spec=replace(edited.spec, match=(rule,)))
    kept = views.held_lane_from(accepted)
    held = replace(edited, status=replace(edited.status, held_lane=kept))
    assert views.served_lane(held) == accepted  # not the edited rules, not "no lane"
    assert model.served_weight_of(held.spec, held.status) == 10
    assert model.release_from_proto(model.release_to_proto(held), revision=1).status.held_lane == kept


def test_a_draining_lane_name_is_refused_to_a_new_release_until_the_rollback_is_reached() -> None:
    from graylane.controlplane.domain.releases import check_against_registry
    from graylane.controlplane.errors import InvalidArgument
    from graylane.controlplane.store import Snapshot

    def snap(*releases: Release) -> Snapshot:
        return Snapshot(
            revision=1,
            services=(model.Service("checkout", "v1"),),
            versions=(model.Version("checkout", "v1"), model.Version("checkout", "v2")),
            releases=releases,
            by_name={r.name: r for r in releases},
        )

    rolled = canary_release(Phase.ROLLED_BACK, 1)
    spec = replace(rolled.spec)
    with pytest.raises(InvalidArgument) as refused:
        check_against_registry("next", spec, snap(rolled))
    assert refused.value.field == "spec.lane" and "draining" in str(refused.value)
    check_against_registry("next", spec, snap(replace(rolled, status=replace(rolled.status, reached=True))))
    check_against_registry("r", spec, snap(rolled))  # the release itself, restarted


def test_a_scoped_proxy_counts_only_for_releases_of_its_services() -> None:
    r = canary_release(batch=0)  # a release of checkout
    intended = view_with(views.lane_of(r))

    def at(*proxies: views.ProxyFacts) -> views.Progress:
        groups = views.group_by_carried(proxies)
        return views.grouped_progress(
            r, intended=intended, effective=intended, groups=groups, target_since=100.0, now=110.0, stale_seconds=30
        )

    elsewhere = views.ProxyFacts("web-only", None, since=100.0, scope=frozenset({"web"}))
    # Scoped to another service: it neither blocks the release nor is counted as serving it,
    # and a fleet of such proxies alone still reaches it.
    alone = at(elsewhere)
    assert (alone.proxies, alone.converged, alone.scoped_out, alone.reached) == (0, 0, 1, True)
    mixed = at(elsewhere, views.ProxyFacts("all", None, since=100.0))
    assert (mixed.proxies, mixed.converged, mixed.reached) == (1, 0, False)
    # Scoped to checkout: it must carry the release like any other proxy.
    mine = views.ProxyFacts("checkout-only", None, since=100.0, scope=frozenset({"checkout", "web"}))
    waiting = at(elsewhere, mine)
    assert (waiting.proxies, waiting.converged, waiting.reached) == (1, 0, False)
    carried = at(elsewhere, replace(mine, carried=intended))
    assert (carried.proxies, carried.converged, carried.reached) == (1, 1, True)
