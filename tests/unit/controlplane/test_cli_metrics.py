"""`graylane metrics`: its arguments and its table, without a server."""

from __future__ import annotations

import argparse

import pytest
from graylane.controlplane.cli import base, commands, output
from graylane.v1 import release_service_pb2 as api


@pytest.mark.parametrize(
    ("text", "seconds"), [("60", 60.0), ("60s", 60.0), ("1m30s", 90.0), ("500ms", 0.5), ("2h", 7200.0), ("1.5s", 1.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert base.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1d", "s", "-5s", "0", "5 s", "1m-2s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        base.parse_duration(text)


def test_metrics_arguments() -> None:
    args = commands.build_parser().parse_args(
        ["metrics", "rel", "--window", "2m", "--watch", "--every", "5s", "-o", "json"]
    )
    assert (args.name, args.window, args.watch, args.every, args.output) == ("rel", 120.0, True, 5.0, "json")
    plain = commands.build_parser().parse_args(["metrics", "rel"])
    assert (plain.window, plain.watch, plain.every, plain.output) == (None, False, None, "table")


def _response() -> api.MetricsResponse:
    response = api.MetricsResponse(leader=True)
    response.since.FromSeconds(1_700_000_000)
    response.until.FromSeconds(1_700_000_060)
    response.series.add(
        service="checkout", version="v1", requests=600, errors=0, error_rate=0.0, throughput_rps=10.0,
        p50_ms=2.5, p90_ms=4.5, p99_ms=4.95, traffic_share=0.5,
    )  # fmt: skip
    response.series.add(
        service="checkout", version="v2", lane="checkout-v2", cluster="east", requests=600, errors=60,
        error_rate=0.1, throughput_rps=10.0, traffic_share=0.5,
    )  # fmt: skip
    return response


def test_metrics_table() -> None:
    lines = output.render_metrics(_response()).splitlines()
    assert lines[0].split() == list(output.METRICS_HEADER)
    assert lines[1].split() == ["checkout", "v1", "-", "-", "600", "0.00%", "10.0", "2.5ms", "4.5ms", "5.0ms", "50.0%"]
    gray = ["checkout", "v2", "checkout-v2", "east", "600", "10.00%", "10.0", "-", "-", "-", "50.0%"]
    assert lines[2].split() == gray
    assert lines[3] == "last 60s until 2023-11-14T22:14:20Z"


def test_metrics_table_without_traffic_and_not_leader() -> None:
    response = _response()
    del response.series[:]
    response.leader = False
    text = output.render_metrics(response)
    assert text.startswith("no traffic in the window\n") and "not the leader" in text
