"""Greeter services and clients for proxyless gRPC: no Envoy anywhere, routes from xDS.

Owns, for `graylane demo --grpc` and the integration tests:

* `serve`: one process hosting several greeter servers (grpc.aio, a generic handler for
  GREETER_METHOD on 127.0.0.1), each one version of one service; a server with a next hop
  calls it through `xds:///<next>` (gRPC's own xDS resolver against the control plane)
  and propagates the lane with `graylane.lanes`. Every answer lists the hops that served
  it, each with the lane it saw, so a test sees the path a call took.
* `client`: a proxyless gRPC client (grpcio's xDS resolver) driven by JSON lines on stdin
  and answering JSON lines on stdout (`ClientProtocol`); `greeter_client.js` beside this
  file speaks the same protocol through @grpc/grpc-js-xds under Node.
* `GreeterProcess` / `ClientProcess`: those processes started with a bootstrap that
  points at one control plane (GRPC_XDS_BOOTSTRAP_CONFIG), stopped by PID.

Each process reads its own bootstrap: gRPC keeps one xDS client per process, so a process
per control plane keeps tests (and the demo) apart. Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from graylane.controlplane.lifecycle import Lifecycle
from graylane.lanes import LaneClientInterceptor, LaneServerInterceptor, current_lane

__all__ = [
    "GREETER_METHOD",
    "ClientProcess",
    "GreeterProcess",
    "ServerSpec",
    "bootstrap",
    "node_binary",
    "node_modules",
]

GREETER_METHOD: Final = "/graylane.demo.Greeter/Hello"
_LOOPBACK: Final = "127.0.0.1"
_CALL_TIMEOUT_SECONDS: Final = 5.0
_START_TIMEOUT_SECONDS: Final = 20.0
_JS_CLIENT: Final = Path(__file__).with_name("greeter_client.js")
_PASSED_ON: Final = frozenset({"x-user", "x-canary"})


def bootstrap(xds_port: int, *, node_id: str, xdstp: bool = False) -> str:
    """A gRPC xDS bootstrap (JSON) pointing at the control plane's xDS port on loopback.

    `xdstp`: name the listeners in the xdstp form (`graylane.xds.view.XDSTP_LISTENER_TEMPLATE`).
    """
    config: dict[str, Any] = {
        "xds_servers": [
            {
                "server_uri": f"{_LOOPBACK}:{xds_port}",
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": node_id, "locality": {"zone": "graylane"}},
    }
    if xdstp:
        config["client_default_listener_resource_name_template"] = (
            "xdstp://graylane/envoy.config.listener.v3.Listener/%s"
        )
        config["authorities"] = {"graylane": {}}
    return json.dumps(config)


# --------------------------------------------------------------------------------- servers


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One greeter server: `service` at `version`, calling `next_hop` (if any) for every call;
    `own_lane`: the lane this version is gray for (it stamps calls that arrive untagged)."""

    service: str
    version: str
    next_hop: str = ""
    own_lane: str = ""

    @property
    def key(self) -> str:
        return f"{self.service}:{self.version}"

    def arg(self) -> str:
        return ":".join((self.service, self.version, self.next_hop, self.own_lane))

    @classmethod
    def parse(cls, text: str) -> ServerSpec:
        parts = [*text.split(":"), "", ""]
        return cls(parts[0], parts[1], parts[2], parts[3])


def _identity(data: bytes) -> bytes:
    return data


class _Greeter:
    """The handler of one greeter server."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._channel: grpc.aio.Channel | None = None
        if spec.next_hop:
            self._channel = grpc.aio.insecure_channel(f"xds:///{spec.next_hop}", interceptors=[LaneClientInterceptor()])

    async def hello(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        hops = [{"service": self.spec.service, "version": self.spec.version, "lane": current_lane() or ""}]
        if self._channel is not None:
            call = self._channel.unary_unary(
                GREETER_METHOD, request_serializer=_identity, response_deserializer=_identity
            )
            # Application headers a later entry's rules may match on go along (the lane
            # itself is the interceptor's job).
            passed = [(k, v) for k, v in context.invocation_metadata() or () if k in _PASSED_ON]
            try:
                answer = await call(request, timeout=_CALL_TIMEOUT_SECONDS, metadata=passed)
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), f"{self.spec.key} -> {self.spec.next_hop}: {exc.details()}")
            hops += json.loads(answer)["hops"]
        return json.dumps({"hops": hops}).encode()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


async def _serve(specs: Sequence[ServerSpec]) -> None:
    servers: list[tuple[grpc.aio.Server, _Greeter]] = []
    ports: dict[str, int] = {}
    for spec in specs:
        greeter = _Greeter(spec)
        server = grpc.aio.server(interceptors=[LaneServerInterceptor(own_lane=spec.own_lane or None)])
        handler = grpc.unary_unary_rpc_method_handler(
            greeter.hello, request_deserializer=_identity, response_serializer=_identity
        )
        service, method = GREETER_METHOD.lstrip("/").split("/")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        ports[spec.key] = server.add_insecure_port(f"{_LOOPBACK}:0")
        await server.start()
        servers.append((server, greeter))
    print(json.dumps({"ports": ports}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Also ends when the parent closes our stdin (it died or is done with us).
    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, lambda: stop.set() if not os.read(stdin, 1) else None)
    await stop.wait()
    for server, greeter in servers:
        await server.stop(0.5)
        await greeter.close()


# --------------------------------------------------------------------------------- client


def _path(answer: bytes) -> str:
    """`a:v1>b:v2>c:v1` for an answer's hops (with `@lane` on hops that saw one)."""
    hops = json.loads(answer)["hops"]
    return ">".join(f"{h['service']}:{h['version']}" + (f"@{h['lane']}" if h["lane"] else "") for h in hops)


class _Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.paths: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "paths": dict(self.paths),
            "errors": dict(self.errors.most_common(5)),
            **extra,
        }


class ClientProtocol:
    """One proxyless channel to `xds:///<target>`, driven by JSON commands (one a line):

    * ``{"op": "ready", "timeout": s}``: one call waiting for the channel to be ready;
    * ``{"op": "call", "count": n, "concurrency": c, "metadata": [[k, v], ...], "max_seconds": s}``:
      `count` calls (fewer if `max_seconds` passes), answering ok / failed / paths / errors;
    * ``{"op": "keyed", "header": h, "keys": [k, ...], "concurrency": c}``: one call per key
      with header `h` set to it, answering ok / failed and ``by_key``: key -> path;
    * ``{"op": "start", "concurrency": c, "metadata": [...]}`` then ``{"op": "stop"}``:
      calls without pause in the background (bounded: at most 10 minutes) until stopped,
      then the same answer;
    * ``{"op": "exit"}``.
    """

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.call = self.channel.unary_unary(
            GREETER_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        self._background: tuple[asyncio.Task[None], _Tally, asyncio.Event] | None = None

    async def _one(self, tally: _Tally, metadata: Sequence[tuple[str, str]], *, wait: bool = False) -> None:
        try:
            answer = await self.call(b"{}", metadata=metadata, timeout=_CALL_TIMEOUT_SECONDS, wait_for_ready=wait)
        except grpc.aio.AioRpcError as exc:
            tally.failed += 1
            tally.errors[f"{exc.code().name}: {exc.details()}"[:200]] += 1
            return
        tally.ok += 1
        tally.paths[_path(answer)] += 1

    async def handle(self, command: Mapping[str, Any]) -> dict[str, Any] | None:
        op = command.get("op")
        metadata = [(str(k), str(v)) for k, v in command.get("metadata", [])]
        concurrency = max(1, min(int(command.get("concurrency", 8)), 64))
        if op == "ready":
            tally = _Tally()
            deadline = time.monotonic() + float(command.get("timeout", 20))
            while tally.ok == 0 and time.monotonic() < deadline:
                await self._one(tally, metadata, wait=True)
            return tally.result()
        if op == "call":
            count = min(int(command["count"]), 100_000)
            tally = _Tally()
            remaining = iter(range(count))
            stop_at = time.monotonic() + float(command.get("max_seconds", 30))

            async def worker() -> None:
                for _ in remaining:
                    if time.monotonic() > stop_at:
                        return
                    await self._one(tally, metadata)

            began = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return tally.result(seconds=round(time.monotonic() - began, 3))
        if op == "keyed":
            header = str(command["header"])
            keys = [str(k) for k in command["keys"]][:10_000]
            by_key: dict[str, str] = {}
            tally = _Tally()
            pending = iter(keys)

            async def keyed() -> None:
                for key in pending:
                    one = _Tally()
                    await self._one(one, [*metadata, (header, key)])
                    tally.ok += one.ok
                    tally.failed += one.failed
                    tally.errors.update(one.errors)
                    by_key[key] = next(iter(one.paths), "")

            await asyncio.gather(*(keyed() for _ in range(concurrency)))
            return tally.result(by_key=by_key)
        if op == "start":
            tally, stop = _Tally(), asyncio.Event()
            end_at = time.monotonic() + 600

            async def steady() -> None:
                while not stop.is_set() and time.monotonic() < end_at:
                    await self._one(tally, metadata)

            async def run() -> None:
                await asyncio.gather(*(steady() for _ in range(concurrency)))

            self._background = (asyncio.create_task(run()), tally, stop)
            return {"started": True}
        if op == "stop":
            if self._background is None:
                return {"error": "not started"}
            task, tally, stop = self._background
            self._background = None
            stop.set()
            await task
            return tally.result()
        if op == "exit":
            return None
        return {"error": f"unknown op {op!r}"}


async def _client(target: str) -> None:
    protocol = ClientProtocol(target)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            if not line.strip():
                continue
            answer = await protocol.handle(json.loads(line))
            if answer is None:
                break
            print(json.dumps(answer), flush=True)
    finally:
        await protocol.channel.close()


# ------------------------------------------------------------------------- from a parent


class _Child:
    """A child process talking JSON lines over its stdin / stdout, stopped by PID."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self._argv = list(argv)
        self._env = dict(env)
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: list[str] = []
        self._stderr: asyncio.Task[None] | None = None  # reads the child's stderr until it closes

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,
        )
        self._stderr = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_tail = [*self.stderr_tail[-40:], line.decode(errors="replace").rstrip()]

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self._argv[-1]} exited: " + " | ".join(self.stderr_tail[-10:]))
        found: dict[str, Any] = json.loads(line)
        return found

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._stderr is not None:
            self._stderr.cancel()
            await asyncio.gather(self._stderr, return_exceptions=True)


def _python_argv(*args: str) -> list[str]:
    # -P: the working folder (a checkout's root holds `xds/`) must not shadow packages.
    return [sys.executable, "-P", "-m", "graylane.deploy.demo.greeter", *args]


def _env(xds_port: int, node_id: str, *, xdstp: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    env["GRPC_XDS_BOOTSTRAP_CONFIG"] = bootstrap(xds_port, node_id=node_id, xdstp=xdstp)
    return env


class GreeterProcess(Lifecycle):
    """`serve` in a child process: `ports` maps "service:version" to its port once started."""

    def __init__(self, specs: Sequence[ServerSpec], *, xds_port: int, node_id: str = "greeters") -> None:
        self._child = _Child(_python_argv("serve", *(s.arg() for s in specs)), _env(xds_port, node_id))
        self.ports: dict[str, int] = {}

    async def start(self) -> None:
        await self._child.start()
        try:
            self.ports = {k: int(v) for k, v in (await self._child.read(_START_TIMEOUT_SECONDS))["ports"].items()}
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self._child.stop()


def node_modules() -> Path | None:
    """Where `make node` installed @grpc/grpc-js-xds (None: not installed)."""
    root = Path(os.environ.get("GRAYLANE_NODE_MODULES", Path(sys.prefix) / "node" / "node_modules"))
    return root if (root / "@grpc" / "grpc-js-xds").is_dir() else None


def node_binary() -> str | None:
    return shutil.which("node")


class ClientProcess(Lifecycle):
    """A proxyless client of `xds:///<target>` in a child process: grpcio ("python") or
    @grpc/grpc-js-xds ("node"), driven by `ClientProtocol` commands."""

    def __init__(self, kind: str, target: str, *, xds_port: int, node_id: str, xdstp: bool = False) -> None:
        env = _env(xds_port, node_id, xdstp=xdstp)
        if kind == "python":
            argv = _python_argv("client", target)
        elif kind == "node":
            modules, node = node_modules(), node_binary()
            if modules is None or node is None:
                raise FileNotFoundError("node or @grpc/grpc-js-xds is missing: run `make node`")
            env["NODE_PATH"] = str(modules)
            argv = [node, str(_JS_CLIENT), target]
        else:
            raise ValueError(f"unknown client kind {kind!r}")
        self.kind = kind
        self._child = _Child(argv, env)

    async def start(self) -> None:
        await self._child.start()

    async def stop(self) -> None:
        if self._child.proc is not None and self._child.proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                self._child.proc.stdin.write(b'{"op": "exit"}\n')
        await self._child.stop()

    async def send(self, command: Mapping[str, Any], *, timeout: float = 60) -> dict[str, Any]:
        proc = self._child.proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.write(json.dumps(command).encode() + b"\n")
        await proc.stdin.drain()
        return await self._child.read(timeout)

    async def ready(self, *, timeout: float = 20, metadata: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        answer = await self.send({"op": "ready", "timeout": timeout, "metadata": list(metadata)}, timeout=timeout + 5)
        if not answer.get("ok"):
            raise RuntimeError(f"{self.kind} client never got an answer: {answer} | {self.stderr()}")
        return answer

    async def calls(
        self, count: int, *, concurrency: int = 8, metadata: Sequence[tuple[str, str]] = (), max_seconds: float = 30
    ) -> dict[str, Any]:
        command = {
            "op": "call",
            "count": count,
            "concurrency": concurrency,
            "metadata": list(metadata),
            "max_seconds": max_seconds,
        }
        return await self.send(command, timeout=max_seconds + 10)

    def stderr(self) -> str:
        return " | ".join(self._child.stderr_tail[-10:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graylane.deploy.demo.greeter")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="greeter servers: SERVICE:VERSION[:NEXT[:OWN_LANE]] each")
    serve.add_argument("specs", nargs="+")
    client = sub.add_parser("client", help="a proxyless client driven by JSON lines on stdin")
    client.add_argument("target", help="xds:///SERVICE")
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve([ServerSpec.parse(s) for s in args.specs]))
    else:
        asyncio.run(_client(args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
