"""A dict of sets used as a multimap (key -> the values filed under it).

Owns: taking one value out of its key's set and dropping the key with its last value, so a
multimap never keeps empty sets (the proxy tracker's streams per node, the scoped cache's
scoped keys per node group, the view history's users per entry).

Must not import: etcd, graylane.controlplane, graylane.agent.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def discard(multimap: dict[K, set[V]], key: K, value: V) -> bool:
    """Take `value` out of `key`'s set (a no-op where it is not there); True when that
    emptied the set and the key went with it."""
    values = multimap.get(key)
    if values is None:
        return False
    values.discard(value)
    if values:
        return False
    del multimap[key]
    return True
