"""`graylane serve`, and the flags of a server that `graylane agent` shares (TLS, proxy
tokens, admin networks, Prometheus).

Builds `ServeOptions` from the arguments and hands them to `graylane.controlplane.app.serve`,
imported lazily so that a client command never loads server code.
Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Final, NamedTuple, TypeVar

from graylane.controlplane.address import HostPort
from graylane.controlplane.api.tls import ClientTls, ServerTls, TlsConfigError
from graylane.controlplane.cli.base import (
    EXIT_OK,
    Subparsers,
    UsageError,
    comma_list,
    configure_logging,
    host_port,
    identity_name,
    parse_duration,
)
from graylane.controlplane.defaults import (
    DEFAULT_DATA_DIR,
    DEFAULT_ETCD_PORT,
)
from graylane.controlplane.options import (
    DEFAULT_ADMIN_ALLOW,
    ServeOptions,
    XdsCredential,
    parse_agent_tokens,
    parse_xds_tokens,
)

_Parsed = TypeVar("_Parsed")


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


def add_server_tls_flags(parser: argparse.ArgumentParser, *, ports: str) -> None:
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


def _etcd_endpoints(text: str) -> tuple[HostPort, ...]:
    parse = host_port(DEFAULT_ETCD_PORT)
    return tuple(parse(part) for part in text.split(",") if part.strip())


def otlp_url(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an http(s) URL such as http://127.0.0.1:4318")
    return text


def serve_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        **{flag.field: getattr(args, flag.field) for flag in _OPTION_FLAGS},
        etcd_endpoints=args.etcd,
        data_dir=Path(args.data_dir),
        agent_tokens=args.agent_tokens,
        tls=server_tls(args),
        etcd_tls=etcd_tls(args),
        xds_tokens=args.xds_tokens,
        admin_allow=tuple(args.admin_allow) if args.admin_allow else DEFAULT_ADMIN_ALLOW,
        prometheus_url=args.prometheus_url,
        prometheus_interval_seconds=args.prometheus_interval,
        prometheus_selector=args.prometheus_selector,
        auth=args.auth,
        insecure=args.insecure,
        bootstrap_token_file=Path(args.bootstrap_token_file) if args.bootstrap_token_file else None,
        webhook_allow=tuple(comma_list(",".join(args.webhook_allow))),
    )


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the server pulls in etcd and xds, which the client never needs.
    from graylane.controlplane.app import serve
    from graylane.controlplane.progression.webhooks import WebhookPolicy

    options = serve_options(args)
    try:
        options.check_exposure()
        WebhookPolicy.parse(options.webhook_allow)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    configure_logging(args, default="info")
    asyncio.run(serve(options))
    return EXIT_OK


class _OptionFlag(NamedTuple):
    """A `serve` flag that sets one ServeOptions field as it is; its default is the field's."""

    flag: str
    field: str
    parse: Callable[[str], object]
    metavar: str
    help: str


_OPTION_FLAGS: Final = (
    _OptionFlag("--listen", "listen", host_port(), "HOST:PORT", "API address (default %(default)s)"),
    _OptionFlag("--xds-listen", "xds_listen", host_port(), "HOST:PORT", "xDS address for Envoys (default %(default)s)"),
    _OptionFlag(
        "--http-listen",
        "http_listen",
        host_port(any_port=True),  # port 0: any free port (the log names it)
        "HOST:PORT",
        "HTTP address of /metrics and /healthz (default %(default)s)",
    ),
    _OptionFlag(
        "--otlp-endpoint",
        "otlp_endpoint",
        otlp_url,
        "URL",
        "send traces over OTLP/HTTP to this base URL, e.g. http://127.0.0.1:4318 "
        "(default: $OTEL_EXPORTER_OTLP_ENDPOINT, else no traces)",
    ),
    _OptionFlag(
        "--etcd-prefix",
        "etcd_prefix",
        str,
        "PREFIX",
        "key prefix in etcd, so installations can share one etcd (default %(default)s)",
    ),
    _OptionFlag(
        "--leader-ttl",
        "leader_ttl_seconds",
        int,
        "SECONDS",
        "leader lease: a killed leader is replaced within it (default %(default)s)",
    ),
    _OptionFlag(
        "--stale-proxy-seconds",
        "stale_proxy_seconds",
        float,
        "SECONDS",
        "a proxy that has not ACKed a release's target within this is declared gone for "
        "convergence and named in status (default %(default)s)",
    ),
    _OptionFlag(
        "--agent-lease-ttl",
        "agent_lease_ttl_seconds",
        int,
        "SECONDS",
        "how long a silent agent's cluster and endpoints live on (default %(default)s)",
    ),
    _OptionFlag(
        "--max-message-bytes",
        "max_receive_message_bytes",
        int,
        "BYTES",
        "largest API request accepted (default %(default)s)",
    ),
    _OptionFlag(
        "--max-streams-per-identity",
        "max_streams_per_identity",
        int,
        "N",
        "open Watch/WatchMetrics/agent streams one identity may hold (with --auth; default %(default)s)",
    ),
    _OptionFlag(
        "--idle-timeout",
        "max_connection_idle_seconds",
        float,
        "SECONDS",
        "close an API connection with no call open for this long (default %(default)s)",
    ),
    _OptionFlag(
        "--loop-lag-interval",
        "loop_lag_interval_seconds",
        parse_duration,
        "DURATION",
        "how often the event loop's lag is probed for /metrics (graylane_event_loop_lag_*): a stall is "
        "read short by up to this, and each probe costs ~0.1 ms of CPU (default %(default)ss)",
    ),
    _OptionFlag(
        "--xds-cluster",
        "xds_cluster",
        identity_name,
        "NAME",
        "the cluster this control plane's own xDS port serves: under --xds-tokens or "
        "--client-ca its Envoys must prove they are proxies of it (default %(default)s)",
    ),
)


def add_serve(subparsers: Subparsers) -> None:
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
    for option in _OPTION_FLAGS:
        parser.add_argument(
            option.flag,
            dest=option.field,
            type=option.parse,
            default=getattr(defaults, option.field),
            metavar=option.metavar,
            help=option.help,
        )
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"local state, e.g. the embedded etcd (default ./{DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--agent-tokens",
        type=_agent_tokens,
        default=(),
        metavar="FILE",
        help="`cluster: token` lines; agents must present their cluster's token (default: not checked)",
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
        "--webhook-allow",
        action="append",
        default=[],
        metavar="HOST|CIDR[,...]",
        help="webhook destinations allowed beyond the default policy (which refuses link-local, "
        "metadata and, with --auth, loopback addresses); repeatable",
    )
    add_server_tls_flags(parser, ports="the API (and agent), xDS and HTTP ports")
    parser.add_argument("--etcd-ca", metavar="FILE", help="CA to verify the external etcd with; turns TLS to it on")
    parser.add_argument("--etcd-cert", metavar="FILE", help="client certificate for an etcd with --client-cert-auth")
    parser.add_argument("--etcd-key", metavar="FILE", help="its private key")
    parser.set_defaults(handler=_serve)


def _parsed_file(parse: Callable[..., _Parsed]) -> Callable[[str], _Parsed]:
    """An argparse type: the path of a file whose text `parse(text, source=path)` reads."""

    def read(path: str) -> _Parsed:
        try:
            return parse(Path(path).read_text(), source=path)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return read


_xds_tokens: Callable[[str], tuple[XdsCredential, ...]] = _parsed_file(parse_xds_tokens)
_agent_tokens: Callable[[str], tuple[tuple[str, str], ...]] = _parsed_file(parse_agent_tokens)


def _admin_allow(text: str) -> str:
    # Imported here: the scraper's module pulls in aiohttp and xds names the client never needs.
    from graylane.agent.stats import AdminAllowList

    try:
        AdminAllowList.parse((text,))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
