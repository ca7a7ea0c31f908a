"""tracker: the streams changed since a sequence, as a reader that keeps its own state asks."""

from __future__ import annotations

import random

import pytest
from envoy.config.core.v3 import base_pb2
from graylane.xds import tracker as tr
from graylane.xds.tracker import Nack, ProxyTracker, Push, TypeAck

ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def connect(t: ProxyTracker, stream: str) -> None:
    t.connected(base_pb2.Node(id=stream.partition("#")[0], cluster="c"), stream=stream, key="k", protocol=tr.SOTW)


def test_changed_since_names_each_stream_changed_after_the_sequence_once() -> None:
    t = ProxyTracker()
    start = t.seq
    assert t.changed_since(start) == []
    connect(t, "a#1")
    connect(t, "b#2")
    mid = t.seq
    t.acked("a#1", ROUTE, TypeAck("v1"))
    t.pushed("a#1", Push(ROUTE, "v2", "1", ("graylane",)))
    t.disconnected("b#2")
    assert sorted(t.changed_since(start) or ()) == ["a#1", "b#2"]
    assert sorted(t.changed_since(mid) or ()) == ["a#1", "b#2"]
    assert t.changed_since(t.seq) == []
    after = t.seq
    t.nacked("a#1", Nack(ROUTE, "v2", "1", "no", 0.0))
    assert t.changed_since(after) == ["a#1"]
    assert t.get("b#2") is None  # an ended stream is listed once, and reads as gone


def test_a_reader_too_far_behind_is_told_to_read_everything() -> None:
    t = ProxyTracker()
    connect(t, "keep#0")
    old = t.seq
    for i in range(1, 2 * tr._JOURNAL_SLACK + 10):  # streams open and end: the journal prunes them
        connect(t, f"n#{i}")
        t.disconnected(f"n#{i}")
    assert t.changed_since(old) is None
    assert t.changed_since(t.seq) == []
    recent = t.seq
    connect(t, "late#1")
    assert t.changed_since(recent) == ["late#1"]


def test_replaying_changed_since_gives_the_same_state_as_reading_everything() -> None:
    rng = random.Random(7)
    t = ProxyTracker()
    mirror: dict[str, str] = {}  # stream -> route version, kept from changed_since only
    seq = t.seq
    open_streams: list[str] = []
    for step in range(3000):
        roll = rng.random()
        if roll < 0.2 or not open_streams:
            stream = tr.new_stream_id(f"n{rng.randrange(50)}")
            connect(t, stream)
            open_streams.append(stream)
        elif roll < 0.3:
            t.disconnected(open_streams.pop(rng.randrange(len(open_streams))))
        else:
            t.acked(rng.choice(open_streams), ROUTE, TypeAck(f"v{rng.randrange(5)}"))
        if step % rng.randint(1, 40) == 0:
            changed = t.changed_since(seq)
            assert changed is not None
            assert len(changed) == len(set(changed))
            for stream in changed:
                p = t.get(stream)
                if p is None:
                    mirror.pop(stream, None)
                else:
                    ack = p.acked.get(ROUTE)
                    mirror[stream] = ack.version if ack else ""
            seq = t.seq
            full = {s: (p.acked[ROUTE].version if ROUTE in p.acked else "") for s, p in t.proxies().items()}
            assert mirror == full


def test_connections_are_the_open_streams_oldest_first_as_proxies_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    t = ProxyTracker()
    clock = [100.0]
    monkeypatch.setattr(tr, "now", lambda: clock[0])
    open_streams: list[str] = []
    for i in range(400):
        clock[0] += rng.random()
        if rng.random() < 0.3 and open_streams:
            t.disconnected(open_streams.pop(rng.randrange(len(open_streams))))
            continue
        stream = tr.new_stream_id(f"n{rng.randrange(60)}")  # node ids repeat: several streams each
        node = base_pb2.Node(id=stream.partition("#")[0])
        node.metadata.update({"i": i})
        t.connected(node, stream=stream, key="k", protocol=tr.SOTW)
        open_streams.append(stream)
        t.acked(stream, ROUTE, TypeAck(f"v{i}"))
        if i % 7 == 0:
            ordered = sorted(t.proxies().values(), key=lambda p: p.connected_at)
            assert t.connections() == [(p.node_id, p.metadata) for p in ordered]


def test_a_metadata_index_follows_the_streams_that_state_the_key_per_node_oldest_first() -> None:
    t = ProxyTracker()

    def open_with(stream: str, **metadata: object) -> None:
        node = base_pb2.Node(id=stream.partition("#")[0])
        node.metadata.update(metadata)
        t.connected(node, stream=stream, key="k", protocol=tr.SOTW)

    open_with("a#1", admin="1.1.1.1:1")
    open_with("b#2")  # states no value: not indexed
    open_with("c#3", admin="")  # an empty one neither
    open_with("d#4", admin=7)  # nor a number
    index = t.metadata_index("admin")  # made now, from the streams already open
    assert t.metadata_index("admin") is index
    assert index.take_changed() == {"a"} and index.take_changed() == set()
    assert index.values("a") == ("1.1.1.1:1",) and index.values("b") == index.values("c") == ()
    open_with("a#5", admin="2.2.2.2:2")
    open_with("b#6")
    assert index.take_changed() == {"a"}
    assert index.values("a") == ("1.1.1.1:1", "2.2.2.2:2")
    t.disconnected("a#1")
    t.disconnected("b#2")
    t.disconnected("b#6")
    assert index.take_changed() == {"a"} and index.values("a") == ("2.2.2.2:2",)
    t.disconnected("a#5")
    assert index.take_changed() == {"a"} and index.values("a") == ()
    t.disconnected("a#5")  # an unknown stream: nothing
    assert index.take_changed() == set()
