import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from graylane.v1 import release_pb2 as _release_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateReleaseRequest(_message.Message):
    __slots__ = ("name", "spec", "actor", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: _release_pb2.ReleaseSpec
    actor: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[_release_pb2.ReleaseSpec, _Mapping]] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ApplyReleaseRequest(_message.Message):
    __slots__ = ("name", "spec", "actor", "reason", "restart")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: _release_pb2.ReleaseSpec
    actor: str
    reason: str
    restart: bool
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[_release_pb2.ReleaseSpec, _Mapping]] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., restart: _Optional[bool] = ...) -> None: ...

class GetReleaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListReleasesResponse(_message.Message):
    __slots__ = ("releases",)
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[_release_pb2.Release]
    def __init__(self, releases: _Optional[_Iterable[_Union[_release_pb2.Release, _Mapping]]] = ...) -> None: ...

class DeleteReleaseRequest(_message.Message):
    __slots__ = ("name", "actor", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    actor: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActionRequest(_message.Message):
    __slots__ = ("name", "actor", "reason", "expected_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    actor: str
    reason: str
    expected_revision: int
    def __init__(self, name: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_release_pb2.Event]
    def __init__(self, events: _Optional[_Iterable[_Union[_release_pb2.Event, _Mapping]]] = ...) -> None: ...

class PutServiceRequest(_message.Message):
    __slots__ = ("service", "move_stable")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MOVE_STABLE_FIELD_NUMBER: _ClassVar[int]
    service: _release_pb2.Service
    move_stable: bool
    def __init__(self, service: _Optional[_Union[_release_pb2.Service, _Mapping]] = ..., move_stable: _Optional[bool] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[_release_pb2.Service]
    def __init__(self, services: _Optional[_Iterable[_Union[_release_pb2.Service, _Mapping]]] = ...) -> None: ...

class PutVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: _release_pb2.Version
    def __init__(self, version: _Optional[_Union[_release_pb2.Version, _Mapping]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_release_pb2.Version]
    def __init__(self, versions: _Optional[_Iterable[_Union[_release_pb2.Version, _Mapping]]] = ...) -> None: ...

class ListClustersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterVersion(_message.Message):
    __slots__ = ("service", "version", "endpoints")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    endpoints: int
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., endpoints: _Optional[int] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("name", "connected", "gateway_address", "agent_id", "agent_version", "versions", "proxies")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    connected: bool
    gateway_address: str
    agent_id: str
    agent_version: str
    versions: _containers.RepeatedCompositeFieldContainer[ClusterVersion]
    proxies: int
    def __init__(self, name: _Optional[str] = ..., connected: _Optional[bool] = ..., gateway_address: _Optional[str] = ..., agent_id: _Optional[str] = ..., agent_version: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ClusterVersion, _Mapping]]] = ..., proxies: _Optional[int] = ...) -> None: ...

class ListClustersResponse(_message.Message):
    __slots__ = ("clusters",)
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterStatus]
    def __init__(self, clusters: _Optional[_Iterable[_Union[ClusterStatus, _Mapping]]] = ...) -> None: ...

class ForgetClusterRequest(_message.Message):
    __slots__ = ("name", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    actor: str
    def __init__(self, name: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class ForgetClusterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrafficRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TrafficCount(_message.Message):
    __slots__ = ("service", "version", "lane", "requests", "responses_2xx", "responses_4xx", "responses_5xx", "failures")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_2XX_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_4XX_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_5XX_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    lane: str
    requests: int
    responses_2xx: int
    responses_4xx: int
    responses_5xx: int
    failures: int
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., lane: _Optional[str] = ..., requests: _Optional[int] = ..., responses_2xx: _Optional[int] = ..., responses_4xx: _Optional[int] = ..., responses_5xx: _Optional[int] = ..., failures: _Optional[int] = ...) -> None: ...

class GetTrafficResponse(_message.Message):
    __slots__ = ("counts", "proxies", "unreachable", "replicas", "oldest", "note")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedCompositeFieldContainer[TrafficCount]
    proxies: int
    unreachable: _containers.RepeatedScalarFieldContainer[str]
    replicas: int
    oldest: _duration_pb2.Duration
    note: str
    def __init__(self, counts: _Optional[_Iterable[_Union[TrafficCount, _Mapping]]] = ..., proxies: _Optional[int] = ..., unreachable: _Optional[_Iterable[str]] = ..., replicas: _Optional[int] = ..., oldest: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("name", "window", "every")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    name: str
    window: _duration_pb2.Duration
    every: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., every: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SeriesWindow(_message.Message):
    __slots__ = ("service", "version", "lane", "cluster", "requests", "errors", "error_rate", "throughput_rps", "p50_ms", "p90_ms", "p99_ms", "bucket_bounds_ms", "bucket_counts", "traffic_share")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_RPS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P90_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BOUNDS_MS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SHARE_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    lane: str
    cluster: str
    requests: int
    errors: int
    error_rate: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    bucket_bounds_ms: _containers.RepeatedScalarFieldContainer[float]
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    traffic_share: float
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., lane: _Optional[str] = ..., cluster: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., throughput_rps: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p90_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., bucket_bounds_ms: _Optional[_Iterable[float]] = ..., bucket_counts: _Optional[_Iterable[int]] = ..., traffic_share: _Optional[float] = ...) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("since", "until", "series", "leader")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    series: _containers.RepeatedCompositeFieldContainer[SeriesWindow]
    leader: bool
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., series: _Optional[_Iterable[_Union[SeriesWindow, _Mapping]]] = ..., leader: _Optional[bool] = ...) -> None: ...

class ListTombstonesRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Tombstone(_message.Message):
    __slots__ = ("release", "generation", "deleted_at", "deleted_by", "reason", "events", "phase", "release_at_delete")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DELETED_AT_FIELD_NUMBER: _ClassVar[int]
    DELETED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_AT_DELETE_FIELD_NUMBER: _ClassVar[int]
    release: str
    generation: int
    deleted_at: str
    deleted_by: str
    reason: str
    events: int
    phase: str
    release_at_delete: _release_pb2.Release
    def __init__(self, release: _Optional[str] = ..., generation: _Optional[int] = ..., deleted_at: _Optional[str] = ..., deleted_by: _Optional[str] = ..., reason: _Optional[str] = ..., events: _Optional[int] = ..., phase: _Optional[str] = ..., release_at_delete: _Optional[_Union[_release_pb2.Release, _Mapping]] = ...) -> None: ...

class ListTombstonesResponse(_message.Message):
    __slots__ = ("tombstones",)
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    tombstones: _containers.RepeatedCompositeFieldContainer[Tombstone]
    def __init__(self, tombstones: _Optional[_Iterable[_Union[Tombstone, _Mapping]]] = ...) -> None: ...

class TombstoneHistoryRequest(_message.Message):
    __slots__ = ("name", "generation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    generation: int
    def __init__(self, name: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "name", "role", "services", "releases", "cluster", "subject", "created_at", "created_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    role: str
    services: _containers.RepeatedScalarFieldContainer[str]
    releases: _containers.RepeatedScalarFieldContainer[str]
    cluster: str
    subject: str
    created_at: str
    created_by: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., role: _Optional[str] = ..., services: _Optional[_Iterable[str]] = ..., releases: _Optional[_Iterable[str]] = ..., cluster: _Optional[str] = ..., subject: _Optional[str] = ..., created_at: _Optional[str] = ..., created_by: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("name", "role", "services", "releases", "cluster", "subject")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    services: _containers.RepeatedScalarFieldContainer[str]
    releases: _containers.RepeatedScalarFieldContainer[str]
    cluster: str
    subject: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., services: _Optional[_Iterable[str]] = ..., releases: _Optional[_Iterable[str]] = ..., cluster: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "secret")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    token: Token
    secret: str
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
