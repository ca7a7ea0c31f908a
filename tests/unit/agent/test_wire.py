"""RoutingView <-> AgentService messages, and the content version (agent/wire.py)."""

from __future__ import annotations

import dataclasses

import pytest
from graylane.agent.wire import BadView, cluster_view, view_from_proto, view_to_proto, view_version
from graylane.v1 import release_pb2 as pb
from graylane.xds import view as xv

Kind, Op = xv.MatchKind, xv.MatchOp

VIEW = xv.RoutingView(
    services=(xv.ServiceRoute("cart", "v3"), xv.ServiceRoute("checkout", "v1")),
    endpoints=(
        xv.VersionEndpoints("cart", "v3", (xv.Endpoint("10.0.0.1", 80), xv.Endpoint("cart.internal", 8080))),
        xv.VersionEndpoints("checkout", "v1", (xv.Endpoint("::1", 8081),)),
        xv.VersionEndpoints("checkout", "v2", (xv.Endpoint("127.0.0.1", 9443),), via_cluster="west"),
        xv.VersionEndpoints("checkout", "v9", ()),
    ),
    lanes=(
        xv.Lane(
            name="gray",
            entry="checkout",
            weight=30,
            versions=(("cart", "v4"), ("checkout", "v2")),
            rules=(
                xv.Rule((xv.Condition(Kind.HEADER, "x-canary", Op.EXACT, "always"),)),
                xv.Rule(
                    (
                        xv.Condition(Kind.COOKIE, "user", Op.PREFIX, "beta-"),
                        xv.Condition(Kind.QUERY, "debug", Op.PRESENT),
                        xv.Condition(Kind.PATH, "", Op.REGEX, "/api/v[0-9]+/.*"),
                    )
                ),
            ),
            cohort=xv.Cohort(Kind.COOKIE, "session"),
        ),
        xv.Lane(name="blue", entry="cart", weight=0, versions=(), cohort=xv.Cohort(Kind.HEADER, "x-user")),
    ),
    staged=(xv.Lane(name="next", entry="cart", weight=0, versions=(("cart", "v5"),)),),
)


def test_round_trip_is_exact() -> None:
    assert view_from_proto(view_to_proto(VIEW)) == VIEW
    message = cluster_view(VIEW)
    assert view_from_proto(message.view) == VIEW


def test_staged_lanes_travel_and_change_the_version() -> None:
    # A release created (not started) stages its clusters at the agents' Envoys as well.
    assert view_from_proto(view_to_proto(VIEW)).staged == VIEW.staged
    unstaged = dataclasses.replace(VIEW, staged=())
    assert view_from_proto(view_to_proto(unstaged)).staged == ()
    assert cluster_view(unstaged).version != cluster_view(VIEW).version


def test_every_match_kind_and_op_survives() -> None:
    for kind in Kind:
        for op in Op:
            lane = xv.Lane("l", "cart", 0, (), rules=(xv.Rule((xv.Condition(kind, "n", op, "v"),)),))
            view = dataclasses.replace(VIEW, lanes=(lane,))
            assert view_from_proto(view_to_proto(view)) == view, (kind, op)


def test_version_is_a_content_hash() -> None:
    again = cluster_view(dataclasses.replace(VIEW))
    assert cluster_view(VIEW).version == again.version == view_version(view_to_proto(VIEW))
    moved = dataclasses.replace(VIEW, lanes=(dataclasses.replace(VIEW.lanes[0], weight=31), VIEW.lanes[1]))
    assert cluster_view(moved).version != again.version
    south = dataclasses.replace(VIEW.endpoints[2], via_cluster="south")
    elsewhere = dataclasses.replace(VIEW, endpoints=(*VIEW.endpoints[:2], south, VIEW.endpoints[3]))
    assert cluster_view(elsewhere).version != again.version


def test_unknown_enum_values_are_a_bad_view() -> None:
    message = view_to_proto(VIEW)
    message.lanes[0].rules[0].conditions[0].kind = 99  # a newer control plane's match kind
    with pytest.raises(BadView):
        view_from_proto(message)
    message = view_to_proto(VIEW)
    message.lanes[0].rules[0].conditions[0].op = pb.MATCH_OP_UNSPECIFIED
    with pytest.raises(BadView):
        view_from_proto(message)
