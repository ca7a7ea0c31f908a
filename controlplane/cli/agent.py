"""`graylane agent`: the flags of a cluster agent, turned into `AgentOptions` for
`graylane.agent.app.run_agent` (imported when the command runs).
Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from graylane.agent.defaults import (
    DEFAULT_AGENT_STATE_DIR,
    DEFAULT_AGENT_XDS_PORT,
    DEFAULT_ANSWER_TIMEOUT_SECONDS,
    DEFAULT_GUARD_AFTER_SECONDS,
    DEFAULT_MAX_ERROR_RATE,
    DEFAULT_RECONNECT_MAX_SECONDS,
)
from graylane.controlplane.address import HostPort
from graylane.controlplane.cli.base import (
    EXIT_OK,
    Subparsers,
    UsageError,
    add_client_tls_flags,
    client_tls,
    configure_logging,
    host_port,
)
from graylane.controlplane.cli.serve import add_server_tls_flags, otlp_url, server_tls
from graylane.controlplane.domain import model
from graylane.controlplane.options import (
    DEFAULT_ADMIN_ALLOW,
    check_certificate_scopes,
    is_loopback_host,
)


def _gateway_address(text: str) -> HostPort:
    address = host_port()(text)
    if not model.valid_address(address.host):
        raise argparse.ArgumentTypeError(f"{address.host!r} {model.NOT_AN_IP}")
    return address


def add_agent(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run a cluster agent (endpoints up, views down, xDS for the cluster's Envoys)",
        description="Run the agent of one cluster: report its endpoints to the control plane and "
        "serve the cluster's Envoys (sidecars and the gateway) over ADS, from the last-known-good "
        "view while the control plane is unreachable.",
    )
    parser.add_argument("--cluster", required=True, help="this cluster's name")
    parser.add_argument(
        "--control-plane", required=True, type=host_port(), metavar="HOST:PORT", help="a control plane's API address"
    )
    parser.add_argument("--endpoints", metavar="FILE", help="YAML endpoints of this cluster, followed for changes")
    parser.add_argument(
        "--gateway-address",
        required=True,
        type=_gateway_address,
        metavar="IP:PORT",
        help="where other clusters reach this cluster's gateway Envoy (an IP address: other clusters' "
        "Envoys get it over EDS, which takes no host names)",
    )
    parser.add_argument(
        "--xds-listen",
        type=host_port(),
        default=HostPort("127.0.0.1", DEFAULT_AGENT_XDS_PORT),
        metavar="HOST:PORT",
        help="xDS address for this cluster's Envoys (default %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_AGENT_STATE_DIR,
        metavar="DIR",
        help="last-known-good view and agent id (default ./%(default)s)",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", help="file holding this cluster's token (or env GRAYLANE_AGENT_TOKEN)"
    )
    parser.add_argument(
        "--guard-after",
        type=float,
        default=DEFAULT_GUARD_AFTER_SECONDS,
        metavar="SECONDS",
        help="how long the control plane may be away before the local guard may act",
    )
    parser.add_argument(
        "--guard-error-rate",
        type=_share,
        default=DEFAULT_MAX_ERROR_RATE,
        metavar="SHARE",
        help="the local guard routes a lane to base when its gray versions fail this share of requests "
        "(0-1, over the last 10 s, at least 10 requests; default %(default)s)",
    )
    parser.add_argument(
        "--control-plane-timeout",
        type=_positive_seconds,
        default=DEFAULT_ANSWER_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="a control plane that answers nothing this long counts as gone, connection open or not "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--reconnect-max",
        type=_positive_seconds,
        default=DEFAULT_RECONNECT_MAX_SECONDS,
        metavar="SECONDS",
        help="longest wait between attempts to reach the control plane (default %(default)s)",
    )
    parser.add_argument(
        "--http-listen",
        type=host_port(any_port=True),
        default=None,
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus) and /healthz here (default: no HTTP server)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        type=otlp_url,
        default=None,
        metavar="URL",
        help="export traces over OTLP/HTTP to this collector",
    )
    add_client_tls_flags(parser, defaults=False, what="the control plane")
    add_server_tls_flags(parser, ports="this agent's xDS and HTTP ports")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --xds-listen without proxy credentials (--client-ca or --xds-tokens)",
    )
    parser.set_defaults(handler=_agent)


def _number_up_to(high: float, unit: str = "") -> Callable[[str], float]:
    """An argparse type: a number more than 0 and at most `high` (of `unit`, in messages)."""
    of_unit = f" of {unit}" if unit else ""
    in_unit = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number{of_unit}") from None
        if not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: expected more than 0 and at most {high:g}{in_unit}")
        return value

    return parse


_positive_seconds = _number_up_to(3600, "seconds")
_share = _number_up_to(1)


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
    try:
        check_certificate_scopes(xds_tokens, mutual=tls is not None and tls.mutual)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    configure_logging(args, default="info")
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
