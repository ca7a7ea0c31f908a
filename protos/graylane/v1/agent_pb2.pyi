import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from graylane.v1 import release_pb2 as _release_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentHello(_message.Message):
    __slots__ = ("cluster", "gateway_address", "agent_version", "agent_id")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    gateway_address: str
    agent_version: str
    agent_id: str
    def __init__(self, cluster: _Optional[str] = ..., gateway_address: _Optional[str] = ..., agent_version: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class VersionEndpoints(_message.Message):
    __slots__ = ("service", "version", "endpoints")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    endpoints: _containers.RepeatedCompositeFieldContainer[_release_pb2.Endpoint]
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[_release_pb2.Endpoint, _Mapping]]] = ...) -> None: ...

class EndpointSnapshot(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionEndpoints]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionEndpoints, _Mapping]]] = ...) -> None: ...

class ProxyState(_message.Message):
    __slots__ = ("node_id", "view_version", "last_nack", "nacked_view_version", "scope")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_FIELD_NUMBER: _ClassVar[int]
    NACKED_VIEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    view_version: str
    last_nack: _release_pb2.Nack
    nacked_view_version: str
    scope: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., view_version: _Optional[str] = ..., last_nack: _Optional[_Union[_release_pb2.Nack, _Mapping]] = ..., nacked_view_version: _Optional[str] = ..., scope: _Optional[_Iterable[str]] = ...) -> None: ...

class ProxyReport(_message.Message):
    __slots__ = ("proxies",)
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    proxies: _containers.RepeatedCompositeFieldContainer[ProxyState]
    def __init__(self, proxies: _Optional[_Iterable[_Union[ProxyState, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuardReport(_message.Message):
    __slots__ = ("lanes", "reason", "at")
    LANES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    lanes: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, lanes: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SeriesDelta(_message.Message):
    __slots__ = ("service", "version", "lane", "requests", "errors", "bucket_bounds_ms", "bucket_counts")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BOUNDS_MS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    lane: str
    requests: int
    errors: int
    bucket_bounds_ms: _containers.RepeatedScalarFieldContainer[float]
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., lane: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., bucket_bounds_ms: _Optional[_Iterable[float]] = ..., bucket_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("at", "interval_seconds", "series")
    AT_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    interval_seconds: float
    series: _containers.RepeatedCompositeFieldContainer[SeriesDelta]
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., interval_seconds: _Optional[float] = ..., series: _Optional[_Iterable[_Union[SeriesDelta, _Mapping]]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "endpoints", "proxies", "heartbeat", "guard", "metrics")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    endpoints: EndpointSnapshot
    proxies: ProxyReport
    heartbeat: Heartbeat
    guard: GuardReport
    metrics: MetricsReport
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., endpoints: _Optional[_Union[EndpointSnapshot, _Mapping]] = ..., proxies: _Optional[_Union[ProxyReport, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., guard: _Optional[_Union[GuardReport, _Mapping]] = ..., metrics: _Optional[_Union[MetricsReport, _Mapping]] = ...) -> None: ...

class ViewService(_message.Message):
    __slots__ = ("name", "base_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_version: str
    def __init__(self, name: _Optional[str] = ..., base_version: _Optional[str] = ...) -> None: ...

class ViewEndpoints(_message.Message):
    __slots__ = ("service", "version", "endpoints", "via_cluster")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    VIA_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    endpoints: _containers.RepeatedCompositeFieldContainer[_release_pb2.Endpoint]
    via_cluster: str
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[_release_pb2.Endpoint, _Mapping]]] = ..., via_cluster: _Optional[str] = ...) -> None: ...

class ViewLane(_message.Message):
    __slots__ = ("name", "entry", "weight", "versions", "rules", "cohort")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    entry: str
    weight: int
    versions: _containers.RepeatedCompositeFieldContainer[_release_pb2.ServiceVersions]
    rules: _containers.RepeatedCompositeFieldContainer[_release_pb2.MatchRule]
    cohort: _release_pb2.Cohort
    def __init__(self, name: _Optional[str] = ..., entry: _Optional[str] = ..., weight: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[_release_pb2.ServiceVersions, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[_release_pb2.MatchRule, _Mapping]]] = ..., cohort: _Optional[_Union[_release_pb2.Cohort, _Mapping]] = ...) -> None: ...

class RoutingView(_message.Message):
    __slots__ = ("services", "endpoints", "lanes", "staged")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ViewService]
    endpoints: _containers.RepeatedCompositeFieldContainer[ViewEndpoints]
    lanes: _containers.RepeatedCompositeFieldContainer[ViewLane]
    staged: _containers.RepeatedCompositeFieldContainer[ViewLane]
    def __init__(self, services: _Optional[_Iterable[_Union[ViewService, _Mapping]]] = ..., endpoints: _Optional[_Iterable[_Union[ViewEndpoints, _Mapping]]] = ..., lanes: _Optional[_Iterable[_Union[ViewLane, _Mapping]]] = ..., staged: _Optional[_Iterable[_Union[ViewLane, _Mapping]]] = ...) -> None: ...

class ClusterView(_message.Message):
    __slots__ = ("version", "view")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    version: str
    view: RoutingView
    def __init__(self, version: _Optional[str] = ..., view: _Optional[_Union[RoutingView, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("cluster", "heartbeat_interval_ms", "lease_ttl_seconds")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    heartbeat_interval_ms: int
    lease_ttl_seconds: int
    def __init__(self, cluster: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., lease_ttl_seconds: _Optional[int] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("welcome", "view")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    view: ClusterView
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., view: _Optional[_Union[ClusterView, _Mapping]] = ...) -> None: ...
