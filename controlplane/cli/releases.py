"""Commands on releases: `apply` a manifest, read them (`get`, `status`, `history`,
`traffic`, `metrics`), move them (`next`, `pause`, ... one builder per `Action`), `delete` and
`tombstones`. Each talks to the control plane through `ReleaseClient` only.
Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterable, Callable, Sequence
from pathlib import Path
from typing import Final

import yaml
from google.protobuf.message import Message
from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.cli.base import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_RELEASE_FAILED,
    ClientHandler,
    SubcommandBuilder,
    Subparsers,
    UsageError,
    add_output_flag,
    add_read_command,
    add_reason_flag,
    client_command,
    client_parser,
    parse_duration,
    print_error,
)
from graylane.controlplane.cli.output import (
    emit,
    render,
    render_history,
    render_json,
    render_metrics,
    render_release,
    render_releases,
    render_tombstones,
    render_traffic,
    status_line,
    status_summary,
    to_dict,
)
from graylane.controlplane.domain.manifest import ManifestError, ManifestObject, load_manifest
from graylane.v1 import release_pb2

TERMINAL_PHASES: Final = frozenset({release_pb2.SUCCEEDED, release_pb2.ROLLED_BACK, release_pb2.FAILED})


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

    return client_command(apply)(args)


def add_apply(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "apply", "create or update services, versions and releases from YAML")
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
    add_reason_flag(parser)
    add_output_flag(parser)
    parser.set_defaults(handler=_apply_command)


async def _get(client: ReleaseClient, args: argparse.Namespace) -> int:
    if args.name:
        emit(args, await client.get_release(args.name), render_release)
    else:
        emit(args, await client.list_releases(), render_releases)
    return EXIT_OK


def add_get(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "get", "list releases, or show one")
    parser.add_argument("name", nargs="?", metavar="NAME")
    add_output_flag(parser)
    parser.set_defaults(handler=client_command(_get))


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
        print_error(f"the watch of {args.name} ended before the release finished (deleted, or the server went away)")
        return EXIT_ERROR
    return EXIT_OK if last.status.phase == release_pb2.SUCCEEDED else EXIT_RELEASE_FAILED


def add_status(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "status", "show where a release stands")
    parser.add_argument("name", metavar="NAME")
    parser.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="print a line per change until the release finishes; exit 0 if "
        f"it SUCCEEDED, {EXIT_RELEASE_FAILED} if it was ROLLED_BACK or FAILED",
    )
    add_output_flag(parser)
    parser.set_defaults(handler=client_command(_status))


def add_history(subparsers: Subparsers) -> None:
    add_read_command(
        subparsers,
        "history",
        "show the events of a release",
        ReleaseClient.history,
        render_history,
        "name",
    )


def add_traffic(subparsers: Subparsers) -> None:
    add_read_command(
        subparsers,
        "traffic",
        "requests per service, version and lane, from the proxies",
        ReleaseClient.get_traffic,
        render_traffic,
        "name",
    )


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


def add_metrics(subparsers: Subparsers) -> None:
    parser = client_parser(
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
    add_output_flag(parser)
    parser.set_defaults(handler=client_command(_metrics))


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


def action_builder(action: Action) -> SubcommandBuilder:
    def build(subparsers: Subparsers) -> None:
        parser = client_parser(subparsers, action.value, ACTION_HELP[action])
        parser.add_argument("name", metavar="NAME")
        add_reason_flag(parser)
        parser.add_argument(
            "--expected-revision",
            type=int,
            default=0,
            metavar="REVISION",
            help="fail with ABORTED unless the release is still at this revision",
        )
        add_output_flag(parser)
        parser.set_defaults(handler=client_command(_action_handler(action)))

    return build


async def _delete(client: ReleaseClient, args: argparse.Namespace) -> int:
    await client.delete_release(args.name, reason=args.reason)
    print(f"release/{args.name} deleted (its history is kept: `graylane tombstones {args.name}`)")
    return EXIT_OK


def add_delete(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "delete", "delete a release (its routes go away; its history is kept)")
    parser.add_argument("name", metavar="NAME")
    add_reason_flag(parser)
    parser.set_defaults(handler=client_command(_delete))


async def _tombstones(client: ReleaseClient, args: argparse.Namespace) -> int:
    if args.history:
        if not args.name:
            raise UsageError("--history needs the release's NAME")
        emit(args, await client.tombstone_history(args.name, args.generation), render_history)
    else:
        emit(args, await client.list_tombstones(args.name or ""), render_tombstones)
    return EXIT_OK


def add_tombstones(subparsers: Subparsers) -> None:
    parser = client_parser(subparsers, "tombstones", "deleted releases and the history each kept (admins)")
    parser.add_argument("name", metavar="NAME", nargs="?", default="")
    parser.add_argument("--history", action="store_true", help="print the kept history of NAME")
    parser.add_argument("--generation", type=int, default=0, help="which deletion of NAME (default: the latest)")
    add_output_flag(parser)
    parser.set_defaults(handler=client_command(_tombstones))
