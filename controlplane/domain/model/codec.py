"""The release API's codec: domain values to their protobuf messages (`release_to_proto`,
`event_to_proto`, ...), and a stored release back to its value (`release_from_proto`,
trusting what passed validation on the way in).

Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from graylane.controlplane.domain.model import values
from graylane.controlplane.domain.model.validation import WEBHOOK_KINDS, rules_from_proto, spec_from_proto
from graylane.controlplane.progression.analysis import AnalysisSpec
from graylane.v1 import release_pb2 as pb

_WEBHOOK_KIND_VALUES = {v: k for k, v in WEBHOOK_KINDS.items()}

# The fields a value and its message name alike and hold as they are, copied by `fields_of`;
# the others (times, enums, nested messages) are converted one by one.
_NACK_FIELDS = ("node", "type_url", "version", "message", "stream", "cluster")
_CONVERGENCE_FIELDS = ("proxies", "converged", "target_version", "lagging", "gone", "gone_names")
_EVENT_FIELDS = ("release", "sequence", "action", "actor", "reason", "from_batch", "to_batch", "weight")
_ANALYSIS_FIELDS = (
    "min_requests",
    "baseline",
    "alpha",
    "min_effect",
    "error_rate_margin",
    "failure_limit",
    "inconclusive_limit",
    "passes_to_advance",
)


def fields_of(value: object, names: Iterable[str]) -> dict[str, Any]:
    """`value`'s attributes `names`, as the keyword arguments of a message or a value that
    names them alike."""
    return {name: getattr(value, name) for name in names}


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _dt(ts: Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


def spec_to_proto(spec: values.ReleaseSpec) -> pb.ReleaseSpec:
    batches = []
    for b in spec.batches:
        if b.pause is None:
            pause = pb.Pause(manual=True)
        else:
            d = Duration()
            d.FromTimedelta(b.pause)
            pause = pb.Pause(duration=d)
        batches.append(pb.Batch(weight=b.weight, pause=pause))
    return pb.ReleaseSpec(
        lane=spec.lane,
        entry=spec.entry,
        services=[
            pb.ServiceVersions(service=s.service, base_version=s.base_version, gray_version=s.gray_version)
            for s in spec.services
        ],
        strategy=spec.strategy.value,
        match=_rules_to_proto(spec.match),
        batches=batches,
        placement=pb.Placement(gray_clusters=list(spec.gray_clusters)),
        cohort=_cohort_to_proto(spec.cohort),
        analysis=analysis_to_proto(spec.analysis),
    )


def _cohort_to_proto(cohort: values.Cohort | None) -> pb.Cohort | None:
    if cohort is None:
        return None
    if cohort.kind is values.MatchKind.HEADER:
        return pb.Cohort(header=cohort.name)
    return pb.Cohort(cookie=cohort.name)


def status_to_proto(release: values.Release) -> pb.ReleaseStatus:
    st = release.status
    nack = None
    if st.last_nack is not None:
        nack = pb.Nack(**fields_of(st.last_nack, _NACK_FIELDS), at=_ts(st.last_nack.at))
    return pb.ReleaseStatus(
        phase=st.phase.value,
        batch=st.batch,
        weight=release.weight(),
        reached=st.reached,
        reason=st.reason,
        convergence=pb.ProxyConvergence(**fields_of(st, _CONVERGENCE_FIELDS)),
        last_nack=nack,
        batch_started=_ts(st.batch_started),
        batch_reached=_ts(st.batch_reached),
        events=st.events,
        generation=st.generation,
        served_weight=values.served_weight_of(release.spec, st),
        held_batch=st.held_batch,
        held_lane=_held_lane_to_proto(st.held_lane) if values.held(st) else None,
    )


def _rules_to_proto(match: tuple[tuple[values.Condition, ...], ...]) -> list[pb.MatchRule]:
    return [
        pb.MatchRule(
            conditions=[pb.Condition(kind=c.kind.value, name=c.name, op=c.op.value, value=c.value) for c in rule]
        )
        for rule in match
    ]


def _held_lane_to_proto(lane: values.HeldLane | None) -> pb.HeldLane | None:
    if lane is None:
        return None
    return pb.HeldLane(
        entry=lane.entry,
        weight=lane.weight,
        match=_rules_to_proto(lane.match),
        services=[pb.ServiceVersions(service=s, gray_version=v) for s, v in lane.versions],
    )


def _held_lane_from_proto(msg: pb.HeldLane) -> values.HeldLane:
    return values.HeldLane(
        entry=msg.entry,
        weight=msg.weight,
        match=rules_from_proto(msg.match, stored=True),
        versions=tuple(sorted((s.service, s.gray_version) for s in msg.services)),
    )


def release_to_proto(release: values.Release) -> pb.Release:
    return pb.Release(
        name=release.name,
        spec=spec_to_proto(release.spec),
        status=status_to_proto(release),
        revision=release.revision,
        created=_ts(release.created),
    )


def release_from_proto(msg: pb.Release, *, revision: int) -> values.Release:
    """Rebuild a stored release. Stored specs were validated on the way in."""
    st = msg.status
    nack = None
    if st.HasField("last_nack"):
        nack = values.Nack(**fields_of(st.last_nack, _NACK_FIELDS), at=st.last_nack.at.ToDatetime(tzinfo=UTC))
    status = values.ReleaseStatus(
        phase=values.Phase(st.phase),
        batch=st.batch,
        reason=st.reason,
        reached=st.reached,
        proxies=st.convergence.proxies,
        converged=st.convergence.converged,
        target_version=st.convergence.target_version,
        last_nack=nack,
        batch_started=_dt(st.batch_started, st.HasField("batch_started")),
        batch_reached=_dt(st.batch_reached, st.HasField("batch_reached")),
        events=st.events,
        generation=st.generation,
        lagging=tuple(st.convergence.lagging),
        gone=st.convergence.gone,
        gone_names=tuple(st.convergence.gone_names),
        held_batch=st.held_batch if st.HasField("held_batch") else None,
        held_lane=_held_lane_from_proto(st.held_lane) if st.HasField("held_lane") else None,
    )
    return values.Release(
        name=msg.name,
        spec=spec_from_proto(msg.spec, stored=True),
        status=status,
        created=msg.created.ToDatetime(tzinfo=UTC),
        revision=revision,
    )


def event_to_proto(e: values.Event) -> pb.Event:
    return pb.Event(
        **fields_of(e, _EVENT_FIELDS),
        at=_ts(e.at),
        from_phase=e.from_phase.value,
        to_phase=e.to_phase.value,
        details=dict(e.details),
    )


def service_to_proto(s: values.Service) -> pb.Service:
    return pb.Service(name=s.name, stable_version=s.stable_version, description=s.description)


def version_to_proto(v: values.Version) -> pb.Version:
    return pb.Version(
        service=v.service,
        name=v.name,
        metadata=pb.VersionMetadata(
            image=v.image,
            author=v.author,
            created=_ts(v.created),
            change_summary=v.change_summary,
        ),
        endpoints=[pb.Endpoint(address=e.address, port=e.port, cluster=e.cluster) for e in v.endpoints],
    )


def analysis_to_proto(a: AnalysisSpec | None) -> pb.Analysis | None:
    if a is None:
        return None
    message = pb.Analysis(**fields_of(a, _ANALYSIS_FIELDS), on_inconclusive=a.on_inconclusive.value)
    message.interval.FromTimedelta(timedelta(seconds=a.interval_s))
    if a.max_error_rate is not None:
        message.max_error_rate = a.max_error_rate
    if a.max_p99_ms is not None:
        message.max_p99_ms = a.max_p99_ms
    for h in a.webhooks:
        hook = message.webhooks.add(name=h.name, kind=_WEBHOOK_KIND_VALUES[h.kind], url=h.url, retries=h.retries)
        hook.timeout.FromTimedelta(timedelta(seconds=h.timeout_s))
    return message
