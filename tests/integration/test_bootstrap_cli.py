"""`graylane bootstrap` prints bootstraps a real Envoy accepts, and that reach a real control plane."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.domain import model
from graylane.controlplane.local.ports import free_port
from graylane.controlplane.store import EtcdStore

from tests.integration.conftest import BIN

pytestmark = [pytest.mark.envoy]


def bootstrap(*args: str) -> str:
    out = subprocess.run([str(BIN / "graylane"), "bootstrap", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def validate(envoy_binary: Path, text: str, tmp: Path, name: str) -> None:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    checked = subprocess.run(
        [str(envoy_binary), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_printed_bootstraps_are_valid_envoy_configuration(envoy_binary: Path, tmp_path: Path) -> None:
    sotw = bootstrap("--node", "edge-1", "--listen-port", "10080", "--admin-port", "9911", "--xds", "10.0.0.5:7401")
    assert 'id: "edge-1"' in sotw and 'listen_port: "10080"' in sotw and "10.0.0.5" in sotw and "$" not in sotw
    validate(envoy_binary, sotw, tmp_path, "sotw")
    delta = bootstrap("--node", "edge-2", "--delta", "--cluster", "east")
    assert "DELTA_GRPC" in delta and 'cluster: "east"' in delta
    validate(envoy_binary, delta, tmp_path, "delta")
    certs = tmp_path / "certs"
    made = subprocess.run([str(BIN / "graylane"), "certs", "--out", str(certs)], capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = tmp_path / "token"
    token.write_text("a-node-token-of-some-length\n")
    mtls = bootstrap(
        "--node", "edge-3", "--ca", str(certs / "ca.pem"), "--cert", str(certs / "envoy-local.pem"),
        "--key", str(certs / "envoy-local-key.pem"), "--xds-token-file", str(token),
    )  # fmt: skip
    assert "tls_certificates" in mtls and '"a-node-token-of-some-length"' in mtls
    validate(envoy_binary, mtls, tmp_path, "mtls")
    refused = subprocess.run(
        [str(BIN / "graylane"), "bootstrap", "--node", "x", "--ca", "ca.pem"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--ca, --cert and --key go together" in refused.stderr


async def test_an_envoy_started_from_a_printed_bootstrap_is_configured(
    store: EtcdStore, envoy_binary: Path, tmp_path: Path
) -> None:
    await store.put_service(model.Service(name="checkout", stable_version="v1"))
    endpoint = model.Endpoint(address="127.0.0.1", port=free_port())
    await store.put_version(model.Version(service="checkout", name="v1", endpoints=(endpoint,)))
    async with ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0").running() as plane:
        text = bootstrap(
            "--node", "printed", "--xds", f"127.0.0.1:{plane.xds_port}",
            "--admin-port", str(free_port()), "--listen-port", str(free_port()),
        )  # fmt: skip
        path = tmp_path / "bootstrap.yaml"
        path.write_text(text)
        proc: Any = subprocess.Popen(  # noqa: ASYNC220 (Envoy runs beside the test, stopped below)
            [str(envoy_binary), "-c", str(path), "--base-id", "41999", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            await plane.dataplane.wait_current(timeout=20)
            assert {p.node_id for p in plane.tracker.proxies().values()} == {"printed"}
        finally:
            proc.terminate()
            proc.wait(timeout=10)
