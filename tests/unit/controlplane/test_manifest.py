"""Manifest parsing: the example file, accepted spellings, and errors that name the field."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from graylane.agent.sources import EndpointFileError, parse_endpoints
from graylane.controlplane.cli.base import UsageError
from graylane.controlplane.cli.releases import read_manifest
from graylane.controlplane.domain.manifest import MAX_DEPTH, MAX_MANIFEST_BYTES, ManifestError, load_manifest
from graylane.v1 import release_pb2 as pb

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "release.yaml"


def _rule(kind: pb.MatchKind, name: str, op: pb.MatchOp, value: str) -> pb.MatchRule:
    return pb.MatchRule(conditions=[pb.Condition(kind=kind, name=name, op=op, value=value)])


def _checkout_version(name: str, tag: str, summary: str, port: int) -> pb.Version:
    """A checkout version as the example file writes it: payments-team's image `tag`, one endpoint."""
    return pb.Version(
        service="checkout",
        name=name,
        metadata=pb.VersionMetadata(
            image=f"registry.example.com/checkout:{tag}", author="payments-team", change_summary=summary
        ),
        endpoints=[pb.Endpoint(address="127.0.0.1", port=port)],
    )


def test_example_file_parses_into_the_expected_protos() -> None:
    objects = load_manifest(EXAMPLE.read_text(), source=str(EXAMPLE))

    manual = pb.Pause(manual=True)
    assert objects == [
        pb.Service(
            name="checkout",
            stable_version="v1",
            description="Checkout API (cart totals, payment hand-off)",
        ),
        _checkout_version("v1", "1.14.2", "current production build", 18081),
        _checkout_version("v2", "1.15.0", "new tax rounding; retries payment hand-off once", 18082),
        pb.Release(
            name="checkout-v2",
            spec=pb.ReleaseSpec(
                lane="checkout-v2",
                entry="checkout",
                services=[pb.ServiceVersions(service="checkout", base_version="v1", gray_version="v2")],
                strategy=pb.CANARY,
                match=[
                    _rule(pb.HEADER, "x-canary", pb.EXACT, "always"),
                    _rule(pb.COOKIE, "user", pb.PREFIX, "beta-"),
                ],
                batches=[
                    pb.Batch(weight=10, pause=manual),
                    pb.Batch(weight=20, pause=pb.Pause(duration=duration_pb2.Duration(seconds=30))),
                    pb.Batch(weight=50, pause=manual),
                    pb.Batch(weight=100, pause=manual),
                ],
            ),
        ),
    ]


def test_camel_case_names_lower_case_enums_and_default_kind() -> None:
    [release] = load_manifest(
        """
name: r
spec:
  strategy: blue_green
  services: [{service: a, baseVersion: v1, grayVersion: v2}]
  placement: {grayClusters: [eu]}
"""
    )
    assert release == pb.Release(
        name="r",
        spec=pb.ReleaseSpec(
            strategy=pb.BLUE_GREEN,
            services=[pb.ServiceVersions(service="a", base_version="v1", gray_version="v2")],
            placement=pb.Placement(gray_clusters=["eu"]),
        ),
    )


@pytest.mark.parametrize(
    ("text", "seconds", "nanos"),
    [("30s", 30, 0), ("1.5s", 1, 500_000_000), ("5m", 300, 0), ("1h30m", 5400, 0), ("250ms", 0, 250_000_000)],
)
def test_durations(text: str, seconds: int, nanos: int) -> None:
    [release] = load_manifest(f"name: r\nspec:\n  batches: [{{weight: 1, pause: {{duration: {text}}}}}]\n")
    assert isinstance(release, pb.Release)
    assert release.spec.batches[0].pause.duration == duration_pb2.Duration(seconds=seconds, nanos=nanos)


def test_unquoted_yaml_timestamp_becomes_a_proto_timestamp() -> None:
    [version] = load_manifest("kind: Version\nservice: a\nname: v1\nmetadata: {created: 2024-05-01T10:00:00Z}\n")
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC))
    assert isinstance(version, pb.Version)
    assert version.metadata.created == expected


def test_empty_documents_are_skipped_but_counted() -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest("kind: Service\nname: a\n---\n---\nkind: Service\nname: b\nstable: v1\n", source="f.yaml")
    assert str(caught.value).startswith("f.yaml: document 3: stable: unknown field")


RELEASE = "kind: Release\nname: r\nspec:\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            RELEASE + "  batches:\n    - weight: 10\n    - weight: 20\n      pause: {durations: 30s}\n",
            "document 1: spec.batches[1].pause.durations: unknown field; Pause has: manual, duration",
        ),
        (RELEASE + "  lanes: x\n", "document 1: spec.lanes: unknown field; ReleaseSpec has: lane, entry,"),
        (
            "name: r\nservices: []\nspec: {lane: x}\n",
            "document 1: services: unknown field; a Release has kind, name and spec",
        ),
        ("kind: Relaese\nname: r\n", "document 1: kind: unknown kind 'Relaese'; expected one of: Release, Service"),
        ("- a\n- b\n", "document 1: expected a mapping with a `kind`, got a list"),
        (RELEASE + "  services: {service: a}\n", "document 1: spec.services: expected a list, got a mapping"),
        (RELEASE + "  batches: [{weight: ten}]\n", "spec.batches[0].weight: expected an integer, got 'ten'"),
        (RELEASE + "  batches: [{weight: -5}]\n", "spec.batches[0].weight: expected a non-negative integer, got -5"),
        (RELEASE + "  lane: 3\n", "spec.lane: expected a string, got 3 (quote it)"),
        (
            RELEASE + "  strategy: rolling\n",
            "spec.strategy: unknown value 'rolling'; expected one of: CANARY, BLUE_GREEN, AB",
        ),
        (
            RELEASE + "  batches: [{weight: 1, pause: {manual: true, duration: 3s}}]\n",
            "spec.batches[0].pause.duration: set only one of manual and duration",
        ),
        (RELEASE + "  batches: [{weight: 1, pause: {duration: 30}}]\n", 'expected a duration such as "30s"'),
        (RELEASE + "  lane: a\n  Lane: b\n", "spec.Lane: unknown field"),
        (
            RELEASE + "  services: [{service: a, base_version: v1, baseVersion: v1}]\n",
            "spec.services[0].baseVersion: base_version is given twice",
        ),
        ("kind: Release\nspec: {lane: x}\n", "document 1: name: required"),
        ("kind: Release\nname: r\n", "document 1: spec: required"),
        ("kind: Version\nname: v1\n", "document 1: service: required"),
        ("kind: Service\nname: a\n---\nkind: Service\nname: [b]\n", "document 2: name: expected a string, got a list"),
        ("kind: Service\nname: a\n---\nname: r\nspec: {lane: [x}\n", "document 2: invalid YAML at line 5, column"),
        ("", "no documents"),
    ],
)
def test_errors_name_the_document_and_field(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest(text, source="release.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("release.yaml: ")


def _alias_bomb(levels: int = 10) -> str:
    """The "billion laughs": 9**levels strings from a few hundred bytes of aliases."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "kind: Service\nname: cart\nstable_version: v1\ndescription: *l9\n" + "\n".join(lines)


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    started = time.thread_time()  # CPU, not wall: a loaded machine must not fail it
    with pytest.raises(ManifestError, match=r"bomb\.yaml: document 1: .*aliases \(\*name\) are not allowed"):
        load_manifest(_alias_bomb(), source="bomb.yaml")
    assert time.thread_time() - started < 0.5


def test_any_alias_or_merge_key_is_refused() -> None:
    text = "kind: Service\nname: &n cart\nstable_version: *n\n"
    with pytest.raises(ManifestError, match="aliases"):
        load_manifest(text)
    merge = "kind: Release\nname: r\nspec:\n  lane: &l blue\n  entry: *l\n"
    with pytest.raises(ManifestError, match="aliases"):
        load_manifest(merge)


def test_deep_nesting_and_oversized_manifests_are_refused_fast() -> None:
    started = time.thread_time()  # CPU, not wall: a loaded machine must not fail it
    with pytest.raises(ManifestError, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_manifest("spec: " + "[" * 5_000 + "]" * 5_000)
    with pytest.raises(ManifestError, match=f"above the limit of {MAX_MANIFEST_BYTES}"):
        load_manifest("# padding\n" * (MAX_MANIFEST_BYTES // 10 + 1))
    assert time.thread_time() - started < 0.5


def test_the_agents_endpoints_file_refuses_aliases_too() -> None:
    text = "versions:\n  - &v {service: cart, version: v1, endpoints: [{address: 10.0.0.1, port: 80}]}\n  - *v\n"
    with pytest.raises(EndpointFileError, match="aliases"):
        parse_endpoints(text)


def test_graylane_apply_reads_an_alias_bomb_file_and_refuses_it_fast(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    started = time.thread_time()  # CPU, not wall: a loaded machine must not fail it
    with pytest.raises(UsageError, match=r"bomb\.yaml: document 1: .*aliases"):
        read_manifest(str(path))
    assert time.thread_time() - started < 0.5
