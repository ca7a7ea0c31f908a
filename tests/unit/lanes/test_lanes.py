"""graylane.lanes: the lane read from a call, kept for its handler, stamped on its calls out."""

from __future__ import annotations

import grpc
from graylane.lanes import (
    LaneClientInterceptor,
    LaneServerInterceptor,
    current_lane,
    lane_of,
    lane_scope,
    with_lane,
)

METHOD = "/t.T/Echo"


def test_lane_of_prefers_the_lane_header_then_reads_baggage() -> None:
    assert lane_of([("x-graylane", "blue"), ("baggage", "graylane=green")]) == "blue"
    assert lane_of([("baggage", "k=v, graylane = green ;p=1,z=2")]) == "green"
    assert lane_of([("baggage", "k=v"), ("baggage", "graylane=gr%20ay")]) == "gr ay"
    assert lane_of([("X-Graylane", b"bytes")]) == "bytes"
    assert lane_of([("baggage", "graylanes=x,other=graylane")]) is None
    assert lane_of(None) is None and lane_of([("x-graylane", "")]) is None


def test_with_lane_sets_both_carriers_and_keeps_other_baggage_members() -> None:
    out = with_lane([("baggage", "k=v,graylane=old"), ("x-graylane", "old"), ("a", "1")], "new")
    assert out == [("baggage", "k=v,graylane=new"), ("a", "1"), ("x-graylane", "new")]
    assert with_lane([("a", "1")], "l") == [("a", "1"), ("baggage", "graylane=l"), ("x-graylane", "l")]
    assert with_lane([("a", "1")], None) == [("a", "1")]


def _identity(data: bytes) -> bytes:
    return data


async def _start(own_lane: str | None, next_port: int | None) -> tuple[grpc.aio.Server, int]:
    """A server answering the lane it saw and, with `next_port`, the lane its own call carried."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen = current_lane() or "-"
        if next_port is None:
            return seen.encode()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{next_port}", interceptors=[LaneClientInterceptor()]) as ch:
            downstream = await ch.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)(
                b"", timeout=5
            )
        return seen.encode() + b">" + downstream

    server = grpc.aio.server(interceptors=[LaneServerInterceptor(own_lane=own_lane)])
    handler = grpc.unary_unary_rpc_method_handler(echo, request_deserializer=_identity, response_serializer=_identity)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_the_lane_travels_through_a_server_to_its_outgoing_calls() -> None:
    last, last_port = await _start(None, None)
    gray, gray_port = await _start("gray", last_port)  # a gray version: untagged calls are its lane
    base, base_port = await _start(None, last_port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{base_port}") as ch:
            call = ch.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
            assert await call(b"", metadata=[("baggage", "graylane=blue")], timeout=5) == b"blue>blue"
            assert await call(b"", timeout=5) == b"->-"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gray_port}") as ch:
            call = ch.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
            assert await call(b"", timeout=5) == b"gray>gray"
            assert await call(b"", metadata=[("x-graylane", "blue")], timeout=5) == b"blue>blue"
        # A client outside any server stamps what `lane_scope` says.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{last_port}", interceptors=[LaneClientInterceptor()]) as ch:
            call = ch.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
            with lane_scope("red"):
                assert await call(b"", timeout=5) == b"red"
            assert await call(b"", timeout=5) == b"-"
    finally:
        for server in (base, gray, last):
            await server.stop(None)
