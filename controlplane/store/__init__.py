"""Release state in etcd. The only package that imports the etcd client.

Layout: `_client` is the connection every record kind shares (calls, transactions, paged
ranges, leases, watches; every etcd failure becomes `Unavailable`); one module per record
kind builds on it, each with the Protocol its callers depend on:

    releases   releases/, events/, lanes/, tombstones/, tombstoneevents/   `ReleaseStore`
    inventory  services/, versions/                                         `InventoryStore`
    agents     clusters/, clusterendpoints/, knownclusters/, agentmetrics/  `AgentStore`
    replicas   replicas/, progress/, traffic/, leader            `ReplicaStore`, `TrafficStore`, `LeaderStore`
    tokens     tokens/, bootstrapped                                        `TokenStore`
    sessions   dashboard/keys, dashboard/logouts/                          `SessionStore`
    live       the live kinds at one revision (`Snapshot`, `LiveState`)     `LiveSource`

Keys are below the prefix (default `/graylane/v1/`), values in proto JSON or JSON so
`etcdctl get` stays readable. `EtcdStore` (in `_etcd`) joins them all over one connection
for the composition root; `connect` opens it.
"""

from graylane.controlplane.store._client import Commit, Compacted, EtcdClient, LeaseHolder
from graylane.controlplane.store._etcd import EtcdStore, connect
from graylane.controlplane.store.agents import AgentStore
from graylane.controlplane.store.inventory import InventoryStore
from graylane.controlplane.store.live import LiveSource, LiveState, Snapshot
from graylane.controlplane.store.releases import ReleaseStore, Tombstone
from graylane.controlplane.store.replicas import (
    LeaderStore,
    ReplicaFleet,
    ReplicaProgress,
    ReplicaStore,
    ReplicaTraffic,
    TrafficCounts,
    TrafficStore,
)
from graylane.controlplane.store.sessions import SessionStore
from graylane.controlplane.store.tokens import TokenStore

__all__ = [
    "AgentStore",
    "Commit",
    "Compacted",
    "EtcdClient",
    "EtcdStore",
    "InventoryStore",
    "LeaderStore",
    "LeaseHolder",
    "LiveSource",
    "LiveState",
    "ReleaseStore",
    "ReplicaFleet",
    "ReplicaProgress",
    "ReplicaStore",
    "SessionStore",
    "ReplicaTraffic",
    "Snapshot",
    "TokenStore",
    "TrafficCounts",
    "TrafficStore",
    "Tombstone",
    "connect",
]
