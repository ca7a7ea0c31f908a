"""Commands that set up who may talk to whom: `token` (API tokens), `certs` (a local CA and
its certificates) and `bootstrap` (an Envoy's bootstrap for a Graylane xDS port). The
cryptography and Envoy helpers are imported when their command runs.
Must not import: etcd, graylane.xds (except graylane.xds.view, for names).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graylane.controlplane.address import HostPort
from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.cli.base import (
    EXIT_OK,
    Subparsers,
    UsageError,
    add_connection_flags,
    add_output_flag,
    client_command,
    client_parser,
    comma_list,
    host_port,
    identity_name,
    port_number,
)
from graylane.controlplane.cli.output import emit, render_tokens
from graylane.controlplane.defaults import (
    DEFAULT_XDS_PORT,
)
from graylane.controlplane.options import (
    DEFAULT_XDS_CLUSTER,
)
from graylane.v1 import release_service_pb2
from graylane.xds.view import DEFAULT_LISTEN_PORT


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


def add_bootstrap(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "bootstrap",
        help="print a ready Envoy bootstrap for a Graylane xDS port (envoy -c FILE)",
        description="Print the bootstrap YAML of one Envoy: its node, the port its proxy listener takes "
        "traffic on (node metadata listen_port), its admin address (metrics are read there), and ADS "
        "to the control plane's or an agent's xDS port, state of the world or delta, over mutual TLS "
        "when --ca/--cert/--key are given.",
    )
    parser.add_argument(
        "--node", required=True, type=identity_name, metavar="NAME", help="the node id (unique per Envoy)"
    )
    parser.add_argument(
        "--cluster",
        default=DEFAULT_XDS_CLUSTER,
        type=identity_name,
        metavar="NAME",
        help="node.cluster: the cluster whose configuration it receives (default %(default)s)",
    )
    parser.add_argument(
        "--listen-port",
        type=port_number,
        default=DEFAULT_LISTEN_PORT,
        metavar="PORT",
        help="proxy listener (default %(default)s)",
    )
    parser.add_argument(
        "--admin-port", type=port_number, default=9901, metavar="PORT", help="admin on 127.0.0.1 (default %(default)s)"
    )
    parser.add_argument(
        "--xds",
        type=host_port(DEFAULT_XDS_PORT),
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


def add_certs(subparsers: Subparsers) -> None:
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
        type=identity_name,
        metavar="NAME",
        help="a cluster to make Envoy and agent certificates for (repeat; default: local)",
    )
    parser.add_argument(
        "--user",
        action="append",
        type=identity_name,
        metavar="NAME",
        help="a user (CLI, pipeline) to make a client certificate for (repeat; default: admin)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (default %(default)s)")
    parser.set_defaults(handler=_certs)


def _certs(args: argparse.Namespace) -> int:
    # Imported here: the cryptography package is needed by this command only.
    from graylane.controlplane.api.certs import make_local_certs

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


async def _token(client: ReleaseClient, args: argparse.Namespace) -> int:
    if args.token_command == "create":
        made = await client.create_token(
            release_service_pb2.CreateTokenRequest(
                name=args.name,
                role=args.role,
                services=comma_list(args.services),
                releases=comma_list(args.releases),
                cluster=args.cluster,
                subject=args.subject,
            )
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


def add_token(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "token", "API tokens: create, list, revoke (admins)")
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
    add_output_flag(create)
    listing = commands.add_parser("list", help="every token (ids, names, roles; never secrets)")
    add_output_flag(listing)
    revoke = commands.add_parser("revoke", help="revoke a token by id or name")
    revoke.add_argument("id", metavar="ID|NAME")
    for sub in (create, listing, revoke):
        add_connection_flags(sub, defaults=False)
    revoke.set_defaults(output="table")
    parser.set_defaults(handler=client_command(_token))
