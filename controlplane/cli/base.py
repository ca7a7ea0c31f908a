"""What every `graylane` command shares: exit codes, `UsageError`, the connection and TLS
flags of a client, argument types (addresses, ports, names, durations), logging, and the one
place RPC failures become messages and exit codes (`client_command`).

Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Concatenate, Final, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message
from graylane.controlplane.address import HostPort
from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.api.tls import ClientTls, TlsConfigError
from graylane.controlplane.cli.output import OUTPUT_FORMATS, emit, escape_control
from graylane.controlplane.defaults import (
    DEFAULT_API_PORT,
    DEFAULT_RPC_TIMEOUT_SECONDS,
)
from graylane.controlplane.domain.manifest import duration_seconds

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_RELEASE_FAILED: Final = 3
EXIT_INTERRUPTED: Final = 130


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler: TypeAlias = Callable[[argparse.Namespace], int]
ClientHandler: TypeAlias = Callable[[ReleaseClient, argparse.Namespace], Awaitable[int]]
SubcommandBuilder: TypeAlias = Callable[[Subparsers], None]


class UsageError(Exception):
    """Bad input found after argument parsing (a manifest, a file): exit 2, nothing sent."""


def default_server() -> str:
    return os.environ.get("GRAYLANE_SERVER") or f"127.0.0.1:{DEFAULT_API_PORT}"


def default_actor() -> str:
    if actor := os.environ.get("GRAYLANE_ACTOR"):
        return actor
    if user := os.environ.get("USER"):
        return f"{user}@{socket.gethostname()}"
    return "cli"


def host_port(default_port: int | None = None, *, any_port: bool = False) -> Callable[[str], HostPort]:
    def parse(text: str) -> HostPort:
        try:
            return HostPort.parse(text, default_port=default_port, any_port=any_port)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def configure_logging(args: argparse.Namespace, *, default: str, timestamps: bool = True) -> None:
    """The process's log level: --log-level, else GRAYLANE_LOG_LEVEL, else the command's default."""
    import logging

    level = getattr(args, "log_level", None) or os.environ.get("GRAYLANE_LOG_LEVEL", "").lower() or default
    if level not in LOG_LEVELS:
        raise UsageError(f"GRAYLANE_LOG_LEVEL: {level!r} is not one of {', '.join(LOG_LEVELS)}")
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {fmt}" if timestamps else fmt)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graylane")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


def add_connection_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
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
    add_client_tls_flags(parser, defaults=defaults, what="the control plane's API")


def add_client_tls_flags(parser: argparse.ArgumentParser, *, defaults: bool, what: str) -> None:
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


def client_parser(subparsers: Subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    add_connection_flags(parser, defaults=False)
    return parser


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", choices=OUTPUT_FORMATS, default="table", help="output format (default: table)"
    )


def add_reason_flag(parser: argparse.ArgumentParser) -> None:
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


def print_error(message: str) -> None:
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
        print_error(describe_rpc_error(exc, server=args.server))
        return EXIT_ERROR


def client_command(handler: ClientHandler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(_run_client(handler, args))

    return run


_Read = TypeVar("_Read", bound=Message)


def add_read_command(
    subparsers: Subparsers,
    name: str,
    help: str,
    read: Callable[Concatenate[ReleaseClient, ...], Awaitable[_Read]],
    table: Callable[[_Read], str],
    *arguments: str,
) -> argparse.ArgumentParser:
    """`graylane NAME [ARG...] [-o FORMAT]`: prints what one read of the API returns, as
    `table` or JSON/YAML. Each of `arguments` is a positional (its metavar upper-cased),
    passed in order to `read`, a method of `ReleaseClient` such as `ReleaseClient.history`."""
    parser = client_parser(subparsers, name, help)
    for argument in arguments:
        parser.add_argument(argument, metavar=argument.upper())
    add_output_flag(parser)

    async def run(client: ReleaseClient, args: argparse.Namespace) -> int:
        emit(args, await read(client, *(getattr(args, argument) for argument in arguments)), table)
        return EXIT_OK

    parser.set_defaults(handler=client_command(run))
    return parser


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1..65535)")
    return int(text)


def identity_name(text: str) -> str:
    from graylane.controlplane.api.tls import check_name

    try:
        return check_name("cluster", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
