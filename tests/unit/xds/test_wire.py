"""Response bodies built from per-resource wire entries equal what protobuf serialises.

The ADS server joins `Encoded.entry` bytes instead of building DiscoveryResponse /
DeltaDiscoveryResponse messages; these tests hold the joined bytes to the
protobuf-built message, byte for byte and parsed, over sizes whose length varints take
one, two and three bytes, empty strings and non-ASCII names.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message
from graylane.xds import resources
from graylane.xds.resources import CLUSTER, ROUTE, TypedResources


def _messages() -> list[Message]:
    out: list[Message] = []
    for size in (0, 1, 60, 127, 128, 200, 16_383, 16_384, 70_000):
        out.append(cluster_pb2.Cluster(name="c" * size, connect_timeout={"seconds": size}))
    out.append(route_pb2.RouteConfiguration(name="rc-é-😀"))
    return out


def _any(message: Message) -> any_pb2.Any:
    return any_pb2.Any(
        type_url="type.googleapis.com/" + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(deterministic=True),
    )


def test_sotw_body_is_the_protobuf_response() -> None:
    messages = _messages()
    for version, type_url in (("v1", CLUSTER), ("", CLUSTER), ("abc" * 50, ""), ("x", ROUTE)):
        for chosen in (messages, messages[:1], []):
            body = resources.sotw_body(version, type_url, [resources.entry(m) for m in chosen])
            built = discovery_pb2.DiscoveryResponse(
                version_info=version, type_url=type_url, resources=[_any(m) for m in chosen]
            )
            assert body == built.SerializeToString()
            assert discovery_pb2.DiscoveryResponse.FromString(body) == built


def test_delta_body_is_the_protobuf_response() -> None:
    messages = _messages()
    named = [(f"n{i}-é" if i % 3 else "", "" if i % 4 == 1 else f"{i:016x}", m) for i, m in enumerate(messages)]
    for removed in ((), ("gone",), ("", "x-😀", "y" * 300)):
        for version, type_url in (("v1", CLUSTER), ("", ""), ("z" * 200, ROUTE)):
            body = resources.delta_body(version, type_url, [(n, v, resources.entry(m)) for n, v, m in named], removed)
            built = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version,
                type_url=type_url,
                resources=[discovery_pb2.Resource(name=n, version=v, resource=_any(m)) for n, v, m in named],
                removed_resources=list(removed),
            )
            assert body == built.SerializeToString()
            assert discovery_pb2.DeltaDiscoveryResponse.FromString(body) == built


def test_packed_is_the_message_in_an_any() -> None:
    for message in _messages():
        assert resources.packed(message) == _any(message)


def test_entries_follow_derived_sets_in_item_order() -> None:
    messages = {f"c{i}": cluster_pb2.Cluster(name=f"c{i}") for i in range(20)}
    typed = TypedResources(CLUSTER, messages)
    typed.entries()  # asked for once: carried to derived sets from here on
    steps = [
        ({"c3": cluster_pb2.Cluster(name="c3", connect_timeout={"seconds": 3})}, ()),
        ({"new": cluster_pb2.Cluster(name="new")}, ("c0", "c7")),
        ({"c0": cluster_pb2.Cluster(name="c0")}, ("new",)),
        ({}, ("c19",)),
    ]
    for upserts, removals in steps:
        typed = typed.replaced(upserts, removals)
        fresh = TypedResources(CLUSTER, dict(typed.items))
        assert list(typed.entries().items()) == [(n, resources.entry(m)) for n, m in typed.items.items()]
        assert dict(typed.entries()) == dict(fresh.entries())
        body = resources.sotw_body(typed.version, CLUSTER, typed.entries().values())
        built = discovery_pb2.DiscoveryResponse(
            version_info=typed.version, type_url=CLUSTER, resources=[_any(m) for m in typed.items.values()]
        )
        assert body == built.SerializeToString()
