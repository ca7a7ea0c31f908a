"""Telemetry without processes: push-to-ACK timing, phase counts, the tracker feeding the
instruments, and the Prometheus text they export (parsed with prometheus_client's parser)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from envoy.config.core.v3 import base_pb2
from graylane.controlplane.domain.model.values import Phase
from graylane.controlplane.telemetry import (
    METRIC_AGENTS_CONNECTED,
    METRIC_ANALYSIS,
    METRIC_LOOP_LAG,
    METRIC_LOOP_LAG_CPU,
    METRIC_LOOP_LAG_MAX,
    METRIC_PROXIES_CONNECTED,
    METRIC_RELEASES,
    METRIC_XDS_NACKS,
    METRIC_XDS_PUSH_ACK,
    METRIC_XDS_PUSHES,
    LoopLag,
    PushAckTimer,
    Telemetry,
    agent_telemetry,
    configured_otlp_endpoint,
    otlp_traces_url,
    releases_by_phase,
    type_name,
)
from graylane.xds.resources import CLUSTER, ROUTE
from graylane.xds.tracker import ACKED, CONNECTED, PUSHED, Nack, ProxyEvent, ProxyTracker, Push, TypeAck
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(telemetry: Telemetry) -> dict[str, list[Sample]]:
    """Sample name -> samples, from the exported text."""
    body, content_type = telemetry.metrics_text()
    assert content_type.startswith("text/plain; version=")
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(telemetry: Telemetry, name: str, **labels: str) -> float:
    found = [s.value for s in samples(telemetry).get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples(telemetry).get(name))
    return found[0]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- PushAckTimer


def test_push_to_ack_is_timed_from_the_first_push_of_that_version() -> None:
    timer = PushAckTimer()
    timer.pushed("n", ROUTE, "v1", 1.0)
    timer.pushed("n", ROUTE, "v1", 1.5)  # sent again (a reconnect): the proxy waits since 1.0
    assert timer.acked("n", ROUTE, "v1", 1.25 + 1.0) == pytest.approx(1.25)
    assert timer.acked("n", ROUTE, "v1", 3.0) is None  # already ACKed
    assert len(timer) == 0


def test_an_ack_drops_older_pending_versions_and_other_types_are_apart() -> None:
    timer = PushAckTimer()
    timer.pushed("n", ROUTE, "v1", 1.0)
    timer.pushed("n", ROUTE, "v2", 2.0)
    timer.pushed("n", CLUSTER, "c1", 2.0)
    assert timer.acked("n", ROUTE, "v2", 2.5) == pytest.approx(0.5)
    assert timer.acked("n", ROUTE, "v1", 3.0) is None
    assert timer.acked("other", CLUSTER, "c1", 3.0) is None
    assert timer.acked("n", CLUSTER, "c1", 3.0) == pytest.approx(1.0)


def test_nack_disconnect_and_the_bound_drop_pending_pushes() -> None:
    timer = PushAckTimer(per_type=2)
    timer.pushed("n", ROUTE, "v1", 1.0)
    timer.nacked("n", ROUTE, "v1")
    assert timer.acked("n", ROUTE, "v1", 2.0) is None
    for i in range(5):
        timer.pushed("n", ROUTE, f"w{i}", float(i))
    assert len(timer) == 2 and timer.acked("n", ROUTE, "w0", 9.0) is None
    timer.forget("n")
    assert len(timer) == 0
    assert timer.acked("n", ROUTE, "unpushed", 1.0) is None  # an ACK of nothing pushed: no sample


# --------------------------------------------------------------------------- pure helpers


def test_releases_by_phase_names_every_phase() -> None:
    counts = releases_by_phase([Phase.PROGRESSING, Phase.PAUSED, Phase.PROGRESSING])
    assert counts == {p.name: 0 for p in Phase} | {"PROGRESSING": 2, "PAUSED": 1}


def test_type_name_is_the_short_message_name() -> None:
    assert type_name(ROUTE) == "RouteConfiguration"


def test_otlp_endpoint_from_option_or_environment() -> None:
    assert otlp_traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert otlp_traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"
    with pytest.raises(ValueError, match="expected a URL"):
        otlp_traces_url("collector:4318")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318"}
    assert configured_otlp_endpoint("http://opt:4318", env) == "http://opt:4318"
    assert configured_otlp_endpoint(None, env) == "http://env:4318"
    assert configured_otlp_endpoint(None, {}) is None


# --------------------------------------------------------------------------- tracker -> metrics


def test_tracker_events_become_metrics() -> None:
    clock = Clock()
    tracker = ProxyTracker()
    telemetry = Telemetry(clock=clock)
    telemetry.observe_proxies(tracker)
    assert value(telemetry, METRIC_PROXIES_CONNECTED) == 0

    tracker.connected(base_pb2.Node(id="envoy-1", cluster="c"), stream="envoy-1", key="10000", protocol="sotw")
    tracker.pushed("envoy-1", Push(ROUTE, "r1", "1", ("routes",)))
    tracker.pushed("envoy-1", Push(CLUSTER, "c1", "2", ("a",)))
    clock.now += 0.004
    tracker.acked("envoy-1", ROUTE, TypeAck("r1", {"routes": "x"}))
    tracker.pushed("envoy-1", Push(ROUTE, "r2", "3", ("routes",)))
    tracker.nacked("envoy-1", Nack(ROUTE, "r2", "3", "bad regex", 0.0))

    assert value(telemetry, METRIC_PROXIES_CONNECTED) == 1
    assert value(telemetry, METRIC_XDS_PUSHES, type="RouteConfiguration") == 2
    assert value(telemetry, METRIC_XDS_PUSHES, type="Cluster") == 1
    assert value(telemetry, METRIC_XDS_NACKS, type="RouteConfiguration") == 1
    assert value(telemetry, f"{METRIC_XDS_PUSH_ACK}_count", type="RouteConfiguration") == 1
    assert value(telemetry, f"{METRIC_XDS_PUSH_ACK}_sum", type="RouteConfiguration") == pytest.approx(0.004)
    assert value(telemetry, f"{METRIC_XDS_PUSH_ACK}_bucket", type="RouteConfiguration", le="0.005") == 1
    assert value(telemetry, f"{METRIC_XDS_PUSH_ACK}_bucket", type="RouteConfiguration", le="0.0025") == 0

    tracker.disconnected("envoy-1")
    assert value(telemetry, METRIC_PROXIES_CONNECTED) == 0


def test_gauges_without_a_source_export_nothing_and_sources_are_read_at_scrape() -> None:
    telemetry = Telemetry()
    names = samples(telemetry)
    assert METRIC_RELEASES not in names and METRIC_AGENTS_CONNECTED not in names
    agents = [0]
    phases: list[dict[str, int] | None] = [None]  # no store snapshot yet
    telemetry.observe_agents(lambda: agents[0])
    telemetry.observe_releases(lambda: phases[0])
    assert METRIC_RELEASES not in samples(telemetry)
    agents[0] = 3
    phases[0] = releases_by_phase([Phase.PROGRESSING])
    assert value(telemetry, METRIC_AGENTS_CONNECTED) == 3
    assert value(telemetry, METRIC_RELEASES, phase="PROGRESSING") == 1
    assert value(telemetry, METRIC_RELEASES, phase="FAILED") == 0


def test_analysis_outcomes_are_counted_and_checked() -> None:
    telemetry = Telemetry()
    telemetry.analysis_outcome("pass", "checkout-v2")
    telemetry.analysis_outcome("pass", "checkout-v2")
    telemetry.analysis_outcome("inconclusive", "checkout-v2")
    assert value(telemetry, METRIC_ANALYSIS, outcome="pass", release="checkout-v2") == 2
    assert value(telemetry, METRIC_ANALYSIS, outcome="inconclusive", release="checkout-v2") == 1
    with pytest.raises(ValueError, match="'maybe'"):
        telemetry.analysis_outcome("maybe", "checkout-v2")


async def test_telemetries_in_one_process_do_not_share_series() -> None:
    first, second = Telemetry(), Telemetry()
    first.analysis_outcome("fail", "r")
    assert value(first, METRIC_ANALYSIS, outcome="fail", release="r") == 1
    assert METRIC_ANALYSIS not in samples(second)
    await first.aclose()
    await first.aclose()  # idempotent
    second.analysis_outcome("pass", "r")  # still exporting
    assert value(second, METRIC_ANALYSIS, outcome="pass", release="r") == 1


def test_agent_telemetry_counts_its_proxies_only() -> None:
    tracker = ProxyTracker()
    telemetry = agent_telemetry(tracker)
    tracker.connected(base_pb2.Node(id="e"), stream="e", key="k", protocol="delta")
    assert value(telemetry, METRIC_PROXIES_CONNECTED) == 1
    assert value(telemetry, "target_info", service_name="graylane-agent") == 1
    assert METRIC_RELEASES not in samples(telemetry)
    assert not telemetry.tracing and telemetry.server_interceptors() == []


# --------------------------------------------------------------------------- tracker listeners


def test_tracker_listeners_hear_events_after_the_state_changes_and_can_leave() -> None:
    tracker = ProxyTracker()
    heard: list[tuple[ProxyEvent, int]] = []

    def listener(event: ProxyEvent) -> None:
        status = tracker.get(event.stream)
        heard.append((event, len(status.pushes) if status else -1))

    remove = tracker.add_listener(listener)
    tracker.pushed("unknown", Push(ROUTE, "r1", "1", ()))  # no such proxy: nothing recorded, nothing heard
    tracker.connected(base_pb2.Node(id="n"), stream="n", key="k", protocol="sotw")
    tracker.pushed("n", Push(ROUTE, "r1", "1", ()))
    tracker.acked("n", ROUTE, TypeAck("r1"))
    remove()
    remove()
    tracker.pushed("n", Push(ROUTE, "r2", "2", ()))
    assert heard == [
        (ProxyEvent(CONNECTED, "n", stream="n"), 0),
        (ProxyEvent(PUSHED, "n", ROUTE, "r1", stream="n"), 1),
        (ProxyEvent(ACKED, "n", ROUTE, "r1", stream="n"), 1),
    ]


def test_a_failing_listener_is_logged_and_never_breaks_the_tracker(caplog: pytest.LogCaptureFixture) -> None:
    tracker = ProxyTracker()
    heard: list[ProxyEvent] = []

    def broken(event: ProxyEvent) -> None:
        raise RuntimeError("boom")

    tracker.add_listener(broken)
    tracker.add_listener(heard.append)
    with caplog.at_level(logging.ERROR, logger="graylane.xds.tracker"):
        tracker.connected(base_pb2.Node(id="n"), stream="n", key="k", protocol="sotw")
    assert tracker.get("n") is not None and heard == [ProxyEvent(CONNECTED, "n", stream="n")]
    assert "proxy listener" in caplog.text


# --------------------------------------------------------------------------- event-loop lag


def test_loop_lag_keeps_the_latest_wake_with_its_cpu_until_taken() -> None:
    seen: list[float] = []
    lag = LoopLag(interval=0.01, on_lag=seen.append)
    lag.woke(0.002, 0.0)
    lag.woke(0.120, 0.110)  # a step of ours held the loop
    lag.woke(0.030, 0.001)  # later, a shorter wait for a core
    lag.woke(-0.0001, 0.0)  # a timer's early wake reads as none
    assert seen == [0.002, 0.120, 0.030, 0.0]
    assert lag.take_longest() == (0.120, 0.110)
    assert lag.take_longest() == (0.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        LoopLag(interval=0)


def test_loop_lag_is_exported_and_each_scrape_reads_its_own_interval() -> None:
    telemetry = Telemetry()
    names = samples(telemetry)
    assert not {METRIC_LOOP_LAG_MAX, METRIC_LOOP_LAG_CPU, f"{METRIC_LOOP_LAG}_count"} & set(names)  # no probe
    lag = telemetry.observe_loop(interval=0.01)
    lag.woke(0.004, 0.0)
    lag.woke(0.080, 0.075)
    first = samples(telemetry)
    assert [s.value for s in first[METRIC_LOOP_LAG_MAX]] == [0.080]
    assert [s.value for s in first[METRIC_LOOP_LAG_CPU]] == [0.075]
    assert value(telemetry, f"{METRIC_LOOP_LAG}_count") == 2
    assert value(telemetry, f"{METRIC_LOOP_LAG}_bucket", le="0.005") == 1
    assert value(telemetry, f"{METRIC_LOOP_LAG}_bucket", le="0.1") == 2
    # The next scrape covers what happened since this one: nothing.
    assert value(telemetry, METRIC_LOOP_LAG_MAX) == 0.0
    assert value(telemetry, METRIC_LOOP_LAG_CPU) == 0.0


async def test_loop_lag_probe_reads_a_step_that_holds_the_loop() -> None:
    lag = LoopLag(interval=0.005)
    probe = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.02)  # the probe sleeps
        held_until = time.thread_time() + 0.1
        while time.thread_time() < held_until:  # a step that holds the loop for 100 ms of CPU
            pass
        deadline = time.monotonic() + 5.0
        longest = (0.0, 0.0)
        while longest[0] < 0.09 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            got = lag.take_longest()
            longest = max(longest, got)
        assert longest[0] >= 0.09, longest
        assert longest[1] >= 0.09, longest  # the loop thread's own CPU, not a wait for a core
    finally:
        probe.cancel()
