"""One instance of one version of one demo service in a chain (A -> B -> C -> D -> E).

Owns: an aiohttp server on 127.0.0.1 that answers every GET with the path the request
took through the chain, and, when the service has a next hop, the call to it through the
service's local Envoy (the sidecar: `http://127.0.0.1:{sidecar_port}` with `Host: <next
hop>`). It carries the request's context on as a real service would: the W3C trace
context and baggage through OpenTelemetry's propagators (so the lane member `graylane=L`
and every other baggage member survive each hop), the `x-graylane` header when told to,
and the application headers it is configured to forward (rules at a later entry hop match
on them, as Istio's Bookinfo forwards `end-user`).

It decides nothing about lanes: which version serves the next hop is the sidecar's
choice. Must not import: etcd, graylane.controlplane, graylane.xds.

Concurrency: one asyncio loop; one keep-alive client pool per instance, opened by
`start` and closed by `close`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from types import TracebackType
from typing import Any, Final

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["LANE_HEADER", "ChainService", "main"]

LANE_HEADER: Final = "x-graylane"
_BAGGAGE: Final = "baggage"
_LOOPBACK: Final = "127.0.0.1"
_DOWNSTREAM_TIMEOUT_SECONDS: Final = 5.0
_SHUTDOWN_SECONDS: Final = 2.0

# Explicit, not from OTEL_* environment variables: the demo must behave the same anywhere.
# No span processor: spans exist to give every hop a parent and a trace id, not to export.
_PROVIDER: Final = TracerProvider(shutdown_on_exit=False)
_TRACER: Final = _PROVIDER.get_tracer("graylane.deploy.demo")
_PROPAGATOR: Final = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


@dataclass(eq=False)
class ChainService:
    """`async with ChainService(service="b", version="v2", next_hop="c", sidecar_port=p):`.

    Answers every GET (any path) with JSON ``{"path": "b:v2>c:v1>...", "hops": [...]}``:
    this hop's ``service:version`` and then the downstream path, and one hop record
    (service, version, lane, baggage as received, trace id) per hop, this hop first.
    Status 200 when the whole rest of the chain answered 200; 502 with the path so far and
    an ``error`` when the next hop failed; 500 for the injected `error_rate` share.

    `error_rate` may be changed while serving (a knob for rollback demos and tests).
    """

    _: KW_ONLY
    service: str
    version: str
    next_hop: str | None = None
    sidecar_port: int | None = None
    port: int = 0
    propagate_lane_header: bool = True
    forward_headers: tuple[str, ...] = ("x-user", "x-user-id")
    error_rate: float = 0.0
    requests: int = field(init=False, default=0)
    _runner: web.AppRunner | None = field(init=False, default=None)
    _session: aiohttp.ClientSession | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.next_hop and self.sidecar_port is None:
            raise ValueError(f"{self.name}: next_hop {self.next_hop!r} needs a sidecar_port")
        self.next_hop = self.next_hop or None
        self.forward_headers = tuple(h.lower() for h in self.forward_headers)

    @property
    def name(self) -> str:
        return f"{self.service}:{self.version}"

    # ------------------------------------------------------------------------ lifecycle

    async def start(self) -> ChainService:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        self._runner = runner
        try:
            site = web.TCPSite(runner, _LOOPBACK, self.port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            if self.next_hop:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=_DOWNSTREAM_TIMEOUT_SECONDS),
                    # Keep-alive pool to the sidecar; nothing but our own headers goes out.
                    connector=aiohttp.TCPConnector(limit=64),
                    auto_decompress=False,
                )
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop serving and close the client pool; idempotent."""
        session, self._session = self._session, None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if session is not None:
            await session.close()

    async def __aenter__(self) -> ChainService:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------------- serving

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        incoming = _PROPAGATOR.extract(carrier=request.headers)
        with _TRACER.start_as_current_span(f"{self.service} GET", context=incoming, kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("graylane.service", self.service)
            span.set_attribute("graylane.version", self.version)
            current = trace.set_span_in_context(span, incoming)
            hop = {
                "service": self.service,
                "version": self.version,
                "lane": request.headers.get(LANE_HEADER, ""),
                "baggage": request.headers.get(_BAGGAGE, ""),
                "trace_id": trace.format_trace_id(span.get_span_context().trace_id),
            }
            if self.error_rate and random.random() < self.error_rate:
                return self._answer(500, [hop], self.name, error=f"{self.name}: injected error")
            if not self.next_hop:
                return self._answer(200, [hop], self.name)
            status, body, error = await self._call_next(request, current)
            hops = [hop, *body.get("hops", [])]
            path = ">".join(p for p in (self.name, body.get("path", "")) if p)
            if status == 200 and not error:
                return self._answer(200, hops, path)
            return self._answer(502, hops, path, error=error or body.get("error") or f"{self.next_hop}: {status}")

    async def _call_next(self, request: web.Request, context: Context) -> tuple[int, dict[str, Any], str]:
        """GET the next hop through the sidecar: (status, JSON body or {}, error or "")."""
        assert self._session is not None and self.next_hop is not None
        headers: dict[str, str] = {"Host": self.next_hop}
        for name in self.forward_headers:
            if (value := request.headers.get(name)) is not None:
                headers[name] = value
        if self.propagate_lane_header and (lane := request.headers.get(LANE_HEADER)):
            headers[LANE_HEADER] = lane
        with _TRACER.start_as_current_span(f"GET {self.next_hop}", context=context, kind=trace.SpanKind.CLIENT) as span:
            _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span, context))
            url = f"http://{_LOOPBACK}:{self.sidecar_port}{request.path_qs}"
            try:
                async with self._session.get(url, headers=headers) as response:
                    raw = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                return 0, {}, f"{self.name} -> {self.next_hop}: {type(exc).__name__}: {exc}"
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if status != 200 and not body:
            return status, {}, f"{self.next_hop} answered {status}: {raw[:200].decode(errors='replace')}"
        return status, body, ""

    def _answer(self, status: int, hops: Sequence[Mapping[str, str]], path: str, *, error: str = "") -> web.Response:
        body: dict[str, Any] = {"path": path, "hops": list(hops)}
        if error:
            body["error"] = error
        return web.json_response(body, status=status, headers={"x-service": self.service, "x-version": self.version})


# --------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m graylane.deploy.demo.service",
        description="Run one instance of one demo chain service on 127.0.0.1 until SIGTERM.",
    )
    parser.add_argument("--service", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--port", type=int, default=0, help="listen port (0: a free one; printed first)")
    parser.add_argument("--next", dest="next_hop", default=None, help="the next service in the chain")
    parser.add_argument("--sidecar-port", type=int, default=None, help="the local Envoy's listener port")
    parser.add_argument("--no-lane-header", action="store_true", help="carry the lane in baggage only")
    parser.add_argument("--forward-header", action="append", default=None, help="application header to pass on")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    forward = tuple(args.forward_header) if args.forward_header else ("x-user", "x-user-id")
    async with ChainService(
        service=args.service,
        version=args.version,
        next_hop=args.next_hop,
        sidecar_port=args.sidecar_port,
        port=args.port,
        propagate_lane_header=not args.no_lane_header,
        forward_headers=forward,
        error_rate=args.error_rate,
    ) as service:
        print(service.port, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.next_hop and args.sidecar_port is None:
        print("--next needs --sidecar-port", file=sys.stderr)
        return 2
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
