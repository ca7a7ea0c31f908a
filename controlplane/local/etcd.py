"""EtcdProcess: an etcd child process on loopback, for `graylane serve` with no --etcd and tests.

Owns: finding the `etcd` binary (Debian's etcd-server, 3.4.x), picking free loopback ports,
starting it in its own process group with its data in a given folder, waiting until it
answers, and stopping it by PID; optionally its client port over TLS (`EtcdTls`). It does not
talk the etcd API itself beyond a health probe over HTTP(S); the store does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import pathlib
import shutil
import signal
import ssl
import subprocess
from dataclasses import dataclass

from graylane.controlplane.lifecycle import Lifecycle
from graylane.controlplane.local.ports import free_port

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the `etcd` binary is not on PATH; install it (Debian/Ubuntu: `apt-get install etcd-server`) "
    "or point graylane at a cluster with --etcd HOST:PORT"
)


def find_etcd() -> str | None:
    found = shutil.which("etcd")
    if found:
        return found
    # Debian installs the server here on some releases.
    for candidate in ("/usr/bin/etcd", "/usr/local/bin/etcd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _healthy(port: int, context: ssl.SSLContext | None = None) -> bool:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=1.0, context=context)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        return resp.status == 200 and b'"true"' in resp.read()
    except OSError:
        return False
    finally:
        conn.close()


@dataclass(frozen=True, kw_only=True, slots=True)
class EtcdTls:
    """TLS of an etcd's client port: its certificate and key, and the CA client certificates
    must chain to (None: any client). `probe_cert`/`probe_key` (a client certificate the CA
    signed) let the start-up health check through when client certificates are required."""

    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path
    client_ca: pathlib.Path | None = None
    probe_cert: pathlib.Path | None = None
    probe_key: pathlib.Path | None = None

    def probe_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if self.probe_cert is not None and self.probe_key is not None:
            context.load_cert_chain(self.probe_cert, self.probe_key)
        return context


class EtcdProcess(Lifecycle):
    """`async with EtcdProcess(data_dir=...) as etcd:` then `etcd.endpoint` is `127.0.0.1:PORT`."""

    def __init__(
        self,
        *,
        data_dir: pathlib.Path,
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "graylane",
        initial_cluster: str = "",
        start_timeout: float = 30.0,
        tls: EtcdTls | None = None,
    ) -> None:
        self.data_dir = data_dir
        # Clients over TLS (and, with `tls.client_ca`, with a certificate it signed); peers stay
        # plain on loopback.
        self.tls = tls
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._name = name
        # `name=http://host:peer,...` of every member (a cluster); empty: a cluster of one.
        self._initial_cluster = initial_cluster
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended by itself (a full disk, say); None while it runs."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self) -> None:
        binary = find_etcd()
        if binary is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            binary,
            "--name",
            self._name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            self._initial_cluster or f"{self._name}={peer}",
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ]
        if self.tls is not None:
            args += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
            if self.tls.client_ca is not None:
                args += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.client_ca)]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # The embedded etcd dies with the process that started it, kill -9 included: an
            # orphan would keep the data dir's lock and the next `graylane serve` on it would
            # wait for an etcd that can never start. (util-linux, on every Debian system.)
            args = [setpriv, "--pdeathsig", "TERM", "--", *args]
        env = dict(os.environ)
        # A data dir written by an earlier start keeps its cluster; these are ignored then.
        log_file = self._log_path.open("ab")
        # Popen returns at once; the health wait below is async.
        self._proc = subprocess.Popen(  # noqa: ASYNC220
            args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

        log_file.close()
        try:
            async with asyncio.timeout(self._start_timeout):
                probe = self.tls.probe_context() if self.tls is not None else None
                while not await asyncio.to_thread(_healthy, self.client_port, probe):
                    if self._proc.poll() is not None:
                        tail = self._log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"etcd exited with {self._proc.returncode}:\n{tail}")
                    await asyncio.sleep(0.05)
        except BaseException:
            await self.stop()
            raise
        log.info("embedded etcd on %s (data %s)", self.endpoint, self.data_dir)

    def kill(self) -> None:
        """SIGKILL the member at once (a crash); `start()` brings it back on its data."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    async def stop(self, *, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)


class EtcdCluster(Lifecycle):
    """Several etcd members on loopback that form one cluster (fault tests: kill a member,
    lose the quorum, bring members back). `endpoints` is `host:port,host:port,...`."""

    def __init__(self, *, data_dir: pathlib.Path, size: int = 3, start_timeout: float = 30.0) -> None:
        names = [f"member{i}" for i in range(size)]
        peers = {name: free_port() for name in names}
        initial = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in peers.items())
        self.members = [
            EtcdProcess(
                data_dir=data_dir / name,
                name=name,
                peer_port=peers[name],
                initial_cluster=initial,
                start_timeout=start_timeout,
            )
            for name in names
        ]

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    async def start(self) -> None:
        # Together: a member answers healthy only once a quorum has elected a leader.
        try:
            await asyncio.gather(*(m.start() for m in self.members))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.members), return_exceptions=True)
