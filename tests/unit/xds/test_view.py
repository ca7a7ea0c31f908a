"""Unit tests for graylane.xds.view: cluster names and their parsing back."""

from __future__ import annotations

import pytest
from graylane.xds.view import cluster_name, parse_cluster_name


@pytest.mark.parametrize(
    ("service", "version", "lane"),
    [
        ("cart", "v1", ""),
        ("cart", "v1", "blue"),
        ("checkout-api", "1.14.2", ""),
        ("checkout-api", "1.14.2", "release-2024.11_22"),
        ("a", "v2_rc-1.0", "r.1-x_y"),
        ("stock-svc", "V3.0-beta_7", "lane.with.dots"),
        ("s", "V", "l"),
    ],
)
def test_parse_cluster_name_round_trips_cluster_name(service: str, version: str, lane: str) -> None:
    assert parse_cluster_name(cluster_name(service, version, lane)) == (service, version, lane)


def test_cluster_names_of_plain_and_lane_clusters() -> None:
    assert cluster_name("cart", "v1") == "cart|v1"
    assert cluster_name("cart", "v1", "") == "cart|v1"
    assert cluster_name("cart", "v1", "blue") == "cart|v1|blue"
    assert parse_cluster_name("cart|v1") == ("cart", "v1", "")
    assert parse_cluster_name("cart|v1|blue") == ("cart", "v1", "blue")


@pytest.mark.parametrize(
    "name",
    [
        "graylane_xds",  # a static cluster of the bootstrap, not one of ours
        "a|",
        "a|b|c|d",
        "",
        "|v1",
        "a||blue",
        "a|v1|",
    ],
)
def test_parse_cluster_name_rejects_other_names(name: str) -> None:
    assert parse_cluster_name(name) is None
