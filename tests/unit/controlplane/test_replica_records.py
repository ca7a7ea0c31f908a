"""The replica records' kept encodings write the same bytes as encoding the whole record."""

from __future__ import annotations

import json
import random
from types import MappingProxyType

from graylane.controlplane.store.replicas import _KeptMapJson, _KeptSetJson, _node_set, _proxy_map


def _old_proxies(proxies: dict[str, str]) -> str:
    return json.dumps(dict(sorted(proxies.items())))


def test_a_map_that_grows_shrinks_and_changes_encodes_as_json_dumps_of_it_sorted() -> None:
    rng = random.Random(12)
    encoder = _KeptMapJson()
    assert encoder.encode({}) == "{}" == _old_proxies({})
    proxies: dict[str, str] = {}
    names = [f"node-{i}" for i in range(3000)] + ['quo"te', "back\\slash", "ünï-cödé", "tab\tid", ""]
    rng.shuffle(names)
    for step in range(60):
        if step % 7 == 6:  # some streams end
            for name in rng.sample(sorted(proxies), min(len(proxies), rng.randint(1, 40))):
                del proxies[name]
        elif step % 11 == 10:  # a proxy came back with another admin address
            for name in rng.sample(sorted(proxies), min(len(proxies), 5)):
                proxies[name] = f"127.0.0.2:{rng.randint(1, 65535)}"
        else:  # more connect: a few, or a burst past the insert limit
            for name in names[: rng.choice([1, 3, 30, 400])]:
                proxies[name] = f"127.0.0.1:{rng.randint(1, 65535)}"
            del names[: len(proxies)]
        assert encoder.encode(MappingProxyType(dict(proxies))) == _old_proxies(proxies)
    # The same dict changed in place is encoded again, not taken as is.
    same = {"b": "1", "a": "2"}
    assert encoder.encode(same) == _old_proxies(same)
    same["c"] = "3"
    assert encoder.encode(same) == _old_proxies(same)
    assert encoder.encode({}) == "{}"


def test_each_identity_keeps_its_own_encodings_and_only_a_few_are_kept() -> None:
    a, b = _proxy_map("ra"), _proxy_map("rb")
    assert a is not b and _proxy_map("ra") is a
    assert a.encode({"x": "1"}) == '{"x": "1"}' and b.encode({"y": "2"}) == '{"y": "2"}'
    for i in range(20):
        _proxy_map(f"other-{i}")
    fresh = _proxy_map("ra")  # dropped: a new one, still correct
    assert fresh is not a
    assert fresh.encode({"x": "1", "z": "3"}) == '{"x": "1", "z": "3"}'


def test_a_node_set_that_grows_and_shrinks_encodes_as_json_dumps_of_it_sorted() -> None:
    rng = random.Random(8)
    encoder = _KeptSetJson()
    assert encoder.encode(frozenset()) == "[]"
    names = [f"fleet-{i}" for i in range(3000)] + ['quo"te', "back\\slash", "ünï-cödé", "tab\tid", ""]
    rng.shuffle(names)
    nodes: set[str] = set()
    for step in range(80):
        if step % 6 == 5:  # some streams end
            nodes -= set(rng.sample(sorted(nodes), min(len(nodes), rng.randint(1, 30))))
        elif step % 13 == 12:  # many end at once: past the limit, all encoded again
            nodes -= set(rng.sample(sorted(nodes), len(nodes) // 2))
        else:  # more connect: a few, or a burst past the limit
            take = rng.choice([1, 2, 20, 300])
            nodes |= set(names[:take])
            del names[:take]
        current = frozenset(nodes)
        text = encoder.encode(current)
        assert text == json.dumps(sorted(current))
        assert encoder.encode(current) is text  # the same set: kept
    assert encoder.encode(frozenset()) == "[]"


def test_each_identity_keeps_its_own_node_set() -> None:
    a, b = _node_set("sa"), _node_set("sb")
    assert a is not b and _node_set("sa") is a
    assert a.encode(frozenset({"x", "w"})) == '["w", "x"]' and b.encode(frozenset({"y"})) == '["y"]'
