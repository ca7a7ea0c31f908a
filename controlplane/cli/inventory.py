"""Commands on what releases act upon: `services`, `versions`, `clusters` and
`forget-cluster`. Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse

from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.cli.base import EXIT_OK, Subparsers, add_read_command, client_command, client_parser
from graylane.controlplane.cli.output import render_clusters, render_services, render_versions


def add_services(subparsers: Subparsers) -> None:
    add_read_command(subparsers, "services", "list services", ReleaseClient.list_services, render_services)


def add_versions(subparsers: Subparsers) -> None:
    add_read_command(
        subparsers,
        "versions",
        "list the versions of a service",
        ReleaseClient.list_versions,
        render_versions,
        "service",
    )


# --- clusters ---------------------------------------------------------------------------


def add_clusters(subparsers: Subparsers) -> None:
    add_read_command(
        subparsers,
        "clusters",
        "list the clusters agents registered, connected or not",
        ReleaseClient.list_clusters,
        render_clusters,
    )


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
