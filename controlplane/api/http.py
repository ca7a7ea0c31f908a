"""The one HTTP server of a Graylane process: `/metrics` and `/healthz`.

Owns an aiohttp application on one address and its lifecycle (`async with HttpServer(...)`
or `start()`/`stop()`). Routes are registered by name before the server starts (aiohttp
freezes its router then), so another feature adds a page with one `add_route` in the
composition root and links to it with `url_for(name)`. The routes for telemetry and health
are built here (`metrics_route`, `health_route`) and shared by the control plane and agents.

Concurrency: handlers run on the process's event loop; a handler must not block it.
Must not import: etcd, xds, agent code.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web
from graylane.controlplane.address import HostPort
from graylane.controlplane.lifecycle import Lifecycle

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SHUTDOWN_SECONDS = 5.0


class HttpServer(Lifecycle):
    """An aiohttp server bound to one address. `port` is the bound port once started.

    With an `ssl_context` it serves HTTPS only (and, when the context requires one, only to
    clients with a certificate its CA signed)."""

    def __init__(self, *, listen: str, ssl_context: ssl.SSLContext | None = None) -> None:
        address = HostPort.parse(listen, any_port=True)  # port 0 asks for a free one
        self._host, self._port = address.host, address.port
        self._ssl = ssl_context
        self._app = web.Application()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add_route(self, method: str, path: str, handler: Handler, *, name: str) -> None:
        """Register `handler` for `method path` under `name`; only before `start()`."""
        if self._runner is not None:
            raise RuntimeError(f"route {name!r}: the server has already started")
        self._app.router.add_route(method, path, handler, name=name)

    def url_for(self, name: str) -> str:
        """The path of the route registered as `name`."""
        return str(self._app.router[name].url_for())

    async def start(self) -> None:
        # access_log=None: Prometheus scrapes every few seconds; one INFO line each is noise.
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info(
            "%s on %s:%d (%s)",
            "HTTPS" if self._ssl else "HTTP",
            self._host,
            self.port,
            ", ".join(sorted(self._paths())),
        )

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _paths(self) -> set[str]:
        return {r.canonical for r in self._app.router.resources()}


def metrics_route(server: HttpServer, metrics_text: Callable[[str], tuple[bytes, str]]) -> None:
    """`GET /metrics`: what `metrics_text(accept_header)` renders (on the loop's thread, where
    the gauges may read live state)."""

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = metrics_text(request.headers.get("Accept", ""))
        response = web.Response(body=body)
        # Set the header verbatim: the exposition type carries `version=` and `charset=`
        # parameters that aiohttp's content_type= argument would refuse.
        response.headers["Content-Type"] = content_type
        return response

    server.add_route("GET", "/metrics", metrics, name="metrics")


def _no_problem() -> str | None:
    return None


def health_route(
    server: HttpServer, ready: Callable[[], bool], *, problem: Callable[[], str | None] = _no_problem
) -> None:
    """`GET /healthz`: 200 once the process serves; 503 before, and while `problem()` names
    a reason it cannot serve (etcd out of reach, say), with that reason as the body."""

    async def healthz(request: web.Request) -> web.Response:
        if not ready():
            return web.Response(status=503, text="starting\n")
        if (why := problem()) is not None:
            return web.Response(status=503, text=f"not serving: {why}\n")
        return web.Response(text="ok\n")

    server.add_route("GET", "/healthz", healthz, name="healthz")
