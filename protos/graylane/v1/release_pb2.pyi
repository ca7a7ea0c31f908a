import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    CANARY: _ClassVar[Strategy]
    BLUE_GREEN: _ClassVar[Strategy]
    AB: _ClassVar[Strategy]

class MatchKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MATCH_KIND_UNSPECIFIED: _ClassVar[MatchKind]
    HEADER: _ClassVar[MatchKind]
    COOKIE: _ClassVar[MatchKind]
    QUERY: _ClassVar[MatchKind]
    PATH: _ClassVar[MatchKind]

class MatchOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MATCH_OP_UNSPECIFIED: _ClassVar[MatchOp]
    EXACT: _ClassVar[MatchOp]
    PREFIX: _ClassVar[MatchOp]
    REGEX: _ClassVar[MatchOp]
    PRESENT: _ClassVar[MatchOp]

class WebhookKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEBHOOK_KIND_UNSPECIFIED: _ClassVar[WebhookKind]
    PRE_ROLLOUT: _ClassVar[WebhookKind]
    CONFIRM_BATCH: _ClassVar[WebhookKind]
    POST_ROLLOUT: _ClassVar[WebhookKind]
    ROLLBACK: _ClassVar[WebhookKind]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PENDING: _ClassVar[Phase]
    PROGRESSING: _ClassVar[Phase]
    PAUSED: _ClassVar[Phase]
    SUCCEEDED: _ClassVar[Phase]
    ROLLED_BACK: _ClassVar[Phase]
    FAILED: _ClassVar[Phase]
STRATEGY_UNSPECIFIED: Strategy
CANARY: Strategy
BLUE_GREEN: Strategy
AB: Strategy
MATCH_KIND_UNSPECIFIED: MatchKind
HEADER: MatchKind
COOKIE: MatchKind
QUERY: MatchKind
PATH: MatchKind
MATCH_OP_UNSPECIFIED: MatchOp
EXACT: MatchOp
PREFIX: MatchOp
REGEX: MatchOp
PRESENT: MatchOp
WEBHOOK_KIND_UNSPECIFIED: WebhookKind
PRE_ROLLOUT: WebhookKind
CONFIRM_BATCH: WebhookKind
POST_ROLLOUT: WebhookKind
ROLLBACK: WebhookKind
PHASE_UNSPECIFIED: Phase
PENDING: Phase
PROGRESSING: Phase
PAUSED: Phase
SUCCEEDED: Phase
ROLLED_BACK: Phase
FAILED: Phase

class Service(_message.Message):
    __slots__ = ("name", "stable_version", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    stable_version: str
    description: str
    def __init__(self, name: _Optional[str] = ..., stable_version: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "port", "cluster")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    cluster: str
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., cluster: _Optional[str] = ...) -> None: ...

class VersionMetadata(_message.Message):
    __slots__ = ("image", "author", "created", "change_summary")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CHANGE_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    image: str
    author: str
    created: _timestamp_pb2.Timestamp
    change_summary: str
    def __init__(self, image: _Optional[str] = ..., author: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., change_summary: _Optional[str] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("service", "name", "metadata", "endpoints")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    name: str
    metadata: VersionMetadata
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, service: _Optional[str] = ..., name: _Optional[str] = ..., metadata: _Optional[_Union[VersionMetadata, _Mapping]] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("kind", "name", "op", "value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: MatchKind
    name: str
    op: MatchOp
    value: str
    def __init__(self, kind: _Optional[_Union[MatchKind, str]] = ..., name: _Optional[str] = ..., op: _Optional[_Union[MatchOp, str]] = ..., value: _Optional[str] = ...) -> None: ...

class MatchRule(_message.Message):
    __slots__ = ("conditions",)
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class Pause(_message.Message):
    __slots__ = ("manual", "duration")
    MANUAL_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    manual: bool
    duration: _duration_pb2.Duration
    def __init__(self, manual: _Optional[bool] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("weight", "pause")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    weight: int
    pause: Pause
    def __init__(self, weight: _Optional[int] = ..., pause: _Optional[_Union[Pause, _Mapping]] = ...) -> None: ...

class Webhook(_message.Message):
    __slots__ = ("name", "kind", "url", "timeout", "retries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: WebhookKind
    url: str
    timeout: _duration_pb2.Duration
    retries: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[WebhookKind, str]] = ..., url: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retries: _Optional[int] = ...) -> None: ...

class Analysis(_message.Message):
    __slots__ = ("interval", "min_requests", "max_error_rate", "max_p99_ms", "baseline", "alpha", "min_effect", "error_rate_margin", "failure_limit", "inconclusive_limit", "on_inconclusive", "passes_to_advance", "webhooks")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_MS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    MIN_EFFECT_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_MARGIN_FIELD_NUMBER: _ClassVar[int]
    FAILURE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCONCLUSIVE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    ON_INCONCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    PASSES_TO_ADVANCE_FIELD_NUMBER: _ClassVar[int]
    WEBHOOKS_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    min_requests: int
    max_error_rate: float
    max_p99_ms: float
    baseline: bool
    alpha: float
    min_effect: float
    error_rate_margin: float
    failure_limit: int
    inconclusive_limit: int
    on_inconclusive: str
    passes_to_advance: int
    webhooks: _containers.RepeatedCompositeFieldContainer[Webhook]
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., min_requests: _Optional[int] = ..., max_error_rate: _Optional[float] = ..., max_p99_ms: _Optional[float] = ..., baseline: _Optional[bool] = ..., alpha: _Optional[float] = ..., min_effect: _Optional[float] = ..., error_rate_margin: _Optional[float] = ..., failure_limit: _Optional[int] = ..., inconclusive_limit: _Optional[int] = ..., on_inconclusive: _Optional[str] = ..., passes_to_advance: _Optional[int] = ..., webhooks: _Optional[_Iterable[_Union[Webhook, _Mapping]]] = ...) -> None: ...

class ServiceVersions(_message.Message):
    __slots__ = ("service", "base_version", "gray_version")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRAY_VERSION_FIELD_NUMBER: _ClassVar[int]
    service: str
    base_version: str
    gray_version: str
    def __init__(self, service: _Optional[str] = ..., base_version: _Optional[str] = ..., gray_version: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("gray_clusters",)
    GRAY_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    gray_clusters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, gray_clusters: _Optional[_Iterable[str]] = ...) -> None: ...

class Cohort(_message.Message):
    __slots__ = ("header", "cookie")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    COOKIE_FIELD_NUMBER: _ClassVar[int]
    header: str
    cookie: str
    def __init__(self, header: _Optional[str] = ..., cookie: _Optional[str] = ...) -> None: ...

class ReleaseSpec(_message.Message):
    __slots__ = ("lane", "entry", "services", "strategy", "match", "batches", "placement", "cohort", "analysis")
    LANE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    lane: str
    entry: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceVersions]
    strategy: Strategy
    match: _containers.RepeatedCompositeFieldContainer[MatchRule]
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    placement: Placement
    cohort: Cohort
    analysis: Analysis
    def __init__(self, lane: _Optional[str] = ..., entry: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceVersions, _Mapping]]] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., match: _Optional[_Iterable[_Union[MatchRule, _Mapping]]] = ..., batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., cohort: _Optional[_Union[Cohort, _Mapping]] = ..., analysis: _Optional[_Union[Analysis, _Mapping]] = ...) -> None: ...

class ProxyConvergence(_message.Message):
    __slots__ = ("proxies", "converged", "target_version", "lagging", "gone", "gone_names")
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAGGING_FIELD_NUMBER: _ClassVar[int]
    GONE_FIELD_NUMBER: _ClassVar[int]
    GONE_NAMES_FIELD_NUMBER: _ClassVar[int]
    proxies: int
    converged: int
    target_version: str
    lagging: _containers.RepeatedScalarFieldContainer[str]
    gone: int
    gone_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, proxies: _Optional[int] = ..., converged: _Optional[int] = ..., target_version: _Optional[str] = ..., lagging: _Optional[_Iterable[str]] = ..., gone: _Optional[int] = ..., gone_names: _Optional[_Iterable[str]] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("node", "type_url", "version", "message", "at", "stream", "cluster")
    NODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    node: str
    type_url: str
    version: str
    message: str
    at: _timestamp_pb2.Timestamp
    stream: str
    cluster: str
    def __init__(self, node: _Optional[str] = ..., type_url: _Optional[str] = ..., version: _Optional[str] = ..., message: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stream: _Optional[str] = ..., cluster: _Optional[str] = ...) -> None: ...

class ReleaseStatus(_message.Message):
    __slots__ = ("phase", "batch", "weight", "reached", "reason", "convergence", "last_nack", "batch_started", "batch_reached", "events", "generation", "served_weight", "held_batch", "held_lane")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REACHED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONVERGENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_FIELD_NUMBER: _ClassVar[int]
    BATCH_STARTED_FIELD_NUMBER: _ClassVar[int]
    BATCH_REACHED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SERVED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HELD_BATCH_FIELD_NUMBER: _ClassVar[int]
    HELD_LANE_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    batch: int
    weight: int
    reached: bool
    reason: str
    convergence: ProxyConvergence
    last_nack: Nack
    batch_started: _timestamp_pb2.Timestamp
    batch_reached: _timestamp_pb2.Timestamp
    events: int
    generation: int
    served_weight: int
    held_batch: int
    held_lane: HeldLane
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., batch: _Optional[int] = ..., weight: _Optional[int] = ..., reached: _Optional[bool] = ..., reason: _Optional[str] = ..., convergence: _Optional[_Union[ProxyConvergence, _Mapping]] = ..., last_nack: _Optional[_Union[Nack, _Mapping]] = ..., batch_started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., batch_reached: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., events: _Optional[int] = ..., generation: _Optional[int] = ..., served_weight: _Optional[int] = ..., held_batch: _Optional[int] = ..., held_lane: _Optional[_Union[HeldLane, _Mapping]] = ...) -> None: ...

class HeldLane(_message.Message):
    __slots__ = ("entry", "weight", "match", "services")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    entry: str
    weight: int
    match: _containers.RepeatedCompositeFieldContainer[MatchRule]
    services: _containers.RepeatedCompositeFieldContainer[ServiceVersions]
    def __init__(self, entry: _Optional[str] = ..., weight: _Optional[int] = ..., match: _Optional[_Iterable[_Union[MatchRule, _Mapping]]] = ..., services: _Optional[_Iterable[_Union[ServiceVersions, _Mapping]]] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("name", "spec", "status", "revision", "created")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: ReleaseSpec
    status: ReleaseStatus
    revision: int
    created: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[ReleaseSpec, _Mapping]] = ..., status: _Optional[_Union[ReleaseStatus, _Mapping]] = ..., revision: _Optional[int] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("release", "sequence", "at", "action", "actor", "reason", "from_phase", "to_phase", "from_batch", "to_batch", "weight", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FROM_PHASE_FIELD_NUMBER: _ClassVar[int]
    TO_PHASE_FIELD_NUMBER: _ClassVar[int]
    FROM_BATCH_FIELD_NUMBER: _ClassVar[int]
    TO_BATCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    release: str
    sequence: int
    at: _timestamp_pb2.Timestamp
    action: str
    actor: str
    reason: str
    from_phase: Phase
    to_phase: Phase
    from_batch: int
    to_batch: int
    weight: int
    details: _containers.ScalarMap[str, str]
    def __init__(self, release: _Optional[str] = ..., sequence: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., action: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., from_phase: _Optional[_Union[Phase, str]] = ..., to_phase: _Optional[_Union[Phase, str]] = ..., from_batch: _Optional[int] = ..., to_batch: _Optional[int] = ..., weight: _Optional[int] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...
