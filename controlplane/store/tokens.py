"""API tokens in etcd.

Keys (below the prefix):
    tokens/<id>                          an API token record (JSON; the SHA-256 of its secret, never the secret)
    bootstrapped                         id of the first admin token `serve --auth` made (once per installation)

Must not import: graylane.xds.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

from etcd3.etcdrpc import rpc_pb2
from graylane.controlplane.api import auth
from graylane.controlplane.errors import AlreadyExists, NotFound
from graylane.controlplane.store._client import EtcdClient

log = logging.getLogger(__name__)


class TokenStore(Protocol):
    """What authentication and the token API use."""

    async def create_token(self, record: auth.TokenRecord) -> None: ...

    async def create_bootstrap_token(self, record: auth.TokenRecord) -> bool: ...

    async def get_token(self, token_id: str) -> auth.TokenRecord | None: ...

    async def list_tokens(self) -> list[auth.TokenRecord]: ...

    async def delete_token(self, token_id: str) -> None: ...


class TokenRecords(EtcdClient):
    """Token records and the bootstrap marker."""

    async def create_token(self, record: auth.TokenRecord) -> None:
        """Store a token record; ALREADY_EXISTS if its id or its name is taken."""
        key = self._key("tokens", record.token_id)
        if any(r.name == record.name for r in await self.list_tokens()):
            raise AlreadyExists(f"a token named {record.name!r} exists (revoke it first)")
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        resp = await self._txn([absent], [self._put(key, json.dumps(record.to_json()).encode())])
        if not resp.succeeded:
            raise AlreadyExists(f"token id {record.token_id} exists")

    async def create_bootstrap_token(self, record: auth.TokenRecord) -> bool:
        """Store the installation's first admin token, unless one was ever made (False)."""
        marker = self._key("bootstrapped")
        absent = rpc_pb2.Compare(
            key=marker, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        put_record = self._put(self._key("tokens", record.token_id), json.dumps(record.to_json()).encode())
        resp = await self._txn([absent], [put_record, self._put(marker, record.token_id.encode())])
        return bool(resp.succeeded)

    async def get_token(self, token_id: str) -> auth.TokenRecord | None:
        kv = await self._get(self._key("tokens", token_id))
        return _token_or_none(kv.value) if kv is not None else None

    async def list_tokens(self) -> list[auth.TokenRecord]:
        resp = await self._range(self._key("tokens") + b"/")
        return [r for kv in resp.kvs if (r := _token_or_none(kv.value)) is not None]

    async def delete_token(self, token_id: str) -> None:
        resp = await self._call(self._kv.DeleteRange, rpc_pb2.DeleteRangeRequest(key=self._key("tokens", token_id)))
        if not resp.deleted:  # type: ignore[attr-defined]
            raise NotFound(f"no token with id {token_id!r}")


def _token_or_none(value: bytes) -> auth.TokenRecord | None:
    try:
        return auth.TokenRecord.from_json(json.loads(value))
    except (ValueError, KeyError, TypeError) as exc:
        log.error("skipping an unreadable token record: %s", exc)
        return None
