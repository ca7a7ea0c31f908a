"""The `graylane` CLI against a real `graylane serve` process with its embedded etcd."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from graylane.controlplane.local.envoy import free_port

from tests.integration.conftest import BIN, start_serve, stop_group


def graylane(server: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "graylane"), "--server", server, "--actor", "ci-bot", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
    )


@pytest.fixture
def served(tmp_path: pathlib.Path, etcd_endpoint: str) -> Iterator[tuple[str, subprocess.Popen[bytes], pathlib.Path]]:
    # etcd_endpoint only makes sure the etcd binary exists (fail under CI, skip elsewhere).
    proc, api = start_serve(tmp_path / "serve.log", "--data-dir", str(tmp_path / "state"))
    server = f"127.0.0.1:{api}"
    deadline = time.monotonic() + 30
    while graylane(server, "get").returncode != 0:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline, "graylane serve did not answer in 30 s"
        time.sleep(0.1)
    try:
        yield server, proc, tmp_path
    finally:
        stop_group(proc)


def test_release_through_the_cli_then_graceful_stop(
    served: tuple[str, subprocess.Popen[bytes], pathlib.Path], repo_root: pathlib.Path
) -> None:
    server, proc, tmp = served
    applied = graylane(server, "apply", "-f", str(repo_root / "deploy" / "examples" / "release.yaml"))
    assert applied.returncode == 0, applied.stderr
    for expected in (10, 20):
        out = graylane(server, "next", "checkout-v2", "--reason", "metrics fine", "-o", "json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"]["weight"] == expected
    assert graylane(server, "pause", "checkout-v2").returncode == 0
    refused = graylane(server, "next", "checkout-v2")
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr and "resume" in refused.stderr
    for verb in ("resume", "rollback", "restart", "promote"):
        assert graylane(server, verb, "checkout-v2").returncode == 0, verb
    got = json.loads(graylane(server, "get", "checkout-v2", "-o", "json").stdout)
    assert got["status"]["phase"] == "SUCCEEDED"
    history = json.loads(graylane(server, "history", "checkout-v2", "-o", "json").stdout)
    actions = [(e["action"], e["actor"]) for e in history["events"]]
    assert actions == [
        ("create", "ci-bot"),
        ("next", "ci-bot"),
        ("next", "ci-bot"),
        ("pause", "ci-bot"),
        ("resume", "ci-bot"),
        ("rollback", "ci-bot"),
        ("restart", "ci-bot"),
        ("promote", "ci-bot"),
    ]
    assert history["events"][1]["reason"] == "metrics fine"

    bad = graylane(
        server,
        "apply",
        "-f",
        "-",
        input=(
            "name: x\nspec:\n  lane: x\n"
            "  services: [{service: checkout, base_version: v2, gray_version: v2}]\n"
            "  batches: [{weight: 10}]\n"
        ),
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "spec.services[0].gray_version" in bad.stderr

    # SIGTERM: a clean stop that also stops the embedded etcd; its data survives.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert (tmp / "state" / "etcd" / "member").is_dir()
    leftover = subprocess.run(["pgrep", "-f", str(tmp / "state" / "etcd")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_unreachable_server_is_a_clear_error() -> None:
    out = graylane(f"127.0.0.1:{free_port()}", "get")
    assert out.returncode == 1
    assert "cannot reach graylane" in out.stderr


def test_serve_with_auth_through_the_cli(tmp_path: pathlib.Path, etcd_endpoint: str, repo_root: pathlib.Path) -> None:
    """`serve --auth` writes the first admin token (0600); the CLI makes an operator token
    with it; the history records the token, not `--actor`; control characters in a reason
    come out escaped."""
    token_file = tmp_path / "admin.token"
    proc, api = start_serve(
        tmp_path / "serve.log",
        "--auth",
        "--etcd",
        etcd_endpoint,
        "--etcd-prefix",
        f"/graylane-test/{uuid.uuid4().hex}/v1/",
        "--bootstrap-token-file",
        str(token_file),
    )
    server = f"127.0.0.1:{api}"
    try:
        deadline = time.monotonic() + 30
        while "UNAUTHENTICATED" not in (out := graylane(server, "get")).stderr:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, f"graylane serve --auth did not answer in 30 s: {out.stderr}"
            time.sleep(0.1)
        assert out.returncode == 1
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        assert token_file.read_text().strip() not in (tmp_path / "serve.log").read_text()

        made = graylane(
            server, "--token-file", str(token_file), "token", "create", "--name", "ci", "--role", "operator"
        )
        assert made.returncode == 0, made.stderr
        operator = made.stdout.strip()
        assert operator.startswith("glt_") and "shown once" in made.stderr
        admin = ("--token-file", str(token_file))
        assert (
            graylane(server, *admin, "apply", "-f", str(repo_root / "deploy" / "examples" / "release.yaml")).returncode
            == 0
        )
        env_run = subprocess.run(
            [str(BIN / "graylane"), "--server", server, "--actor", "mallory", "next", "checkout-v2",
             "--reason", "fine\x1b[2J\rforged"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "GRAYLANE_TOKEN": operator},
        )  # fmt: skip
        assert env_run.returncode == 0, env_run.stderr
        history = graylane(server, "--token", operator, "history", "checkout-v2")
        assert history.returncode == 0, history.stderr
        assert "\x1b" not in history.stdout and "\r" not in history.stdout
        assert "fine\\x1b[2J\\rforged" in history.stdout
        rows = json.loads(graylane(server, "--token", operator, "history", "checkout-v2", "-o", "json").stdout)
        assert [e["actor"] for e in rows["events"]] == ["token:bootstrap-admin", "token:ci"]
        denied = graylane(server, "--token", operator, "delete", "checkout-v2")
        assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr and "admin" in denied.stderr
        listed = graylane(server, *admin, "token", "list")
        assert listed.returncode == 0 and "ci" in listed.stdout and operator[-20:] not in listed.stdout
        assert graylane(server, *admin, "token", "revoke", "ci").returncode == 0
        deadline = time.monotonic() + 10
        while graylane(server, "--token", operator, "get").returncode == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert graylane(server, *admin, "delete", "checkout-v2", "--reason", "done").returncode == 0
        tombs = graylane(server, *admin, "tombstones", "checkout-v2", "--history", "-o", "json")
        assert tombs.returncode == 0 and len(json.loads(tombs.stdout)["events"]) == 2
    finally:
        stop_group(proc, grace=30)


def _etcd_pids(data_dir: pathlib.Path) -> list[int]:
    """etcd processes serving `data_dir` (from /proc: the embedded etcd is not our child)."""
    pids = []
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"etcd") and str(data_dir).encode() in argv:
            pids.append(int(cmdline.parent.name))
    return pids


def test_a_killed_serve_takes_its_embedded_etcd_along_and_starts_again_on_the_same_data(
    served: tuple[str, subprocess.Popen[bytes], pathlib.Path], repo_root: pathlib.Path
) -> None:
    """kill -9 of `graylane serve`: its embedded etcd must not live on holding the data dir,
    or the next start on that dir waits for an etcd that can never start."""
    server, proc, tmp = served
    assert graylane(server, "apply", "-f", str(repo_root / "deploy" / "examples" / "release.yaml")).returncode == 0
    data = (tmp / "state" / "etcd").resolve()
    assert len(_etcd_pids(data)) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _etcd_pids(data):
        assert time.monotonic() < deadline, "the embedded etcd outlived its graylane serve"
        time.sleep(0.05)
    again, api = start_serve(tmp / "serve-again.log", "--data-dir", str(tmp / "state"))
    try:
        deadline = time.monotonic() + 30
        while (got := graylane(f"127.0.0.1:{api}", "get", "checkout-v2", "-o", "json")).returncode != 0:
            assert again.poll() is None, (tmp / "serve-again.log").read_text()
            assert time.monotonic() < deadline, "graylane serve did not start again on the same data in 30 s"
            time.sleep(0.1)
        assert json.loads(got.stdout)["name"] == "checkout-v2"  # the state survived the kill
        # SIGTERM now: a clean stop takes the etcd along too.
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=20) == 0
        assert _etcd_pids(data) == []
    finally:
        stop_group(again)
