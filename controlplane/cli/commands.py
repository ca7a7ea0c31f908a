"""The table of commands and `main`.

`COMMANDS` lists one *builder* per subcommand, in `--help` order; a builder adds its parser
and sets `handler`. To add a command, write a builder and list it there. A handler that
needs the API is an `async (client, args)` function wrapped by `base.client_command`, which
opens the channel and maps errors. `main` parses, runs the handler and turns `UsageError`
and Ctrl-C into exit codes.
Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Final

from graylane.controlplane.api.client import USER_ACTIONS
from graylane.controlplane.cli.access import add_bootstrap, add_certs, add_token
from graylane.controlplane.cli.agent import add_agent
from graylane.controlplane.cli.base import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    LOG_LEVELS,
    Handler,
    SubcommandBuilder,
    UsageError,
    add_connection_flags,
    package_version,
    print_error,
)
from graylane.controlplane.cli.demo import add_demo
from graylane.controlplane.cli.inventory import add_clusters, add_forget_cluster, add_services, add_versions
from graylane.controlplane.cli.releases import (
    action_builder,
    add_apply,
    add_delete,
    add_get,
    add_history,
    add_metrics,
    add_status,
    add_tombstones,
    add_traffic,
)
from graylane.controlplane.cli.serve import add_serve

#: One builder per subcommand, in `--help` order. A new command is a builder listed here
#: (its heavy modules imported inside the handler, so the client stays light).
COMMANDS: Final[tuple[SubcommandBuilder, ...]] = (
    add_serve,
    add_agent,
    add_certs,
    add_bootstrap,
    add_apply,
    add_get,
    add_status,
    *(action_builder(action) for action in USER_ACTIONS),
    add_delete,
    add_tombstones,
    add_token,
    add_history,
    add_traffic,
    add_metrics,
    add_services,
    add_versions,
    add_clusters,
    add_forget_cluster,
    add_demo,
)


def build_parser(commands: Sequence[SubcommandBuilder] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graylane",
        description="Progressive delivery for Envoy: canary, blue-green, content rules and full-link gray lanes.",
    )
    parser.add_argument("--version", action="version", version=f"graylane {package_version()}")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="log level of serve, agent and demo (env GRAYLANE_LOG_LEVEL; default info, demo warning)",
    )
    add_connection_flags(parser, defaults=True)
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
        print_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
