"""The shared encoding memo of graylane.xds.resources: bounded, newest kept, oldest evicted."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from graylane.xds import resources


def test_the_encoding_memo_stays_bounded_and_keeps_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "_ENCODED", {})
    monkeypatch.setattr(resources, "ENCODED_LIMIT", 100)
    messages = [cluster_pb2.Cluster(name=f"c{i}") for i in range(1000)]
    encodings = [resources.encoded(m) for m in messages]
    assert len(resources._ENCODED) <= 100
    # The newest encodings are the memo's: asked again, the same objects come back.
    assert all(resources.encoded(m) is e for m, e in zip(messages[-75:], encodings[-75:], strict=True))
    # The oldest were evicted: encoded again, a new object with the same content version.
    again = resources.encoded(messages[0])
    assert again is not encodings[0]
    assert again.version == encodings[0].version == resources.content_version(messages[0])
