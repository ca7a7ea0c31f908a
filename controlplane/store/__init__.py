"""Release state in etcd. The only package that imports the etcd client.

Public surface: `EtcdStore`, `Snapshot`, `ReplicaProgress`, `Compacted`, `connect`.
"""

from graylane.controlplane.store._etcd import Compacted, EtcdStore, ReplicaProgress, Snapshot, connect
from graylane.controlplane.store._etcd import ReplicaFleet as ReplicaFleet

__all__ = ["Compacted", "EtcdStore", "ReplicaProgress", "Snapshot", "connect"]
