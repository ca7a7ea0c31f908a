"""Metrics from a real Prometheus that scrapes a real Envoy (`serve --prometheus-url`):
the control plane's windows get the same series the Envoy admin source gives, counted once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.domain import model
from graylane.controlplane.local.ports import free_port
from graylane.controlplane.progression.metrics import EnvoyAdminSource, PrometheusQuerySource
from graylane.controlplane.progression.windows import SeriesKey
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import run_load
from graylane.deploy.local.upstream import Upstream

from tests.conftest import require_binary
from tests.integration.conftest import stop_group

pytestmark = [pytest.mark.etcd, pytest.mark.envoy]

PROMETHEUS_HINT = "the `prometheus` binary is not on PATH; install it (Debian: `apt-get install prometheus`; make does)"
REQUESTS = 600
# The source answers every INTERVAL s about Prometheus as of DELAY s before; Prometheus
# scrapes every second, so each answer finds the scrapes up to its instant.
INTERVAL, DELAY = 1.5, 1.0


@contextlib.contextmanager
def prometheus_scraping(admin_port: int, tmp: Path) -> Iterator[str]:
    """A real Prometheus on loopback scraping one Envoy's /stats/prometheus every second."""
    binary = require_binary(shutil.which("prometheus"), PROMETHEUS_HINT)
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: envoy\n"
        "    metrics_path: /stats/prometheus\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{admin_port}']}}]\n"
    )
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            assert time.monotonic() < deadline, "prometheus did not become ready in 30 s"
            time.sleep(0.1)
        yield url
    finally:
        stop_group(proc, grace=10)
        log.close()


async def until_scraped(url: str, selector: str, timeout: float = 30) -> None:
    def present() -> bool:
        query = urllib.parse.urlencode({"query": selector})
        with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=3) as answer:
            return bool(json.loads(answer.read())["data"]["result"])

    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(present):
            await asyncio.sleep(0.2)


async def test_a_prometheus_that_scrapes_the_envoys_feeds_the_windows(
    store: EtcdStore, envoy: Any, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        v1 = await stack.enter_async_context(Upstream("checkout", "v1"))
        admin_port = free_port()
        prometheus_url = stack.enter_context(prometheus_scraping(admin_port, tmp_path))
        source = PrometheusQuerySource(prometheus_url, interval=INTERVAL, delay=DELAY)
        stack.push_async_callback(source.aclose)
        plane = await stack.enter_async_context(
            ControlPlane(store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0", metrics_source=source).running()
        )
        assert not any(isinstance(s, EnvoyAdminSource) for s in plane.metrics.sources)  # never both: no double count
        await store.put_service(model.Service(name="checkout", stable_version="v1"))
        endpoint = model.Endpoint(address="127.0.0.1", port=v1.port)
        await store.put_version(model.Version(service="checkout", name="v1", endpoints=(endpoint,)))
        proxy = await envoy(ads_port=plane.xds_port, node_id="envoy-prom", admin_port=admin_port)
        await plane.dataplane.wait_current(timeout=15)
        key = SeriesKey("checkout", "v1", "", "")

        def window() -> Any:
            return plane.windows.window(key, 0, time.time() + 1) if key in plane.windows.keys() else None

        # Prometheus already scrapes the Envoy and the source has read its counters once (its
        # baseline: a counter seen for the first time says nothing about when it counted).
        await until_scraped(prometheus_url, 'envoy_cluster_upstream_rq_total{envoy_cluster_name="checkout|v1"}')
        async with asyncio.timeout(30):
            while window() is None:
                await asyncio.sleep(0.2)
        v1.error_rate = 0.1
        load = await run_load(proxy.listen_port, authority="checkout", count=REQUESTS, rate=300, concurrency=8,
                              max_seconds=20)  # fmt: skip
        assert load.sent == REQUESTS and not load.errors, load.errors
        assert load.statuses[500] > 0
        # The answers add up to exactly what the Envoy counted, once (no admin reads beside).
        async with asyncio.timeout(40):
            while window().requests < REQUESTS:
                await asyncio.sleep(0.2)
        await asyncio.sleep(2 * INTERVAL + 0.5)  # two answers more add nothing
        assert (window().requests, window().errors) == (REQUESTS, load.statuses[500])
