"""The release domain's values: frozen dataclasses and enums the control plane works on
(`ReleaseSpec`, `ReleaseStatus`, `Release`, `Event`, `Service`, `Version`, the agents'
`ClusterInfo` and `ClusterEndpoints`), and the pure functions of them (the weight a
release asks for and the one its proxies are served). Built only by
`graylane.controlplane.domain.model.validation` and the codecs, so inside the control plane they
are trusted.

Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from graylane.controlplane.progression.analysis import AnalysisSpec
from graylane.v1 import release_pb2 as pb


class Phase(enum.Enum):
    PENDING = pb.PENDING
    PROGRESSING = pb.PROGRESSING
    PAUSED = pb.PAUSED
    SUCCEEDED = pb.SUCCEEDED
    ROLLED_BACK = pb.ROLLED_BACK
    FAILED = pb.FAILED

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.FAILED)

    @property
    def routes_lane(self) -> bool:
        """Whether a release in this phase has a live lane in the routing view."""
        return self in (Phase.PROGRESSING, Phase.PAUSED)


class Strategy(enum.Enum):
    CANARY = pb.CANARY
    BLUE_GREEN = pb.BLUE_GREEN
    AB = pb.AB


class MatchKind(enum.Enum):
    HEADER = pb.HEADER
    COOKIE = pb.COOKIE
    QUERY = pb.QUERY
    PATH = pb.PATH


class MatchOp(enum.Enum):
    EXACT = pb.EXACT
    PREFIX = pb.PREFIX
    REGEX = pb.REGEX
    PRESENT = pb.PRESENT


@dataclass(frozen=True, slots=True)
class Condition:
    kind: MatchKind
    name: str
    op: MatchOp
    value: str


@dataclass(frozen=True, slots=True)
class Batch:
    weight: int
    pause: timedelta | None  # None: wait for a manual `next`


@dataclass(frozen=True, slots=True)
class ServiceVersions:
    service: str
    base_version: str
    gray_version: str


@dataclass(frozen=True, slots=True)
class Cohort:
    """The key whose consistent hash makes the batch decision sticky (HEADER or COOKIE)."""

    kind: MatchKind
    name: str


@dataclass(frozen=True, slots=True)
class ReleaseSpec:
    lane: str
    entry: str
    services: tuple[ServiceVersions, ...]
    strategy: Strategy
    match: tuple[tuple[Condition, ...], ...]
    batches: tuple[Batch, ...]
    gray_clusters: tuple[str, ...] = ()
    cohort: Cohort | None = None
    analysis: AnalysisSpec | None = None


@dataclass(frozen=True, slots=True)
class Nack:
    node: str
    type_url: str
    version: str
    message: str
    at: datetime
    stream: str = ""  # the xDS stream (one proxy) that sent it
    cluster: str = ""  # the proxy's Envoy cluster


@dataclass(frozen=True, slots=True)
class HeldLane:
    """A release's lane as proxies accepted it (kept while a NACK holds the release, so a
    rejected edit of the spec falls back to it rather than to no lane)."""

    entry: str
    weight: int
    match: tuple[tuple[Condition, ...], ...]
    versions: tuple[tuple[str, str], ...]  # (service, gray version), sorted


@dataclass(frozen=True, slots=True)
class ReleaseStatus:
    phase: Phase = Phase.PENDING
    batch: int = -1
    reason: str = ""
    reached: bool = False
    proxies: int = 0
    converged: int = 0
    target_version: str = ""  # digest of this release's own target (not a global version)
    last_nack: Nack | None = None
    batch_started: datetime | None = None
    batch_reached: datetime | None = None
    events: int = 0
    generation: int = 1
    lagging: tuple[str, ...] = ()  # first few proxies not carrying the target, with why
    gone: int = 0  # proxies declared gone by the stale-proxy rule (not in `proxies`)
    gone_names: tuple[str, ...] = ()
    # While a NACK holds the release (PAUSED with last_nack): the batch its proxies keep
    # being served, -1 for none (no lane). Meaningless otherwise.
    held_batch: int | None = None
    # While held: the lane its proxies accepted (None: none, or held before this was kept).
    held_lane: HeldLane | None = None


@dataclass(frozen=True, slots=True)
class Release:
    name: str
    spec: ReleaseSpec
    status: ReleaseStatus
    created: datetime
    revision: int = 0  # etcd mod_revision it was read at; 0 for a value not yet stored

    def weight(self) -> int:
        """The gray share the current phase and batch ask for."""
        return weight_of(self.spec, self.status)


def weight_of(spec: ReleaseSpec, status: ReleaseStatus) -> int:
    if status.phase is Phase.SUCCEEDED:
        return 100
    if not status.phase.routes_lane or status.batch < 0:
        return 0
    return spec.batches[status.batch].weight


def held(status: ReleaseStatus) -> bool:
    """A NACK holds the release at what its proxies last accepted (until resumed)."""
    return status.phase is Phase.PAUSED and status.last_nack is not None and status.held_batch is not None


def draining(status: ReleaseStatus) -> bool:
    """A rolled-back (or failed) release whose proxies do not all carry that yet.

    Its lane stays in the routing view, admitting nothing (weight 0, no rules), so a request
    the entry admitted before it stopped keeps its lane on the later hops instead of
    falling to base half-way (Envoys of one chain apply a change at different instants).
    The lane goes once every proxy carries the drained lane (`reached`). A rollback that
    follows a NACK drains nothing: the lane goes at once, as the rejecting proxy has it.
    """
    return status.phase in (Phase.ROLLED_BACK, Phase.FAILED) and not status.reached and status.last_nack is None


def served_weight_of(spec: ReleaseSpec, status: ReleaseStatus) -> int:
    """The weight proxies are served: the asked weight, or the held lane's under a NACK."""
    if held(status):
        if status.held_lane is not None:
            return status.held_lane.weight
        batch = status.held_batch if status.held_batch is not None else -1
        return spec.batches[batch].weight if 0 <= batch < len(spec.batches) else 0
    return weight_of(spec, status)


@dataclass(frozen=True, slots=True)
class Event:
    release: str
    sequence: int
    at: datetime
    action: str
    actor: str
    reason: str
    from_phase: Phase
    to_phase: Phase
    from_batch: int
    to_batch: int
    weight: int
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    stable_version: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    cluster: str = ""


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """A cluster as its agent announced it: where other clusters reach its services."""

    name: str
    gateway_host: str
    gateway_port: int
    agent_id: str
    agent_version: str = ""


@dataclass(frozen=True, slots=True)
class ClusterEndpoints:
    """The endpoints one agent reports for one version in its cluster."""

    service: str
    version: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Version:
    service: str
    name: str
    image: str = ""
    author: str = ""
    created: datetime | None = None
    change_summary: str = ""
    endpoints: tuple[Endpoint, ...] = ()
