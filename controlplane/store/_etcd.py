"""EtcdStore: every record kind of the store over one connection, for the composition root.

Owns the assembly only: `EtcdStore` joins the record classes (`ReleaseRecords`,
`Inventory`, `AgentRecords`, `ReplicaRecords`, `TokenRecords`, `SessionRecords`, `LiveReads`), each an
`EtcdClient` over the same channels, and `connect` opens one and checks the server. The
records, their keys and guards live in the modules named after them; code that uses one
kind depends on that kind's Protocol (`ReleaseStore`, `InventoryStore`, `AgentStore`,
`ReplicaStore`, `LeaderStore`, `TokenStore`, `SessionStore`, `LiveSource`), not on `EtcdStore`.

Must not import: graylane.xds.
"""

from __future__ import annotations

import asyncio

import grpc
from graylane.controlplane.errors import Unavailable
from graylane.controlplane.store._client import CHANNEL_OPTIONS, DEFAULT_PREFIX, _target
from graylane.controlplane.store.agents import AgentRecords
from graylane.controlplane.store.inventory import Inventory
from graylane.controlplane.store.live import LiveReads
from graylane.controlplane.store.releases import ReleaseRecords
from graylane.controlplane.store.replicas import ReplicaRecords
from graylane.controlplane.store.sessions import SessionRecords
from graylane.controlplane.store.tokens import TokenRecords


class EtcdStore(ReleaseRecords, Inventory, AgentRecords, ReplicaRecords, TokenRecords, SessionRecords, LiveReads):
    """The whole store: every record kind on one connection (one instance, one pair of
    channels, one thread pool). Built by `connect` (with the blocking path) or directly
    on a grpc.aio channel (without it)."""


async def connect(
    endpoints: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout: float = 10.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> EtcdStore:
    """Open a store and check the server: reachable in `timeout`, and not a refused version.

    `credentials`: TLS to etcd (an etcd serving https, and requiring client certificates
    when it runs with --client-cert-auth); None: plain text."""
    target = _target(endpoints)
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=list(CHANNEL_OPTIONS))
    store = EtcdStore(channel, prefix=prefix, blocking_target=target, blocking_credentials=credentials)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await store.check_version()
                    break
                except Unavailable:
                    await asyncio.sleep(0.2)
    except TimeoutError as exc:
        await store.close()
        raise Unavailable(f"etcd at {endpoints} did not answer within {timeout:.0f}s") from exc
    except BaseException:
        await store.close()
        raise
    return store
