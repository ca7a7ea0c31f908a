"""Services and versions in etcd: what releases are made of.

Keys (below the prefix):
    services/<name>                      Service
    versions/<service>/<version>         Version

Must not import: graylane.xds.
"""

from __future__ import annotations

from typing import Protocol

from etcd3.etcdrpc import rpc_pb2
from graylane.controlplane.domain import model
from graylane.controlplane.errors import Conflict
from graylane.controlplane.store._client import EtcdClient
from graylane.controlplane.store._codec import _dump, _load
from graylane.v1 import release_pb2 as pb


class InventoryStore(Protocol):
    """What the API and the release service use of services and versions."""

    async def get_service(self, name: str) -> model.Service | None: ...

    async def get_service_at(self, name: str) -> tuple[model.Service | None, int]: ...

    async def list_services(self) -> list[model.Service]: ...

    async def list_versions(self, service: str = "") -> list[model.Version]: ...

    async def put_service(self, service: model.Service, *, if_revision: int | None = None) -> None: ...

    async def put_version(self, version: model.Version) -> None: ...


class Inventory(EtcdClient):
    """Services and versions."""

    async def get_service(self, name: str) -> model.Service | None:
        return (await self.get_service_at(name))[0]

    async def get_service_at(self, name: str) -> tuple[model.Service | None, int]:
        """The service and the revision it was last written at (0: not registered), for a
        `put_service(..., if_revision=...)` that must not overwrite a concurrent change."""
        kv = await self._get(self._key("services", name))
        if kv is None:
            return None, 0
        return model.service_from_proto(_load(kv.value, pb.Service()), stored=True), int(kv.mod_revision)  # type: ignore[arg-type]

    async def list_services(self) -> list[model.Service]:
        resp = await self._range(self._key("services") + b"/")
        return [model.service_from_proto(_load(kv.value, pb.Service()), stored=True) for kv in resp.kvs]  # type: ignore[arg-type]

    async def list_versions(self, service: str = "") -> list[model.Version]:
        prefix = self._key("versions", service) + b"/" if service else self._key("versions") + b"/"
        resp = await self._range(prefix)
        return [model.version_from_proto(_load(kv.value, pb.Version()), stored=True) for kv in resp.kvs]  # type: ignore[arg-type]

    async def put_service(self, service: model.Service, *, if_revision: int | None = None) -> None:
        """Write `service`; with `if_revision`, only if the key is still at that revision (0:
        still absent), else Conflict and nothing written: a check made on the value read
        (PutService's stable-version guard) holds for the value replaced."""
        key = self._key("services", service.name)
        compare = (
            []
            if if_revision is None
            else [
                rpc_pb2.Compare(
                    key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=if_revision
                )
            ]
        )
        resp = await self._txn(compare, [self._put(key, _dump(model.service_to_proto(service)))])
        if not resp.succeeded:
            raise Conflict(
                f"service {service.name!r} was changed by another request meanwhile; read it again and retry"
            )

    async def put_version(self, version: model.Version) -> None:
        key = self._key("versions", version.service, version.name)
        await self._txn([], [self._put(key, _dump(model.version_to_proto(version)))])
