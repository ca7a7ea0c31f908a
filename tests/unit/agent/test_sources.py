"""Endpoint files (agent/sources.py): parsing and validation, and following a file's changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest
from graylane.agent.sources import EndpointFileError, FileEndpointSource, parse_endpoints
from graylane.v1 import agent_pb2 as apb

GOOD = """\
versions:
  - service: checkout
    version: v2
    endpoints:
      - {address: 127.0.0.1, port: 18082}
      - {address: "::1", port: 8080}
  - service: cart
    version: "1.4"
    endpoints: []
"""


def test_parses_a_good_file() -> None:
    snapshot = parse_endpoints(GOOD)
    assert [(v.service, v.version) for v in snapshot.versions] == [("checkout", "v2"), ("cart", "1.4")]
    assert [(e.address, e.port) for e in snapshot.versions[0].endpoints] == [
        ("127.0.0.1", 18082),
        ("::1", 8080),
    ]


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "versions: []\n"])
def test_an_empty_file_is_an_empty_set(text: str) -> None:
    assert parse_endpoints(text) == apb.EndpointSnapshot()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("versions: [ {service: checkout", "not YAML"),
        ("- a\n- b\n", "expected a mapping with `versions`, got list"),
        ("versions: []\nextra: 1\n", "extra"),
        ("versions: [{service: checkout, version: v1, endpoints: [{address: 127.0.0.1, port: http}]}]", "port"),
        ("versions: [{service: checkout, version: v1, endpoints: [{address: 127.0.0.1, port: -1}]}]", "port"),
        (
            "versions: [{service: checkout, version: v1, endpoints: [{address: 999.1.1.1, port: 80}]}]",
            "endpoints.versions[0].endpoints[0].address: '999.1.1.1' is not an IP address",
        ),
        (
            # Envoy's EDS takes IP literals only: a host name would be NACKed by every proxy.
            "versions: [{service: checkout, version: v1, endpoints: [{address: checkout-v2.internal, port: 80}]}]",
            "endpoints.versions[0].endpoints[0].address: 'checkout-v2.internal' is not an IP address (Envoy takes",
        ),
        (
            "versions: [{service: checkout, version: v1, endpoints: [{address: 'a b', port: 80}]}]",
            "endpoints.versions[0].endpoints[0].address",
        ),
        (
            "versions: [{service: checkout, version: v1, endpoints: [{address: 127.0.0.1, port: 0}]}]",
            "endpoints.versions[0].endpoints[0].port: 0 is not a valid port",
        ),
        (
            "versions: [{service: checkout, version: v1, endpoints: [{address: 127.0.0.1, port: 70000}]}]",
            "endpoints.versions[0].endpoints[0].port: 70000 is not a valid port",
        ),
        ("versions: [{service: Check_Out, version: v1}]", "endpoints.versions[0].service"),
        ("versions: [{service: checkout, version: ''}]", "endpoints.versions[0].version"),
        (
            "versions: [{service: checkout, version: v1}, {service: checkout, version: v1}]",
            "endpoints.versions[1].version: checkout v1 is listed twice",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_problem(text: str, named: str) -> None:
    with pytest.raises(EndpointFileError) as caught:
        parse_endpoints(text, source="eps.yaml")
    message = str(caught.value)
    assert message.startswith("eps.yaml: ")
    assert named in message


async def _next(source: asyncio.Queue[apb.EndpointSnapshot], timeout: float = 5.0) -> apb.EndpointSnapshot:
    async with asyncio.timeout(timeout):
        return await source.get()


async def test_file_source_follows_changes_and_keeps_the_last_good_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(GOOD)
    source = FileEndpointSource(path, poll_seconds=0.01)
    seen: asyncio.Queue[apb.EndpointSnapshot] = asyncio.Queue()

    async def follow() -> None:
        async for snapshot in source.watch():
            seen.put_nowait(snapshot)

    caplog.set_level(logging.ERROR, logger="graylane.agent.sources")
    task = asyncio.create_task(follow())
    try:
        first = await _next(seen)
        assert len(first.versions) == 2

        path.write_text("versions: [ {service: checkout")
        async with asyncio.timeout(5):
            while not source.last_error:
                await asyncio.sleep(0.01)
        assert "not YAML" in source.last_error and str(path) in source.last_error
        assert "keeping the last good endpoints" in caplog.text
        assert seen.empty()  # nothing replaces the last good set

        path.write_text("")  # an empty read (a truncation in progress) is not a new set either
        path.write_text("versions: [{service: checkout, version: v3, endpoints: [{address: 10.0.0.3, port: 80}]}]")
        third = await _next(seen)
        assert [(v.service, v.version) for v in third.versions] == [("checkout", "v3")]
        assert source.last_error == ""
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_file_source_waits_for_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "later.yaml"
    source = FileEndpointSource(path, poll_seconds=0.01)
    iterator = aiter(source.watch())
    pending = asyncio.create_task(anext(iterator))
    try:
        async with asyncio.timeout(5):
            while not source.last_error:
                await asyncio.sleep(0.01)
        assert "cannot read" in source.last_error
        path.write_text(GOOD)
        async with asyncio.timeout(5):
            snapshot = await pending
        assert len(snapshot.versions) == 2
    finally:
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        await iterator.aclose()  # type: ignore[attr-defined]
