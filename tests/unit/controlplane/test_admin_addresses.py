"""admin_addresses, kept per node id from the tracker's index, is what listing every
connection oldest first gives (its rule as it was before it was kept)."""

from __future__ import annotations

import random
from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from graylane.agent.stats import ADMIN_METADATA
from graylane.controlplane.reconcile.traffic import admin_addresses
from graylane.xds import tracker as tr
from graylane.xds.tracker import ProxyTracker


def _listed(t: ProxyTracker) -> dict[str, str]:
    found: dict[str, str] = {}
    for node_id, metadata in t.connections():  # oldest first
        address = metadata.get(ADMIN_METADATA)
        if isinstance(address, str) and address:
            name = node_id if found.get(node_id, address) == address else f"{node_id}@{address}"
            found[name] = address
    return found


def test_kept_admin_addresses_match_the_whole_listing_as_streams_come_and_go() -> None:
    rng = random.Random(5)
    t = ProxyTracker()
    open_streams: list[str] = []
    seen: list[Mapping[str, str]] = []
    for step in range(2000):
        if rng.random() < 0.35 and open_streams:
            t.disconnected(open_streams.pop(rng.randrange(len(open_streams))))
        else:
            stream = tr.new_stream_id(f"n{rng.randrange(40)}")  # node ids repeat: several streams each
            node = base_pb2.Node(id=stream.partition("#")[0])
            roll = rng.random()
            if roll < 0.8:  # most state an address, a few of a handful (so some repeat per node)
                node.metadata.update({ADMIN_METADATA: f"127.0.0.1:{rng.randrange(4)}"})
            t.connected(node, stream=stream, key="k", protocol=tr.SOTW)
            open_streams.append(stream)
        if step % rng.randint(1, 30) == 0:
            got = admin_addresses(t)
            assert dict(got) == _listed(t)
            seen.append(got)
    # A mapping handed out is never changed afterwards (readers compare by identity).
    assert len({id(m) for m in seen}) > 1
    assert dict(seen[-1]) == _listed(t)


def test_the_same_mapping_while_no_stream_with_an_address_came_or_went() -> None:
    t = ProxyTracker()
    node = base_pb2.Node(id="envoy")
    node.metadata.update({ADMIN_METADATA: "127.0.0.1:9901"})
    t.connected(node, stream="envoy#1", key="k", protocol=tr.SOTW)
    first = admin_addresses(t)
    assert dict(first) == {"envoy": "127.0.0.1:9901"}
    for i in range(5):  # streams without an address: the same object
        t.connected(base_pb2.Node(id=f"fake-{i}"), stream=f"fake-{i}#1", key="k", protocol=tr.SOTW)
        assert admin_addresses(t) is first
    t.disconnected("envoy#1")
    assert dict(admin_addresses(t)) == {} and dict(first) == {"envoy": "127.0.0.1:9901"}
