"""The wire form of a RoutingView on the AgentService stream, and its content version.

Owns: converting `graylane.xds.view.RoutingView` to and from `graylane.v1.agent_pb2`
messages, and `view_version` (a hash of the serialised view, so equal views have equal
versions on every replica and agent). The control plane sends views in this form; the
agent applies them and stores the last good one on disk in it.

Must not import: etcd, graylane.controlplane.
"""

from __future__ import annotations

import hashlib

from graylane.v1 import agent_pb2 as apb
from graylane.v1 import release_pb2 as pb
from graylane.xds import view as xv

_KIND = {
    xv.MatchKind.HEADER: pb.HEADER,
    xv.MatchKind.COOKIE: pb.COOKIE,
    xv.MatchKind.QUERY: pb.QUERY,
    xv.MatchKind.PATH: pb.PATH,
}
_OP = {
    xv.MatchOp.EXACT: pb.EXACT,
    xv.MatchOp.PREFIX: pb.PREFIX,
    xv.MatchOp.REGEX: pb.REGEX,
    xv.MatchOp.PRESENT: pb.PRESENT,
}
_KIND_BACK = {v: k for k, v in _KIND.items()}
_OP_BACK = {v: k for k, v in _OP.items()}


class BadView(ValueError):
    """A view message that does not describe a routable view (never applied)."""


def view_to_proto(view: xv.RoutingView) -> apb.RoutingView:
    return apb.RoutingView(
        services=[apb.ViewService(name=s.name, base_version=s.base_version) for s in view.services],
        endpoints=[
            apb.ViewEndpoints(
                service=ve.service,
                version=ve.version,
                endpoints=[pb.Endpoint(address=e.address, port=e.port) for e in ve.endpoints],
                via_cluster=ve.via_cluster,
            )
            for ve in view.endpoints
        ],
        lanes=[_lane_to_proto(lane) for lane in view.lanes],
        staged=[_lane_to_proto(lane) for lane in view.staged],
    )


def _lane_to_proto(lane: xv.Lane) -> apb.ViewLane:
    message = apb.ViewLane(
        name=lane.name,
        entry=lane.entry,
        weight=lane.weight,
        versions=[pb.ServiceVersions(service=s, gray_version=v) for s, v in lane.versions],
        rules=[
            pb.MatchRule(
                conditions=[
                    pb.Condition(kind=_KIND[c.kind], name=c.name, op=_OP[c.op], value=c.value) for c in rule.conditions
                ]
            )
            for rule in lane.rules
        ],
    )
    if lane.cohort is not None:
        if lane.cohort.kind is xv.MatchKind.COOKIE:
            message.cohort.cookie = lane.cohort.name
        else:
            message.cohort.header = lane.cohort.name
    return message


def view_from_proto(message: apb.RoutingView) -> xv.RoutingView:
    """The view a message describes; raises BadView for an incomplete one."""
    try:
        return xv.RoutingView(
            services=tuple(xv.ServiceRoute(name=s.name, base_version=s.base_version) for s in message.services),
            endpoints=tuple(
                xv.VersionEndpoints(
                    service=ve.service,
                    version=ve.version,
                    endpoints=tuple(xv.Endpoint(e.address, e.port) for e in ve.endpoints),
                    via_cluster=ve.via_cluster,
                )
                for ve in message.endpoints
            ),
            lanes=tuple(_lane_from_proto(lane) for lane in message.lanes),
            staged=tuple(_lane_from_proto(lane) for lane in message.staged),
        )
    except KeyError as exc:
        raise BadView(f"unknown match kind or op {exc}") from exc


def _lane_from_proto(lane: apb.ViewLane) -> xv.Lane:
    cohort = None
    if lane.HasField("cohort"):
        if lane.cohort.cookie:
            cohort = xv.Cohort(kind=xv.MatchKind.COOKIE, name=lane.cohort.cookie)
        else:
            cohort = xv.Cohort(kind=xv.MatchKind.HEADER, name=lane.cohort.header)
    return xv.Lane(
        name=lane.name,
        entry=lane.entry,
        weight=lane.weight,
        versions=tuple((v.service, v.gray_version) for v in lane.versions),
        rules=tuple(
            xv.Rule(
                tuple(
                    xv.Condition(kind=_KIND_BACK[c.kind], name=c.name, op=_OP_BACK[c.op], value=c.value)
                    for c in rule.conditions
                )
            )
            for rule in lane.rules
        ),
        cohort=cohort,
    )


def view_version(message: apb.RoutingView) -> str:
    """A content hash of a view message (deterministic serialisation)."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()[:16]


def cluster_view(view: xv.RoutingView) -> apb.ClusterView:
    message = view_to_proto(view)
    return apb.ClusterView(version=view_version(message), view=message)
