"""Release spec validation: bad input raises InvalidArgument naming the offending field."""

from __future__ import annotations

import pytest
from graylane.controlplane.errors import InvalidArgument
from graylane.controlplane.model import Cohort, MatchKind, spec_from_proto, spec_to_proto
from graylane.v1 import release_pb2 as pb


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
