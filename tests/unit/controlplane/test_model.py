"""Release spec validation: bad input raises InvalidArgument naming the offending field."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from graylane.controlplane.domain.model.agent_codec import split_host_port
from graylane.controlplane.domain.model.codec import release_from_proto, spec_to_proto
from graylane.controlplane.domain.model.validation import (
    MAX_ANALYSIS_INTERVAL,
    MAX_BATCHES,
    MAX_CONDITIONS,
    MAX_GRAY_CLUSTERS,
    MAX_PAUSE,
    MAX_RULES,
    MAX_SERVICES,
    MAX_URL_BYTES,
    MAX_VALUE_BYTES,
    MAX_VERSION_ENDPOINTS,
    MAX_WEBHOOKS,
    check_text,
    cookie_regex,
    lane_regex,
    service_from_proto,
    spec_from_proto,
    version_from_proto,
)
from graylane.controlplane.domain.model.values import Cohort, MatchKind
from graylane.controlplane.errors import InvalidArgument
from graylane.controlplane.reconcile import views
from graylane.v1 import release_pb2 as pb
from graylane.xds import render, view


def spec(**changes: object) -> pb.ReleaseSpec:
    """A valid canary spec of a two-service lane entering at gateway, with `changes` applied."""
    message = pb.ReleaseSpec(
        lane="blue",
        entry="gateway",
        services=[
            pb.ServiceVersions(service="gateway", base_version="v1", gray_version="v2"),
            pb.ServiceVersions(service="cart", base_version="v1", gray_version="v2"),
        ],
        strategy=pb.CANARY,
        batches=[pb.Batch(weight=10, pause=pb.Pause(manual=True)), pb.Batch(weight=50, pause=pb.Pause(manual=True))],
    )
    for name, value in changes.items():
        if isinstance(value, list):
            del getattr(message, name)[:]
            getattr(message, name).extend(value)
        elif isinstance(value, pb.Cohort):
            message.cohort.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def invalid_field(message: pb.ReleaseSpec) -> str:
    with pytest.raises(InvalidArgument) as raised:
        spec_from_proto(message)
    assert str(raised.value).startswith(f"{raised.value.field}: ")
    assert raised.value.reason
    return raised.value.field


def test_the_base_spec_is_valid() -> None:
    parsed = spec_from_proto(spec())
    assert (parsed.lane, parsed.entry, parsed.cohort) == ("blue", "gateway", None)


@pytest.mark.parametrize("lane", ["Bad Lane!", "lane,x", "a=b"])
def test_a_lane_that_is_no_plain_token_is_rejected(lane: str) -> None:
    assert invalid_field(spec(lane=lane)) == "spec.lane"


def test_an_entry_outside_the_services_is_rejected() -> None:
    assert invalid_field(spec(entry="zz")) == "spec.entry"


def test_a_service_listed_twice_is_rejected() -> None:
    twice = spec(
        services=[
            pb.ServiceVersions(service="gateway", base_version="v1", gray_version="v2"),
            pb.ServiceVersions(service="gateway", base_version="v1", gray_version="v3"),
        ]
    )
    assert invalid_field(twice) == "spec.services[1].service"


def test_a_gray_version_equal_to_base_is_rejected() -> None:
    same = spec(services=[pb.ServiceVersions(service="gateway", base_version="v1", gray_version="v1")])
    assert invalid_field(same) == "spec.services[0].gray_version"


def test_a_cohort_with_both_header_and_cookie_is_rejected() -> None:
    assert invalid_field(spec(cohort=pb.Cohort(header="x-user-id", cookie="uid"))) == "spec.cohort"


def test_a_cohort_header_that_is_no_header_name_is_rejected() -> None:
    assert invalid_field(spec(cohort=pb.Cohort(header="X User"))) == "spec.cohort.header"


@pytest.mark.parametrize(
    ("cohort", "expected"),
    [
        (pb.Cohort(header="x-user-id"), Cohort(MatchKind.HEADER, "x-user-id")),
        (pb.Cohort(cookie="uid"), Cohort(MatchKind.COOKIE, "uid")),
    ],
)
def test_a_valid_cohort_round_trips(cohort: pb.Cohort, expected: Cohort) -> None:
    message = spec(cohort=cohort)
    parsed = spec_from_proto(message)

    assert parsed.cohort == expected
    back = spec_to_proto(parsed)
    assert back.HasField("cohort")
    assert back.cohort == cohort
    assert spec_from_proto(back) == parsed


# ------------------------------------------------------------------ bad input (issue 11)


def rule(*conditions: pb.Condition) -> pb.MatchRule:
    return pb.MatchRule(conditions=list(conditions))


def header(name: str = "x-canary", value: str = "1") -> pb.Condition:
    return pb.Condition(kind=pb.HEADER, name=name, op=pb.EXACT, value=value)


def pause(seconds: int, nanos: int = 0) -> pb.Batch:
    return pb.Batch(weight=10, pause=pb.Pause(duration=Duration(seconds=seconds, nanos=nanos)))


def test_a_name_ending_in_a_newline_is_rejected_everywhere() -> None:
    sv = pb.ServiceVersions
    assert invalid_field(spec(lane="blue\n")) == "spec.lane"
    assert invalid_field(spec(entry="gateway\n")) == "spec.entry"
    bad_service = [sv(service="gateway\n", base_version="v1", gray_version="v2")]
    assert invalid_field(spec(services=bad_service, entry="")) == "spec.services[0].service"
    bad_version = [sv(service="gateway", base_version="v1", gray_version="v2\n")]
    assert invalid_field(spec(services=bad_version)) == "spec.services[0].gray_version"
    with_cluster = spec()
    with_cluster.placement.gray_clusters.append("east\n")
    assert invalid_field(with_cluster) == "spec.placement.gray_clusters[0]"
    assert invalid_field(spec(match=[rule(header(name="x-canary\n"))])) == "spec.match[0].conditions[0].name"
    cookie = pb.Condition(kind=pb.COOKIE, name="beta\n", op=pb.PRESENT)
    assert invalid_field(spec(match=[rule(cookie)])) == "spec.match[0].conditions[0].name"
    assert invalid_field(spec(cohort=pb.Cohort(header="x-user\n"))) == "spec.cohort.header"
    assert invalid_field(spec(cohort=pb.Cohort(cookie="uid\n"))) == "spec.cohort.cookie"
    with pytest.raises(InvalidArgument, match=r"^service\.name: "):
        service_from_proto(pb.Service(name="evil\n", stable_version="v1"))
    with pytest.raises(InvalidArgument, match=r"^version\.name: "):
        version_from_proto(pb.Version(service="cart", name="v1\n"))
    with pytest.raises(InvalidArgument, match=r"^version\.endpoints\[0\]\.address: "):
        version_from_proto(pb.Version(service="cart", name="v1", endpoints=[pb.Endpoint(address="a.b\n", port=80)]))
    hooked = spec()
    hooked.analysis.baseline = True
    hooked.analysis.webhooks.add(name="gate\n", kind=pb.CONFIRM_BATCH, url="http://ci.example/ok")
    assert invalid_field(hooked) == "spec.analysis.webhooks[0].name"


@pytest.mark.parametrize(("change", "field"), [({"kind": 99}, ".kind"), ({"op": 77}, ".op")])
def test_an_unknown_match_kind_or_op_names_the_field(change: dict[str, int], field: str) -> None:
    condition = header()
    for key, value in change.items():
        setattr(condition, key, value)
    assert invalid_field(spec(match=[rule(header(), condition)])) == "spec.match[0].conditions[1]" + field


@pytest.mark.parametrize("name", ["a&b", "a=b", "a#b", "a b", "utm\n", "q" * 257])
def test_a_bad_query_parameter_name_is_rejected(name: str) -> None:
    condition = pb.Condition(kind=pb.QUERY, name=name, op=pb.EXACT, value="1")
    assert invalid_field(spec(match=[rule(condition)])) == "spec.match[0].conditions[0].name"


@pytest.mark.parametrize("name", ["utm_source", "filter[id]", "a.b~c", "%E2%9C%93"])
def test_query_parameter_names_as_urls_carry_them_pass(name: str) -> None:
    condition = pb.Condition(kind=pb.QUERY, name=name, op=pb.PRESENT)
    assert spec_from_proto(spec(match=[rule(condition)])).match[0][0].name == name


@pytest.mark.parametrize(
    ("op", "value"),
    [(pb.EXACT, "x" * 80), (pb.PREFIX, "y" * 80), (pb.REGEX, "[a-f0-9]{40}"), (pb.PRESENT, "")],
)
def test_cookie_rules_are_checked_as_the_regex_envoy_gets(op: int, value: str) -> None:
    name = "c" * 90 if op == pb.PRESENT else "session"
    condition = pb.Condition(kind=pb.COOKIE, name=name, op=op, value=value)
    field = "name" if op == pb.PRESENT else "value"
    assert invalid_field(spec(match=[rule(condition)])) == f"spec.match[0].conditions[0].{field}"
    # The same condition, small enough, passes; and the regex checked is the one rendered.
    small = pb.Condition(kind=pb.COOKIE, name="session", op=op, value=value[:8] if op != pb.REGEX else "[a-f]+")
    parsed = spec_from_proto(spec(match=[rule(small)])).match[0][0]
    rendered = render._cookie_regex(
        view.Condition(
            kind=view.MatchKind[parsed.kind.name], name=parsed.name, op=view.MatchOp[parsed.op.name], value=parsed.value
        )
    )
    assert cookie_regex(parsed.name, parsed.op, parsed.value) == rendered


def test_a_lane_too_long_for_envoys_baggage_regex_is_rejected() -> None:
    assert lane_regex("blue") == render._baggage_member_regex("blue")
    assert spec_from_proto(spec(lane="l" * 50)).lane == "l" * 50
    assert invalid_field(spec(lane="l" * 63)) == "spec.lane"


def test_size_limits_name_the_field() -> None:
    sv = pb.ServiceVersions
    cases: list[tuple[pb.ReleaseSpec, str]] = [
        (spec(match=[rule(header())] * (MAX_RULES + 1)), "spec.match"),
        (spec(match=[rule(*[header()] * (MAX_CONDITIONS + 1))]), "spec.match[0].conditions"),
        (spec(match=[rule(header(value="v" * (MAX_VALUE_BYTES + 1)))]), "spec.match[0].conditions[0].value"),
        (
            spec(
                services=[sv(service=f"s{i}", base_version="v1", gray_version="v2") for i in range(MAX_SERVICES + 1)],
                entry="s0",
            ),
            "spec.services",
        ),
        (spec(batches=[pb.Batch(weight=10, pause=pb.Pause(manual=True))] * (MAX_BATCHES + 1)), "spec.batches"),
        (spec(match=[rule(*[header(value="v" * 4000)] * 16)] * 5), "spec"),
    ]
    for message, field in cases:
        assert invalid_field(message) == field
    many_clusters = spec()
    many_clusters.placement.gray_clusters.extend(f"c{i}" for i in range(MAX_GRAY_CLUSTERS + 1))
    assert invalid_field(many_clusters) == "spec.placement.gray_clusters"
    hooks = spec()
    hooks.analysis.baseline = True
    for i in range(MAX_WEBHOOKS + 1):
        hooks.analysis.webhooks.add(name=f"h{i}", kind=pb.POST_ROLLOUT, url="http://ci.example/")
    assert invalid_field(hooks) == "spec.analysis.webhooks"
    long_url = spec()
    long_url.analysis.baseline = True
    long_url.analysis.webhooks.add(name="h", kind=pb.POST_ROLLOUT, url="http://ci.example/" + "p" * MAX_URL_BYTES)
    assert invalid_field(long_url) == "spec.analysis.webhooks[0].url"
    # At the limits themselves, everything passes.
    full = spec(match=[rule(*[header(value="v" * 200)] * MAX_CONDITIONS)] * MAX_RULES)
    assert len(spec_from_proto(full).match) == MAX_RULES


def test_service_and_version_text_is_bounded() -> None:
    with pytest.raises(InvalidArgument, match=r"^service\.description: .* above the limit of 4096"):
        service_from_proto(pb.Service(name="cart", stable_version="v1", description="d" * 4097))
    md = pb.VersionMetadata
    for metadata, field in [
        (md(image="i" * 1025), "image"),
        (md(author="a" * 257), "author"),
        (md(change_summary="c" * 4097), "change_summary"),
        (md(created=Timestamp(seconds=2**62)), "created"),
    ]:
        with pytest.raises(InvalidArgument, match=rf"^version\.metadata\.{field}: "):
            version_from_proto(pb.Version(service="cart", name="v1", metadata=metadata))
    endpoints = [pb.Endpoint(address="10.0.0.1", port=1000 + i) for i in range(MAX_VERSION_ENDPOINTS + 1)]
    with pytest.raises(InvalidArgument, match=r"^version\.endpoints: "):
        version_from_proto(pb.Version(service="cart", name="v1", endpoints=endpoints))
    assert check_text("reason", "r" * 4096) == "r" * 4096
    with pytest.raises(InvalidArgument, match=r"^reason: is 4097 bytes"):
        check_text("reason", "r" * 4097)


def test_a_pause_above_thirty_days_is_rejected_naming_the_field() -> None:
    hours = 80_000_000 * 3600
    with pytest.raises(InvalidArgument, match=r"^spec\.batches\[1\]\.pause\.duration: .* above the maximum of 30d"):
        spec_from_proto(spec(batches=[pause(60), pause(hours)]))
    for seconds, nanos in [(2**62, 0), (5, -1), (0, 2_000_000_000)]:
        assert invalid_field(spec(batches=[pause(seconds, nanos)])) == "spec.batches[0].pause.duration"
    at_limit = spec_from_proto(spec(batches=[pause(int(MAX_PAUSE.total_seconds()))]))
    assert at_limit.batches[0].pause == MAX_PAUSE


def test_analysis_interval_and_webhook_timeout_are_bounded() -> None:
    interval = spec()
    interval.analysis.baseline = True
    interval.analysis.interval.FromTimedelta(MAX_ANALYSIS_INTERVAL + timedelta(seconds=1))
    assert invalid_field(interval) == "spec.analysis.interval"
    timeout = spec()
    timeout.analysis.baseline = True
    hook = timeout.analysis.webhooks.add(name="gate", kind=pb.CONFIRM_BATCH, url="http://ci.example/ok")
    hook.timeout.seconds = 2**62
    assert invalid_field(timeout) == "spec.analysis.webhooks[0].timeout"


def test_a_stored_out_of_range_value_is_clamped_on_read_and_never_overflows() -> None:
    """An older version let these in: reading them back must not fail, nor overflow later."""
    stored = spec(batches=[pause(80_000_000 * 3600)], match=[rule(header())] * (MAX_RULES + 10))
    stored.analysis.baseline = True
    stored.analysis.interval.seconds = 10**9
    message = pb.Release(name="old", spec=stored, status=pb.ReleaseStatus(phase=pb.PROGRESSING, batch=0, reached=True))
    message.status.batch_reached.GetCurrentTime()
    release = release_from_proto(message, revision=7)
    assert release.spec.batches[0].pause == MAX_PAUSE
    assert release.spec.analysis is not None
    assert release.spec.analysis.interval_s == MAX_ANALYSIS_INTERVAL.total_seconds()
    assert len(release.spec.match) == MAX_RULES + 10
    assert release.status.batch_reached is not None
    no_analysis = release_from_proto(
        pb.Release(name="old", spec=spec(batches=[pause(80_000_000 * 3600)]), status=message.status), revision=7
    )
    assert views.pause_due(no_analysis) == release.status.batch_reached + MAX_PAUSE


def test_stored_services_and_versions_are_read_without_the_size_limits() -> None:
    big = pb.Service(name="cart", stable_version="v1", description="d" * 10_000)
    assert service_from_proto(big, stored=True).description == "d" * 10_000
    version = pb.Version(service="cart", name="v1", metadata=pb.VersionMetadata(change_summary="c" * 10_000))
    assert version_from_proto(version, stored=True).change_summary == "c" * 10_000


@pytest.mark.parametrize(
    ("text", "parts"),
    [("10.0.0.9:1", ("10.0.0.9", 1)), ("[fd00::9]:15443", ("fd00::9", 15443))],
)
def test_an_agent_gateway_address_is_read_as_every_address_is(text: str, parts: tuple[str, int]) -> None:
    assert split_host_port("hello.gateway_address", text) == parts


def test_host_names_are_refused_as_endpoints_and_gateways_but_still_read_back() -> None:
    # Envoy's EDS takes IP literals only ("malformed IP address"); over SotW one such address
    # made every proxy refuse every endpoint update. New values are refused, naming the
    # field; values an older Graylane stored are still read (refusing them would drop the
    # whole record).
    with pytest.raises(InvalidArgument, match=r"hello.gateway_address.*is not an IP address \(Envoy takes"):
        split_host_port("hello.gateway_address", "gw.east:15443")
    assert split_host_port("hello.gateway_address", "gw.east:15443", stored=True) == ("gw.east", 15443)
    named = pb.Version(service="cart", name="v1", endpoints=[pb.Endpoint(address="cart.internal", port=80)])
    with pytest.raises(InvalidArgument, match=r"version.endpoints\[0\].address.*'cart.internal' is not an IP"):
        version_from_proto(named)
    assert [e.address for e in version_from_proto(named, stored=True).endpoints] == ["cart.internal"]
    assert [
        e.address
        for e in version_from_proto(
            pb.Version(
                service="cart",
                name="v1",
                endpoints=[pb.Endpoint(address="10.1.2.3", port=80), pb.Endpoint(address="fd00::1", port=80)],
            )
        ).endpoints
    ] == ["10.1.2.3", "fd00::1"]


@pytest.mark.parametrize(
    "text", ["nowhere", "fd00::9:15443", "gw:0", "gw:70000", "gw_east:80", "[fd00::9]", "gw.east:15443"]
)
def test_a_bad_gateway_address_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument, match="hello.gateway_address"):
        split_host_port("hello.gateway_address", text)
