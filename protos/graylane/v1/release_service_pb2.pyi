from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

from graylane.v1 import release_pb2 as _release_pb2

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
    def __init__(self, name: str | None = ..., spec: _release_pb2.ReleaseSpec | _Mapping | None = ..., actor: str | None = ..., reason: str | None = ...) -> None: ...

class ApplyReleaseRequest(_message.Message):
    __slots__ = ("name", "spec", "actor", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: _release_pb2.ReleaseSpec
    actor: str
    reason: str
    def __init__(self, name: str | None = ..., spec: _release_pb2.ReleaseSpec | _Mapping | None = ..., actor: str | None = ..., reason: str | None = ...) -> None: ...

class GetReleaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: str | None = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListReleasesResponse(_message.Message):
    __slots__ = ("releases",)
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[_release_pb2.Release]
    def __init__(self, releases: _Iterable[_release_pb2.Release | _Mapping] | None = ...) -> None: ...

class DeleteReleaseRequest(_message.Message):
    __slots__ = ("name", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    actor: str
    def __init__(self, name: str | None = ..., actor: str | None = ...) -> None: ...

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
    def __init__(self, name: str | None = ..., actor: str | None = ..., reason: str | None = ..., expected_revision: int | None = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: str | None = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: str | None = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_release_pb2.Event]
    def __init__(self, events: _Iterable[_release_pb2.Event | _Mapping] | None = ...) -> None: ...

class PutServiceRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: _release_pb2.Service
    def __init__(self, service: _release_pb2.Service | _Mapping | None = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[_release_pb2.Service]
    def __init__(self, services: _Iterable[_release_pb2.Service | _Mapping] | None = ...) -> None: ...

class PutVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: _release_pb2.Version
    def __init__(self, version: _release_pb2.Version | _Mapping | None = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: str | None = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_release_pb2.Version]
    def __init__(self, versions: _Iterable[_release_pb2.Version | _Mapping] | None = ...) -> None: ...
