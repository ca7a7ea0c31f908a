"""Presentation of API objects: `-o table|json|yaml`, the tables and the one-line status.

Pure functions of protobuf messages; control characters a caller chose are escaped here, so
no text from the server can move a terminal's cursor. Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any, Final, TypeVar

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from graylane.controlplane.address import HostPort
from graylane.v1 import release_pb2, release_service_pb2

_M = TypeVar("_M", bound=Message)


OUTPUT_FORMATS: Final = ("table", "json", "yaml")


def to_dict(message: Message) -> dict[str, Any]:
    """Proto field names, and zero values included: `.status.batch` of 0 is the first
    batch, and a script should see it rather than a missing key. 64-bit integers are
    numbers, as every other count is (protobuf's JSON mapping writes them as strings, so
    `.revision` and `.status.events` read "12" beside `.status.batch` 1)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(message.DESCRIPTOR, data)
    return data


_INT64_TYPES: Final = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _int64_as_numbers(descriptor: Any, data: dict[str, Any]) -> None:  # a message Descriptor (upb or Python)
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None:
            continue
        if field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if field.message_type.full_name.startswith("google.protobuf."):
                continue  # well-known types have their own JSON forms (timestamps, durations)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    _int64_as_numbers(field.message_type, item)


def render_json(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def render_yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False).rstrip("\n")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def escape_control(text: str) -> str:
    """`text` with control characters (and bidi overrides, which reorder what a terminal
    shows) written as escapes: text a caller chose (a reason, an actor, a webhook's answer)
    cannot move the cursor, rewrite earlier lines or fake a row."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, without trailing blanks; every cell escaped."""
    rows = [[escape_control(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in (header, *rows)]
    return "\n".join(line.rstrip() for line in lines)


def phase_name(phase: int) -> str:
    return "-" if phase == release_pb2.PHASE_UNSPECIFIED else release_pb2.Phase.Name(phase)


def batch_label(release: release_pb2.Release) -> str:
    """1-based batch over the count; 0 before the first batch (status.batch == -1)."""
    return f"{release.status.batch + 1}/{len(release.spec.batches)}"


def reached_label(status: release_pb2.ReleaseStatus) -> str:
    convergence = status.convergence
    counts = f"{convergence.converged}/{convergence.proxies}"
    return f"yes {counts}" if status.reached else f"no {counts}"


def timestamp_label(timestamp: Timestamp) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


RELEASE_HEADER: Final = ("NAME", "PHASE", "BATCH", "WEIGHT", "REACHED", "LANE", "STRATEGY")


def release_row(release: release_pb2.Release) -> list[str]:
    return [
        release.name,
        phase_name(release.status.phase),
        batch_label(release),
        f"{release.status.weight}%",
        reached_label(release.status),
        release.spec.lane or "-",
        release_pb2.Strategy.Name(release.spec.strategy).removeprefix("STRATEGY_"),
    ]


def transition_label(from_phase: int, to_phase: int) -> str:
    """`FROM->TO`, or just the phase when the event did not change it (or had none before)."""
    if from_phase in (to_phase, release_pb2.PHASE_UNSPECIFIED):
        return phase_name(to_phase)
    return f"{phase_name(from_phase)}->{phase_name(to_phase)}"


HISTORY_HEADER: Final = ("SEQ", "TIME", "ACTION", "ACTOR", "FROM->TO", "BATCH", "WEIGHT", "REASON")


def event_row(event: release_pb2.Event) -> list[str]:
    from_batch, to_batch = event.from_batch + 1, event.to_batch + 1
    return [
        str(event.sequence),
        timestamp_label(event.at),
        event.action,
        event.actor or "-",
        transition_label(event.from_phase, event.to_phase),
        str(to_batch) if from_batch == to_batch else f"{from_batch}->{to_batch}",
        f"{event.weight}%",
        event.reason or "-",
    ]


def status_line(release: release_pb2.Release) -> str:
    """One human line: name, phase, batch i/n, weight, convergence, reason, last NACK."""
    return escape_control(f"{release.name}: {status_summary(release)}")


def status_summary(release: release_pb2.Release) -> str:
    status = release.status
    convergence = status.convergence
    parts = [
        phase_name(status.phase),
        f"batch {batch_label(release)}",
        f"weight {status.weight}%"
        if not status.HasField("held_batch")
        else f"weight {status.served_weight}% served (held by a NACK; the batch asks {status.weight}%)",
        f"{'reached' if status.reached else 'not reached'}"
        f" ({convergence.converged}/{convergence.proxies} proxies converged)",
    ]
    if status.HasField("held_lane"):
        lane = status.held_lane
        versions = ", ".join(f"{s.service} {s.gray_version}" for s in lane.services)
        parts.append(f"serving the lane as accepted: {len(lane.match)} rules, {versions}")
    if convergence.gone:
        parts.append(f"{convergence.gone} proxies declared gone: {'; '.join(convergence.gone_names)}")
    if convergence.lagging:
        parts.append(f"lagging: {'; '.join(convergence.lagging)}")
    if status.reason:
        parts.append(f"reason: {status.reason}")
    if status.HasField("last_nack"):
        nack = status.last_nack
        resource = nack.type_url.rsplit("/", 1)[-1].rsplit(".", 1)[-1] or "config"
        where = f" (cluster {nack.cluster or '-'}, stream {nack.stream})" if nack.stream else ""
        parts.append(f"last NACK: {nack.node or '?'}{where} rejected {resource} {nack.version}: {nack.message}")
    return ", ".join(parts)


def endpoint_label(endpoint: release_pb2.Endpoint) -> str:
    address = str(HostPort(endpoint.address, endpoint.port))
    return f"{address}@{endpoint.cluster}" if endpoint.cluster else address


def render_releases(response: release_service_pb2.ListReleasesResponse) -> str:
    return render_table(RELEASE_HEADER, [release_row(r) for r in response.releases])


def render_release(release: release_pb2.Release) -> str:
    return render_table(RELEASE_HEADER, [release_row(release)])


def render_history(response: release_service_pb2.HistoryResponse) -> str:
    return render_table(HISTORY_HEADER, [event_row(e) for e in response.events])


def render_traffic(response: release_service_pb2.GetTrafficResponse) -> str:
    rows = [
        [
            c.service,
            c.version,
            c.lane or "-",
            str(c.requests),
            str(c.responses_2xx),
            str(c.responses_4xx),
            str(c.responses_5xx),
            str(c.failures),
        ]
        for c in response.counts
    ]
    table = render_table(("SERVICE", "VERSION", "LANE", "REQUESTS", "2XX", "4XX", "5XX", "FAILED"), rows)
    footer = f"\n{response.proxies} proxies counted"
    if response.replicas:
        footer += f" on {response.replicas} replica{'s' if response.replicas != 1 else ''}"
    if response.HasField("oldest"):
        footer += f"; other replicas as published, the oldest {response.oldest.ToMilliseconds() / 1000:.1f}s ago"
    if response.unreachable:
        footer += "; unreachable: " + ", ".join(response.unreachable)
    if response.note:
        footer += f"\nnote: {response.note}"
    return table + footer


METRICS_HEADER: Final = (
    "SERVICE", "VERSION", "LANE", "CLUSTER", "REQUESTS", "ERR%", "RPS", "P50", "P90", "P99", "SHARE",
)  # fmt: skip


def _ms_label(series: release_service_pb2.SeriesWindow, field: str) -> str:
    return f"{getattr(series, field):.1f}ms" if series.HasField(field) else "-"


def metrics_row(s: release_service_pb2.SeriesWindow) -> list[str]:
    return [
        s.service,
        s.version,
        s.lane or "-",
        s.cluster or "-",
        str(s.requests),
        f"{s.error_rate * 100:.2f}%" if s.requests else "-",
        f"{s.throughput_rps:.1f}",
        _ms_label(s, "p50_ms"),
        _ms_label(s, "p90_ms"),
        _ms_label(s, "p99_ms"),
        f"{s.traffic_share * 100:.1f}%" if s.requests else "-",
    ]


def render_metrics(response: release_service_pb2.MetricsResponse) -> str:
    seconds = (response.until.ToNanoseconds() - response.since.ToNanoseconds()) / 1e9
    footer = f"\nlast {seconds:g}s until {timestamp_label(response.until)}"
    if not response.leader:
        footer += " (this replica is not the leader: only the proxies it serves are counted)"
    if not response.series:
        return "no traffic in the window" + footer
    return render_table(METRICS_HEADER, [metrics_row(s) for s in response.series]) + footer


def render_services(response: release_service_pb2.ListServicesResponse) -> str:
    rows = [[s.name, s.stable_version or "-", s.description or "-"] for s in response.services]
    return render_table(("NAME", "STABLE", "DESCRIPTION"), rows)


def render_clusters(response: release_service_pb2.ListClustersResponse) -> str:
    rows = [
        [
            c.name,
            "yes" if c.connected else "no",
            c.gateway_address or "-",
            c.agent_version or "-",
            str(c.proxies),
            ",".join(f"{v.service}/{v.version}:{v.endpoints}" for v in c.versions) or "-",
        ]
        for c in response.clusters
    ]
    return render_table(("NAME", "CONNECTED", "GATEWAY", "AGENT", "PROXIES", "ENDPOINTS"), rows)


def render_versions(response: release_service_pb2.ListVersionsResponse) -> str:
    rows = [
        [
            v.service,
            v.name,
            ",".join(endpoint_label(e) for e in v.endpoints) or "-",
            v.metadata.image or "-",
            v.metadata.author or "-",
            timestamp_label(v.metadata.created),
            v.metadata.change_summary or "-",
        ]
        for v in response.versions
    ]
    return render_table(("SERVICE", "VERSION", "ENDPOINTS", "IMAGE", "AUTHOR", "CREATED", "CHANGE"), rows)


def render(message: _M, output: str, table: Callable[[_M], str]) -> str:
    if output == "json":
        return render_json(to_dict(message))
    if output == "yaml":
        return render_yaml(to_dict(message))
    return table(message)


def emit(args: argparse.Namespace, message: _M, table: Callable[[_M], str]) -> None:
    print(render(message, args.output, table))


TOMBSTONE_HEADER: Final = ("RELEASE", "GENERATION", "DELETED", "BY", "PHASE", "EVENTS", "REASON")


def render_tombstones(response: release_service_pb2.ListTombstonesResponse) -> str:
    rows = [
        [
            t.release,
            str(t.generation),
            t.deleted_at or "-",
            t.deleted_by or "-",
            t.phase,
            str(t.events),
            t.reason or "-",
        ]
        for t in response.tombstones
    ]
    return render_table(TOMBSTONE_HEADER, rows)


TOKEN_HEADER: Final = ("ID", "NAME", "ROLE", "SCOPE", "SUBJECT", "CREATED", "BY")


def _scope_label(token: release_service_pb2.Token) -> str:
    parts = []
    if token.cluster:
        parts.append(f"cluster={token.cluster}")
    if token.services:
        parts.append("services=" + ",".join(token.services))
    if token.releases:
        parts.append("releases=" + ",".join(token.releases))
    return " ".join(parts) or "*"


def render_tokens(response: release_service_pb2.ListTokensResponse) -> str:
    rows = [
        [t.id, t.name, t.role, _scope_label(t), t.subject or "-", t.created_at or "-", t.created_by or "-"]
        for t in response.tokens
    ]
    return render_table(TOKEN_HEADER, rows)
