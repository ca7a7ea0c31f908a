"""Commands on what releases act upon: `services`, `versions`, `clusters` and
`forget-cluster`. Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse

from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.cli.base import EXIT_OK, Subparsers, add_output_flag, client_command, client_parser
from graylane.controlplane.cli.output import emit, render_clusters, render_services, render_versions


async def _services(client: ReleaseClient, args: argparse.Namespace) -> int:
    emit(args, await client.list_services(), render_services)
    return EXIT_OK


def add_services(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "services", "list services")
    add_output_flag(parser)
    parser.set_defaults(handler=client_command(_services))


async def _versions(client: ReleaseClient, args: argparse.Namespace) -> int:
    emit(args, await client.list_versions(args.service), render_versions)
    return EXIT_OK


def add_versions(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "versions", "list the versions of a service")
    parser.add_argument("service", metavar="SERVICE")
    add_output_flag(parser)
    parser.set_defaults(handler=client_command(_versions))


# --- clusters ---------------------------------------------------------------------------


async def _clusters(client: ReleaseClient, args: argparse.Namespace) -> int:
    emit(args, await client.list_clusters(), render_clusters)
    return EXIT_OK


def add_clusters(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "clusters", "list the clusters agents registered, connected or not")
    add_output_flag(parser)
    parser.set_defaults(handler=client_command(_clusters))


async def _forget_cluster(client: ReleaseClient, args: argparse.Namespace) -> int:
    await client.forget_cluster(args.name, actor=args.actor)
    print(f"cluster/{args.name} forgotten")
    return EXIT_OK


def add_forget_cluster(subparsers: Subparsers) -> None:
    parser = client_parser(
        subparsers,
        "forget-cluster",
        "forget a cluster that is gone for good (starting control planes stop waiting for its agent)",
    )
    parser.add_argument("name", metavar="NAME")
    parser.set_defaults(handler=client_command(_forget_cluster))
