"""Release state in etcd. The only package that imports the etcd client.

Public surface: `EtcdStore`, `Snapshot`, `Compacted`, `connect`.
"""

from graylane.controlplane.store._etcd import Compacted, EtcdStore, Snapshot, connect

__all__ = ["Compacted", "EtcdStore", "Snapshot", "connect"]
