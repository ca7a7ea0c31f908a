"""How stored values are encoded: proto JSON (so `etcdctl get` stays readable), and the
decoded-release cache shared by the follower and the readers.

Owns: `_dump`/`_load`, `_ReleaseCache` (one per process, `_releases`), and the event
decoding that history and tombstones share. Must not import: graylane.xds.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC

from etcd3.etcdrpc import kv_pb2
from google.protobuf import json_format
from google.protobuf.message import Message
from graylane.controlplane.domain import model
from graylane.v1 import release_pb2 as pb


def _dump(message: Message) -> bytes:
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


def _load(data: bytes, message: Message) -> Message:
    json_format.Parse(data, message, ignore_unknown_fields=True)
    return message


class _ReleaseCache:
    """Decoded releases by their exact stored bytes and mod_revision, newest kept (bounded).

    The follower decodes every release write as it arrives; readers of the same value
    (GetRelease, a transition's read) then reuse it instead of parsing the JSON again.
    Release values are immutable, so sharing them is safe.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: dict[tuple[bytes, int], model.Release] = {}

    def clear(self) -> None:
        self._items.clear()

    def decode(self, kv: kv_pb2.KeyValue) -> model.Release:
        key = (kv.value, kv.mod_revision)
        found = self._items.get(key)
        if found is None:
            found = model.release_from_proto(_load(kv.value, pb.Release()), revision=kv.mod_revision)  # type: ignore[arg-type]
            if len(self._items) >= self._size:
                del self._items[next(iter(self._items))]
            self._items[key] = found
        return found


_releases = _ReleaseCache()


def _at(release: model.Release, revision: int) -> model.Release:
    return replace(release, revision=revision)


def _event_from_proto(e: pb.Event) -> model.Event:
    return model.Event(
        release=e.release,
        sequence=e.sequence,
        at=e.at.ToDatetime(tzinfo=UTC),
        action=e.action,
        actor=e.actor,
        reason=e.reason,
        from_phase=model.Phase(e.from_phase) if e.from_phase else model.Phase.PENDING,
        to_phase=model.Phase(e.to_phase) if e.to_phase else model.Phase.PENDING,
        from_batch=e.from_batch,
        to_batch=e.to_batch,
        weight=e.weight,
        details=dict(e.details),
    )
