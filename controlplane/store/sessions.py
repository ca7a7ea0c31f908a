"""Dashboard sessions' shared state in etcd: the signing keys and the logouts.

Keys (below the prefix):
    dashboard/keys             the HMAC key ring every replica signs and checks session cookies with (JSON)
    dashboard/logouts/<sid>    a session logged out before its expiry; under a lease that ends with the session

The ring is created once, by whichever replica needs it first (a create-if-absent
transaction: every replica ends up with the same ring), and rotated by a transaction
guarded by its mod_revision (of replicas rotating at once, one wins and the rest re-read).

Must not import: graylane.xds.
"""

from __future__ import annotations

import json
import math
import time
from typing import Protocol

from etcd3.etcdrpc import rpc_pb2
from graylane.controlplane.api import sessions
from graylane.controlplane.errors import LeaseLost
from graylane.controlplane.store._client import EtcdClient

_LEASE_REUSE_SECONDS = 3600
_LONGEST_SESSION_SECONDS = 12 * 3600


class SessionStore(Protocol):
    """What the dashboard's sessions use."""

    async def session_keys(self) -> sessions.KeyRing: ...

    async def rotate_session_keys(self, seen: sessions.KeyRing, *, keep_seconds: float) -> sessions.KeyRing: ...

    async def end_session(self, sid: str, *, seconds: float) -> None: ...

    async def session_ended(self, sid: str) -> bool: ...


class SessionRecords(EtcdClient):
    """The key ring and the logout list."""

    async def session_keys(self) -> sessions.KeyRing:
        """The ring, made (once, for every replica) if there is none yet."""
        key = self._key("dashboard", "keys")
        kv = await self._get(key)
        if kv is not None:
            return sessions.KeyRing.from_json(json.loads(kv.value))
        ring = sessions.KeyRing((sessions.new_key(now=time.time()),))
        absent = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0
        )
        get = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))
        resp = await self._call(
            self._kv.Txn,
            rpc_pb2.TxnRequest(
                compare=[absent], success=[self._put(key, json.dumps(ring.to_json()).encode())], failure=[get]
            ),
        )
        if resp.succeeded:  # type: ignore[attr-defined]
            return ring
        # Another replica made it first: use its ring.
        kvs = resp.responses[0].response_range.kvs  # type: ignore[attr-defined]
        return sessions.KeyRing.from_json(json.loads(kvs[0].value))

    async def rotate_session_keys(self, seen: sessions.KeyRing, *, keep_seconds: float) -> sessions.KeyRing:
        """A new signing key, unless the ring changed since `seen` (then the current ring)."""
        key = self._key("dashboard", "keys")
        kv = await self._get(key)
        if kv is None or sessions.KeyRing.from_json(json.loads(kv.value)) != seen:
            return await self.session_keys()
        ring = seen.rotated(now=time.time(), keep_seconds=keep_seconds)
        same = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=kv.mod_revision
        )
        resp = await self._txn([same], [self._put(key, json.dumps(ring.to_json()).encode())])
        return ring if resp.succeeded else await self.session_keys()

    # The lease logouts are written under, and until when (monotonic) it lasts.
    _logout_lease: tuple[int, float] | None = None

    async def end_session(self, sid: str, *, seconds: float) -> None:
        """Record a logout at least until the session would have expired anyway.

        Logouts share a lease granted for the longest session and an hour, used while it
        outlives the session it holds: one lease an hour rather than one per logout (a
        logout is then kept up to half a day past its session, a few bytes)."""
        key = self._key("dashboard", "logouts", sid)
        for _ in range(2):
            now = time.monotonic()
            held = self._logout_lease
            if held is None or held[1] < now + seconds:
                ttl = max(math.ceil(seconds), _LONGEST_SESSION_SECONDS) + _LEASE_REUSE_SECONDS
                held = (await self.grant_lease(ttl), now + ttl)
                self._logout_lease = held
            try:
                await self._txn([], [self._put(key, b"1", lease=held[0])])
                return
            except LeaseLost:
                self._logout_lease = None  # gone early (etcd restored from a backup?): again on a new one
        raise LeaseLost("etcd dropped the logouts' lease twice")

    async def session_ended(self, sid: str) -> bool:
        return await self._get(self._key("dashboard", "logouts", sid)) is not None
