"""Release state in etcd. The only package that imports the etcd client.

Public surface: `EtcdStore`, `LiveState`, `Snapshot`, `ReplicaProgress`, `Compacted`, `Tombstone`, `connect`.
"""

from graylane.controlplane.store._etcd import (
    Compacted,
    EtcdStore,
    LiveState,
    ReplicaProgress,
    Snapshot,
    Tombstone,
    connect,
)
from graylane.controlplane.store._etcd import ReplicaFleet as ReplicaFleet

__all__ = ["Compacted", "EtcdStore", "LiveState", "ReplicaProgress", "Snapshot", "Tombstone", "connect"]
